"""Ratio validation, per-layer row counts and the row-assignment rule."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tvm_rmsmp as rmsmp
from tvm_rmsmp.quant.assign import assign_rows, get_assign_rule, row_kurtosis
from tvm_rmsmp.quant.plan import RowPlan, row_counts


@pytest.mark.parametrize(
    "ratio,msg",
    [
        ({"sp2_4": 0.6, "fixed_4": 0.3}, "sum to 1"),
        ({"sp2_4": 0.6, "fixed_5": 0.4}, "fixed_5"),
        ({"sp2_4": 1.2, "fixed_4": -0.2}, "outside \\[0, 1\\]"),
        ({"sp2_4": float("nan"), "fixed_4": 1.0}, "finite"),
        ({}, "non-empty"),
    ],
)
def test_bad_ratios_are_rejected(ratio, msg):
    with pytest.raises((ValueError, KeyError), match=msg):
        rmsmp.RMSMPConfig(ratio=ratio)


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_bad_activation_bits(bits):
    with pytest.raises(ValueError, match="act_bits"):
        rmsmp.RMSMPConfig(act_bits=bits)


def test_unknown_assignment_rule():
    with pytest.raises(ValueError, match="no_such_rule"):
        rmsmp.RMSMPConfig(assign="no_such_rule")


def test_rounding_options():
    cfg = rmsmp.RMSMPConfig()
    assert cfg.rounding == "gptq" and cfg.gptq_damp == 0.01 and cfg.gptq_scale_search is False
    assert cfg.gptq_act_order is False
    assert rmsmp.RMSMPConfig(rounding="nearest", gptq_damp=0.1).rounding == "nearest"
    with pytest.raises(ValueError, match="rounding must be one of"):
        rmsmp.RMSMPConfig(rounding="stochastic")
    for bad in (0, -0.01, float("nan"), float("inf"), True, "0.01", None):
        with pytest.raises(ValueError, match="gptq_damp"):
            rmsmp.RMSMPConfig(gptq_damp=bad)
    with pytest.raises(TypeError, match="gptq_scale_search"):
        rmsmp.RMSMPConfig(gptq_scale_search=1)
    with pytest.raises(TypeError, match="gptq_act_order"):
        rmsmp.RMSMPConfig(gptq_act_order="yes")


def test_default_config_is_the_papers_ratio():
    cfg = rmsmp.RMSMPConfig()
    assert cfg.ratio == {"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}
    assert cfg.act_bits == 8
    assert rmsmp.RMSMPConfig(ratio={"sp2_4": 0.5, "fixed_4": 0.5, "fixed_8": 0.0}).schemes == ("sp2_4", "fixed_4")


ratios = st.lists(st.floats(0, 1), min_size=3, max_size=3).filter(lambda v: sum(v) > 0.01).map(
    lambda v: dict(zip(["sp2_4", "fixed_4", "fixed_8"], [x / sum(v) for x in v]))
)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 600), ratio=ratios)
def test_row_counts_within_one_row_and_sum(n, ratio):
    counts = row_counts(n, ratio)
    assert sum(counts.values()) == n
    for name, c in counts.items():
        assert abs(c - ratio[name] * n) < 1 + 1e-9


def test_row_counts_examples():
    r = {"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}
    # 38.4 / 22.4 / 3.2: one remainder row, tie on .4 goes to the first-listed scheme
    assert row_counts(64, r) == {"sp2_4": 39, "fixed_4": 22, "fixed_8": 3}
    assert row_counts(10, r) == {"sp2_4": 6, "fixed_4": 4, "fixed_8": 0}
    # fewer rows than schemes: the largest shares get them
    assert row_counts(2, r) == {"sp2_4": 1, "fixed_4": 1, "fixed_8": 0}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 80), k=st.integers(2, 40), ratio=ratios, seed=st.integers(0, 10))
def test_variance_rule_meets_counts_exactly(n, k, ratio, seed):
    w = np.random.default_rng(seed).standard_normal((n, k))
    schemes = assign_rows(w, ratio, "variance")
    counts = row_counts(n, ratio)
    assert {s: schemes.count(s) for s in counts} == counts


def test_variance_rule_sends_peaked_rows_to_sp2_and_sensitive_rows_to_8_bits():
    rng = np.random.default_rng(0)
    gaussian = rng.laplace(size=(10, 512))  # peaked, heavy-tailed: kurtosis about 6
    uniform = rng.uniform(-1, 1, (10, 512))
    w = np.concatenate([gaussian, uniform])
    ratio = {"sp2_4": 0.5, "fixed_4": 0.45, "fixed_8": 0.05}
    # make row 15 (uniform) clearly the most sensitive: its input features are large
    input_sq = np.ones(512)
    w[15] *= 100
    schemes = assign_rows(w, ratio, "variance", input_sq=input_sq)
    assert schemes[15] == "fixed_8"
    assert all(s == "sp2_4" for s in schemes[:10])
    assert all(s == "fixed_4" for i, s in enumerate(schemes[10:], 10) if i != 15)
    assert row_kurtosis(gaussian).min() > row_kurtosis(uniform).max()


def test_row_plan_groups_and_validation():
    plan = RowPlan("l", "dense", ("fixed_4", "sp2_4", "fixed_4"), np.zeros((3, 2), np.int8), np.ones(3, np.float32))
    assert plan.counts() == {"fixed_4": 2, "sp2_4": 1}
    groups = plan.groups(order=["sp2_4", "fixed_4", "fixed_8"])
    assert [(g, idx.tolist()) for g, idx in groups] == [("sp2_4", [1]), ("fixed_4", [0, 2])]
    with pytest.raises(ValueError, match="layer 'l'"):
        RowPlan("l", "dense", ("fixed_4",), np.zeros((3, 2), np.int8), np.ones(3, np.float32))
    assert math.isclose(float(plan.dequantized().sum()), 0.0)
    assert get_assign_rule("variance") is not None
