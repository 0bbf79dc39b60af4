"""Prune, quantize, deploy: a block-punched pruned, RMSMP-quantized model compiled to kernels
that skip the pruned blocks.

Run: python tutorials/prune_and_deploy.py [output_dir]

The model is a small BERT-style feed-forward block (Linear 256 -> 1024, GELU, Linear 1024 ->
256) with random weights, at batch 1, so the tutorial needs no data set. 75 % of its weights
are pruned in blocks of 16 output rows x 4 input channels; the compiled dense layers keep
only the blocks holding a non-zero (on AVX-512 VNNI one ``vpdpbusd`` per block).
"""

import os
import sys
import tempfile

import numpy as np
import torch

import tvm_rmsmp as rmsmp

out_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
torch.manual_seed(0)

# 1. A float model and a few calibration batches.
model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).eval()
calib = [torch.randn(8, 256) for _ in range(4)]

# 2. Prune: block-punched, 75 %, importance |w| x the input channel's RMS on the calibration data.
#    (Give train_fn=... to prune gradually with fine-tuning between the steps.)
pcfg = rmsmp.PruneConfig(scheme="block_punched", sparsity=0.75, block=(16, 4), importance="activation")
pm = rmsmp.prune(model, pcfg, calib_data=calib)
masks = rmsmp.prune_masks(pm)
print("pruned:", {name: f"{1 - m.mean():.2f}" for name, m in masks.items()})

# 3. RMSMP quantization keeps the zeros (and the masks, for QAT).
q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(), calib_data=calib)

# 4. Compile: the pruned layers become block-sparse kernels; exe.stats["sparse"] says how sparse.
x = torch.randn(1, 256)
exe = rmsmp.compile(q, (x,), target="llvm")
for layer, st in exe.stats["sparse"].items():
    print(f"layer {layer}: {st['blocks_kept']} of {st['blocks']} blocks of {st['block']} kept")
print("kernels:", exe.stats["cpu_kernels"])
y = exe(x)
print("TVM equals the torch reference:", np.array_equal(y, q(x).detach().numpy()))

dense = rmsmp.compile(rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib_data=calib), (x,), target="llvm")
print(f"latency (batch 1): sparse {exe.benchmark(x, repeat=20) * 1e6:.1f} us, "
      f"dense {dense.benchmark(x, repeat=20) * 1e6:.1f} us")

# 5. Export and load back, as a deployment would.
path = exe.export_library(os.path.join(out_dir, "ffn_pruned.so"))
print("loaded library matches:", np.array_equal(rmsmp.load(path)(x.numpy()), y))
