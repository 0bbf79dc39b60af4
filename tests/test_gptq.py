"""GPTQ rounding on each row's own grid (tvm_rmsmp.quant.gptq) against a naive OBQ loop."""

import numpy as np
import pytest

from tvm_rmsmp.quant.gptq import gptq_quantize, gptq_round, prepare_hessian, row_objective
from tvm_rmsmp.quant.schemes import get_scheme

MIXES = {
    "sp2": ["sp2_4"],
    "fixed4": ["fixed_4"],
    "fixed8": ["fixed_8"],
    "mixed": ["sp2_4", "fixed_4", "fixed_8"],
}


def naive_obq(weight, hessian, schemes, row_scale, damp=0.01):
    """Reference: one column at a time, the full inverse Hessian of the free columns kept
    explicitly and shrunk by a Schur complement after each column (no blocks, no Cholesky)."""
    h, dead = prepare_hessian(hessian, damp)
    w = np.array(weight, np.float64)
    w[:, dead] = 0.0
    scale = np.asarray(row_scale, np.float32).astype(np.float64)
    hinv = np.linalg.inv(h)
    q = np.zeros(w.shape, np.int64)
    for j in range(w.shape[1]):
        for r, s in enumerate(schemes):
            q[r, j] = get_scheme(s).encode(w[r : r + 1, j : j + 1], scale[r : r + 1])[0, 0]
        err = (w[:, j] - scale * q[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= np.outer(err, hinv[j, j + 1 :])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]  # drop column j (Schur complement)
    return q


def nearest(weight, schemes, row_scale):
    return np.stack([get_scheme(s).encode(weight[r : r + 1], row_scale[r : r + 1])[0] for r, s in enumerate(schemes)])


def layer(seed, rows, k, mix, correlated=True):
    """A random layer: weights, calibration inputs X [n, K] with correlated features, H = X^T X / n."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)) * rng.uniform(0.2, 2.0, (rows, 1))
    x = rng.standard_normal((4 * k + 16, k))
    if correlated:
        x = x @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    h = x.T @ x / x.shape[0]
    schemes = [MIXES[mix][i % len(MIXES[mix])] for i in range(rows)]
    rng.shuffle(schemes)
    return w, h, schemes


def base_scales(w, schemes):
    return np.array([get_scheme(s).choose_row_scale(w[r : r + 1])[0] for r, s in enumerate(schemes)], np.float32)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("seed,rows,k", [(0, 6, 37), (1, 5, 200), (2, 4, 9 * 16), (3, 3, 130), (4, 7, 27)])
def test_equals_naive_obq(seed, rows, k, mix):
    """Lazy blocks + Cholesky give the naive per-column OBQ integers; k = 200, 130 are no
    multiple of the block; 144 = 16 * 3 * 3 and 27 = 3 * 3 * 3 are conv-shaped (C * kh * kw)."""
    w, h, schemes = layer(seed, rows, k, mix)
    scale = base_scales(w, schemes)
    got = gptq_round(w, h, schemes, scale)
    want = naive_obq(w, h, schemes, scale)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, want)  # exact on these (well-separated) random layers
    np.testing.assert_allclose(row_objective(w, got, scale, h).sum(), row_objective(w, want, scale, h).sum(),
                               rtol=1e-9)


def test_block_size_does_not_change_the_result():
    w, h, schemes = layer(5, 6, 300, "mixed")
    scale = base_scales(w, schemes)
    ref = gptq_round(w, h, schemes, scale, block_size=300)
    for b in (1, 7, 128):
        assert (gptq_round(w, h, schemes, scale, block_size=b) == ref).mean() >= 0.999


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_objective_never_above_nearest_and_below_on_average(mix):
    gains = []
    for seed in range(8):
        w, h, schemes = layer(100 + seed, 16, 64 + 8 * seed, mix)
        q, scale = gptq_quantize(w, h, schemes)
        near = row_objective(w, nearest(w, schemes, scale), scale, h).sum()
        obj = row_objective(w, q, scale, h).sum()
        assert obj <= near * (1 + 1e-12), (seed, obj, near)
        gains.append(obj / near)
    assert np.mean(gains) < 0.95, gains


def test_scale_search_only_lowers_the_objective():
    for seed in range(3):
        w, h, schemes = layer(200 + seed, 12, 96, "mixed")
        q0, s0 = gptq_quantize(w, h, schemes)
        q1, s1 = gptq_quantize(w, h, schemes, search_scale=True)
        e0, e1 = row_objective(w, q0, s0, h), row_objective(w, q1, s1, h)
        assert np.all(e1 <= e0)
        assert s1.dtype == np.float32 and np.all(s1 > 0)


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_integers_lie_on_each_rows_grid(mix, search):
    w, h, schemes = layer(7, 24, 50, mix)
    w[3] *= 50  # outlier row and column: large compensations must still clamp to the grid
    w[:, 5] *= 20
    q, scale = gptq_quantize(w, h, schemes, search_scale=search)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == w.shape
    for r, s in enumerate(schemes):
        assert np.isin(q[r], get_scheme(s).levels).all(), (r, s)


def test_dead_columns_zero_rows_single_row_and_k1():
    w, h, schemes = layer(8, 6, 40, "mixed")
    dead = [0, 7, 39]
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    w[2] = 0.0
    q, scale = gptq_quantize(w, h, schemes, search_scale=True)
    assert np.all(q[:, dead] == 0) and np.all(q[2] == 0) and scale[2] > 0
    live = [j for j in range(40) if j not in dead]
    want = naive_obq(w, h, schemes, scale)
    assert (q == want).mean() >= 0.999
    # the dead columns do not change the rounding of the others
    q_live = gptq_round(w[:, live], h[np.ix_(live, live)], schemes, scale)
    assert (q[:, live] == q_live).mean() >= 0.999
    # all columns dead: every weight is irrelevant and rounds to 0
    qz, _ = gptq_quantize(w, np.zeros_like(h), schemes)
    assert not qz.any()
    # a single row; K = 1 (then GPTQ is nearest rounding)
    w1, h1, s1 = layer(9, 1, 33, "sp2")
    q1, sc1 = gptq_quantize(w1, h1, s1)
    assert q1.shape == (1, 33) and (q1 == naive_obq(w1, h1, s1, sc1)).all()
    wk, hk, sk = layer(10, 5, 1, "mixed")
    qk, sck = gptq_quantize(wk, hk, sk)
    np.testing.assert_array_equal(qk, nearest(wk, sk, sck))


def test_bad_arguments():
    w, h, schemes = layer(11, 3, 10, "mixed")
    with pytest.raises(ValueError, match="damp"):
        gptq_round(w, h, schemes, np.ones(3), damp=0.0)
    with pytest.raises(ValueError, match="hessian"):
        gptq_round(w, h[:5, :5], schemes, np.ones(3))
    with pytest.raises(ValueError, match="positive"):
        gptq_round(w, h, schemes, np.zeros(3))
