"""Residual adds, global average pooling and max-pooling in the integer-only mode (RMSMPConfig(
requant="fixed_point")): the arithmetic against Python fractions and integers, the torch ops, a
small ResNet-18 (identity and downsample shortcuts) whose adds and poolings become
rmsmp::qadd_requant / rmsmp::qavgpool_requant / rmsmp::qmaxpool2d, and its CPU, OpenCL and FPGA
builds bit for bit."""

import json
import math
import os
import warnings
from fractions import Fraction

import attrs
import numpy as np
import pytest
import torch

import tvm_rmsmp as rmsmp
import tvm_rmsmp.nn.ops  # noqa: F401  (registers rmsmp::qadd_requant)
from tvm_rmsmp.fpga.config import BOARD_DIR
from tvm_rmsmp.quant.requant import add_multipliers, requantize_add


def _ref_add(qa: int, qb: int, ma: int, mb: int, s: int, qmin: int, qmax: int) -> int:
    """floor((qa ma + qb mb) / 2^s + 1/2), clamped: with Fractions, no shifts."""
    return min(max(math.floor(Fraction(qa * ma + qb * mb, 2**s) + Fraction(1, 2)), qmin), qmax)


def test_add_multipliers_match_fractions_and_approximate_the_real_sum():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sa, sb, so = (float(v) for v in 10.0 ** rng.uniform(-4, 0, size=3))
        ma, mb, s = add_multipliers(sa, sb, so)
        ra, rb = Fraction(sa) / Fraction(so), Fraction(sb) / Fraction(so)
        assert 2**14 <= max(ma, mb) < 2**15 and 1 <= s <= 63
        assert ma == math.floor(ra * 2**s + Fraction(1, 2)) and mb == math.floor(rb * 2**s + Fraction(1, 2))
        qa, qb = (int(v) for v in rng.integers(-127, 256, size=2))
        exact = qa * ra + qb * rb  # the real-valued sum in output steps
        got = _ref_add(qa, qb, ma, mb, s, -10**9, 10**9)
        # rounding to nearest plus the multipliers' error: at most (|qa| + |qb|) / 2 steps of 2^-s
        assert abs(got - exact) <= Fraction(1, 2) + Fraction(abs(qa) + abs(qb), 2 ** (s + 1))
    # a multiplier that rounds up to 2^15 moves to the next shift
    assert add_multipliers(1.0, 0.5, 1.0 / (2 - 2**-20)) == (2**14, 2**13, 13)
    with pytest.raises(ValueError, match="positive and finite"):
        add_multipliers(0.1, 0.0, 0.1)
    with pytest.raises(ValueError, match="shift"):
        add_multipliers(1e-30, 1e-30, 1.0)


def test_requantize_add_matches_python_integers_ties_and_saturation():
    rng = np.random.default_rng(1)
    qa = rng.integers(-127, 128, size=300)
    qb = rng.integers(0, 256, size=300)
    qa[:4], qb[:4] = (1, -1, -3, 127), (0, 0, 0, 255)
    for ma, mb, s, qmin, qmax in ((2**14, 2**14, 15, -127, 127), (20011, 9000, 16, 0, 255), (30000, 0, 20, -127, 127)):
        got = requantize_add(qa, qb, ma, mb, s, qmin, qmax)
        want = [_ref_add(int(a), int(b), ma, mb, s, qmin, qmax) for a, b in zip(qa, qb)]
        np.testing.assert_array_equal(got, want)
    # ties toward +infinity: 0.5 -> 1, -0.5 -> 0, -1.5 -> -1
    np.testing.assert_array_equal(requantize_add(np.array([1, -1, -3]), np.zeros(3, int), 2**14, 2**14, 15, -127, 127),
                                  [1, 0, -1])
    with pytest.raises(TypeError, match="integer codes"):
        requantize_add(np.array([1.5]), np.array([1]), 2**14, 2**14, 15, -127, 127)
    with pytest.raises(ValueError, match="8-bit codes"):
        requantize_add(np.array([300]), np.array([1]), 2**14, 2**14, 15, -127, 127)


def test_qadd_requant_op_on_float_views():
    rng = np.random.default_rng(2)
    sa, sb, so = (float(np.float32(v)) for v in (0.031, 0.0123, 0.04))
    ma, mb, s = add_multipliers(sa, sb, so)
    qa = rng.integers(-127, 128, size=(2, 3, 5, 5))
    qb = rng.integers(0, 256, size=(2, 3, 5, 5))
    a = torch.from_numpy(qa.astype(np.float32) * np.float32(sa))
    b = torch.from_numpy(qb.astype(np.float32) * np.float32(sb))
    y = torch.ops.rmsmp.qadd_requant(a, b, sa, sb, ma, mb, s, so, 0, 255, "blk.add")
    want = np.vectorize(lambda x, z: _ref_add(int(x), int(z), ma, mb, s, 0, 255))(qa, qb)
    np.testing.assert_array_equal(y.numpy(), want.astype(np.float32) * np.float32(so))
    with pytest.raises(ValueError, match="'blk.add'.*shapes differ"):
        torch.ops.rmsmp.qadd_requant(a, b[:1], sa, sb, ma, mb, s, so, 0, 255, "blk.add")


def test_qavgpool_requant_op_sums_codes_and_rounds_once():
    from tvm_rmsmp.quant.requant import quantize_multiplier

    rng = np.random.default_rng(3)
    s_in, s_out = float(np.float32(0.02)), float(np.float32(0.013))
    qx = rng.integers(0, 256, size=(2, 4, 3, 5))
    m, s = quantize_multiplier(s_in / (15 * s_out))
    x = torch.from_numpy(qx.astype(np.float32) * np.float32(s_in))
    y = torch.ops.rmsmp.qavgpool_requant(x, s_in, m, s, s_out, 0, 255, "pool")
    sums = qx.sum(axis=(2, 3))
    want = np.vectorize(lambda v: min(max(math.floor(Fraction(int(v) * m, 2**s) + Fraction(1, 2)), 0), 255))(sums)
    np.testing.assert_array_equal(y.numpy(), (want.astype(np.float32) * np.float32(s_out))[:, :, None, None])
    # the codes' real mean, in output steps, within half a step plus the multiplier's error
    mean = qx.mean(axis=(2, 3)) * s_in / s_out
    assert np.all(np.abs(want - np.minimum(mean, 255)) <= 0.5 + 2**-14 * mean + 1e-9)


@pytest.fixture(scope="module")
def resnet():
    """A narrow ResNet-18 on 64x64 inputs: identity and downsample (1x1 conv) shortcuts, ReLU after
    every add, global average pooling and the classifier."""
    from tvm_rmsmp.models.resnet import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=8, seed=0)
    calib = torch.randn(4, 3, 64, 64)
    cfg = rmsmp.RMSMPConfig(requant="fixed_point", assign="variance", rounding="nearest")
    return model, rmsmp.quantize(model, cfg, calib_data=[calib]), calib


def test_quantize_turns_residual_adds_into_integer_adds(resnet):
    from tvm_rmsmp.nn.layers import rmsmp_layers
    from tvm_rmsmp.nn.residual import rmsmp_adds

    model, q, calib = resnet
    adds, layers = rmsmp_adds(q), rmsmp_layers(q)
    assert list(adds) == [f"layer{i}.{j}.add" for i in range(1, 5) for j in range(2)]
    assert all(a.requant is not None for a in adds.values())
    assert set(layers) == {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    # the ReLU after each add folds into its clamp; an add feeding the next block's conv1 writes at
    # that conv's input scale; the last one (into the average pooling) is calibrated
    for add in adds.values():
        assert (add.requant["qmin"], add.requant["qmax"]) == (0, 255)
    assert adds["layer1.0.add"].requant["out_scale"] == float(np.float32(layers["layer1.1.conv1"].act.scale))
    assert adds["layer3.1.add"].requant["out_scale"] == float(np.float32(layers["layer4.0.conv1"].act.scale))
    # the add's inputs are the codes of the layers (or add) before it, at their output scales
    assert adds["layer2.0.add"].requant["scale_a"] == layers["layer2.0.conv2"].out_act_scale
    assert adds["layer2.0.add"].requant["scale_b"] == layers["layer2.0.downsample.0"].out_act_scale
    assert adds["layer1.1.add"].requant["scale_b"] == adds["layer1.0.add"].requant["out_scale"]
    # each add computes the integer formula on its inputs' codes
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, (inp, out)))
             for n, m in adds.items()]
    y = q(calib)
    for h in hooks:
        h.remove()
    for name, ((a, b), out) in seen.items():
        r = adds[name].requant
        qa, qb = (np.round(t.numpy().astype(np.float64) / s).astype(np.int64)
                  for t, s in ((a, r["scale_a"]), (b, r["scale_b"])))
        want = np.vectorize(lambda x, z, r=r: _ref_add(int(x), int(z), r["mult_a"], r["mult_b"], r["shift"], 0, 255))(
            qa, qb)
        np.testing.assert_array_equal(out.numpy(), want.astype(np.float32) * np.float32(r["out_scale"]), err_msg=name)
    # the global average pooling: integer sums of the last add's codes, at fc's input scale
    from tvm_rmsmp.nn.residual import rmsmp_pools

    pool = rmsmp_pools(q)["avgpool"]
    assert pool.sources == (("add", "layer4.1.add"),) and pool.hw == 4
    assert pool.requant["scale_in"] == adds["layer4.1.add"].requant["out_scale"]
    assert pool.requant["out_scale"] == float(np.float32(layers["fc"].act.scale))
    # the max-pooling after the stem: one op (exactly F.max_pool2d) that knows its codes' scale
    from tvm_rmsmp.nn.residual import rmsmp_maxpools

    mp = rmsmp_maxpools(q)["maxpool"]
    assert (mp.kernel, mp.stride, mp.padding) == ([3, 3], [2, 2], [1, 1])
    assert mp.scale_in == layers["conv1"].out_act_scale
    # and the model still classifies like the float one
    with torch.no_grad():
        f = model(calib)
    assert torch.equal(y.argmax(1), f.argmax(1)) or float((y - f).abs().max()) < 0.1 * float(f.abs().max())


def test_import_emits_add_ops_under_the_contract(resnet):
    import tvm

    from relay_passes import contract
    from tvm_rmsmp.compiler.frontend import import_model

    _, q, calib = resnet
    mod = import_model(q, (calib[:1],))
    adds = {str(f.attrs[contract.LAYER]): f for _, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and contract.rmsmp_attr(f, contract.OP) == contract.ADD_REQUANT}
    assert sorted(adds) == sorted(f"layer{i}.{j}.add" for i in range(1, 5) for j in range(2))
    func = adds["layer2.0.add"]
    assert [str(p.dtype) for p in func.params] == ["float32"] * 3
    assert [int(d) for d in func.params[0].shape] == [1, 16, 8, 8]
    contract.verify(mod)
    bad = func.with_attr(contract.ADD, {**contract.add_params(func), "shift": 0})
    with pytest.raises(contract.ContractError, match="rule 'add'"):
        contract.verify_add_func("rmsmp_add_bad", bad)
    pools = [f for _, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and contract.rmsmp_attr(f, contract.OP) == contract.AVGPOOL_REQUANT]
    assert len(pools) == 1 and str(pools[0].attrs[contract.LAYER]) == "avgpool"
    assert [[int(d) for d in p.shape] for p in pools[0].params] == [[1, 64, 2, 2], [1, 64, 1, 1]]
    bad = pools[0].with_attr(contract.POOL, {**contract.pool_params(pools[0]), "mult": 3})
    with pytest.raises(contract.ContractError, match="rule 'pool'"):
        contract.verify_pool_func("rmsmp_avgpool_bad", bad)
    (mp,) = [f for _, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and contract.rmsmp_attr(f, contract.OP) == contract.MAXPOOL_CODES]
    assert [[int(d) for d in p.shape] for p in mp.params] == [[1, 8, 32, 32], [1, 8, 16, 16]]
    assert float(mp.attrs[contract.MAXPOOL]["scale_in"]) > 0
    bad = mp.with_attr(contract.MAXPOOL, {"kernel": [3, 3], "stride": [2, 2], "padding": [3, 1]})
    with pytest.raises(contract.ContractError, match="rule 'maxpool'"):
        contract.verify_maxpool_func("rmsmp_maxpool_bad", bad)


def test_cpu_build_is_bit_exact(resnet):
    _, q, _ = resnet
    torch.manual_seed(5)
    exe = rmsmp.compile(q, (torch.randn(1, 3, 64, 64),), target="llvm")
    for x in (torch.randn(1, 3, 64, 64), 8 * torch.randn(1, 3, 64, 64)):  # the second saturates codes
        np.testing.assert_array_equal(np.asarray(exe(x)), q(x).detach().numpy())


class _Block(torch.nn.Module):
    """One downsampling residual block with a max-pooling inside and a global average pooling
    (the add and the pooling: calibrated output scales)."""

    def __init__(self):
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 8, 1, 2)
        self.c1 = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x):
        y = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 3, 1, 1)
        y = torch.relu(self.c2(y) + self.c0(x))
        return torch.nn.functional.adaptive_avg_pool2d(y, 1)


def test_opencl_build_is_bit_exact():
    """OpenCL (PoCL): the add and both pooling ops through the GPU pipeline, bit for bit (a small
    block: the layers' fixed-point epilogue on OpenCL is tests/test_requant.py's)."""
    from conftest import opencl_status

    usable, why = opencl_status()
    if not usable:
        pytest.skip(why)
    from tvm_rmsmp.nn.layers import rmsmp_layers
    from tvm_rmsmp.nn.residual import rmsmp_adds, rmsmp_maxpools, rmsmp_pools

    torch.manual_seed(6)
    x = torch.randn(2, 3, 8, 8)
    cfg = rmsmp.RMSMPConfig(requant="fixed_point", assign="variance", rounding="nearest")
    q = rmsmp.quantize(_Block().eval(), cfg, calib_data=[x])
    assert list(rmsmp_adds(q)) == ["add"] and rmsmp_adds(q)["add"].requant is not None  # in the model's own forward
    assert list(rmsmp_pools(q)) == ["avgpool"] and rmsmp_pools(q)["avgpool"].requant is not None
    assert rmsmp_maxpools(q)["maxpool"].scale_in == rmsmp_layers(q)["c1"].out_act_scale
    exe = rmsmp.compile(q, (x,), target="mali")
    for xs in (x, 8 * torch.randn(2, 3, 8, 8)):
        np.testing.assert_array_equal(exe(xs), q(xs).detach().numpy())


def _check_pools(exe):
    from tvm_rmsmp.fpga.eltwise import MaxPoolProgram, PoolProgram
    from tvm_rmsmp.fpga.isa import Alu, GemmDSP

    (mp,) = [p for p in exe.programs if isinstance(p, MaxPoolProgram)]
    assert mp.layer == "maxpool" and [i.alu_op for i in mp.stream if isinstance(i, Alu)][0] == "max_window"
    (pool,) = [p for p in exe.programs if isinstance(p, PoolProgram)]
    gemms = [i for i in pool.stream if isinstance(i, GemmDSP)]
    assert pool.layer == "avgpool" and gemms and all(g.rows == 1 and g.reduction == pool.k for g in gemms)
    assert sum(g.pixels for g in gemms) == pool.rows
    steps = {e["layer"]: e for e in exe.profile()["layers"]}
    assert steps["avgpool"]["schemes"] == ["avgpool"] and steps["avgpool"]["cycles"] > 0
    assert steps["maxpool"]["schemes"] == ["maxpool"] and steps["maxpool"]["cycles"] > 0


def test_fpga_fuses_the_adds_into_the_convolutions_bit_exact(resnet):
    """With residual buffers (the boards'), each residual add runs in the epilogue of the
    convolution computing one of its operands: the other operand's codes load into the residual
    buffer, one madd_shift pass per tile, stores clamped to the add's codes; bit for bit."""
    from tvm_rmsmp.fpga.eltwise import EltwiseProgram
    from tvm_rmsmp.fpga.isa import Alu, Load, Store
    from tvm_rmsmp.fpga.runtime import LayerProgram
    from tvm_rmsmp.nn.residual import rmsmp_adds

    _, q, _ = resnet
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to the host
        exe = rmsmp.compile(q, (torch.randn(1, 3, 64, 64),), target="fpga:xc7z020")
    for x in (torch.randn(1, 3, 64, 64), 8 * torch.randn(1, 3, 64, 64)):
        np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
    adds = rmsmp_adds(q)
    assert not [p for p in exe.programs if isinstance(p, EltwiseProgram)]
    fused = {p.fused_add.name: p for p in exe.programs if isinstance(p, LayerProgram) and p.fused_add is not None}
    assert sorted(fused) == sorted(adds)
    # every block's 3x3 conv2 takes its add, also where the 1x1 downsample shortcut computes the other operand
    assert {name: p.layer for name, p in fused.items()} == {name: name.replace("add", "conv2") for name in adds}
    for name, prog in fused.items():
        r = adds[name].requant
        n_out = int(np.prod(prog.fused_add.shape))
        res = [i for i in prog.stream if isinstance(i, Load) and i.buffer.startswith("res_")]
        madds = [i for i in prog.stream if isinstance(i, Alu) and i.alu_op == "madd_shift"]
        stores = [i for i in prog.stream if isinstance(i, Store)]
        assert sum(i.nbytes for i in res) == n_out and sum(i.nbytes for i in stores) == n_out
        assert len(madds) == len(stores) == len(res) and all(i.src_buffer == "res" for i in madds)
        assert all(i.imm[2] == r["shift"] and sorted(i.imm[:2]) == sorted((r["mult_a"], r["mult_b"])) for i in madds)
        assert all(i.clamp == (r["qmin"], r["qmax"]) for i in stores)
        clamps = [i for i in prog.stream if isinstance(i, Alu) and i.alu_op == "clamp"]
        assert len(clamps) == len(madds) and all(i.imm in ((0, 255), (-128, 127), (-127, 127)) for i in clamps)
    _check_pools(exe)
    prof = exe.profile()
    steps = {e["layer"]: e for e in prof["layers"]}
    assert not set(adds) & set(steps) and all(steps[p.layer]["schemes"][-1] == "add" for p in fused.values())
    assert prof["cycles"] == sum(e["cycles"] for e in prof["layers"])
    # the same programs without residual buffers: the adds are steps of their own again, and slower
    unfused = exe.profile(attrs.evolve(exe.config.accelerator, res_buffer_kib=0))
    assert set(adds) <= {e["layer"] for e in unfused["layers"]} and unfused["cycles"] > prof["cycles"]
    # chained with the layers (weight prefetch): the simulator checks every buffer access
    chained = exe.profile(prefetch=True)
    assert [e["layer"] for e in chained["layers"]] == [p.layer for p in exe.programs]


def test_fpga_runs_the_adds_on_the_alu_without_residual_buffers(resnet, tmp_path):
    """An accelerator without residual buffers runs each add as a program of its own (two code
    loads, one madd_shift pass, a clamped store per tile), bit for bit."""
    from tvm_rmsmp.fpga.eltwise import EltwiseProgram
    from tvm_rmsmp.fpga.isa import Alu, Load, Store
    from tvm_rmsmp.nn.residual import rmsmp_adds

    _, q, _ = resnet
    board = json.loads(open(os.path.join(BOARD_DIR, "xc7z020.json")).read())
    board["accelerator"]["res_buffer_kib"] = 0
    path = tmp_path / "no_res.json"
    path.write_text(json.dumps(board))
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exe = rmsmp.compile(q, (torch.randn(1, 3, 64, 64),), target=f"fpga:{path}")
    for x in (torch.randn(1, 3, 64, 64), 8 * torch.randn(1, 3, 64, 64)):
        np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
    adds = rmsmp_adds(q)
    progs = [p for p in exe.programs if isinstance(p, EltwiseProgram)]
    assert [p.layer for p in progs] == list(adds)
    for p in progs:
        r = adds[p.layer].requant
        alus = [i for i in p.stream if isinstance(i, Alu)]
        assert alus and all(i.alu_op == "madd_shift" and i.imm == (r["mult_a"], r["mult_b"], r["shift"]) for i in alus)
        loads = [i for i in p.stream if isinstance(i, Load)]
        stores = [i for i in p.stream if isinstance(i, Store)]
        assert sum(i.nbytes for i in loads) == 2 * p.elements and sum(i.nbytes for i in stores) == p.elements
        assert all(i.clamp == (0, 255) for i in stores)
    _check_pools(exe)
    prof = exe.profile()
    steps = {e["layer"]: e for e in prof["layers"]}
    for name in adds:
        assert steps[name]["cycles"] > 0 and steps[name]["schemes"] == ["add"] and steps[name]["macs"]["dsp"] == 0
    chained = exe.profile(prefetch=True)
    assert [e["layer"] for e in chained["layers"]] == [p.layer for p in exe.programs]


class _Reuse(torch.nn.Module):
    """``c1``'s output feeds ``c2`` and the add: only ``c2`` may take the add into its epilogue."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, 1, 1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, 1, 1)

    def forward(self, x):
        z = torch.relu(self.c1(x))
        return torch.relu(z + self.c2(z))


@pytest.mark.parametrize("ratio", [{"fixed_4": 1.0}, None], ids=["one-row-group", "rmsmp"])
def test_fpga_fuses_only_an_operand_nothing_else_reads(ratio):
    """The fused operand is the one computed for the add alone (one row group: no concatenation;
    three: concatenated and reordered); the other conv's output, also read by ``c2``, stays in DRAM."""
    from tvm_rmsmp.fpga.runtime import LayerProgram

    torch.manual_seed(3)
    x = torch.randn(1, 3, 12, 12)
    cfg = rmsmp.RMSMPConfig(requant="fixed_point", assign="variance", rounding="nearest",
                            **({"ratio": ratio} if ratio else {}))
    q = rmsmp.quantize(_Reuse().eval(), cfg, calib_data=[torch.randn(4, 3, 12, 12)])
    exe = rmsmp.compile(q, (x,), target="fpga:xc7z045")
    assert [(p.layer, p.fused_add is not None) for p in exe.programs if isinstance(p, LayerProgram)] == [
        ("c1", False), ("c2", True)]
    for xs in (x, 6 * torch.randn(1, 3, 12, 12)):
        np.testing.assert_array_equal(exe(xs), q(xs).detach().numpy())


class _Broadcast(torch.nn.Module):
    """An add of a code map and its pooled codes (shapes differ: it stays a float add)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, 1, 1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.c2(y) + torch.nn.functional.adaptive_avg_pool2d(y, 1)


class _Branchy(_Block):
    """Data-dependent control flow: fx cannot trace it."""

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return y + self.c0(x) if float(x.sum()) > 0 else y


def test_adds_that_cannot_be_integer_stay_float():
    from tvm_rmsmp.nn.inputs import collect_batches
    from tvm_rmsmp.nn.layers import requant_model
    from tvm_rmsmp.nn.residual import rmsmp_adds, rmsmp_pools

    torch.manual_seed(8)
    x = torch.randn(2, 3, 6, 6)
    cfg = rmsmp.RMSMPConfig(requant="fixed_point", assign="variance", rounding="nearest")
    q = rmsmp.quantize(_Broadcast().eval(), cfg, calib_data=[x])
    assert rmsmp_adds(q)["add"].requant is None and rmsmp_pools(q)["avgpool"].requant is not None
    _, how = requant_model(q, collect_batches([x], q, None), 8)
    assert how["add"] == "float add" and how["avgpool"].startswith("integer average pooling")
    exe = rmsmp.compile(q, (x,), target="llvm")
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
    with pytest.warns(rmsmp.RMSMPWarning, match="could not trace"):
        qb = rmsmp.quantize(_Branchy().eval(), cfg, calib_data=[x.abs()])
    assert not rmsmp_adds(qb) and qb(x.abs()).shape == (2, 8, 3, 3)
