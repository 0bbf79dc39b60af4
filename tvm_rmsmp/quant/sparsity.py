"""Structured-sparsity geometry (numpy only): which weights a pruning scheme removes, and the
block-sparse (BSR) form the compiled kernels read.

Shapes: a dense weight is ``[rows, K]``; a conv weight ``[rows, C, kh, kw]``. Importance scores
have the weight's shape (larger = keep). Every mask is boolean, ``True`` = kept.

* :func:`block_punched_mask` (YOLObile): blocks of ``block[0]`` output rows x ``block[1]`` input
  channels; within a block the same kernel positions ``(y, x)`` are removed from every kernel.
  For dense and 1x1 layers a removed position is the whole block.
* :func:`block_row_mask`: blocks of rows x columns of the flattened ``[rows, C*kh*kw]`` weight,
  removed whole.
* :func:`pattern_mask` (NPAS / PatDNN): each 3x3 kernel keeps 4 of 9 weights, the pattern
  taken from a set of at most ``patterns`` chosen by how often they are a kernel's top-4, then
  whole kernels removed by importance (connectivity pruning) to reach the rate.

Blocks that do not divide a layer are padded: the edge blocks are smaller and are kept or
removed whole like the others (:func:`divides` says whether a layer has such blocks).

:func:`bsr_blocks` turns an integer weight into the kernels' block-sparse form:
``(blocks [nnzb, br, bc] int8, col [nnzb] int32, ptr [rows / br + 1] int32)``, block row ``i``'s
blocks being ``blocks[ptr[i]:ptr[i + 1]]`` at block columns ``col[...]``.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["SCHEMES", "PATTERN_KEEP", "divides", "block_punched_mask", "block_row_mask", "pattern_mask",
           "pattern_candidates", "select_patterns", "gradual_rates", "block_density", "bsr_blocks", "bsr_to_dense",
           "mask_sparsity"]

#: Pruning schemes (``PruneConfig.scheme``).
SCHEMES = ("block_punched", "pattern", "block_row")
#: Weights a pattern keeps of a 3x3 kernel.
PATTERN_KEEP = 4


def divides(shape: Sequence[int], block: Tuple[int, int], flat: bool = False) -> bool:
    """Whether ``block`` tiles the weight of ``shape`` exactly (rows and input channels, or the
    flattened columns when ``flat``)."""
    cols = int(np.prod(shape[1:])) if flat else int(shape[1])
    return shape[0] % block[0] == 0 and cols % block[1] == 0


def _group_prune(group_score: np.ndarray, group_size: np.ndarray, target: float) -> np.ndarray:
    """Keep flags of groups (``True`` kept): the groups of lowest mean score removed until the
    removed elements reach ``target`` of all (the last one only if that is closer)."""
    flat_score, flat_size = group_score.ravel(), group_size.ravel()
    total = flat_size.sum()
    want = target * total
    order = np.argsort(flat_score / np.maximum(flat_size, 1), kind="stable")
    cum = np.cumsum(flat_size[order])
    n = int(np.searchsorted(cum, want, side="left"))
    if n < order.size and abs(cum[n] - want) < abs((cum[n - 1] if n else 0) - want):
        n += 1
    keep = np.ones(flat_score.size, bool)
    keep[order[:n]] = False
    return keep.reshape(group_score.shape)


def _block_sums(a: np.ndarray, br: int, bc: int) -> np.ndarray:
    """Sums over blocks of ``br`` rows x ``bc`` columns of the first two axes (edges padded)."""
    r, c = a.shape[:2]
    pr, pc = -(-r // br) * br, -(-c // bc) * bc
    pad = np.zeros((pr, pc) + a.shape[2:], a.dtype)
    pad[:r, :c] = a
    return pad.reshape(pr // br, br, pc // bc, bc, *a.shape[2:]).sum(axis=(1, 3))


def _expand(blocks: np.ndarray, br: int, bc: int, r: int, c: int) -> np.ndarray:
    return np.repeat(np.repeat(blocks, br, axis=0), bc, axis=1)[:r, :c]


def block_punched_mask(score: np.ndarray, block: Tuple[int, int], sparsity: float) -> np.ndarray:
    """Block-punched mask of a ``[rows, C]`` or ``[rows, C, kh, kw]`` score (module docstring)."""
    s = np.asarray(score, np.float64)
    s4 = s.reshape(s.shape[0], s.shape[1], -1)  # [rows, C, taps]
    br, bc = block
    sums = _block_sums(s4, br, bc)  # [R, Cb, taps]
    sizes = _block_sums(np.ones(s4.shape[:2] + (1,)), br, bc)
    sizes = np.broadcast_to(sizes, sums.shape)
    keep = _group_prune(sums, sizes, sparsity)
    return _expand(keep, br, bc, s.shape[0], s.shape[1]).reshape(s.shape)


def block_row_mask(score: np.ndarray, block: Tuple[int, int], sparsity: float) -> np.ndarray:
    """Blocks of ``block[0]`` rows x ``block[1]`` columns of the flattened weight, removed whole."""
    s = np.asarray(score, np.float64)
    flat = s.reshape(s.shape[0], -1)
    br, bc = block
    keep = _group_prune(_block_sums(flat, br, bc), _block_sums(np.ones_like(flat), br, bc), sparsity)
    return _expand(keep, br, bc, *flat.shape).reshape(s.shape)


def pattern_candidates() -> np.ndarray:
    """Every 4-of-9 pattern of a 3x3 kernel that keeps the centre: ``[56, 9]`` bool."""
    out = []
    for rest in itertools.combinations([0, 1, 2, 3, 5, 6, 7, 8], PATTERN_KEEP - 1):
        p = np.zeros(9, bool)
        p[[4, *rest]] = True
        out.append(p)
    return np.array(out)


def select_patterns(score: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` patterns (``[n, 9]`` bool) most often the best of a kernel of ``score``
    ``[rows, C, 3, 3]`` (each kernel votes for the candidate keeping most of its score)."""
    cands = pattern_candidates().astype(np.float64)
    kept = score.reshape(-1, 9) @ cands.T  # [kernels, candidates]
    votes = np.bincount(kept.argmax(axis=1), minlength=len(cands))
    best = np.argsort(-votes, kind="stable")[:n]
    return cands[np.sort(best)].astype(bool)


def pattern_mask(score: np.ndarray, sparsity: float, patterns: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """``(mask, pattern set)`` for a 3x3 conv score ``[rows, C, 3, 3]``: each kernel keeps its
    best pattern of the set; then the kernels with the least kept score are removed whole
    until ``sparsity`` is reached (at least the patterns' own ``5/9``)."""
    s = np.asarray(score, np.float64)
    pats = select_patterns(s, patterns)
    kept = s.reshape(-1, 9) @ pats.T.astype(np.float64)
    choice = kept.argmax(axis=1)
    mask = pats[choice].reshape(s.shape)
    kernel_score = kept[np.arange(kept.shape[0]), choice].reshape(s.shape[:2])
    remove = 1.0 - (1.0 - sparsity) * 9 / PATTERN_KEEP  # share of kernels connectivity pruning removes
    if remove > 0:
        keep = _group_prune(kernel_score, np.ones_like(kernel_score), remove)
        mask &= keep[:, :, None, None]
    return mask, pats


def gradual_rates(sparsity: float, steps: int) -> np.ndarray:
    """The rates of a gradual schedule (Zhu & Gupta 2017): ``s (1 - (1 - t / steps)^3)``, t = 1..steps."""
    t = np.arange(1, steps + 1, dtype=np.float64)
    return sparsity * (1.0 - (1.0 - t / steps) ** 3)


def mask_sparsity(mask: np.ndarray) -> float:
    return 1.0 - float(np.count_nonzero(mask)) / max(mask.size, 1)


def block_density(w: np.ndarray, br: int, bc: int) -> float:
    """Share of ``br x bc`` blocks of ``w [rows, K]`` (rows % br == 0; columns padded) holding a non-zero."""
    nz = _block_sums((np.asarray(w) != 0).astype(np.int64), br, bc)
    return float(np.count_nonzero(nz)) / max(nz.size, 1)


def bsr_blocks(w: np.ndarray, br: int, bc: int):
    """The block-sparse form of ``w [rows, K]`` (``rows % br == 0``; the last block column
    zero-padded past K): ``(blocks [nnzb, br, bc] int8, col [nnzb] int32, ptr [rows / br + 1] int32)``,
    blocks holding a non-zero only, in row-major block order."""
    w = np.asarray(w)
    rows, k = w.shape
    if rows % br:
        raise ValueError(f"bsr_blocks: {rows} rows are not a multiple of the block's {br}")
    kb = -(-k // bc)
    pad = np.zeros((rows, kb * bc), np.int8)
    pad[:, :k] = w
    b = pad.reshape(rows // br, br, kb, bc).transpose(0, 2, 1, 3)  # [R, Kb, br, bc]
    nz = np.any(b != 0, axis=(2, 3))
    ri, ci = np.nonzero(nz)
    ptr = np.zeros(rows // br + 1, np.int32)
    np.cumsum(nz.sum(axis=1), out=ptr[1:])
    blocks = np.ascontiguousarray(b[ri, ci]) if ri.size else np.zeros((0, br, bc), np.int8)
    return blocks.astype(np.int8), ci.astype(np.int32), ptr


def bsr_to_dense(blocks: np.ndarray, col: np.ndarray, ptr: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`bsr_blocks` (int64 ``[rows, k]``)."""
    nrb = len(ptr) - 1
    br, bc = blocks.shape[1:] if blocks.ndim == 3 else (1, 1)
    kb = -(-k // bc)
    out = np.zeros((nrb, kb, br, bc), np.int64)
    for i in range(nrb):
        for j in range(ptr[i], ptr[i + 1]):
            out[i, col[j]] = blocks[j]
    return out.transpose(0, 2, 1, 3).reshape(nrb * br, kb * bc)[:, :k]


def _check_rate(value: Optional[float], what: str) -> float:
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{what} = {value!r} is outside [0, 1)")
    return v
