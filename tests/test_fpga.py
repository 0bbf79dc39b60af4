"""The FPGA target: board configs, derived ratio, instruction streams, simulator, whole models."""

from __future__ import annotations

import json
import warnings

import attrs
import numpy as np
import pytest
import torch
from conftest import np_layer_acc

import tvm_rmsmp as rmsmp
from relay_passes.rewrite_row_groups import group_weight, packed_weight, row_group_func
from schedules.fpga import FPGARowGroupRule, plan_tiles
from tvm_rmsmp.compiler.targets import resolve_target
from tvm_rmsmp.fpga import derive_ratio, known_boards, load_board
from tvm_rmsmp.fpga.codegen import RowGroup, layer_stream, tile_events, weight_levels
from tvm_rmsmp.fpga.isa import Alu, GemmDSP, GemmLUT, Load, Store
from tvm_rmsmp.fpga.ratio import core_balance
from tvm_rmsmp.fpga.runtime import FPGAFallbackWarning
from tvm_rmsmp.fpga.simulator import DeadlockError, HazardError, Simulator, WeightTensor
from tvm_rmsmp.quant.schemes import get_scheme

torch.set_num_threads(1)


# ----- boards and ratio ------------------------------------------------------------------
def test_boards_load_with_datasheet_resources():
    assert known_boards() == ["xc7z020", "xc7z045"]
    z020, z045 = load_board("xc7z020"), load_board("xc7z045")
    assert (z020.board.luts, z020.board.dsps, z020.board.bram36) == (53200, 220, 140)
    assert (z045.board.luts, z045.board.dsps, z045.board.bram36) == (218600, 900, 545)
    for cfg in (z020, z045):
        assert cfg.accelerator.dsp_slices <= cfg.board.dsps
        assert cfg.accelerator.core_luts <= cfg.board.luts


def test_derived_ratio_balances_the_cores_on_both_boards():
    # the balance rule from the board files' array sizes, written out: SP2 share s with
    # s / P_lut = (1 - s - h) / P_4 + h / P_8, h = 0.05, rounded to 5% (the papers: 60:35:5 / 65:30:5)
    for board in ("xc7z020", "xc7z045"):
        data = json.load(open(load_board(board).source))["accelerator"]
        p_lut = data["lut_array"]["pixels"] * data["lut_array"]["reduction"]
        p4 = 2 * data["dsp_array"]["pixels"] * data["dsp_array"]["reduction"]
        s = p_lut * (0.95 + 0.05 * 2) / (p_lut + p4)
        s = round(round(s / 0.05) * 0.05, 6)
        assert derive_ratio(board) == {"sp2_4": s, "fixed_4": round(0.95 - s, 6), "fixed_8": 0.05}
    assert rmsmp.fpga.derive_ratio("xc7z045") == derive_ratio("xc7z045")  # the package attribute
    for board in ("xc7z020", "xc7z045"):
        ratio = derive_ratio(board)
        bal = core_balance(board, ratio)
        assert abs(bal["lut"] - bal["dsp"]) / max(bal.values()) < 0.15  # within the 5% rounding step
        # moving one step either way unbalances it more
        worse = {"sp2_4": ratio["sp2_4"] + 0.05, "fixed_4": ratio["fixed_4"] - 0.05, "fixed_8": 0.05}
        b2 = core_balance(board, worse)
        assert abs(b2["lut"] - b2["dsp"]) > abs(bal["lut"] - bal["dsp"])
        rmsmp.RMSMPConfig(ratio=ratio)  # usable as is
    # no LUT core -> everything fixed; more LUT throughput -> more SP2 rows
    z045 = load_board("xc7z045")
    bigger = attrs.evolve(z045, accelerator=attrs.evolve(z045.accelerator, lut_array={"pixels": 56, "reduction": 64},
                                                                       luts_per_sp2_mac=40))
    assert derive_ratio(bigger)["sp2_4"] > derive_ratio(z045)["sp2_4"]


def test_unknown_board_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown FPGA board 'xc7z999'.*xc7z020.*xc7z045"):
        load_board("xc7z999")
    with pytest.raises(ValueError, match="unknown FPGA board"):
        resolve_target("fpga:xc7z999")
    with pytest.raises(ValueError, match="needs an argument"):
        resolve_target("fpga:")


def _board_json(tmp_path, **accel_changes):
    data = json.load(open(load_board("xc7z020").source))
    data["accelerator"].update(accel_changes)
    path = tmp_path / "board.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_bad_board_files_name_the_file_and_field(tmp_path):
    path = _board_json(tmp_path, bogus=1)
    with pytest.raises(ValueError, match=r"board\.json.*unknown field.*bogus"):
        load_board(path)
    data = json.load(open(load_board("xc7z020").source))
    del data["board"]["dsps"]
    (tmp_path / "b2.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"b2\.json.*missing field.*dsps"):
        load_board(str(tmp_path / "b2.json"))
    with pytest.raises(ValueError, match=r"dram_bytes_per_cycle must be a positive integer"):
        load_board(_board_json(tmp_path, dram_bytes_per_cycle=0))
    with pytest.raises(ValueError, match=r"DSP array needs 1024 DSP slices, board xc7z020 has 220"):
        load_board(_board_json(tmp_path, dsp_array={"pixels": 32, "reduction": 32}))
    with pytest.raises(ValueError, match=r"BRAM"):
        load_board(_board_json(tmp_path, acc_buffer_kib=4096))


def test_buffers_too_small_for_the_smallest_tile(tmp_path):
    # 1 KiB of accumulators in three parts: a part holds 341 bytes, one array row of int32 needs
    # 4 x 28 = 112 ... so shrink further via a wide array: 200 pixels x 4 bytes = 800 bytes > 341
    path = _board_json(tmp_path, acc_buffer_kib=1, acc_slots=3, lut_array={"pixels": 200, "reduction": 2})
    with pytest.raises(ValueError, match=r"acc_buffer_kib=1 gives 341 bytes per buffer part, less than the smallest tile"):
        load_board(path)


# ----- one layer: schedule -> TIR walk -> stream -> simulator, against numpy ---------------
CONV = dict(strides=[1, 1], padding=[0, 0], dilation=[1, 1])


def _levels(scheme, shape, rng):
    return rng.choice(get_scheme(scheme).levels, size=shape)


def _layer(op, x, weights, accel, conv=None, layer="L", requant=False):
    """Run one layer (row groups of several schemes sharing the input) on the simulator;
    ``requant``: with the fixed-point epilogue (the ALU's ``mul_shift``, uint8 codes out).

    Returns ({scheme: int32 (or uint8) output}, stream)."""
    target = resolve_target("fpga:xc7z020")
    rule = FPGARowGroupRule()
    groups, dram = [], {"x": x}
    for scheme, (w_int, bias) in weights.items():
        packed = get_scheme(scheme).bits <= 4
        stored = packed_weight(w_int, scheme) if packed else group_weight(w_int, scheme)
        func = row_group_func(op, layer, scheme, list(x.shape), str(x.dtype), list(w_int.shape), conv, packed=packed)
        sch = rule.apply(func, target, False)
        assert sch is not None, plan_tiles(func, accel)
        scheduled = sch.mod["main"]
        kernel = tuple(w_int.shape[2:]) if op == "conv2d" else (1, 1)
        codes = int(np.prod(w_int.shape[1:]))
        dram[f"{scheme}.w"] = WeightTensor(stored, weight_levels(stored, scheme, packed)[:, :codes], 2 if packed else 1)
        dram[f"{scheme}.b"] = bias
        out_shape = (x.shape[0], w_int.shape[0]) if op == "dense" else None
        if op == "conv2d":
            n, _, hp, wp = x.shape
            s = conv["strides"][0]
            out_shape = (n, w_int.shape[0], (hp - kernel[0]) // s + 1, (wp - kernel[1]) // s + 1)
        dram[f"{scheme}.out"] = np.zeros(out_shape, np.uint8 if requant else np.int32)
        rq = None
        if requant:
            dram[f"{scheme}.m"], dram[f"{scheme}.s"] = np.full(w_int.shape[0], 2**14), np.full(w_int.shape[0], 20)
            rq = {"mult": f"{scheme}.m", "shift": f"{scheme}.s", "qmin": 0, "qmax": 255}
        groups.append(RowGroup(scheme=scheme, core="lut" if get_scheme(scheme).kind == "sp2" else "dsp",
                               bits=4 if packed else 8, op=op, weight=f"{scheme}.w", bias=f"{scheme}.b",
                               output=f"{scheme}.out", events=tile_events(scheduled), kernel=kernel,
                               stride=tuple(conv["strides"]) if conv else (1, 1), requant=rq))
    stream = layer_stream(layer, "x", groups, accel)
    Simulator(accel).run(stream, dram)
    return {s: dram[f"{s}.out"] for s in weights}, stream


LAYERS = [
    # (op, x shape (conv: padded NCHW), rows per scheme, kernel, stride)
    ("dense", (1, 64), {"sp2_4": 13, "fixed_4": 7, "fixed_8": 1}, None, None),
    ("dense", (3, 37), {"sp2_4": 5, "fixed_4": 3}, None, None),
    ("dense", (2, 4096), {"sp2_4": 65, "fixed_4": 30, "fixed_8": 5}, None, None),  # K tiled
    ("conv2d", (1, 3, 15, 15), {"sp2_4": 19, "fixed_4": 11, "fixed_8": 2}, (3, 3), 1),
    ("conv2d", (1, 16, 11, 11), {"sp2_4": 7, "fixed_4": 5, "fixed_8": 1}, (3, 3), 2),
    ("conv2d", (2, 8, 9, 9), {"sp2_4": 5, "fixed_8": 3}, (1, 1), 2),
    ("conv2d", (1, 64, 58, 58), {"sp2_4": 41, "fixed_4": 20, "fixed_8": 3}, (3, 3), 1),  # several bands
]


@pytest.mark.parametrize("op,x_shape,rows,kernel,stride", LAYERS)
def test_simulated_layer_is_integer_exact(op, x_shape, rows, kernel, stride):
    rng = np.random.default_rng(sum(x_shape) + sum(rows.values()))
    x = rng.integers(0, 256, size=x_shape).astype(np.uint8)
    conv = None
    weights = {}
    for scheme, n in rows.items():
        shape = (n, x_shape[1]) if op == "dense" else (n, x_shape[1], *kernel)
        weights[scheme] = (_levels(scheme, shape, rng), rng.integers(-1000, 1000, size=n).astype(np.int32))
    if op == "conv2d":
        conv = dict(CONV, strides=[stride, stride])
    accel = load_board("xc7z020").accelerator
    outs, stream = _layer(op, x, weights, accel, conv)
    for scheme, (w_int, bias) in weights.items():
        ref = np_layer_acc(op, x, w_int, bias, stride)
        np.testing.assert_array_equal(outs[scheme], ref, err_msg=f"{op} {x_shape} {scheme}")
    cores = {type(i).__name__ for i in stream}
    assert ("GemmLUT" in cores) == ("sp2_4" in rows)
    assert ("GemmDSP" in cores) == bool({"fixed_4", "fixed_8"} & set(rows))


def test_input_tiles_are_shared_by_both_cores():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(1, 64, 58, 58)).astype(np.uint8)
    weights = {s: (_levels(s, (n, 64, 3, 3), rng), np.zeros(n, np.int32)) for s, n in
               {"sp2_4": 41, "fixed_4": 20, "fixed_8": 3}.items()}
    accel = load_board("xc7z020").accelerator
    _, stream = _layer("conv2d", x, weights, accel, CONV)
    inp_loads = [i for i in stream if isinstance(i, Load) and i.buffer == "inp"]
    assert len({i.region for i in inp_loads}) == len(inp_loads) > 1  # each input tile loaded once, for both cores
    readers = {i.queue for i in stream if isinstance(i, (GemmLUT, GemmDSP)) and i.inp_slot == 0}
    assert readers == {"lut", "dsp"}
    result = Simulator(accel).run(stream)
    assert result.busy["lut"] + result.busy["dsp"] > result.cycles  # the two cores overlap in time


# ----- dependency tokens ------------------------------------------------------------------
def _small_stream(requant=False):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(1, 64, 58, 58)).astype(np.uint8)
    weights = {s: (_levels(s, (n, 64, 3, 3), rng), np.zeros(n, np.int32)) for s, n in {"sp2_4": 16, "fixed_4": 8}.items()}
    accel = load_board("xc7z020").accelerator
    return _layer("conv2d", x, weights, accel, CONV, requant=requant)[1], accel


def test_generated_streams_only_wait_for_earlier_signals():
    stream, _ = _small_stream()
    pending = {}
    for i, ins in enumerate(stream):
        for ch in ins.wait:
            assert pending.get(ch, 0) > 0, f"#{i} waits on {ch} before any instruction pushed it"
            pending[ch] -= 1
        for ch in ins.signal:
            pending[ch] = pending.get(ch, 0) + 1


def test_missing_wait_is_a_hazard_naming_the_instruction():
    stream, accel = _small_stream()
    loads = [i for i, ins in enumerate(stream) if isinstance(ins, Load) and ins.buffer == "wgt_lut"]
    k = loads[2]  # the third weight tile reuses buffer half 0: it waits until the first GEMM is done with it
    assert stream[k].wait == ("lut->load:wgt",) and stream[k].slot == 0
    broken = list(stream)
    broken[k] = attrs.evolve(stream[k], wait=())
    # tokens are FIFO: this load, or a later one that now pops an earlier token, overwrites too soon
    with pytest.raises(HazardError, match=r"write-after-read: instruction #\d+ LOAD\(buffer='wgt_lut'.*overwrites "
                                          r"wgt_lut\[\d\] at cycle \d+ while instruction #\d+ GEMMLUT") as err:
        Simulator(accel).run(broken)
    assert err.value.index >= k and isinstance(stream[err.value.index], Load)
    # a store that does not wait for its accumulators reads a buffer nobody wrote yet
    j = next(i for i, ins in enumerate(stream) if isinstance(ins, Store))
    broken = list(stream)
    broken[j] = attrs.evolve(stream[j], wait=())
    with pytest.raises(HazardError, match=rf"read-before-write: instruction #{j} STORE"):
        Simulator(accel).run(broken)


def test_missing_signal_is_a_deadlock_naming_the_blocked_instruction():
    stream, accel = _small_stream()
    k = next(i for i, ins in enumerate(stream) if isinstance(ins, Load) and ins.buffer == "wgt_dsp")
    broken = list(stream)
    broken[k] = attrs.evolve(stream[k], signal=())
    with pytest.raises(DeadlockError, match=r"deadlock: .*queue dsp at instruction #\d+ GEMMDSP.*load->dsp:data"):
        Simulator(accel).run(broken)


def test_reading_an_unwritten_buffer_is_reported():
    accel = load_board("xc7z020").accelerator
    stream = [GemmDSP(op="dense", inp_slot=0, wgt_slot=0, acc_slot=0, rows=1, pixels=1, reduction=4, layer="fc")]
    with pytest.raises(HazardError, match=r"instruction #0 GEMMDSP.*\(layer 'fc'\) reads inp\[0\], which no instruction has written"):
        Simulator(accel).run(stream)


def test_alu_requantization_ops_against_numpy():
    accel = load_board("xc7z020").accelerator
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, size=(4, 32)).astype(np.int8)
    w = rng.integers(-127, 128, size=(6, 32))
    mult, shift = rng.integers(1, 1 << 15, size=6), rng.integers(8, 20, size=6)
    bias = rng.integers(-5000, 5000, size=6)
    dram = {"x": x, "w": WeightTensor(w.astype(np.int8), w.astype(np.float64), 1), "bias": bias, "m": mult,
            "s": shift, "one": np.ones(6, np.int64), "out": np.zeros((4, 6), np.int32)}
    stream = [
        Load(buffer="inp", tensor="x", region=((0, 4), (0, 32)), slot=0, nbytes=128, signal=("load->dsp:inp",)),
        Load(buffer="wgt_dsp", tensor="w", region=((0, 6), (0, 32)), slot=0, nbytes=192, signal=("load->dsp:data",)),
        GemmDSP(op="dense", inp_slot=0, wgt_slot=0, acc_slot=0, rows=6, pixels=4, reduction=32, bits=8,
                wait=("load->dsp:data", "load->dsp:inp"), signal=("dsp->alu:acc",)),
        Alu(core="dsp", acc_slot=0, alu_op="add_bias", elements=24, operand="bias", row_axis=1, wait=("dsp->alu:acc",)),
        Alu(core="dsp", acc_slot=0, alu_op="mul_shift", elements=24, operand="m", shift_operand="s", row_axis=1),
        Alu(core="dsp", acc_slot=0, alu_op="relu", elements=24, signal=("dsp->store:acc",)),
        Store(core="dsp", slot=0, tensor="out", region=((0, 4), (0, 6)), nbytes=96, wait=("dsp->store:acc",)),
    ]
    Simulator(accel).run(stream, dram)
    acc = x.astype(np.int64) @ w.T + bias
    ref = np.maximum((acc * mult + (1 << (shift - 1))) >> shift, 0)
    np.testing.assert_array_equal(dram["out"], ref)


def test_cycle_model_scales_with_the_arrays():
    stream, accel = _small_stream()
    base = Simulator(accel).run(stream)
    faster = Simulator(attrs.evolve(accel, lut_array={"pixels": 56, "reduction": 36},
                                    dsp_array={"pixels": 28, "reduction": 14})).run(stream)
    assert faster.busy["lut"] < base.busy["lut"] and faster.busy["dsp"] < base.busy["dsp"]
    assert faster.cycles < base.cycles
    slow_dram = Simulator(attrs.evolve(accel, dram_bytes_per_cycle=1)).run(stream)
    fast_dram = Simulator(attrs.evolve(accel, dram_bytes_per_cycle=16)).run(stream)
    assert slow_dram.busy["dma_read"] > 8 * fast_dram.busy["dma_read"]


def test_dram_bus_shared_serializes_reads_and_writes():
    """On a split bus (a read and a write channel of B bytes per cycle each) loads and stores
    overlap; on a shared bus of B bytes per cycle they take turns: a DMA-bound layer then takes
    at least its read plus its write time, and the transfers themselves last as long."""
    stream, accel = _small_stream()
    split = Simulator(attrs.evolve(accel, dram_bytes_per_cycle=1, dram_bus="split")).run(stream)
    shared = Simulator(attrs.evolve(accel, dram_bytes_per_cycle=1, dram_bus="shared")).run(stream)
    assert shared.busy == split.busy
    dma = split.busy["dma_read"] + split.busy["dma_write"]
    assert split.cycles < 0.7 * dma          # reads and writes overlapped
    assert dma <= shared.cycles < 1.1 * dma  # one after the other
    with pytest.raises(ValueError, match="dram_bus must be 'shared' or 'split'"):
        attrs.evolve(accel, dram_bus="duplex")


def test_alu_unit_of_its_own_overlaps_the_gemms():
    """With ``alu_unit="own"`` a tile's ALU ops run on the core's ALU queue while the array
    computes the next tile (the simulator checks every accumulator access): the GEMM queues
    hold the GEMMs only, and a layer whose epilogue is long takes fewer cycles; with "core"
    the ALU ops take turns with the GEMMs on the core's queue (as in VTA)."""
    stream, accel = _small_stream(requant=True)  # the fixed-point epilogue: one ALU pass per tile
    accel = attrs.evolve(accel, alu_lanes=1)  # a slow ALU: the epilogue matters
    core = Simulator(attrs.evolve(accel, alu_unit="core")).run(stream)
    own = Simulator(attrs.evolve(accel, alu_unit="own")).run(stream)
    assert core.busy["alu_lut"] == core.busy["alu_dsp"] == 0
    for c in ("lut", "dsp"):
        assert own.busy[f"alu_{c}"] > 0 and own.busy[c] + own.busy[f"alu_{c}"] == core.busy[c]
    assert own.cycles < core.cycles
    with pytest.raises(ValueError, match="alu_unit must be 'own' or 'core'"):
        attrs.evolve(accel, alu_unit="shared")


def test_accumulators_in_three_parts_rotate_and_stay_exact():
    """With ``acc_slots=3`` each core's tiles take the accumulator parts 0, 1, 2 in turn and a
    tile waits for the store of the tile three before it (the simulator checks every access);
    the results equal the double-buffered stream's, bit for bit."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(1, 32, 30, 30)).astype(np.uint8)
    weights = {s: (_levels(s, (n, 32, 3, 3), rng), rng.integers(-900, 900, size=n).astype(np.int32))
               for s, n in {"sp2_4": 12, "fixed_4": 6}.items()}
    accel = load_board("xc7z020").accelerator
    outs = {}
    for slots in (2, 3):
        out, stream = _layer("conv2d", x, weights, attrs.evolve(accel, acc_slots=slots), CONV, requant=True)
        outs[slots] = out
        gemms = [i for i in stream if isinstance(i, (GemmLUT, GemmDSP)) and i.reset]
        lut = [g.acc_slot for g in gemms if g.core == "lut"]
        assert lut[:slots + 1] == [0, 1, 2, 0][:slots] + [0] and len(lut) > slots
        assert all(("store->lut:acc" in g.wait) == (k >= slots) for k, g in enumerate(g for g in gemms if g.core == "lut"))
    for s in weights:
        np.testing.assert_array_equal(outs[3][s], outs[2][s])
    with pytest.raises(ValueError, match="acc_slots"):
        attrs.evolve(accel, acc_slots=1)


def test_boards_share_their_dram_bus():
    """The boards' DRAM: the bus (reads and writes together) is the peak times 75% at the
    accelerator clock, within the AXI ports: PYNQ PS DDR3 16-bit at 1050 MT/s, 100 MHz; ZC706
    PL DDR3 64-bit at 1600 MT/s, 200 MHz."""
    for board, peak, clock in (("xc7z020", 2 * 1050e6, 100e6), ("xc7z045", 8 * 1600e6, 200e6)):
        a = load_board(board).accelerator
        assert a.dram_bus == "shared" and a.dram_bytes_per_cycle == int(peak * 0.75 / clock), board
        assert a.alu_unit == "own", board


# ----- whole models -------------------------------------------------------------------------
def test_small_resnet_on_the_fpga_equals_the_torch_reference(small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio=derive_ratio("xc7z020")), calib_data=calib)
    x = torch.randn(1, 1, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FPGAFallbackWarning)
        exe = rmsmp.compile(q, (x,), target="fpga:xc7z020")
    assert [p.layer for p in exe.layers] == ["stem.0", "conv_a", "conv_b", "down", "fc1", "fc2"]
    y = exe(x)
    np.testing.assert_array_equal(y, q(x).detach().numpy())
    prof = exe.profile()
    assert prof["cycles"] == sum(layer["cycles"] for layer in prof["layers"]) > 0
    assert 0 < prof["mac_utilization"]["lut"] <= 1 and 0 < prof["mac_utilization"]["dsp"] <= 1
    assert all(0 <= u <= 1 for u in prof["utilization"].values())
    assert prof["latency_ms"] == pytest.approx(prof["cycles"] / 1e5)  # 100 MHz


class _Dilated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 6, 3, padding=2, dilation=2)
        self.fc = torch.nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_unsupported_layer_falls_back_to_the_host_with_a_warning():
    torch.manual_seed(0)
    model = _Dilated().eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib_data=[torch.randn(4, 2, 8, 8)])
    x = torch.randn(1, 2, 8, 8)
    with pytest.warns(FPGAFallbackWarning, match=r"layer 'conv' \(sp2_4 rows\) runs on the host CPU: dilation"):
        exe = rmsmp.compile(q, (x,), target="fpga:xc7z045")
    assert [p.layer for p in exe.layers] == ["fc"]
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
    assert exe.profile()["host_fallbacks"]


@pytest.mark.slow
def test_resnet18_imagenet_shapes_on_the_simulator():
    from tvm_rmsmp.models.resnet import resnet18

    model = resnet18(width=16, num_classes=10)
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio=derive_ratio("xc7z045")), calib_data=[torch.randn(1, 3, 224, 224)])
    x = torch.randn(1, 3, 224, 224)
    exe = rmsmp.compile(q, (x,), target="fpga:xc7z045")
    assert len(exe.layers) == 21 and not exe.fallbacks
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
