"""The accelerator's RTL (tvm_rmsmp/fpga/rtl/) simulated with Verilator, bit for bit against the
ISA simulator's tiles (and an independent numpy reference), for every scheme and DSP variant."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from conftest import np_conv_acc, np_dense_acc

from relay_passes.contract import group_weight, packed_weight
from tvm_rmsmp.fpga import load_board
from tvm_rmsmp.fpga.codegen import weight_levels
from tvm_rmsmp.fpga.isa import Alu, GemmDSP, GemmLUT, Load, Store
from tvm_rmsmp.fpga.rtl_sim import RTLSim, tools_missing
from tvm_rmsmp.fpga.simulator import Simulator, WeightTensor
from tvm_rmsmp.quant.schemes import get_scheme

pytestmark = pytest.mark.skipif(tools_missing() is not None, reason=f"RTL simulation: {tools_missing()}")

ACCEL = load_board("xc7z020").accelerator


@pytest.fixture(scope="module")
def rtl():
    return RTLSim()


def _weights(scheme, w_int):
    """(WeightTensor for the simulator, codes for the RTL) of ``w_int`` [F, K] as DRAM stores it."""
    packed = get_scheme(scheme).bits <= 4
    k = w_int.shape[1]
    if packed:
        stored = packed_weight(w_int, scheme)                        # [F, ceil(K/2)] bytes
        codes = np.empty((stored.shape[0], 2 * stored.shape[1]), np.uint8)
        codes[:, 0::2], codes[:, 1::2] = stored & 15, stored >> 4   # the DMA layout: low nibble first
    else:
        stored = group_weight(w_int, scheme)                         # int8
        codes = stored.view(np.uint8)
    levels = weight_levels(stored, scheme, packed)[:, :k]
    return WeightTensor(stored, levels, 2 if packed else 1), codes[:, :k]


def _sim_tile(op, x, wt, rows, k, core, bits, kernel=(1, 1), stride=(1, 1), alu=(), bias=None):
    """Run one tile through the ISA simulator: LOAD input, LOAD weights, GEMM (its accumulation
    starting from ``bias`` where given), ALU ops, STORE."""
    gemm = GemmLUT if core == "lut" else GemmDSP
    c = core
    if op == "dense":
        m = x.shape[0]
        inp_region, out_shape, pixels, out_hw = ((0, m), (0, k)), (m, rows), m, (1, 1)
        out_region = ((0, m), (0, rows))
    else:
        _, ch, h, w = x.shape
        oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
        inp_region, out_shape, pixels, out_hw = ((0, 1), (0, ch), (0, h), (0, w)), (1, rows, oh, ow), oh * ow, (oh, ow)
        out_region = ((0, 1), (0, rows), (0, oh), (0, ow))
    dram = {"x": x, "w": wt, "out": np.zeros(out_shape, np.int64), "b": bias}
    ins = gemm(op=op, inp_slot=0, wgt_slot=0, acc_slot=0, rows=rows, pixels=pixels, reduction=k, bits=bits,
               kernel=kernel, stride=stride, out_hw=out_hw, wait=(f"load->{c}:data", f"load->{c}:inp"),
               bias=None if bias is None else "b")
    stream = [Load(buffer="inp", tensor="x", region=inp_region, slot=0, nbytes=x.size, signal=(f"load->{c}:inp",)),
              Load(buffer=f"wgt_{c}", tensor="w", region=((0, rows), (0, wt.stored.shape[1])), slot=0,
                   nbytes=wt.stored.size, signal=(f"load->{c}:data",)),
              ins]
    if alu:  # the ALU (its own unit) starts when the GEMM's accumulators are done
        ins.signal = (f"{c}->alu:acc",)
    for k, (name, operand, shift) in enumerate(alu):
        dram.update({f"{name}.m": operand, f"{name}.s": shift})
        stream.append(Alu(core=c, acc_slot=0, alu_op=name, elements=rows * pixels, operand=f"{name}.m",
                          shift_operand=f"{name}.s", row_axis=1 if op == "dense" else 0,
                          wait=() if k else (f"{c}->alu:acc",)))
    stream[-1].signal = (f"{c}->store:acc",)
    stream.append(Store(core=c, slot=0, tensor="out", region=out_region, nbytes=4 * rows * pixels,
                        wait=(f"{c}->store:acc",)))
    sim = Simulator(ACCEL)
    sim.run(stream, dram)
    return dram["out"], sim, ins


# (scheme, RTL unit, op, activation dtype, rows F, dense [M, K] or conv (C, H, W, kernel, stride))
TILES = [
    ("sp2_4", "sp2", "dense", np.uint8, 7, (5, 23)),
    ("sp2_4", "sp2", "dense", np.int8, 4, (3, 11)),
    ("sp2_4", "sp2", "conv2d", np.uint8, 5, (3, 7, 8, 3, 1)),
    ("fixed_4", "l4", "dense", np.uint8, 6, (7, 19)),
    ("fixed_4", "l4", "conv2d", np.int8, 3, (2, 6, 5, 3, 1)),
    ("fixed_4", "dp", "dense", np.uint8, 6, (9, 47)),
    ("fixed_4", "dp", "dense", np.int8, 3, (4, 20)),
    ("fixed_4", "dp", "conv2d", np.uint8, 4, (4, 6, 6, 3, 2)),
    ("fixed_4", "d1", "dense", np.uint8, 5, (4, 13)),
    ("fixed_4", "d1", "conv2d", np.int8, 3, (2, 6, 5, 3, 1)),
    ("fixed_8", "dp", "dense", np.uint8, 4, (5, 41)),
    ("fixed_8", "dp", "conv2d", np.int8, 3, (3, 5, 5, 3, 1)),
    ("fixed_8", "d1", "dense", np.int8, 4, (3, 17)),
]


@pytest.mark.parametrize("scheme,unit,op,dtype,rows,shape", TILES)
def test_rtl_tile_equals_the_simulator(rtl, scheme, unit, op, dtype, rows, shape):
    rng = np.random.default_rng(zlib.crc32(f"{scheme}{unit}{op}{rows}{shape}".encode()))
    lo, hi = (0, 256) if dtype == np.uint8 else (-128, 128)
    if op == "dense":
        m, k = shape
        x = rng.integers(lo, hi, size=(m, k)).astype(dtype)
        w_int = rng.choice(get_scheme(scheme).levels, size=(rows, k))
        kernel, stride = (1, 1), (1, 1)
    else:
        ch, h, w, kk, s = shape
        x = rng.integers(lo, hi, size=(1, ch, h, w)).astype(dtype)
        w4 = rng.choice(get_scheme(scheme).levels, size=(rows, ch, kk, kk))
        w_int, k, kernel, stride = w4.reshape(rows, -1), ch * kk * kk, (kk, kk), (s, s)
    wt, codes = _weights(scheme, w_int)
    core, bits = ("lut", 4) if unit in ("sp2", "l4") else ("dsp", get_scheme(scheme).bits)
    bias = rng.integers(-(1 << 20), 1 << 20, size=rows)  # the accumulation starts from each row's bias
    sim_out, sim, ins = _sim_tile(op, x, wt, rows, k, core, bits, kernel, stride, bias=bias)
    # the activations the array sees: the tile itself, or the simulator's own im2col of it
    acts = x if op == "dense" else sim._conv_patches(x[0].astype(np.float64), ins)
    got = rtl.gemm(unit, acts, codes, act_signed=dtype == np.int8, w8=bits == 8, bias=bias)     # [rows, pixels]
    if op == "dense":
        np.testing.assert_array_equal(got.T, sim_out)
        np.testing.assert_array_equal(got.T, np_dense_acc(x, w_int) + bias)
    else:
        np.testing.assert_array_equal(got.reshape(sim_out.shape), sim_out)
        np.testing.assert_array_equal(got.reshape(sim_out.shape),
                                      np_conv_acc(x, w4, stride, (0, 0), (1, 1)) + bias[None, :, None, None])


def test_gemm_bias_only_where_the_accumulation_starts():
    with pytest.raises(ValueError, match="bias"):
        GemmDSP(op="dense", inp_slot=0, wgt_slot=0, acc_slot=0, rows=2, pixels=1, reduction=4, reset=False, bias="b")


def test_packed_dsp_at_the_extremes_of_its_fields(rtl):
    # the low field of a packed DSP chain at its limit: 16 products of 255 x -7 (and of 255 x 7),
    # two chains per reduction block, several blocks, every pixel pair packed
    k = 2 * 20 + 7
    x = np.full((8, k), 255, np.uint8)
    x[1::2, ::3] = 0                                   # neighbours in a DSP differ
    w_int = np.array([[-7] * k, [7] * k, [(-7) ** (i % 2) for i in range(k)]])
    wt, codes = _weights("fixed_4", w_int)
    sim_out, _, _ = _sim_tile("dense", x, wt, 3, k, "dsp", 4)
    np.testing.assert_array_equal(rtl.gemm("dp", x, codes, act_signed=False).T, sim_out)
    np.testing.assert_array_equal(sim_out, np_dense_acc(x, w_int))


def test_requant_alu_equals_the_simulator(rtl):
    rng = np.random.default_rng(7)
    m, k, rows = 6, 32, 5
    x = rng.integers(0, 256, size=(m, k)).astype(np.uint8)
    w_int = rng.choice(get_scheme("fixed_8").levels, size=(rows, k))
    wt, _ = _weights("fixed_8", w_int)
    bias = rng.integers(-50000, 50000, size=rows)
    mult = rng.integers(1, 1 << 15, size=rows)
    shift = rng.integers(0, 21, size=rows)
    shift[0], mult[0] = 0, 3                           # no rounding term (and a result within int32)
    zeros = np.zeros(rows, np.int64)
    acc, _, _ = _sim_tile("dense", x, wt, rows, k, "dsp", 8)
    ops = [("add_bias", bias, zeros), ("mul_shift", mult, shift), ("relu", zeros, zeros)]
    want, _, _ = _sim_tile("dense", x, wt, rows, k, "dsp", 8, alu=ops)
    got = acc.astype(np.int64)
    for name, operand, sh in ops:
        got = rtl.alu(name, got, np.broadcast_to(operand, acc.shape), np.broadcast_to(sh, acc.shape)).reshape(acc.shape)
    np.testing.assert_array_equal(got, want)
    # independent reference: gemmlowp-style rounding shift
    ref = np_dense_acc(x, w_int) + bias
    rnd = np.where(shift > 0, 1 << np.maximum(shift - 1, 0), 0)
    np.testing.assert_array_equal(got, np.maximum((ref * mult + rnd) >> shift, 0))
    # the plain rounding shift, negative values included
    vals = rng.integers(-(1 << 30), 1 << 30, size=37)
    sh = rng.integers(0, 31, size=37)
    rnd = np.where(sh > 0, 1 << np.maximum(sh - 1, 0), 0)
    np.testing.assert_array_equal(rtl.alu("shift", vals, np.ones(37), sh), (vals + rnd) >> sh)


# ----- synthesis (bench/fpga_synth.py writes the table; here: the parsing and one small run) -----
STAT = """
3.50. Printing statistics.

=== dsp_mac_array ===

   Number of wires:                246
   Number of wire bits:           3903
   Number of public wires:          82
   Number of public wire bits:    2795
   Number of memories:               0
   Number of memory bits:            0
   Number of processes:              0
   Number of cells:                539
     BUFG                            1
     CARRY4                         48
     DSP48E1                         8
     FDRE                          128
     LUT2                          106
     LUT3                          120
     LUT4                           96
     LUT5                           32
     MUXF7                           3

End of script.
"""


def test_parse_yosys_stat():
    from tvm_rmsmp.fpga.synth import parse_stat

    got = parse_stat("an earlier report\n   Number of cells: 3\n     LUT6 3\n" + STAT)   # the last report counts
    assert got == {"luts": 106 + 120 + 96 + 32, "ffs": 128, "dsps": 8, "carry4": 48, "muxf": 3, "cells": 539}
    with pytest.raises(ValueError, match="generic cells.*\\$mul"):
        parse_stat(STAT.replace("BUFG ", "$mul "))
    with pytest.raises(ValueError, match="no 'Number of cells:'"):
        parse_stat("ERROR: something")


@pytest.mark.skipif(tools_missing("yosys") is not None, reason=f"synthesis: {tools_missing('yosys')}")
def test_small_synthesis_maps_to_dsp48_and_flip_flops():
    from tvm_rmsmp.fpga.synth import synthesize

    # one product per DSP, 1 column x 2 lanes: one DSP48E1 per lane, one 32-bit accumulator
    got = synthesize("dsp_mac_array_pack1", {"PIX": 1, "RED": 2})
    assert got["dsps"] == 2 and got["ffs"] == 32 and got["luts"] > 0
    assert "synth_xilinx -family xc7 -noiopad" in got["script"]


def test_madd_shift_alu_equals_the_simulator(rtl):
    """The residual add's one ALU pass (op madd_shift: two accumulator halves of 8-bit codes,
    immediates ma, mb, S): Verilator, the ISA simulator (LOAD codes into both halves, ALU, STORE
    with clamp) and Python integers agree, ties and negative codes included."""
    rng = np.random.default_rng(11)
    n = 203
    qa = rng.integers(-127, 128, size=n)
    qb = rng.integers(0, 256, size=n)
    qa[:3], qb[:3] = (1, -1, -3), (0, 0, 0)         # with ma = mb = 2^14, S = 15: ties 0.5, -0.5, -1.5
    for ma, mb, s in ((2**14, 2**14, 15), (int(rng.integers(2**14, 2**15)), int(rng.integers(0, 2**15)), 17)):
        want_raw = [(int(a) * ma + int(b) * mb + (1 << (s - 1))) // (1 << s) for a, b in zip(qa, qb)]
        got = rtl.alu("madd_shift", qa, np.full(n, ma + (mb << 16)), np.full(n, s), acc_b=qb)
        np.testing.assert_array_equal(got, want_raw)
        cfg = load_board("xc7z020")
        dram = {"a": qa.astype(np.int16), "b": qb.astype(np.int16), "out": np.zeros(n, np.int8)}
        region = ((0, n),)
        stream = [Load(buffer="acc_dsp", tensor="a", region=region, slot=0, nbytes=n),
                  Load(buffer="acc_dsp", tensor="b", region=region, slot=1, nbytes=n, signal=("load->dsp:acc",)),
                  Alu(core="dsp", acc_slot=0, alu_op="madd_shift", elements=n, src_slot=1, imm=(ma, mb, s),
                      wait=("load->dsp:acc",), signal=("dsp->store_dsp:acc",)),
                  Store(core="dsp", slot=0, tensor="out", region=region, nbytes=n, clamp=(-127, 127),
                        wait=("dsp->store_dsp:acc",))]
        Simulator(cfg).run(stream, dram)
        np.testing.assert_array_equal(dram["out"], np.clip(want_raw, -127, 127))
    with pytest.raises(ValueError, match="madd_shift"):
        Alu(core="dsp", acc_slot=0, alu_op="madd_shift", elements=4, src_slot=0, imm=(1, 1, 1))


def test_fused_residual_epilogue_rtl_simulator_and_numpy_agree(rtl):
    """A residual add fused into a conv tile's epilogue (:func:`tvm_rmsmp.fpga.codegen.layer_stream`
    with ``residual``): the simulator (LOAD the residual codes into the residual buffer, GEMM,
    ``add_bias``, ``mul_shift``, ``clamp`` to the layer's codes, ``madd_shift`` from the residual
    buffer, STORE clamped to the add's codes), the RTL ALU (ops add_bias, mul_shift, max and min
    with the bounds, madd_shift) and numpy integers agree."""
    rng = np.random.default_rng(13)
    c, h, w, rows, kh = 4, 6, 6, 5, 3
    x = rng.integers(0, 256, size=(1, c, h, w)).astype(np.uint8)
    w_int = rng.choice(get_scheme("fixed_8").levels, size=(rows, c * kh * kh))
    wt, _ = _weights("fixed_8", w_int)
    oh = ow = h - kh + 1
    bias = rng.integers(-3000, 3000, size=rows)
    mult, shift = rng.integers(2**14, 2**15, size=rows), np.full(rows, 22)
    res = rng.integers(0, 256, size=(1, rows, oh, ow))
    ma, mb, s = int(rng.integers(2**14, 2**15)), int(rng.integers(2**13, 2**15)), 15
    # numpy: the layer's codes (rounding shift, clamped to uint8), then the add (rounded once, clamped)
    acc = np_conv_acc(x, w_int.reshape(rows, c, kh, kh), (1, 1), (0, 0), (1, 1))[0] + bias[:, None, None]
    q = np.clip((acc * mult[:, None, None] + (1 << 21)) >> 22, 0, 255)
    want = np.clip((q * ma + res[0] * mb + (1 << (s - 1))) >> s, 0, 255)
    assert 0 < (q == 255).sum() < q.size or 0 < (q == 0).sum() < q.size  # the layer's clamp matters here
    # the ISA simulator
    dram = {"x": x, "w": wt, "bias": bias, "m": mult, "sh": shift, "res": res.astype(np.int16),
            "out": np.zeros((1, rows, oh, ow), np.uint8)}
    region = ((0, 1), (0, rows), (0, oh), (0, ow))
    stream = [Load(buffer="inp", tensor="x", region=((0, 1), (0, c), (0, h), (0, w)), slot=0, nbytes=x.size,
                   signal=("load->dsp:inp",)),
              Load(buffer="res_dsp", tensor="res", region=region, slot=0, nbytes=res.size, signal=("load->dsp:res",)),
              Load(buffer="wgt_dsp", tensor="w", region=((0, rows), (0, wt.stored.shape[1])), slot=0,
                   nbytes=wt.stored.size, signal=("load->dsp:data",)),
              GemmDSP(op="conv2d", inp_slot=0, wgt_slot=0, acc_slot=0, rows=rows, pixels=oh * ow, reduction=c * kh * kh,
                      bits=8, kernel=(kh, kh), out_hw=(oh, ow), wait=("load->dsp:data", "load->dsp:inp"),
                      signal=("dsp->alu:acc",)),
              Alu(core="dsp", acc_slot=0, alu_op="add_bias", elements=q.size, operand="bias", wait=("dsp->alu:acc",)),
              Alu(core="dsp", acc_slot=0, alu_op="mul_shift", elements=q.size, operand="m", shift_operand="sh"),
              Alu(core="dsp", acc_slot=0, alu_op="clamp", elements=q.size, imm=(0, 255)),
              Alu(core="dsp", acc_slot=0, alu_op="madd_shift", elements=q.size, src_buffer="res", src_slot=0,
                  imm=(ma, mb, s), wait=("load->dsp:res",), signal=("dsp->store:acc",)),
              Store(core="dsp", slot=0, tensor="out", region=region, nbytes=q.size, clamp=(0, 255),
                    wait=("dsp->store:acc",))]
    Simulator(load_board("xc7z020")).run(stream, dram)
    np.testing.assert_array_equal(dram["out"][0], want)
    # the RTL ALU, from the same accumulators
    rows_of = np.broadcast_to(np.arange(rows)[:, None, None], acc.shape).ravel()
    zeros = (np.zeros(acc.size, np.int64),) * 2
    got = rtl.alu("add_bias", acc.ravel() - bias[rows_of], bias[rows_of], np.zeros(acc.size))
    got = rtl.alu("mul_shift", got, mult[rows_of], shift[rows_of])
    got = rtl.alu("min", rtl.alu("max", got, *zeros, acc_b=np.full(acc.size, 0)), *zeros, acc_b=np.full(acc.size, 255))
    np.testing.assert_array_equal(got, q.ravel())
    got = rtl.alu("madd_shift", got, np.full(acc.size, ma + (mb << 16)), np.full(acc.size, s), acc_b=res.ravel())
    np.testing.assert_array_equal(np.clip(got, 0, 255), want.ravel())
    # min and max of signed values, far from and next to each other
    vals = np.concatenate([rng.integers(-(1 << 30), 1 << 30, size=29), np.arange(-300, 300, 7)])
    other = np.concatenate([rng.integers(-(1 << 30), 1 << 30, size=29), np.arange(-300, 300, 7)[::-1]])
    z = np.zeros(vals.size, np.int64)
    np.testing.assert_array_equal(rtl.alu("min", vals, z, z, acc_b=other), np.minimum(vals, other))
    np.testing.assert_array_equal(rtl.alu("max", vals, z, z, acc_b=other), np.maximum(vals, other))
    for bad in (dict(alu_op="add_bias", src_buffer="res"), dict(alu_op="clamp", imm=(5, 1)),
                dict(alu_op="clamp", imm=(0,))):
        with pytest.raises(ValueError, match="src_buffer|clamp"):
            Alu(core="dsp", acc_slot=0, elements=4, **bad)


def test_max_alu_and_max_window_equal_numpy(rtl):
    """Max-pooling on the ALU: the RTL's elementwise max (op ``max``, one per window tap) and the
    simulator's ``max_window`` program (:func:`tvm_rmsmp.fpga.eltwise.maxpool_stream`, row tiles
    where a padded plane does not fit an accumulator part) against numpy."""
    from tvm_rmsmp.fpga.eltwise import MAXPOOL_PAD, maxpool_stream, maxpool_tiles

    rng = np.random.default_rng(12)
    a, b = rng.integers(-128, 256, size=61), rng.integers(-128, 256, size=61)
    np.testing.assert_array_equal(rtl.alu("max", a, np.zeros(61), np.zeros(61), acc_b=b), np.maximum(a, b))
    # the packed row pass: four signed bytes a word, each byte's max on its own
    ca, cb_ = rng.integers(-128, 128, size=(37, 4)), rng.integers(-128, 128, size=(37, 4))
    ca[0], cb_[0] = (-128, 127, -1, 0), (127, -128, 0, -1)     # no carry or sign crosses a byte
    words = [(np.asarray(c, np.int64) & 0xFF) @ (1 << (8 * np.arange(4))) for c in (ca, cb_)]
    words = [w - (w >= 2**31) * 2**32 for w in words]             # as int32
    got = rtl.alu("max4", words[0], np.zeros(37), np.zeros(37), acc_b=words[1]) & 0xFFFFFFFF
    got_bytes = ((got[:, None] >> (8 * np.arange(4))) & 0xFF).astype(np.uint8).view(np.int8)
    np.testing.assert_array_equal(got_bytes, np.maximum(ca, cb_))
    cfg = load_board("xc7z020")
    shape, params = (1, 3, 121, 119), {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}
    tiles = maxpool_tiles(shape, params, cfg.accelerator)
    assert len(tiles) > 3 and all(cb == 1 for _, _, cb, _, _ in tiles)  # 123 x 121 padded codes exceed a half
    x = rng.integers(-127, 128, size=shape)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=MAXPOOL_PAD).astype(np.int16)
    oh, ow = (121 + 2 - 3) // 2 + 1, (119 + 2 - 3) // 2 + 1
    want = torch.nn.functional.max_pool2d(torch.from_numpy(x.astype(np.float32)), 3, 2, 1).numpy()
    for cap in (cfg.accelerator.acc_slot_bytes // 4, None):  # row tiles; the default: planes, packed
        dram = {"p.x": padded, "p.out": np.zeros((1, 3, oh, ow), np.int16)}
        stream = maxpool_stream("p", shape, params, cfg.accelerator, cap)
        Simulator(cfg).run(stream, dram)
        np.testing.assert_array_equal(dram["p.out"], want)
        loads = [i for i in stream if isinstance(i, Load)]
        assert all(i.packed and i.nbytes <= cfg.accelerator.acc_slot_bytes for i in loads)
        assert sum(i.nbytes for i in loads) >= padded.size
