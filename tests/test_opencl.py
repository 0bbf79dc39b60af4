"""Mobile-GPU (OpenCL) target: kernels and whole models run for real on PoCL, integer-exact."""

import re

import numpy as np
import pytest
import torch
import tvm

import schedules
import tvm_rmsmp as rmsmp
from conftest import needs_opencl, np_conv_acc, np_dense_acc, np_epilogue, stable_seed
from relay_passes.rewrite_row_groups import group_weight, packed_weight, row_group_func
from schedules.gpu import LaunchLimitError, check_launch_limits
from tvm_rmsmp.quant.schemes import get_scheme

MALI = {"kind": "opencl", "device": "mali", "host": {"kind": "llvm"}}


needs_pocl = needs_opencl()  # the skip message says why there is no OpenCL device


def test_opencl_status_says_why_there_is_no_device(monkeypatch):
    """The OpenCL tests' skip reason is the actual failure, not a generic guess."""
    import conftest
    from tvm_rmsmp.runtime import opencl

    def no_platform():
        raise opencl.OpenCLUnavailable("no OpenCL platform: clGetPlatformIDs failed")

    def broken():
        raise RuntimeError("context creation failed")

    monkeypatch.setattr(opencl, "opencl_context", no_platform)
    assert conftest.opencl_status.__wrapped__() == (False, "no OpenCL platform: clGetPlatformIDs failed")
    monkeypatch.setattr(opencl, "opencl_context", broken)
    usable, why = conftest.opencl_status.__wrapped__()
    assert not usable and why.endswith("RuntimeError: context creation failed")


def _scheduled(op, scheme, xs, act, ws, conv=None, target=MALI, packed=False):
    target = rmsmp.resolve_target(target)
    f = row_group_func(op, "t", scheme, xs, act, ws, conv, packed=packed)
    return schedules.apply_rules(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target)["main"], target


def _run_kernel(func, target, arrays, out_shape, prepare=None):
    """Build ``func`` for ``target`` and run it on PoCL; ``prepare(kernel)`` may swap its program."""
    import pyopencl as cl

    from tvm_rmsmp.runtime.opencl import OpenCLPrimFunc, opencl_context

    ctx, queue, _ = opencl_context()
    kernel = OpenCLPrimFunc(func, target)
    if prepare is not None:
        prepare(kernel)
    mf = cl.mem_flags
    bufs = [cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(a)) for a in arrays]
    out = np.zeros(out_shape, np.float32)
    out_buf = cl.Buffer(ctx, mf.READ_WRITE, out.nbytes)
    kernel.enqueue(queue, bufs + [out_buf])
    cl.enqueue_copy(queue, out, out_buf)
    queue.finish()
    return out, kernel


CONV = {"strides": [1, 1], "padding": [0, 0], "dilation": [1, 1]}
CASES = [
    ("dense", (1, 96), (64, 96), None),
    ("dense", (5, 40), (20, 40), None),
    ("dense", (4, 24), (6, 24), None),
    ("dense", (16, 200), (13, 200), None),
    ("conv2d", (1, 6, 9, 9), (10, 6, 3, 3), CONV),
    ("conv2d", (2, 16, 18, 18), (12, 16, 3, 3), CONV),
    ("conv2d", (1, 8, 15, 15), (7, 8, 3, 3), {"strides": [2, 2], "padding": [0, 0], "dilation": [1, 1]}),
    ("conv2d", (1, 3, 40, 40), (5, 3, 1, 1), CONV),
]


@needs_pocl
@pytest.mark.parametrize("op,xs,ws,conv", CASES)
@pytest.mark.parametrize(
    "scheme,packed", [("sp2_4", False), ("sp2_4", True), ("fixed_4", False), ("fixed_4", True), ("fixed_8", False)]
)
@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_every_kernel_variant_is_integer_exact_on_pocl(op, xs, ws, conv, scheme, act, packed):
    rng = np.random.default_rng(stable_seed(op, xs, ws, scheme, act))
    lo, hi = (0, 255) if act == "uint8" else (-127, 127)
    x = rng.integers(lo, hi + 1, xs).astype(act)
    w = rng.choice(get_scheme(scheme).levels, ws).astype(np.int8)
    func, target = _scheduled(op, scheme, xs, act, ws, conv, packed=packed)
    acc = np_dense_acc(x, w) if op == "dense" else np_conv_acc(x, w, conv["strides"], (0, 0), (1, 1))
    bias = rng.integers(-5000, 5000, ws[0]).astype(np.int32)
    scale = rng.uniform(0.01, 2, ws[0]).astype(np.float32)
    stored = packed_weight(w, scheme) if packed else group_weight(w, scheme)
    out, kernel = _run_kernel(func, target, [x, stored, bias, scale], acc.shape)
    axis = acc.ndim - 1 if op == "dense" else 1
    np.testing.assert_array_equal(out, np_epilogue(acc, bias.astype(np.int64), scale, axis))
    for launch in kernel.launches:
        assert int(np.prod(launch.block)) <= 256  # Mali's work-group limit


@needs_pocl
@pytest.mark.parametrize("op,xs,ws,conv", [CASES[1], CASES[5]])
def test_sp2_kernel_source_is_branch_free_shift_add(op, xs, ws, conv):
    from tvm_rmsmp.runtime.opencl import OpenCLPrimFunc

    func, target = _scheduled(op, "sp2_4", xs, "uint8", ws, conv)
    src = OpenCLPrimFunc(func, target).source  # built by PoCL too
    body = src[src.index("{"):]
    assert "__local" in body, "weights go through work-group local memory"
    # The compute loop (after the last barrier: local tiles ready) has no branch at all: whole
    # tiles need no guards and the SP2 decode is masks and shifts. Only the cooperative copy
    # into local memory may have a tail guard.
    compute = body[body.rindex("barrier(CLK_LOCAL_MEM_FENCE);"):]
    assert "if (" not in compute and "?" not in compute
    # the accumulation: shifts, masks, xor, adds; every '*' is index arithmetic (times a constant)
    update = [line for line in compute.splitlines() if "acc_local_ptr[0] =" in line and "acc_local_ptr[0] +" in line]
    assert update
    for line in update:
        assert "<<" in line and ">>" in line
        assert all(operand.isdigit() for operand in re.findall(r"\* (\S)", line)), line


def test_kernels_over_the_device_limits_are_rejected_at_build_time():
    func, target = _scheduled("dense", "fixed_8", (1, 64), "int8", (64, 64))
    tiny = rmsmp.resolve_target({"kind": "opencl", "device": "mali", "max_num_threads": 16, "host": {"kind": "llvm"}})
    with pytest.raises(LaunchLimitError, match="kernel main: work-group of 64 threads exceeds the target's max_num_threads=16"):
        check_launch_limits(tvm.IRModule({"main": func}), tiny)
    small_mem = rmsmp.resolve_target(
        {"kind": "opencl", "device": "mali", "max_shared_memory_per_block": 64, "host": {"kind": "llvm"}}
    )
    with pytest.raises(LaunchLimitError, match="local memory exceed the target's max_shared_memory_per_block=64"):
        check_launch_limits(tvm.IRModule({"main": func}), small_mem)


@needs_pocl
def test_whole_model_on_pocl_equals_cpu_build_and_torch(small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    mali = rmsmp.compile(q, (x,), target="mali")
    cpu = rmsmp.compile(q, (x,), target="llvm")
    ref = q(x).detach().numpy()
    np.testing.assert_array_equal(mali(x), ref)
    np.testing.assert_array_equal(mali(x), cpu(x))
    assert mali.benchmark(x, repeat=2) > 0
    with pytest.raises(ValueError, match="compiled for \\[4, 1, 16, 16\\]"):
        mali(torch.randn(1, 1, 16, 16))


@needs_pocl
def test_adreno_target_and_dense_model():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), [torch.randn(8, 48)])
    x = torch.randn(3, 48)
    exe = rmsmp.compile(q, (x,), target="adreno")
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


def test_cuda_target_compiles_here():
    """CUDA source builds without a GPU; the same kernels ran integer-exact on an H200
    (scripts/gpu_kernel_check.py)."""
    func, target = _scheduled("conv2d", "sp2_4", (1, 8, 10, 10), "uint8", (8, 8, 3, 3), CONV,
                              target={"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}})
    exe = tvm.compile(tvm.IRModule({"main": func}), target=target)
    src = exe.mod.imports[0].inspect_source()
    assert "__shared__" in src and "<<" in src


@needs_pocl
@pytest.mark.slow
def test_tune_for_mali_measures_on_pocl_and_compiles_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 8 * 8, 32)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio={"sp2_4": 0.5, "fixed_8": 0.5}), [torch.randn(2, 3, 8, 8)])
    x = torch.randn(2, 3, 8, 8)
    report = rmsmp.tune(q, (x,), "mali", str(tmp_path), trials=16, trials_per_iter=8, progress=False)
    assert report.trials == 16
    assert any(v for v in report.tasks.values())
    exe = rmsmp.compile(q, (x,), target="mali", tuning=str(tmp_path))
    assert exe.stats["tuned"] >= 1
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
    with pytest.raises(ValueError, match="was tuned for"):
        rmsmp.compile(q, (x,), target="llvm", tuning=str(tmp_path))


def test_cuda_fixed_rows_with_int8_activations_use_dp4a():
    """Four int8 products per instruction; ran integer-exact on an H200 (bench/results/gpu_kernel_check_h200.log)."""
    cuda = {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}
    for act, expect in (("int8", True), ("uint8", False)):
        func, target = _scheduled("dense", "fixed_8", (5, 64), act, (24, 64), target=cuda)
        src = tvm.compile(tvm.IRModule({"main": func}), target=target).mod.imports[0].inspect_source()
        kernel = src.split('extern "C" __global__')[-1]
        assert ("__dp4a(" in kernel) is expect
    func, target = _scheduled("dense", "sp2_4", (5, 64), "int8", (24, 64), target=cuda)
    src = tvm.compile(tvm.IRModule({"main": func}), target=target).mod.imports[0].inspect_source()
    assert "__dp4a(" not in src.split('extern "C" __global__')[-1]  # SP2 rows stay shift-add


def _dot_source(func, target):
    return tvm.compile(tvm.IRModule({"main": func}), target=target).mod.imports[0].inspect_source()


def test_opencl_fixed_rows_with_int8_activations_use_the_dot_product_helper():
    """On a target declaring an int8 dot product ("mali-dot"): four int8 products per call of
    rmsmp_dot_acc, whose prelude picks arm_dot_acc (Mali G76+), the Khronos dot_acc_sat, or
    plain multiply-adds where the device compiles the kernel. Plain "mali": plain MACs."""
    from schedules.gpu import OPENCL_DOT_PRELUDE

    func, target = _scheduled("dense", "fixed_8", (5, 64), "int8", (24, 64), target="mali-dot")
    src = _dot_source(func, target)
    assert "rmsmp_dot_acc(" in src.split("#endif\n#endif")[-1] and src.count(OPENCL_DOT_PRELUDE) == 1
    assert "arm_dot_acc(a, b, c)" in src and "dot_acc_sat(a, b, c)" in src
    for scheme, act, tgt in (("fixed_8", "uint8", "mali-dot"), ("sp2_4", "int8", "mali-dot"), ("fixed_8", "int8", "mali")):
        func, target = _scheduled("dense", scheme, (5, 64), act, (24, 64), target=tgt)
        assert "rmsmp_dot_acc" not in _dot_source(func, target)


@needs_pocl
@pytest.mark.parametrize("builtin", ["plain", "arm", "khr"])
def test_dot_product_kernel_is_integer_exact_on_pocl_with_each_prelude_branch(builtin):
    """PoCL has neither extension: the plain branch runs as built; the Arm and Khronos
    branches run with the extension's macro defined and the built-in emulated in OpenCL C
    (its documented semantics), so every branch compiles and gives the numpy result."""
    import pyopencl as cl

    from tvm_rmsmp.runtime.opencl import opencl_context

    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (5, 64)).astype(np.int8)
    w_int = rng.integers(-127, 128, (24, 64)).astype(np.int8)
    bias = rng.integers(-1000, 1000, 24).astype(np.int32)
    scale = rng.uniform(0.5, 2, 24).astype(np.float32)
    func, target = _scheduled("dense", "fixed_8", (5, 64), "int8", (24, 64), target="mali-dot")

    def with_builtin(kernel):
        assert "rmsmp_dot_acc(" in kernel.source
        if builtin == "plain":
            return
        name, macro = {"arm": ("arm_dot_acc", "cl_arm_integer_dot_product_accumulate_int8"),
                       "khr": ("dot_acc_sat", "__opencl_c_integer_dot_product_input_4x8bit")}[builtin]
        # Clang's OpenCL headers declare the built-in (overloadable), so the definition must be too
        emulated = (f"__attribute__((overloadable)) int {name}(char4 a, char4 b, int c) "
                    "{ return c + a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }\n")
        kernel.program = cl.Program(opencl_context()[0], emulated + kernel.source).build(options=["-D", macro])

    out, _ = _run_kernel(func, target, [x, w_int, bias, scale], (5, 24), prepare=with_builtin)
    np.testing.assert_array_equal(out, np_epilogue(np_dense_acc(x, w_int), bias.astype(np.int64), scale, 1))


@needs_pocl
def test_transformer_style_model_on_mali_dot_equals_torch():
    """Signed activations between dense layers: the fixed rows go through rmsmp_dot_acc."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio={"sp2_4": 0.5, "fixed_8": 0.5}), [torch.randn(8, 64) for _ in range(2)])
    x = torch.randn(4, 64)
    exe = rmsmp.compile(q, (x,), target="mali-dot")
    assert any("rmsmp_dot_acc(" in f.source for f in exe.graph.funcs.values())
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
