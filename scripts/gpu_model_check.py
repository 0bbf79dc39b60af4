"""Whole models compiled for CUDA run on the GPU and equal the torch reference bit for bit.

Usage (on a machine with an NVIDIA GPU): python scripts/gpu_model_check.py
"""

import sys

import numpy as np
import torch

sys.path.insert(0, "tests")
from conftest import SmallResNet, randomize_bn  # noqa: E402

import tvm_rmsmp as rmsmp  # noqa: E402
from tvm_rmsmp.models.fmnist_cnn import load_pretrained  # noqa: E402


def check(name, model, shape, calib_shape):
    torch.manual_seed(0)
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), [torch.randn(*calib_shape) for _ in range(3)])
    x = torch.randn(*shape)
    exe = rmsmp.compile(q, (x,), target={"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}})
    same = np.array_equal(exe(x), q(x).detach().numpy())
    ms = exe.benchmark(x, repeat=20) * 1e3
    print(f"{name}: equals torch reference: {same}; {ms:.3f} ms per batch of {shape[0]} (median of 20)", flush=True)
    return same


ok = check("SmallResNet", randomize_bn(SmallResNet()).eval(), (4, 1, 16, 16), (8, 1, 16, 16))
ok &= check("FashionCNN", load_pretrained(), (64, 1, 28, 28), (64, 1, 28, 28))
seq = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
ok &= check("MLP on [2, 16, 64] (GELU)", seq, (2, 16, 64), (4, 16, 64))
sys.exit(0 if ok else 1)
