"""Integer-only requantization (RMSMPConfig(requant="fixed_point")): the arithmetic against
Python integers / fractions written here, and the torch reference layers against it."""

from fractions import Fraction

import numpy as np
import pytest

from tvm_rmsmp.quant.requant import multiplier_value, quantize_multiplier, quantize_multipliers, requantize


def _ref_pair(scale):
    """The (m, s) with 2^14 <= m < 2^15 nearest to scale, by search over s."""
    best = None
    for s in range(1, 64):
        m = round(Fraction(scale) * 2**s)
        if 2**14 <= m < 2**15:
            err = abs(Fraction(m, 2**s) - Fraction(scale))
            if best is None or err < best[0]:
                best = (err, m, s)
    return best[1], best[2]


def _ref_requant(x, m, s, qmin, qmax, zp=0):
    q = Fraction(x * m, 2**s) + Fraction(1, 2)
    q = q.numerator // q.denominator  # floor
    return min(max(q + zp, qmin), qmax)


def test_multiplier_is_the_nearest_15_bit_one():
    rng = np.random.default_rng(0)
    scales = np.concatenate([10.0 ** rng.uniform(-12, 4, 300), [1.0, 0.5, 0.25, 2**-20, 0.999999999, 1 - 2**-17]])
    m, s = quantize_multipliers(scales)
    for v, mi, si in zip(scales, m, s):
        rm, rs = _ref_pair(float(v))
        # ties between two neighbours (a power of two boundary) may pick either: same value
        assert Fraction(int(mi), 2 ** int(si)) == Fraction(rm, 2**rs), v
        assert abs(Fraction(int(mi), 2 ** int(si)) / Fraction(float(v)) - 1) <= Fraction(1, 2**15)
    assert multiplier_value(m, s).astype(np.float64).tolist() == [float(Fraction(int(a), 2 ** int(b)))
                                                                  for a, b in zip(m, s)]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 2.0**15, 2.0**-60])
def test_multiplier_refuses_bad_scales(bad):
    with pytest.raises(ValueError, match="scale"):
        quantize_multiplier(bad)


def test_requantize_matches_fractions_including_ties_and_saturation():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.integers(-2**31 + 1, 2**31, 400), rng.integers(-5000, 5000, 400),
                        [0, 1, -1, 2**31 - 1, -2**31 + 1]]).astype(np.int64)
    rows = 5
    x = x[: (x.size // rows) * rows].reshape(-1, rows)
    m, s = quantize_multipliers(10.0 ** rng.uniform(-9, 0, rows))
    for qmin, qmax, zp in ((-127, 127, 0), (0, 255, 0), (0, 255, 17)):
        got = requantize(x.astype(np.int32), m[None], s[None], qmin, qmax, zp)
        want = [[_ref_requant(int(v), int(m[j]), int(s[j]), qmin, qmax, zp) for j, v in enumerate(r)] for r in x]
        np.testing.assert_array_equal(got, np.array(want))
    # ties: x * m / 2^s exactly k + 1/2 rounds toward +infinity
    half = requantize(np.array([5, -5, 3, -3], np.int32), np.array(2**14), np.array(15), -127, 127)
    np.testing.assert_array_equal(half, [3, -2, 2, -1])  # 2.5 -> 3, -2.5 -> -2, 1.5 -> 2, -1.5 -> -1
    # saturation: unsigned clamps negatives to 0 (the folded ReLU)
    np.testing.assert_array_equal(requantize(np.array([-10**6, 10**6], np.int32), np.array(2**14), np.array(14), 0,
                                             255), [0, 255])


def test_requantize_refuses_float_input():
    with pytest.raises(TypeError, match="integer"):
        requantize(np.array([1.5]), np.array(2**14), np.array(15), -127, 127)


# ----- the torch reference ---------------------------------------------------------------------
torch = pytest.importorskip("torch")


def test_config_validates_requant():
    from tvm_rmsmp import RMSMPConfig

    assert RMSMPConfig().requant == "float"
    with pytest.raises(ValueError, match="requant must be one of"):
        RMSMPConfig(requant="int8")
    with pytest.raises(ValueError, match="per-tensor"):
        RMSMPConfig(requant="fixed_point", act_granularity="per_token")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, 1, 1)
        self.c2 = torch.nn.Conv2d(8, 6, 3, 2, 1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = self.pool(torch.nn.functional.relu(self.c2(h)))
        return self.fc(torch.flatten(h, 1)) + 0.0  # the add: fc's output is not chained


def _ref_layer(layer, x: np.ndarray) -> np.ndarray:
    """The layer's output from its integer parameters, with numpy and Python integers."""
    inv = np.float32(layer.inv_act_scale)
    xq = np.clip(np.round(x.astype(np.float32) * inv), layer.qmin, layer.qmax).astype(np.int64)  # half to even
    w = layer.weight_int.numpy().astype(np.int64)
    if layer.op == "conv2d":
        (ph, pw), (sh, sw) = layer.padding, layer.stride
        xp = np.pad(xq, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        f, c, kh, kw = w.shape
        oh, ow = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
        acc = np.zeros((x.shape[0], f, oh, ow), np.int64)
        for ky in range(kh):
            for kx in range(kw):
                tap = xp[:, :, ky: ky + sh * (oh - 1) + 1: sh, kx: kx + sw * (ow - 1) + 1: sw]
                acc += np.einsum("nchw,fc->nfhw", tap, w[:, :, ky, kx])
        axis = 1
    else:
        acc, axis = xq @ w.T, -1
    acc = np.moveaxis(acc, axis, -1)
    m, s = layer.requant_mult.numpy(), layer.requant_shift.numpy()
    b = layer.bias_int.numpy()
    out = np.vectorize(lambda v, j: min(max((int(v + b[j]) * int(m[j]) + (1 << (int(s[j]) - 1))) >> int(s[j]),
                                               layer.out_act.qmin), layer.out_act.qmax))(
        acc, np.arange(acc.shape[-1]))
    y = out.astype(np.float32) * np.float32(layer.out_act_scale)
    return np.moveaxis(y, -1, axis)


def test_fixed_point_layers_match_integer_reference_and_chain():
    import tvm_rmsmp as rmsmp
    from tvm_rmsmp.nn.layers import rmsmp_layers

    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(4, 3, 8, 8)
    q = rmsmp.quantize(net, rmsmp.RMSMPConfig(requant="fixed_point", assign="variance", rounding="nearest"),
                       calib_data=[x])
    layers = rmsmp_layers(q)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0], out)))
             for n, m in layers.items()]
    y = q(x)
    for h in hooks:
        h.remove()
    for name, layer in layers.items():
        inp, out = seen[name]
        np.testing.assert_array_equal(out.numpy(), _ref_layer(layer, inp.numpy()), err_msg=name)
    # c1 -> relu -> c2 and c2 -> relu -> pool -> flatten -> fc are chained: the producer writes at
    # its consumer's input scale and the ReLU is the unsigned clamp
    assert layers["c1"].out_act.scale == layers["c2"].act.scale and layers["c1"].out_act.qmin == 0
    assert layers["c2"].out_act.scale == layers["fc"].act.scale
    # so the consumer quantizes the producer's codes back exactly
    for prod, cons in (("c1", "c2"), ("c2", "fc")):
        out = seen[prod][1]
        codes = np.round(out.numpy().astype(np.float64) / layers[prod].out_act_scale)
        requant = np.clip(np.round(out.numpy() * np.float32(layers[cons].inv_act_scale)), layers[cons].qmin,
                          layers[cons].qmax)
        np.testing.assert_array_equal(np.maximum(codes, 0), requant)
    assert layers["fc"].out_act.qmin < 0  # fc feeds an add: own (signed) output scale
    assert y.shape == (4, 5)
    # the float epilogue is unchanged by default
    qf = rmsmp.quantize(net, rmsmp.RMSMPConfig(assign="variance", rounding="nearest"), calib_data=[x])
    assert all(m.out_act is None for m in rmsmp_layers(qf).values())


@pytest.fixture(scope="module")
def fixed_net():
    import tvm_rmsmp as rmsmp

    torch.manual_seed(1)
    net = _Net().eval()
    x = torch.randn(4, 3, 8, 8)
    q = rmsmp.quantize(net, rmsmp.RMSMPConfig(requant="fixed_point", assign="variance", rounding="nearest"),
                       calib_data=[x])
    return net, q, x


def test_save_and_qat_refuse_fixed_point(fixed_net, tmp_path):
    import tvm_rmsmp as rmsmp

    net, q, x = fixed_net
    with pytest.raises(ValueError, match="fixed_point"):
        rmsmp.save_quantized(q, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="requant"):
        rmsmp.prepare_qat(net, rmsmp.RMSMPConfig(requant="fixed_point"), [x])


def test_llvm_compiled_fixed_point_model_is_bit_exact(fixed_net):
    """CPU: the fixed-point epilogue lowered by the portable schedule (the x86 intrinsic kernels
    decline layers with the contract.REQUANT attribute) equals the torch reference bit for bit,
    on inputs whose accumulators reach past 2^24 (so no float32 shortcut would do)."""
    import tvm

    import tvm_rmsmp as rmsmp
    from relay_passes import contract

    _, q, x = fixed_net
    exe = rmsmp.compile(q, (x,), target="llvm")
    for xs in (x, 40 * torch.randn(4, 3, 8, 8)):  # the second saturates many codes
        np.testing.assert_array_equal(np.asarray(exe(xs)), q(xs).numpy())
    funcs = [f for _, f in exe.ir.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and contract.REQUANT in f.attrs]
    assert len(funcs) >= 3 and all(contract.CPU_KERNEL not in f.attrs for f in funcs)


def test_opencl_compiled_fixed_point_model_is_bit_exact(fixed_net):
    """OpenCL (PoCL): the same fixed-point epilogue through the GPU schedules, bit for bit."""
    from conftest import opencl_status

    usable, why = opencl_status()
    if not usable:
        pytest.skip(why)
    import tvm_rmsmp as rmsmp

    _, q, x = fixed_net
    exe = rmsmp.compile(q, (x,), target="mali")
    for xs in (x, 40 * torch.randn(4, 3, 8, 8)):
        np.testing.assert_array_equal(exe(xs), q(xs).numpy())
