"""The quantized torch model: the integer reference every target must match."""


import numpy as np
import pytest
import torch
from torch import nn

import tvm_rmsmp as rmsmp
from conftest import np_conv_acc, np_dense_acc, np_epilogue
from tvm_rmsmp.nn.layers import ActQuant, rmsmp_layers


def _np_layer(layer, x: np.ndarray) -> np.ndarray:
    """Independent numpy evaluation of one RMSMP layer from its stored integers."""
    inv = np.float32(layer.inv_act_scale)
    xq = np.clip(np.round(x.astype(np.float32) * inv), layer.qmin, layer.qmax).astype(np.int64)
    w = layer.weight_int.numpy()
    if layer.op == "dense":
        acc = np_dense_acc(xq, w)
        axis = acc.ndim - 1
    else:
        acc = np_conv_acc(xq, w, layer.stride, layer.padding, layer.dilation)
        axis = 1
    return np_epilogue(acc, layer.bias_int.numpy().astype(np.int64), layer.out_scale.numpy(), axis)


def test_quantize_replaces_layers_and_keeps_input_model(small_resnet):
    model, calib = small_resnet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    layers = rmsmp_layers(q)
    assert set(layers) == {"stem.0", "conv_a", "conv_b", "down", "fc1", "fc2"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())  # folded
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v)
    plans = rmsmp.row_plans(q)
    for name, plan in plans.items():
        assert plan.weight_int.dtype == np.int8 and plan.weight_int.shape[0] == len(plan.schemes)
        for s in set(plan.schemes):
            rows = np.array(plan.schemes) == s
            assert set(np.unique(plan.weight_int[rows])) <= set(rmsmp.get_scheme(s).levels.tolist())
        counts = plan.counts()
        for s, share in q.rmsmp_config.ratio.items():
            assert abs(counts.get(s, 0) - share * plan.num_rows) < 1


def test_layers_equal_independent_numpy_reference(small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.__setitem__(m.layer_name, (i[0], o)))
             for m in rmsmp_layers(q).values()]
    with torch.no_grad():
        q(torch.randn(4, 1, 16, 16))
    for h in hooks:
        h.remove()
    for name, layer in rmsmp_layers(q).items():
        x, y = inputs[name]
        np.testing.assert_array_equal(y.numpy(), _np_layer(layer, x.numpy()), err_msg=name)


def test_quantized_model_tracks_float_model(small_resnet):
    model, calib = small_resnet
    x = torch.randn(16, 1, 16, 16)
    ref = model(x)
    q8 = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio={"fixed_8": 1.0}), calib)
    qm = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    err8 = (q8(x) - ref).norm() / ref.norm()
    errm = (qm(x) - ref).norm() / ref.norm()
    assert err8 < 0.05 and errm < 0.3 and err8 < errm


def test_activation_quantizer_is_unsigned_after_relu():
    a = ActQuant.calibrate(np.abs(np.random.default_rng(0).standard_normal(1000)), 8)
    assert not a.signed and (a.qmin, a.qmax) == (0, 255)
    b = ActQuant.calibrate(np.random.default_rng(0).standard_normal(1000), 4)
    assert b.signed and (b.qmin, b.qmax) == (-7, 7)


def test_act_bits_4_changes_the_range(small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_bits=4), calib)
    layers = rmsmp_layers(q)
    assert layers["conv_a"].qmax == 15 and layers["conv_a"].qmin == 0  # input is post-ReLU
    assert layers["stem.0"].qmax == 7 and layers["stem.0"].qmin == -7  # raw input is signed


def test_nan_weights_name_the_layer(small_resnet):
    model, calib = small_resnet
    bad = type(model)()
    bad.load_state_dict(model.state_dict())
    bad.eval()
    with torch.no_grad():
        bad.fc1.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match="layer 'fc1': weight has 1 NaN/Inf"):
        rmsmp.quantize(bad, rmsmp.RMSMPConfig(), calib)


def test_bad_calibration_data(small_resnet):
    model, calib = small_resnet
    with pytest.raises(ValueError, match="batch 1, input 0 has NaN/Inf"):
        rmsmp.quantize(model, rmsmp.RMSMPConfig(), [calib[0], calib[1] * float("inf")])
    with pytest.raises(ValueError, match="batch 0 does not fit the model"):
        rmsmp.quantize(model, rmsmp.RMSMPConfig(), [torch.randn(2, 3, 16, 16)])
    with pytest.raises(ValueError, match="calib_data is empty"):
        rmsmp.quantize(model, rmsmp.RMSMPConfig(), [])
    with pytest.raises(ValueError, match="calib_data is required"):
        rmsmp.quantize(model, rmsmp.RMSMPConfig())


def test_unsupported_layers_stay_float_with_a_warning():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Flatten(), nn.Linear(64, 3)).eval()
    with pytest.warns(rmsmp.RMSMPWarning, match="layer '0' left in float: Conv2d with groups=4"):
        q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), [torch.randn(2, 4, 4, 4)])
    assert isinstance(q[0], nn.Conv2d) and isinstance(q[2], rmsmp.RMSMPLinear)


class _SamePadConv(nn.Conv2d):
    """A conv that pads in forward (as "same"-padding implementations do)."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def test_conv_subclass_with_its_own_forward_stays_float():
    model = nn.Sequential(_SamePadConv(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 2, 6, 6)
    with pytest.warns(rmsmp.RMSMPWarning, match="layer '0' left in float: _SamePadConv overrides Conv2d.forward"):
        q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), [x])
    assert type(q[0]) is _SamePadConv and q(x).shape == (2, 3)


def test_model_without_quantizable_layers_warns():
    model = nn.Sequential(nn.ReLU()).eval()
    with pytest.warns(rmsmp.RMSMPWarning, match="no quantizable layer"):
        q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), [torch.randn(2, 3)])
    assert isinstance(q[0], nn.ReLU)


def test_skip_keeps_named_layers_float(small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(skip=("fc2",)), calib)
    assert isinstance(q.fc2, nn.Linear) and "fc2" not in rmsmp.row_plans(q)


def test_transformer_style_3d_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    calib = [torch.randn(2, 5, 16) for _ in range(2)]
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    x = torch.randn(3, 5, 16)
    layer = q[0]
    np.testing.assert_array_equal(layer(x).detach().numpy(), _np_layer(layer, x.numpy()))


def test_row_with_tiny_weights_and_a_large_bias_stays_in_int32():
    """A BN-folded channel that is nearly off: weights ~1e-9, bias 0.5. Its bias must not
    overflow the accumulator; the row's weights drop below the resolution and the output
    keeps the bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight[2] = 1e-9 * torch.randn(8)
        model[0].bias[2] = 0.5
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio={"fixed_8": 1.0}), [torch.randn(32, 8)])
    layer = q[0]
    assert int(layer.bias_int.abs().max()) <= 2**24
    x = torch.randn(5, 8)
    y, ref = layer(x), model(x)
    np.testing.assert_allclose(y[:, 2].numpy(), ref[:, 2].detach().numpy(), atol=1e-3)
    np.testing.assert_array_equal(y.detach().numpy(), _np_layer(layer, x.numpy()))


def test_reference_products_are_exact_on_every_path():
    """float32 direct, base-16 digits (large inputs, 8-bit weights), float64 (small inputs),
    a weight changed in place, and weights made under torch.inference_mode."""
    from tvm_rmsmp.nn.ops import _exact_product, _linear

    g = torch.Generator().manual_seed(0)
    for fan in (64, 576, 4608):
        w = torch.randint(-127, 128, (37, fan), generator=g, dtype=torch.int8)
        for rows in (2, 3000):
            x = torch.randint(0, 256, (rows, fan), generator=g).float()
            assert torch.equal(_exact_product(x, w, 0, 255, _linear, -1), x.double() @ w.double().t())
        w.add_(1).clamp_(-127, 127)  # the cached copies must follow
        assert torch.equal(_exact_product(x, w, 0, 255, _linear, -1), x.double() @ w.double().t())
    with torch.inference_mode():
        w = torch.randint(-127, 128, (5, 4608), generator=g, dtype=torch.int8)
        x = torch.randint(-128, 128, (3000, 4608), generator=g).float()
        assert torch.equal(_exact_product(x, w, -128, 127, _linear, -1), x.double() @ w.double().t())
    conv = lambda xs, ws: torch.nn.functional.conv2d(xs, ws, None, 1, 1, 1)  # noqa: E731
    w = torch.randint(-127, 128, (6, 64, 3, 3), generator=g, dtype=torch.int8)
    x = torch.randint(0, 256, (4, 64, 20, 20), generator=g).float()
    assert torch.equal(_exact_product(x, w, 0, 255, conv, 1), conv(x.double(), w.double()))
