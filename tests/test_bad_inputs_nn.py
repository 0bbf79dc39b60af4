"""Bad or unusual inputs to the torch side (config, quantize, attention, Hessian, QAT): each
gets a clear error or warning naming the culprit, or is supported and checked numerically."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tvm_rmsmp as rmsmp
from conftest import np_dense_acc, np_epilogue
from tvm_rmsmp.nn.attention import DecomposedMultiheadAttention
from tvm_rmsmp.nn.layers import RMSMPLinear, rmsmp_layers
from tvm_rmsmp.nn.qat import QATConfig, prepare_qat, train_qat

VAR = rmsmp.RMSMPConfig(assign="variance")  # no Hessian: fast, and fine with few samples


class MLP(nn.Module):
    def __init__(self, cin=8, hidden=16, cout=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cin, hidden), nn.Linear(hidden, cout)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp(seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    return MLP().eval(), [torch.randn(8, 8, generator=g) for _ in range(3)]


def _np_linear(layer: RMSMPLinear, x: torch.Tensor) -> torch.Tensor:
    """Independent numpy evaluation of one RMSMP Linear layer from its stored integers."""
    xn = x.detach().numpy().astype(np.float32)
    xq = np.clip(np.round(xn * np.float32(layer.inv_act_scale)), layer.qmin, layer.qmax).astype(np.int64)
    acc = np_dense_acc(xq, layer.weight_int.numpy())
    y = np_epilogue(acc, layer.bias_int.numpy().astype(np.int64), layer.out_scale.numpy(), acc.ndim - 1)
    return torch.from_numpy(np.asarray(y, np.float32))


def _np_attention(att: DecomposedMultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Self-attention (batch-first, no mask) from the numpy layer references and explicit math."""
    n, t, e = x.shape
    h, hd = att.num_heads, att.head_dim
    q, k, v = (_np_linear(p, x).reshape(n, t, h, hd).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
    w = ((q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)).softmax(-1)
    return _np_linear(att.out_proj, (w @ v).transpose(1, 2).reshape(n, t, e))


# --------------------------------------------------------------------------------------------
# 1. skip
# --------------------------------------------------------------------------------------------
def test_skip_as_one_string_is_one_layer_name():
    model, calib = _mlp(0)
    cfg = rmsmp.RMSMPConfig(assign="variance", skip="fc1")
    assert cfg.skip == ("fc1",)
    q = rmsmp.quantize(model, cfg, calib)
    assert list(rmsmp.row_plans(q)) == ["fc2"]
    assert isinstance(q.fc1, nn.Linear) and not isinstance(q.fc1, RMSMPLinear)


def test_skip_entries_must_be_strings():
    with pytest.raises(TypeError, match=r"skip must hold layer names \(strings\), got \[3\]"):
        rmsmp.RMSMPConfig(skip=("fc1", 3))


def test_skip_unknown_name_raises_naming_it_and_the_layers():
    model, calib = _mlp(1)
    with pytest.raises(ValueError, match=r"skip names layers that are not modules of the model: \['fc3'\]; "
                                         r"layers of the model: \['fc1', 'fc2'\]"):
        rmsmp.quantize(model, rmsmp.RMSMPConfig(assign="variance", skip=("fc1", "fc3")), calib)


def test_layer_ratios_unknown_name_lists_the_quantizable_layers():
    model, calib = _mlp(2)
    with pytest.raises(ValueError, match=r"not quantizable layers of the model: \['nope'\]; "
                                         r"quantizable layers: \['fc1', 'fc2'\]"):
        rmsmp.quantize(model, rmsmp.RMSMPConfig(assign="variance", layer_ratios={"nope": {"fixed_8": 1.0}}), calib)


# --------------------------------------------------------------------------------------------
# 2. MultiheadAttention and TransformerEncoderLayer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("variant", ["plain", "masks", "bias_kv_zero_attn", "kdim_no_bias"])
def test_decomposed_attention_equals_float_mha(batch_first, variant):
    torch.manual_seed(3)
    kw = {"bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
          "kdim_no_bias": dict(kdim=12, vdim=12, bias=False)}.get(variant, {})
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, **kw).eval()
    if mha.bias_k is not None:
        nn.init.normal_(mha.bias_k)
        nn.init.normal_(mha.bias_v)
    att = DecomposedMultiheadAttention.from_mha(mha).eval()
    g = torch.Generator().manual_seed(4)
    n, lq, s, kd = 3, 5, 7, mha.kdim
    q = torch.randn(n, lq, 32, generator=g)
    k = torch.randn(n, s, kd, generator=g)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    masks = {}
    if variant == "masks":
        am = torch.rand(lq, s, generator=g) < 0.3
        am[:, 0] = False
        kpm = torch.zeros(n, s, dtype=torch.bool)
        kpm[0, -2:] = True
        masks = dict(attn_mask=am, key_padding_mask=kpm)
    with torch.no_grad():
        for need_weights in (True, False):
            ref, ref_w = mha(q, k, k, need_weights=need_weights, **masks)
            got, got_w = att(q, k, k, need_weights=need_weights, **masks)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
            if need_weights:
                torch.testing.assert_close(got_w, ref_w, atol=1e-5, rtol=0)
            else:
                assert got_w is None
        # unbatched input, per-head weights
        one_q, one_k = (q[0], k[0]) if batch_first else (q[:, 0], k[:, 0])
        ref, ref_w = mha(one_q, one_k, one_k, average_attn_weights=False)
        got, got_w = att(one_q, one_k, one_k, average_attn_weights=False)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_w, ref_w, atol=1e-5, rtol=0)


def test_transformer_encoder_layer_quantizes_runs_matches_reference_and_exports():
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    g = torch.Generator().manual_seed(6)
    calib = [torch.randn(4, 6, 32, generator=g) for _ in range(4)]  # 16 samples: the Hessian rule runs
    with warnings.catch_warnings():
        warnings.simplefilter("error", rmsmp.RMSMPWarning)  # nothing left in float, nothing unreached
        q = rmsmp.quantize(layer, rmsmp.RMSMPConfig(hessian=rmsmp.HessianConfig(probes=2)), calib)
    assert q.rmsmp_report["assign"] == "hessian"
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2"]
    assert list(rmsmp.row_plans(q)) == names
    assert all(isinstance(q.get_submodule(n), RMSMPLinear) for n in names)
    x = torch.randn(2, 6, 32, generator=g)
    with torch.no_grad():
        y = q(x)
        # direct reference: post-norm encoder layer from numpy RMSMP layers and explicit attention
        h = q.norm1(x + _np_attention(q.self_attn, x))
        ref = q.norm2(h + _np_linear(q.linear2, torch.relu(_np_linear(q.linear1, h))))
        float_y = layer(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    assert (y - float_y).abs().max() < 0.5 * float_y.abs().max()  # quantized, not broken
    # torch's checks read .weight of linear1/linear2/out_proj: dequantized, read-only
    w = q.linear1.weight
    torch.testing.assert_close(w, q.linear1.weight_int.float() * q.linear1.row_scale[:, None])
    with pytest.raises(AttributeError):
        q.linear1.weight = torch.zeros_like(w)
    exported = torch.export.export(q, (x,))
    qops = [n for n in exported.graph.nodes if "rmsmp.qlinear" in str(n.target)]
    assert len(qops) == 6
    torch.testing.assert_close(exported.module()(x), y, atol=0, rtol=0)


def test_multihead_attention_model_quantizes_runs_and_exports():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0])

    torch.manual_seed(7)
    model = Attend().eval()
    g = torch.Generator().manual_seed(8)
    calib = [torch.randn(4, 5, 32, generator=g) for _ in range(2)]
    q = rmsmp.quantize(model, VAR, calib)
    assert list(rmsmp.row_plans(q)) == ["mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.out_proj", "head"]
    assert isinstance(q.mha, DecomposedMultiheadAttention) and isinstance(model.mha, nn.MultiheadAttention)
    x = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        y = q(x)
        ref = _np_linear(q.head, _np_attention(q.mha, x))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.export.export(q, (x,)).module()(x), y, atol=0, rtol=0)


def test_bare_multihead_attention_is_the_model():
    torch.manual_seed(9)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    g = torch.Generator().manual_seed(10)
    calib = [(x, x, x) for x in (torch.randn(3, 4, 16, generator=g) for _ in range(2))]
    q = rmsmp.quantize(mha, VAR, calib)
    assert isinstance(q, DecomposedMultiheadAttention)
    assert sorted(rmsmp.row_plans(q)) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    x = calib[0][0]
    with torch.no_grad():
        out, _ = q(x, x, x, need_weights=False)
    torch.testing.assert_close(out, _np_attention(q, x), atol=1e-5, rtol=0)


def test_skipped_attention_keeps_the_encoder_layer_off_its_fast_path():
    torch.manual_seed(11)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    calib = [torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(12))]
    q = rmsmp.quantize(layer, rmsmp.RMSMPConfig(assign="variance", skip="self_attn"), calib)
    assert isinstance(q.self_attn, nn.MultiheadAttention) and list(rmsmp.row_plans(q)) == ["linear1", "linear2"]
    x = calib[0]
    with torch.no_grad():
        h = q.norm1(x + q.self_attn(x, x, x, need_weights=False)[0])
        ref = q.norm2(h + _np_linear(q.linear2, torch.relu(_np_linear(q.linear1, h))))
        torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# 3. re-quantizing
# --------------------------------------------------------------------------------------------
def test_quantizing_a_quantized_model_raises():
    model, calib = _mlp(13)
    q = rmsmp.quantize(model, VAR, calib)
    with pytest.raises(ValueError, match=r"model is already quantized: it has RMSMP layers \['fc1', 'fc2'\]"):
        rmsmp.quantize(q, rmsmp.RMSMPConfig(assign="variance", ratio={"fixed_8": 1.0}), calib)
    assert q.rmsmp_config == VAR  # untouched
    qat = prepare_qat(model, VAR, calib)
    with pytest.raises(ValueError, match="model is already quantized"):
        prepare_qat(qat, VAR, calib)


# --------------------------------------------------------------------------------------------
# weak cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("np_type", [np.float64, np.float32])
def test_numpy_ratio_shares_are_accepted(np_type):
    cfg = rmsmp.RMSMPConfig(ratio={"sp2_4": np_type(0.6), "fixed_4": np_type(0.35), "fixed_8": np_type(0.05)})
    assert all(type(v) is float for v in cfg.ratio.values())
    assert abs(cfg.ratio["sp2_4"] - 0.6) < 1e-6
    with pytest.raises(ValueError, match=r"ratio\['fixed_8'\] must be a finite number"):
        rmsmp.RMSMPConfig(ratio={"sp2_4": 0.95, "fixed_8": np.float32("nan")})
    with pytest.raises(ValueError, match=r"ratio\['fixed_8'\] must be a finite number, got True"):
        rmsmp.RMSMPConfig(ratio={"sp2_4": 0.0, "fixed_8": True})


def test_embedding_lstm_gru_left_in_float_warn_once_naming_them():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.gru = nn.GRU(8, 8, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, ids):
            h = self.gru(self.lstm(self.emb(ids))[0])[0]
            return self.fc(self.norm(h))

    torch.manual_seed(14)
    calib = [torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(15))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = rmsmp.quantize(Seq().eval(), VAR, calib)
    msgs = [str(w.message) for w in caught if issubclass(w.category, rmsmp.RMSMPWarning)]
    floats = [m for m in msgs if "left in float" in m]
    assert len(floats) == 1, msgs
    assert "'emb' (Embedding)" in floats[0] and "'lstm' (LSTM)" in floats[0] and "'gru' (GRU)" in floats[0]
    assert "norm" not in floats[0]
    assert list(rmsmp.row_plans(q)) == ["fc"]


def test_zero_row_calibration_batch_raises():
    model, calib = _mlp(16)
    with pytest.raises(ValueError, match=r"calib_data batch 1, input 0 has no samples \(shape \[0, 8\]\)"):
        rmsmp.quantize(model, VAR, [calib[0], torch.zeros(0, 8)])


def test_empty_calibration_list_raises():
    model, _ = _mlp(17)
    with pytest.raises(ValueError, match="calib_data is empty"):
        rmsmp.quantize(model, VAR, [])
    with pytest.raises(ValueError, match="calib_data is empty"):
        rmsmp.quantize(model, VAR, (x for x in []))


def test_all_zero_calibration_inputs_warn_naming_the_layer_and_scale():
    model, _ = _mlp(18)
    with pytest.warns(rmsmp.RMSMPWarning, match=r"layer 'fc1': its calibration inputs were all zero.*"
                                                 r"using scale 1 \(unsigned, 8 bits\)"):
        q = rmsmp.quantize(model, VAR, [torch.zeros(4, 8)])
    assert rmsmp_layers(q)["fc1"].act_scale == 1.0


def test_dict_output_model_gets_row_hessians_from_its_first_value():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = MLP()

        def forward(self, x):
            y = self.body(x)
            return {"logits": y, "extra": None, "scaled": 2 * y}

    torch.manual_seed(19)
    model = DictOut().eval()
    g = torch.Generator().manual_seed(20)
    calib = [torch.randn(8, 8, generator=g) for _ in range(2)]  # 16 samples
    cfg = rmsmp.RMSMPConfig(hessian=rmsmp.HessianConfig(probes=2))
    q = rmsmp.quantize(model, cfg, calib)
    assert q.rmsmp_report["assign"] == "hessian"
    # the same estimate as the plain tensor model's
    plain = rmsmp.quantize(model.body, cfg, calib)
    for name, h in plain.rmsmp_row_hessian.items():
        np.testing.assert_allclose(q.rmsmp_row_hessian[f"body.{name}"], h, rtol=1e-6)


def test_output_without_tensor_raises_naming_what_is_needed():
    class NoTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return {"score": float(self.fc(x).sum())}

    torch.manual_seed(21)
    calib = [torch.randn(8, 8, generator=torch.Generator().manual_seed(22)) for _ in range(2)]
    with pytest.raises(TypeError, match=r"needs the model's output to be a tensor, or a tuple/list/dict of "
                                        r"tensors .* got a dict with keys \['score'\]"):
        rmsmp.quantize(NoTensor().eval(), rmsmp.RMSMPConfig(), calib)


def _qat_setup(seed):
    model, calib = _mlp(seed)
    qat = prepare_qat(model, VAR, calib)
    g = torch.Generator().manual_seed(seed + 100)
    pairs = [((torch.randn(8, 8, generator=g),), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    return qat, pairs


def test_train_qat_accepts_a_list_of_pairs_and_a_bare_input_tensor():
    qat, pairs = _qat_setup(23)
    before = qat.fc1.weight.detach().clone()
    logs = []
    train_qat(qat, pairs, nn.functional.cross_entropy, QATConfig(epochs=2, lr=1e-2), log=logs.append)
    assert len(logs) == 2 and "2 steps" in logs[0]
    assert not torch.equal(before, qat.fc1.weight)
    bare = [(x[0], y) for x, y in pairs]  # inputs as one tensor, not a tuple: not split along axis 0
    train_qat(qat, bare, nn.functional.cross_entropy, QATConfig(epochs=1))


def test_train_qat_batch_of_wrong_form_raises_naming_the_step():
    qat, pairs = _qat_setup(24)
    inputs_only = [x[0] for x, _ in pairs]  # tensors, not (inputs, target) pairs
    with pytest.raises(TypeError, match=r"batch at epoch 1, step 1 must be an \(inputs, target\) pair, "
                                        r"got a Tensor of shape \[8, 8\]"):
        train_qat(qat, inputs_only, nn.functional.cross_entropy)
    with pytest.raises(TypeError, match=r"step 2 must be an \(inputs, target\) pair, got a tuple of 3"):
        train_qat(qat, [pairs[0], pairs[1] + (None,)], nn.functional.cross_entropy)
    with pytest.raises(TypeError, match="one-shot iterator .* epochs=2"):
        train_qat(qat, iter(pairs), nn.functional.cross_entropy, QATConfig(epochs=2))
    with pytest.raises(TypeError, match="batches must be a callable .* got a int"):
        train_qat(qat, 3, nn.functional.cross_entropy)


def test_train_qat_nan_loss_raises_at_once_naming_step_and_layer():
    qat, pairs = _qat_setup(25)
    with torch.no_grad():
        qat.fc2.weight[0, 0] = float("nan")
    before = qat.fc1.weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1, step 1: the first non-finite output "
                                                 r"is that of layer 'fc2' \(FakeQuantLayer\)"):
        train_qat(qat, pairs, nn.functional.cross_entropy)
    assert torch.equal(before, qat.fc1.weight)  # no step taken


def test_train_qat_nan_from_the_loss_function_says_so():
    qat, pairs = _qat_setup(26)
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 1: the model's output is finite: loss_fn"):
        train_qat(qat, pairs, lambda y, t: (y - y).sum() / 0.0 * 0.0)


def test_train_qat_without_batches_raises():
    qat, pairs = _qat_setup(27)
    with pytest.raises(ValueError, match=r"epoch 1 has no batches \(0 steps trained\)"):
        train_qat(qat, [], nn.functional.cross_entropy)
    with pytest.raises(ValueError, match=r"epoch 2 has no batches \(0 steps trained, 1 epoch\(s\) done\)"):
        train_qat(qat, lambda epoch: iter(pairs) if epoch == 0 else iter([]), nn.functional.cross_entropy,
                  QATConfig(epochs=2))
