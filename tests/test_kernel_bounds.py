"""Integer bounds of the x86 kernels (schedules/x86_bounds.py) and the per-CPU constants table.

The expected limits are computed here from the operands' extremes, not by the helpers' own
formulas: the worst product of the MAC's operands (offsets included), and the most of them
whose sum stays within int32 (or int16 for ``vpmaddubsw`` pair sums).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tvm

from conftest import np_dense_acc, np_epilogue
from relay_passes.rewrite_row_groups import row_group_func
from tvm_rmsmp.quant.schemes import get_scheme, nibble_decode, pack_nibbles

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SP2 = nibble_decode(np.arange(16), get_scheme("sp2_4"))
CODE_PLUS8, CODE_MINUS8 = int(np.nonzero(SP2 == 8)[0][0]), int(np.nonzero(SP2 == -8)[0][0])
#: int8 activations x int8 rows offset by 128 (VNNI): worst product -128 * 255
K_INT8_ROWS = 2**31 // (128 * 255)  # 65793; the positive side allows (2^31 - 1) // (127 * 255) = 66311


def _haswell():
    return tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 1})


def _vnni_target(host_target):
    from schedules.x86_intrin import x86_isa

    if x86_isa(host_target) != "avx512vnni":
        pytest.skip("the host has no AVX-512 VNNI")
    return host_target


def _run(func, target, *arrays):
    exe = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    args = [tvm.runtime.tensor(a) for a in arrays]
    exe.mod["main"](*args)
    return args[-1].numpy()


def test_limits_from_first_principles():
    from schedules.x86_bounds import INT8, UINT8, max_k, operand_range, product_range

    assert K_INT8_ROWS == 65793
    # VNNI, int8 activations (the signed operand) x int8 rows + 128 (0..255)
    assert max_k(INT8, operand_range(None, 128), offset=128) == K_INT8_ROWS
    # unsigned activations x int8 rows (VNNI as they are; AVX2 as int16 pairs): 255 * -128
    assert max_k(UINT8, INT8) == 2**31 // (255 * 128)
    # AVX2 int16 pairs, both signed: the largest product is (-128) * (-128), positive
    assert max_k(INT8, INT8) == (2**31 - 1) // (128 * 128)
    # 4-bit levels -8..8: unsigned activations 255 * 8 either way; signed ones meet level + 8
    # (0..16), the worst -128 * 16
    assert max_k(UINT8, operand_range(SP2)) == (2**31 - 1) // (255 * 8)
    assert max_k(INT8, operand_range(SP2, 8), offset=8) == 2**31 // (128 * 16)
    assert product_range(INT8, (0, 16)) == (-128 * 16, 127 * 16)


def test_pair_sums16_is_tied_to_the_level_bound():
    """Eight ``vpmaddubsw`` pair sums of levels -8..8 fit int16 (signed activations reach
    2 * 8 * (-128) * 16 = -32768 exactly); nine, or levels up to 9, do not."""
    from schedules.x86_bounds import check_pair_sums16
    from schedules.x86_intrin import PAIR_SUMS16

    assert PAIR_SUMS16 == 8 and 2 * PAIR_SUMS16 * (-128) * 16 == -(2**15)
    check_pair_sums16(PAIR_SUMS16)
    with pytest.raises(AssertionError, match="past int16"):
        check_pair_sums16(PAIR_SUMS16 + 1)
    with pytest.raises(AssertionError, match="past int16"):
        check_pair_sums16(PAIR_SUMS16, level_bound=9)


@pytest.mark.parametrize("build,limit", [
    (lambda k: __import__("schedules.x86_intrin").x86_intrin.gemm_kernel(1, k, 4, "int8", None, "avx512vnni"),
     K_INT8_ROWS),
    (lambda k: __import__("schedules.x86_intrin").x86_intrin.gemm_kernel(4, k, 4, "uint8", None, "avx2"),
     2**31 // (255 * 128)),
    (lambda k: __import__("schedules.x86_intrin").x86_intrin.gemm_kernel(1, k, 4, "int8", None, "avx2"),
     (2**31 - 1) // (128 * 128)),
    (lambda k: __import__("schedules.x86_intrin").x86_intrin.broadcast_dense_kernel(8, k, 8, "int8", None,
                                                                                    "avx512vnni"), K_INT8_ROWS),
    (lambda k: __import__("schedules.x86_intrin").x86_intrin.layer_dense_kernel(32, k, 8, "int8", [SP2], 1),
     K_INT8_ROWS),
    (lambda k: __import__("schedules.x86_gemv").x86_gemv.gemv_layer_kernel(
        __import__("schedules.x86_gemv").x86_gemv.GemvLayout(k, 8, 0, (), 1), "uint8", []), 2**31 // (255 * 128)),
])
def test_builders_refuse_k_past_the_bound(build, limit):
    from schedules.x86_bounds import KernelBoundError

    with pytest.raises(KernelBoundError, match=rf"k = {limit + 1} is too long .*int8 rows.*at most k = {limit}"):
        build(limit + 1)


def test_sp2_bound_names_the_levels():
    from schedules.x86_bounds import KernelBoundError
    from schedules.x86_intrin import gemm_kernel

    limit = 2**31 // (128 * 16)
    with pytest.raises(KernelBoundError, match=rf"gemm_kernel: k = {limit + 1} .*4-bit levels -8..8"):
        gemm_kernel(1, limit + 1, 4, "int8", SP2, "avx2")


def test_x86_replacement_falls_back_past_the_bound():
    """A row group past the bound: no x86 kernel and a warning; the rule then gives it the
    portable schedule, which computes it (exact int32 sums of int32 products)."""
    import schedules
    from schedules.cpu import x86_replacement
    from schedules.x86_bounds import KernelBoundWarning

    limit = 2**31 // (255 * 128)  # uint8 activations x int8 rows on AVX2
    func = row_group_func("dense", "t", "fixed_8", (1, limit + 1), "uint8", (4, limit + 1))
    with pytest.warns(KernelBoundWarning, match=rf"k = {limit + 1} is too long"):
        assert x86_replacement(func, _haswell()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelBoundWarning)
        ok = x86_replacement(row_group_func("dense", "t", "fixed_8", (1, limit), "uint8", (4, limit)), _haswell())
    assert ok is not None and str(ok.attrs["rmsmp.cpu_kernel"]) == "x86-avx2-int8"

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with pytest.warns(KernelBoundWarning):
        mod = schedules.apply_rules(mod, _haswell())
    assert "rmsmp.cpu_kernel" not in mod["main"].attrs
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, limit + 1)).astype(np.uint8)
    w = rng.integers(-128, 128, (4, limit + 1)).astype(np.int8)
    bias, scale = np.arange(4, dtype=np.int32), np.ones(4, np.float32)
    exe = tvm.compile(mod, target=_haswell())
    args = [tvm.runtime.tensor(a) for a in (x, w, bias, scale, np.zeros((1, 4), np.float32))]
    exe.mod["main"](*args)
    np.testing.assert_array_equal(args[-1].numpy(), np_epilogue(np_dense_acc(x, w), bias.astype(np.int64), scale, 1))


def _extreme_int8_case(x_dtype, m, k, n):
    """Activations at their bound and int8 rows at -128 / 127, so some output reaches the
    int32 bound of the kernel's sums at the largest ``k``."""
    lo, hi = (0, 255) if x_dtype == "uint8" else (-128, 127)
    x = np.empty((m, k), x_dtype)
    x[0::2], x[1::2] = (hi, lo) if x_dtype == "uint8" else (lo, hi)
    w = np.empty((n, k), np.int8)
    w[0::2], w[1::2] = -128, 127
    return x, w


def _check_dense(func, target, x, w):
    n = w.shape[0]
    bias, scale = np.zeros(n, np.int32), np.ones(n, np.float32)
    out = _run(func, target, x, w, bias, scale, np.zeros((x.shape[0], n), np.float32))
    acc = np_dense_acc(x, w)
    np.testing.assert_array_equal(out, np_epilogue(acc, bias.astype(np.int64), scale, 1))
    return acc


@pytest.mark.parametrize("kernel", ["gemm", "broadcast"])
def test_avx2_int8_rows_exact_at_the_largest_k(kernel):
    """AVX2 (haswell: runs on any host with AVX2): int8 rows as int16 pairs, uint8 activations
    at 255 against -128, the int32 sums at -32640 * 65793 (just inside int32)."""
    from schedules.x86_intrin import broadcast_dense_kernel, gemm_kernel, tile_weights

    k = 2**31 // (255 * 128)
    x, w = _extreme_int8_case("uint8", 2 if kernel == "gemm" else 8, k, 4)
    if kernel == "gemm":
        acc = _check_dense(gemm_kernel(2, k, 4, "uint8", None, "avx2"), _haswell(), x, w)
    else:
        func = broadcast_dense_kernel(8, k, 4, "uint8", None, "avx2")
        rows, per = (int(v) for v in func.attrs["rmsmp.weight_tiles"])
        n = 4
        out = _run(func, _haswell(), x, tile_weights(w, rows, per), np.zeros(n, np.int32), np.ones(n, np.float32),
                   np.zeros((8, n), np.float32))
        acc = np_dense_acc(x, w)
        np.testing.assert_array_equal(out, np_epilogue(acc, np.zeros(n, np.int64), np.ones(n, np.float32), 1))
    assert acc.min() == -255 * 128 * k and acc.min() >= INT32_MIN


@pytest.mark.parametrize("kernel", ["gemm", "broadcast", "gemv"])
def test_vnni_int8_rows_exact_at_the_largest_k(kernel, host_target):
    """VNNI: int8 activations at -128 meet int8 rows at 127, offset to 255: every partial sum
    reaches -32640 * 65793 before the offset's share is taken off."""
    from schedules.x86_gemv import INT8, gemv_layer_kernel, gemv_layer_weights
    from schedules.x86_intrin import broadcast_dense_kernel, gemm_kernel, tile_weights

    target = _vnni_target(host_target)
    k = K_INT8_ROWS
    if kernel == "gemm":
        x, w = _extreme_int8_case("int8", 2, k, 4)
        _check_dense(gemm_kernel(2, k, 4, "int8", None, "avx512vnni"), target, x, w)
    elif kernel == "broadcast":
        x, w = _extreme_int8_case("int8", 8, k, 8)
        func = broadcast_dense_kernel(8, k, 8, "int8", None, "avx512vnni")
        rows, per = (int(v) for v in func.attrs["rmsmp.weight_tiles"])
        out = _run(func, target, x, tile_weights(w, rows, per), np.zeros(8, np.int32), np.ones(8, np.float32),
                   np.zeros((8, 8), np.float32))
        np.testing.assert_array_equal(out, np_epilogue(np_dense_acc(x, w), np.zeros(8, np.int64),
                                                       np.ones(8, np.float32), 1))
    else:  # the batch-1 layer kernel: uint8 activations (x' + 128 = x) at 255 against -128
        x, w = _extreme_int8_case("uint8", 1, 2**31 // (255 * 128), 8)
        k = x.shape[1]
        order = [(0, r) for r in range(8)]
        layout, *consts = gemv_layer_weights(order, [w], [INT8], [None], np.zeros(8, np.int64),
                                             np.ones(8, np.float32), k, "uint8")
        out = _run(gemv_layer_kernel(layout, "uint8", []), target, x, *consts, np.zeros((1, 8), np.float32))
        np.testing.assert_array_equal(out, np_epilogue(np_dense_acc(x, w), np.zeros(8, np.int64),
                                                       np.ones(8, np.float32), 1))


@pytest.mark.parametrize("x_dtype", ["int8", "uint8"])
def test_avx2_int16_pair_sums_exact_at_their_bound(x_dtype):
    """AVX2 4-bit rows with eight ``vpmaddubsw`` pair sums added in int16 (decoded rows, several
    activation tiles; the outer-product kernel; the batch-1 layer kernel): SP2's level 8 against
    -128 (signed: 8 pair sums of (8 + 8) * -128 * 2 = -32768) and level -8 against 255."""
    from schedules.x86_gemv import gemv_layer_kernel, gemv_layer_weights
    from schedules.x86_intrin import broadcast_dense_kernel, gemm_kernel, tile_weights

    m, k, n = 8, 512, 8
    lo, hi = (0, 255) if x_dtype == "uint8" else (-128, 127)
    x = np.empty((m, k), x_dtype)
    x[0::2], x[1::2] = lo, hi
    codes = np.empty((n, k), np.int64)
    codes[0::2], codes[1::2] = CODE_PLUS8, CODE_MINUS8
    packed, w_int = pack_nibbles(codes), SP2[codes]
    bias, scale = np.zeros(n, np.int32), np.ones(n, np.float32)
    expected = np_epilogue(np_dense_acc(x, w_int), bias.astype(np.int64), scale, 1)
    out = _run(gemm_kernel(m, k, n, x_dtype, SP2, "avx2"), _haswell(), x, packed, bias, scale,
               np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(out, expected)
    func = broadcast_dense_kernel(m, k, n, x_dtype, SP2, "avx2")
    rows, per = (int(v) for v in func.attrs["rmsmp.weight_tiles"])
    out = _run(func, _haswell(), x, tile_weights(packed, rows, per), bias, scale, np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(out, expected)
    # gemv: the 4-bit bytes meet x' = x - 128 (uint8) or x: -128 at lo for both
    layout, *consts = gemv_layer_weights([(0, r) for r in range(n)], [packed], [0], [SP2], bias.astype(np.int64),
                                         scale, k, x_dtype, pairs=2, isa="avx2")
    out = _run(gemv_layer_kernel(layout, x_dtype, [SP2], m=2), _haswell(), x[:2], *consts, np.zeros((2, n), np.float32))
    np.testing.assert_array_equal(out, expected[:2])


def test_constants_table_rows_are_complete():
    from schedules.x86_tuning_table import ISA_DEFAULTS, KEYS, X86_CONSTANTS

    assert set(ISA_DEFAULTS.values()) <= set(X86_CONSTANTS)
    for name, row in X86_CONSTANTS.items():
        assert set(row) == set(KEYS), name
        assert row["isa"] in ISA_DEFAULTS, name
        assert row["pass_us"] and all(us > 0 for us in row["pass_us"].values()), name
        assert row["gemv_max_rows"] >= 1 and row["broadcast_min_rows"] >= 1 and row["l2_chunk_bytes"] > 0, name
        assert row["zmm_pad_divisor"] is None or row["isa"] == "avx512vnni", name
    # the values measured before the table existed (znver3 AVX2, znver4 VNNI) are the defaults
    from schedules.x86_gemv import GEMV_MAX_ROWS, GEMV_MAX_ROWS_AVX2, PASS_US
    from schedules.x86_intrin import BROADCAST_MIN_ROWS

    assert (GEMV_MAX_ROWS, GEMV_MAX_ROWS_AVX2, BROADCAST_MIN_ROWS) == (23, 12, 8)
    assert PASS_US["avx512vnni"][(4, 1)] == 37.0 and PASS_US["avx2"][(2, 1)] == 78.0
    assert X86_CONSTANTS["default-avx2"] == X86_CONSTANTS["znver3"]
    assert X86_CONSTANTS["default-avx512vnni"] == X86_CONSTANTS["znver4"]


@pytest.mark.parametrize("mcpu,row", [("znver3", "znver3"), ("znver4", "znver4"), ("rocketlake", "rocketlake"),
                                      ("haswell", "default-avx2"), ("cascadelake", "default-avx512vnni"),
                                      ("skylake-avx512", "default-avx2"),
                                      ({"mcpu": "rocketlake", "mattr": ["-avx512f"]}, "rocketlake/avx2")])
def test_constants_fall_back_to_the_isa_default(mcpu, row):
    """A CPU not in the table gets its ISA class's row (skylake-avx512: AVX-512 without VNNI,
    so the AVX2 kernels and their row); a CPU whose target has fewer features its
    ``<mcpu>/<isa>`` row (the AMX Xeon with AVX-512 hidden); a non-x86 target gets none."""
    from schedules.x86_tuning_table import X86_CONSTANTS, constants_for, x86_constants

    target = tvm.target.Target({"kind": "llvm", **(mcpu if isinstance(mcpu, dict) else {"mcpu": mcpu})})
    assert x86_constants(target) is X86_CONSTANTS[row]
    assert constants_for("avx2", "znver4") is X86_CONSTANTS["default-avx2"]  # the row's ISA must match
    assert x86_constants(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})) is None


def test_kernels_read_the_cpu_row():
    """The zmm rule, the L2 chunk and the gemv tiling come from the CPU's row."""
    from schedules.x86_gemv import block_pairs, gemv_max_rows, row_tile
    from schedules.x86_intrin import vector_bytes
    from schedules.x86_tuning_table import X86_CONSTANTS

    assert vector_bytes("avx512vnni", 384, 1, cpu="znver4") == 64
    assert gemv_max_rows("avx2", "znver3") == 12 and gemv_max_rows("avx512vnni", "unknown-cpu") == 23
    rl = X86_CONSTANTS["rocketlake"]["pass_us"]
    for m in range(1, 24):
        pairs = block_pairs(m, "avx512vnni", "rocketlake")
        t = row_tile(m, pairs, "avx512vnni", "rocketlake")
        best = min(-(-m // tt) * us for (p, tt), us in rl.items())
        assert -(-m // t) * rl[(pairs, t)] == best


def test_sp2_lowering_does_not_change_the_x86_kernel():
    """``sp2_lowering="decode"`` is the portable schedule's product only (measured by
    ``bench.sp2_lowering``; schedules/cpu.py ``x86_replacement``): on x86 with AVX2 both
    lowerings get the same table-decode kernel, the attribute carried along."""
    from schedules.cpu import x86_replacement

    made = {}
    for lowering in ("shift", "decode"):
        func = row_group_func("dense", "t", "sp2_4", (1, 96), "int8", (8, 96), packed=True, sp2_lowering=lowering)
        made[lowering] = x86_replacement(func, _haswell())
        assert str(made[lowering].attrs["rmsmp.sp2_lowering"]) == lowering
        assert str(made[lowering].attrs["rmsmp.cpu_kernel"]) == "x86-avx2-table-decode"
    same = [f.with_attr("rmsmp.sp2_lowering", "either") for f in made.values()]
    tvm.ir.assert_structural_equal(same[0], same[1])


@pytest.mark.parametrize("mcpu,rows", [("haswell", 1), ("haswell", 64), ("cascadelake", 1), ("cascadelake", 64)])
def test_layer_kernels_decline_a_layer_past_the_bound(mcpu, rows):
    """The whole-layer kernels (batch-1 gemv, the outer-product layers of VNNI and AVX2) do not take a layer
    whose reduction their sums cannot hold: a warning, and the row groups keep their kernels
    (which fall back the same way); one step shorter, they take it."""
    from relay_passes.contract import DenseLayer
    from schedules.x86_bounds import KernelBoundWarning
    from schedules.x86_layers import x86_layer_kernels

    limit = 2**31 // (255 * 128)  # VNNI: uint8 activations (x' + 128 = x) x int8 rows
    kernels = x86_layer_kernels(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))

    def layer(k):
        groups = (("sp2_4", np.zeros((8, (k + 1) // 2), np.uint8), np.zeros(8), np.ones(8)),
                  ("fixed_8", np.zeros((8, k), np.int8), np.zeros(8), np.ones(8)))
        return DenseLayer((rows, k), "uint8", groups, (True, False))

    avx2_gemv = mcpu == "haswell" and rows == 1  # x' (-128..127) times int8 rows: products up to 128 * 128
    k_max = (2**31 - 1) // (128 * 128) if avx2_gemv else limit
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelBoundWarning)
        assert kernels.accepts(layer(k_max))
    with pytest.warns(KernelBoundWarning, match=rf"k = {k_max + 1} is too long"):
        assert not kernels.accepts(layer(k_max + 1))
