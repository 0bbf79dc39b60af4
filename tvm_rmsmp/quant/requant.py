"""Integer-only requantization: an int32 accumulator to int8 / uint8 codes, no float at run time.

The arithmetic (``RMSMPConfig(requant="fixed_point")``; every target and the torch reference
compute exactly this):

1. ``x = acc + bias_int`` (int32; the layer's integer bias, zero point folded in as before).
2. A real multiplier ``scale = acc_scale / out_act_scale`` (per output row: the layer's input
   scale times the row's weight scale, over the scale of the output codes) is stored as a
   positive 16-bit integer ``m`` and a right shift ``s``: ``scale ~= m * 2^-s`` with
   ``2^14 <= m < 2^15`` (15 significant bits, relative error <= 2^-16) and ``1 <= s <= 63``
   (:func:`quantize_multiplier`). 16 bits because that is the multiplier width of the
   accelerator's ALU (``tvm_rmsmp/fpga/rtl/requant_alu.v``, op ``mul_shift``); the error it
   adds is below 0.004 of an output code for codes up to 255.
3. **One rounding shift** (not gemmlowp's SaturatingRoundingDoublingHighMul followed by a
   second rounding shift): ``q = (x * m + 2^(s-1)) >> s`` with ``>>`` the arithmetic (floor)
   shift, i.e. ``floor(x * m / 2^s + 1/2)``: round to nearest, **ties toward +infinity**
   (``-2.5 -> -2``, ``2.5 -> 3``). ``x * m`` needs at most 31 + 15 = 46 bits plus sign: the
   ALU's product is 49 bits wide, and a float64 evaluation of ``x * (m * 2^-s) + 0.5`` is exact
   too (that is how the CPU kernels compute it).
4. ``q + zero_point`` (the output zero point; 0 for the symmetric and unsigned codes RMSMP
   uses), then **saturation** to ``[qmin, qmax]``: ``[-qmax, qmax]`` for signed codes
   (symmetric, ``-128`` unused) or ``[0, 2^bits - 1]`` for unsigned ones, which is where a
   ReLU after the layer folds in: an unsigned clamp at 0 is the ReLU.

The codes stand for ``q * out_act_scale``; a consumer layer quantizing with the same scale
gets ``q`` back exactly (``|q| <= 255``), so chained layers need no float step between them.

**Residual adds** (:func:`add_multipliers`, :func:`requantize_add`): two code tensors ``qa`` (scale
``sa``) and ``qb`` (scale ``sb``) to codes at ``so``, in one pass of the ALU:
``clamp((qa * ma + qb * mb + 2^(S-1)) >> S, qmin, qmax)`` with one shared shift ``S`` and two
16-bit multipliers ``ma ~= sa / so * 2^S``, ``mb ~= sb / so * 2^S``, the larger in
``[2^14, 2^15)`` (the same 15 significant bits as a layer's multiplier), the smaller rounded at
the same ``2^-S`` step (so it may be small, even 0 when ``sb`` is negligible next to ``sa``).
Both are rounded from the *exact* ratios (fractions of the float scales), half up. A ReLU after
the add folds into ``qmin = 0``. Why not gemmlowp / TFLite's ADD (inputs shifted left by 20
bits, three 32-bit SaturatingRoundingDoublingHighMul): its extra precision (2^-31 per
multiplier) buys nothing at 8-bit outputs. Here the error of the integer sum before rounding
is at most ``(|qa| + |qb|) / 2 * 2^-S`` output steps, below ``255 * 2^-15 * max(sa, sb) / so``,
i.e. under 0.008 of an output code per unit of ``max(sa, sb) / so``; and the 16-bit multipliers
and one shift are what the accelerator's ALU has (op ``madd_shift`` of
``tvm_rmsmp/fpga/rtl/requant_alu.v``): one pass, no second rounding. The products fit 9 + 15
bits, their sum 25 bits plus the rounding term: exact in int64 everywhere.

numpy only (the ``quant`` part of the house).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Tuple

import numpy as np

__all__ = ["MULT_BITS", "SHIFT_MAX", "quantize_multiplier", "quantize_multipliers", "requantize",
           "multiplier_value", "add_multipliers", "requantize_add"]

#: Bits of the signed multiplier ``m`` (positive: 15 significant bits).
MULT_BITS = 16
#: Largest right shift (the ALU's 6-bit shift operand).
SHIFT_MAX = 63
_M_LO, _M_HI = 1 << (MULT_BITS - 2), 1 << (MULT_BITS - 1)  # 2^14 <= m < 2^15


def quantize_multiplier(scale: float) -> Tuple[int, int]:
    """``(m, s)`` with ``m * 2^-s`` the nearest 15-bit-mantissa value to ``scale`` (> 0, finite):
    ``2^14 <= m < 2^15``, ``1 <= s <= 63``. Raises ValueError for a scale outside
    ``[2^-49, 2^14)`` (no such pair), zero, negative or not finite."""
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"requantization scale must be positive and finite, got {scale!r}")
    frac, exp = math.frexp(scale)  # scale = frac * 2^exp, 0.5 <= frac < 1
    m = int(round(frac * _M_HI))  # in [2^14, 2^15]
    if m == _M_HI:
        m, exp = _M_LO, exp + 1
    s = (MULT_BITS - 1) - exp
    if not 1 <= s <= SHIFT_MAX:
        raise ValueError(f"requantization scale {scale:g} is out of range for a {MULT_BITS}-bit multiplier and a "
                         f"right shift in [1, {SHIFT_MAX}] (it needs shift {s})")
    return m, s


def quantize_multipliers(scales) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_multiplier` for each entry: ``(m, s)`` int32 arrays of the same shape."""
    scales = np.asarray(scales, np.float64)
    pairs = [quantize_multiplier(v) for v in scales.ravel()]
    m = np.array([p[0] for p in pairs], np.int32).reshape(scales.shape)
    s = np.array([p[1] for p in pairs], np.int32).reshape(scales.shape)
    return m, s


def multiplier_value(m, s) -> np.ndarray:
    """``m * 2^-s`` as float32: exact (15-bit ``m``, ``s <= 63``), the form the compiled ops carry."""
    return np.ldexp(np.asarray(m, np.float64), -np.asarray(s, np.int64)).astype(np.float32)


def requantize(x, m, s, qmin: int, qmax: int, zero_point: int = 0) -> np.ndarray:
    """``clamp(((x * m + 2^(s-1)) >> s) + zero_point, qmin, qmax)`` as int32, exact.

    ``x``: int32 values ``acc + bias`` (any integer array within int32); ``m``, ``s``: the
    multiplier and shift, broadcast against ``x`` (per row: shape them to the row axis)."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"requantize takes integer accumulators, got dtype {x.dtype}")
    m = np.asarray(m, np.int64)
    s = np.asarray(s, np.int64)
    if np.any(m <= 0) or np.any(m >= _M_HI) or np.any(s < 1) or np.any(s > SHIFT_MAX):
        raise ValueError(f"requantize: multipliers must be in [1, 2^{MULT_BITS - 1}) and shifts in [1, {SHIFT_MAX}]")
    x = x.astype(np.int64)
    if np.any(np.abs(x) >= 1 << 31):
        raise ValueError("requantize: accumulators must be within int32")
    q = (x * m + (np.int64(1) << (s - 1))) >> s  # < 2^47 in magnitude: exact in int64
    return np.clip(q + int(zero_point), qmin, qmax).astype(np.int32)


def _half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def add_multipliers(scale_a: float, scale_b: float, scale_out: float) -> Tuple[int, int, int]:
    """``(ma, mb, S)`` of a residual add (module docstring): ``ma = round(sa / so * 2^S)``,
    ``mb = round(sb / so * 2^S)`` from the exact ratios of the given (float) scales, half up,
    with ``S`` the shift that puts the larger in ``[2^14, 2^15)``. Raises ValueError naming the
    scales when one is not positive and finite or the shift falls outside ``[1, 63]``."""
    scales = (scale_a, scale_b, scale_out)
    if not all(math.isfinite(float(v)) and float(v) > 0 for v in scales):
        raise ValueError(f"add scales must be positive and finite, got sa={scale_a!r}, sb={scale_b!r}, "
                         f"so={scale_out!r}")
    ra, rb = (Fraction(float(v)) / Fraction(float(scale_out)) for v in (scale_a, scale_b))
    big = max(ra, rb)
    shift = (MULT_BITS - 2) - (big.numerator.bit_length() - big.denominator.bit_length())
    while big * 2**shift >= _M_HI:  # bring round(big * 2^S) into [2^14, 2^15)
        shift -= 1
    while big * 2**shift < _M_LO:
        shift += 1
    if _half_up(big * 2**shift) == _M_HI:
        shift -= 1
    if not 1 <= shift <= SHIFT_MAX:
        raise ValueError(f"add scales sa={scale_a:g}, sb={scale_b:g} over so={scale_out:g} need shift {shift}, "
                         f"outside [1, {SHIFT_MAX}] for {MULT_BITS}-bit multipliers")
    return _half_up(ra * 2**shift), _half_up(rb * 2**shift), shift


def requantize_add(qa, qb, ma: int, mb: int, shift: int, qmin: int, qmax: int) -> np.ndarray:
    """``clamp((qa * ma + qb * mb + 2^(S-1)) >> S, qmin, qmax)`` as int32, exact (``>>`` the
    floor shift: round to nearest, ties toward +infinity); ``qa``, ``qb`` integer codes of one
    shape (or broadcasting), ``|code| <= 255``."""
    qa, qb = np.asarray(qa), np.asarray(qb)
    for what, q in (("qa", qa), ("qb", qb)):
        if q.dtype.kind not in "iu":
            raise TypeError(f"requantize_add takes integer codes, got {what} of dtype {q.dtype}")
        if q.size and int(np.abs(q.astype(np.int64)).max()) > 255:
            raise ValueError(f"requantize_add: {what} holds values beyond 8-bit codes (|q| <= 255)")
    if not (0 <= ma < _M_HI and 0 <= mb < _M_HI and 1 <= shift <= SHIFT_MAX):
        raise ValueError(f"requantize_add: multipliers must be in [0, 2^{MULT_BITS - 1}) and the shift in "
                         f"[1, {SHIFT_MAX}], got ma={ma}, mb={mb}, shift={shift}")
    acc = qa.astype(np.int64) * int(ma) + qb.astype(np.int64) * int(mb) + (1 << (int(shift) - 1))
    return np.clip(acc >> int(shift), qmin, qmax).astype(np.int32)
