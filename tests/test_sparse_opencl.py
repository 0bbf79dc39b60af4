"""The block-sparse dense op on GPU targets (schedules/gpu_sparse.py): integer-exact on PoCL
against numpy for every scheme's levels, signed and unsigned activations, batch 1 and more;
a pruned model compiled for a Mali target runs its sparse kernels; the CUDA build of the same
schedule has the kernel (built, never run: no GPU here)."""

import re
import warnings

import numpy as np
import pytest
import torch
import tvm
from conftest import (
    TwoLayerMLP,
    block_sparse_levels,
    needs_opencl,
    np_bsr,
    np_dense_layer,
)

import schedules
import tvm_rmsmp as rmsmp
from relay_passes import contract
from relay_passes.sparsify_row_groups import bsr_dense_func
from schedules.gpu_sparse import GPU_KERNEL
from tvm_rmsmp.quant.schemes import get_scheme

MALI = {"kind": "opencl", "device": "mali", "host": {"kind": "llvm"}}
CUDA = {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}


def _sparse_weight(rng, scheme, n, k, br, bc, density):
    return block_sparse_levels(rng, get_scheme(scheme).levels, n, k, br, bc, density)


def _scheduled(f, target):
    mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
    return schedules.apply_rules(mod, rmsmp.resolve_target(target))["main"]


CASES = [  # (m, k, n, br, bc, x dtype, scheme)
    (1, 64, 48, 16, 4, "int8", "sp2_4"),
    (3, 64, 32, 16, 4, "uint8", "sp2_4"),
    (1, 32, 24, 8, 4, "uint8", "fixed_4"),
    (4, 48, 16, 8, 4, "int8", "fixed_4"),
    (1, 36, 12, 4, 4, "int8", "fixed_8"),
    (5, 32, 32, 16, 4, "uint8", "fixed_8"),
    (2, 48, 16, 2, 8, "int8", "fixed_8"),    # blocks of 8 columns
    (3, 32, 6, 1, 4, "uint8", "sp2_4"),      # one-row blocks
]


@needs_opencl()
@pytest.mark.parametrize("m,k,n,br,bc,x_dtype,scheme", CASES)
def test_gpu_bsr_kernel_exact_on_pocl(m, k, n, br, bc, x_dtype, scheme):
    from test_opencl import _run_kernel

    rng = np.random.default_rng(m * 1000 + k + n + br)
    w = _sparse_weight(rng, scheme, n, k, br, bc, 0.4)
    blocks, col, ptr = np_bsr(w, br, bc)
    x = rng.integers(0, 256, (m, k)).astype("uint8") if x_dtype == "uint8" else \
        rng.integers(-128, 128, (m, k)).astype("int8")
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    scale = rng.uniform(0.01, 2, n).astype(np.float32)
    wsum = w.astype(np.int64).sum(1).astype(np.int32)
    func = _scheduled(bsr_dense_func(m, k, n, br, bc, int(col.size), x_dtype, "fc", [scheme] * n), MALI)
    assert str(func.attrs[contract.CPU_KERNEL]) == GPU_KERNEL
    out, kernel = _run_kernel(func, rmsmp.resolve_target(MALI), [x, blocks, col, ptr, wsum, bias, scale], (m, n))
    ref = (x.astype(np.int64) @ w.astype(np.int64).T + bias).astype(np.float32) * scale
    np.testing.assert_array_equal(out, ref)
    for launch in kernel.launches:
        assert int(np.prod(launch.block)) <= 256  # Mali's work-group limit
    assert "__local" not in kernel.source and "barrier(" not in kernel.source


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = TwoLayerMLP().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 64, generator=g)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = rmsmp.prune(model, rmsmp.PruneConfig(scheme="block_punched", sparsity=0.75, block=(16, 4)))
        ratio = {"sp2_4": 0.6, "fixed_4": 0.3, "fixed_8": 0.1}
        q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(ratio=ratio, assign="variance"), calib_data=calib)
    return q, g


@needs_opencl()
def test_pruned_model_runs_sparse_kernels_on_pocl(pruned):
    q, g = pruned
    for batch in (1, 3):
        x = torch.randn(batch, 64, generator=g)
        exe = rmsmp.compile(q, (x,), target=MALI)
        assert set(exe.stats["sparse"]) == {"fc1", "fc2"}
        assert exe.stats["cpu_kernels"].get(GPU_KERNEL) == 2
        h = np.maximum(np_dense_layer(q.fc1, x.numpy()), 0)  # fc2's input: unsigned activations
        np.testing.assert_array_equal(exe(x), np_dense_layer(q.fc2, h))


def test_pruned_model_cuda_source_has_the_sparse_kernel(pruned):
    q, g = pruned
    exe = rmsmp.compile(q, (torch.randn(2, 64, generator=g),), target=CUDA)
    assert set(exe.stats["sparse"]) == {"fc1", "fc2"} and exe.stats["cpu_kernels"].get(GPU_KERNEL) == 2
    src = exe.executable.mod.imports[0].imports[0].inspect_source()
    kernels = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', src)
    assert {k for k in kernels if k.startswith("rmsmp_dense_bsr_")} == {"rmsmp_dense_bsr_fc1_kernel",
                                                                       "rmsmp_dense_bsr_fc2_kernel"}, kernels
    assert "__shared__" not in src.split("rmsmp_dense_bsr_fc1_kernel(")[-1].split('extern "C"')[0]
