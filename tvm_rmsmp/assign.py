"""Row-assignment rules: which rows of a layer get which scheme, at exactly the ratio's counts.

A rule is a function ``rule(weight, ratio, *, input_sq=None) -> tuple of scheme names``
(one per output row), registered by name. ``weight`` is the float weight with the output row
on axis 0; ``input_sq`` (optional) is the mean square of the layer's input per input feature
(per input channel for convolutions), from calibration data.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .plan import row_counts
from .schemes import get_scheme

__all__ = ["register_assign_rule", "get_assign_rule", "assign_rows", "row_sensitivity", "row_kurtosis"]

AssignRule = Callable[..., Tuple[str, ...]]
_RULES: Dict[str, AssignRule] = {}


def register_assign_rule(name: str):
    def deco(fn: AssignRule) -> AssignRule:
        _RULES[name] = fn
        return fn

    return deco


def get_assign_rule(name: str) -> AssignRule:
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(f"unknown row-assignment rule {name!r}; available: {sorted(_RULES)}") from None


def assign_rows(weight: np.ndarray, ratio: Dict[str, float], rule: str = "variance", **kw) -> Tuple[str, ...]:
    schemes = get_assign_rule(rule)(np.asarray(weight, dtype=np.float64), ratio, **kw)
    counts = row_counts(weight.shape[0], ratio)
    got = {s: schemes.count(s) for s in counts}
    if got != counts:
        raise AssertionError(f"rule {rule!r} broke the ratio: {got} != {counts}")
    return schemes


def _input_weight(weight: np.ndarray, input_sq: Optional[np.ndarray]) -> np.ndarray:
    """Broadcast per-input-feature mean squares to the weight's ``[out, ...]`` shape (minus axis 0)."""
    if input_sq is None:
        return np.ones(weight.shape[1:])
    h = np.asarray(input_sq, dtype=np.float64)
    if h.shape[0] != weight.shape[1]:
        raise ValueError(f"input_sq has {h.shape[0]} features, weight has {weight.shape[1]} inputs")
    return h.reshape((-1,) + (1,) * (weight.ndim - 2)) * np.ones(weight.shape[1:])


def row_sensitivity(weight: np.ndarray, scheme_name: str, input_sq: Optional[np.ndarray] = None) -> np.ndarray:
    """Output-error proxy of quantizing each row with ``scheme_name``.

    ``sum_k (w_nk - Q(w_nk))^2 * E[x_k^2]``: the diagonal of the layer-local Hessian
    ``E[x x^T]`` weighting the row's quantization error. Cheap, data-aware, no backprop.
    """
    s = get_scheme(scheme_name)
    w_int, scale = s.quantize(weight)
    err = (weight - s.decode(w_int, scale).astype(np.float64)) ** 2
    h = _input_weight(weight, input_sq)
    return (err * h).reshape(weight.shape[0], -1).sum(axis=1)


def row_kurtosis(weight: np.ndarray) -> np.ndarray:
    """Kurtosis per row: about 3 for Gaussian-like rows, 1.8 for uniform-like rows."""
    w = weight.reshape(weight.shape[0], -1)
    c = w - w.mean(axis=1, keepdims=True)
    var = (c**2).mean(axis=1)
    k4 = (c**4).mean(axis=1)
    return np.where(var > 0, k4 / np.maximum(var, 1e-300) ** 2, 0.0)


def _take_top(order: Sequence[int], free: np.ndarray, count: int) -> np.ndarray:
    picked = [i for i in order if free[i]][:count]
    free[picked] = False
    return np.array(picked, dtype=np.int64)


@register_assign_rule("variance")
def assign_by_variance(weight: np.ndarray, ratio: Dict[str, float], *, input_sq=None) -> Tuple[str, ...]:
    """The simple rule.

    1. Schemes with more bits than the narrowest one take, widest first, the rows whose
       quantization with the narrowest scheme hurts the output most (:func:`row_sensitivity`).
    2. The remaining rows are split by the shape of their weight distribution: the most
       peaked (highest kurtosis, Gaussian-like) rows go to SP2 schemes, whose levels crowd
       near zero; the flattest (uniform-like) rows go to fixed-point schemes.
    """
    n = weight.shape[0]
    counts = row_counts(n, ratio)
    active = [s for s in ratio if counts[s] > 0] or list(ratio)
    min_bits = min(get_scheme(s).bits for s in active)
    narrow = [s for s in active if get_scheme(s).bits == min_bits]
    wide = sorted((s for s in active if get_scheme(s).bits > min_bits), key=lambda s: -get_scheme(s).bits)
    out = np.empty(n, dtype=object)
    free = np.ones(n, dtype=bool)
    if wide:
        probe = next((s for s in narrow if get_scheme(s).kind == "fixed"), narrow[0])
        sens = row_sensitivity(weight, probe, input_sq)
        order = list(np.argsort(-sens, kind="stable"))
        for s in wide:
            out[_take_top(order, free, counts[s])] = s
    kurt_order = list(np.argsort(-row_kurtosis(weight), kind="stable"))
    for s in sorted(narrow, key=lambda s: get_scheme(s).kind != "sp2"):
        out[_take_top(kurt_order, free, counts[s])] = s
    return tuple(out)
