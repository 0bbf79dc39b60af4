"""CPU kernels of the kernel-sparse convolution (``contract.CONV_PATTERN``, made by
``relay_passes.SparsifyConvs``): they run the kept quads only (removed kernels cost nothing).

Activations are staged once per call, per image, as ``x ^ 0x80`` for signed activations (``x + 128``:
``vpdpbusd`` multiplies unsigned by signed bytes; ``128 * wsum`` comes off the sums) and split
into the ``s x s`` phases of the stride (space to depth; stride 1: a copy), so that the
activations of tap ``(ky, kx)`` for consecutive output pixels are consecutive bytes. Output
pixels are taken on a grid as wide as a phase row (``Ws`` >= OW: the grid's last columns are
computed and dropped), in tiles of ``R`` grid rows, ``TV`` (a multiple of 16) pixels
(:func:`pixel_tile`).

Per tile (a parallel task) every plane (a channel and 4 taps) is packed once: the 4 taps'
activations of the tile's pixels as one int32 per pixel (tap ``t`` in byte ``t``:
``vpmovzxbd`` + shift + or), ``[planes, TV]`` int32 kept in L2 (:data:`PACK_BYTES`). Then per
output row its ``TV / 16`` accumulators stay in registers while its quads run: one ``vpdpbusd``
per 16 pixels of the quad's plane with the quad's 4 levels broadcast (:func:`vnni_conv_pattern_kernel`;
with fewer than 4 vectors per tile, 4 / (TV / 16) accumulator sets take the quads in turn, so
that consecutive MACs do not wait for each other). Off AVX-512 VNNI
(:func:`portable_conv_pattern_kernel`, AVX2 included) the planes keep the 4 taps' activations
as 4 int32 vectors and each quad multiply-adds them by its levels (LLVM's vectorizer). Both are
exact (int32 sums of integer products), then ``float32(acc - flip * wsum + bias) * scale``.
"""


from typing import Optional, Tuple

import tvm
from tvm import s_tir
from tvm.script import tirx as T

from relay_passes import contract

from .registry import OpScheduleRule, target_cores
from .x86_tuning_table import x86_isa

__all__ = ["conv_pattern_kernel", "vnni_conv_pattern_kernel", "portable_conv_pattern_kernel", "pixel_tile",
           "SparseConv", "PACK_BYTES", "MAX_TV"]

#: The packed planes of a tile, ``planes * TV * 4`` bytes (x4 on the portable path), are kept
#: within this (L2: 1.25 MB per core on Ice Lake servers). Measured by timing the kernel alone on
#: ResNet-18's layer4 shape (512 x 512 channels, 7 x 7, 75 % pattern), this machine, one thread:
#: 1 MB (one tile of 64 pixels) 0.34 ms, 512 KB (three of 32) 0.59 ms.
PACK_BYTES = 1024 * 1024
#: Pixels of a tile at most (``TV / 16`` zmm accumulators held in registers).
MAX_TV = 128
LANES = 16


def pixel_tile(npl: int, oh: int, ws: int) -> Tuple[int, int]:
    """``(R, TV)``: grid rows per tile and pixels computed per tile (a multiple of 16): the fewest
    pixels computed in all (``ceil(OH / R) * TV``) among the tiles with ``TV <= MAX_TV`` whose
    packed planes fit :data:`PACK_BYTES` (one grid row per tile when none does)."""
    best = None
    for r in range(1, oh + 1):
        tv = -(-r * ws // LANES) * LANES
        if tv > MAX_TV or (r > 1 and npl * tv * 4 > PACK_BYTES):
            break
        cost = -(-oh // r) * tv
        if best is None or cost < best[0]:
            best = (cost, r, tv)
    if best is None:  # a grid row wider than MAX_TV: one row per tile anyway
        return 1, -(-ws // LANES) * LANES
    return best[1], best[2]


def _kernel(x_shape, f: int, kh: int, kw: int, strides, nq: int, npl: int, x_dtype: str, cores: int,
            vnni: bool) -> tvm.tirx.PrimFunc:
    n, c, hp, wp = (int(d) for d in x_shape)
    sh, sw = (int(v) for v in strides)
    if sh != sw:
        raise ValueError(f"conv_pattern_kernel: strides must be equal, got {strides}")
    s = sh
    oh, ow = (hp - kh) // s + 1, (wp - kw) // s + 1
    hs, ws = -(-hp // s), -(-wp // s)
    phase, chan = hs * ws, s * s * hs * ws
    r_rows, tv = pixel_tile(npl, oh, ws)
    nv, ntiles = tv // LANES, -(-oh // r_rows)
    u = max(1, 4 // nv) if vnni else 1  # accumulator sets
    max_off = (c - 1) * chan + (s * s - 1) * phase + ((kh - 1) // s) * ws + (kw - 1) // s
    xs_len = max(c * chan, max_off + (ntiles - 1) * r_rows * ws + tv)
    flip = 128 if x_dtype == "int8" else 0
    words = 1 if vnni else 4  # int32 vectors per plane and 16 pixels
    mac = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512") if vnni else None

    def off(ptaps, i, t):  # staged offset of tap ptaps[i, t] within a channel
        ky, kx = ptaps[i, t] // kw, ptaps[i, t] % kw
        return ((ky % s) * s + kx % s) * phase + (ky // s) * ws + kx // s

    def staged(x, b, q, i, j):  # phase q = ry * s + rx, phase row i, column j
        val = T.bitwise_xor(T.reinterpret(x[b, q // (s * s), i * s + q % (s * s) // s, j * s + q % s], dtype="uint8"),
                            T.uint8(flip))
        if s == 1:
            return val
        return T.if_then_else(T.And(i * s + q % (s * s) // s < hp, j * s + q % s < wp), val, T.uint8(0))

    def tap(xs, pchan, ptaps, task, i, t, v):  # 16 pixels' activations of tap t of plane i as int32
        return T.Cast("int32x16", xs[T.ramp((task // ntiles) * xs_len + pchan[i] * chan + off(ptaps, i, t)
                                            + (task % ntiles) * r_rows * ws + v * LANES, 1, LANES)])

    def quad(acc, pk, w, w32, qplane, j, a, v):  # acc set a, vector v += quad j
        at = T.ramp((a * nv + v) * LANES, 1, LANES)
        if vnni:
            return T.call_llvm_pure_intrin(
                mac, acc[at], T.reinterpret(pk[T.ramp((qplane[j] * nv + v) * LANES, 1, LANES)], dtype="uint8x64"),
                T.reinterpret(T.broadcast(w32[j], LANES), dtype="int8x64"), dtype="int32x16")
        return acc[at] + sum(pk[T.ramp(((qplane[j] * 4 + t) * nv + v) * LANES, 1, LANES)]
                             * T.broadcast(T.Cast("int32", w[j, t]), LANES) for t in range(4))

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((n, c, hp, wp), x_dtype), w: T.Buffer((nq, 4), "int8"), qplane: T.Buffer((nq,), "int32"),
               rptr: T.Buffer((f + 1,), "int32"), pchan: T.Buffer((npl,), "int32"), ptaps: T.Buffer((npl, 4), "int32"),
               wsum: T.Buffer((f,), "int32"), bias: T.Buffer((f,), "int32"), scale: T.Buffer((f,), "float32"),
               out: T.Buffer((n, f, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        xs = T.alloc_buffer((n * xs_len,), "uint8")
        w32 = T.decl_buffer((nq,), "int32", data=w.data)
        for b in T.parallel(n):
            for q, i in T.grid(c * s * s, hs):
                for j in T.vectorized(ws):
                    xs[b * xs_len + q * phase + i * ws + j] = staged(x, b, q, i, j)
            for e in T.serial(xs_len - c * chan):
                xs[b * xs_len + c * chan + e] = T.uint8(0)
        for task in T.parallel(n * ntiles):
            pk = T.alloc_buffer((npl * words * tv,), "int32")
            acc = T.alloc_buffer((u * tv,), "int32", scope="local")
            for i in T.serial(npl):
                for v in T.unroll(nv):
                    if vnni:
                        pk[T.ramp((i * nv + v) * LANES, 1, LANES)] = (
                            tap(xs, pchan, ptaps, task, i, 0, v)
                            | (tap(xs, pchan, ptaps, task, i, 1, v) << T.broadcast(T.int32(8), LANES))
                            | (tap(xs, pchan, ptaps, task, i, 2, v) << T.broadcast(T.int32(16), LANES))
                            | (tap(xs, pchan, ptaps, task, i, 3, v) << T.broadcast(T.int32(24), LANES)))
                    else:
                        for t in T.unroll(4):
                            pk[T.ramp(((i * 4 + t) * nv + v) * LANES, 1, LANES)] = tap(xs, pchan, ptaps, task, i, t, v)
            for r in T.serial(f):
                for a in T.unroll(u * nv):
                    acc[T.ramp(a * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                for jq in T.serial((rptr[r + 1] - rptr[r]) // u):
                    for a in T.unroll(u):
                        for v in T.unroll(nv):
                            acc[T.ramp((a * nv + v) * LANES, 1, LANES)] = quad(acc, pk, w, w32, qplane,
                                                                               rptr[r] + jq * u + a, a, v)
                for jt in T.serial((rptr[r + 1] - rptr[r]) % u):
                    for v in T.unroll(nv):
                        acc[T.ramp(v * LANES, 1, LANES)] = quad(acc, pk, w, w32, qplane, rptr[r + 1] - 1 - jt, 0, v)
                for a in T.unroll(u - 1):
                    for v in T.unroll(nv):
                        acc[T.ramp(v * LANES, 1, LANES)] = acc[T.ramp(v * LANES, 1, LANES)] + acc[
                            T.ramp(((a + 1) * nv + v) * LANES, 1, LANES)]
                for rr in T.serial(r_rows):
                    if (task % ntiles) * r_rows + rr < oh:
                        for z in T.vectorized(ow):
                            out[task // ntiles, r, (task % ntiles) * r_rows + rr, z] = T.Cast(
                                "float32", acc[rr * ws + z] - flip * wsum[r] + bias[r]) * scale[r]

    return kernel


def vnni_conv_pattern_kernel(x_shape, f, kh, kw, strides, nq, npl, x_dtype, cores=1) -> tvm.tirx.PrimFunc:
    """The kernel-sparse conv on AVX-512 VNNI (module docstring); arguments as the op's shapes."""
    return _kernel(x_shape, f, kh, kw, strides, nq, npl, x_dtype, cores, vnni=True)


def portable_conv_pattern_kernel(x_shape, f, kh, kw, strides, nq, npl, x_dtype, cores=1) -> tvm.tirx.PrimFunc:
    """The kernel-sparse conv on any LLVM CPU (module docstring)."""
    return _kernel(x_shape, f, kh, kw, strides, nq, npl, x_dtype, cores, vnni=False)


def conv_pattern_kernel(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> Optional[tvm.tirx.PrimFunc]:
    """The kernel for a kernel-sparse conv on an LLVM ``target`` (None for any other function or target)."""
    if target.kind.name != "llvm" or contract.rmsmp_attr(func, contract.OP) != contract.CONV_PATTERN:
        return None
    x, w, pchan = func.params[0], func.params[1], func.params[4]
    f = int(func.params[-1].shape[1])
    kh, kw = (int(v) for v in contract.attr(func, contract.SPARSE_KERNEL))
    strides = contract.conv_geometry(func)["strides"]
    args = ([int(d) for d in x.shape], f, kh, kw, strides, int(w.shape[0]), int(pchan.shape[0]), str(x.dtype),
            target_cores(target))
    if x86_isa(target) == "avx512vnni":
        kernel, kind = vnni_conv_pattern_kernel(*args), "x86-avx512vnni-conv-pattern"
    else:
        kernel, kind = portable_conv_pattern_kernel(*args), "conv-pattern"
    for key in (contract.OP, contract.LAYER, contract.SPARSE_ROW_SCHEMES, contract.SPARSE_KERNEL, contract.CONV):
        kernel = kernel.with_attr(key, func.attrs[key])
    return kernel.with_attr(contract.CPU_KERNEL, kind).with_attr("tirx.is_scheduled", True)


class _SparseConvRule(OpScheduleRule):
    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        kernel = conv_pattern_kernel(func, target) if isinstance(func, tvm.tirx.PrimFunc) else None
        return None if kernel is None else s_tir.Schedule(kernel)


#: The schedule rule of the kernel-sparse conv on LLVM targets (registered with the CPU's rules).
SparseConv = _SparseConvRule(contract.CONV_PATTERN, lambda sch, target: None, kinds=("llvm",))
