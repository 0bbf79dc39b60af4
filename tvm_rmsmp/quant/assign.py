"""Row-assignment rules: which rows of a layer get which scheme, at exactly the ratio's counts.

A rule is a function ``rule(weight, ratio, *, input_sq=None, row_hessian=None) -> tuple of
scheme names`` (one per output row), registered by name. ``weight`` is the float weight with
the output row on axis 0; ``input_sq`` is the calibration mean square of the layer's input
per input feature (per input channel for convolutions); ``row_hessian`` is the per-row trace
of the loss Hessian's diagonal block (:mod:`tvm_rmsmp.nn.hessian`), given to rules registered
with ``needs_hessian=True``.

Every rule first gives the rows that hurt the output most at 4 bits to the wider schemes
(e.g. ``fixed_8``), then splits the rest between the narrow schemes (SP2 vs fixed point);
the rules differ in how they measure "hurt" and how they split.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .plan import row_counts
from .schemes import get_scheme

__all__ = [
    "register_assign_rule", "get_assign_rule", "rule_needs_hessian", "assign_rows", "row_sensitivity",
    "row_kurtosis", "hessian_row_error",
]

AssignRule = Callable[..., Tuple[str, ...]]
_RULES: Dict[str, AssignRule] = {}
_NEEDS_HESSIAN: Dict[str, bool] = {}


def register_assign_rule(name: str, needs_hessian: bool = False):
    def deco(fn: AssignRule) -> AssignRule:
        _RULES[name] = fn
        _NEEDS_HESSIAN[name] = needs_hessian
        return fn

    return deco


def get_assign_rule(name: str) -> AssignRule:
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(f"unknown row-assignment rule {name!r}; available: {sorted(_RULES)}") from None


def rule_needs_hessian(name: str) -> bool:
    get_assign_rule(name)
    return _NEEDS_HESSIAN[name]


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


def _squared_error(weight: np.ndarray, scheme_name: str) -> np.ndarray:
    s = get_scheme(scheme_name)
    w_int, scale = s.quantize(weight)
    return (weight - s.decode(w_int, scale).astype(np.float64)) ** 2


def row_sensitivity(weight: np.ndarray, scheme_name: str, input_sq: Optional[np.ndarray] = None) -> np.ndarray:
    """Output-error proxy of quantizing each row with ``scheme_name``.

    ``sum_k (w_nk - Q(w_nk))^2 * E[x_k^2]``: the diagonal of the layer-local Hessian
    ``E[x x^T]`` weighting the row's quantization error. Cheap, data-aware, no backprop.
    """
    err = _squared_error(weight, scheme_name) * _input_weight(weight, input_sq)
    return err.reshape(weight.shape[0], -1).sum(axis=1)


def hessian_row_error(weight: np.ndarray, scheme_name: str, row_hessian: np.ndarray,
                      input_sq: Optional[np.ndarray] = None) -> np.ndarray:
    """Second-order loss increase of quantizing each row with ``scheme_name``.

    With a Kronecker-factored Hessian diagonal ``H_rk = g_r * E[x_k^2]`` (output curvature
    times input energy), ``Tr(H_r) = g_r * sum_k E[x_k^2]``, so the loss increase
    ``1/2 sum_k H_rk dw_rk^2`` is ``Tr(H_r) * sum_k E[x_k^2] dw_rk^2 / sum_k E[x_k^2]`` (up to
    the 1/2): the row's Hessian trace times its input-weighted mean squared error.
    """
    h = _input_weight(weight, input_sq)
    err = (_squared_error(weight, scheme_name) * h).reshape(weight.shape[0], -1).sum(axis=1)
    return np.asarray(row_hessian, dtype=np.float64) * err / h.sum()


def row_kurtosis(weight: np.ndarray) -> np.ndarray:
    """Kurtosis per row: about 3 for Gaussian-like rows, 1.8 for uniform-like rows."""
    w = weight.reshape(weight.shape[0], -1)
    c = w - w.mean(axis=1, keepdims=True)
    var = (c**2).mean(axis=1)
    k4 = (c**4).mean(axis=1)
    # rows of zeros (pruned) or of nearly equal weights have no kurtosis: 0, without a 0/0 warning
    return np.divide(k4, var**2, out=np.zeros_like(k4), where=var**2 > 0)


def _take_top(order: Sequence[int], free: np.ndarray, count: int) -> np.ndarray:
    picked = [i for i in order if free[i]][:count]
    free[picked] = False
    return np.array(picked, dtype=np.int64)


def _assign(weight: np.ndarray, ratio: Dict[str, float], hurt: Callable[[str], np.ndarray],
            sp2_first: np.ndarray) -> Tuple[str, ...]:
    """Wider schemes take, widest first, the rows with the largest ``hurt(narrow fixed scheme)``;
    the narrow schemes split the rest, SP2 schemes taking rows in the order of ``sp2_first``
    (descending) and fixed-point schemes the remaining ones."""
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
        order = list(np.argsort(-hurt(probe), kind="stable"))
        for s in wide:
            out[_take_top(order, free, counts[s])] = s
    split_order = list(np.argsort(-sp2_first, kind="stable"))
    for s in sorted(narrow, key=lambda s: get_scheme(s).kind != "sp2"):
        out[_take_top(split_order, free, counts[s])] = s
    return tuple(out)


def _narrow_pair(ratio: Dict[str, float]) -> Tuple[List[str], List[str]]:
    names = [s for s in ratio if ratio[s] > 0]
    min_bits = min(get_scheme(s).bits for s in names)
    narrow = [s for s in names if get_scheme(s).bits == min_bits]
    return [s for s in narrow if get_scheme(s).kind == "sp2"], [s for s in narrow if get_scheme(s).kind != "sp2"]


@register_assign_rule("variance")
def assign_by_variance(weight: np.ndarray, ratio: Dict[str, float], *, input_sq=None, **_) -> Tuple[str, ...]:
    """The simple rule, no backprop.

    1. Schemes with more bits than the narrowest take, widest first, the rows whose
       quantization with the narrowest fixed scheme hurts the output most (:func:`row_sensitivity`).
    2. The rest split by the shape of their weight distribution: the most peaked (highest
       kurtosis, Gaussian-like) rows go to SP2 schemes, whose levels crowd near zero; the
       flattest (uniform-like) rows go to fixed point.
    """
    return _assign(weight, ratio, lambda s: row_sensitivity(weight, s, input_sq), row_kurtosis(weight))


def _check_hessian(weight: np.ndarray, row_hessian) -> np.ndarray:
    if row_hessian is None:
        raise ValueError("this rule needs row_hessian (per-row Hessian traces from tvm_rmsmp.nn.hessian)")
    h = np.asarray(row_hessian, dtype=np.float64)
    if h.shape != (weight.shape[0],):
        raise ValueError(f"row_hessian has shape {h.shape}, the weight has {weight.shape[0]} rows")
    return h


@register_assign_rule("hessian", needs_hessian=True)
def assign_by_hessian(weight: np.ndarray, ratio: Dict[str, float], *, input_sq=None, row_hessian=None,
                      **_) -> Tuple[str, ...]:
    """The paper's rule: the wide schemes take the rows with the largest second-order loss
    increase at 4 bits (:func:`hessian_row_error`); the rest split by kurtosis as in ``variance``."""
    h = _check_hessian(weight, row_hessian)
    return _assign(weight, ratio, lambda s: hessian_row_error(weight, s, h, input_sq), row_kurtosis(weight))


@register_assign_rule("hessian_error", needs_hessian=True)
def assign_by_hessian_error(weight: np.ndarray, ratio: Dict[str, float], *, input_sq=None, row_hessian=None,
                            **_) -> Tuple[str, ...]:
    """Like ``hessian`` for the wide schemes; the 4-bit rows go to SP2 where the loss notices
    SP2's extra error least: ascending ``hessian_row_error(sp2) - hessian_row_error(fixed)``."""
    h = _check_hessian(weight, row_hessian)
    sp2, fixed = _narrow_pair(ratio)
    if sp2 and fixed:
        gap = hessian_row_error(weight, sp2[0], h, input_sq) - hessian_row_error(weight, fixed[0], h, input_sq)
    else:
        gap = np.zeros(weight.shape[0])
    return _assign(weight, ratio, lambda s: hessian_row_error(weight, s, h, input_sq), -gap)
