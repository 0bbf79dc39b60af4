"""GPU schedules (OpenCL for Mali/Adreno, CUDA) for the RMSMP row-group dense and conv2d ops.

Both rules give every thread one output element, accumulated in a register, and stage the
weights (and for dense the activations) through work-group local memory one reduction chunk
at a time, fetched cooperatively by all threads of the work-group:

* dense ``[M, K] x [N, K]``: a work-group is a ``TM x TN`` tile of outputs; ``x[tile, k-chunk]``
  and ``w[tile, k-chunk]`` go through local memory, copied 4 bytes per load (2 for packed
  weights) when K is a multiple of 4;
* conv2d NCHW: a work-group is ``TF`` output channels x ``TX`` pixels of one output row; the
  ``TF x CK x kh x kw`` weight chunk goes through local memory, the zero padding is inlined as
  a select.

SP2 rows keep their shift-add product (``relay_passes.ops.sp2_product``): straight-line
integer code, no branch on the weight. Work-group sizes and local memory are sized from the
target's ``max_num_threads`` / ``max_shared_memory_per_block`` (Mali: 256 threads, 16 KiB)
and checked by :func:`check_launch_limits` after scheduling.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import tvm
from tvm import s_tir, tirx
from tvm.target import Target

from .gpu_sparse import GPUSparseDense
from .registry import INT8_DOT_KEY, OpScheduleRule, register_target
from relay_passes import contract

__all__ = ["GPURowGroupDense", "GPURowGroupConv2d", "schedule_dense", "schedule_conv2d", "check_launch_limits", "LaunchLimitError"]


def _register_dot4(name: str, extern: str) -> str:
    """A tensor intrinsic: four int8 x int8 products summed into an int32 by ``extern(a, b, c)``
    (``c`` plus the dot product of two ``char4``)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1, align=4, scope="shared")
        B = T.match_buffer(b, (4,), "int8", offset_factor=1, align=4, scope="shared")
        C = T.match_buffer(c, (1,), "int32", offset_factor=1, align=4, scope="local")
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for i in range(4):
                with T.sblock("update"):
                    vi = T.axis.remap("R", [i])
                    C[0] = C[0] + T.Cast("int32", A[vi]) * T.Cast("int32", B[vi])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1, align=4, scope="shared")
        B = T.match_buffer(b, (4,), "int8", offset_factor=1, align=4, scope="shared")
        C = T.match_buffer(c, (1,), "int32", offset_factor=1, align=4, scope="local")
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] = T.call_pure_extern("int32", extern, A.vload([0], "int8x4"), B.vload([0], "int8x4"), C[0])

    TensorIntrin.register(name, desc, impl, override=True)
    return name


#: The OpenCL C helper the fixed-row kernels of an ``int8_dot`` target call for four int8
#: products. It is defined by :data:`OPENCL_DOT_PRELUDE`, which picks the device's built-in
#: when the OpenCL compiler reports one (Arm's ``cl_arm_integer_dot_product_accumulate_int8``:
#: Mali G76 and later; Khronos ``cl_khr_integer_dot_product``) and plain multiply-adds
#: otherwise, so a build for the wrong device still runs, exactly.
OPENCL_DOT = "rmsmp_dot_acc"
OPENCL_DOT_PRELUDE = """#ifndef RMSMP_DOT_ACC
#define RMSMP_DOT_ACC
#if defined(cl_arm_integer_dot_product_accumulate_int8)
#pragma OPENCL EXTENSION cl_arm_integer_dot_product_accumulate_int8 : enable
inline int rmsmp_dot_acc(char4 a, char4 b, int c) { return arm_dot_acc(a, b, c); }
#elif defined(__opencl_c_integer_dot_product_input_4x8bit)
inline int rmsmp_dot_acc(char4 a, char4 b, int c) { return dot_acc_sat(a, b, c); }
#else
inline int rmsmp_dot_acc(char4 a, char4 b, int c) {
  return c + (int)a.x * (int)b.x + (int)a.y * (int)b.y + (int)a.z * (int)b.z + (int)a.w * (int)b.w;
}
#endif
#endif
"""
_DOT_INTRINS: Dict[str, str] = {}


def _opencl_postproc(previous):
    """TVM's OpenCL source hook: the dot-product prelude goes in front of sources that call it."""

    def postproc(code, *args):
        if previous is not None:
            code = previous(code, *args)
        if OPENCL_DOT + "(" in code and OPENCL_DOT_PRELUDE not in code:
            code = OPENCL_DOT_PRELUDE + code
        return code

    return postproc


def _install_opencl_prelude() -> None:
    """Chain onto TVM's ``tvm_callback_opencl_postproc`` (keeping any hook already there);
    done on import, so every OpenCL build in the process, tuning workers included, gets it."""
    previous = tvm.get_global_func("tvm_callback_opencl_postproc", allow_missing=True)
    tvm.register_global_func("tvm_callback_opencl_postproc", _opencl_postproc(previous), override=True)


_install_opencl_prelude()


def _dot4_intrin(sch: s_tir.Schedule, target: Target) -> Optional[str]:
    """The four-product intrinsic for fixed rows with int8 activations and K a multiple of 4:
    ``__dp4a`` on CUDA, :data:`OPENCL_DOT` on OpenCL targets whose keys declare
    :data:`INT8_DOT_KEY`; None elsewhere (and for uint8 activations, which these signed x
    signed built-ins do not take)."""
    kind = target.kind.name
    func = sch.mod["main"]
    if kind not in ("cuda", "opencl") or func.attrs is None or str(func.attrs.get(contract.KIND, "")) != "fixed":
        return None
    if kind == "opencl" and INT8_DOT_KEY not in [str(k) for k in target.keys]:
        return None  # no built-in declared: plain MACs (on PoCL, 2.9x faster than the helper's fallback)
    x, w = func.params[0], func.params[1]
    if not (str(x.dtype) == "int8" and str(w.dtype) == "int8" and int(x.shape[-1]) % 4 == 0):
        return None
    if kind not in _DOT_INTRINS:
        _DOT_INTRINS[kind] = _register_dot4(f"rmsmp_dot4_{kind}", "__dp4a" if kind == "cuda" else OPENCL_DOT)
    return _DOT_INTRINS[kind]


class LaunchLimitError(ValueError):
    """A kernel's work-group size or local memory exceeds what the target allows."""


def _rmsmp_op(func) -> Optional[str]:
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or contract.OP not in func.attrs:
        return None
    return str(func.attrs[contract.OP])


def _limit(target: Target, key: str, default: int) -> int:
    try:
        return int(target.attrs[key])
    except (KeyError, TypeError):
        return default


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _cooperative_fetch(sch: s_tir.Schedule, block, threads: List[tuple], vector: int = 1):
    """Spread a cache-read block's copy loops over the work-group's threads, ``vector``
    contiguous elements per copy (one ``char4`` / ``uchar2`` load and store in OpenCL C).

    The block was placed with ``preserve_unit_loops``, so its innermost loops are exactly its
    iteration axes whatever the tile sizes: the schedule's trace replays for any sample.
    ``vector`` must divide the innermost axis for every sample (the callers make the
    reduction chunk a multiple of it).
    """
    n_axes = len(sch.get(block).iter_vars)
    loops = sch.get_loops(block)[-n_axes:]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    parts = sch.split(fused, [None] + [factor for _, factor in threads] + ([vector] if vector > 1 else []))
    for (tag, _), loop in zip(threads, parts[1:]):
        sch.bind(loop, tag)
    if vector > 1:
        sch.vectorize(parts[-1])


def _divisor(n: int, cap: int) -> int:
    """Largest tile size <= cap that divides n.

    Tiles that divide the extent need no bounds guards. Besides sparing divergent branches,
    this matters on PoCL 3.1: kernels with a partial tile (a guarded tail around the
    accumulation, with barriers in the reduction loop) left some outputs unwritten there,
    while the very same kernels were exact on an NVIDIA H200 (CUDA).
    """
    return max(d for d in range(1, max(1, cap) + 1) if n % d == 0)


def _tile(sch: s_tir.Schedule, loop, cap: int, tunable: bool):
    """Split ``loop`` into whole tiles of at most ``cap`` (sampled when tuning).

    Returns ``(outer, inner, inner_factor)``; the factor is an int, or the sampled variable
    when tuning, so later steps that depend on it replay with every sample."""
    extent = sch.get(loop).extent
    if tunable:
        factors = sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max(1, cap))
    elif not isinstance(extent, tirx.IntImm):
        factors = [None, 1]  # a symbolic batch (dynamic_batch): tiles of one row, whole for any batch
    else:
        factors = [None, _divisor(int(extent), cap)]
    outer, inner = sch.split(loop, factors)
    return outer, inner, factors[1]


def schedule_dense(sch: s_tir.Schedule, target: Target, tunable: bool = False) -> None:
    """Row-group dense on a GPU: ``TM x TN`` output tiles per work-group, k-chunks in local memory."""
    max_threads = _limit(target, "max_num_threads", 256)
    acc, out = sch.get_sblock(contract.ACC_BLOCK), sch.get_sblock(contract.OUT_BLOCK)
    m, n, *reduction = sch.get_loops(acc)
    k = sch.fuse(*reduction) if len(reduction) > 1 else reduction[0]  # packed rows: (byte, nibble)
    dot4 = _dot4_intrin(sch, target)
    packed = len(reduction) > 1
    # K a multiple of 4 (a static fact, so every tuning sample takes the same path): the
    # reduction chunk is a multiple of 4, and tiles are copied to local memory 4 activations
    # (2 packed weight bytes) per load
    quad = _extent(sch, k) % 4 == 0  # always so where dot4 applies
    k4 = None
    if quad:
        k, k4 = sch.split(k, [None, 4])
    tm_cap = 4 if isinstance(sch.get(m).extent, tirx.IntImm) else 1  # symbolic rows: one per work-group row
    tn_cap = max(1, min(64, max_threads // tm_cap))
    bm, tmi, tm = _tile(sch, m, tm_cap, tunable)
    bn, tni, tn = _tile(sch, n, tn_cap, tunable)
    ko, ki, _ = _tile(sch, k, 4 if quad else 16, tunable)
    sch.reorder(bm, bn, tmi, tni, ko, ki, *([k4] if quad else []))
    sch.bind(sch.fuse(bm, bn), "blockIdx.x")
    sch.bind(tmi, "threadIdx.y")
    sch.bind(tni, "threadIdx.x")
    for index in (0, 1):  # x tile and w tile through local memory
        cached = sch.cache_read(acc, index, "shared")
        sch.compute_at(cached, ko, preserve_unit_loops=True)
        vector = (2 if packed and index == 1 else 4) if quad else 1
        _cooperative_fetch(sch, cached, [("threadIdx.y", tm), ("threadIdx.x", tn)], vector)
    sch.reverse_compute_at(out, tni)
    sch.set_scope(acc, 0, "local")
    sch.decompose_reduction(acc, ko)
    if dot4:
        sch.tensorize(sch.get_loops(acc)[-1], dot4)
    elif quad:
        sch.unroll(sch.get_loops(acc)[-1])


def schedule_conv2d(sch: s_tir.Schedule, target: Target, tunable: bool = False) -> None:
    """Row-group conv2d (NCHW) on a GPU: ``TF`` channels x ``TX`` pixels per work-group."""
    max_threads = _limit(target, "max_num_threads", 256)
    acc, out = sch.get_sblock(contract.ACC_BLOCK), sch.get_sblock(contract.OUT_BLOCK)
    try:
        sch.compute_inline(sch.get_sblock("pad"))
    except Exception:  # noqa: BLE001  (no "pad" block: the quantizer padded already)
        pass
    n, f, y, x, rc, ry, rx = sch.get_loops(acc)
    tx_cap = 32
    tf_cap = max(1, min(8, max_threads // tx_cap))
    if not tunable:
        tf_cap = max(1, min(8, max_threads // _divisor(_extent(sch, x), tx_cap)))
    fo, fi, tf = _tile(sch, f, tf_cap, tunable)
    xo, xi, tx = _tile(sch, x, tx_cap, tunable)
    rco, rci, _ = _tile(sch, rc, 8, tunable)
    sch.reorder(n, fo, y, xo, fi, xi, rco, rci, ry, rx)
    sch.bind(sch.fuse(n, fo, y, xo), "blockIdx.x")
    sch.bind(fi, "threadIdx.y")
    sch.bind(xi, "threadIdx.x")
    w_index = [i for i, r in enumerate(sch.get(acc).reads) if r.source.name == "w"][0]
    cached = sch.cache_read(acc, w_index, "shared")
    sch.compute_at(cached, rco, preserve_unit_loops=True)
    _cooperative_fetch(sch, cached, [("threadIdx.y", tf), ("threadIdx.x", tx)])
    sch.reverse_compute_at(out, xi)
    sch.set_scope(acc, 0, "local")
    sch.decompose_reduction(acc, rco)


_GPU_KINDS = ("opencl", "cuda", "vulkan", "metal", "rocm")
#: Row-group dense on a GPU: output tiles per work-group, k-chunks through local memory.
GPURowGroupDense = OpScheduleRule("dense", schedule_dense, kinds=_GPU_KINDS)
#: Row-group conv2d (NCHW) on a GPU: channels x pixels per work-group, weights through local memory.
GPURowGroupConv2d = OpScheduleRule("conv2d", schedule_conv2d, kinds=_GPU_KINDS)


def _walk(node, visit):
    visit(node)
    for attr in ("seq", "body", "then_case", "else_case", "block"):
        child = getattr(node, attr, None)
        if child is None:
            continue
        if isinstance(child, (list, tuple)) or type(child).__name__ == "Array":
            for c in child:
                _walk(c, visit)
        else:
            _walk(child, visit)


def launch_resources(func: tirx.PrimFunc) -> Dict[str, int]:
    """Threads per work-group and local-memory bytes a scheduled PrimFunc asks for."""
    threads: Dict[str, int] = {}
    shared = 0

    def visit(node):
        nonlocal shared
        if isinstance(node, tirx.For) and node.thread_binding is not None:
            tag = str(node.thread_binding.thread_tag)
            if tag.startswith("threadIdx"):
                threads[tag] = max(threads.get(tag, 1), int(node.extent))
        for buf in getattr(node, "alloc_buffers", []) or []:
            if str(buf.scope()) in ("shared", "shared.dyn"):
                size = 1
                for d in buf.shape:
                    size *= int(d)
                shared += size * tvm.DataType(buf.dtype).bits // 8

    _walk(func.body, visit)
    total = 1
    for v in threads.values():
        total *= v
    return {"threads": total, "local_bytes": shared}


_COMPACT = tvm.transform.Sequential(
    [
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
    ]
)


def check_launch_limits(mod: tvm.IRModule, target: Target) -> None:
    """Raise :class:`LaunchLimitError` naming the kernel if it exceeds the target's limits.

    Local memory is counted after buffer compaction, i.e. the tile each work-group really holds.
    """
    max_threads = _limit(target, "max_num_threads", 256)
    max_shared = _limit(target, "max_shared_memory_per_block", 16384)
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or _rmsmp_op(func) is None:
            continue
        compacted = _COMPACT(tvm.IRModule({"main": func}))["main"]
        res = launch_resources(compacted)
        if res["threads"] > max_threads:
            raise LaunchLimitError(
                f"kernel {gv.name_hint}: work-group of {res['threads']} threads exceeds the target's "
                f"max_num_threads={max_threads}"
            )
        if res["local_bytes"] > max_shared:
            raise LaunchLimitError(
                f"kernel {gv.name_hint}: {res['local_bytes']} bytes of local memory exceed the target's "
                f"max_shared_memory_per_block={max_shared}"
            )


_RULES = [GPURowGroupDense, GPURowGroupConv2d, GPUSparseDense]
_SPACES = {"dense": schedule_dense, "conv2d": schedule_conv2d}
register_target("opencl", _RULES, verify=check_launch_limits, spaces=_SPACES)
register_target("cuda", _RULES, verify=check_launch_limits, spaces=_SPACES)
