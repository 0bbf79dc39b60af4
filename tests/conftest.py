"""Shared helpers: independent numpy integer references and small models."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("TVM_NUM_THREADS", "2")
warnings.filterwarnings("ignore", category=FutureWarning)


def tunable_cpu_target():
    """The host CPU as a tuning target; on an x86 host with AVX2 the same CPU without it
    (``mcpu=x86-64``): AVX2 and AVX-512 give every row group a fixed intrinsic kernel, which
    leaves nothing to tune, while without AVX2 they run the tunable portable schedule."""
    import os

    import tvm_rmsmp as rmsmp
    from schedules.x86_intrin import x86_isa

    if x86_isa(rmsmp.resolve_target("llvm")) is not None:
        return {"kind": "llvm", "mcpu": "x86-64", "num-cores": os.cpu_count() or 1}
    return "llvm"


def np_dense_acc(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """int64 ``x @ w.T`` over the last axis (the reference the kernels are checked against)."""
    return np.einsum("...k,nk->...n", x.astype(np.int64), w.astype(np.int64))


def np_conv_acc(x: np.ndarray, w: np.ndarray, stride, padding, dilation) -> np.ndarray:
    """int64 NCHW direct convolution, groups=1, zero padding."""
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, f, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            ys = i * dilation[0]
            xs = j * dilation[1]
            patch = xp[:, :, ys: ys + stride[0] * (oh - 1) + 1: stride[0], xs: xs + stride[1] * (ow - 1) + 1: stride[1]]
            out += np.einsum("nchw,fc->nfhw", patch, w[:, :, i, j].astype(np.int64))
    return out


def np_epilogue(acc: np.ndarray, bias: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * acc.ndim
    shape[axis] = -1
    return (acc + bias.reshape(shape)).astype(np.float32) * scale.astype(np.float32).reshape(shape)


class SmallResNet(torch.nn.Module):
    """Conv-BN-ReLU, a residual block, stride 2, pooling, flatten and two dense layers."""

    def __init__(self, c=16):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.conv_a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(c)
        self.conv_b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(2 * c * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.relu(self.bn_b(self.conv_b(y)) + x)
        x = torch.relu(self.down(x))
        x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def randomize_bn(model: torch.nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture(scope="session")
def small_resnet():
    torch.manual_seed(0)
    model = randomize_bn(SmallResNet()).eval()
    calib = [torch.randn(8, 1, 16, 16) for _ in range(3)]
    return model, calib


@pytest.fixture(scope="session")
def host_target():
    from tvm_rmsmp.compiler.targets import resolve_target

    return resolve_target("llvm")


def opencl_available() -> bool:
    """True if an OpenCL device (PoCL here) and pyopencl are usable."""
    try:
        from tvm_rmsmp.runtime.opencl import opencl_context

        opencl_context()
        return True
    except Exception:  # noqa: BLE001
        return False


def run_tutorial(name: str, *args: str):
    """Run tutorials/<name> in a fresh interpreter; returns the CompletedProcess."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "tutorials", name), *args],
                          capture_output=True, text=True, timeout=600)
