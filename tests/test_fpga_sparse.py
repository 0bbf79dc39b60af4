"""Pruned layers on the FPGA model (tvm_rmsmp/fpga/sparse.py): weights stored as runs of kept
columns, GEMMs issuing only those; integer-exact against numpy and the torch reference, with
fewer weight bytes loaded and fewer cycles than the dense stream of the same layer."""

import warnings

import numpy as np
import pytest
import torch
from conftest import SmallResNet, np_layer_acc, randomize_bn

import tvm_rmsmp as rmsmp
from relay_passes.rewrite_row_groups import group_weight, packed_weight, row_group_func
from schedules.fpga import FPGARowGroupRule
from tvm_rmsmp.compiler.targets import resolve_target
from tvm_rmsmp.fpga import derive_ratio, load_board
from tvm_rmsmp.fpga.codegen import RowGroup, layer_stream, tile_events, weight_levels
from tvm_rmsmp.fpga.isa import Load, SparseGemmDSP, SparseGemmLUT
from tvm_rmsmp.fpga.runtime import FPGAFallbackWarning
from tvm_rmsmp.fpga.simulator import Simulator, WeightTensor
from tvm_rmsmp.fpga.sparse import (
    RUN_HEADER_BYTES,
    SparseWeightTensor,
    compress_tile,
    sparsify_stream,
)
from tvm_rmsmp.quant.schemes import get_scheme


def test_compress_tile_stores_runs_of_kept_columns():
    rng = np.random.default_rng(0)
    cols = 36
    mask_a, mask_b = np.zeros(cols, bool), np.zeros(cols, bool)
    mask_a[[0, 1, 2, 3, 20, 21, 22, 23]] = True
    mask_b[[8, 9, 10, 11, 30, 31, 32, 33, 34, 35]] = True
    w = np.zeros((7, cols), np.int64)
    w[0:4, mask_a] = rng.integers(1, 8, (4, 8)) * rng.choice([-1, 1], (4, 8))
    w[4:7, mask_b] = rng.integers(1, 8, (3, 10)) * rng.choice([-1, 1], (3, 10))
    w[1, 2] = 0  # a quantization zero inside a kept block: the row stays in its run
    tile = compress_tile(w.astype(np.float64), bits=4)
    assert [(r0, list(np.nonzero(m)[0])) for r0, m, _ in tile.runs] == [
        (0, list(np.nonzero(mask_a)[0])), (4, list(np.nonzero(mask_b)[0]))]
    assert tile.run_shapes() == ((4, 8), (3, 10))
    mask_bytes = (cols + 7) // 8
    assert tile.nbytes == 2 * (RUN_HEADER_BYTES + mask_bytes) + (4 * 8 * 4 + 7) // 8 + (3 * 10 * 4 + 7) // 8
    np.testing.assert_array_equal(tile.dense(), w)
    a = rng.integers(0, 256, (5, cols)).astype(np.float64)
    np.testing.assert_array_equal(tile.product(a), a @ w.T)


def _punched(rng, scheme, rows, channels, kernel, block=(4, 4), keep=3):
    """Block-punched levels ``[rows, channels, kh, kw]`` (numpy, not the library's pruning):
    within each block of ``block`` filters x channels, ``keep`` kernel positions kept."""
    kh, kw = kernel
    w = rng.choice(get_scheme(scheme).levels, size=(rows, channels, kh, kw))
    mask = np.zeros_like(w, dtype=bool)
    for f0 in range(0, rows, block[0]):
        for c0 in range(0, channels, block[1]):
            pos = rng.choice(kh * kw, size=min(keep, kh * kw), replace=False)
            m = np.zeros(kh * kw, bool)
            m[pos] = True
            mask[f0:f0 + block[0], c0:c0 + block[1]] = m.reshape(kh, kw)
    return (w * mask).astype(np.int64)


def _layer(op, x, weights, accel, conv=None):
    """Dense and sparse streams of one layer (row groups of several schemes), both run."""
    target = resolve_target("fpga:xc7z020")
    groups, dram = [], {"x": x}
    for scheme, (w_int, bias) in weights.items():
        packed = get_scheme(scheme).bits <= 4
        stored = packed_weight(w_int, scheme) if packed else group_weight(w_int, scheme)
        func = row_group_func(op, "L", scheme, list(x.shape), str(x.dtype), list(w_int.shape), conv, packed=packed)
        sch = FPGARowGroupRule().apply(func, target, False)
        codes = int(np.prod(w_int.shape[1:]))
        dram[f"{scheme}.w"] = WeightTensor(stored, weight_levels(stored, scheme, packed)[:, :codes], 2 if packed else 1)
        dram[f"{scheme}.b"] = bias
        if op == "dense":
            out_shape = (x.shape[0], w_int.shape[0])
        else:
            s = conv["strides"][0]
            out_shape = (x.shape[0], w_int.shape[0], (x.shape[2] - w_int.shape[2]) // s + 1,
                         (x.shape[3] - w_int.shape[3]) // s + 1)
        dram[f"{scheme}.out"] = np.zeros(out_shape, np.int32)
        groups.append(RowGroup(scheme=scheme, core="lut" if get_scheme(scheme).kind == "sp2" else "dsp",
                               bits=4 if packed else 8, op=op, weight=f"{scheme}.w", bias=f"{scheme}.b",
                               output=f"{scheme}.out", events=tile_events(sch.mod["main"]),
                               kernel=tuple(w_int.shape[2:]) if op == "conv2d" else (1, 1),
                               stride=tuple(conv["strides"]) if conv else (1, 1)))
    dense = layer_stream("L", "x", groups, accel)
    sparse, stats = sparsify_stream(dense, dram, {g.weight: g.bits for g in groups})
    Simulator(accel).run(sparse, dram)
    return {s: dram[f"{s}.out"] for s in weights}, dense, sparse, stats, dram


LAYERS = [  # (op, x shape (conv: padded NCHW), x dtype, rows per scheme, kernel, stride)
    ("conv2d", (1, 16, 12, 12), "uint8", {"sp2_4": 19, "fixed_4": 11, "fixed_8": 2}, (3, 3), 1),
    ("conv2d", (2, 32, 9, 9), "int8", {"sp2_4": 12, "fixed_4": 8, "fixed_8": 4}, (3, 3), 2),
    ("conv2d", (1, 64, 34, 34), "uint8", {"sp2_4": 40, "fixed_4": 20, "fixed_8": 4}, (3, 3), 1),  # two bands
    ("dense", (1, 256), "int8", {"sp2_4": 40, "fixed_4": 20, "fixed_8": 4}, None, None),
    ("dense", (3, 4096), "uint8", {"sp2_4": 24, "fixed_4": 12, "fixed_8": 4}, None, None),  # K tiled
]


@pytest.mark.parametrize("op,x_shape,x_dtype,rows,kernel,stride", LAYERS)
def test_sparse_layer_is_exact_with_fewer_bytes_and_cycles(op, x_shape, x_dtype, rows, kernel, stride):
    rng = np.random.default_rng(sum(x_shape) + sum(rows.values()))
    lo, hi = (0, 255) if x_dtype == "uint8" else (-128, 127)
    x = rng.integers(lo, hi + 1, size=x_shape).astype(x_dtype)
    weights = {}
    for scheme, n in rows.items():
        if op == "conv2d":
            w = _punched(rng, scheme, n, x_shape[1], kernel)
        else:  # block_row on a Linear: blocks of 4 rows x 16 columns removed whole, 75 %
            w = rng.choice(get_scheme(scheme).levels, size=(n, x_shape[1]))
            keep = rng.random((-(-n // 4), x_shape[1] // 16)) < 0.25
            w = w * np.repeat(np.repeat(keep, 4, 0)[:n], 16, 1)
        weights[scheme] = (w.astype(np.int64), rng.integers(-1000, 1000, size=n).astype(np.int32))
    accel = load_board("xc7z020").accelerator
    conv = dict(strides=[stride, stride], padding=[0, 0], dilation=[1, 1]) if op == "conv2d" else None
    outs, dense, sparse, stats, dram = _layer(op, x, weights, accel, conv)
    for scheme, (w_int, bias) in weights.items():
        ref = np_layer_acc(op, x, w_int, bias, stride)
        np.testing.assert_array_equal(outs[scheme], ref, err_msg=f"{op} {x_shape} {scheme}")
    assert set(stats) == {f"{s}.w" for s in rows}
    assert all(isinstance(dram[name], SparseWeightTensor) for name in stats)
    gemms = [i for i in sparse if isinstance(i, (SparseGemmDSP, SparseGemmLUT))]
    assert len(gemms) == sum(1 for i in dense if type(i).__name__ in ("GemmDSP", "GemmLUT"))

    def wbytes(stream):
        return sum(i.nbytes for i in stream if isinstance(i, Load) and i.buffer != "inp")

    assert wbytes(sparse) < 0.6 * wbytes(dense)
    sim = Simulator(accel)
    busy_d, busy_s = sim.run(dense).busy, sim.run(sparse).busy
    assert busy_s["lut"] < busy_d["lut"] and busy_s["dsp"] < busy_d["dsp"]  # the cores issue fewer passes


def test_unpruned_layer_stays_dense():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(1, 16, 10, 10)).astype(np.uint8)
    weights = {s: (rng.choice(get_scheme(s).levels, size=(n, 16, 3, 3)).astype(np.int64), np.zeros(n, np.int32))
               for s, n in {"sp2_4": 12, "fixed_4": 6}.items()}
    conv = dict(strides=[1, 1], padding=[0, 0], dilation=[1, 1])
    _, dense, sparse, stats, dram = _layer("conv2d", x, weights, load_board("xc7z020").accelerator, conv)
    assert stats == {} and [type(i) for i in sparse] == [type(i) for i in dense]
    assert not any(isinstance(v, SparseWeightTensor) for v in dram.values())


def test_pruned_small_cnn_on_the_fpga_equals_the_torch_reference():
    torch.manual_seed(0)
    model = randomize_bn(SmallResNet()).eval()
    calib = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = rmsmp.prune(model, rmsmp.PruneConfig(scheme="block_punched", sparsity=0.75, block=(4, 4)))
        q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(ratio=derive_ratio("xc7z020"), assign="variance"), calib_data=calib)
    x = torch.randn(1, 1, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FPGAFallbackWarning)
        exe = rmsmp.compile(q, (x,), target="fpga:xc7z020")
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
    sparse = [p for p in exe.layers if p.sparse]
    assert {p.layer for p in sparse} >= {"conv_a", "conv_b", "down", "fc1"}
    accel = exe.config.accelerator
    sim = Simulator(accel)
    total = [0, 0]
    for p in sparse:
        dense = layer_stream(p.layer, f"{p.layer}.x", p.groups, accel)  # the same tiles, stored dense
        cycles = [sim.run(p.stream).cycles, sim.run(dense).cycles]
        assert cycles[0] <= cycles[1], p.layer  # equal where the int32 stores bound the layer (the stem)
        total = [t + c for t, c in zip(total, cycles)]
        wb = [sum(i.nbytes for i in s if isinstance(i, Load) and i.buffer != "inp") for s in (p.stream, dense)]
        assert wb[0] < wb[1], p.layer
    assert total[0] < total[1]
    # a what-if re-timing keeps the layers sparse
    assert exe.profile(accelerator=accel)["cycles"] == exe.profile()["cycles"]
