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

Both MACs take unsigned activations: signed (int8) ones are offset by 128 into uint8 and
``128 * sum(w)`` is subtracted, the row sums accumulated alongside by one more MAC per
weight vector against ones (``|w_lo + w_hi| <= 16`` fits a byte), still exact. The int32
lanes are summed after the reduction, then ``out = float32(acc + bias) * scale`` as every
other kernel.

Tiles of ``NT`` weight rows x ``MT`` activation rows keep ``MT * NT`` int32 vector
accumulators in registers and decode each weight vector once per activation tile, so the
same kernel streams the weights once at batch 1 and is compute bound at batch 128. Rows
past the end of a tile re-read the last row (branch-free loads); only their stores are
guarded. Outer loop: parallel over chunks of weight-row tiles sized to stay in L2 while
every activation tile passes over them.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import tvm
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

__all__ = ["x86_isa", "packed_dense_kernel", "supports_packed_dense", "decode_table", "TargetFeatureWarning"]

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
    """int8 level of each of the 16 codes (the kernel's shuffle table, repeated per 128-bit lane)."""
    table = np.asarray(levels, dtype=np.int64)
    if table.shape != (16,) or np.abs(table).max() > 8:
        raise ValueError("a 4-bit decode table has 16 entries of magnitude <= 8 (int16 pair sums stay exact)")
    return table.astype(np.int8)


def vector_bytes(isa: str, n_bytes: int) -> int:
    """Weight bytes per vector step: 32 (ymm). The kernel also builds with 64 (zmm, VNNI, rows
    of a multiple of 64 bytes), but on znver4, which runs 512-bit operations as two halves,
    that measured 1.1-1.4x slower at batch 128 (``bench/cpu.py`` machine, 2 threads)."""
    return 32


def supports_packed_dense(x_shape, n_bytes: int) -> bool:
    """The kernel needs 2-D activations whose length is a whole number of 64-code steps."""
    return len(x_shape) == 2 and int(x_shape[1]) == 2 * n_bytes and n_bytes % 32 == 0


def _tiles(m: int, isa: str):
    """(MT, NT): accumulators MT * NT vectors (AVX2 has 16 registers, AVX-512 32)."""
    if m == 1:
        return 1, 4
    return (4, 4) if isa == "avx512vnni" else (2, 4)


def packed_dense_kernel(
    m: int, k: int, n: int, x_dtype: str, levels: Sequence[int], isa: str, tiles=None, vec: Optional[int] = None,
    chunks: Optional[int] = None, unroll_k: bool = False, num_cores: int = 1,
) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [m, k], w [n, k/2] uint8, bias [n] int32, scale [n] f32, out [m, n] f32)``."""
    if isa not in ("avx2", "avx512vnni"):
        raise ValueError(f"packed_dense_kernel: unknown ISA {isa!r}")
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"packed_dense_kernel: activations must be uint8 or int8, got {x_dtype}")
    kb = k // 2
    if k % 64:
        raise ValueError(f"packed_dense_kernel: K={k} is not a multiple of 64")
    vec = vec or vector_bytes(isa, kb)
    if vec not in (32, 64) or (vec == 64 and (isa != "avx512vnni" or kb % 64)):
        raise ValueError(f"packed_dense_kernel: {vec}-byte vectors need VNNI and rows of a multiple of {vec} bytes")
    lanes = vec // 4
    i8v, i32v, i16v = f"int8x{vec}", f"int32x{lanes}", f"int16x{vec // 2}"
    mt, nt = tiles or _tiles(m, isa)
    mt = min(mt, m)
    nb = kb // vec
    m_tiles = (m + mt - 1) // mt
    n_tiles = (n + nt - 1) // nt
    # a chunk of row tiles is one parallel task; its weights (about 96 KiB) stay in L2 while
    # every activation tile passes over them, so activations are read once per chunk
    # (batch 1: 4 chunks per core; each chunk allocates its accumulators once, and 64 chunks
    # of a 1843-row group cost 3x the kernel itself in allocations)
    if chunks is None:
        chunks = 4 * max(1, num_cores) if m_tiles == 1 else n_tiles
    per_chunk = max(1, (n_tiles + chunks - 1) // chunks)
    if m_tiles > 1:
        per_chunk = max(per_chunk, min((n_tiles + 1) // 2, (96 * 1024) // (nt * kb)))
    n_chunks = (n_tiles + per_chunk - 1) // per_chunk
    # the 16 table bytes as two int64 constants (byte t of the table is byte t % 8 of one)
    lut_bytes = decode_table(levels).view(np.uint8)
    lut_lo = T.int64(int(lut_bytes[:8].view(np.int64)[0]))
    lut_hi = T.int64(int(lut_bytes[8:].view(np.int64)[0]))
    signed = x_dtype == "int8"
    vnni = isa == "avx512vnni"
    wide = vec == 64
    pshufb = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pshuf.b.512" if wide else "llvm.x86.avx2.pshuf.b")
    maddubs = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw")
    maddwd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
    dpbusd = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512" if wide else "llvm.x86.avx512.vpdpbusd.256")

    def mac(acc, xv, wv):
        if vnni:
            # LLVM 22 declares the byte operands as <N x i8> (older releases: <N/4 x i32>)
            return T.call_llvm_pure_intrin(dpbusd, acc, xv, wv, dtype=i32v)
        pairs = T.call_llvm_pure_intrin(maddubs, xv, wv, dtype=i16v)
        return acc + T.call_llvm_pure_intrin(maddwd, pairs, T.broadcast(T.int16(1), vec // 2), dtype=i32v)

    def hsum(buf, base):
        total = buf[base]
        for lane in range(1, lanes):
            total = total + buf[base + lane]
        return total

    def xvec(buf, r, b):
        return buf[r, T.ramp(b * vec, 1, vec)]

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((m, k), x_dtype),
        w: T.Buffer((n, kb), "uint8"),
        bias: T.Buffer((n,), "int32"),
        scale: T.Buffer((n,), "float32"),
        out: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        # activations split into even / odd halves; signed ones offset by 128 into uint8
        # (x * w = (x + 128) * w - 128 * w: the row sums of w are accumulated alongside)
        xe = T.alloc_buffer((m, kb), "uint8")
        xo = T.alloc_buffer((m, kb), "uint8")
        for i in T.serial(m) if m < 8 else T.parallel(m):  # a parallel launch costs more than a few rows
            for j in range(kb):
                if signed:
                    xe[i, j] = T.Cast("uint8", T.Cast("int32", x[i, 2 * j]) + 128)
                    xo[i, j] = T.Cast("uint8", T.Cast("int32", x[i, 2 * j + 1]) + 128)
                else:
                    xe[i, j] = T.Cast("uint8", x[i, 2 * j])
                    xo[i, j] = T.Cast("uint8", x[i, 2 * j + 1])
        for chunk in T.parallel(n_chunks):
            # local buffers in a parallel loop are heap workspaces: allocate once per chunk
            acc = T.alloc_buffer((mt * nt * lanes,), "int32", scope="local")
            rowsum = T.alloc_buffer((nt * lanes,), "int32", scope="local")
            table = T.alloc_buffer((vec,), "int8", scope="local")
            for t in T.unroll(vec):
                byte = T.bitwise_and(T.shift_right(T.Select(t % 16 < 8, lut_lo, lut_hi), T.Cast("int64", 8 * (t % 8))), T.int64(255))
                table[t] = T.Cast("int8", byte - T.shift_left(T.shift_right(byte, T.int64(7)), T.int64(8)))
            for tm in range(m_tiles):
                for tt in range(per_chunk):
                    if chunk * per_chunk + tt < n_tiles:
                        for a in T.unroll(mt * nt * lanes):
                            acc[a] = 0
                        for a in T.unroll(nt * lanes):
                            rowsum[a] = 0
                        for b in T.unroll(nb) if unroll_k else T.serial(nb):
                            for ni in T.unroll(nt):
                                wv = w[T.min((chunk * per_chunk + tt) * nt + ni, n - 1), T.ramp(b * vec, 1, vec)]
                                lo = T.reinterpret(wv & T.broadcast(T.uint8(15), vec), dtype=i8v)
                                hi = T.reinterpret(T.shift_right(wv, T.broadcast(T.uint8(4), vec)), dtype=i8v)
                                tab = table[T.ramp(0, 1, vec)]
                                dlo = T.call_llvm_pure_intrin(pshufb, tab, lo, dtype=i8v)
                                dhi = T.call_llvm_pure_intrin(pshufb, tab, hi, dtype=i8v)
                                if signed:  # |dlo + dhi| <= 16: one MAC against ones
                                    rowsum[T.ramp(ni * lanes, 1, lanes)] = mac(
                                        rowsum[T.ramp(ni * lanes, 1, lanes)], T.broadcast(T.uint8(1), vec), dlo + dhi)
                                for mi in T.unroll(mt):
                                    acc[T.ramp((mi * nt + ni) * lanes, 1, lanes)] = mac(
                                        mac(acc[T.ramp((mi * nt + ni) * lanes, 1, lanes)],
                                            xvec(xe, T.min(tm * mt + mi, m - 1), b), dlo),
                                        xvec(xo, T.min(tm * mt + mi, m - 1), b), dhi)
                        for mi in T.unroll(mt):
                            for ni in T.unroll(nt):
                                if tm * mt + mi < m and (chunk * per_chunk + tt) * nt + ni < n:
                                    out[tm * mt + mi, (chunk * per_chunk + tt) * nt + ni] = T.Cast(
                                        "float32",
                                        hsum(acc, (mi * nt + ni) * lanes)
                                        - 128 * hsum(rowsum, ni * lanes)
                                        + bias[(chunk * per_chunk + tt) * nt + ni],
                                    ) * scale[(chunk * per_chunk + tt) * nt + ni]

    return kernel


def warn_fallback(what: str, target: tvm.target.Target) -> None:
    warnings.warn(
        f"{what}: target {target.attrs.get('mcpu', '')!r} has no AVX2; using the portable schedule",
        TargetFeatureWarning, stacklevel=3,
    )
