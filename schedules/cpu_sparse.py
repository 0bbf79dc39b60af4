"""CPU kernels of the block-sparse dense op (``contract.DENSE_BSR``, made by
``relay_passes.SparsifyRowGroups``): they loop over the kept blocks only.

* :func:`portable_bsr_kernel` (any LLVM target): tasks over block rows in parallel; per block
  row, up to four activation rows pass over its kept blocks together, a block's ``br`` rows
  vectorized (LLVM's own vectorizer), its ``bc`` columns unrolled.
* :func:`avx2_bsr_kernel` (AVX2, blocks of 4n rows x 4 columns): ``vpmaddwd`` of the levels and
  the activations, both as int16.
* :func:`vnni_bsr_kernel` (AVX-512 VNNI, blocks of 8 or 16 rows x 4 columns): a block is one
  ``vpdpbusd`` (ymm for 8 rows, zmm for 16): its ``br x 4`` int8 levels as they are stored (row
  ``r``'s four levels in lane ``r``: the byte MAC's own layout) times the four activations of
  its block column broadcast to every lane. ``vpdpbusd`` multiplies unsigned by signed bytes:
  signed activations are staged once per call as ``x + 128`` (``x ^ 0x80``) and ``128 * wsum``
  (each row's sum of levels, a constant of the op) comes off the sum. Four accumulators per
  activation row at batch 1 (two at two rows; one from four rows on) take the kept blocks in
  turn, so consecutive MACs do not wait for each other (``vpdpbusd`` has a latency of several
  cycles), the last ``cnt % 4`` blocks into the first.

All are exact: int32 sums of integer products, then the row-group epilogue
``float32(acc + bias) * scale`` (one multiply).
"""


from typing import Optional

import tvm
from tvm import s_tir
from tvm.script import tirx as T

from relay_passes import contract

from .registry import OpScheduleRule, target_cores
from .x86_tuning_table import x86_isa

__all__ = ["portable_bsr_kernel", "portable_bsr4_kernel", "avx2_bsr_kernel", "vnni_bsr_kernel", "bsr_kernel", "SparseDense", "TASKS_PER_CORE"]

#: Parallel tasks per core (block rows are split into this many chunks per core).
TASKS_PER_CORE = 4


def _tasks(nrb: int, cores: int):
    tasks = max(1, min(nrb, cores * TASKS_PER_CORE))
    return tasks, -(-nrb // tasks)


def portable_bsr_kernel(m: int, k: int, n: int, br: int, bc: int, nnzb: int, x_dtype: str,
                        cores: int = 1) -> tvm.tirx.PrimFunc:
    """The block-sparse op for any LLVM CPU (module docstring); parameters as the op's."""
    nrb = n // br
    mt = min(m, 4)
    m_tiles = -(-m // mt)
    tasks, per_task = _tasks(nrb, cores)
    nb = max(nnzb, 1)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), x_dtype), w: T.Buffer((nb, br, bc), "int8"), col: T.Buffer((nb,), "int32"),
               ptr: T.Buffer((nrb + 1,), "int32"), wsum: T.Buffer((n,), "int32"), bias: T.Buffer((n,), "int32"),
               scale: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((mt * br,), "int32", scope="local")
            for t in T.serial(per_task):
                if task * per_task + t < nrb:
                    for mo in T.serial(m_tiles):
                        for a in T.serial(mt * br):
                            acc[a] = 0
                        for j in T.serial(ptr[task * per_task + t], ptr[task * per_task + t + 1]):
                            for c in T.unroll(bc):
                                for i in T.unroll(mt):
                                    for r in T.vectorized(br):
                                        acc[i * br + r] = acc[i * br + r] + T.Cast(
                                            "int32", x[T.min(mo * mt + i, m - 1), col[j] * bc + c]) * T.Cast(
                                            "int32", w[j, r, c])
                        for i in T.unroll(mt):
                            for r in T.vectorized(br):
                                out[T.min(mo * mt + i, m - 1), (task * per_task + t) * br + r] = T.Cast(
                                    "float32", acc[i * br + r] + bias[(task * per_task + t) * br + r]) * scale[
                                    (task * per_task + t) * br + r]

    return kernel


def portable_bsr4_kernel(m: int, k: int, n: int, br: int, nnzb: int, x_dtype: str, cores: int = 1) -> tvm.tirx.PrimFunc:
    """The block-sparse op for blocks of ``br`` rows x 4 columns on any LLVM CPU: a block's
    ``4 br`` levels (contiguous) times its four activations repeated ``br`` times (one int32
    word broadcast and read as bytes), summed per lane into ``4 br`` int32 sums; after the block
    row each row's four lanes are added. Plain vector code (LLVM turns the widening multiplies
    of small integers into ``vpmaddwd``-style instructions where the CPU has them)."""
    nrb, lanes = n // br, 4 * br
    mt = min(m, 4)
    m_tiles = -(-m // mt)
    tasks, per_task = _tasks(nrb, cores)
    nb = max(nnzb, 1)
    xbytes = "uint8" if x_dtype == "uint8" else "int8"

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), x_dtype), w: T.Buffer((nb, br, 4), "int8"), col: T.Buffer((nb,), "int32"),
               ptr: T.Buffer((nrb + 1,), "int32"), wsum: T.Buffer((n,), "int32"), bias: T.Buffer((n,), "int32"),
               scale: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        x32 = T.decl_buffer((m * k // 4,), "int32", data=x.data)
        wf = T.decl_buffer((nb * lanes,), "int8", data=w.data)
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((mt * lanes,), "int32", scope="local")
            for t in T.serial(per_task):
                if task * per_task + t < nrb:
                    for mo in T.serial(m_tiles):
                        for i in T.unroll(mt):
                            acc[T.ramp(i * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                        for j in T.serial(ptr[task * per_task + t], ptr[task * per_task + t + 1]):
                            for i in T.unroll(mt):
                                acc[T.ramp(i * lanes, 1, lanes)] = acc[T.ramp(i * lanes, 1, lanes)] + T.Cast(
                                    f"int32x{lanes}", T.reinterpret(
                                        T.broadcast(x32[T.min(mo * mt + i, m - 1) * (k // 4) + col[j]], br),
                                        dtype=f"{xbytes}x{lanes}")) * T.Cast(
                                    f"int32x{lanes}", wf[T.ramp(j * lanes, 1, lanes)])
                        for i in T.unroll(mt):
                            for r in T.serial(br):
                                out[T.min(mo * mt + i, m - 1), (task * per_task + t) * br + r] = T.Cast(
                                    "float32", acc[i * lanes + 4 * r] + acc[i * lanes + 4 * r + 1]
                                    + acc[i * lanes + 4 * r + 2] + acc[i * lanes + 4 * r + 3]
                                    + bias[(task * per_task + t) * br + r]) * scale[(task * per_task + t) * br + r]

    return kernel


def avx2_bsr_kernel(m: int, k: int, n: int, br: int, nnzb: int, x_dtype: str, cores: int = 1) -> tvm.tirx.PrimFunc:
    """The block-sparse op on AVX2 for blocks of ``br`` (a multiple of 4) rows x 4 columns: each
    4 rows' 16 levels sign-extended to int16 (``vpmovsxbw``) against the block's four activations
    as int16, repeated (one 64-bit word broadcast), by ``vpmaddwd`` (pairs summed in int32:
    exact, ``2 * 255 * 127`` fits); lane ``2 r + h`` holds row ``r``'s columns ``2h, 2h + 1``."""
    if br % 4 or k % 4:
        raise ValueError(f"avx2_bsr_kernel: blocks of 4n rows x 4 columns and K % 4 == 0, got {br} rows, K {k}")
    nrb, chunks, lanes = n // br, br // 4, 2 * br
    mt = min(m, 4)
    m_tiles = -(-m // mt)
    tasks, per_task = _tasks(nrb, cores)
    nb = max(nnzb, 1)
    pmaddwd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), x_dtype), w: T.Buffer((nb, br, 4), "int8"), col: T.Buffer((nb,), "int32"),
               ptr: T.Buffer((nrb + 1,), "int32"), wsum: T.Buffer((n,), "int32"), bias: T.Buffer((n,), "int32"),
               scale: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        xs = T.alloc_buffer((m * k,), "int16")
        xs64 = T.decl_buffer((m * k // 4,), "int64", data=xs.data)
        wf = T.decl_buffer((nb * br * 4,), "int8", data=w.data)
        for i in T.serial(m):
            for kk in T.vectorized(k):
                xs[i * k + kk] = T.Cast("int16", x[i, kk])
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((mt * lanes,), "int32", scope="local")
            for t in T.serial(per_task):
                if task * per_task + t < nrb:
                    for mo in T.serial(m_tiles):
                        for a in T.unroll(mt * chunks):
                            acc[T.ramp(a * 8, 1, 8)] = T.broadcast(T.int32(0), 8)
                        for j in T.serial(ptr[task * per_task + t], ptr[task * per_task + t + 1]):
                            for h in T.unroll(chunks):
                                for i in T.unroll(mt):
                                    acc[T.ramp((i * chunks + h) * 8, 1, 8)] = acc[T.ramp((i * chunks + h) * 8, 1, 8)] + \
                                        T.call_llvm_pure_intrin(
                                            pmaddwd, T.Cast("int16x16", wf[T.ramp(j * br * 4 + h * 16, 1, 16)]),
                                            T.reinterpret(T.broadcast(xs64[T.min(mo * mt + i, m - 1) * (k // 4) + col[j]], 4),
                                                          dtype="int16x16"), dtype="int32x8")
                        for i in T.unroll(mt):
                            for r in T.serial(br):
                                out[T.min(mo * mt + i, m - 1), (task * per_task + t) * br + r] = T.Cast(
                                    "float32", acc[i * lanes + 2 * r] + acc[i * lanes + 2 * r + 1]
                                    + bias[(task * per_task + t) * br + r]) * scale[(task * per_task + t) * br + r]

    return kernel


def vnni_bsr_kernel(m: int, k: int, n: int, br: int, nnzb: int, x_dtype: str, cores: int = 1) -> tvm.tirx.PrimFunc:
    """The block-sparse op on AVX-512 VNNI for blocks of ``br`` (8 or 16) rows x 4 columns."""
    if br not in (8, 16) or k % 4:
        raise ValueError(f"vnni_bsr_kernel: blocks of 8 or 16 rows x 4 columns and K % 4 == 0, got {br} rows, K {k}")
    nrb, lanes, vbytes = n // br, br, 4 * br
    mt = min(m, 4)
    unroll = max(1, 4 // mt)
    m_tiles = -(-m // mt)
    tasks, per_task = _tasks(nrb, cores)
    nb = max(nnzb, 1)
    signed = x_dtype == "int8"
    flip = 128 if signed else 0
    mac = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512" if br == 16 else "llvm.x86.avx512.vpdpbusd.256")

    def acc_at(i, u):
        return T.ramp((i * unroll + u) * lanes, 1, lanes)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), x_dtype), w: T.Buffer((nb, br, 4), "int8"), col: T.Buffer((nb,), "int32"),
               ptr: T.Buffer((nrb + 1,), "int32"), wsum: T.Buffer((n,), "int32"), bias: T.Buffer((n,), "int32"),
               scale: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        xs = T.alloc_buffer((m * k,), "uint8")
        xs32 = T.decl_buffer((m * k // 4,), "int32", data=xs.data)
        wf = T.decl_buffer((nb * vbytes,), "int8", data=w.data)
        for i in T.serial(m):
            for kk in T.vectorized(k):
                xs[i * k + kk] = T.bitwise_xor(T.reinterpret(x[i, kk], dtype="uint8"), T.uint8(flip))
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((mt * unroll * lanes,), "int32", scope="local")
            for t in T.serial(per_task):
                if task * per_task + t < nrb:
                    for mo in T.serial(m_tiles):
                        for a in T.unroll(mt * unroll):
                            acc[T.ramp(a * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                        for jq in T.serial((ptr[task * per_task + t + 1] - ptr[task * per_task + t]) // unroll):
                            for u in T.unroll(unroll):
                                for i in T.unroll(mt):
                                    acc[acc_at(i, u)] = T.call_llvm_pure_intrin(
                                        mac, acc[acc_at(i, u)],
                                        T.reinterpret(T.broadcast(xs32[T.min(mo * mt + i, m - 1) * (k // 4) + col[
                                            ptr[task * per_task + t] + jq * unroll + u]], lanes), dtype=f"uint8x{vbytes}"),
                                        wf[T.ramp((ptr[task * per_task + t] + jq * unroll + u) * vbytes, 1, vbytes)],
                                        dtype=f"int32x{lanes}")
                        for jt in T.serial((ptr[task * per_task + t + 1] - ptr[task * per_task + t]) % unroll):
                            for i in T.unroll(mt):
                                acc[acc_at(i, 0)] = T.call_llvm_pure_intrin(
                                    mac, acc[acc_at(i, 0)],
                                    T.reinterpret(T.broadcast(xs32[T.min(mo * mt + i, m - 1) * (k // 4) + col[
                                        ptr[task * per_task + t + 1] - 1 - jt]], lanes), dtype=f"uint8x{vbytes}"),
                                    wf[T.ramp((ptr[task * per_task + t + 1] - 1 - jt) * vbytes, 1, vbytes)],
                                    dtype=f"int32x{lanes}")
                        for i in T.unroll(mt):
                            for u in T.unroll(unroll - 1):
                                acc[acc_at(i, 0)] = acc[acc_at(i, 0)] + acc[acc_at(i, u + 1)]
                            out[T.min(mo * mt + i, m - 1), T.ramp((task * per_task + t) * br, 1, lanes)] = T.Cast(
                                f"float32x{lanes}",
                                acc[acc_at(i, 0)] + bias[T.ramp((task * per_task + t) * br, 1, lanes)]
                                - T.broadcast(T.int32(flip), lanes) * wsum[T.ramp((task * per_task + t) * br, 1, lanes)]
                            ) * scale[T.ramp((task * per_task + t) * br, 1, lanes)]

    return kernel


def bsr_kernel(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> Optional[tvm.tirx.PrimFunc]:
    """The kernel for a block-sparse op on an LLVM ``target`` (None for any other function or target)."""
    if target.kind.name != "llvm" or contract.rmsmp_attr(func, contract.OP) != contract.DENSE_BSR:
        return None
    x, w = func.params[0], func.params[1]
    m, k = (int(d) for d in x.shape)
    n = int(func.params[-1].shape[1])
    br, bc = (int(v) for v in contract.attr(func, contract.SPARSE_BLOCK))
    nnzb = int(w.shape[0])
    cores = target_cores(target)
    if x86_isa(target) == "avx512vnni" and bc == 4 and br in (8, 16):
        kernel, kind = vnni_bsr_kernel(m, k, n, br, nnzb, str(x.dtype), cores), "x86-avx512vnni-bsr"
    elif x86_isa(target) == "avx2" and bc == 4 and br % 4 == 0:
        kernel, kind = avx2_bsr_kernel(m, k, n, br, nnzb, str(x.dtype), cores), "x86-avx2-bsr"
    elif bc == 4 and k % 4 == 0 and br >= 2:  # a vector of at least two words
        kernel, kind = portable_bsr4_kernel(m, k, n, br, nnzb, str(x.dtype), cores), "bsr"
    else:
        kernel, kind = portable_bsr_kernel(m, k, n, br, bc, nnzb, str(x.dtype), cores), "bsr"
    for key in (contract.OP, contract.LAYER, contract.SPARSE_BLOCK, contract.SPARSE_ROW_SCHEMES):
        kernel = kernel.with_attr(key, func.attrs[key])
    return kernel.with_attr(contract.CPU_KERNEL, kind).with_attr("tirx.is_scheduled", True)


class _SparseRule(OpScheduleRule):
    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        kernel = bsr_kernel(func, target) if isinstance(func, tvm.tirx.PrimFunc) else None
        return None if kernel is None else s_tir.Schedule(kernel)


#: The schedule rule of the block-sparse op on LLVM targets (registered with the CPU's rules).
SparseDense = _SparseRule(contract.DENSE_BSR, lambda sch, target: None, kinds=("llvm",))
