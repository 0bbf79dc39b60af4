"""Row plans: which scheme each output row of a layer uses, and its integers and scale."""

from __future__ import annotations

from typing import Dict, List, Tuple

import attrs
import numpy as np

from .schemes import get_scheme

__all__ = ["RowPlan", "row_counts"]


def row_counts(n_rows: int, ratio: Dict[str, float]) -> Dict[str, int]:
    """Rows per scheme for a layer of ``n_rows`` rows: largest-remainder rounding.

    Each count is ``floor(share * n)`` or one more, so it is within one row of ``share * n``
    and the counts sum to ``n``. Remainder rows go to the largest fractional parts; ties go to
    the scheme listed first in the ratio. A layer with fewer rows than schemes therefore gives
    its rows to the schemes with the largest shares.
    """
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    names = list(ratio)
    exact = np.array([ratio[n] * n_rows for n in names], dtype=np.float64)
    base = np.floor(exact + 1e-9).astype(np.int64)
    left = n_rows - int(base.sum())
    frac = exact - base
    order = sorted(range(len(names)), key=lambda i: (-round(frac[i], 9), i))
    for i in order[:left]:
        base[i] += 1
    return {n: int(c) for n, c in zip(names, base)}


@attrs.frozen(eq=False)
class RowPlan:
    """The quantized form of one dense/conv layer.

    schemes: one scheme name per output row.
    weight_int: int8 array ``[out, ...]`` (the layer's weight shape), levels of each row's scheme.
    row_scale: float32 ``[out]``; dequantized weight is ``row_scale[n] * weight_int[n]``.
    """

    layer: str
    op: str  # "dense" | "conv2d"
    schemes: Tuple[str, ...] = attrs.field(converter=tuple)
    weight_int: np.ndarray = attrs.field(repr=False)
    row_scale: np.ndarray = attrs.field(repr=False)

    def __attrs_post_init__(self):
        n = self.weight_int.shape[0]
        if len(self.schemes) != n or self.row_scale.shape != (n,):
            raise ValueError(
                f"layer {self.layer!r}: plan has {len(self.schemes)} schemes and "
                f"{self.row_scale.shape} scales for {n} rows"
            )
        for s in set(self.schemes):
            get_scheme(s)

    @property
    def num_rows(self) -> int:
        return self.weight_int.shape[0]

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for s in self.schemes:
            out[s] = out.get(s, 0) + 1
        return out

    def groups(self, order=None) -> List[Tuple[str, np.ndarray]]:
        """``[(scheme, row indices)]`` for each non-empty group, in ``order`` (default: first use)."""
        names = list(order) if order is not None else list(dict.fromkeys(self.schemes))
        arr = np.array(self.schemes, dtype=object)
        out = []
        for name in names:
            idx = np.nonzero(arr == name)[0]
            if idx.size:
                out.append((name, idx.astype(np.int64)))
        missing = set(self.schemes) - set(names)
        if missing:
            raise ValueError(f"layer {self.layer!r}: schemes {sorted(missing)} missing from group order")
        return out

    def dequantized(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.weight_int.ndim - 1)
        return (self.row_scale.reshape(shape) * self.weight_int.astype(np.float32)).astype(np.float32)
