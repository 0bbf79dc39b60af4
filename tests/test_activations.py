"""Activation quantization for transformers: per-token power-of-two scales and asymmetric
per-tensor activations (zero points), against independent numpy implementations of their
integer contracts (docs/design.md), and compiled for every target bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import tvm_rmsmp as rmsmp
from conftest import needs_opencl
from relay_passes import contract
from relay_passes.contract import ContractError
from relay_passes.rewrite_row_groups import row_group_func
from tvm_rmsmp.nn.layers import ActQuant, RMSMPConv2d, RMSMPLinear, fake_quant_per_token, rmsmp_layers
from tvm_rmsmp.quant.config import ZERO_POINT_GAIN
from tvm_rmsmp.quant.plan import RowPlan

MALI = {"kind": "opencl", "device": "mali", "host": {"kind": "llvm"}}
CUDA = {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}
needs_pocl = needs_opencl()


# ----- independent numpy references of the contracts ------------------------------------------
def np_token_exponent(x: np.ndarray, bits: int) -> np.ndarray:
    """e_t = clamp(E_t - (bits - 2), -100, 126), E_t the unbiased exponent field of max |x[t]|."""
    amax = np.abs(x.astype(np.float32)).max(axis=-1).astype(np.float32)
    field = (amax.view(np.uint32) >> 23) & 0xFF
    return np.clip(field.astype(np.int64) - 127 - (bits - 2), -100, 126)


def np_per_token_codes(x: np.ndarray, bits: int):
    qmax = 2 ** (bits - 1) - 1
    e = np_token_exponent(x, bits)
    inv = np.ldexp(np.float32(1), -e).astype(np.float32)[..., None]
    return np.clip(np.rint(x.astype(np.float32) * inv), -qmax, qmax), e


def np_per_token_linear(x, w_int, row_scale, bias, bits):
    xq, e = np_per_token_codes(x.reshape(-1, x.shape[-1]), bits)
    acc = xq.astype(np.int64) @ w_int.astype(np.int64).T
    y0 = acc.astype(np.float32) * row_scale.astype(np.float32)
    y = y0 * np.ldexp(np.float32(1), e).astype(np.float32)[:, None] + bias.astype(np.float32)
    return y.astype(np.float32).reshape(x.shape[:-1] + (w_int.shape[0],))


def np_zero_point_codes(x, inv_scale, zp, bits):
    q = np.rint(x.astype(np.float32) * np.float32(inv_scale)) + np.float32(zp)
    return np.clip(q, 0, 2**bits - 1)


def np_zero_point_linear(x, w_int, bias, act_scale, inv_scale, row_scale, zp, bits):
    xq = np_zero_point_codes(x.reshape(-1, x.shape[-1]), inv_scale, zp, bits).astype(np.int64)
    acc_scale = np.float64(act_scale) * row_scale.astype(np.float64)
    bias_int = np.round(bias.astype(np.float64) / acc_scale).astype(np.int64) - zp * w_int.astype(np.int64).sum(1)
    acc = xq @ w_int.astype(np.int64).T
    y = (acc + bias_int).astype(np.float32) * acc_scale.astype(np.float32)
    return y.reshape(x.shape[:-1] + (w_int.shape[0],)), bias_int


def _f32(bits: int) -> np.float32:
    return np.array([bits], np.uint32).view(np.float32)[0]


def _token_rows() -> np.ndarray:
    """Rows that probe the exponent rule: zero, subnormal, tiny normal, huge, a lone huge value,
    exact powers of two (and their negatives), and just below one."""
    rng = np.random.default_rng(7)
    rows = np.zeros((10, 16), np.float32)
    rows[1, 3] = _f32(0x00000005)  # subnormal
    rows[1, 7] = -_f32(0x007FFFFF)  # largest subnormal
    rows[2] = rng.standard_normal(16).astype(np.float32) * np.float32(2.0**-110)  # tiny normal
    rows[3] = rng.standard_normal(16).astype(np.float32) * np.float32(1e37)  # huge
    rows[4] = rng.standard_normal(16).astype(np.float32) * np.float32(0.01)
    rows[4, 5] = np.float32(3.0e4)  # one huge value in a small row
    rows[5] = rng.standard_normal(16).astype(np.float32)
    rows[5, 0] = np.float32(-1.0)
    rows[5] = np.clip(rows[5], -1.0, 1.0)  # max |x| exactly 1 (from a negative value)
    rows[6] = np.float32(np.nextafter(np.float32(2.0), np.float32(0)))  # just below 2: rounds up to qmax + 1
    rows[7] = rng.standard_normal(16).astype(np.float32) * 3 - 1
    rows[8] = np.float32(_f32(0x7F7FFFFF))  # float32 max
    rows[9] = rng.uniform(-0.5, 0.5, 16).astype(np.float32)
    return rows


# ----- (a) the quantizers and layers against numpy ---------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_token_exponent_and_codes_match_numpy(bits):
    from tvm_rmsmp.nn.ops import quantize_per_token

    rows = _token_rows()
    xq, e = quantize_per_token(torch.from_numpy(rows), bits)
    ref_q, ref_e = np_per_token_codes(rows, bits)
    np.testing.assert_array_equal(e.numpy(), ref_e)
    np.testing.assert_array_equal(xq.numpy(), ref_q)
    assert ref_e[0] == -100 and ref_e[1] == -100  # zero and subnormal rows: E = -127, clamped
    assert ref_e[5] == -(bits - 2)  # max |x| = 1: E = 0
    assert np.abs(ref_q).max() <= 2 ** (bits - 1) - 1


def _build_llvm(func, name="main"):
    return tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target="llvm")


@pytest.mark.parametrize("bits", [2, 8])
def test_tvm_token_functions_match_numpy(bits):
    from relay_passes import ops

    rows = _token_rows()
    dev = tvm.cpu()
    e = tvm.runtime.tensor(np.zeros(rows.shape[0], np.int32), dev)
    _build_llvm(ops.token_exponent_func(rows.shape, bits, "t"))["main"](tvm.runtime.tensor(rows, dev), e)
    ref_q, ref_e = np_per_token_codes(rows, bits)
    np.testing.assert_array_equal(e.numpy(), ref_e)
    xq = tvm.runtime.tensor(np.zeros(rows.shape, np.int8), dev)
    _build_llvm(ops.quantize_per_token_func(rows.shape, bits, "t"))["main"](tvm.runtime.tensor(rows, dev), e, xq)
    np.testing.assert_array_equal(xq.numpy(), ref_q.astype(np.int8))
    y0 = np.random.default_rng(1).standard_normal((rows.shape[0], 5)).astype(np.float32)
    bias = np.random.default_rng(2).standard_normal(5).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros(y0.shape, np.float32), dev)
    _build_llvm(ops.token_epilogue_func(y0.shape, "t"))["main"](
        tvm.runtime.tensor(y0, dev), e, tvm.runtime.tensor(bias, dev), y)
    np.testing.assert_array_equal(y.numpy(), y0 * np.ldexp(np.float32(1), ref_e).astype(np.float32)[:, None] + bias)


def _lopsided(*shape, seed=0) -> torch.Tensor:
    """Signed, lopsided inputs: mostly positive with a short negative tail."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).abs() * 2 - 0.3


def test_per_token_layer_matches_numpy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_granularity="per_token"), [_lopsided(16, 24)])
    layer = q[0]
    assert isinstance(layer, RMSMPLinear) and layer.act_per_token and layer.act.per_token
    assert not layer.bias_int.any() and torch.equal(layer.out_scale, layer.row_scale)
    x = _lopsided(3, 5, 24, seed=1)
    x[0, 0] = 0  # a zero token
    x[1, 2] *= 1e-38  # a tiny token
    x[2, 1, 3] = 1e4  # one huge value
    ref = np_per_token_linear(x.numpy(), layer.weight_int.numpy(), layer.row_scale.numpy(), layer.bias.numpy(), 8)
    np.testing.assert_array_equal(q(x).detach().numpy(), ref)
    assert "per-token" in repr(layer) and layer.plan.num_rows == 40 and layer.weight.shape == (40, 24)


def test_zero_point_layer_and_folded_bias_match_numpy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_zero_point="always"), [_lopsided(64, 24)])
    layer = q[0]
    zp = layer.act_zero_point
    assert zp is not None and 0 < zp < 255 and not layer.act_signed and (layer.qmin, layer.qmax) == (0, 255)
    x = _lopsided(3, 5, 24, seed=1)
    x[0, 0, 0] = -50.0  # clamps at 0
    ref, bias_int = np_zero_point_linear(x.numpy(), layer.weight_int.numpy(), layer.bias.numpy(), layer.act_scale,
                                         layer.inv_act_scale, layer.row_scale.numpy(), zp, 8)
    np.testing.assert_array_equal(layer.bias_int.numpy(), bias_int)
    np.testing.assert_array_equal(q(x).detach().numpy(), ref)
    assert f"zp={zp}" in repr(layer)


def test_zero_point_calibration_auto_and_always():
    rng = np.random.default_rng(3)
    lopsided = np.concatenate([np.abs(rng.standard_normal(4000)) * 3, -0.2 * rng.random(400)])
    gaussian = rng.standard_normal(4000)
    assert ActQuant.calibrate(lopsided, 8, zero_point="auto").zero_point is not None
    assert ActQuant.calibrate(gaussian, 8, zero_point="auto").zero_point is None
    assert ActQuant.calibrate(gaussian, 8, zero_point="always").zero_point is not None
    assert ActQuant.calibrate(lopsided, 8, zero_point="never").zero_point is None
    assert ActQuant.calibrate(np.abs(lopsided), 8, zero_point="always").zero_point is None  # unsigned: none needed
    # the rule: asymmetric error below ZERO_POINT_GAIN x the symmetric one
    _, sym_err = ActQuant._symmetric_search(lopsided, 8, True, 40)
    _, _, asym_err = ActQuant._asymmetric_search(lopsided, 8, 40)
    assert asym_err < ZERO_POINT_GAIN * sym_err
    # the zero point's quantizer: zp = round(-min / scale) style, the range's codes in [0, 255]
    act = ActQuant.calibrate(lopsided, 8, zero_point="always")
    codes = np_zero_point_codes(lopsided.astype(np.float32), act.inv_scale, act.zero_point, 8)
    assert codes.min() == 0 and codes.max() > 200


def test_folded_bias_overflow_names_the_layer():
    k = 34000  # 34000 x 127 x 255 fits int32; with the zero point folded into the bias it does not
    plan = RowPlan("big.fc", "dense", ("fixed_8",), np.full((1, k), 127, np.int8), np.ones(1, np.float32))
    RMSMPLinear("big.fc", plan, None, ActQuant(0.1, 8, True))
    with pytest.raises(ValueError, match=r"layer 'big.fc': the int32 accumulator can overflow.*zero point 255"):
        RMSMPLinear("big.fc", plan, None, ActQuant(0.1, 8, False, zero_point=255))


def test_conv_layers_stay_per_tensor_symmetric():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 6)).eval()
    calib = [torch.randn(8, 2, 6, 6) - 0.5]
    for cfg in (rmsmp.RMSMPConfig(act_granularity="per_token"), rmsmp.RMSMPConfig(act_zero_point="always")):
        q = rmsmp.quantize(model, cfg, calib)
        conv, fc = q[0], q[2]
        assert isinstance(conv, RMSMPConv2d) and not conv.act_per_token and conv.act_zero_point is None
        assert fc.act_per_token or fc.act_zero_point is not None
    plan = RowPlan("c", "conv2d", ("fixed_8",) * 2, np.ones((2, 1, 1, 1), np.int8), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="layer 'c' \\(conv2d\\): zero points and per-token"):
        RMSMPConv2d("c", plan, None, ActQuant.dynamic_per_token(8), (1, 1), (0, 0), (1, 1))


def test_layer_from_plan_bias_and_act_for_qat_convert():
    """The API QAT's convert uses: RMSMPLinear(name, plan, bias, ActQuant), and
    fake_quant_per_token whose values equal the layer's dequantized codes."""
    rng = np.random.default_rng(0)
    w_int = rng.integers(-7, 8, (6, 12)).astype(np.int8)
    plan = RowPlan("fc", "dense", ("fixed_4",) * 6, w_int, np.full(6, 0.05, np.float32))
    bias = rng.standard_normal(6).astype(np.float32)
    layer = RMSMPLinear("fc", plan, bias, ActQuant.dynamic_per_token(8))
    x = torch.from_numpy(rng.standard_normal((4, 12)).astype(np.float32)).requires_grad_()
    fq = fake_quant_per_token(x, 8)
    fq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through inside the range
    q_codes, e = np_per_token_codes(x.detach().numpy(), 8)
    np.testing.assert_array_equal(fq.detach().numpy(), q_codes.astype(np.float32) * np.ldexp(np.float32(1), e)[:, None])
    ref = np_per_token_linear(x.detach().numpy(), w_int, plan.row_scale, bias, 8)
    np.testing.assert_array_equal(layer(x.detach()).numpy(), ref)
    y = torch.tensor([[1e3, 0.5]], requires_grad=True)  # the clipped element gets no gradient
    fake_quant_per_token(y, 2).sum().backward()
    assert y.grad.tolist() == [[0.0, 1.0]]


# ----- (c) configuration ----------------------------------------------------------------------
def test_config_validation():
    cfg = rmsmp.RMSMPConfig()
    assert (cfg.act_granularity, cfg.act_zero_point) == ("per_tensor", "never")
    for bad in ("per_channel", "", None, 1):
        with pytest.raises(ValueError, match="act_granularity must be one of \\('per_tensor', 'per_token'\\)"):
            rmsmp.RMSMPConfig(act_granularity=bad)
    for bad in (True, "sometimes", None):
        with pytest.raises(ValueError, match="act_zero_point must be one of \\('never', 'auto', 'always'\\)"):
            rmsmp.RMSMPConfig(act_zero_point=bad)


def test_defaults_keep_the_integers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)).eval()
    calib = [_lopsided(32, 16)]
    a = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    b = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_granularity="per_tensor", act_zero_point="never"), calib)
    for la, lb in zip(rmsmp_layers(a).values(), rmsmp_layers(b).values()):
        assert la.inv_act_scale == lb.inv_act_scale and la.act_zero_point is None and not la.act_per_token
        for name in ("weight_int", "bias_int", "out_scale"):
            assert torch.equal(getattr(la, name), getattr(lb, name))


# ----- (b) compiled, bit for bit --------------------------------------------------------------
class _Block(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, with a shift that makes the first input lopsided."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.ln(x) + 0.7)))


CONFIGS = {"per_token": dict(act_granularity="per_token"), "zero_point": dict(act_zero_point="always")}


def _block(kind: str):
    torch.manual_seed(0)
    model = _Block().eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(**CONFIGS[kind]), [torch.randn(4, 6, 32) for _ in range(4)])
    layers = rmsmp_layers(q)
    if kind == "per_token":
        assert all(m.act_per_token for m in layers.values())
    else:
        assert all(m.act_zero_point is not None for m in layers.values())
    return q


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_block_on_llvm_equals_torch(kind):
    q = _block(kind)
    for shape in ((1, 5, 32), (4, 8, 32)):  # batch-1 GEMV and the batch layer kernels on x86
        x = torch.randn(*shape)
        exe = rmsmp.compile(q, (x,), fast_math=False)  # libm's erf, as torch
        np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
        assert exe.stats["kept"] == 1  # only the output keeps a gather: the orders fold through
    funcs = {str(f.attrs[contract.OP]) for f in exe.ir.functions.values()
             if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and contract.OP in f.attrs}
    want = {contract.TOKEN_EXPONENT, contract.QUANTIZE_PER_TOKEN, contract.TOKEN_EPILOGUE} if kind == "per_token" \
        else {contract.QUANTIZE}
    assert want <= funcs


@needs_pocl
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_block_on_opencl_equals_torch(kind):
    q = _block(kind)
    x = torch.randn(2, 6, 32)
    exe = rmsmp.compile(q, (x,), target=MALI)
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_block_on_the_fpga_simulator_equals_torch(kind):
    from tvm_rmsmp.fpga.runtime import FPGAFallbackWarning

    q = _block(kind)
    x = torch.randn(2, 6, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FPGAFallbackWarning)
        exe = rmsmp.compile(q, (x,), target="fpga:xc7z020")
    assert [p.layer for p in exe.layers] == ["fc1", "fc2"]  # the integer GEMMs on the accelerator
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


def test_per_token_functions_compile_for_cuda():
    """CUDA source of the per-token functions (scheduled by the GPU build's dlight rules) builds
    without a GPU: the exponent from the float's bits, the power of two from its bits."""
    from tvm.relax.backend.gpu_generic import legalize_passes

    from tvm_rmsmp.compiler.pipeline import lower

    q = _block("per_token")
    target = rmsmp.resolve_target(CUDA)
    mod, _ = lower(q, (torch.randn(2, 6, 32),), target)
    with target:
        mod = tvm.transform.Sequential(legalize_passes(target))(mod)
    sources = {}
    for gv, func in mod.functions.items():
        op = contract.rmsmp_attr(func, contract.OP) if isinstance(func, tvm.tirx.PrimFunc) else None
        if op in (contract.TOKEN_EXPONENT, contract.QUANTIZE_PER_TOKEN):
            built = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
            sources[op] = built.mod.imports[0].inspect_source()
    assert set(sources) == {contract.TOKEN_EXPONENT, contract.QUANTIZE_PER_TOKEN}
    assert "__global__" in sources[contract.TOKEN_EXPONENT] and ">> 23" in sources[contract.TOKEN_EXPONENT]
    assert "<< 23" in sources[contract.QUANTIZE_PER_TOKEN]


# ----- (d) the contract ------------------------------------------------------------------------
def _lowered(kind: str):
    from tvm_rmsmp.compiler.pipeline import lower

    return lower(_block(kind), (torch.randn(2, 6, 32),), "llvm", schedule=False)[0]


def _with_attr(mod, op, key, value):
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and contract.rmsmp_attr(func, contract.OP) == op:
            mod[gv] = func.with_attr(key, value)
            return mod
    raise AssertionError(f"no {op} function")


def test_contract_accepts_the_activation_forms_and_refuses_broken_ones():
    for kind in sorted(CONFIGS):
        contract.verify(_lowered(kind))
    with pytest.raises(ContractError, match="rule 'act_bits'"):
        contract.verify(_with_attr(_lowered("per_token"), contract.TOKEN_EXPONENT, contract.ACT_BITS, 12))
    with pytest.raises(ContractError, match="rule 'zero_point'"):
        contract.verify(_with_attr(_lowered("zero_point"), contract.QUANTIZE, contract.ZERO_POINT, 300))
    mod = _lowered("per_token")
    gv = next(g for g, f in mod.functions.items() if contract.rmsmp_attr(f, contract.OP) == contract.TOKEN_EPILOGUE)
    mod[gv] = mod[gv].with_attr(contract.OP, "token_epilog")
    with pytest.raises(ContractError, match="rule 'op'"):
        contract.verify(mod)


def _dense_call_module(bias_value: int) -> tvm.IRModule:
    from tvm import relax

    k, n = 1024, 4
    func = row_group_func("dense", "fc", "fixed_8", (2, k), "uint8", (n, k), None)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, k], "uint8"))
    with bb.function("main", [x]):
        gv = bb.add_func(func, "rg")
        args = [x, relax.const(np.ones((n, k), np.int8)), relax.const(np.full(n, bias_value, np.int32)),
                relax.const(np.ones(n, np.float32))]
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType([2, n], "float32")))
        bb.emit_func_output(y)
    return bb.get()


def test_contract_acc_bound_counts_the_folded_bias():
    contract.verify(_dense_call_module(-255 * 127 * 1024))  # a folded zero point that fits
    with pytest.raises(ContractError, match=r"\(layer fc\) .*rule 'acc_bound'.*plus a bias up to"):
        contract.verify(_dense_call_module(-(2**31 - 1000)))
