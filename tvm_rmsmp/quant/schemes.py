"""Row quantization schemes: exact integer level sets, encode/decode and per-row scales.

This module knows nothing of TVM. A scheme maps one weight row to integers ``w_int`` and one
float ``row_scale`` so that the dequantized row is ``row_scale * w_int``. Schemes live in a
named registry; adding one is a single :func:`register_scheme` call and every other part of
the project (row plans, graph passes, kernels) picks it up from its ``kind`` and ``levels``.

Two kinds exist, after the RMSMP paper:

* ``"fixed"``: uniform, symmetric; ``w_int`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``. Lowered to
  integer multiply-accumulate.
* ``"sp2"``: sum of two powers of two; a level is ``+-(q1 + q2)`` with
  ``q1 in {0, 2^-1, ..., 2^-(2^m1-1)}`` and ``q2 in {0, 2^-1, ..., 2^-(2^m2-1)}``. As integers
  (``w_int = 2^E (q1 + q2)``, ``E`` the largest exponent) every product is at most two shifts
  and an add. Lowered to shift-add.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable, Tuple

import attrs
import numpy as np

__all__ = [
    "Scheme",
    "register_scheme",
    "get_scheme",
    "list_schemes",
    "SP2_TERM_BITS",
    "sp2_encode",
    "sp2_decode",
    "nibble_codes",
    "nibble_decode",
    "pack_nibbles",
]

#: Rows whose largest magnitude is below this are treated as all-zero (their scale would underflow).
_NEGLIGIBLE = 1e-30

#: Bits per shift field in the target-neutral SP2 code (see :func:`sp2_encode`).
SP2_TERM_BITS = 3


def _validate_kind(instance, attribute, value):
    if value not in ("fixed", "sp2"):
        raise ValueError(f"scheme kind must be 'fixed' or 'sp2', got {value!r}")


@attrs.frozen(eq=False)
class Scheme:
    """One row quantization scheme.

    ``levels`` are the sorted, symmetric integer levels; ``divisor`` maps them to the
    normalized range ``[-1, 1]`` (the largest level over ``divisor`` is 1), so a row with
    clipping threshold ``alpha`` gets ``row_scale = alpha / divisor``.
    """

    name: str
    kind: str = attrs.field(validator=_validate_kind)
    bits: int = attrs.field(validator=attrs.validators.instance_of(int))
    m1: int = 0
    m2: int = 0

    @bits.validator
    def _check_bits(self, attribute, value):
        if not 2 <= value <= 8:
            raise ValueError(f"scheme {self.name!r}: bits must be in [2, 8] (int8 storage), got {value}")
        if self.kind == "sp2" and value != self.m1 + self.m2 + 1:
            raise ValueError(
                f"scheme {self.name!r}: an SP2 scheme has bits = m1 + m2 + 1, "
                f"got bits={value}, m1={self.m1}, m2={self.m2}"
            )
        if self.kind == "sp2" and (self.m1 < 1 or self.m2 < 1):
            raise ValueError(f"scheme {self.name!r}: SP2 needs m1 >= 1 and m2 >= 1")
        if self.kind == "sp2" and self._max_exponent() + 1 >= 2**SP2_TERM_BITS:
            raise ValueError(f"scheme {self.name!r}: SP2 exponents too large for the kernel code")

    # ----- level set -------------------------------------------------------------------------
    def _max_exponent(self) -> int:
        return max(2**self.m1 - 1, 2**self.m2 - 1)

    @property
    def divisor(self) -> int:
        """Integer that maps ``w_int`` to normalized units: ``w = w_int / divisor`` in [-1, 1]."""
        if self.kind == "fixed":
            return 2 ** (self.bits - 1) - 1
        return int(max(self.levels))

    @property
    def int_scale(self) -> int:
        """For SP2: ``w_int = int_scale * (q1 + q2)``; for fixed: 1."""
        return 2 ** self._max_exponent() if self.kind == "sp2" else 1

    def sp2_terms(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """Integer magnitudes each SP2 term may take (0 included): ``(T1, T2)``."""
        e = self._max_exponent()
        t1 = (0,) + tuple(2 ** (e - i) for i in range(1, 2**self.m1))
        t2 = (0,) + tuple(2 ** (e - i) for i in range(1, 2**self.m2))
        return t1, t2

    @property
    def levels(self) -> np.ndarray:
        return _levels_cached(self.kind, self.bits, self.m1, self.m2)

    @property
    def max_level(self) -> int:
        return int(self.levels[-1])

    # ----- encode / decode -------------------------------------------------------------------
    def encode(self, w: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
        """Nearest level per element: ``w_int[n, :] = argmin_l |w[n, :] - row_scale[n] * l|``."""
        w = np.asarray(w, dtype=np.float64)
        scale = np.asarray(row_scale, dtype=np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
        if np.any(scale <= 0):
            raise ValueError(f"scheme {self.name!r}: row_scale must be positive")
        return _nearest_level(w / scale, self.levels)

    def decode(self, w_int: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
        w_int = np.asarray(w_int)
        scale = np.asarray(row_scale, dtype=np.float32).reshape((-1,) + (1,) * (w_int.ndim - 1))
        return (scale * w_int.astype(np.float32)).astype(np.float32)

    def choose_row_scale(self, w: np.ndarray, grid: int = 40) -> np.ndarray:
        """Per-row scale minimizing the row's squared quantization error.

        Searches clipping thresholds ``alpha = f * max|w_row|`` for ``f`` in ``[0.3, 1]``;
        returns ``alpha / divisor``. Rows that are all zero get scale 1 (any scale is exact).
        """
        w2 = np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)
        amax = np.abs(w2).max(axis=1)
        amax = np.where(amax < _NEGLIGIBLE, 0.0, amax)  # below float32 range once scaled: a zero row
        best_err = np.full(w2.shape[0], np.inf)
        best = amax / self.divisor
        for f in np.linspace(0.3, 1.0, grid):
            scale = np.where(amax > 0, f * amax / self.divisor, 1.0)
            q = _nearest_level(w2 / scale[:, None], self.levels) * scale[:, None]
            err = ((w2 - q) ** 2).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, scale, best)
        return np.where(amax > 0, best, 1.0).astype(np.float32)

    def quantize(self, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(w_int int8, row_scale float32)`` for a weight whose axis 0 is the output row."""
        row_scale = self.choose_row_scale(w)
        return self.encode(w, row_scale).astype(np.int8), row_scale

    def __repr__(self) -> str:
        return f"Scheme({self.name!r}, kind={self.kind!r}, bits={self.bits})"


_LEVEL_CACHE: Dict[tuple, np.ndarray] = {}


def _levels_cached(kind: str, bits: int, m1: int, m2: int) -> np.ndarray:
    key = (kind, bits, m1, m2)
    if key not in _LEVEL_CACHE:
        if kind == "fixed":
            q = 2 ** (bits - 1) - 1
            lv = np.arange(-q, q + 1, dtype=np.int64)
        else:
            e = max(2**m1 - 1, 2**m2 - 1)
            t1 = [0] + [2 ** (e - i) for i in range(1, 2**m1)]
            t2 = [0] + [2 ** (e - i) for i in range(1, 2**m2)]
            mags = sorted({a + b for a, b in itertools.product(t1, t2)})
            lv = np.array(sorted({s * m for m in mags for s in (-1, 1)}), dtype=np.int64)
        lv.setflags(write=False)
        _LEVEL_CACHE[key] = lv
    return _LEVEL_CACHE[key]


def _nearest_level_search(v: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Nearest element of sorted ``levels`` (ties to the level nearer zero), by binary search."""
    mids = (levels[1:] + levels[:-1]) / 2.0
    # side depends on sign so ties round toward zero symmetrically: encode(-w) == -encode(w).
    idx_pos = np.searchsorted(mids, v, side="left")
    idx_neg = np.searchsorted(mids, v, side="right")
    idx = np.where(v >= 0, idx_pos, idx_neg)
    return levels[idx]


_MAGNITUDE_LUT: Dict[bytes, Tuple[np.ndarray, int]] = {}


def _magnitude_lut(levels: np.ndarray) -> Tuple[np.ndarray, int]:
    """For symmetric integer levels: ``lut[c]`` is the nearest non-negative level of any
    ``|v|`` with ``ceil(2|v|) == c`` (ties toward zero). Midpoints of integer levels are
    multiples of 1/2, so no midpoint lies strictly inside such an interval."""
    key = levels.tobytes()
    if key not in _MAGNITUDE_LUT:
        pos = levels[levels >= 0]
        twice_mids = pos[1:] + pos[:-1]
        top = 2 * int(pos[-1]) + 1
        lut = np.array([pos[int((twice_mids <= c - 1).sum())] for c in range(top + 1)], dtype=np.float64)
        _MAGNITUDE_LUT[key] = (lut, top)
    return _MAGNITUDE_LUT[key]


def _nearest_level(v: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Nearest element of sorted ``levels`` (ties to the level nearer zero).

    Levels of the registered schemes are symmetric integers: a table lookup on
    ``ceil(2|v|)`` (exact in float64) replaces the binary search, several times faster."""
    v = np.asarray(v, dtype=np.float64)
    if levels.dtype.kind not in "iu" or not np.array_equal(levels, -levels[::-1]) or not np.all(np.isfinite(v)):
        return _nearest_level_search(v, levels)
    lut, top = _magnitude_lut(levels)
    c = np.minimum(np.ceil(2.0 * np.abs(v)), top).astype(np.int64)
    return (np.copysign(lut[c], v)).astype(levels.dtype) if v.size else levels[:0].reshape(v.shape)


# ----- SP2 kernel code ----------------------------------------------------------------------
def sp2_encode(w_int: np.ndarray, scheme: Scheme) -> np.ndarray:
    """Target-neutral SP2 code per weight (uint8): ``a | b << 3 | sign << 6``.

    ``a`` and ``b`` are the two terms' shift amounts plus one (0 = term absent), so that
    ``|w_int| = ((1 << a) >> 1) + ((1 << b) >> 1)`` and ``x * w_int`` is two masked shifts,
    an add and a conditional negate, all branch-free.
    """
    if scheme.kind != "sp2":
        raise ValueError(f"sp2_encode needs an SP2 scheme, got {scheme.name!r}")
    w_int = np.asarray(w_int, dtype=np.int64)
    table = _sp2_decomposition(scheme)
    mags = np.abs(w_int)
    bad = ~np.isin(mags, list(table))
    if bad.any():
        raise ValueError(
            f"sp2_encode: value {int(w_int[bad][0])} is not a level of scheme {scheme.name!r}"
        )
    lut = np.zeros(scheme.max_level + 1, dtype=np.int64)
    for mag, (a, b) in table.items():
        lut[mag] = a | (b << SP2_TERM_BITS)
    code = lut[mags] | ((w_int < 0).astype(np.int64) << (2 * SP2_TERM_BITS))
    return code.astype(np.uint8)


def sp2_decode(code: np.ndarray) -> np.ndarray:
    """Inverse of :func:`sp2_encode` (int64 values)."""
    code = np.asarray(code, dtype=np.int64)
    mask = (1 << SP2_TERM_BITS) - 1
    a = code & mask
    b = (code >> SP2_TERM_BITS) & mask
    sign = (code >> (2 * SP2_TERM_BITS)) & 1
    mag = ((1 << a) >> 1) + ((1 << b) >> 1)
    return np.where(sign == 1, -mag, mag)


def _sp2_decomposition(scheme: Scheme) -> Dict[int, Tuple[int, int]]:
    """Magnitude -> (a, b) shift fields, first decomposition with the fewest terms."""
    t1, t2 = scheme.sp2_terms()
    out: Dict[int, Tuple[int, int]] = {}
    for x, y in sorted(itertools.product(t1, t2), key=lambda p: ((p[0] > 0) + (p[1] > 0), p)):
        mag = x + y
        if mag not in out:
            out[mag] = (_shift_field(x), _shift_field(y))
    return out


def _shift_field(term: int) -> int:
    return 0 if term == 0 else int(term).bit_length()  # log2(term) + 1


# ----- 4-bit storage: two codes per byte ----------------------------------------------------
def nibble_codes(w_int: np.ndarray, scheme: Scheme) -> np.ndarray:
    """4-bit code per weight of a scheme with ``bits <= 4`` (uint8 values 0..15).

    fixed: the two's-complement low nibble of ``w_int``.
    sp2: ``ia | ib << m1 | sign << (m1 + m2)``, ``ia``/``ib`` indexing the terms of
    :meth:`Scheme.sp2_terms` (0 = term absent), so ``|w| = T1[ia] + T2[ib]``.
    """
    if scheme.bits > 4:
        raise ValueError(f"scheme {scheme.name!r} has {scheme.bits} bits: no 4-bit code")
    w_int = np.asarray(w_int, dtype=np.int64)
    if not np.isin(w_int, scheme.levels).all():
        bad = w_int[~np.isin(w_int, scheme.levels)][0]
        raise ValueError(f"value {int(bad)} is not a level of scheme {scheme.name!r}")
    if scheme.kind == "fixed":
        return (w_int & 0xF).astype(np.uint8)
    t1, t2 = scheme.sp2_terms()
    table = {}
    for i, j in sorted(itertools.product(range(len(t1)), range(len(t2))), key=lambda p: ((p[0] > 0) + (p[1] > 0), p)):
        table.setdefault(t1[i] + t2[j], i | (j << scheme.m1))
    lut = np.zeros(scheme.max_level + 1, dtype=np.int64)
    for mag, code in table.items():
        lut[mag] = code
    sign = (w_int < 0).astype(np.int64) << (scheme.m1 + scheme.m2)
    return (lut[np.abs(w_int)] | sign).astype(np.uint8)


def nibble_decode(codes: np.ndarray, scheme: Scheme) -> np.ndarray:
    """Inverse of :func:`nibble_codes` (int64 values)."""
    c = np.asarray(codes, dtype=np.int64)
    if scheme.kind == "fixed":
        return (c ^ 8) - 8
    t1, t2 = (np.array(t) for t in scheme.sp2_terms())
    ia = c & ((1 << scheme.m1) - 1)
    ib = (c >> scheme.m1) & ((1 << scheme.m2) - 1)
    mag = t1[ia] + t2[ib]
    return np.where((c >> (scheme.m1 + scheme.m2)) & 1, -mag, mag)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """``[rows, ...]`` 4-bit codes -> ``[rows, ceil(R / 2)]`` bytes, R the codes per row; the
    even element of each pair in the low nibble (a missing last one is 0)."""
    flat = np.asarray(codes, dtype=np.uint8).reshape(codes.shape[0], -1)
    if flat.shape[1] % 2:
        flat = np.concatenate([flat, np.zeros((flat.shape[0], 1), np.uint8)], axis=1)
    return (flat[:, 0::2] | (flat[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: ``[rows, bytes]`` -> the first ``count`` codes of each
    row, ``[rows, count]`` uint8."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or not 0 <= count <= 2 * packed.shape[1]:
        raise ValueError(f"unpack_nibbles: [rows, bytes] holding at least {count} codes per row, got {packed.shape}")
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], 2 * packed.shape[1])[:, :count]


# ----- registry -----------------------------------------------------------------------------
_REGISTRY: Dict[str, Scheme] = {}


def register_scheme(scheme: Scheme, *, override: bool = False) -> Scheme:
    """Add ``scheme`` to the registry (its name must be new unless ``override``)."""
    if not isinstance(scheme, Scheme):
        raise TypeError(f"register_scheme expects a Scheme, got {type(scheme).__name__}")
    if scheme.name in _REGISTRY and not override:
        raise ValueError(f"scheme {scheme.name!r} is already registered")
    _REGISTRY[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown quantization scheme {name!r}; registered: {sorted(_REGISTRY)}"
        ) from None


def list_schemes() -> Iterable[str]:
    return tuple(_REGISTRY)


register_scheme(Scheme("sp2_4", kind="sp2", bits=4, m1=2, m2=1))
register_scheme(Scheme("fixed_4", kind="fixed", bits=4))
register_scheme(Scheme("fixed_8", kind="fixed", bits=8))
