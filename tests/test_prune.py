"""The pruning API (tvm_rmsmp/nn/prune.py, quant/sparsity.py): mask geometry checked block by
block, zeros kept through quantize / QAT, gradual pruning, bad input."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tvm_rmsmp as rmsmp
from tvm_rmsmp.nn.layers import rmsmp_layers
from tvm_rmsmp.nn.qat import qat_layers


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 16, 1), nn.Flatten(), nn.Linear(16 * 4 * 4, 32)).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 4, 4, generator=g)]


def _prune(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rmsmp.prune(model, rmsmp.PruneConfig(**kw), calib_data=_calib())


def _blocks(mask, br, bc):
    """Yield each (block rows x block channels) piece of a mask (edges smaller)."""
    for i in range(0, mask.shape[0], br):
        for j in range(0, mask.shape[1], bc):
            yield mask[i:i + br, j:j + bc]


def test_block_punched_geometry():
    pm = _prune(_cnn(), scheme="block_punched", sparsity=0.75, block=(8, 4))
    masks = rmsmp.prune_masks(pm)
    assert set(masks) == {"0", "2", "4", "6"}
    for name, mask in masks.items():
        w = dict(pm.named_modules())[name].weight.detach().numpy()
        assert np.all(w[~mask] == 0) and np.all(w[mask] != 0)
        m4 = mask.reshape(mask.shape[0], mask.shape[1], -1)
        for b in _blocks(m4, 8, 4):  # the same positions removed from every kernel of a block
            assert np.all(b == b[:1, :1, :]), name
        assert abs((1 - mask.mean()) - 0.75) < 0.06, name
    lin = masks["6"]  # Linear: a removed position is the whole block
    assert all(b.all() or not b.any() for b in _blocks(lin, 8, 4))


def test_block_row_and_pattern_geometry():
    pm = _prune(_cnn(), scheme="block_row", sparsity=0.5, block=(4, 9))
    flat = rmsmp.prune_masks(pm)["2"].reshape(32, -1)
    assert all(b.all() or not b.any() for b in _blocks(flat, 4, 9))
    assert abs((1 - flat.mean()) - 0.5) < 0.05

    with pytest.warns(rmsmp.RMSMPWarning) as record:
        pm = rmsmp.prune(_cnn(), rmsmp.PruneConfig(scheme="pattern", sparsity=0.75, block=(8, 4), patterns=4))
    fallback = sorted(str(r.message).split("'")[1] for r in record if "is not a 3x3 convolution" in str(r.message))
    assert fallback == ["4", "6"]  # the 1x1 conv and the Linear, each named
    mask = rmsmp.prune_masks(pm)["2"].reshape(32 * 16, 9)
    kept = mask.sum(1)
    assert set(np.unique(kept)) <= {0, 4}  # 4 of 9, or the whole kernel removed (connectivity)
    pats = {tuple(r) for r in mask[kept == 4]}
    assert len(pats) <= 4 and all(p[4] for p in pats)  # the centre is in every pattern
    assert abs((1 - mask.mean()) - 0.75) < 0.03
    assert (kept == 0).any()


def test_importance_activation_and_overrides():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16))
    with torch.no_grad():
        model[0].weight.copy_(torch.ones(16, 8))
        model[0].weight[:, :4] *= 2.0  # larger weights on channels 0-3
    x = torch.randn(64, 8)
    x[:, 4:] *= 100.0  # but far larger inputs on channels 4-7
    mag = rmsmp.prune_masks(rmsmp.prune(model, rmsmp.PruneConfig(sparsity=0.5, block=(16, 4))))["0"]
    act = rmsmp.prune_masks(rmsmp.prune(model, rmsmp.PruneConfig(sparsity=0.5, block=(16, 4), importance="activation"),
                                        calib_data=[x]))["0"]
    assert mag[:, :4].all() and not mag[:, 4:].any()
    assert act[:, 4:].all() and not act[:, :4].any()
    pm = _prune(_cnn(), sparsity=0.75, block=(8, 4), layer_sparsity={"6": 0.5}, skip=("0",))
    masks = rmsmp.prune_masks(pm)
    assert "0" not in masks and abs((1 - masks["6"].mean()) - 0.5) < 0.02


@pytest.mark.parametrize("ratio,rounding", [({"sp2_4": 1.0}, "nearest"), ({"fixed_4": 1.0}, "nearest"),
                                            ({"fixed_8": 1.0}, "nearest"),
                                            ({"sp2_4": 0.6, "fixed_4": 0.35, "fixed_8": 0.05}, "gptq")])
def test_quantize_keeps_zeros_and_masks(ratio, rounding):
    pm = _prune(_cnn(), sparsity=0.75, block=(8, 4))
    q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(ratio=ratio, assign="variance", rounding=rounding), calib_data=_calib())
    masks = rmsmp.prune_masks(pm)
    layers = rmsmp_layers(q)
    for name, mask in masks.items():
        wi = layers[name].weight_int.numpy()
        assert np.all(wi[~mask] == 0), name  # GPTQ would spread error onto them: forced back to 0
        np.testing.assert_array_equal(layers[name].prune_mask.numpy(), mask)
    assert set(rmsmp.prune_masks(q)) == set(masks)


def test_qat_keeps_masks():
    pm = _prune(_cnn(), sparsity=0.75, block=(8, 4))
    qat = rmsmp.prepare_qat(pm, rmsmp.RMSMPConfig(assign="variance"), calib_data=_calib())
    layers = qat_layers(qat)
    out = qat(_calib()[0])
    out.square().mean().backward()
    for name, layer in layers.items():
        mask = layer.prune_mask
        assert torch.all(layer.weight.grad[~mask] == 0), name  # pruned weights get no gradient
        w, _ = layer.quantized_weight()
        assert torch.all(w[~mask] == 0), name
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.add_(0.01)  # an update that would overwrite the zeros
    q = rmsmp.convert_qat(qat)
    for name, layer in rmsmp_layers(q).items():
        assert np.all(layer.weight_int.numpy()[~layer.prune_mask.numpy()] == 0), name


def test_gradual_pruning_with_train_fn():
    calls = []

    def train_fn(model):
        sparsity = [float((m.weight == 0).float().mean()) for m in model.modules() if isinstance(m, nn.Linear)]
        calls.append(sparsity[0])
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.weight.add_(0.5)  # training that ignores the masks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer '0': the block does not divide it (tested below)
        pm = rmsmp.prune(_cnn(), rmsmp.PruneConfig(sparsity=0.75, block=(8, 4)), train_fn=train_fn, steps=3)
    assert len(calls) == 3 and calls[0] < calls[1] < calls[2] <= 0.76  # the cubic schedule rises to the rate
    masks = rmsmp.prune_masks(pm)  # zeros restored after each round
    assert abs((1 - masks["6"].mean()) - 0.75) < 0.02


def test_bad_input():
    for bad in (1.0, -0.1, float("nan"), "half"):
        with pytest.raises(ValueError, match="sparsity"):
            rmsmp.PruneConfig(sparsity=bad)
    with pytest.raises(ValueError, match="block"):
        rmsmp.PruneConfig(block=(0, 4))
    with pytest.raises(ValueError, match="scheme"):
        rmsmp.PruneConfig(scheme="random")
    with pytest.raises(ValueError, match="patterns"):
        rmsmp.PruneConfig(scheme="pattern", patterns=9)
    with pytest.raises(ValueError, match=r"layer_sparsity\['6'\]"):
        rmsmp.PruneConfig(layer_sparsity={"6": 1.5})
    with pytest.raises(ValueError, match="layer_sparsity names layers.*'nope'"):
        rmsmp.prune(_cnn(), rmsmp.PruneConfig(layer_sparsity={"nope": 0.5}))
    with pytest.raises(ValueError, match="skip names modules.*'nope'"):
        rmsmp.prune(_cnn(), rmsmp.PruneConfig(skip=("nope",)))
    with pytest.raises(ValueError, match="needs calib_data"):
        rmsmp.prune(_cnn(), rmsmp.PruneConfig(importance="activation"))
    with pytest.warns(rmsmp.RMSMPWarning, match=r"layer '0' \(weight \[16, 3, 3, 3\]\): block \(8, 4\) does not divide"):
        rmsmp.prune(_cnn(), rmsmp.PruneConfig(block=(8, 4)))
    with pytest.warns(rmsmp.RMSMPWarning) as record:
        rmsmp.prune(_cnn(), rmsmp.PruneConfig(scheme="pattern", sparsity=0.3, skip=("0",)))
    messages = [str(r.message) for r in record]
    assert any("layer '2': pattern pruning keeps at most 4 of 9" in m for m in messages)
    assert any("layer '6' is not a 3x3 convolution" in m for m in messages)
    # zeros overwritten by training without the masks: named, and fixable
    pm = _prune(_cnn(), sparsity=0.5, block=(8, 4))
    with torch.no_grad():
        pm[6].weight.add_(1.0)
    with pytest.raises(ValueError, match="layer '6': .* pruned weights are no longer zero"):
        rmsmp.prune_masks(pm)
    with pytest.raises(ValueError, match="layer '6': .* pruned weights are no longer zero"):
        rmsmp.quantize(pm, rmsmp.RMSMPConfig(assign="variance"), calib_data=_calib())
    rmsmp.apply_masks(pm)
    assert "6" in rmsmp.prune_masks(pm)
    # a mask that no longer fits its weight (the layer was replaced or resized)
    pm[6].prune_mask = pm[6].prune_mask[:, :8]
    with pytest.raises(ValueError, match="layer '6': its prune mask has shape"):
        rmsmp.prune_masks(pm)
    with pytest.raises(ValueError, match="already quantized"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rmsmp.prune(rmsmp.quantize(_cnn(), rmsmp.RMSMPConfig(assign="variance"), calib_data=_calib()))


def test_prune_and_deploy_tutorial_runs(tmp_path):
    from conftest import run_tutorial

    out = run_tutorial("prune_and_deploy.py", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TVM equals the torch reference: True" in out.stdout
    assert "loaded library matches: True" in out.stdout
    assert "layer 0: " in out.stdout and "layer 2: " in out.stdout


def test_transformer_masks_survive_attention_decomposition():
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 8, 32)
    # nn.MultiheadAttention uses out_proj's weight without calling it: magnitude importance there, named
    with pytest.warns(rmsmp.RMSMPWarning, match=r"never called layers \['self_attn.out_proj'\]"):
        pm = rmsmp.prune(m, rmsmp.PruneConfig(sparsity=0.75, block=(16, 4), importance="activation"), calib_data=[x])
    q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(assign="variance"), calib_data=[x])  # GPTQ rounding, attention decomposed
    masks = rmsmp.prune_masks(q)
    assert set(masks) == {"self_attn.out_proj", "linear1", "linear2"}
    for name, layer in rmsmp_layers(q).items():
        if name in masks:
            assert np.all(layer.weight_int.numpy()[~masks[name]] == 0), name
