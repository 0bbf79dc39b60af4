"""Integer bounds of the x86 kernels' sums, checked when a kernel is built.

Every x86 kernel multiplies an unsigned byte by a signed one (``vpdpbusd`` on VNNI,
``vpmaddubsw`` on AVX2) or two int16 values (``vpmaddwd``: int8 rows on AVX2) and adds the
products up in int32 lanes (VNNI: 4 products per lane per instruction; AVX2 ``vpmaddubsw``:
pair sums in int16, of which up to :data:`~schedules.x86_intrin.PAIR_SUMS16` are added in
int16 before ``vpmaddwd`` with ones widens them). TVM emits ``add nsw`` for these adds: an
overflow is undefined behaviour (poison), not a wrap-around that the offset's subtraction
would undo. So every partial sum must fit, not only the result.

The operands are the values the instruction multiplies, offsets included: signed (int8)
activations meeting bytes make the weights the unsigned operand (4-bit levels ``+ 8``, int8
rows ``+ 128``), unsigned ones are multiplied as they are. A sum of ``K`` products, each in
``[lo, hi]`` (``lo <= 0 <= hi``), has every partial sum, in any order, within
``[K * lo, K * hi]``: that interval must lie inside the accumulator's type. The bounds are
intervals, not magnitudes: with signed activations and the level ``+8``, a pair sum reaches
``2 * (-128) * 16 = -4096`` but only ``2 * 127 * 16 = 4064`` upwards, and eight of them reach
exactly ``-32768``, the least int16.

Worst cases (:func:`max_k`; the int16 column: pair sums that fit, :func:`max_terms` over 2):

==========================================  =====================  ============  =============
MAC operands (activations x weights)        product range          int32: max K  int16 pairs
==========================================  =====================  ============  =============
uint8 x 4-bit levels -8..8                  [-2040, 2040]          1052688       8 (32640)
int8 x 4-bit levels + 8 (0..16)             [-2048, 2032]          1048576       8 (-32768)
uint8 x int8 rows -128..127                 [-32640, 32385]        65793         -- (vpmaddwd)
int8 x int8 rows + 128 (0..255, VNNI)       [-32640, 32385]        65793         --
int8 x int8 rows (AVX2 int16 pairs)         [-16256, 16384]        131071        --
==========================================  =====================  ============  =============

Where a kernel's ``K`` is past its bound it is refused with :class:`KernelBoundError` (a
``ValueError``); ``schedules.cpu.x86_replacement`` then falls back to the portable schedule
with a :class:`KernelBoundWarning`, and the layer kernels do not take the layer.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence, Tuple

Range = Tuple[int, int]

UINT8: Range = (0, 255)
INT8: Range = (-128, 127)
INT16_LIMITS: Range = (-(2**15), 2**15 - 1)
INT32_LIMITS: Range = (-(2**31), 2**31 - 1)
#: largest magnitude of a 4-bit level (SP2-4: -8..8; Fixed-4: -8..7); ``decode_table`` refuses more
LEVEL_BOUND = 8


class KernelBoundError(ValueError):
    """A kernel's integer sums could overflow for the shape asked for (it is not built)."""


class KernelBoundWarning(UserWarning):
    """A row group's reduction is too long for the x86 kernel's integer sums: the portable schedule runs it."""


def operand_range(levels: Optional[Sequence[int]], offset: int = 0) -> Range:
    """The weights as a MAC operand: 4-bit ``levels`` (None: int8 rows, -128..127) plus ``offset``."""
    lo, hi = (INT8 if levels is None else (int(min(levels)), int(max(levels))))
    return lo + offset, hi + offset


def activation_range(x_dtype: str) -> Range:
    return UINT8 if x_dtype == "uint8" else INT8


def product_range(a: Range, b: Range) -> Range:
    corners = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return min(corners), max(corners)


def sum_range(count: int, term: Range) -> Range:
    """Where every partial sum of ``count`` terms in ``term`` lies (any order, any subset)."""
    return count * min(term[0], 0), count * max(term[1], 0)


def max_terms(term: Range, limits: Range = INT32_LIMITS) -> int:
    """The most terms in ``term`` whose partial sums all stay within ``limits``."""
    lo, hi = min(term[0], 0), max(term[1], 0)
    bounds = [limits[1] // hi] if hi > 0 else []
    if lo < 0:
        bounds.append(limits[0] // lo)  # both negative: floor of the positive ratio
    return min(bounds) if bounds else sys.maxsize


def max_k(x: Range, w: Range, offset: int = 0) -> int:
    """The longest reduction (products of ``x`` and ``w``, int32 sums) a kernel may run; with
    ``offset``, the int32 activation sums ``offset * sum(x)`` must fit too."""
    k = max_terms(product_range(x, w))
    return min(k, max_terms(product_range(x, (offset, offset)))) if offset else k


def describe(x_dtype: str, levels: Optional[Sequence[int]], x: Range, w: Range) -> str:
    weights = "int8 rows -128..127" if levels is None else f"4-bit levels {min(levels)}..{max(levels)}"
    return f"{x_dtype} activations x {weights} (MAC operands {list(x)} x {list(w)})"


def _refuse(kernel: str, k: int, what: str, count: int, term: Range, limits: Range, bits: int, most: str) -> None:
    reach = sum_range(count, term)
    if limits[0] <= reach[0] and reach[1] <= limits[1]:
        return
    raise KernelBoundError(
        f"{kernel}: k = {k} is too long for the int{bits} sums of {what}: {count} terms in {list(term)} reach "
        f"{list(reach)}, past [{limits[0]}, {limits[1]}]; {most}")


def check_accumulators(kernel: str, k: int, x: Range, w: Range, what: str, *, offset: int = 0,
                       int16_pairs: int = 0, wide_pairs: bool = False, terms: Optional[int] = None) -> None:
    """Refuse (:class:`KernelBoundError`) unless every integer sum of a kernel's reduction of
    length ``k`` fits its type. ``x``, ``w``: the MAC's operands (offsets included); ``what``
    names them for the message (:func:`describe`).

    * int32: the ``k`` products (partial sums, the lanes' totals);
    * int32 (``offset``): ``offset * sum(x)``, the offset's share taken off afterwards;
    * int16 (``int16_pairs``, AVX2 ``vpmaddubsw``): one pair sum (2 products; the instruction
      saturates) and ``int16_pairs`` of them added in int16 before they are widened;
    * int32 (``wide_pairs``, ``vpmaddwd``): one pair sum of int16 products.

    ``terms``: products per int32 sum where that is not ``k`` (one lane's share).
    """
    term = product_range(x, w)
    limit = max_k(x, w, offset)
    if terms is None:
        _refuse(kernel, k, what, k, term, INT32_LIMITS, 32, f"at most k = {limit}")
    else:
        _refuse(kernel, k, what, terms, term, INT32_LIMITS, 32, f"at most {max_terms(term)} terms")
    if offset:
        _refuse(kernel, k, f"the activation sums times the offset {offset}", k, product_range(x, (offset, offset)),
                INT32_LIMITS, 32, f"at most k = {limit}")
    if wide_pairs:
        _refuse(kernel, k, f"vpmaddwd pair sums of {what}", 2, term, INT32_LIMITS, 32, "no K fits")
    if int16_pairs:
        _refuse(kernel, k, f"vpmaddubsw pair sums of {what}", 2, term, INT16_LIMITS, 16, "no K fits")
        _refuse(kernel, k, f"{int16_pairs} vpmaddubsw pair sums added in int16 of {what}", 2 * int16_pairs, term,
                INT16_LIMITS, 16, f"at most {max_terms(term, INT16_LIMITS) // 2} pair sums fit")


def check_pair_sums16(pair_sums: int, level_bound: int = LEVEL_BOUND) -> None:
    """``pair_sums`` ``vpmaddubsw`` pair sums of 4-bit levels within ``+-level_bound`` fit int16,
    for both activation signednesses (unsigned: ``x * level``; signed: ``(level + 8) * x``)."""
    levels = (-level_bound, level_bound)
    for x_dtype, w in (("uint8", operand_range(levels)), ("int8", operand_range(levels, 8))):
        x = activation_range(x_dtype)
        reach = sum_range(2 * pair_sums, product_range(x, w))
        if not (INT16_LIMITS[0] <= reach[0] and reach[1] <= INT16_LIMITS[1]):
            raise AssertionError(f"PAIR_SUMS16 = {pair_sums}: {pair_sums} pair sums of {describe(x_dtype, levels, x, w)} "
                                 f"reach {list(reach)}, past int16")
