"""Deploy on a CPU: quantize a model with RMSMP, compile it for this CPU, export the library,
load it back in a fresh runtime and run it.

Run: python tutorials/deploy_cpu.py [output_dir]

The model is a small BERT-style feed-forward block (Linear 256 -> 1024, GELU, Linear 1024 ->
256) with random weights, at batch 1, so the tutorial needs no data set. Packed 4-bit rows
run the x86 intrinsic kernels where the CPU has AVX2 (AVX-512 VNNI: ``vpdpbusd``); other
CPUs get the portable schedule.
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

# 2. RMSMP quantization: every output row gets SP2-4, Fixed-4 or Fixed-8 (60:35:5), 8-bit activations.
q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib_data=calib)

# 3. Compile for this CPU. exe.stats says which kernels the build uses.
x = torch.randn(1, 256)
exe = rmsmp.compile(q, (x,), target="llvm")
print("target:", exe.target)
print("kernels:", exe.stats["cpu_kernels"], "packed 4-bit groups:", exe.stats["packed"])
y = exe(x)
print("TVM equals the torch reference:", np.array_equal(y, q(x).detach().numpy()))
print(f"latency (batch 1): {exe.benchmark(x, repeat=20) * 1e6:.1f} us")

# 4. Export a shared library (its input specs go to a .json beside it) ...
path = exe.export_library(os.path.join(out_dir, "ffn_rmsmp.so"))
print("exported:", path, f"({os.path.getsize(path) / 1e6:.2f} MB)")

# 5. ... and load it back, as a deployment would (no torch model, no compiler needed here).
loaded = rmsmp.load(path)
print("loaded library matches:", np.array_equal(loaded(x.numpy()), y))
