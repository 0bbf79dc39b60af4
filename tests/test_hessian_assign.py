"""Row sensitivities from the loss Hessian and the rules that use them."""

import numpy as np
import pytest
import torch
from torch import nn

import tvm_rmsmp as rmsmp
from tvm_rmsmp.quant.assign import assign_rows, hessian_row_error, row_kurtosis
from tvm_rmsmp.quant.config import HessianConfig
from tvm_rmsmp.nn.hessian import row_hessian_traces
from tvm_rmsmp.quant.plan import row_counts

RATIO = {"sp2_4": 0.6, "fixed_4": 0.35, "fixed_8": 0.05}


def _exact_row_traces(model, layer, x):
    """Brute force: the full Hessian of the output-MSE loss w.r.t. ``layer.weight``."""
    w0 = layer.weight.detach().clone()
    key = next(n for n, p in model.named_parameters() if p is layer.weight)
    with torch.no_grad():
        y0 = model(x)

    def loss(w):
        y = torch.func.functional_call(model, {key: w}, (x,))
        return 0.5 * ((y - y0) ** 2).sum() / x.shape[0]

    h = torch.autograd.functional.hessian(loss, w0)  # [out, in, out, in]
    n, k = w0.shape
    return np.array([h[r, :, r, :].diagonal().sum().item() for r in range(n)])


def test_hutchinson_traces_match_the_exact_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    exact = _exact_row_traces(model, model[0], x)
    traces, report = row_hessian_traces(model, {"0": model[0]}, [(x,)], probes=1000, seed=1)
    np.testing.assert_allclose(traces["0"], exact, rtol=0.15)
    assert report.probes == 1000 and report.samples == 32 and report.seconds > 0
    # a single linear layer with orthogonal inputs has diagonal row blocks: exact with any probe
    lin = nn.Linear(4, 3, bias=False).double()
    xs = torch.eye(4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[:, None]
    tr, _ = row_hessian_traces(lin, {"l": lin}, [(xs,)], probes=1)
    np.testing.assert_allclose(tr["l"], np.full(3, (1 + 4 + 9 + 16) / 4))


def test_hutchinson_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    model.train()
    row_hessian_traces(model, {"0": model[0]}, [(torch.randn(8, 4),)], probes=2, loss="kl")
    assert model.training and model[0].weight.requires_grad and not model[2].weight.requires_grad
    assert model[0].weight.grad is None


def _weights(n=40, k=64, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k))
    w[n // 2:] = rng.uniform(-1.7, 1.7, (n - n // 2, k))  # flat rows
    return w


@pytest.mark.parametrize("rule", ["hessian", "hessian_error"])
def test_hessian_rules_keep_the_ratio_and_send_the_sharpest_rows_to_8_bits(rule):
    w = _weights()
    h = np.ones(40)
    h[[3, 29]] = 1e6  # the loss is very sensitive to these two rows
    schemes = assign_rows(w, RATIO, rule, row_hessian=h)
    counts = row_counts(40, RATIO)
    assert {s: schemes.count(s) for s in counts} == counts
    assert schemes[3] == schemes[29] == "fixed_8"


def test_hessian_error_rule_puts_sp2_where_its_extra_error_costs_least():
    w = _weights()
    h = np.ones(40)
    ratio = {"sp2_4": 0.5, "fixed_4": 0.5}
    schemes = assign_rows(w, ratio, "hessian_error", row_hessian=h)
    gap = hessian_row_error(w, "sp2_4", h) - hessian_row_error(w, "fixed_4", h)
    sp2 = [i for i, s in enumerate(schemes) if s == "sp2_4"]
    fixed = [i for i, s in enumerate(schemes) if s == "fixed_4"]
    assert gap[sp2].max() <= gap[fixed].min()
    # the kurtosis rule ranks differently: Gaussian rows (first half) to SP2
    by_shape = assign_rows(w, ratio, "hessian", row_hessian=h)
    k = row_kurtosis(w)
    sp2_k = [i for i, s in enumerate(by_shape) if s == "sp2_4"]
    assert k[sp2_k].min() >= np.median(k)


def test_hessian_rule_needs_traces():
    with pytest.raises(ValueError, match="row_hessian"):
        assign_rows(_weights(), RATIO, "hessian")
    with pytest.raises(ValueError, match="shape"):
        assign_rows(_weights(), RATIO, "hessian", row_hessian=np.ones(3))


def test_quantize_with_hessian_rule_reports_its_cost(small_resnet):
    model, calib = small_resnet
    cfg = rmsmp.RMSMPConfig(assign="hessian", hessian=HessianConfig(probes=2, batches=2))
    q = rmsmp.quantize(model, cfg, calib)
    rep = q.rmsmp_report
    assert rep["assign"] == "hessian" and rep["hessian"].probes == 2 and rep["hessian"].batches == 2
    assert rep["hessian"].samples == 16
    for plan in rmsmp.row_plans(q).values():
        assert plan.counts() == {s: c for s, c in row_counts(plan.num_rows, cfg.ratio).items() if c}


def test_too_few_calibration_samples_fall_back_to_variance(small_resnet):
    model, calib = small_resnet
    with pytest.warns(rmsmp.RMSMPWarning, match="at least 16 calibration samples"):
        q = rmsmp.quantize(model, rmsmp.RMSMPConfig(assign="hessian"), [calib[0][:4]])
    assert q.rmsmp_report["assign"] == "variance" and q.rmsmp_report["hessian"] is None


def test_edge_layers_and_layer_ratios(small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(edge_scheme="fixed_8"), calib)
    plans = rmsmp.row_plans(q)
    names = list(plans)
    assert set(plans["stem.0"].schemes) == {"fixed_8"} and set(plans["fc2"].schemes) == {"fixed_8"}
    assert set(plans["fc1"].schemes) == {"sp2_4", "fixed_4", "fixed_8"}
    assert len(names) == 6
    q2 = rmsmp.quantize(model, rmsmp.RMSMPConfig(layer_ratios={"down": {"fixed_8": 1.0}}), calib)
    assert set(rmsmp.row_plans(q2)["down"].schemes) == {"fixed_8"}
    with pytest.raises(ValueError, match="not quantizable layers of the model.*'nope'"):
        rmsmp.quantize(model, rmsmp.RMSMPConfig(layer_ratios={"nope": {"fixed_8": 1.0}}), calib)
    with pytest.raises(ValueError, match=r"layer_ratios\['down'\].*sum to 1"):
        rmsmp.RMSMPConfig(layer_ratios={"down": {"fixed_8": 0.5}})
    with pytest.raises(KeyError):
        rmsmp.RMSMPConfig(edge_scheme="fixed_5")


def test_zero_share_scheme_is_simply_unused(small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio={"sp2_4": 0.0, "fixed_4": 0.9, "fixed_8": 0.1}), calib)
    for plan in rmsmp.row_plans(q).values():
        assert "sp2_4" not in plan.schemes


def test_one_hessian_estimate_serves_several_configs(small_resnet):
    model, calib = small_resnet
    cfg = rmsmp.RMSMPConfig(assign="hessian", hessian=HessianConfig(probes=2, batches=2))
    first = rmsmp.quantize(model, cfg, calib)
    again = rmsmp.quantize(model, cfg, calib, row_hessian=first.rmsmp_row_hessian)
    assert again.rmsmp_report["hessian"] is None  # nothing estimated the second time
    for name, plan in rmsmp.row_plans(first).items():
        assert rmsmp.row_plans(again)[name].schemes == plan.schemes
    with pytest.raises(ValueError, match="no traces for layers"):
        rmsmp.quantize(model, cfg, calib, row_hessian={"fc1": first.rmsmp_row_hessian["fc1"]})
