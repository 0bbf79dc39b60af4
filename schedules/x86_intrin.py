"""x86 kernel for packed 4-bit row groups (dense): table decode + integer MAC intrinsics.

A packed row stores two 4-bit codes per byte (code ``2j`` in the low nibble of byte ``j``,
``2j + 1`` in the high one). Every 4-bit scheme, fixed or SP2, has at most 16 levels, so a
code is decoded to its int8 level by one byte shuffle against a 16-entry table
(``vpshufb``): SP2 rows are *decoded to int8 and multiplied*, which on x86 costs the same
as a fixed-point row and far less than shifting every activation twice.

The activations are split once per call into their even and odd elements (``x[:, 0::2]``,
``x[:, 1::2]``), so 32 weight bytes meet 32 contiguous activations of each half without any
shuffle of the weights. Products are summed with

* AVX-512 VNNI (``avx512vnni`` + ``avx512vl``): ``vpdpbusd`` on 256-bit vectors;
* AVX2: ``vpmaddubsw`` then ``vpmaddwd`` with ones. ``vpmaddubsw`` saturates to int16,
  but here ``|x| <= 255`` and ``|w| <= 8``, so a pair sums to at most 4080: exact.

Both MACs take unsigned activations: signed (int8) ones are used as ``|x|`` with the sign
moved onto the decoded weight (``vpsignb``), still exact. The int32 lanes are summed after
the reduction, then ``out = float32(acc + bias) * scale`` as every other kernel.

Tiles of ``NT`` weight rows x ``MT`` activation rows keep ``MT * NT`` int32 vector
accumulators in registers and decode each weight vector once per activation tile, so the
same kernel streams the weights once at batch 1 and is compute bound at batch 128. Rows
past the end of a tile re-read the last row (branch-free loads); only their stores are
guarded. Outer loop: parallel over weight-row tiles.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import tvm
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

__all__ = ["x86_isa", "packed_dense_kernel", "supports_packed_dense", "decode_table", "TargetFeatureWarning"]

#: Bytes of packed weights (= activations of one half) per vector step.
VEC = 32


class TargetFeatureWarning(UserWarning):
    """The target lacks the vector features a fast kernel needs: a portable schedule is used."""


def x86_isa(target: tvm.target.Target) -> Optional[str]:
    """``"avx512vnni"``, ``"avx2"`` or None (not x86, or no AVX2) for an LLVM target."""
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return None
    if target_has_features("avx512vnni", target) and target_has_features("avx512vl", target):
        return "avx512vnni"
    if target_has_features("avx2", target):
        return "avx2"
    return None


def decode_table(levels: Sequence[int]) -> np.ndarray:
    """int8 level of each of the 16 codes (as the kernel's shuffle table, one per 128-bit lane)."""
    table = np.asarray(levels, dtype=np.int64)
    if table.shape != (16,) or np.abs(table).max() > 8:
        raise ValueError("a 4-bit decode table has 16 entries of magnitude <= 8 (int16 pair sums stay exact)")
    return np.concatenate([table, table]).astype(np.int8)


def supports_packed_dense(x_shape, n_bytes: int) -> bool:
    """The kernel needs 2-D activations whose length is a whole number of 64-code steps."""
    return len(x_shape) == 2 and int(x_shape[1]) == 2 * n_bytes and n_bytes % VEC == 0


def _tiles(m: int, isa: str):
    """(MT, NT): accumulators MT * NT vectors (AVX2 has 16 registers, AVX-512 32)."""
    if m == 1:
        return 1, 4
    return (4, 4) if isa == "avx512vnni" else (2, 4)


def packed_dense_kernel(
    m: int, k: int, n: int, x_dtype: str, levels: Sequence[int], isa: str, tiles=None,
) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [m, k], w [n, k/2] uint8, bias [n] int32, scale [n] f32, out [m, n] f32)``."""
    if isa not in ("avx2", "avx512vnni"):
        raise ValueError(f"packed_dense_kernel: unknown ISA {isa!r}")
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"packed_dense_kernel: activations must be uint8 or int8, got {x_dtype}")
    kb = k // 2
    if k % (2 * VEC):
        raise ValueError(f"packed_dense_kernel: K={k} is not a multiple of {2 * VEC}")
    mt, nt = tiles or _tiles(m, isa)
    mt = min(mt, m)
    nb = kb // VEC
    m_tiles = (m + mt - 1) // mt
    n_tiles = (n + nt - 1) // nt
    n_chunks = min(n_tiles, 64)
    per_chunk = (n_tiles + n_chunks - 1) // n_chunks
    # the 16 table bytes as two int64 constants (byte t of the table is byte t % 8 of one)
    lut_bytes = decode_table(levels)[:16].view(np.uint8)
    lut_lo = T.int64(int(lut_bytes[:8].view(np.int64)[0]))
    lut_hi = T.int64(int(lut_bytes[8:].view(np.int64)[0]))
    signed = x_dtype == "int8"
    vnni = isa == "avx512vnni"
    pshufb = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pshuf.b")
    psign = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b")
    maddubs = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw")
    maddwd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
    dpbusd = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256")

    def mac(acc, xv, wv):
        if vnni:
            # LLVM 22 declares the byte operands as <32 x i8> (older releases: <8 x i32>)
            return T.call_llvm_pure_intrin(dpbusd, acc, xv, wv, dtype="int32x8")
        pairs = T.call_llvm_pure_intrin(maddubs, xv, wv, dtype="int16x16")
        return acc + T.call_llvm_pure_intrin(maddwd, pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")

    def signed_weight(wv, xs):
        # |x| * (w * sign(x)) == x * w; vpsignb also zeroes w where x == 0
        return T.call_llvm_pure_intrin(psign, wv, xs, dtype="int8x32") if signed else wv

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((m, k), x_dtype),
        w: T.Buffer((n, kb), "uint8"),
        bias: T.Buffer((n,), "int32"),
        scale: T.Buffer((n,), "float32"),
        out: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        # activations split into even / odd halves (|x| and x itself when signed)
        xe = T.alloc_buffer((m, kb), "uint8")
        xo = T.alloc_buffer((m, kb), "uint8")
        se = T.alloc_buffer((m, kb if signed else 1), "int8")
        so = T.alloc_buffer((m, kb if signed else 1), "int8")
        for i in T.parallel(m):
            for j in range(kb):
                if signed:
                    se[i, j] = T.Cast("int8", x[i, 2 * j])
                    so[i, j] = T.Cast("int8", x[i, 2 * j + 1])
                    xe[i, j] = T.Cast("uint8", T.abs(T.Cast("int32", x[i, 2 * j])))
                    xo[i, j] = T.Cast("uint8", T.abs(T.Cast("int32", x[i, 2 * j + 1])))
                else:
                    xe[i, j] = T.Cast("uint8", x[i, 2 * j])
                    xo[i, j] = T.Cast("uint8", x[i, 2 * j + 1])
        for chunk in T.parallel(n_chunks):
            # local buffers in a parallel loop are heap workspaces: allocate once per chunk
            acc = T.alloc_buffer((mt * nt * 8,), "int32", scope="local")
            table = T.alloc_buffer((VEC,), "int8", scope="local")
            for tt in range(per_chunk):
                if chunk * per_chunk + tt < n_tiles:
                    tn = chunk * per_chunk + tt
                    for t in T.unroll(VEC):
                        byte = T.bitwise_and(T.shift_right(T.Select(t % 16 < 8, lut_lo, lut_hi), T.Cast("int64", 8 * (t % 8))), T.int64(255))
                        table[t] = T.Cast("int8", byte - T.shift_left(T.shift_right(byte, T.int64(7)), T.int64(8)))
                    for tm in range(m_tiles):
                        for a in T.unroll(mt * nt * 8):
                            acc[a] = 0
                        for b in range(nb):
                            for ni in T.unroll(nt):
                                row = T.min(tn * nt + ni, n - 1)
                                wv = w[row, T.ramp(b * VEC, 1, VEC)]
                                lo = T.reinterpret(wv & T.broadcast(T.uint8(15), VEC), dtype="int8x32")
                                hi = T.reinterpret(T.shift_right(wv, T.broadcast(T.uint8(4), VEC)), dtype="int8x32")
                                tab = table[T.ramp(0, 1, VEC)]
                                dlo = T.call_llvm_pure_intrin(pshufb, tab, lo, dtype="int8x32")
                                dhi = T.call_llvm_pure_intrin(pshufb, tab, hi, dtype="int8x32")
                                for mi in T.unroll(mt):
                                    r = T.min(tm * mt + mi, m - 1)
                                    slot = T.ramp((mi * nt + ni) * 8, 1, 8)
                                    if signed:
                                        acc[slot] = mac(
                                            mac(acc[slot], xe[r, T.ramp(b * VEC, 1, VEC)],
                                                signed_weight(dlo, se[r, T.ramp(b * VEC, 1, VEC)])),
                                            xo[r, T.ramp(b * VEC, 1, VEC)], signed_weight(dhi, so[r, T.ramp(b * VEC, 1, VEC)]))
                                    else:
                                        acc[slot] = mac(mac(acc[slot], xe[r, T.ramp(b * VEC, 1, VEC)], dlo),
                                                        xo[r, T.ramp(b * VEC, 1, VEC)], dhi)
                        for mi in T.unroll(mt):
                            for ni in T.unroll(nt):
                                if tm * mt + mi < m and tn * nt + ni < n:
                                    base = (mi * nt + ni) * 8
                                    total = (acc[base] + acc[base + 1] + acc[base + 2] + acc[base + 3]
                                             + acc[base + 4] + acc[base + 5] + acc[base + 6] + acc[base + 7])
                                    out[tm * mt + mi, tn * nt + ni] = (
                                        T.Cast("float32", total + bias[tn * nt + ni]) * scale[tn * nt + ni]
                                    )

    return kernel


def warn_fallback(what: str, target: tvm.target.Target) -> None:
    warnings.warn(
        f"{what}: target {target.attrs.get('mcpu', '')!r} has no AVX2; using the portable schedule",
        TargetFeatureWarning, stacklevel=3,
    )
