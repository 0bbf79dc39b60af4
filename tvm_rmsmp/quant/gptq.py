"""Error-compensating rounding of a layer's rows onto their own grids (GPTQ), numpy only.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", 2022, arXiv:2210.17323; after OBQ, Frantar & Alistarh
2022) rounds a weight matrix ``W [rows, K]`` column by column and, after each column, moves
that column's rounding error onto the columns not yet rounded, so that the layer's output
error on the calibration inputs ``||(W - Q) X||^2 = tr((W - Q) H (W - Q)^T)``,
``H = E[x x^T]``, is (greedily) minimal rather than each weight's own error. The update for
column ``j`` is the Optimal Brain Surgeon step with the inverse Hessian of the columns still
free; GPTQ reads all of them from one upper Cholesky factor ``U`` of ``H^-1``
(``H^-1 = U^T U``) and applies it in lazy blocks of 128 columns.

RMSMP rows differ only in their grid: every row is rounded to the nearest level of its own
scheme (``row_scale * level``, clamped to the scheme's range), and since the GPTQ update never
mixes rows, each row gets exactly the compensation it would get alone. The integers stay on
the row's scheme grid, so nothing downstream (plans, kernels, targets) changes.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from .schemes import _magnitude_lut, get_scheme

__all__ = ["gptq_quantize", "gptq_round", "prepare_hessian", "row_objective", "SCALE_MULTIPLIERS"]

#: Row-scale multipliers tried by ``gptq_quantize(..., search_scale=True)`` (1.0 is the scheme's own scale).
SCALE_MULTIPLIERS = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1)


class _RowGrids:
    """Nearest level of each row's scheme, all rows at once (ties toward zero, as ``Scheme.encode``)."""

    def __init__(self, schemes: Sequence[str]):
        names = sorted(set(schemes))
        luts = [_magnitude_lut(get_scheme(n).levels) for n in names]
        width = max(top for _, top in luts) + 1
        self.table = np.stack([np.pad(lut, (0, width - lut.size), mode="edge") for lut, _ in luts])
        index = {n: i for i, n in enumerate(names)}
        self.row = np.array([index[s] for s in schemes], dtype=np.int64)
        self.top = np.array([luts[i][1] for i in self.row], dtype=np.int64)

    def nearest(self, v: np.ndarray) -> np.ndarray:
        """Nearest level (float64) of each row's value ``v [rows]`` (in level units), clamped to its grid."""
        c = np.minimum(np.ceil(2.0 * np.abs(v)), self.top).astype(np.int64)
        return np.copysign(self.table[self.row, c], v)


def prepare_hessian(hessian: np.ndarray, damp: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """``(H', dead)``: dead columns (``H_jj == 0``, input always zero) get ``H_jj = 1``, then
    ``damp * mean(diag(H))`` is added to the diagonal (as in GPTQ)."""
    if damp <= 0:
        raise ValueError(f"damp must be > 0, got {damp}")
    h = np.array(hessian, dtype=np.float64, copy=True)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or not np.all(np.isfinite(h)):
        raise ValueError(f"hessian must be a finite square matrix, got shape {h.shape}")
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    return h, dead


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper ``U`` with ``U^T U = h^-1``; more damping where ``h`` is numerically singular."""
    extra = 0.0
    for _ in range(6):
        try:
            hinv = np.linalg.inv(h + extra * np.eye(h.shape[0]))
            return np.linalg.cholesky((hinv + hinv.T) / 2).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * np.mean(np.diag(h)))
    raise np.linalg.LinAlgError("GPTQ: the input Hessian stays singular after damping")


def gptq_round(weight: np.ndarray, hessian: np.ndarray, schemes: Sequence[str], row_scale: np.ndarray,
               damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> np.ndarray:
    """The integers ``w_int [rows, K]`` (int8) of ``weight [rows, K]`` rounded by GPTQ, row ``r``
    onto the levels of ``schemes[r]`` times ``row_scale[r]``.

    ``hessian`` is ``E[x x^T] [K, K]`` of the layer's inputs (for a conv, of its im2col columns
    in ``weight.reshape(rows, -1)`` order); it is dampened by :func:`prepare_hessian`.
    act_order: round the columns in order of decreasing ``H_jj`` (GPTQ's "act-order": the inputs
    with the most energy first, while the most columns are left to absorb their error); the
    result is returned in the original column order.
    """
    if act_order:
        h = np.asarray(hessian, dtype=np.float64)
        perm = np.argsort(-np.diag(h), kind="stable")
        q = gptq_round(np.asarray(weight)[:, perm], h[np.ix_(perm, perm)], schemes, row_scale, damp, block_size)
        out = np.empty_like(q)
        out[:, perm] = q
        return out
    w = np.array(weight, dtype=np.float64, copy=True)
    hessian = np.asarray(hessian, dtype=np.float64)
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]) or len(schemes) != w.shape[0]:
        raise ValueError(f"gptq: weight [rows, K], hessian [K, K] and one scheme per row; got {w.shape}, "
                         f"{hessian.shape}, {len(schemes)} schemes")
    scale = np.asarray(row_scale, dtype=np.float32).astype(np.float64)
    if np.any(scale <= 0):
        raise ValueError("gptq: row_scale must be positive")
    h, dead = prepare_hessian(hessian, damp)
    w[:, dead] = 0.0  # their input is zero: any value gives the same output
    u = _upper_cholesky_of_inverse(h)
    grids = _RowGrids(schemes)
    k = w.shape[1]
    q = np.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            q[:, i1 + i] = grids.nearest(w1[:, i] / scale)
            err = (w1[:, i] - q[:, i1 + i] * scale) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # lazy batch update of the later columns
    return q.astype(np.int8)


def row_objective(weight: np.ndarray, w_int: np.ndarray, row_scale: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Per-row calibration output error ``(w - s q) H (w - s q)^T`` (float64 ``[rows]``)."""
    scale = np.asarray(row_scale, dtype=np.float32).astype(np.float64)[:, None]
    d = np.asarray(weight, np.float64) - scale * np.asarray(w_int, np.float64)
    return np.einsum("rk,rk->r", d @ np.asarray(hessian, np.float64), d)


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, schemes: Sequence[str], damp: float = 0.01,
                  block_size: int = 128, search_scale: bool = False,
                  multipliers: Sequence[float] = SCALE_MULTIPLIERS, act_order: bool = False
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """``(w_int int8 [rows, K], row_scale float32 [rows])`` by GPTQ on each row's grid.

    Row scales start from each scheme's ``choose_row_scale`` (on the weight with dead input
    columns zeroed). With ``search_scale``, GPTQ also rounds each row at ``multipliers`` times
    that scale and the row keeps the scale whose result has the lowest :func:`row_objective`
    (rows never interact in GPTQ, so choosing per row is exact).
    """
    w = np.asarray(weight, dtype=np.float64)
    live = w * (np.diag(np.asarray(hessian)) > 0)
    schemes = list(schemes)
    scale = np.zeros(w.shape[0], np.float32)
    for name in set(schemes):
        rows = np.array([i for i, s in enumerate(schemes) if s == name])
        scale[rows] = get_scheme(name).choose_row_scale(live[rows])
    if not search_scale:
        return gptq_round(w, hessian, schemes, scale, damp, block_size, act_order), scale
    # rows never interact: all multipliers in one GPTQ run on the weight stacked once per multiplier
    mults = (1.0, *(m for m in multipliers if m != 1.0))
    has = np.abs(live).max(axis=1) > 0
    scales = np.concatenate([np.where(has, scale * np.float32(m), scale) for m in mults]).astype(np.float32)
    stacked = np.tile(w, (len(mults), 1))
    q = gptq_round(stacked, hessian, schemes * len(mults), scales, damp, block_size, act_order)
    err = row_objective(stacked, q, scales, hessian).reshape(len(mults), -1)
    best = np.argmin(err, axis=0) * w.shape[0] + np.arange(w.shape[0])  # ties keep the scheme's own scale
    return q[best], scales[best]
