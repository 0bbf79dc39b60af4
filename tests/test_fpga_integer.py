"""The FPGA model in the integer-only mode (RMSMPConfig(requant="fixed_point")): the ALU
requantizes on chip (the bias in the first GEMM, mul_shift), the store saturates to 8-bit codes, and the
simulated model equals the torch reference bit for bit."""

import warnings

import numpy as np
import pytest
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.fpga.isa import Alu, Store, region_size
from tvm_rmsmp.fpga.runtime import requant_pair
from tvm_rmsmp.models.fmnist_resnet import ResNet20
from tvm_rmsmp.nn.layers import rmsmp_layers


@pytest.fixture(scope="module")
def small_resnet():
    torch.manual_seed(0)
    model = ResNet20(blocks=1).eval()  # 3 stages of one basic block: residual adds, 1x1 shortcuts, ReLUs
    calib = torch.randn(4, 1, 28, 28)
    cfg = rmsmp.RMSMPConfig(requant="fixed_point", assign="variance", rounding="nearest")
    q = rmsmp.quantize(model, cfg, calib_data=[calib])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to the host
        exe = rmsmp.compile(q, (calib[:1],), target="fpga:xc7z020")
    return q, exe


def test_simulator_equals_torch_reference_in_fixed_point_mode(small_resnet):
    q, exe = small_resnet
    torch.manual_seed(3)
    for x in (torch.randn(1, 1, 28, 28), 6 * torch.randn(1, 1, 28, 28)):  # the second saturates codes
        np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


def test_streams_requantize_on_chip_and_store_bytes(small_resnet):
    q, exe = small_resnet
    layers = rmsmp_layers(q)
    assert len(exe.layers) == len(layers)
    for prog in exe.layers:
        out_act = layers[prog.layer].out_act
        stores = [i for i in prog.stream if isinstance(i, Store)]
        muls = [i for i in prog.stream if isinstance(i, Alu) and i.alu_op == "mul_shift"]
        assert stores and len(muls) == len(stores)
        clamps = [i.imm for i in prog.stream if isinstance(i, Alu) and i.alu_op == "clamp"]
        for s in stores:  # one byte per output element, saturated to the output codes' range
            assert s.nbytes == region_size(s.region)
            if prog.fused_add is None:
                assert s.clamp == (out_act.qmin, out_act.qmax) and not clamps
            else:  # a residual add fused in: the ALU clamps the layer's codes, the store the add's
                assert clamps == [(out_act.qmin, out_act.qmax)] * len(stores)
                assert s.clamp == (prog.fused_add.params["qmin"], prog.fused_add.params["qmax"])
        # the multipliers and shifts the ALU gets are the layer's (m, s)
        m = np.concatenate([prog.constants[g.requant["mult"]] for g in prog.groups])
        s = np.concatenate([prog.constants[g.requant["shift"]] for g in prog.groups])
        layer = layers[prog.layer]
        pairs = sorted(zip(layer.requant_mult.tolist(), layer.requant_shift.tolist()))
        assert sorted(zip(m.tolist(), s.tolist())) == pairs


def test_requant_pair_recovers_multiplier_and_shift():
    m = np.array([2**14, 2**15 - 1, 20000])
    s = np.array([1, 40, 63])
    scale = (m.astype(np.float64) * 2.0 ** -s).astype(np.float32)
    got_m, got_s = requant_pair(scale)
    np.testing.assert_array_equal(got_m, m)
    np.testing.assert_array_equal(got_s, s)
    with pytest.raises(ValueError, match="multiplier"):
        requant_pair(np.array([0.1], np.float32))


def test_weight_prefetch_across_layers_is_hazard_free(small_resnet):
    """The layers chained into one program (weight prefetch across layers): the simulator checks
    every buffer access (no hazard, no deadlock), the same MACs run, and each layer's first input
    load waits for the previous layer's stores."""
    from tvm_rmsmp.fpga.codegen import chain_streams
    from tvm_rmsmp.fpga.isa import Load

    _, exe = small_resnet
    chained = exe.profile(prefetch=True)
    per_layer = exe.profile()
    assert chained["macs"] == per_layer["macs"]
    # the steps: every layer and, between them, the residual adds (which run on the ALUs)
    assert [entry["layer"] for entry in chained["layers"]] == [p.layer for p in exe.programs]
    program = chain_streams([p.stream for p in exe.layers])
    assert len(program) == sum(len(p.stream) for p in exe.layers)
    firsts = [ins for ins in program if isinstance(ins, Load) and ins.buffer == "inp"
              and not any(w.startswith("dsp->load:inp") or w.startswith("lut->load:inp") for w in ins.wait)]
    barriers = [ins for ins in firsts if any(w.startswith("layer@") for w in ins.wait)]
    assert len(barriers) == len(exe.layers) - 1
