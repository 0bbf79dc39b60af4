"""Quickstart: quantize a PyTorch model with RMSMP, compile it with TVM, export and reload it.

Run: python tutorials/quickstart.py [output_dir]
"""

import os
import sys
import tempfile

import numpy as np
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.models.data import load_fashion_mnist
from tvm_rmsmp.models.fmnist_cnn import load_pretrained

out_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()

# 1. A trained float model and a few calibration batches (here: Fashion-MNIST training images).
model = load_pretrained()
x_train, _ = load_fashion_mnist("train")
calib = [torch.from_numpy(x_train[i:i + 128]) for i in range(0, 512, 128)]

# 2. RMSMP: every Linear/Conv2d row gets SP2-4, Fixed-4 or Fixed-8 at 60:35:5, activations 8-bit.
cfg = rmsmp.RMSMPConfig(ratio={"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}, act_bits=8)
q = rmsmp.quantize(model, cfg, calib_data=calib)
for name, plan in rmsmp.row_plans(q).items():
    print(f"{name:14s} {plan.num_rows:4d} rows {plan.counts()}")

# 3. Compile for this CPU. The quantized torch model is the integer-exact reference.
x_test, y_test = load_fashion_mnist("test")
x = torch.from_numpy(x_test[:8])
exe = rmsmp.compile(q, (x,), target="llvm")
y = exe(x)
print("TVM equals the torch reference:", np.array_equal(y, q(x).detach().numpy()))
print("predictions:", y.argmax(1).tolist(), "labels:", y_test[:8].tolist())
print(f"latency (batch 8): {exe.benchmark(x, repeat=10) * 1e3:.3f} ms")

# 4. Export a shared library (plus its input specs) and load it back.
path = exe.export_library(os.path.join(out_dir, "fmnist_rmsmp.so"))
loaded = rmsmp.load(path)
print("exported to", path)
print("loaded library matches:", np.array_equal(loaded(x), y))
