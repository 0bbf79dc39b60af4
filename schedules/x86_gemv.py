"""A whole dense layer at batch 1 (and small batches) on AVX-512 VNNI or AVX2, with two
weight rows per byte.

At batch 1 every weight is used once per call, so a layer's time is the vector instructions
that turn its packed bytes into products. :func:`~schedules.x86_intrin.gemm_kernel` packs two
codes *of one row* per byte (consecutive reduction elements); each 64 bytes then cost a load,
three operations to split the nibbles, two table shuffles and two ``vpdpbusd``. Here a byte
holds the codes of *two rows* at the same reduction element, so both nibbles meet the same
activation:

* fixed 4-bit rows (any levels within -8..7) store ``u = level + 8`` (0..15), a byte is
  ``16 * u_hi + u_lo``. One ``vpdpbusd`` of the whole byte gives ``16 * hi + lo``, one of
  ``byte & 15`` gives ``lo``; ``hi = (total - lo) / 16``, exactly. A load, an ``and`` and two MACs per 128 weights.
* table rows (SP2): with AVX-512 VBMI, ``vpermb`` reads only the low 6 bits of an index, so
  against a 64-byte table repeating the 16 levels it decodes the low nibble of every byte
  without masking, and the high nibbles after one 16-bit shift (the bits shifted in from the
  neighbouring byte land in bits 4-5, which the repeated table ignores). A load, a shift,
  two ``vpermb`` and two MACs. Without VBMI: masks and ``vpshufb`` as elsewhere.
* 8-bit rows: one row per 64 bytes, a load and a MAC.

AVX2 (32-byte steps) has no ``vpdpbusd``: ``vpmaddubsw`` multiplies the pairs and ``vpmaddwd``
with ones widens them. Its 16-bit pair sums would saturate on whole bytes (``255 * 127 * 2``),
so fixed pairs split both nibbles (an ``and``, a shift and an ``and``, two MACs per 64
weights); table pairs decode both nibbles by ``vpshufb``. 8-bit rows, whose products would
saturate too, are sign-extended to 16 bits and multiplied by ``vpmaddwd`` (exact).

``vpdpbusd`` multiplies unsigned by signed bytes: here the 4-bit weights are the unsigned
operand (``level + 8``) and the activations the signed one (unsigned activations staged as
``x' = x - 128``); on VNNI 8-bit rows take the activations as the unsigned operand
(``x' + 128``), on AVX2 ``x'`` in 16 bits. The offsets come back as ``- 8 * sum(x')`` per call
and, folded into each row's bias at compile time, ``128 * sum(level)`` (unsigned activations,
4-bit rows; AVX2 8-bit rows too) or ``- 128 * sum(w)`` (VNNI, signed activations, 8-bit rows).

The rows are computed in blocks of ``P`` byte rows (``2P`` outputs) that share the activation
loads, and each result is stored at the output position the graph wants (``dest``): the
layer's row groups, their concatenation and any gather restoring the model's row order are
one call. With several activation rows (up to :data:`GEMV_MAX_ROWS`), one to five of them pass
over a block together, sharing its loads and decode (:func:`block_pairs`, :func:`row_tile`).
:func:`gemv_layer_weights` lays the constants out at compile time.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import attrs
import numpy as np
import tvm
from tvm.script import tirx as T

from tvm_rmsmp.quant.schemes import unpack_nibbles

from .x86_bounds import INT8 as INT8_RANGE
from .x86_bounds import UINT8 as UINT8_RANGE
from .x86_bounds import check_accumulators, operand_range
from .x86_intrin import PAIR_SUMS16, _VectorOps
from .x86_tuning_table import ISA_DEFAULTS, X86_CONSTANTS, constants_for

__all__ = ["GemvLayout", "gemv_layer_bounds", "gemv_layer_kernel", "gemv_layer_weights", "gemv_max_rows", "LINEAR", "INT8"]

#: ``group_kinds`` entry of a 4-bit group whose levels are ``code ^ 8 - 8`` (fixed point)
LINEAR = "linear"
#: ``group_kinds`` entry of an 8-bit group (int8 rows)
INT8 = "int8"

_VEC = {"avx512vnni": 64, "avx2": 32}  # bytes per vector step (zmm, ymm)
#: AVX2 4-bit pairs: steps whose ``vpmaddubsw`` pair sums add up in 16 bits before they are
#: widened (each slot takes one pair sum per step: the bound of ``x86_intrin.PAIR_SUMS16``).
SUMS16_STEPS = PAIR_SUMS16

#: Most activation rows a dense layer on VNNI runs with :func:`gemv_layer_kernel`; from one more
#: on the outer-product layer kernel (``x86_intrin.layer_dense_kernel``) is as fast or faster
#: (that kernel decodes every weight per call, then runs 8-row tiles near the MAC peak; this one
#: decodes in registers once per pass of one to five rows). The default row's ``gemv_max_rows``
#: (:mod:`schedules.x86_tuning_table`, with the measurements); :func:`gemv_max_rows` reads a CPU's own.
GEMV_MAX_ROWS = X86_CONSTANTS["default-avx512vnni"]["gemv_max_rows"]
#: The same on AVX2, where past it each row group runs the outer-product kernel
#: (``x86_intrin.broadcast_dense_kernel``) and no layer kernel exists.
GEMV_MAX_ROWS_AVX2 = X86_CONSTANTS["default-avx2"]["gemv_max_rows"]


def gemv_max_rows(isa: str, cpu: Optional[str] = None) -> int:
    """Most activation rows :func:`gemv_layer_kernel` is used for on ``isa`` (LLVM CPU ``cpu``'s
    row of :mod:`schedules.x86_tuning_table`, else the ISA's default)."""
    return constants_for(isa, cpu)["gemv_max_rows"]


#: Time of one pass over a layer's blocks, by ISA and (byte rows per block, activation rows per
#: pass), of the default rows of :mod:`schedules.x86_tuning_table` (``pass_us``: ``python -m
#: bench.layer_kernels --passes``, both FFN layers, one thread; microseconds; VNNI on znver4,
#: AVX2 on znver3). A pass keeps ``2 * pairs`` accumulators per activation row (AVX-512: 32
#: registers, 24 accumulators with two pairs spill; AVX2: 16 registers).
PASS_US = {isa: X86_CONSTANTS[row]["pass_us"] for isa, row in ISA_DEFAULTS.items()}


def row_tile(m: int, pairs: int = 4, isa: str = "avx512vnni", cpu: Optional[str] = None) -> int:
    """Activation rows per pass for ``m`` rows in blocks of ``pairs`` byte rows: the fewest
    microseconds in ``cpu``'s ``pass_us`` (:data:`PASS_US` by default; the last pass repeats
    rows to fill its tile)."""
    cost = constants_for(isa, cpu)["pass_us"]
    tiles = [t for p, t in cost if p == pairs] or [max(1, 8 // pairs)]
    return min(tiles, key=lambda t: (-(-m // t) * cost.get((pairs, t), t), t))


def block_pairs(m: int, isa: str = "avx512vnni", cpu: Optional[str] = None) -> int:
    """Byte rows per block for ``m`` activation rows: whichever of 4 and 2 makes the passes
    shortest (on VNNI 4 up to three rows; 2 lets four or five rows pass together)."""
    cost = constants_for(isa, cpu)["pass_us"]
    return min((4, 2), key=lambda p: -(-m // row_tile(m, p, isa, cpu)) * cost[(p, row_tile(m, p, isa, cpu))])


@attrs.frozen
class GemvLayout:
    """How many blocks of each kind a layer has: ``linear`` (fixed 4-bit pairs), one count per
    decode table (4-bit pairs decoded by a table), ``int8`` (8-bit rows); a block is ``pairs``
    byte rows, ``2 * pairs`` outputs of any kind, in steps of ``vec`` bytes."""

    k: int
    n: int
    linear: int
    tables: Tuple[int, ...]
    int8: int
    pairs: int = 4
    vec: int = 64

    @property
    def isa(self) -> str:
        return "avx512vnni" if self.vec == 64 else "avx2"

    @property
    def steps(self) -> int:
        return -(-self.k // self.vec)

    @property
    def blocks4(self) -> int:
        return self.linear + sum(self.tables)

    @property
    def blocks(self) -> int:
        return self.blocks4 + self.int8

    @property
    def slots(self) -> int:
        """Outputs computed (padding included): ``2 * pairs`` per block."""
        return self.blocks * 2 * self.pairs


def gemv_layer_weights(order: Sequence[Tuple[int, int]], groups: Sequence[np.ndarray], group_kinds: Sequence,
                       levels_of_group: Sequence[Optional[np.ndarray]], bias: np.ndarray, scale: np.ndarray, k: int,
                       x_dtype: str, pairs: int = 4, isa: str = "avx512vnni"):
    """The constants of :func:`gemv_layer_kernel` for ``isa``: ``(layout, w4, w8, dest, bias, scale)``.

    ``groups``: each row group's stored weights (packed 4-bit ``[rows, ceil(k / 2)]`` uint8 or
    int8 ``[rows, k]``); ``group_kinds``: :data:`LINEAR`, :data:`INT8` or the index of the
    group's decode table; ``levels_of_group``: the int levels of each 4-bit group's 16 codes;
    ``order[c] = (group, row)``: the source of output ``c``, whose ``bias[c]`` / ``scale[c]``
    are given in that order. Returned bias and scale are in the kernel's slot order, the bias
    with the compile-time share of the offsets folded in (module docstring)."""
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"gemv_layer_weights: activations must be uint8 or int8, got {x_dtype}")
    if isa not in _VEC:
        raise ValueError(f"gemv_layer_weights: unknown ISA {isa!r} (known: {sorted(_VEC)})")
    vec = _VEC[isa]
    n, steps = len(order), -(-k // vec)
    signed = x_dtype == "int8"
    kinds = list(group_kinds)
    n_tables = max([g for g in kinds if isinstance(g, int)] + [-1]) + 1
    by_kind = {kind: [] for kind in [LINEAR] + list(range(n_tables)) + [INT8]}
    for c, (gi, r) in enumerate(order):
        by_kind[kinds[gi]].append(c)
    stored, level_rows = [], []  # per group: codes (4-bit) or the int8 rows, and their int levels
    for gi, (w, kind) in enumerate(zip(groups, kinds)):
        if kind == INT8:
            stored.append(np.asarray(w, np.int8))
            level_rows.append(stored[-1].astype(np.int64))
            continue
        levels = np.asarray(levels_of_group[gi], np.int64)
        if kind == LINEAR and len(w) and (levels.min() < -8 or levels.max() > 7):
            raise ValueError(f"gemv_layer_weights: group {gi} is linear but has levels outside -8..7")
        stored.append(unpack_nibbles(w, k))
        level_rows.append(levels[stored[-1]])
    per_block = 2 * pairs  # outputs per block, of any kind
    counts = {kind: -(-len(cs) // per_block) for kind, cs in by_kind.items()}
    layout = GemvLayout(k, n, counts[LINEAR], tuple(counts[t] for t in range(n_tables)), counts[INT8], pairs, vec)
    w4 = np.zeros((max(layout.blocks4, 1), steps, pairs, vec), np.uint8)
    w8 = np.zeros((max(layout.int8, 1), steps, per_block, vec), np.int8)
    dest = np.full(layout.slots, -1, np.int32)
    slot_bias = np.zeros(layout.slots, np.int32)
    slot_scale = np.zeros(layout.slots, np.float32)
    block = 0
    for kind in [LINEAR] + list(range(n_tables)) + [INT8]:
        cs = by_kind[kind]
        for b in range(counts[kind]):
            chunk = cs[b * per_block:(b + 1) * per_block]
            for s, c in enumerate(chunk):
                # 4-bit blocks: slot s < P is the low nibble of byte row s, slot P + s its high one
                slot = block * per_block + s
                gi, r = order[c]
                level_row, codes = level_rows[gi][r], stored[gi][r]
                dest[slot], slot_scale[slot] = c, scale[c]
                extra = 0
                if kind == INT8:
                    row = np.zeros(steps * vec, np.int8)
                    row[:k] = codes
                    w8[block - layout.blocks4, :, s] = row.reshape(steps, vec)
                    if isa == "avx512vnni":  # activations x' + 128
                        extra = -128 * int(level_row.sum()) if signed else 0
                    else:  # activations x' (x - 128 when unsigned)
                        extra = 0 if signed else 128 * int(level_row.sum())
                else:
                    nib = level_row + 8 if kind == LINEAR else codes
                    row = np.zeros(steps * vec, np.uint8)
                    row[:k] = nib
                    pair, high = s % pairs, s // pairs
                    w4[block, :, pair] |= (row << (4 * high)).astype(np.uint8).reshape(steps, vec)
                    extra = 0 if signed else 128 * int(level_row.sum())
                total = int(bias[c]) + extra
                if not -2**31 <= total < 2**31:
                    raise ValueError(f"gemv_layer_weights: output {c}'s bias {bias[c]} overflows int32 "
                                     f"with its offset {extra}")
                slot_bias[slot] = total
            block += 1
    return layout, w4, w8, dest, slot_bias, slot_scale


def gemv_layer_bounds(layout: GemvLayout, x_dtype: str, table_levels: Sequence[Sequence[int]]) -> None:
    """Refuse (:class:`~schedules.x86_bounds.KernelBoundError`) a :func:`gemv_layer_kernel`
    whose integer sums could overflow. The activations are ``x'`` (-128..127: ``x - 128`` when
    unsigned), the signed operand of the 4-bit bytes, with the offset ``8 * sum(x')``:

    * fixed pairs, VNNI: a lane sums whole bytes (0..255, 4 products a step) before the low
      nibbles' sum is taken off per lane; the lanes then add up ``16 * hi`` (0..240 per byte);
    * table pairs: ``level + 8``; on AVX2 either kind's nibbles in :data:`SUMS16_STEPS`
      ``vpmaddubsw`` pair sums added in int16;
    * 8-bit rows: VNNI ``(x' + 128) * w``, AVX2 ``x' * w`` (int16 pairs, ``vpmaddwd``)."""
    k, isa = layout.k, layout.isa
    xs = INT8_RANGE
    name = "gemv_layer_kernel"
    int16_pairs = 0 if isa == "avx512vnni" else SUMS16_STEPS
    checks = []  # (what, the 4-bit operand's range)
    if layout.linear:
        if isa == "avx512vnni":
            lane = layout.steps * 4  # products of whole bytes in one lane
            check_accumulators(name, k, xs, UINT8_RANGE, f"whole bytes of fixed pairs in one lane ({x_dtype} "
                               f"activations as x' {list(xs)} x 0..255)", terms=lane)
            checks.append(("16 x the high nibbles of fixed pairs", (0, 240)))
        else:
            checks.append(("the nibbles of fixed pairs", (0, 15)))
    for levels, count in zip(table_levels, layout.tables):
        if count:
            checks.append((f"4-bit levels {min(levels)}..{max(levels)} + 8", operand_range(levels, 8)))
    for what, w in checks:
        check_accumulators(name, k, xs, w, f"{x_dtype} activations as x' {list(xs)} x {what} {list(w)}", offset=8,
                           int16_pairs=int16_pairs)
    if layout.int8:
        vnni = isa == "avx512vnni"
        x8 = UINT8_RANGE if vnni else INT8_RANGE
        shown = "x' + 128" if vnni else "x'"
        check_accumulators(name, k, x8, INT8_RANGE, f"{x_dtype} activations as {shown} {list(x8)} x int8 rows "
                           "-128..127", wide_pairs=not vnni)


def _sums4(acc, base, lanes):
    """int32x8 whose lanes ``q`` and ``q + 4`` add up to the total of the ``lanes``-lane (16
    or 8) accumulator in slot ``base + q`` (two ``vphaddd``, after adding halves of 16)."""
    phadd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.phadd.d")

    def eight(s):
        if lanes == 8:
            return acc[T.ramp(s * 8, 1, 8)]
        return acc[T.ramp(s * 16, 1, 8)] + acc[T.ramp(s * 16 + 8, 1, 8)]

    return T.call_llvm_pure_intrin(
        phadd,
        T.call_llvm_pure_intrin(phadd, eight(base), eight(base + 1), dtype="int32x8"),
        T.call_llvm_pure_intrin(phadd, eight(base + 2), eight(base + 3), dtype="int32x8"),
        dtype="int32x8")


class _GemvPlan:
    """The sizes of :func:`gemv_layer_kernel` for a layout, and the expressions its macros
    share: operand vectors, accumulator slots, the nibble decoders."""

    def __init__(self, layout: GemvLayout, x_dtype: str, table_levels, vbmi: bool, num_cores: int, m: int,
                 rows_per_pass: Optional[int], cpu: Optional[str]):
        if x_dtype not in ("uint8", "int8"):
            raise ValueError(f"gemv_layer_kernel: activations must be uint8 or int8, got {x_dtype}")
        if m < 1:
            raise ValueError(f"gemv_layer_kernel: at least one activation row, got m = {m}")
        if len(table_levels) != len(layout.tables) or len(table_levels) > 2:
            raise ValueError(f"gemv_layer_kernel: {len(layout.tables)} block counts for {len(table_levels)} tables "
                             "(at most two)")
        if layout.vec not in _VEC.values():
            raise ValueError(f"gemv_layer_kernel: {layout.vec}-byte steps; known: {sorted(_VEC.values())}")
        self.isa, self.vec = isa, vec = layout.isa, layout.vec
        self.vnni = vnni = isa == "avx512vnni"
        if vbmi and not vnni:
            raise ValueError("gemv_layer_kernel: vpermb (vbmi) needs AVX-512 steps")
        self.k, self.n = layout.k, layout.n
        self.steps, self.pairs = steps, pairs = layout.steps, layout.pairs
        if pairs % 2:
            raise ValueError(f"gemv_layer_kernel: byte rows per block must be even, got {pairs}")
        gemv_layer_bounds(layout, x_dtype, table_levels)
        self.m, self.x_dtype, self.vbmi = m, x_dtype, vbmi
        self.width, self.slots_per_block, self.lanes = steps * vec, 2 * pairs, vec // 4
        self.linear, self.blocks4, self.blocks = layout.linear, layout.blocks4, layout.blocks
        self.table_a = layout.linear + (layout.tables[0] if layout.tables else 0)  # blocks before table B's
        self.unsigned = x_dtype == "uint8"
        self.four = _VectorOps(isa, vec, True, None)  # 4-bit bytes unsigned, activations signed
        self.eight_bit = _VectorOps(isa, vec, False, None)  # VNNI: activations unsigned, int8 rows signed
        self.tables = [_VectorOps(isa, vec, True, levels) for levels in table_levels] or [self.four]
        self.slots = layout.slots
        self.w4_shape = (max(self.blocks4, 1), steps, pairs, vec)
        self.w8_shape = (max(layout.int8, 1), steps, self.slots_per_block, vec)
        self.mt = mt = rows_per_pass or row_tile(m, pairs, isa, cpu)
        self.row_tiles = -(-m // mt)
        self.acc_words = acc_words = mt * self.slots_per_block * self.lanes
        # AVX2: the 4-bit pairs' 16-bit sums, widened every SUMS16_STEPS steps (module docstring)
        self.acc16_words = 8 if vnni else mt * self.slots_per_block * 8  # VNNI: declared, never read
        self.chunks16 = -(-steps // SUMS16_STEPS)
        # AVX2: each group of steps' widened sums, added up after the block (``pair_block``)
        self.part_words = 8 if vnni else self.chunks16 * acc_words  # VNNI: declared, never read
        self.work_words = acc_words + 16 + 2 * vec // 4 + self.acc16_words + self.part_words
        tasks = max(1, min(self.blocks, 4 * max(1, num_cores)))
        self.per_task = -(-self.blocks // tasks)
        self.tasks = -(-self.blocks // self.per_task)
        # activations of the 8-bit rows: VNNI x' + 128 (the MAC's unsigned operand), AVX2 x' in 16 bits
        self.xe_dtype = "uint8" if vnni else "int16"

    def low(self, wv):
        return T.bitwise_and(wv, T.broadcast(T.uint8(15), self.vec))

    def decode(self, table, ops, wv, high):
        """``level + 8`` of the low or high nibbles of ``wv`` (module docstring)."""
        if not self.vbmi:
            return ops.decode(table, wv, high)
        index = wv
        if high:
            index = T.reinterpret(T.shift_right(T.reinterpret(wv, dtype="uint16x32"), T.broadcast(T.uint16(4), 32)),
                                  dtype="uint8x64")
        perm = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.permvar.qi.512")
        return T.call_llvm_pure_intrin(perm, table[T.ramp(0, 1, self.vec)], T.reinterpret(index, dtype="int8x64"),
                                       dtype="int8x64")

    def fixed(self, tbl, ops, wv, high):
        """VNNI: slot p sums ``lo``, slot P + p the whole byte (``16 hi + lo``: the kernel then
        subtracts ``lo`` and the store divides by 16). AVX2: the nibbles (whole bytes saturate)."""
        if self.vnni:
            return wv if high else self.low(wv)
        return T.shift_right(wv, T.broadcast(T.uint8(4), self.vec)) if high else self.low(wv)

    def eight_bit_x(self, xs_value, j):
        if self.vnni:
            return T.if_then_else(j < self.k, T.bitwise_xor(T.reinterpret(xs_value, dtype="uint8"), T.uint8(128)),
                                  T.uint8(0))
        return T.Cast("int16", xs_value)

    def acc_at(self, i, slot):
        """Accumulator of activation row ``i`` of the pass, output slot ``slot`` of the block."""
        return T.ramp((i * self.slots_per_block + slot) * self.lanes, 1, self.lanes)

    def x_at(self, xs, rows, i, s, step=None):
        """Step ``s`` of activation row ``rows + i`` (past ``m``: the last row again)."""
        step = step or self.vec
        return xs[T.min(rows + i, self.m - 1), T.ramp(s * step, 1, step)]

    def pairs16(self, wv, xv):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), wv, xv,
                                       dtype="int16x16")

    def a16_at(self, i, slot):
        return T.ramp((i * self.slots_per_block + slot) * 16, 1, 16)

    def part_at(self, chunk, a):
        """Widened sums of step group ``chunk``, accumulator ``a`` (AVX2)."""
        return T.ramp((chunk * self.mt * self.slots_per_block + a) * self.lanes, 1, self.lanes)


def _gemv_pair_block(plan: _GemvPlan, nibbles):
    """Macro ``block(acc, acc16, parts, xs, w4, blk, rows, tbl, ops)``: slot ``p`` of each
    row sums the products of ``nibbles(tbl, ops, byte row p, False)``, slot ``P + p`` those
    of ``nibbles(..., True)``. AVX2: ``vpmaddubsw`` pair sums added in 16 bits for
    :data:`SUMS16_STEPS` steps, then widened by one ``vpmaddwd`` each and stored per group
    of steps (``parts``), summed into ``acc`` after the block: with the 32-bit sums carried
    from group to group in registers as well as the 16-bit ones, LLVM spilled the 16-bit
    ones inside the step loop once two rows passed together (8 + 8 of 16 registers;
    ``python -m bench.layer_kernels --passes``: 2 rows a pass 125 -> 110 us)."""
    vec, steps, pairs, mt, lanes, slots_per_block = plan.vec, plan.steps, plan.pairs, plan.mt, plan.lanes, plan.slots_per_block
    chunks16, four = plan.chunks16, plan.four
    acc_at, x_at, a16_at, part_at, pairs16 = plan.acc_at, plan.x_at, plan.a16_at, plan.part_at, plan.pairs16

    @T.macro
    def block16(acc, acc16, parts, xs, w4, blk, rows, tbl, ops):
        for so in T.serial(chunks16):
            for a in T.unroll(mt * slots_per_block):
                acc16[T.ramp(a * 16, 1, 16)] = T.broadcast(T.int16(0), 16)
            for si in T.serial(T.min(SUMS16_STEPS, steps - so * SUMS16_STEPS)):
                for p in T.unroll(pairs):
                    for i in T.unroll(mt):
                        acc16[a16_at(i, p)] = acc16[a16_at(i, p)] + pairs16(
                            nibbles(tbl, ops, w4[blk, so * SUMS16_STEPS + si, p, T.ramp(0, 1, vec)], False),
                            x_at(xs, rows, i, so * SUMS16_STEPS + si))
                        acc16[a16_at(i, pairs + p)] = acc16[a16_at(i, pairs + p)] + pairs16(
                            nibbles(tbl, ops, w4[blk, so * SUMS16_STEPS + si, p, T.ramp(0, 1, vec)], True),
                            x_at(xs, rows, i, so * SUMS16_STEPS + si))
            for a in T.unroll(mt * slots_per_block):
                parts[part_at(so, a)] = four.widen(acc16[T.ramp(a * 16, 1, 16)])
        for so in T.serial(chunks16):
            for a in T.unroll(mt * slots_per_block):
                acc[T.ramp(a * lanes, 1, lanes)] = acc[T.ramp(a * lanes, 1, lanes)] + parts[part_at(so, a)]

    @T.macro
    def block(acc, acc16, parts, xs, w4, blk, rows, tbl, ops):
        for s in T.serial(steps):
            for p in T.unroll(pairs):
                for i in T.unroll(mt):
                    acc[acc_at(i, p)] = four.mac(acc[acc_at(i, p)], x_at(xs, rows, i, s),
                                                 nibbles(tbl, ops, w4[blk, s, p, T.ramp(0, 1, vec)], False))
                    acc[acc_at(i, pairs + p)] = four.mac(
                        acc[acc_at(i, pairs + p)], x_at(xs, rows, i, s),
                        nibbles(tbl, ops, w4[blk, s, p, T.ramp(0, 1, vec)], True))

    return block if plan.vnni else block16


def _gemv_int8_block(plan: _GemvPlan):
    """Macro ``int8_block(acc, xe, w8, blk8, rows)``: a block of 8-bit rows, one row per slot
    (VNNI: ``vpdpbusd`` of ``x' + 128`` and the rows; AVX2: int16 products by ``vpmaddwd``)."""
    vec, steps, mt, slots_per_block, eight_bit = plan.vec, plan.steps, plan.mt, plan.slots_per_block, plan.eight_bit
    acc_at, x_at = plan.acc_at, plan.x_at
    pmaddwd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")

    @T.macro
    def int8_block_vnni(acc, xe, w8, blk8, rows):
        for s in T.serial(steps):
            for r in T.unroll(slots_per_block):
                for i in T.unroll(mt):
                    acc[acc_at(i, r)] = eight_bit.mac(acc[acc_at(i, r)], x_at(xe, rows, i, s),
                                                      w8[blk8, s, r, T.ramp(0, 1, vec)])

    @T.macro
    def int8_block_avx2(acc, xe, w8, blk8, rows):
        """16-bit products (``vpmovsxbw`` of the weights, ``vpmaddwd``): exact, no offsets."""
        for s, h in T.grid(steps, 2):
            for r in T.unroll(slots_per_block):
                for i in T.unroll(mt):
                    acc[acc_at(i, r)] = acc[acc_at(i, r)] + T.call_llvm_pure_intrin(
                        pmaddwd, x_at(xe, rows, i, 2 * s + h, 16),
                        T.Cast("int16x16", w8[blk8, s, r, T.ramp(h * 16, 1, 16)]), dtype="int32x8")

    return int8_block_vnni if plan.vnni else int8_block_avx2


def _gemv_store(plan: _GemvPlan):
    """Macro ``store(acc, red, res, offset, dest, bias, scale, out, blk, rows)``: row
    ``rows + i``'s outputs of the block, each at its place (rows past ``m`` repeat the last
    one: the same values stored again)."""
    m, mt, slots_per_block, lanes, vnni, pairs = plan.m, plan.mt, plan.slots_per_block, plan.lanes, plan.vnni, plan.pairs
    linear, blocks4 = plan.linear, plan.blocks4

    @T.macro
    def store(acc, red, res, offset, dest, bias, scale, out, blk, rows):
        for i in T.unroll(mt):
            for g in T.unroll(slots_per_block // 4):
                red[T.ramp(0, 1, 8)] = _sums4(acc, i * slots_per_block + 4 * g, lanes)
                red[T.ramp(0, 1, 4)] = red[T.ramp(0, 1, 4)] + red[T.ramp(4, 1, 4)]
                if vnni and blk < linear:  # slots P.. of fixed pairs: (total - lo) / 16
                    red[T.ramp(0, 1, 4)] = T.Select(
                        T.ramp(4 * g, 1, 4) >= T.broadcast(pairs, 4),
                        T.shift_right(red[T.ramp(0, 1, 4)], T.broadcast(4, 4)), red[T.ramp(0, 1, 4)])
                if blk < blocks4:
                    red[T.ramp(0, 1, 4)] = red[T.ramp(0, 1, 4)] - T.broadcast(offset[T.min(rows + i, m - 1)], 4)
                res[T.ramp(0, 1, 4)] = T.Cast(
                    "float32x4", red[T.ramp(0, 1, 4)] + bias[T.ramp(blk * slots_per_block + 4 * g, 1, 4)]) * scale[
                    T.ramp(blk * slots_per_block + 4 * g, 1, 4)]
                for q in T.unroll(4):
                    if dest[blk * slots_per_block + 4 * g + q] >= 0:
                        out[T.min(rows + i, m - 1), dest[blk * slots_per_block + 4 * g + q]] = res[q]

    return store


def _gemv_stage(plan: _GemvPlan):
    """Macro ``stage(x, xs, xe, offset)``: the activations twice, signed (``x' = x - 128`` when
    unsigned) for the 4-bit bytes and as the 8-bit rows meet them (``eight_bit_x``), zero past
    ``k`` in both; and each row's offset ``8 * sum(x')``, summed by MACs with ones."""
    m, k, vec, width, steps, lanes, unsigned, four = (plan.m, plan.k, plan.vec, plan.width, plan.steps, plan.lanes,
                                                      plan.unsigned, plan.four)
    eight_bit_x = plan.eight_bit_x

    @T.macro
    def stage(x, xs, xe, offset):
        xsum = T.alloc_buffer((lanes,), "int32", scope="local")
        for r in T.serial(m):
            for j in T.vectorized(width):
                xs[r, j] = T.if_then_else(j < k, T.reinterpret(T.bitwise_xor(
                    T.reinterpret(x[r, T.min(j, k - 1)], dtype="uint8"), T.uint8(128 if unsigned else 0)),
                    dtype="int8"), T.int8(0))
                xe[r, j] = eight_bit_x(xs[r, j], j)
            for lane in T.unroll(lanes):
                xsum[lane] = 0
            for s in T.serial(steps):
                xsum[T.ramp(0, 1, lanes)] = four.mac(xsum[T.ramp(0, 1, lanes)], xs[r, T.ramp(s * vec, 1, vec)],
                                                     T.broadcast(T.uint8(1), vec))
            offset[r] = 0
            for lane in T.unroll(lanes):
                offset[r] = offset[r] + 8 * xsum[lane]

    return stage


def gemv_layer_kernel(layout: GemvLayout, x_dtype: str, table_levels: Sequence[Sequence[int]], vbmi: bool = False,
                      num_cores: int = 1, m: int = 1, rows_per_pass: Optional[int] = None,
                      cpu: Optional[str] = None) -> tvm.tirx.PrimFunc:
    """``(x [m, k], w4 [blocks4, steps, P, vec] uint8, w8 [int8 blocks, steps, 2P, vec] int8,
    dest [slots] int32, bias [slots] int32, scale [slots] f32, out [m, n] f32)``, constants
    from :func:`gemv_layer_weights` (module docstring), for the ISA of ``layout.vec``.
    ``table_levels``: the 16 levels of each decode table, one per entry of ``layout.tables``.
    Several activation rows (``m``) pass over each block's weights :func:`row_tile` at a time,
    sharing its loads and decode (weights laid out with ``pairs=block_pairs(m, isa)`` pass
    fastest). ``vbmi``: decode tables by ``vpermb`` (AVX-512 VBMI). ``rows_per_pass`` forces
    the rows of a pass instead (for measuring :data:`PASS_US`). ``cpu``: the LLVM CPU whose
    ``pass_us`` picks the rows per pass (:mod:`schedules.x86_tuning_table`; None: the ISA's default).

    Assembled from :class:`_GemvPlan` and per-path macros: :func:`_gemv_stage`,
    :func:`_gemv_pair_block` (fixed and table pairs), :func:`_gemv_int8_block`, :func:`_gemv_store`."""
    g = _GemvPlan(layout, x_dtype, table_levels, vbmi, num_cores, m, rows_per_pass, cpu)
    k, n, vec, width, slots, mt, tables = g.k, g.n, g.vec, g.width, g.slots, g.mt, g.tables
    acc_words, acc16_words, part_words, work_words = g.acc_words, g.acc16_words, g.part_words, g.work_words
    tasks, per_task, row_tiles, blocks, linear, table_a, blocks4 = (g.tasks, g.per_task, g.row_tiles, g.blocks,
                                                                    g.linear, g.table_a, g.blocks4)
    vnni, pairs, acc_at = g.vnni, g.pairs, g.acc_at
    stage, int8_block, store = _gemv_stage(g), _gemv_int8_block(g), _gemv_store(g)
    table_block, linear_block = _gemv_pair_block(g, g.decode), _gemv_pair_block(g, g.fixed)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((m, k), x_dtype),
        w4: T.Buffer(g.w4_shape, "uint8"),
        w8: T.Buffer(g.w8_shape, "int8"),
        dest: T.Buffer((slots,), "int32"),
        bias: T.Buffer((slots,), "int32"),
        scale: T.Buffer((slots,), "float32"),
        out: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xs = T.alloc_buffer((m, width), "int8")
        xe = T.alloc_buffer((m, width), g.xe_dtype)
        offset = T.alloc_buffer((m,), "int32")
        stage(x, xs, xe, offset)
        for task in T.parallel(tasks):
            # buffers in a parallel loop are heap workspaces, each an allocation per task: one,
            # holding the accumulators, the lane sums, four results, both tables and (AVX2) the
            # 16-bit sums and the widened sums per group of steps
            work = T.alloc_buffer((work_words,), "int32", scope="local")
            acc = T.decl_buffer((acc_words,), "int32", data=work.data)
            red = T.decl_buffer((8,), "int32", data=work.data, elem_offset=acc_words)
            res = T.decl_buffer((4,), "float32", data=work.data, elem_offset=acc_words + 8)
            ta = T.decl_buffer((vec,), "int8", data=work.data, elem_offset=(acc_words + 16) * 4)
            tb = T.decl_buffer((vec,), "int8", data=work.data, elem_offset=(acc_words + 16) * 4 + vec)
            acc16 = T.decl_buffer((acc16_words * 2,), "int16", data=work.data,
                                  elem_offset=(acc_words + 16) * 2 + vec)
            parts = T.decl_buffer((part_words,), "int32", data=work.data,
                                  elem_offset=acc_words + 16 + vec // 2 + acc16_words)
            for t in T.unroll(vec):
                ta[t] = tables[0].table_byte(t)
                tb[t] = tables[-1].table_byte(t)
            for tt, rc in T.grid(per_task, row_tiles):
                if task * per_task + tt < blocks:
                    for a in T.unroll(acc_words):
                        acc[a] = 0
                    if task * per_task + tt < linear:
                        linear_block(acc, acc16, parts, xs, w4, task * per_task + tt, rc * mt, ta, tables[0])
                        if vnni:
                            for i in T.unroll(mt):
                                for p in T.unroll(pairs):
                                    acc[acc_at(i, pairs + p)] = acc[acc_at(i, pairs + p)] - acc[acc_at(i, p)]
                    elif task * per_task + tt < table_a:
                        table_block(acc, acc16, parts, xs, w4, task * per_task + tt, rc * mt, ta, tables[0])
                    elif task * per_task + tt < blocks4:
                        table_block(acc, acc16, parts, xs, w4, task * per_task + tt, rc * mt, tb, tables[-1])
                    else:
                        int8_block(acc, xe, w8, task * per_task + tt - blocks4, rc * mt)
                    store(acc, red, res, offset, dest, bias, scale, out, task * per_task + tt, rc * mt)

    return kernel
