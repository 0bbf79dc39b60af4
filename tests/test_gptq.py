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


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_act_order_is_obq_in_decreasing_input_energy_order(mix):
    """Act-order: the naive OBQ run on the columns sorted by decreasing H_jj (the first of equal
    ones first), its integers put back in the original column order."""
    w, h, schemes = layer(7, 5, 90, mix)
    h = h * np.linspace(0.2, 3.0, 90)[None, :] * np.linspace(0.2, 3.0, 90)[:, None]  # unequal energies
    scale = base_scales(w, schemes)
    order = sorted(range(90), key=lambda j: (-h[j, j], j))
    want = np.zeros(w.shape, np.int64)
    want[:, order] = naive_obq(w[:, order], h[np.ix_(order, order)], schemes, scale)
    got = gptq_round(w, h, schemes, scale, act_order=True)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, gptq_round(w, h, schemes, scale))


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


# ----- torch side: input Hessians, quantize(rounding="gptq"), compiled models --------------
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tvm_rmsmp as rmsmp  # noqa: E402
from tvm_rmsmp.nn import layers as L  # noqa: E402


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (0, 1), (1, 2))])
def test_conv_input_hessian_is_the_im2col_second_moment(stride, padding, dilation):
    """E||W x||^2 over every output position equals tr(W H W^T): H is in weight.reshape(rows, -1)
    order and covers the layer's stride, padding and dilation."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride, padding, dilation, bias=False).double()
    batches = [(torch.randn(4, 3, 9, 11, dtype=torch.float64),) for _ in range(2)]
    h = L.input_hessians(conv, {"c": conv}, batches)["c"]
    with torch.no_grad():
        y = torch.cat([conv(*b) for b in batches])
    w = conv.weight.detach().reshape(5, -1).numpy()
    expect = (y**2).sum((0, 2, 3)).numpy() / (y.shape[0] * y.shape[2] * y.shape[3])
    np.testing.assert_allclose(np.einsum("rk,kl,rl->r", w, h, w), expect, rtol=1e-10)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def _cnn():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(24, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 5 * 5, 10)).eval()


def _objectives(q, model, calib):
    """Per layer: the calibration objective tr((W - Q) H (W - Q)^T) of q's rows (float weights: the
    BN-folded calibrated model's)."""
    cal = L.calibrate(model, q.rmsmp_config, calib)
    hs = L.input_hessians(cal.model, cal.layers, cal.batches)
    plans = rmsmp.row_plans(q)
    out = {}
    for name, mod in cal.layers.items():
        w = mod.weight.detach().double().reshape(mod.weight.shape[0], -1).numpy()
        p = plans[name]
        out[name] = row_objective(w, p.weight_int.reshape(p.num_rows, -1), p.row_scale, hs[name]).sum()
    return out


@pytest.mark.parametrize("make,shape", [(_mlp, (6, 20)), (_cnn, (6, 2, 10, 10))])
def test_gptq_model_lowers_the_objective_stays_on_grid_and_compiles_bit_exact(make, shape, monkeypatch):
    model = make()
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(*shape, generator=gen) for _ in range(3)]
    near = rmsmp.quantize(model, rmsmp.RMSMPConfig(rounding="nearest"), calib)
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)  # GPTQ is the default
    rep = q.rmsmp_report["gptq"]
    assert rep["passes"] == 1 and rep["seconds"] > 0 and near.rmsmp_report["gptq"] is None
    plans_n, plans_g = rmsmp.row_plans(near), rmsmp.row_plans(q)
    for name, p in plans_g.items():
        assert p.schemes == plans_n[name].schemes  # rows are assigned first, then rounded
        for s, rows in p.groups():
            assert np.isin(p.weight_int[rows], rmsmp.get_scheme(s).levels).all()
    obj_n, obj_g = _objectives(near, model, calib), _objectives(q, model, calib)
    for name in obj_g:
        assert obj_g[name] <= obj_n[name] * (1 + 1e-9), name
    assert sum(obj_g.values()) < sum(obj_n.values())
    # one Hessian per pass (a budget too small for two) gives the same model
    monkeypatch.setattr(L, "GPTQ_HESSIAN_BUDGET", 1)
    q1 = rmsmp.quantize(model, rmsmp.RMSMPConfig(rounding="gptq"), calib)
    assert q1.rmsmp_report["gptq"]["passes"] == len(plans_g)
    for name, p in rmsmp.row_plans(q1).items():
        np.testing.assert_array_equal(p.weight_int, plans_g[name].weight_int)
    x = torch.randn(*shape, generator=gen)
    exe = rmsmp.compile(q, (x,))
    for seed in range(2):
        xs = torch.randn(*shape, generator=torch.Generator().manual_seed(10 + seed))
        np.testing.assert_array_equal(exe(xs), q(xs).detach().numpy())
