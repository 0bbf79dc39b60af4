"""x86 kernel for row groups (dense and conv2d): 4-bit table decode + integer MAC intrinsics.

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
  but a pair sums to at most 2 * 255 * 8 = 4080 (unsigned activations) or
  2 * 16 * 128 = 4096 (signed ones, offset weights): exact. Where the rows were decoded
  once per call (many activation rows), eight such pair sums are added in int16 before one
  ``vpmaddwd`` widens them (:data:`PAIR_SUMS16`): one multiply per 32 products instead of
  two (ResNet-18's 3x3 conv SP2 groups 15.0 -> 12.5 ms per model run, one thread,
  ``python -m bench.profile_model``).
  int8 rows on AVX2 are multiplied as int16 pairs (``vpmaddwd``).

Every integer sum (int32 accumulators with the offsets, int16 pair sums) is bounded when a
kernel is built (:mod:`schedules.x86_bounds`): a reduction too long for them is refused
(``KernelBoundError``; int8 rows: at most 65793 products) and ``schedules.cpu.x86_replacement``
leaves the group to the portable schedule. Machine-measured constants (tilings, the zmm rule,
the L2 chunk) come from the target CPU's row of :mod:`schedules.x86_tuning_table`.

Both MACs multiply an unsigned byte by a signed one. Unsigned activations (after ReLU) are
the unsigned operand. Signed (int8) activations are the signed operand, and the weights
become the unsigned one, offset into it: the 4-bit tables hold ``level + 8`` (0..16), int8
rows have their sign bit flipped (``w + 128``); ``x * w = x * (w + off) - off * x``, with
the activation sums taken once per call per GEMM row (before: the activations were offset
and every weight row summed inside the MAC loop, 20-40% of a batch-1 layer). Four rows'
int32 lanes are summed together by three ``vphaddd`` after the reduction, then
``out = float32(acc + bias) * scale`` as every other kernel, for four contiguous dense
outputs as one vector (the scalar epilogue was 10% of a 128 x 768 x 1843 GEMM).

Convolutions are the same GEMM with one row per output pixel. When the input channels fill
whole vector steps (64 for packed rows, 32 for int8 ones: every ResNet layer but the stem)
and, for packed rows, the output has at least twice as many pixels as the group has rows,
the activations are staged once per call as channel-last planes and each kernel tap
``(ky, kx)`` is a GEMM over the channels, reading the planes at the shifted pixel (the
weights are reordered to ``(ky, kx, channel)`` per call: a copy of the group's weights, small
next to an im2col, which is ``kh * kw`` times the activations). Otherwise an im2col is staged,
in tap order (``(ky, kx, channel)`` columns: one vector copy of ``kw * C`` contiguous
channel-last activations per kernel row and output pixel; weights laid out to match by
:func:`tap_order_weights`) unless the weights would have to be reordered per call for more
rows than pixels.

Tiles of ``NT`` weight rows x ``MT`` activation rows keep ``MT * NT`` int32 vector
accumulators in registers. At batch 1 each weight vector is decoded in registers right
before its MACs, so the packed weights stream once; with several activation tiles (batch
128, conv pixels) the rows are decoded to int8 planes once per call first, which
took the decode out of the inner loop (1.47x at 128 x 768 x 461). Rows
past the end of a tile re-read the last row (branch-free loads; weights laid out at compile
time are zero-padded instead); only their stores are guarded. Outer loop: parallel over
chunks of weight-row tiles sized to stay in L2 while every activation tile passes over them.

Weight layouts made at compile time (:func:`tile_weights` for dense: a tile's rows
interleaved step by step, one sequential stream; :func:`taps_first_weights` for the per-tap
conv GEMMs, :func:`tap_order_weights` for the tap-order im2col) are read when the kernel is
built with ``tiled`` / ``taps_first``; the ``relay_passes.UseTargetKernels`` pass, given
:func:`schedules.cpu.x86_constant_kernel`, rewrites the constants to match.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import attrs
import numpy as np
import tvm
from tvm.script import tirx as T

from tvm_rmsmp.quant.schemes import unpack_nibbles
from relay_passes import contract

from .x86_bounds import (
    LEVEL_BOUND,
    KernelBoundError,
    activation_range,
    check_accumulators,
    check_pair_sums16,
    describe,
    operand_range,
)
from .x86_tuning_table import X86_CONSTANTS, constants_for, x86_isa

__all__ = ["x86_isa", "PAIR_SUMS16", "gemm_kernel", "broadcast_dense_kernel", "BROADCAST_MIN_ROWS", "layer_dense_kernel", "layer_weights",
           "layer_int8_kernel", "layer_int8_weights", "layer_avx2_kernel", "layer_avx2_weights", "layer_avx2_bounds",
           "packed_dense_kernel", "supports_packed_dense", "decode_table", "ConvGeometry",
           "TargetFeatureWarning", "KernelBoundError", "layer_dense_bounds", "tile_weights", "taps_first_weights", "tap_order_weights"]

class TargetFeatureWarning(UserWarning):
    """The target lacks the vector features a fast kernel needs: a portable schedule is used."""


def decode_table(levels: Sequence[int]) -> np.ndarray:
    """int8 level of each of the 16 codes (the kernel's shuffle table, repeated per 128-bit lane)."""
    table = np.asarray(levels, dtype=np.int64)
    if table.shape != (16,) or np.abs(table).max() > 8:
        raise ValueError("a 4-bit decode table has 16 entries of magnitude <= 8 (int16 pair sums stay exact)")
    return table.astype(np.int8)


def vector_bytes(isa: str, n_bytes: int, m: int, conv: bool = False, cpu: Optional[str] = None) -> int:
    """Weight bytes per vector step, for ``n_bytes`` stored bytes per row and ``m`` GEMM rows:
    64 (zmm) for a batch-1 dense on VNNI whose rows pad by at most ``1 / zmm_pad_divisor``
    (an eighth) of ``cpu``'s row of :mod:`schedules.x86_tuning_table`, else 32 (ymm).
    znver4 runs 512-bit operations as two halves, so zmm halves the instructions, not the
    work: at batch 1, where the decode's instructions are the bound, 1.10x (1 x 768 x 1843 and
    1 x 3072 x 461 SP2 rows, one thread); at batch 128 1.1-1.4x slower."""
    divisor = constants_for(isa, cpu)["zmm_pad_divisor"] if isa in ("avx2", "avx512vnni") else None
    if isa == "avx512vnni" and divisor and m == 1 and not conv and -n_bytes % 64 <= n_bytes // divisor:
        return 64
    return 32


def supports_packed_dense(x_shape, n_bytes: int) -> bool:
    """The packed dense kernel takes 2-D activations of ``2 * n_bytes`` or ``2 * n_bytes - 1``
    codes (odd lengths: the last byte's high nibble is the 0 code)."""
    return len(x_shape) == 2 and int(x_shape[1]) in (2 * n_bytes, 2 * n_bytes - 1)


@attrs.frozen
class ConvGeometry:
    """An NCHW convolution read as a GEMM: one row per output pixel, one column per
    ``(channel, ky, kx)`` in the weight's own order (``x`` already zero-padded)."""

    batch: int
    channels: int
    height: int
    width: int
    kh: int
    kw: int
    strides: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)

    @property
    def out_hw(self) -> Tuple[int, int]:
        (sh, sw), (dh, dw) = self.strides, self.dilation
        return ((self.height - dh * (self.kh - 1) - 1) // sh + 1, (self.width - dw * (self.kw - 1) - 1) // sw + 1)

    @property
    def m(self) -> int:
        oh, ow = self.out_hw
        return self.batch * oh * ow

    @property
    def k(self) -> int:
        return self.channels * self.kh * self.kw



class _VectorOps:
    """The vector operations both kernels build on, for one ISA, vector width and activation
    signedness: the MAC of unsigned by signed bytes, and the 4-bit table decode.

    Signed activations make the weights the MAC's unsigned operand, offset by ``w_off``
    (``x * w = x * (w + w_off) - w_off * x``, the activation sums taken once per call).
    ``pairs`` (int8 rows on AVX2): both operands int16, ``vec`` of them per vector, multiplied
    and summed in pairs by ``vpmaddwd`` (exact: ``2 * 255 * 128`` fits int32)."""

    def __init__(self, isa: str, vec: int, signed: bool, levels: Optional[Sequence[int]], w_off: Optional[int] = None,
                 pairs: bool = False):
        self.isa, self.vec, self.signed, self.pairs = isa, vec, signed, pairs
        packed = levels is not None
        self.w_off = ((8 if packed else 128) if signed else 0) if w_off is None else w_off
        if packed:
            # the 16 table bytes as two int64 constants (byte t of the table is byte t % 8 of one)
            lut = (decode_table(levels).astype(np.int16) + self.w_off).astype(np.uint8)
            self.lut = (T.int64(int(lut[:8].view(np.int64)[0])), T.int64(int(lut[8:].view(np.int64)[0])))
        else:
            self.lut = (T.int64(0), T.int64(0))

    def mac(self, acc, xv, wv):
        """``acc`` plus the products of ``xv`` and ``wv``, four per int32 lane."""
        if self.pairs:  # int16 x int16 pairs (``vec`` elements), summed to int32 by vpmaddwd
            return acc + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), xv, wv,
                                                 dtype=f"int32x{self.vec // 2}")
        a, b = (wv, xv) if self.signed else (xv, wv)  # the unsigned operand first
        lanes = self.vec // 4
        if self.isa == "avx512vnni":
            # LLVM 22 declares the byte operands as <N x i8> (older releases: <N/4 x i32>)
            name = "llvm.x86.avx512.vpdpbusd.512" if self.vec == 64 else "llvm.x86.avx512.vpdpbusd.256"
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), acc, a, b, dtype=f"int32x{lanes}")
        return acc + self.widen(self.pair_sums(xv, wv))

    def pair_sums(self, xv, wv):
        """AVX2: the products of ``xv`` and ``wv`` summed in adjacent pairs, int16 (``vpmaddubsw``,
        which saturates: exact for 4-bit levels only, a pair within ``2 * 255 * 8`` or
        ``2 * 128 * 16``; an int8 row's pair reaches ``2 * 255 * 127``, past int16, so int8 rows
        take the int16 pairs of ``vpmaddwd`` instead; :mod:`schedules.x86_bounds`)."""
        a, b = (wv, xv) if self.signed else (xv, wv)  # the unsigned operand first
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a, b,
                                       dtype=f"int16x{self.vec // 2}")

    def widen(self, sums16):
        """int16 pair sums (``vec / 2`` of them) summed in adjacent pairs to int32 (``vpmaddwd``)."""
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), sums16,
                                       T.broadcast(T.int16(1), self.vec // 2), dtype=f"int32x{self.vec // 4}")

    def table_byte(self, t):
        """Byte ``t`` of the decode table vector: level ``t % 16`` (the table repeats per lane)."""
        lo, hi = self.lut
        byte = T.bitwise_and(T.shift_right(T.Select(t % 16 < 8, lo, hi), T.Cast("int64", 8 * (t % 8))), T.int64(255))
        return T.Cast("int8", byte - T.shift_left(T.shift_right(byte, T.int64(7)), T.int64(8)))

    def decode(self, table, wv, high):
        """The (offset) levels of the low (``high`` False: even codes) or high nibbles of ``wv``."""
        vec = self.vec
        nibbles = T.shift_right(wv, T.broadcast(T.uint8(4), vec)) if high else wv & T.broadcast(T.uint8(15), vec)
        name = "llvm.x86.avx512.pshuf.b.512" if vec == 64 else "llvm.x86.avx2.pshuf.b"
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), table[T.ramp(0, 1, vec)],
                                       T.reinterpret(nibbles, dtype=f"int8x{vec}"), dtype=f"int8x{vec}")


def _tiles(m: int, isa: str):
    """(MT, NT): accumulators MT * NT vectors (AVX2 has 16 registers, AVX-512 32). Batch 1
    with 32 registers: 8 rows per tile, 4-6% faster than 4 (1 x 768 x 1843 SP2 rows, tiled
    weights, one thread)."""
    if m == 1:
        return (1, 8) if isa == "avx512vnni" else (1, 4)
    return (4, 4) if isa == "avx512vnni" else (2, 4)


def packed_dense_kernel(
    m: int, k: int, n: int, x_dtype: str, levels: Sequence[int], isa: str, tiles=None, vec: Optional[int] = None,
    chunks: Optional[int] = None, unroll_k: bool = False, num_cores: int = 1, cpu: Optional[str] = None,
) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [m, k], w [n, ceil(k/2)] uint8, bias [n] int32, scale [n] f32, out [m, n] f32)``."""
    return gemm_kernel(m, k, n, x_dtype, levels, isa, tiles=tiles, vec=vec, chunks=chunks, unroll_k=unroll_k,
                       num_cores=num_cores, cpu=cpu)


class _GemmPlan:
    """The shapes and choices of :func:`gemm_kernel` (module docstring): which conv path, the
    vector steps, the register tiles and how they are split into parallel tasks."""

    def __init__(self, m, k, n, x_dtype, levels, isa, conv, tiles, vec, chunks, unroll_k, num_cores, predecode,
                 direct_conv, tiled, taps_first, cpu):
        self.m, self.k, self.n, self.x_dtype, self.levels, self.isa, self.conv = m, k, n, x_dtype, levels, isa, conv
        self.tiled, self.unroll_k = tiled, unroll_k
        self.packed = packed = levels is not None
        # int8 rows on AVX2 (vpmaddubsw would saturate on 8-bit products): activations and weights
        # as int16, multiplied in pairs by vpmaddwd, exact for either signedness without offsets
        self.pairs = pairs = not packed and isa == "avx2"
        self.signed = x_dtype == "int8" and not pairs  # signed activations: offset weights, activation sums
        self.stage_dtype = "int16" if pairs else x_dtype
        if tiled and conv is not None:
            raise ValueError("gemm_kernel: tiled weights are for dense row groups")
        if conv is not None and (conv.m != m or conv.k != k):
            raise ValueError(f"gemm_kernel: conv geometry gives m={conv.m}, k={conv.k}, not {m}, {k}")
        vec = vec or vector_bytes(isa, (k + 1) // 2 if levels is not None else k, m, conv is not None, cpu)
        self.halves = 2 if packed else 1  # packed: even / odd codes of a byte meet separate activation planes
        if vec not in (32, 64) or (vec == 64 and isa != "avx512vnni"):
            raise ValueError(f"gemm_kernel: {vec}-byte vectors need VNNI")
        self.vec = vec = 16 if pairs else vec  # pairs: int16 elements per step from here on (32 bytes)
        self.w_bytes = (k + 1) // 2 if packed else k  # stored bytes per weight row
        self.nb = -(-self.w_bytes // vec)  # vector steps per row
        self.width = self.nb * vec  # staged bytes per row (zero-padded past w_bytes)
        self.pad_w = self.width != self.w_bytes
        self._conv_paths(taps_first, direct_conv)
        self.lanes = vec // 2 if pairs else vec // 4  # int32 lanes of an accumulator
        self._tasks(tiles, chunks, num_cores, predecode, cpu)
        self.ops = _VectorOps(isa, vec, self.signed, levels, pairs=pairs)
        self.w_off = self.ops.w_off
        # AVX2, decoded 4-bit rows: pair sums added in 16 bits over several steps (segments and
        # steps in order) before one vpmaddwd widens them (PAIR_SUMS16): one multiply per 32
        # products instead of two
        self.sums16 = isa == "avx2" and packed and self.pre
        _check_bounds("gemm_kernel", k, x_dtype, levels, isa, self.w_off, pairs, self.sums16)
        self._buffer_shapes()

    def _conv_paths(self, taps_first, direct_conv):
        conv, vec, halves, packed, m, n = self.conv, self.vec, self.halves, self.packed, self.m, self.n
        # conv whose channels fill whole vector steps: no im2col; activations staged once as
        # channel-last planes and each (ky, kx) is a GEMM over the channels (weights reordered
        # per call to (ky, kx, channel), a small copy next to a 9x larger im2col)
        # Packed rows are reordered nibble by nibble, which costs more per row than an im2col
        # per pixel: layers with more rows than half their output pixels (ResNet-18's 14x14 and
        # 7x7 stages) stage an im2col instead (0.48 vs 0.74 ms at 512 channels, 7x7, 307 rows).
        direct = conv is not None and conv.channels % (vec * halves) == 0
        laid_out = taps_first  # the weights come in the layout of whichever conv path applies
        taps_first = taps_first and direct
        if direct_conv is not None:
            direct = direct and direct_conv
            taps_first = taps_first and direct
        elif direct and packed and not taps_first:
            direct = m >= 2 * n
        # the other convs: an im2col in tap order ((ky, kx, channel) columns), one vector copy of
        # kw * C contiguous channel-last activations per kernel row and pixel, packed bytes pairing
        # the two halves of a step's columns, so no even / odd split either (ResNet-18's stem, 38
        # SP2 rows, one thread: 14.9 -> 2.4 ms; the scalar gather was 80% of the call). Its weights
        # are reordered to match, per call when they do not come laid out: cheap where the rows are
        # fewer than the pixels, else the channel-order im2col below stays
        self.tap_order = conv is not None and not direct and conv.dilation[1] == 1 and (laid_out or n <= m)
        self.tap_laid_out = self.tap_order and laid_out
        self.direct, self.taps_first = direct, taps_first
        self.segs = conv.kh * conv.kw if direct else 1
        self.nbc = conv.channels // halves // vec if direct else self.nb  # vector steps per segment

    def _tasks(self, tiles, chunks, num_cores, predecode, cpu):
        m, n = self.m, self.n
        mt, nt = tiles or _tiles(m, self.isa)
        self.mt, self.nt = mt, nt = min(mt, m), nt
        self.m_tiles = m_tiles = (m + mt - 1) // mt
        self.n_tiles = n_tiles = (n + nt - 1) // nt
        self.cores = cores = max(1, num_cores)
        # a chunk of row tiles keeps its weights (about 96 KiB) in L2 while activation tiles pass
        # over them; batch 1: 4 chunks per core (each allocates its accumulators once, and 64
        # chunks of a 1843-row group cost 3x the kernel itself in allocations)
        if chunks is None:
            chunks = 4 * cores if m_tiles == 1 else n_tiles
        per_chunk = max(1, (n_tiles + chunks - 1) // chunks)
        if m_tiles > 1:
            l2_chunk = constants_for(self.isa, cpu)["l2_chunk_bytes"]
            per_chunk = max(per_chunk, min((n_tiles + 1) // 2, l2_chunk // (nt * self.width)))
        self.per_chunk = per_chunk
        self.n_chunks = n_chunks = (n_tiles + per_chunk - 1) // per_chunk
        # many activation rows (conv pixels, large batches): also split them, 4 tasks per core
        m_blocks = 1 if m_tiles == 1 else max(1, min(m_tiles, -(-4 * cores // n_chunks)))
        self.per_block = -(-m_tiles // m_blocks)
        self.tasks = -(-m_tiles // self.per_block) * n_chunks
        # weights prepared once per call when several activation tiles will read them (packed:
        # decoded to int8 planes; int8 rows meeting signed activations: offset to unsigned)
        self.converts = self.packed or self.signed or self.pairs  # weights change form before the MAC
        self.pre = m_tiles > 1 and self.converts if predecode is None else bool(predecode)
        # prepared rows are laid out tile by tile, step by step ([tile, step, row, plane, byte]):
        # a tile's weights for one step are one contiguous 256-byte read instead of eight
        # streams (1.09x at 128 x 768 x 1843, 1.28x for the int8 rows at 128 x 768 x 154)
        self.n_pad = n_tiles * nt
        self.pre_chunks = min(self.n_pad, 4 * cores)
        self.pre_rows = -(-self.n_pad // self.pre_chunks)

    def _buffer_shapes(self):
        conv, m, n, nt, vec, halves = self.conv, self.m, self.n, self.nt, self.vec, self.halves
        self.wd_shape = (self.n_tiles, self.nb, nt, halves, vec)
        self.wd_dtype = "int16" if self.pairs else "int8"
        self.w_dtype = "uint8" if self.packed else "int8"
        if conv is None:
            self.x_shape, self.out_shape = (m, self.k), (m, n)
        else:
            self.x_shape = (conv.batch, conv.channels, conv.height, conv.width)
            self.oh, self.ow = conv.out_hw
            self.out_shape = (conv.batch, n, self.oh, self.ow)
            (self.sh, self.sw), (self.dh, self.dw) = conv.strides, conv.dilation
        w_shape = (n, self.w_bytes) if (self.packed or conv is None) else (n, conv.channels, conv.kh, conv.kw)
        if self.tiled:
            w_shape = self.wd_shape[:2] + (nt, vec)
        if self.taps_first or self.tap_laid_out:
            w_shape = (n, self.width)
        self.w_shape = w_shape
        if self.direct:
            self.xs_shape = (conv.batch, conv.height, conv.width, halves, conv.channels // halves)
        elif self.tap_order:
            self.xs_shape = (m, self.nb, halves, vec)  # im2col rows in tap order, each step's columns split in halves
        else:
            self.xs_shape = (m, halves, self.width)

    # indexing: the GEMM row / weight row of a tile's accumulator, the operands' vectors

    def row(self, task, tb, mi):
        """GEMM row of activation row ``mi`` of the task's activation tile ``tb`` (maybe past ``m``)."""
        return ((task // self.n_chunks) * self.per_block + tb) * self.mt + mi

    def col(self, task, tt, ni):
        """Weight row ``ni`` of the task's weight tile ``tt`` (maybe past ``n``)."""
        return ((task % self.n_chunks) * self.per_chunk + tt) * self.nt + ni

    def wvec(self, wp, row, step):
        """Weight vector ``step`` of (padded) weight row ``row``."""
        if self.tiled:
            return wp[row // self.nt, step, row % self.nt, T.ramp(0, 1, self.vec)]
        return wp[T.min(row, self.n - 1), T.ramp(step * self.vec, 1, self.vec)]

    def xvec(self, xs, row, h, seg, step):
        """The activation vector of GEMM row ``row``, plane ``h``, segment ``seg``, step ``step``."""
        vec, conv = self.vec, self.conv
        if self.tap_order:
            return xs[row, step, h, T.ramp(0, 1, vec)]
        if not self.direct:
            return xs[row, h, T.ramp((seg * self.nbc + step) * vec, 1, vec)]
        oh, ow = self.oh, self.ow
        return xs[row // (oh * ow), (row // ow) % oh * self.sh + seg // conv.kw * self.dh,
                  row % ow * self.sw + seg % conv.kw * self.dw, h, T.ramp(step * vec, 1, vec)]

    def offset(self, wv):
        """int8 weights as the MAC's operand: unsigned (``w + 128``, a flip of the sign bit)
        for signed activations, int16 for the pairs."""
        if self.pairs:
            return T.Cast(f"int16x{self.vec}", wv)
        return T.bitwise_xor(wv, T.broadcast(T.int8(-128), self.vec)) if self.signed else wv

    def out_index(self, row, col):
        if self.conv is None:
            return row, col
        oh, ow = self.oh, self.ow
        return row // (oh * ow), col, (row // ow) % oh, row % ow


def _nibble(w, r, kk):
    """Code ``kk`` of packed row ``r``."""
    return T.bitwise_and(T.shift_right(w[r, kk // 2], T.Cast("uint8", kk % 2 * 4)), T.uint8(15))


def _gemm_weight_fills(g: _GemmPlan):
    """Macros ``fill(wp, w)`` writing the weights ``[n, width]`` per call where they do not
    come laid out: ``tap_order`` (the im2col's tap order), ``direct`` ((ky, kx, channel) per
    row), ``padded`` (zero columns up to the vector width)."""
    n, k, vec, width, w_bytes, w_dtype, packed, conv = g.n, g.k, g.vec, g.width, g.w_bytes, g.w_dtype, g.packed, g.conv
    segs, halves = g.segs, g.halves
    if g.tap_order:
        span = conv.kw * conv.channels  # contiguous channel-last activations per kernel row

        def tap_column(j):
            """The weight's own column of tap-order column ``j < k``."""
            return (j % conv.channels * conv.kh + j // span) * conv.kw + j // conv.channels % conv.kw

        def tap_code(w, r, j):
            """Row ``r``'s code at tap-order column ``j`` (the 0 code past ``k``)."""
            return T.if_then_else(j < k, _nibble(w, r, tap_column(T.min(j, k - 1))), T.uint8(0))

    @T.macro
    def tap_order(wp, w):
        # packed: the low nibble of byte j of a step meets column j of its first half, the
        # high nibble column j of the second
        for r, j in T.grid(n, width):
            if packed:
                wp[r, j] = T.bitwise_or(tap_code(w, r, j // vec * 2 * vec + j % vec), T.shift_left(
                    tap_code(w, r, j // vec * 2 * vec + vec + j % vec), T.uint8(4)))
            else:
                wp[r, j] = T.if_then_else(
                    j < k, w[r, T.min(j, k - 1) % conv.channels, T.min(j, k - 1) // span,
                             T.min(j, k - 1) // conv.channels % conv.kw], T.int8(0))

    @T.macro
    def direct(wp, w):
        # packed bytes pair channels 2j, 2j + 1
        for r, sg, j in T.grid(n, segs, conv.channels // halves):
            if packed:
                wp[r, sg * (conv.channels // 2) + j] = T.bitwise_or(
                    _nibble(w, r, 2 * j * segs + sg), T.shift_left(_nibble(w, r, (2 * j + 1) * segs + sg), T.uint8(4)))
            else:
                wp[r, sg * conv.channels + j] = w[r, j, sg // conv.kw, sg % conv.kw]

    @T.macro
    def padded(wp, w):
        # conv: a flat view
        for r in T.serial(n):
            for j in range(width):
                if packed or conv is None:
                    wp[r, j] = T.if_then_else(j < w_bytes, w[r, T.min(j, w_bytes - 1)], T.Cast(w_dtype, 0))
                else:
                    wp[r, j] = T.if_then_else(
                        j < k, w[r, T.min(j, k - 1) // (conv.kh * conv.kw), T.min(j, k - 1) // conv.kw % conv.kh,
                                 T.min(j, k - 1) % conv.kw], T.Cast(w_dtype, 0))

    return tap_order, direct, padded


def _gemm_activation_stages(g: _GemmPlan):
    """Macros ``stage(x, xs, xsum, bias)`` putting the activations in ``halves`` planes, one row
    per GEMM row, and (signed) summing each GEMM row into ``xsum``: ``direct`` (channel-last
    planes, the taps' sums from per-pixel channel sums), ``dense``, ``tap_order`` (the tap-order
    im2col) and ``im2col`` (the weight's column order, then the even / odd split)."""
    m, n, k, vec, width, nb, halves, conv = g.m, g.n, g.k, g.vec, g.width, g.nb, g.halves, g.conv
    signed, packed, stage_dtype, x_dtype, segs = g.signed, g.packed, g.stage_dtype, g.x_dtype, g.segs
    zero_x = T.Cast(stage_dtype, 0)
    if conv is not None:
        oh, ow, sh, sw, dh, dw = g.oh, g.ow, g.sh, g.sw, g.dh, g.dw
        span = conv.kw * conv.channels  # contiguous channel-last activations per kernel row
        cl_width = conv.width * conv.channels

    def hsum(buf, base, count):
        total = buf[base]
        for lane in range(1, count):
            total = total + buf[base + lane]
        return total

    @T.macro
    def direct(x, xs, xsum, bias):
        if signed:
            psum = T.alloc_buffer((conv.batch, conv.height, conv.width), "int32")
        else:
            psum = T.decl_buffer((n,), "int32", data=bias.data)  # not read
        for by in T.parallel(conv.batch * conv.height):
            for xx in T.serial(conv.width):
                for j in T.serial(conv.channels // halves):
                    for h in T.unroll(halves):
                        xs[by // conv.height, by % conv.height, xx, h, j] = T.Cast(stage_dtype, x[
                            by // conv.height, j * halves + h, by % conv.height, xx])
                if signed:  # channel sums per input pixel; a GEMM row sums its taps' below
                    psum[by // conv.height, by % conv.height, xx] = 0
                    for c in T.serial(conv.channels):
                        psum[by // conv.height, by % conv.height, xx] = (
                            psum[by // conv.height, by % conv.height, xx]
                            + T.Cast("int32", x[by // conv.height, c, by % conv.height, xx]))
        if signed:
            for bo in T.parallel(conv.batch * oh):
                for ox in T.serial(ow):
                    xsum[bo * ow + ox] = 0
                    for sg in T.serial(segs):
                        xsum[bo * ow + ox] = xsum[bo * ow + ox] + psum[
                            bo // oh, bo % oh * sh + sg // conv.kw * dh, ox * sw + sg % conv.kw * dw]

    @T.macro
    def dense(x, xs, xsum, bias):
        for i in T.serial(m) if m < 8 else T.parallel(m):  # a parallel launch costs more than a few rows
            for j in range(width):
                for h in T.unroll(halves):
                    if width * halves == k:
                        xs[i, h, j] = T.Cast(stage_dtype, x[i, j * halves + h])
                    else:
                        xs[i, h, j] = T.if_then_else(j * halves + h < k,
                                                     T.Cast(stage_dtype, x[i, T.min(j * halves + h, k - 1)]), zero_x)
            if signed:
                xsum[i] = 0
                for j in T.serial(k):
                    xsum[i] = xsum[i] + T.Cast("int32", x[i, j])

    @T.macro
    def tap_order(x, xs, xsum, bias):
        # activations channel-last ([image, y, (x, channel)]), then per pixel and kernel row
        # one copy of its kw * C contiguous values
        xcl = T.alloc_buffer((conv.batch, conv.height, cl_width), x_dtype)
        cols = T.decl_buffer((m, nb * halves * vec), stage_dtype, data=xs.data)
        for by in T.parallel(conv.batch * conv.height):
            for xx in T.serial(conv.width):
                for c in T.unroll(conv.channels):
                    xcl[by // conv.height, by % conv.height, xx * conv.channels + c] = x[
                        by // conv.height, c, by % conv.height, xx]
        for bo in T.parallel(conv.batch * oh):
            vsum = T.alloc_buffer((vec,), "int32", scope="local")
            for ox in T.serial(ow):
                for ky in T.unroll(conv.kh):
                    for t in T.vectorized(span):
                        cols[bo * ow + ox, ky * span + t] = T.Cast(stage_dtype, xcl[
                            bo // oh, bo % oh * sh + ky * dh, ox * sw * conv.channels + t])
                if nb * halves * vec > k:
                    for t in T.vectorized(nb * halves * vec - k):
                        cols[bo * ow + ox, k + t] = zero_x
                if signed:
                    vsum[T.ramp(0, 1, vec)] = T.broadcast(0, vec)
                    for b in T.serial(nb * halves):
                        vsum[T.ramp(0, 1, vec)] = vsum[T.ramp(0, 1, vec)] + T.Cast(
                            f"int32x{vec}", cols[bo * ow + ox, T.ramp(b * vec, 1, vec)])
                    xsum[bo * ow + ox] = hsum(vsum, 0, vec)

    @T.macro
    def im2col(x, xs, xsum, bias):
        # the weight's column order (contiguous stores), then (packed) the even / odd split as
        # a second, vectorizable pass: writing the two planes directly from the gather
        # measured 4x slower
        if packed:
            cols = T.alloc_buffer((m, width * halves), x_dtype)
        else:
            cols = T.decl_buffer((m, width), stage_dtype, data=xs.data)
        for bo in T.parallel(conv.batch * oh):
            for ox, c, ky, kx in T.grid(ow, conv.channels, conv.kh, conv.kw):
                cols[bo * ow + ox, (c * conv.kh + ky) * conv.kw + kx] = T.Cast(stage_dtype, x[
                    bo // oh, c, bo % oh * sh + ky * dh, ox * sw + kx * dw])
            if width * halves > k:
                for ox, j in T.grid(ow, width * halves - k):
                    cols[bo * ow + ox, k + j] = zero_x
            if signed:
                for ox in T.serial(ow):
                    xsum[bo * ow + ox] = 0
                    for j in T.serial(k):
                        xsum[bo * ow + ox] = xsum[bo * ow + ox] + T.Cast("int32", cols[bo * ow + ox, j])
            if packed:
                for ox, j in T.grid(ow, width):
                    for h in T.unroll(halves):
                        xs[bo * ow + ox, h, j] = cols[bo * ow + ox, j * halves + h]

    if g.direct:
        return direct
    if conv is None:
        return dense
    return tap_order if g.tap_order else im2col


def _gemm_predecode(g: _GemmPlan):
    """Macro ``predecode(wd, wp)``: the weights in the MAC's form, tile by tile and step by
    step (packed: decoded to int8 planes; int8 rows offset or widened to int16 pairs), once per
    call, for when several activation tiles meet every weight vector."""
    vec, nt, nb, n_pad, pre_rows, packed, converts, ops = g.vec, g.nt, g.nb, g.n_pad, g.pre_rows, g.packed, g.converts, g.ops

    @T.macro
    def predecode(wd, wp):
        for rc in T.parallel(g.pre_chunks):
            table0 = T.alloc_buffer((vec,), "int8", scope="local")
            if packed:
                for t in T.unroll(vec):
                    table0[t] = ops.table_byte(t)
            for rr in range(pre_rows):
                if rc * pre_rows + rr < n_pad:  # rows past n repeat the last one (not stored)
                    for b in T.serial(nb):
                        if packed:
                            wd[(rc * pre_rows + rr) // nt, b, (rc * pre_rows + rr) % nt, 0, T.ramp(0, 1, vec)] = ops.decode(
                                table0, g.wvec(wp, rc * pre_rows + rr, b), False)
                            wd[(rc * pre_rows + rr) // nt, b, (rc * pre_rows + rr) % nt, 1, T.ramp(0, 1, vec)] = ops.decode(
                                table0, g.wvec(wp, rc * pre_rows + rr, b), True)
                        elif converts:
                            wd[(rc * pre_rows + rr) // nt, b, (rc * pre_rows + rr) % nt, 0, T.ramp(0, 1, vec)] = g.offset(
                                g.wvec(wp, rc * pre_rows + rr, b))

    return predecode


def _gemm_mac_tile(g: _GemmPlan):
    """Macro ``mac_tile(acc, acc16, table, xs, wd, wp, task, tb, tt)``: one register tile's
    MACs over the whole reduction, by path: AVX2 int16 pair sums of predecoded rows
    (``sums16``), predecoded rows, packed rows decoded in registers, int8 rows."""
    m, mt, nt, lanes, halves, segs, nbc = g.m, g.mt, g.nt, g.lanes, g.halves, g.segs, g.nbc
    n_chunks, per_chunk, pre, converts, packed, ops = g.n_chunks, g.per_chunk, g.pre, g.converts, g.packed, g.ops
    mac, decode, xvec, vec, sums16, unroll_k = ops.mac, ops.decode, g.xvec, g.vec, g.sums16, g.unroll_k

    def xrow(task, tb, mi):
        return T.min(g.row(task, tb, mi), m - 1)

    def acc_at(mi, ni):
        return T.ramp((mi * nt + ni) * lanes, 1, lanes)

    def tile_operands(xs, wd, _, task, tb, tt, step, h, mi, ni):
        """Activation row ``mi`` and weight row ``ni`` of a tile, plane ``h``, step ``step`` (of all segments)."""
        return (xvec(xs, xrow(task, tb, mi), h, step // nbc, step % nbc),
                wd[(task % n_chunks) * per_chunk + tt, step, ni, h, T.ramp(0, 1, vec)])

    steps16 = _int16_steps(ops, segs * nbc, mt, nt, halves, lanes, tile_operands)

    @T.macro
    def mac_tile(acc, acc16, table, xs, wd, wp, task, tb, tt):
        if sums16:
            steps16(xs, wd, wd, acc, acc16, task, tb, tt)
        else:
            for sg in T.serial(segs):
                for b in T.unroll(nbc) if unroll_k else T.serial(nbc):
                    for ni in T.unroll(nt):
                        if pre and converts:
                            for mi in T.unroll(mt):
                                for h in T.unroll(halves):
                                    acc[acc_at(mi, ni)] = mac(
                                        acc[acc_at(mi, ni)], xvec(xs, xrow(task, tb, mi), h, sg, b),
                                        wd[(task % n_chunks) * per_chunk + tt, sg * nbc + b, ni, h, T.ramp(0, 1, vec)])
                        elif packed:
                            wv = g.wvec(wp, g.col(task, tt, ni), sg * nbc + b)
                            dlo = decode(table, wv, False)
                            dhi = decode(table, wv, True)
                            for mi in T.unroll(mt):
                                acc[acc_at(mi, ni)] = mac(mac(acc[acc_at(mi, ni)], xvec(xs, xrow(task, tb, mi), 0, sg, b),
                                                              dlo), xvec(xs, xrow(task, tb, mi), 1, sg, b), dhi)
                        else:
                            wv8 = g.offset(g.wvec(wp, g.col(task, tt, ni), sg * nbc + b))
                            for mi in T.unroll(mt):
                                acc[acc_at(mi, ni)] = mac(acc[acc_at(mi, ni)], xvec(xs, xrow(task, tb, mi), 0, sg, b),
                                                          wv8)

    return mac_tile


def _gemm_store_tile(plan: _GemmPlan):
    """Macro ``store_tile(acc, red, out, xsum, bias, scale, task, tb, tt)``: a register tile's
    outputs, ``float32(acc - w_off * xsum + bias) * scale``; four weight rows' lanes summed
    together by ``vphaddd`` where the tile has whole fours (dense: one vector store of four
    contiguous outputs), rows and columns past the end not stored."""
    m, n, mt, nt, lanes, conv, signed, w_off = plan.m, plan.n, plan.mt, plan.nt, plan.lanes, plan.conv, plan.signed, plan.w_off
    phadd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.phadd.d")
    # vector sums of four rows' accumulators at once (vphaddd) when the tile has whole fours
    quads = nt % 4 == 0
    row, col, out_index = plan.row, plan.col, plan.out_index

    def hsum(buf, base, count=lanes):
        total = buf[base]
        for lane in range(1, count):
            total = total + buf[base + lane]
        return total

    def eight(acc, base):
        """The ``lanes`` accumulator lanes at ``base`` folded to eight."""
        if lanes == 8:
            return acc[T.ramp(base, 1, 8)]
        return acc[T.ramp(base, 1, 8)] + acc[T.ramp(base + 8, 1, 8)]

    def quad_sums(acc, base):
        """Lane ``q`` plus lane ``q + 4`` is the total of accumulator ``base + q * lanes``."""
        return T.call_llvm_pure_intrin(
            phadd,
            T.call_llvm_pure_intrin(phadd, eight(acc, base), eight(acc, base + lanes), dtype="int32x8"),
            T.call_llvm_pure_intrin(phadd, eight(acc, base + 2 * lanes), eight(acc, base + 3 * lanes), dtype="int32x8"),
            dtype="int32x8")

    def result(sums, acc_total, row, col):
        """``float32(acc + bias) * scale`` for GEMM row ``row`` and weight row ``col``;
        ``sums``: (activation sums, bias, scale)."""
        xsum, bias, scale = sums
        total = acc_total - w_off * xsum[row] if signed else acc_total
        return T.Cast("float32", total + bias[col]) * scale[col]

    def result4(sums, acc_totals, row, col):
        """:func:`result` for the four weight rows from ``col`` on (int32x4 totals)."""
        xsum, bias, scale = sums
        total = acc_totals - T.broadcast(w_off * xsum[row], 4) if signed else acc_totals
        return T.Cast("float32x4", total + bias[T.ramp(col, 1, 4)]) * scale[T.ramp(col, 1, 4)]

    @T.macro
    def store_tile(acc, red, out, xsum, bias, scale, task, tb, tt):
        for mi in T.unroll(mt):
            if quads:
                for g in T.unroll(nt // 4):
                    red[T.ramp(0, 1, 8)] = quad_sums(acc, (mi * nt + 4 * g) * lanes)
                    if conv is None and row(task, tb, mi) < m and col(task, tt, 4 * g) + 4 <= n:
                        # dense: the four outputs are contiguous, one vector epilogue
                        out[row(task, tb, mi), T.ramp(col(task, tt, 4 * g), 1, 4)] = result4(
                            (xsum, bias, scale), red[T.ramp(0, 1, 4)] + red[T.ramp(4, 1, 4)], row(task, tb, mi),
                            col(task, tt, 4 * g))
                    else:
                        for q in T.unroll(4):
                            if row(task, tb, mi) < m and col(task, tt, 4 * g) + q < n:
                                out[out_index(row(task, tb, mi), col(task, tt, 4 * g) + q)] = result(
                                    (xsum, bias, scale), red[q] + red[q + 4], row(task, tb, mi),
                                    col(task, tt, 4 * g) + q)
            else:
                for ni in T.unroll(nt):
                    if row(task, tb, mi) < m and col(task, tt, ni) < n:
                        out[out_index(row(task, tb, mi), col(task, tt, ni))] = result(
                            (xsum, bias, scale), hsum(acc, (mi * nt + ni) * lanes), row(task, tb, mi),
                            col(task, tt, ni))

    return store_tile


def gemm_kernel(
    m: int, k: int, n: int, x_dtype: str, levels: Optional[Sequence[int]], isa: str, conv: Optional[ConvGeometry] = None,
    tiles=None, vec: Optional[int] = None, chunks: Optional[int] = None, unroll_k: bool = False, num_cores: int = 1,
    predecode: Optional[bool] = None, direct_conv: Optional[bool] = None, tiled: bool = False,
    taps_first: bool = False, cpu: Optional[str] = None, images=None,
) -> tvm.tirx.PrimFunc:
    """A row-group dense (``conv`` None) or conv2d (``conv``: direct or im2col, see the module
    docstring) on x86.

    ``images`` (conv of one image, ``conv.batch`` 1): a symbolic number of images (a dynamic
    batch, an int32 var): the kernel takes ``[images, C, H, W]`` and runs the one-image
    GEMM per image, the weights prepared once per call.

    ``levels``: the 16 int8 levels of a packed 4-bit scheme (weights ``[n, ceil(k/2)]`` uint8),
    or None for int8 weights (``[n, k]``, conv ``[n, C, kh, kw]``; on AVX2, where
    ``vpmaddubsw`` would saturate on 8-bit products, as int16 pairs multiplied by ``vpmaddwd``:
    half the products per instruction, for the 5% of rows that are 8-bit). Any ``k`` within the
    integer bounds (:mod:`schedules.x86_bounds`): the reduction is padded to a
    whole number of vector steps with zero weights (the 0 code is the 0 level).
    ``predecode`` / ``direct_conv`` force the choices the kernel otherwise makes from the
    shapes (rows decoded once per call; per-tap GEMMs instead of an im2col), for measuring.
    ``tiled`` (dense only): the weights come already laid out by :func:`tile_weights` with the
    kernel's ``rmsmp.weight_tiles`` attribute, so a tile's rows are one sequential stream.
    ``taps_first`` (conv): where the per-tap GEMMs apply, the weights come already reordered
    by :func:`taps_first_weights` (attribute ``rmsmp.weight_taps_first``), so the kernel does
    not reorder them per call and takes that path whatever the shapes.
    ``cpu``: the target's LLVM CPU name, for its row of :mod:`schedules.x86_tuning_table`
    (None: the ISA's default row).

    The kernel is assembled from :class:`_GemmPlan` (shapes and choices) and per-path macros:
    weight fills (:func:`_gemm_weight_fills`), activation staging
    (:func:`_gemm_activation_stages`), :func:`_gemm_predecode`, the register tile's MACs
    (:func:`_gemm_mac_tile`) and its stores (:func:`_gemm_store_tile`).
    """
    if isa not in ("avx2", "avx512vnni"):
        raise ValueError(f"gemm_kernel: unknown ISA {isa!r}")
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"gemm_kernel: activations must be uint8 or int8, got {x_dtype}")
    g = _GemmPlan(m, k, n, x_dtype, levels, isa, conv, tiles, vec, chunks, unroll_k, num_cores, predecode, direct_conv,
                  tiled, taps_first, cpu)
    fill_tap_order, fill_direct, fill_padded = _gemm_weight_fills(g)
    stage, predecode_weights = _gemm_activation_stages(g), _gemm_predecode(g)
    mac_tile, store_tile = _gemm_mac_tile(g), _gemm_store_tile(g)
    mt, nt, lanes, vec, width, w_dtype, wd_shape, wd_dtype = g.mt, g.nt, g.lanes, g.vec, g.width, g.w_dtype, g.wd_shape, g.wd_dtype
    n_chunks, per_chunk, per_block, m_tiles, n_tiles = g.n_chunks, g.per_chunk, g.per_block, g.m_tiles, g.n_tiles
    signed, packed, pre, converts, tap_order, direct = g.signed, g.packed, g.pre, g.converts, g.tap_order, g.direct
    laid_out_taps = g.taps_first or g.tap_laid_out
    per_image = images is not None
    if per_image and (conv is None or conv.batch != 1):
        raise ValueError("gemm_kernel: images needs the geometry of one image's convolution")
    x_shape = ((images,) + tuple(g.x_shape[1:])) if per_image else g.x_shape
    out_shape = ((images,) + tuple(g.out_shape[1:])) if per_image else g.out_shape
    x_size, out_size = int(np.prod(g.x_shape)), int(np.prod(g.out_shape))

    @T.macro
    def compute(x, out, xs, xsum, bias, scale, wd, wp):
        stage(x, xs, xsum, bias)
        for task in T.parallel(g.tasks):
            # local buffers in a parallel loop are heap workspaces: allocate once per task
            acc = T.alloc_buffer((mt * nt * lanes,), "int32", scope="local")
            acc16 = T.alloc_buffer((mt * nt * 16,), "int16", scope="local")
            red = T.alloc_buffer((8,), "int32", scope="local")
            table = T.alloc_buffer((vec,), "int8", scope="local")
            if packed:
                for t in T.unroll(vec):
                    table[t] = g.ops.table_byte(t)
            for tb in range(per_block):
                for tt in range(per_chunk):
                    if (task // n_chunks) * per_block + tb < m_tiles and (task % n_chunks) * per_chunk + tt < n_tiles:
                        for a in T.unroll(mt * nt * lanes):
                            acc[a] = 0
                        mac_tile(acc, acc16, table, xs, wd, wp, task, tb, tt)
                        store_tile(acc, red, out, xsum, bias, scale, task, tb, tt)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer(x_shape, x_dtype),
        w: T.Buffer(g.w_shape, w_dtype),
        bias: T.Buffer((n,), "int32"),
        scale: T.Buffer((n,), "float32"),
        out: T.Buffer(out_shape, "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        # activations in `halves` planes (packed: even / odd codes), one row per GEMM row
        # (conv: im2col or channel-last planes); signed ones also summed per GEMM row
        xs = T.alloc_buffer(g.xs_shape, g.stage_dtype)
        if signed:
            xsum = T.alloc_buffer((g.m,), "int32")
        else:
            xsum = T.decl_buffer((n,), "int32", data=bias.data)  # not read
        if laid_out_taps:  # reordered at compile time
            wp = T.decl_buffer((n, width), w_dtype, data=w.data)
        elif tap_order:  # weights reordered to the im2col's tap order
            wp = T.alloc_buffer((n, width), w_dtype)
            fill_tap_order(wp, w)
        elif direct:  # weights reordered to (ky, kx, channel) per row
            wp = T.alloc_buffer((n, width), w_dtype)
            fill_direct(wp, w)
        elif g.pad_w and not g.tiled:  # weights staged once per call: zero columns up to the vector width
            wp = T.alloc_buffer((n, width), w_dtype)
            fill_padded(wp, w)
        elif g.tiled:  # laid out (and zero-padded) at compile time
            wp = T.decl_buffer(g.w_shape, w_dtype, data=w.data)
        else:
            wp = T.decl_buffer((n, width), w_dtype, data=w.data)
        stage(x, xs, xsum, bias)
        if pre:
            if converts:
                wd = T.alloc_buffer(wd_shape, wd_dtype)
            else:  # unsigned activations meet int8 rows as they are
                wd = T.decl_buffer(wd_shape, wd_dtype, data=wp.data)  # not read
            predecode_weights(wd, wp)
        else:
            wd = T.decl_buffer(wd_shape, wd_dtype, data=wp.data)  # not read
        if per_image:
            for image in T.serial(images):
                xi = T.decl_buffer(g.x_shape, x_dtype, data=x.data, elem_offset=image * x_size)
                oi = T.decl_buffer(g.out_shape, "float32", data=out.data, elem_offset=image * out_size)
                compute(xi, oi, xs, xsum, bias, scale, wd, wp)
        else:
            compute(x, out, xs, xsum, bias, scale, wd, wp)

    if tiled:
        kernel = kernel.with_attr(contract.WEIGHT_TILES, [nt, vec])
    if g.taps_first:
        kernel = kernel.with_attr(contract.WEIGHT_TAPS_FIRST, [conv.channels, conv.kh, conv.kw])
    if g.tap_laid_out:
        kernel = kernel.with_attr(contract.WEIGHT_TAP_ORDER, [conv.channels, conv.kh, conv.kw, vec])
    return kernel


#: AVX2 byte MACs (4-bit levels): ``vpmaddubsw`` pair sums that add up in int16 before one
#: ``vpmaddwd`` widens them. A pair sum is within ``2 * 255 * [-8, 8]`` (unsigned activations)
#: or ``2 * [-128, 127] * [0, 16]`` (signed ones, offset levels), so eight stay within int16
#: (the signed ones reach exactly -32768): checked here for the level bound, and per kernel for
#: its levels (:mod:`schedules.x86_bounds`).
PAIR_SUMS16 = 8
check_pair_sums16(PAIR_SUMS16)


def _check_bounds(kernel: str, k: int, x_dtype: str, levels: Optional[Sequence[int]], isa: str, w_off: int,
                  pairs: bool, sums16: bool) -> None:
    """:func:`~schedules.x86_bounds.check_accumulators` for a byte-MAC kernel: activations
    ``x_dtype`` (the signed MAC operand when ``w_off``, the weights then offset by it), weights
    the 4-bit ``levels`` or int8 rows (None); AVX2 byte MACs sum pairs in int16 (``sums16``:
    :data:`PAIR_SUMS16` of them), int8 rows on AVX2 are int16 pairs (``pairs``, ``vpmaddwd``)."""
    x, w = activation_range(x_dtype), operand_range(levels, w_off)
    int16_pairs = (PAIR_SUMS16 if sums16 else 1) if isa == "avx2" and not pairs else 0
    check_accumulators(kernel, k, x, w, describe(x_dtype, levels, x, w), offset=w_off, int16_pairs=int16_pairs,
                       wide_pairs=pairs)


def _int16_steps(ops: "_VectorOps", steps: int, rows: int, cols: int, halves: int, lanes: int, operands):
    """Macro ``steps16(a, b, c, acc, acc16, task, tb, tt)`` (AVX2 byte MACs): over ``steps``
    steps, every plane ``h`` and every accumulator ``(i, j)`` of a ``rows x cols`` register
    tile, the pair sums of ``operands(a, b, c, task, tb, tt, step, h, i, j)`` (an activation
    and a weight vector, 32 bytes each) added up in ``acc16`` (int16, :data:`PAIR_SUMS16` per
    lane at most), widened into ``acc`` (``lanes`` int32 each) once per group of steps."""
    group = PAIR_SUMS16 // halves
    full, rest = divmod(steps, group)

    @T.macro
    def block(a, b, c, acc, acc16, task, tb, tt, first, count):
        for t in T.unroll(rows * cols):
            acc16[T.ramp(t * 16, 1, 16)] = T.broadcast(T.int16(0), 16)
        for st in T.unroll(count):
            for h in T.unroll(halves):
                for i in T.unroll(rows):
                    for j in T.unroll(cols):
                        acc16[T.ramp((i * cols + j) * 16, 1, 16)] = acc16[T.ramp((i * cols + j) * 16, 1, 16)] + \
                            ops.pair_sums(*operands(a, b, c, task, tb, tt, first + st, h, i, j))
        for t in T.unroll(rows * cols):
            acc[T.ramp(t * lanes, 1, lanes)] = acc[T.ramp(t * lanes, 1, lanes)] + ops.widen(acc16[T.ramp(t * 16, 1, 16)])

    @T.macro
    def steps16(a, b, c, acc, acc16, task, tb, tt):
        for g in T.serial(full):
            block(a, b, c, acc, acc16, task, tb, tt, g * group, group)
        if rest > 0:
            block(a, b, c, acc, acc16, task, tb, tt, full * group, rest)

    return steps16


def _broadcast_tiles(isa: str) -> Tuple[int, int]:
    """(activation rows, 8-row weight vectors) per register tile: 24 accumulators of 32
    registers on AVX-512 (8 x 3 measured best of 4x6, 6x4, 12x2, 5x5, 3x8 at 128 x 768 x 1843),
    8 of 16 on AVX2 (4 x 2 of 2x4, 3x3, 6x1)."""
    return (8, 3) if isa == "avx512vnni" else (4, 2)


#: Fewest activation rows for which :func:`broadcast_dense_kernel` beats :func:`gemm_kernel`
#: (1.05x at 8 rows, 1.13x at 64, 1.10x at 128; 1 x 768 x 1843 SP2 rows, one thread): the
#: default rows' ``broadcast_min_rows`` (:mod:`schedules.x86_tuning_table`; a target's own row
#: through :func:`~schedules.x86_tuning_table.x86_constants`).
BROADCAST_MIN_ROWS = X86_CONSTANTS["default-avx512vnni"]["broadcast_min_rows"]
assert BROADCAST_MIN_ROWS == X86_CONSTANTS["default-avx2"]["broadcast_min_rows"]


class _OuterProductGemm:
    """What the outer-product kernels share: the activation planes and the register-tiled MAC
    loop with its epilogue, as TVMScript macros; the kernels differ in how they prepare a
    chunk of weights (``[tile, step, plane, rows * 4]`` int8, the MAC's operand as it is).
    Register tiles past the last 8-row block of weights read it again; they are never stored."""

    def __init__(self, m: int, k: int, n: int, x_dtype: str, isa: str, halves: int, w_bytes: int, ops: _VectorOps,
                 tiles, num_cores: int, pairs: bool = False, cpu: Optional[str] = None, wide: bool = False,
                 laid_out: bool = False):
        self.m, self.k, self.n, self.x_dtype, self.halves, self.pairs = m, k, n, x_dtype, halves, pairs
        # laid_out: ``w0`` holds every register tile as ``prepare`` would write it
        # (``[n_tiles, steps, halves, rows * 4]``, :func:`layer_int8_weights`), read in place
        self.laid_out = laid_out
        # wide: the MACs on 512-bit vectors, two adjacent 8-row vectors of a prepared chunk at once
        # (they are contiguous there); twice the products per vpdpbusd of the 256-bit form
        self.wide = wide
        # pairs: int8 rows on AVX2 as int16 pairs (vpmaddwd): exact without offsets or sums
        self.signed = x_dtype == "int8" and not pairs
        self.stage_dtype = "int16" if pairs else x_dtype
        per_step = 2 if pairs else 4  # elements of every plane per step (one 32-bit word)
        self.steps = -(-w_bytes // per_step)
        self.width = self.steps * per_step
        self.blocks8 = -(-n // 8)  # 8-row blocks of the outputs
        mt, self.ntv = tiles or _broadcast_tiles(isa)
        # m: a number of rows, or a symbolic one (a dynamic batch; rows past it are never stored)
        self.static = isinstance(m, int)
        self.mt = min(mt, m) if self.static else mt
        self.rows = self.ntv * 8  # weight rows per register tile
        self.m_tiles, self.n_tiles = _ceil_div(m, self.mt), -(-n // self.rows)
        cores = max(1, num_cores)
        # a chunk of weight tiles (bytes of prepared weights: ``l2_chunk_bytes`` of the CPU's
        # constants) stays in L2 while the activation tiles pass over it
        l2_chunk = constants_for(isa, cpu)["l2_chunk_bytes"]
        self.per_chunk = max(1, min((self.n_tiles + 1) // 2, l2_chunk // (self.rows * self.steps * 4 * halves)))
        self.n_chunks = -(-self.n_tiles // self.per_chunk)
        blocks = -(-4 * cores // self.n_chunks)
        if self.static:
            m_blocks = max(1, min(self.m_tiles, blocks))
            self.per_block = _ceil_div(self.m_tiles, m_blocks)
        else:  # the same value, divided by a constant (the MAC loop's indices use it)
            self.per_block = _ceil_div(self.m_tiles, blocks)
        self.tasks = _ceil_div(self.m_tiles, self.per_block) * self.n_chunks
        self.ops = ops
        if wide:
            if isa != "avx512vnni" or pairs or self.ntv % 2:
                raise ValueError(f"512-bit MACs need AVX-512 VNNI bytes and an even number of 8-row vectors per "
                                 f"register tile, got {isa}, pairs={pairs}, tiles {(mt, self.ntv)}")
            self.ops_wide = _VectorOps(isa, 64, ops.signed, None, w_off=ops.w_off)

    def stage(self):
        """Macro ``stage(x, xs, xsum)``: the activations split into ``halves`` planes (packed
        rows: even / odd codes), zero-padded to whole steps; signed ones summed per row."""
        m, k, halves, width, signed = self.m, self.k, self.halves, self.width, self.signed
        dtype = self.stage_dtype

        few = self.static and m < 8  # a parallel launch costs more than a few rows

        @T.macro
        def stage(x, xs, xsum):
            for i in T.serial(m) if few else T.parallel(m):
                for j in range(width):
                    for h in T.unroll(halves):
                        if width * halves == k:
                            xs[i, h, j] = T.Cast(dtype, x[i, j * halves + h])
                        else:
                            xs[i, h, j] = T.if_then_else(j * halves + h < k, T.Cast(dtype, x[i, T.min(j * halves + h, k - 1)]),
                                                         T.Cast(dtype, 0))
                if signed:
                    xsum[i] = 0
                    for j in T.serial(k):
                        xsum[i] = xsum[i] + T.Cast("int32", x[i, j])

        return stage

    def multiply(self, prepare):
        """Macro ``multiply(xs4, xsum, bias, scale, out, w0, w1, w2, w3)``: every register
        tile's MACs and epilogue. ``prepare(wc, first_tile, w0, w1, w2, w3)`` is a macro that
        writes the int8 weights of ``per_chunk`` register tiles from ``first_tile`` on into
        ``wc`` (``[tile, step, plane, rows * 4]``) from the kernel's weight buffers ``w0..w3``;
        each task prepares its own chunk right before its MACs, so the chunk is still in L2
        when they read it (decoding the whole layer first, 2.4 MB at 768 x 3072, left it in L3:
        7% of that GEMM). None: ``w0`` (``[blocks8, steps, 32]``) is read as it is."""
        m, mt, ntv, halves = self.m, self.mt, self.ntv, self.halves
        steps, m_tiles, n_tiles, blocks8 = self.steps, self.m_tiles, self.n_tiles, self.blocks8
        per_chunk, per_block, n_chunks, tasks = self.per_chunk, self.per_block, self.n_chunks, self.tasks

        def mac(acc, word, wv):
            """``acc`` plus the products of an activation word (broadcast) and a weight vector."""
            if not self.pairs:
                return self.ops.mac(acc, T.reinterpret(word, dtype="int8x32"), wv)
            return self.ops.mac(acc, T.reinterpret(word, dtype="int16x16"), T.reinterpret(wv, dtype="int16x16"))
        chunk_shape = (per_chunk, steps, halves, self.rows * 4)
        laid_out, tile_bytes = self.laid_out, steps * halves * self.rows * 4

        def weights(wc, w0, task, tt, step, h, v):
            """The 8-row weight vector ``v`` of the task's register tile ``tt``, plane ``h``."""
            if prepare is not None or laid_out:
                return wc[tt, step, h, T.ramp(v * 32, 1, 32)]
            return w0[T.min(((task % n_chunks) * per_chunk + tt) * ntv + v, blocks8 - 1), step, T.ramp(0, 1, 32)]

        def x_row(task, tb, mi):
            """The activation row of row ``mi`` of the task's tile ``tb`` (rows past the end read the last)."""
            return T.min(((task // n_chunks) * per_block + tb) * mt + mi, m - 1)

        def x_word(xs4, task, tb, mi, h, b):
            """Activation row ``mi`` of the tile: its four bytes of step ``b``, plane ``h``, broadcast."""
            return T.broadcast(xs4[x_row(task, tb, mi), h, b], 8)

        wide = self.wide

        def mac_wide(acc, word, wv):
            """512 bits: ``acc`` (16 rows) plus an activation word (broadcast) times 16 rows' four bytes."""
            return self.ops_wide.mac(acc, T.reinterpret(T.broadcast(word, 16), dtype="int8x64"), wv)

        # AVX2 byte MACs: pair sums added in 16 bits over several steps of every plane, then
        # widened once (vpmaddwd per MAC would be two multiplies per 32 products; see PAIR_SUMS16)
        sums16 = self.ops.isa == "avx2" and not self.pairs

        def tile_operands(xs4, wc, w0, task, tb, tt, step, h, mi, v):
            return (T.reinterpret(x_word(xs4, task, tb, mi, h, step), dtype="int8x32"), weights(wc, w0, task, tt, step, h, v))

        steps16 = _int16_steps(self.ops, steps, mt, ntv, halves, 8, tile_operands)
        store_tile = self.store()

        @T.macro
        def multiply(xs4, xsum, bias, scale, out, w0, w1, w2, w3):
            for task in T.parallel(tasks):
                # buffers in a parallel loop are heap workspaces: allocated once per task
                acc = T.alloc_buffer((mt * ntv * 8,), "int32", scope="local")
                acc16 = T.alloc_buffer((mt * ntv * 16,), "int16", scope="local")
                if prepare is not None:
                    wc = T.alloc_buffer(chunk_shape, "int8")
                    prepare(wc, (task % n_chunks) * per_chunk, w0, w1, w2, w3)
                elif laid_out:  # the task's chunk of the weights as laid out at compile time
                    wc = T.decl_buffer(chunk_shape, "int8", data=w0.data,
                                       elem_offset=(task % n_chunks) * (per_chunk * tile_bytes))
                else:
                    wc = T.decl_buffer(chunk_shape, "int8", data=w0.data)  # not read
                for tb in range(per_block):
                    for tt in range(per_chunk):
                        if (task // n_chunks) * per_block + tb < m_tiles and (task % n_chunks) * per_chunk + tt < n_tiles:
                            for a in T.unroll(mt * ntv * 8):
                                acc[a] = 0
                            if sums16:
                                steps16(xs4, wc, w0, acc, acc16, task, tb, tt)
                            else:
                                for b in T.serial(steps):
                                    for h in T.unroll(halves):
                                        for mi in T.unroll(mt):
                                            if wide:
                                                for v2 in T.unroll(ntv // 2):
                                                    acc[T.ramp((mi * ntv + 2 * v2) * 8, 1, 16)] = mac_wide(
                                                        acc[T.ramp((mi * ntv + 2 * v2) * 8, 1, 16)],
                                                        xs4[x_row(task, tb, mi), h, b], wc[tt, b, h, T.ramp(v2 * 64, 1, 64)])
                                            else:
                                                for v in T.unroll(ntv):
                                                    acc[T.ramp((mi * ntv + v) * 8, 1, 8)] = mac(
                                                        acc[T.ramp((mi * ntv + v) * 8, 1, 8)], x_word(xs4, task, tb, mi, h, b),
                                                        weights(wc, w0, task, tt, b, h, v))
                            store_tile(acc, xsum, bias, scale, out, task, tb, tt)

        return multiply

    def store(self):
        """Macro ``store_tile(acc, xsum, bias, scale, out, task, tb, tt)``: a register tile's
        outputs, ``float32(acc - w_off * xsum + bias) * scale``, eight per vector store; the
        last rows one by one, rows and columns past the end not stored."""
        m, n, mt, ntv, rows = self.m, self.n, self.mt, self.ntv, self.rows
        per_chunk, per_block, n_chunks = self.per_chunk, self.per_block, self.n_chunks
        signed, w_off = self.signed, self.ops.w_off

        def row(task, tb, mi):
            """GEMM row of activation row ``mi`` of the task's activation tile ``tb``."""
            return ((task // n_chunks) * per_block + tb) * mt + mi

        def col(task, tt, v):
            """First output of the 8-row weight vector ``v`` of the task's register tile ``tt``."""
            return ((task % n_chunks) * per_chunk + tt) * rows + v * 8

        def offset_sum(acc, xsum, row, lanes=8):
            """The integer sums of ``row``'s products with the weights as stored (``acc`` less
            the offset's share, see :class:`_VectorOps`)."""
            if not signed:
                return acc
            return acc - (T.broadcast(w_off * xsum[row], lanes) if lanes > 1 else w_off * xsum[row])

        def epilogue(acc, xsum, bias, scale, row, col):
            """``float32(acc + bias) * scale`` of eight int32 sums, outputs ``col`` on of ``row``."""
            return T.Cast("float32x8", offset_sum(acc, xsum, row) + bias[T.ramp(col, 1, 8)]) * scale[T.ramp(col, 1, 8)]

        @T.macro
        def store_tile(acc, xsum, bias, scale, out, task, tb, tt):
            for mi, v in T.grid(mt, ntv):
                if row(task, tb, mi) < m:
                    if col(task, tt, v) + 8 <= n:
                        out[row(task, tb, mi), T.ramp(col(task, tt, v), 1, 8)] = epilogue(
                            acc[T.ramp((mi * ntv + v) * 8, 1, 8)], xsum, bias, scale, row(task, tb, mi), col(task, tt, v))
                    else:  # the last rows
                        for q in T.serial(8):
                            if col(task, tt, v) + q < n:
                                out[row(task, tb, mi), col(task, tt, v) + q] = T.Cast(
                                    "float32", offset_sum(acc[(mi * ntv + v) * 8 + q], xsum, row(task, tb, mi), 1)
                                    + bias[col(task, tt, v) + q]) * scale[col(task, tt, v) + q]

        return store_tile

    def gemm(self, prepare):
        """Macro ``gemm(x, bias, scale, out, w0, w1, w2, w3)``: the activations staged, then
        :meth:`multiply` with ``prepare`` over the weight buffers ``w0..w3``."""
        m, n, halves, width, steps, signed = self.m, self.n, self.halves, self.width, self.steps, self.signed
        dtype, stage, multiply = self.stage_dtype, self.stage(), self.multiply(prepare)

        @T.macro
        def gemm(x, bias, scale, out, w0, w1, w2, w3):
            xs = T.alloc_buffer((m, halves, width), dtype)
            xs4 = T.decl_buffer((m, halves, steps), "int32", data=xs.data)  # a step's activations as one word
            if signed:
                xsum = T.alloc_buffer((m,), "int32")
            else:
                xsum = T.decl_buffer((n,), "int32", data=bias.data)  # not read
            stage(x, xs, xsum)
            multiply(xs4, xsum, bias, scale, out, w0, w1, w2, w3)

        return gemm


def _ceil_div(a, b):
    """``ceil(a / b)`` of positive ints, or of (symbolic) TIR expressions."""
    if isinstance(a, int) and isinstance(b, int):
        return -(-a // b)
    return tvm.tirx.floordiv(a + b - 1, b)


def _check_outer_product(who: str, isa: str, x_dtype: str) -> None:
    if isa not in ("avx2", "avx512vnni"):
        raise ValueError(f"{who}: unknown ISA {isa!r}")
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"{who}: activations must be uint8 or int8, got {x_dtype}")


def broadcast_dense_kernel(
    m: int, k: int, n: int, x_dtype: str, levels: Optional[Sequence[int]], isa: str, tiles=None, num_cores: int = 1,
    cpu: Optional[str] = None,
) -> tvm.tirx.PrimFunc:
    """A row-group dense for many activation rows, as outer products: each MAC multiplies one
    activation's four bytes, broadcast, by the same four bytes of eight weight rows, so an
    accumulator holds eight outputs of one activation row and the epilogue is one vector
    conversion per eight outputs (:func:`gemm_kernel`'s accumulators each hold one output and
    are summed across lanes per tile: 10% of a 128 x 768 x 1843 GEMM, 2% at K = 3072).

    The weights come laid out by :func:`tile_weights` with 8 rows and 4 bytes per step
    (attribute ``rmsmp.weight_tiles`` = ``[8, 4]``): ``[n / 8, bytes / 4, 8, 4]``, zero-padded.
    Per call, packed rows are decoded to int8 (int8 rows meeting signed activations offset)
    into ``[tile, step, plane, rows * 4]``, so that a register tile's weights for one step are
    contiguous; the activations are split into even / odd planes as in :func:`gemm_kernel`.
    Same signature and results as :func:`gemm_kernel` with ``tiled`` weights, on AVX2 and VNNI;
    int8 rows on AVX2 (where ``vpmaddubsw`` would saturate) are multiplied as int16 pairs
    (``vpmaddwd``, exact), laid out 8 rows x 2 bytes per step (``rmsmp.weight_tiles`` =
    ``[8, 2]``): 3x the portable schedule they had (128 x 768 x 154: 196 us).
    """
    _check_outer_product("broadcast_dense_kernel", isa, x_dtype)
    packed = levels is not None
    pairs = not packed and isa != "avx512vnni"  # int8 rows on AVX2: int16 pairs (vpmaddubsw would saturate)
    signed = x_dtype == "int8" and not pairs
    halves = 2 if packed else 1
    ops = _VectorOps(isa, 16 if pairs else 32, signed, levels, pairs=pairs)  # pairs: 16 int16 per vector
    _check_bounds("broadcast_dense_kernel", k, x_dtype, levels, isa, ops.w_off, pairs, isa == "avx2" and not pairs)
    g = _OuterProductGemm(m, k, n, x_dtype, isa, halves, (k + 1) // 2 if packed else k, ops, tiles, num_cores,
                          pairs=pairs, cpu=cpu)
    steps, blocks8, ntv, per_chunk, n_tiles = g.steps, g.blocks8, g.ntv, g.per_chunk, g.n_tiles
    w_dtype = "uint8" if packed else "int8"
    step_bytes = 16 if pairs else 32  # an 8-row block's stored bytes per step

    @T.macro
    def prepare(wc, first_tile, wp, w1, w2, w3):
        """Packed rows decoded to int8 (offset for signed activations); int8 rows offset."""
        table = T.alloc_buffer((32,), "int8", scope="local")
        if packed:
            for t in T.unroll(32):
                table[t] = ops.table_byte(t)
        for tt, v in T.grid(per_chunk, ntv):
            if first_tile + tt < n_tiles:
                for b in T.serial(steps):
                    if packed:
                        wc[tt, b, 0, T.ramp(v * 32, 1, 32)] = ops.decode(
                            table, wp[T.min((first_tile + tt) * ntv + v, blocks8 - 1), b, T.ramp(0, 1, 32)], False)
                        wc[tt, b, 1, T.ramp(v * 32, 1, 32)] = ops.decode(
                            table, wp[T.min((first_tile + tt) * ntv + v, blocks8 - 1), b, T.ramp(0, 1, 32)], True)
                    elif pairs:  # two int8 weights of a row, sign-extended to one int16 pair
                        wc[tt, b, 0, T.ramp(v * 32, 1, 32)] = T.reinterpret(T.Cast(
                            "int16x16", wp[T.min((first_tile + tt) * ntv + v, blocks8 - 1), b, T.ramp(0, 1, 16)]),
                            dtype="int8x32")
                    else:
                        wc[tt, b, 0, T.ramp(v * 32, 1, 32)] = T.bitwise_xor(
                            wp[T.min((first_tile + tt) * ntv + v, blocks8 - 1), b, T.ramp(0, 1, 32)],
                            T.broadcast(T.int8(-128), 32))

    # unsigned activations meet int8 rows as they are laid out (VNNI)
    gemm = g.gemm(prepare if packed or signed or pairs else None)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((m, k), x_dtype),
        w: T.Buffer((blocks8, steps, 8, step_bytes // 8), w_dtype),
        bias: T.Buffer((n,), "int32"),
        scale: T.Buffer((n,), "float32"),
        out: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        wp = T.decl_buffer((blocks8, steps, step_bytes), w_dtype, data=w.data)
        gemm(x, bias, scale, out, wp, wp, wp, wp)

    return kernel.with_attr(contract.WEIGHT_TILES, [8, step_bytes // 8])


#: Register tile of :func:`layer_dense_kernel`'s 512-bit MACs: 8 activation rows x 6 8-row
#: vectors (3 zmm accumulators per row, 24 of 32 registers, as the 256-bit form's 8 x 3)
WIDE_TILES = (8, 6)


def layer_dense_kernel(
    m: int, k: int, n: int, x_dtype: str, table_levels: Sequence[Sequence[int]], n_int8: int, tiles=None,
    num_cores: int = 1, vbmi: bool = False, cpu: Optional[str] = None, wide: bool = True,
) -> tvm.tirx.PrimFunc:
    """A whole quantized dense layer on AVX-512 VNNI, every row group in one outer-product GEMM
    whose outputs come in the order the graph wants them (the model's row order, or the order
    the next layer's weights were permuted to): no concatenation of row groups and no gather.

    ``(x [m, k], codes [n / 8, steps, 8, 4] uint8, kinds [n / 8, 32] uint8, w8 [max(n_int8, 1),
    steps, 2, 4] int8, cols8 [max(n_int8, 1)] int32, bias [n] int32, scale [n] f32, out [m, n] f32)``,
    made at compile time by :func:`layer_weights`: the 4-bit rows' codes in output order (two
    per byte, 8-row x 4-byte tiles), with each output row's table (``kinds``: 0 the first of
    ``table_levels``, 255 the second, byte-wise over its four bytes); the ``n_int8`` 8-bit rows
    split into the even / odd planes, and their output rows. Per call the codes are decoded by
    both tables and blended by ``kinds``, the 8-bit rows written over their slots: the weights
    are then one int8 matrix, offset by 128 for signed activations (VNNI sums in int32, so
    4-bit levels + 128 need no pair bound). ``vbmi`` (AVX-512 VBMI): both tables in one 32-byte
    ``vpermb`` lookup indexed by the code and the row's kind, 5 vector operations per 32 bytes
    instead of 12 (two shuffles per table and a blend): 8 x 768 x 3072 166 -> 160 us, under 1%
    at 128 rows, where streaming the packed rows in, not decoding them, is most of the cost.
    ``wide``: the MACs on 512-bit vectors (``WIDE_TILES`` unless ``tiles`` says), 16 rows per
    ``vpdpbusd``: on a CPU with two 512-bit MAC ports twice the products per cycle of the
    256-bit form (``python -m bench.layer_kernels --rows 32 128 --cpu-time`` times both).
    """
    _check_outer_product("layer_dense_kernel", "avx512vnni", x_dtype)
    if wide and tiles is None:
        tiles = WIDE_TILES
    if len(table_levels) not in (1, 2):
        raise ValueError(f"layer_dense_kernel: one or two 4-bit decode tables, got {len(table_levels)}")
    signed = x_dtype == "int8"
    w_off = 128 if signed else 0
    tables = [_VectorOps("avx512vnni", 32, signed, levels, w_off=w_off) for levels in table_levels]
    layer_dense_bounds(k, x_dtype, table_levels, n_int8)
    table_a, table_b = tables[0], tables[-1]
    g = _OuterProductGemm(m, k, n, x_dtype, "avx512vnni", 2, (k + 1) // 2, table_a, tiles, num_cores, cpu=cpu,
                          wide=wide)
    steps, blocks8, ntv, rows, per_chunk, n_tiles = g.steps, g.blocks8, g.ntv, g.rows, g.per_chunk, g.n_tiles
    rows8 = max(n_int8, 1)

    def decode(ta, tb, wp, kinds, block, step, high):
        """The int8 (offset) levels of an 8-row block's low or high nibbles: each byte from
        the table its row uses (``ta`` holds both tables when ``vbmi``)."""
        codes = wp[block, step, T.ramp(0, 1, 32)]
        if vbmi:  # index: the code, plus 16 for the second table (vpermb reads 5 bits)
            nibbles = T.shift_right(codes, T.broadcast(T.uint8(4), 32)) if high else codes
            index = T.bitwise_or(T.bitwise_and(nibbles, T.broadcast(T.uint8(15), 32)),
                                 T.bitwise_and(kinds[block, T.ramp(0, 1, 32)], T.broadcast(T.uint8(16), 32)))
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.permvar.qi.256"),
                                           ta[T.ramp(0, 1, 32)], T.reinterpret(index, dtype="int8x32"),
                                           dtype="int8x32")
        mask = T.reinterpret(kinds[block, T.ramp(0, 1, 32)], dtype="int8x32")
        a = table_a.decode(ta, codes, high)
        b = table_b.decode(tb, codes, high)
        return T.bitwise_or(T.bitwise_and(a, T.bitwise_not(mask)), T.bitwise_and(b, mask))

    @T.macro
    def prepare(wc, first_tile, wp, kinds, w8, cols8):
        """The chunk's 4-bit rows decoded by their tables, then its 8-bit rows over their slots."""
        ta = T.alloc_buffer((32,), "int8", scope="local")
        tb = T.alloc_buffer((32,), "int8", scope="local")
        for t in T.unroll(32):
            if vbmi:  # 16 entries of each table
                ta[t] = T.Select(t < 16, table_a.table_byte(t), table_b.table_byte(t))
            else:
                ta[t] = table_a.table_byte(t)
            tb[t] = table_b.table_byte(t)
        for tt, v in T.grid(per_chunk, ntv):
            if first_tile + tt < n_tiles:
                for b in T.serial(steps):
                    wc[tt, b, 0, T.ramp(v * 32, 1, 32)] = decode(
                        ta, tb, wp, kinds, T.min((first_tile + tt) * ntv + v, blocks8 - 1), b, False)
                    wc[tt, b, 1, T.ramp(v * 32, 1, 32)] = decode(
                        ta, tb, wp, kinds, T.min((first_tile + tt) * ntv + v, blocks8 - 1), b, True)
        for r in T.serial(n_int8):
            if first_tile * rows <= cols8[r] and cols8[r] < (first_tile + per_chunk) * rows:
                for b, h in T.grid(steps, 2):
                    wc[cols8[r] // rows - first_tile, b, h, T.ramp(cols8[r] % rows * 4, 1, 4)] = (
                        T.bitwise_xor(w8[r, b, h, T.ramp(0, 1, 4)], T.broadcast(T.int8(-128), 4)) if signed
                        else w8[r, b, h, T.ramp(0, 1, 4)])

    gemm = g.gemm(prepare)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((m, k), x_dtype),
        codes: T.Buffer((blocks8, steps, 8, 4), "uint8"),
        kinds: T.Buffer((blocks8, 32), "uint8"),
        w8: T.Buffer((rows8, steps, 2, 4), "int8"),
        cols8: T.Buffer((rows8,), "int32"),
        bias: T.Buffer((n,), "int32"),
        scale: T.Buffer((n,), "float32"),
        out: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        wp = T.decl_buffer((blocks8, steps, 32), "uint8", data=codes.data)
        gemm(x, bias, scale, out, wp, kinds, w8, cols8)

    return kernel


def layer_dense_bounds(k: int, x_dtype: str, table_levels: Sequence[Sequence[int]], n_int8: int) -> None:
    """Refuse (:class:`~schedules.x86_bounds.KernelBoundError`) a :func:`layer_dense_kernel`
    whose int32 sums could overflow: one int8 matrix of every table's levels and the int8 rows,
    all offset by 128 for signed activations (``vpdpbusd``)."""
    w_off = 128 if x_dtype == "int8" else 0
    four = [int(v) for lv in table_levels for v in lv] or [0]
    x, w = activation_range(x_dtype), operand_range(four + ([-128, 127] if n_int8 else []), w_off)
    what = (f"{x_dtype} activations x 4-bit levels {min(four)}..{max(four)}"
            f"{' and int8 rows -128..127' if n_int8 else ''} (MAC operands {list(x)} x {list(w)})")
    check_accumulators("layer_dense_kernel", k, x, w, what, offset=w_off)


def layer_int8_kernel(m: int, k: int, n: int, x_dtype: str, tiles=None, num_cores: int = 1,
                      cpu: Optional[str] = None) -> tvm.tirx.PrimFunc:
    """A whole dense layer on AVX-512 VNNI from int8 weights decoded at compile time: the MAC
    loop of :func:`layer_dense_kernel` (512-bit ``vpdpbusd``, ``WIDE_TILES``), its weights read
    in place, as laid out by :func:`layer_int8_weights` (offset by 128 for signed activations),
    so the per-call decode of the packed rows and the copy of the int8 rows over them are gone
    (15% of a 128 x 3072 x 768 call, one thread, by ``perf record``; the MAC loop is then 93%
    of the time, at about 387 GMAC/s, where the same loop written in assembly over L1-resident
    data reaches 400 and ``vpdpbusd`` alone 470 on that Xeon). The price, as on AMX: one byte
    per weight in memory where a packed 4-bit row takes half. Static row counts only.

    ``(x [m, k], w [tiles, k / 4, 1, 4 * rows] int8, bias [n] int32, scale [n] f32, out [m, n] f32)``:
    ``out = float32(x @ w.T + bias) * scale``, any int8 weights within the int32 bound."""
    _check_outer_product("layer_int8_kernel", "avx512vnni", x_dtype)
    if not isinstance(m, int):
        raise ValueError(f"layer_int8_kernel: a static number of rows, got {m}")
    signed = x_dtype == "int8"
    ops = _VectorOps("avx512vnni", 32, signed, None, w_off=128 if signed else 0)
    layer_dense_bounds(k, x_dtype, [], 1)
    g = _OuterProductGemm(m, k, n, x_dtype, "avx512vnni", 1, k, ops, tiles or WIDE_TILES, num_cores, cpu=cpu,
                          wide=True, laid_out=True)
    gemm = g.gemm(None)
    shape = (g.n_tiles, g.steps, 1, g.rows * 4)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), x_dtype), w: T.Buffer(shape, "int8"), bias: T.Buffer((n,), "int32"),
               scale: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        gemm(x, bias, scale, out, w, w, w, w)

    return kernel


#: Register tile of :func:`layer_avx2_kernel`'s byte MACs: 2 activation rows x 2 8-row vectors.
#: LLVM spills the int16 sums of larger tiles. Both BERT FFN layers at 128 rows (60:35:5), on the
#: AMX Xeon with AVX-512 hidden from CPUID (``bench/cpuid_mask.py``), ``python -m
#: bench.layer_kernels --avx2-tiles 2x2 4x2 4x1 3x2 2x3 2x1 --rows 128 --cpu-time``: one thread
#: 4832, 5518, 4915, 4917, 5044, 5574 us; ``--threads 2`` (2x2 4x2 4x1): 2467, 2864, 2553 us.
LAYER_AVX2_TILES = (2, 2)


def layer_avx2_kernel(m: int, k: int, n: int, x_dtype: str, levels: Sequence[int], n_int8: int, tiles=None,
                      num_cores: int = 1, cpu: Optional[str] = None) -> tvm.tirx.PrimFunc:
    """A whole quantized dense layer on AVX2 for a static number of activation rows, from weights
    decoded at compile time (:func:`layer_avx2_weights`): outputs in the order the graph wants
    them, no per-call decode, no concatenation of row groups.

    The 4-bit rows (every scheme's levels, ``levels``: their union, within ``+-8``) are one int8
    matrix of all ``n`` outputs, the 8-bit rows' slots zero, multiplied by the outer-product MAC
    loop of :func:`broadcast_dense_kernel` on ``vpmaddubsw`` (:data:`PAIR_SUMS16` pair sums in
    int16 per widening ``vpmaddwd``; levels offset by 8 for signed activations), read in place.
    The ``n_int8`` 8-bit rows, where ``vpmaddubsw`` would saturate, are a second GEMM on int16
    pairs (``vpmaddwd``, sign-extended at compile time) into a scratch block, written over their
    slots (``cols8``). One kernel where there were three, a concatenation and a gather.

    ``(x [m, k], w4 [n / 16, k / 4, 1, 64] int8, w8 [n_int8 / 8, k / 2, 32] int8, cols8 [n_int8] int32,
    bias [n] int32, scale [n] f32, bias8 [n_int8] int32, scale8 [n_int8] f32, out [m, n] f32)``
    (``n_int8`` read as 1 where there are none): ``out = float32(x @ w.T + bias) * scale``."""
    _check_outer_product("layer_avx2_kernel", "avx2", x_dtype)
    if not isinstance(m, int):
        raise ValueError(f"layer_avx2_kernel: a static number of rows, got {m}")
    signed = x_dtype == "int8"
    w_off = 8 if signed else 0
    layer_avx2_bounds(k, x_dtype, levels, n_int8)
    g4 = _OuterProductGemm(m, k, n, x_dtype, "avx2", 1, k, _VectorOps("avx2", 32, signed, None, w_off=w_off),
                           tiles or LAYER_AVX2_TILES, num_cores, cpu=cpu, laid_out=True)
    gemm4 = g4.gemm(None)
    rows8 = max(n_int8, 1)
    g8 = _OuterProductGemm(m, k, rows8, x_dtype, "avx2", 1, k, _VectorOps("avx2", 16, False, None, pairs=True), None,
                           num_cores, pairs=True, cpu=cpu)
    gemm8 = g8.gemm(None)
    few = m < 8  # a parallel launch costs more than a few rows

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), x_dtype), w4: T.Buffer((g4.n_tiles, g4.steps, 1, g4.rows * 4), "int8"),
               w8: T.Buffer((g8.blocks8, g8.steps, 32), "int8"), cols8: T.Buffer((rows8,), "int32"),
               bias: T.Buffer((n,), "int32"), scale: T.Buffer((n,), "float32"), bias8: T.Buffer((rows8,), "int32"),
               scale8: T.Buffer((rows8,), "float32"), out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        gemm4(x, bias, scale, out, w4, w4, w4, w4)
        if n_int8 > 0:
            out8 = T.alloc_buffer((m, rows8), "float32")
            gemm8(x, bias8, scale8, out8, w8, w8, w8, w8)
            for i in T.serial(m) if few else T.parallel(m):
                for r in T.serial(n_int8):
                    out[i, cols8[r]] = out8[i, r]

    return kernel


def layer_avx2_bounds(k: int, x_dtype: str, levels: Sequence[int], n_int8: int) -> None:
    """Refuse (:class:`~schedules.x86_bounds.KernelBoundError`) a :func:`layer_avx2_kernel` whose
    integer sums could overflow: the 4-bit levels' ``vpmaddubsw`` pair sums in int16 and their
    int32 totals (offset by 8 for signed activations), the 8-bit rows' int16 pairs."""
    levels = [int(v) for v in levels] or [0]
    _check_bounds("layer_avx2_kernel", k, x_dtype, levels, "avx2", 8 if x_dtype == "int8" else 0, False, True)
    if n_int8:
        _check_bounds("layer_avx2_kernel", k, x_dtype, None, "avx2", 0, True, False)


def layer_avx2_weights(w: np.ndarray, is_int8: np.ndarray, x_dtype: str, tiles=None):
    """The weight constants of :func:`layer_avx2_kernel` from int8 weights ``[n, k]`` in output
    order and which rows are 8-bit: ``(w4, w8, cols8)``. ``w4``: every row, the 8-bit ones zero,
    offset by 8 for signed activations, laid out per register tile (``tiles``, default
    :data:`LAYER_AVX2_TILES`) as :func:`layer_int8_weights` lays them out; ``w8``:
    the 8-bit rows sign-extended to int16, 8 rows x 2 per step, as bytes; ``cols8``: their outputs."""
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"layer_avx2_weights: int8 weights [rows, k], got {w.dtype} {w.shape}")
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"layer_avx2_weights: activations must be uint8 or int8, got {x_dtype}")
    is_int8 = np.asarray(is_int8, bool)
    if is_int8.shape != (w.shape[0],):
        raise ValueError(f"layer_avx2_weights: one flag per row ({w.shape[0]}), got shape {is_int8.shape}")
    n, k = w.shape
    four = np.where(is_int8[:, None], 0, w.astype(np.int16))
    if np.abs(four).max(initial=0) > LEVEL_BOUND:
        raise ValueError(f"layer_avx2_weights: 4-bit rows need levels within +-{LEVEL_BOUND}, got "
                         f"{int(four.min())}..{int(four.max())}")
    if x_dtype == "int8":
        four = four + 8
    w4 = layer_int8_weights(four.astype(np.int8), "uint8", tiles or LAYER_AVX2_TILES)
    cols8 = np.flatnonzero(is_int8).astype(np.int32)
    rows8 = w[cols8].astype(np.int16) if len(cols8) else np.zeros((1, k), np.int16)
    steps8 = -(-k // 2)
    pairs = tile_weights(rows8, 8, 2)  # [tiles, steps8, 8, 2] int16
    w8 = np.ascontiguousarray(pairs).view(np.int8).reshape(pairs.shape[0], steps8, 32)
    return w4, w8, cols8 if len(cols8) else np.zeros(1, np.int32)


def layer_int8_weights(w: np.ndarray, x_dtype: str, tiles=None) -> np.ndarray:
    """int8 weights ``[n, k]`` as :func:`layer_int8_kernel` reads them: register tile ``t`` of
    ``rows = 8 * tiles[1]`` rows, step ``s``: bytes ``4 r + e`` hold row ``rows * t + r``, column
    ``4 s + e``; zero-padded; offset by 128 (sign bit flipped) for signed activations."""
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"layer_int8_weights: int8 weights [rows, k], got {w.dtype} {w.shape}")
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"layer_int8_weights: activations must be uint8 or int8, got {x_dtype}")
    rows = 8 * (tiles or WIDE_TILES)[1]
    n, k = w.shape
    steps, n_tiles = -(-k // 4), -(-n // rows)
    pad = np.zeros((n_tiles * rows, steps * 4), np.int8)
    pad[:n, :k] = w
    if x_dtype == "int8":
        pad ^= np.int8(-128)
    out = pad.reshape(n_tiles, rows, steps, 4).transpose(0, 2, 1, 3)  # [t, s, r, e]
    return np.ascontiguousarray(out.reshape(n_tiles, steps, 1, rows * 4))


def layer_weights(order: Sequence[Tuple[int, int]], groups: Sequence[np.ndarray], table_of_group: Sequence[int],
                  k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The constants of :func:`layer_dense_kernel`: ``(codes, kinds, w8, cols8)``.

    ``groups``: each row group's stored weights, packed 4-bit rows (``[rows, ceil(k / 2)]``
    uint8) or int8 rows (``[rows, k]``); ``table_of_group``: 0 or 1 for a 4-bit group's decode
    table, -1 for an int8 group; ``order[c] = (group, row)``: the source of output row ``c``.
    """
    n, w_bytes = len(order), (k + 1) // 2
    steps = -(-w_bytes // 4)
    packed = np.zeros((n, w_bytes), np.uint8)
    kind = np.zeros(n, np.uint8)
    int8_rows, cols8 = [], []
    for c, (gi, r) in enumerate(order):
        if table_of_group[gi] < 0:
            row = np.zeros(2 * steps * 4, np.int8)
            row[:k] = groups[gi][r]
            int8_rows.append(row.reshape(steps, 4, 2).transpose(0, 2, 1))  # [step, plane, byte]
            cols8.append(c)
        else:
            if groups[gi].shape[1] != w_bytes:
                raise ValueError(f"layer_weights: group {gi} has {groups[gi].shape[1]} bytes per row, not {w_bytes}")
            packed[c] = groups[gi][r]
            kind[c] = 255 * table_of_group[gi]
    codes = tile_weights(packed, 8, 4)
    kinds = np.repeat(np.concatenate([kind, np.zeros(-n % 8, np.uint8)]).reshape(-1, 8), 4, axis=1)
    w8 = np.stack(int8_rows) if int8_rows else np.zeros((1, steps, 2, 4), np.int8)
    return codes, np.ascontiguousarray(kinds), np.ascontiguousarray(w8), np.array(cols8 or [0], np.int32)


def taps_first_weights(w: np.ndarray, channels: int, kh: int, kw: int) -> np.ndarray:
    """Conv weights as the per-tap kernel reads them, ``[n, (ky, kx, channel)]``: int8 rows
    from ``[n, C, kh, kw]``; packed rows (``[n, bytes]``, code ``(c * kh + ky) * kw + kx``)
    with the codes of channels ``2j`` and ``2j + 1`` of a tap in the low and high nibbles of
    one byte."""
    n, taps = w.shape[0], kh * kw
    expected = [(n, channels, kh, kw)] if w.dtype != np.uint8 else [(n, (channels * taps + 1) // 2)]
    if tuple(w.shape) not in expected or (w.dtype == np.uint8 and channels % 2):
        raise ValueError(f"taps_first_weights: weights of shape {expected[0]} (packed rows: an even channel "
                         f"count) for {channels} channels and a {kh}x{kw} kernel, got {w.shape}")
    if w.dtype != np.uint8:  # int8 rows
        return np.ascontiguousarray(w.reshape(n, channels, taps).transpose(0, 2, 1).reshape(n, taps * channels))
    codes = unpack_nibbles(w, channels * taps)
    by_tap = codes.reshape(n, channels, taps).transpose(0, 2, 1)  # [n, tap, channel]
    return np.ascontiguousarray((by_tap[:, :, 0::2] | (by_tap[:, :, 1::2] << 4)).reshape(n, taps * channels // 2))


def tap_order_weights(w: np.ndarray, channels: int, kh: int, kw: int, vec: int) -> np.ndarray:
    """Conv weights as the tap-order im2col kernel reads them, ``[n, steps * vec]``: columns in
    ``(ky, kx, channel)`` order, zero-padded to whole steps; int8 rows from ``[n, C, kh, kw]``,
    one byte per column; packed rows (``[n, bytes]``, code ``(c * kh + ky) * kw + kx``) with
    columns ``j`` and ``vec + j`` of each ``2 * vec``-column step in the low and high nibbles
    of byte ``j`` of the step."""
    n, k = w.shape[0], channels * kh * kw
    packed = w.dtype == np.uint8
    expected = (n, (k + 1) // 2) if packed else (n, channels, kh, kw)
    if tuple(w.shape) != expected or vec < 1:
        raise ValueError(f"tap_order_weights: weights of shape {expected} for {channels} channels and a "
                         f"{kh}x{kw} kernel, and a positive vector width; got {w.shape}, vec={vec}")
    per_step = 2 * vec if packed else vec
    steps = -(-k // per_step)
    codes = unpack_nibbles(w, k).reshape(n, channels, kh, kw) if packed else w
    cols = np.zeros((n, steps * per_step), w.dtype)
    cols[:, :k] = codes.transpose(0, 2, 3, 1).reshape(n, k)
    if not packed:
        return cols
    halves = cols.reshape(n, steps, 2, vec)
    return np.ascontiguousarray((halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, steps * vec))


def tile_weights(w: np.ndarray, rows_per_tile: int, vec: int) -> np.ndarray:
    """``w`` (``[n, bytes]``) as the tiled kernel reads it: ``[tile, step, row, byte]``, rows
    padded with zeros to whole tiles and bytes to whole ``vec``-byte steps, so that a tile's
    weights for one step are contiguous and the whole matrix is read front to back."""
    if w.ndim != 2 or rows_per_tile < 1 or vec < 1:
        raise ValueError(f"tile_weights: weights [rows, bytes] and positive tile sizes, got shape {w.shape}, "
                         f"rows_per_tile={rows_per_tile}, vec={vec}")
    n, width = w.shape
    n_tiles, steps = -(-n // rows_per_tile), -(-width // vec)
    padded = np.zeros((n_tiles * rows_per_tile, steps * vec), w.dtype)
    padded[:n, :width] = w
    return np.ascontiguousarray(padded.reshape(n_tiles, rows_per_tile, steps, vec).transpose(0, 2, 1, 3))


def warn_fallback(what: str, target: tvm.target.Target) -> None:
    warnings.warn(
        f"{what}: target {target.attrs.get('mcpu', '')!r} has no AVX2; using the portable schedule",
        TargetFeatureWarning, stacklevel=3,
    )
