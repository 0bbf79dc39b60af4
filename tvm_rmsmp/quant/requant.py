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

numpy only (the ``quant`` part of the house).
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

__all__ = ["MULT_BITS", "SHIFT_MAX", "quantize_multiplier", "quantize_multipliers", "requantize",
           "multiplier_value"]

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
