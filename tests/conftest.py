"""Shared helpers: independent numpy integer references and small models."""

from __future__ import annotations

import functools
import os
import random
import warnings
import zlib
from typing import Tuple

import numpy as np
import pytest
import torch

os.environ.setdefault("TVM_NUM_THREADS", "2")
warnings.filterwarnings("ignore", category=FutureWarning)

try:  # hypothesis: print the failing example's reproduction blob; HYPOTHESIS_PROFILE=ci derandomizes
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("rmsmp", print_blob=True)
    _hyp_settings.register_profile("ci", print_blob=True, derandomize=True)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rmsmp"))
except ImportError:  # pragma: no cover
    pass


def stable_seed(*parts) -> int:
    """A seed from ``parts`` (ints, strings, tuples of them) that is the same in every process.

    Not ``hash(...)``: string hashing is randomized per process (PYTHONHASHSEED), so a failure
    seeded that way could not be reproduced."""
    return zlib.crc32(repr(parts).encode())


@pytest.fixture(autouse=True)
def _stable_global_rng(request):
    """Seed torch's, numpy's and ``random``'s global generators from the test's id before each
    test: weights of models built in a test and unseeded ``torch.randn`` calls no longer depend
    on which tests ran before in the same process (test order, ``-k``, ``-n``)."""
    seed = stable_seed(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


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


def mixed_conv_layer(xs, n: int, k: int, stride: int, act: str, rng):
    """A conv layer (``relay_passes.contract.ConvLayer``) of ``n`` rows of SP2-4, Fixed-4 and
    Fixed-8 in a scattered output order, random levels, biases and scales: ``(layer, order,
    w_int [n, C, k, k], bias [n] int64, scale [n] float32)`` with the rows in output order
    (``order[c] = (group, row)``), for the layer kernels' integer-exactness tests."""
    from relay_passes.contract import ConvLayer, packed_weight
    from tvm_rmsmp.quant.schemes import get_scheme

    names = ["sp2_4", "fixed_4", "fixed_8"]
    kind = np.arange(n) % 3
    rng.shuffle(kind)
    w_int = np.zeros((n, xs[1], k, k), np.int8)
    groups, source = [], {}
    for gi, name in enumerate(names):
        rows = np.nonzero(kind == gi)[0]
        w_int[rows] = rng.choice(get_scheme(name).levels, size=(rows.size, xs[1], k, k))
        stored = w_int[rows] if name == "fixed_8" else packed_weight(w_int[rows].reshape(rows.size, -1), name)
        groups.append((name, stored, rng.integers(-1000, 1000, rows.size).astype(np.int32),
                       rng.uniform(0.5, 2, rows.size).astype(np.float32)))
        source.update({c: (gi, r) for r, c in enumerate(rows)})
    layer = ConvLayer(tuple(xs), act, (k, k), (stride, stride), (0, 0), (1, 1), tuple(groups), (True, True, False))
    order = [source[c] for c in range(n)]
    bias = np.array([groups[g][2][r] for g, r in order], np.int64)
    scale = np.array([groups[g][3][r] for g, r in order], np.float32)
    return layer, order, w_int, bias, scale


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


def np_bsr(w: np.ndarray, br: int, bc: int):
    """BSR of ``w`` written out block by block (an independent reference, not the library's code):
    ``(blocks [nnz, br, bc] int8, block columns [nnz] int32, block-row starts [n / br + 1] int32)``."""
    n, k = w.shape
    blocks, col, ptr = [], [], [0]
    for i in range(n // br):
        for j in range(k // bc):
            b = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            if np.any(b):
                blocks.append(b)
                col.append(j)
        ptr.append(len(col))
    blocks = np.array(blocks, np.int8) if blocks else np.zeros((1, br, bc), np.int8)
    return blocks, np.array(col or [0], np.int32), np.array(ptr, np.int32)


def block_sparse_levels(rng, levels, n: int, k: int, br: int, bc: int, density: float) -> np.ndarray:
    """Random int8 ``levels`` in ``[n, k]`` with ``br x bc`` blocks kept at ``density`` (the first
    block row empty)."""
    w = rng.choice(levels, size=(n, k)).astype(np.int8)
    keep = rng.random((n // br, k // bc)) < density
    keep[0, :] = False  # an empty block row
    return w * np.repeat(np.repeat(keep, br, 0), bc, 1).astype(np.int8)


class TwoLayerMLP(torch.nn.Module):
    """Linear k -> h, ReLU, Linear h -> n: the small model of the sparse-kernel tests."""

    def __init__(self, k=64, h=96, n=32):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(k, h), torch.nn.Linear(h, n)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def np_dense_layer(layer, x: np.ndarray) -> np.ndarray:
    """The integer contract of one RMSMP dense layer in numpy (docs/design.md)."""
    inv = np.float32(layer.inv_act_scale)
    xq = np.clip(np.rint(x.astype(np.float32) * inv), layer.qmin, layer.qmax).astype(np.int64)
    acc = xq @ layer.weight_int.numpy().astype(np.int64).T
    return (acc + layer.bias_int.numpy()).astype(np.float32) * layer.out_scale.numpy()


def np_layer_acc(op: str, x: np.ndarray, w_int: np.ndarray, bias: np.ndarray, stride: int = 1) -> np.ndarray:
    """``acc + bias`` of a dense (``[m, k]`` input) or unpadded conv2d layer, in int64."""
    if op == "dense":
        return np_dense_acc(x, w_int) + bias[None, :]
    return np_conv_acc(x, w_int, (stride, stride), (0, 0), (1, 1)) + bias[None, :, None, None]


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


@functools.lru_cache(maxsize=None)
def opencl_status() -> Tuple[bool, str]:
    """``(usable, why)``: whether an OpenCL device (PoCL here) and pyopencl are usable, and
    the device found or the reason there is none (checked once per process)."""
    try:
        from tvm_rmsmp.runtime.opencl import OpenCLUnavailable, opencl_context
    except Exception as err:  # noqa: BLE001 - reported, not swallowed: the skip says it
        return False, f"tvm_rmsmp.runtime.opencl does not import: {type(err).__name__}: {err}"
    try:
        _, _, device = opencl_context()
    except OpenCLUnavailable as err:
        return False, str(err)
    except Exception as err:  # noqa: BLE001 - e.g. a pyopencl error creating the context
        return False, f"creating an OpenCL context failed: {type(err).__name__}: {err}"
    return True, f"OpenCL device {device.name!r}"


def opencl_available() -> bool:
    """True if an OpenCL device and pyopencl are usable; :func:`opencl_skip_reason` says why not."""
    return opencl_status()[0]


def opencl_skip_reason() -> str:
    """The skip message for OpenCL tests: why no OpenCL device is usable."""
    usable, why = opencl_status()
    return f"no usable OpenCL device: {why}" if not usable else "OpenCL is available"


def needs_opencl():
    """``pytest.mark.skipif`` for tests that run OpenCL kernels, with the reason in the message."""
    return pytest.mark.skipif(not opencl_available(), reason=opencl_skip_reason())


def run_tutorial(name: str, *args: str):
    """Run tutorials/<name> in a fresh interpreter; returns the CompletedProcess."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "tutorials", name), *args],
                          capture_output=True, text=True, timeout=600)
