"""The graph passes that put a target's kernels in place (FuseDenseLayers, UseTargetKernels):
Before / Expected modules compared structurally, and the rewritten modules run against numpy.

The targets here are stand-ins written in TE for the test (a plain dense kernel over the
layer's weights in output order; a dense kernel that reads transposed weights), so the tests
say what the passes do independently of any x86 kernel."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te

from conftest import np_conv_acc, np_dense_acc
from relay_passes import FuseDenseLayers, UseTargetKernels, contract
from relay_passes.rewrite_row_groups import row_group_func
from tvm_rmsmp.quant.schemes import get_scheme

M, K = 2, 8
ROWS = (3, 2)  # rows of the two groups
PERM = np.array([3, 0, 4, 1, 2])  # the gather restoring the model's row order


def _consts(seed):
    rng = np.random.default_rng(seed)
    groups = []
    for i, n in enumerate(ROWS):
        w = rng.integers(-128, 128, (n, K)).astype(np.int8)
        groups.append((w, rng.integers(-50, 50, n).astype(np.int32), rng.uniform(0.5, 2, n).astype(np.float32)))
    return groups


def _x_var():
    return relax.Var("x", relax.TensorType([M, K], "int8"))


def _before(groups, gather=True, kernel=None, layout=lambda w: w):
    """The passes' output for one dense layer of two fixed_8 groups; ``kernel(rows)`` and
    ``layout(w)`` give other group functions and weight constants (an expected module)."""
    bb = relax.BlockBuilder()
    x = _x_var()
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = []
            for i, (w, b, s) in enumerate(groups):
                func = kernel(w.shape[0]) if kernel else row_group_func("dense", "fc", "fixed_8", [M, K], "int8",
                                                                      list(w.shape))
                gv = bb.add_func(func, f"g{i}")
                outs.append(bb.emit(relax.call_tir(gv, [x, relax.const(np.ascontiguousarray(layout(w)), "int8"),
                                                        relax.const(b, "int32"), relax.const(s, "float32")],
                                                   relax.TensorType([M, w.shape[0]], "float32"))))
            y = bb.emit(relax.op.concat(outs, axis=1))
            if gather:
                y = bb.emit(relax.op.take(y, relax.const(PERM.astype("int64"), "int64"), axis=1, mode="clip"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _stand_in_dense(n, transposed=False, **attrs):
    """A stand-in target kernel: int8 x int8 sums over ``n`` outputs and the contract's
    epilogue, reading its weights as ``[n, K]`` (or ``[K, n]``, ``transposed``)."""
    x = te.placeholder((M, K), "int8", name="x")
    w = te.placeholder((K, n) if transposed else (n, K), "int8", name="w")
    b = te.placeholder((n,), "int32", name="bias")
    s = te.placeholder((n,), "float32", name="scale")
    k = te.reduce_axis((0, K), "k")
    weight = (lambda j: w[k, j]) if transposed else (lambda j: w[j, k])
    acc = te.compute((M, n), lambda i, j: te.sum(x[i, k].astype("int32") * weight(j).astype("int32"), axis=k),
                     name="acc")
    out = te.compute((M, n), lambda i, j: (acc[i, j] + b[j]).astype("float32") * s[j], name="out")
    return te.create_prim_func([x, w, b, s, out]).without_attr("global_symbol").with_attrs(
        {contract.OP: "dense", "tirx.is_scheduled": True, **attrs})


def _plain_dense(n):
    return _stand_in_dense(n, **{contract.SCHEMES: ["fixed_8", "fixed_8"]})


def _layer_kernels(accept=True):
    def build(layer, order):
        w = np.stack([layer.groups[g][1][r] for g, r in order])
        b = np.array([layer.groups[g][2][r] for g, r in order], np.int32)
        s = np.array([layer.groups[g][3][r] for g, r in order], np.float32)
        return ("dense", len(order)), "layer_kernel", lambda: _plain_dense(len(order)), \
            [(w, "int8"), (b, "int32"), (s, "float32")]

    return contract.LayerKernels(accepts=lambda layer: accept, build=build)


def _expected_fused(groups, order):
    bb = relax.BlockBuilder()
    x = _x_var()
    w = np.stack([groups[g][0][r] for g, r in order])
    b = np.array([groups[g][1][r] for g, r in order], np.int32)
    s = np.array([groups[g][2][r] for g, r in order], np.float32)
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(_plain_dense(len(order)), "layer_kernel")
            y = bb.emit(relax.call_tir(gv, [x, relax.const(w, "int8"), relax.const(b, "int32"),
                                            relax.const(s, "float32")], relax.TensorType([M, len(order)], "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x):
    exe = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _reference(groups, x, order):
    w = np.concatenate([g[0] for g in groups])
    b = np.concatenate([g[1] for g in groups])
    s = np.concatenate([g[2] for g in groups])
    y = (np_dense_acc(x, w) + b).astype(np.float32) * s
    return y[:, order]


CONCAT_ORDER = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


@pytest.mark.parametrize("gather", [False, True], ids=["concat", "concat+gather"])
def test_fuse_dense_layers_replaces_the_groups_by_one_kernel(gather):
    groups = _consts(1)
    order = [CONCAT_ORDER[i] for i in PERM] if gather else CONCAT_ORDER
    fuse = FuseDenseLayers(_layer_kernels())
    after = fuse(_before(groups, gather))
    assert fuse.last_fused == 1
    tvm.ir.assert_structural_equal(after, _expected_fused(groups, order))
    x = np.random.default_rng(2).integers(-128, 128, (M, K)).astype(np.int8)
    want = _reference(groups, x, PERM if gather else np.arange(sum(ROWS)))
    np.testing.assert_array_equal(_run(after, x), want)
    np.testing.assert_array_equal(_run(_before(groups, gather), x), want)  # the reference itself


def test_fuse_dense_layers_leaves_layers_the_target_refuses():
    before = _before(_consts(3))
    fuse = FuseDenseLayers(_layer_kernels(accept=False))
    after = fuse(before)
    assert fuse.last_fused == 0
    tvm.ir.assert_structural_equal(after, before)


def _transposed_dense(n):
    return _stand_in_dense(n, transposed=True, **{contract.SCHEME: "fixed_8", contract.KIND: "fixed",
                                                  contract.LAYER: "fc", contract.CPU_KERNEL: "transposed"})


def test_use_target_kernels_swaps_kernels_and_lays_out_their_weights():
    groups = _consts(4)
    use = UseTargetKernels(lambda func: (_transposed_dense(int(func.params[1].shape[0])), np.transpose))
    after = use(_before(groups))
    assert use.last_replaced == 2
    tvm.ir.assert_structural_equal(after, _before(groups, kernel=_transposed_dense, layout=np.transpose))
    x_val = np.random.default_rng(5).integers(-128, 128, (M, K)).astype(np.int8)
    np.testing.assert_array_equal(_run(after, x_val), _reference(groups, x_val, PERM))


def test_use_target_kernels_leaves_groups_without_a_kernel():
    before = _before(_consts(6))
    use = UseTargetKernels(lambda func: None)
    tvm.ir.assert_structural_equal(use(before), before)
    assert use.last_replaced == 0


CONV_X, CONV_ROWS = (1, 4, 6, 6), (3, 2)  # activations (already padded), rows of the sp2_4 / fixed_8 groups
CONV = {"strides": [2, 2], "padding": [0, 0], "dilation": [1, 1]}


def _conv_module(funcs_and_consts, out_rows):
    """main(x) = concat over the channels of one call per (PrimFunc, constants), or one call."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(CONV_X), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = []
            for i, (func, consts, rows) in enumerate(funcs_and_consts):
                gv = bb.add_func(func, f"g{i}" if len(funcs_and_consts) > 1 else "layer_kernel")
                outs.append(bb.emit(relax.call_tir(gv, [x] + [relax.const(a, d) for a, d in consts],
                                                   relax.TensorType([1, rows, 2, 2], "float32"))))
            y = bb.emit(relax.op.concat(outs, axis=1)) if len(outs) > 1 else outs[0]
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _stand_in_conv(n):
    """A stand-in conv layer kernel: the portable fixed_8 row group over int8 weights in output order."""
    func = row_group_func("conv2d", "conv", "fixed_8", list(CONV_X), "uint8", [n, CONV_X[1], 3, 3], CONV)
    return func.with_attrs({contract.SCHEMES: ["sp2_4", "fixed_8"], "tirx.is_scheduled": True})


@pytest.mark.parametrize("convs", [False, True])
def test_fuse_dense_layers_fuses_conv_layers_where_the_target_takes_them(convs):
    """A conv2d layer's row groups joined along the channels become one kernel call (in the
    concatenation's order) only where ``LayerKernels.convs`` says the target takes conv layers;
    the layer it is handed has the geometry, the kernel size also for packed 4-bit groups."""
    rng = np.random.default_rng(5)
    levels = [rng.choice(get_scheme("sp2_4").levels, (CONV_ROWS[0], CONV_X[1], 3, 3)).astype(np.int8),
              rng.integers(-128, 128, (CONV_ROWS[1], CONV_X[1], 3, 3)).astype(np.int8)]
    stored = [contract.packed_weight(levels[0].reshape(CONV_ROWS[0], -1), "sp2_4"), levels[1]]
    bias = [rng.integers(-50, 50, n).astype(np.int32) for n in CONV_ROWS]
    scale = [rng.uniform(0.5, 2, n).astype(np.float32) for n in CONV_ROWS]
    funcs = [row_group_func("conv2d", "conv", "sp2_4", list(CONV_X), "uint8", [CONV_ROWS[0], CONV_X[1], 3, 3], CONV,
                            packed=True),
             row_group_func("conv2d", "conv", "fixed_8", list(CONV_X), "uint8", [CONV_ROWS[1], CONV_X[1], 3, 3], CONV)]
    before = _conv_module([(f, [(w, str(w.dtype)), (b, "int32"), (s, "float32")], n)
                           for f, w, b, s, n in zip(funcs, stored, bias, scale, CONV_ROWS)], sum(CONV_ROWS))
    seen = []

    def build(layer, order):
        w = np.concatenate(levels)[[sum(CONV_ROWS[:g]) + r for g, r in order]]
        b = np.array([layer.groups[g][2][r] for g, r in order], np.int32)
        s = np.array([layer.groups[g][3][r] for g, r in order], np.float32)
        return ("conv", len(order)), "layer_kernel", lambda: _stand_in_conv(len(order)), \
            [(w, "int8"), (b, "int32"), (s, "float32")]

    fuse = FuseDenseLayers(contract.LayerKernels(accepts=lambda layer: seen.append(layer) or True, build=build,
                                                 convs=convs))
    after = fuse(before)
    if not convs:
        assert fuse.last_fused == 0 and not seen
        tvm.ir.assert_structural_equal(after, before)
        return
    assert fuse.last_fused == 1
    layer = seen[0]
    assert (layer.x_shape, layer.x_dtype, layer.kernel, layer.strides, layer.packed, layer.out_shape) == (
        CONV_X, "uint8", (3, 3), (2, 2), (True, False), (1, 5, 2, 2))
    order = layer.concat_order
    expected = _conv_module([(_stand_in_conv(5), [(np.concatenate(levels), "int8"), (np.concatenate(bias), "int32"),
                                                   (np.concatenate(scale), "float32")], 5)], 5)
    tvm.ir.assert_structural_equal(after, expected)
    assert order == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    x = rng.integers(0, 256, CONV_X).astype(np.uint8)
    want = (np_conv_acc(x, np.concatenate(levels), (2, 2), (0, 0), (1, 1)) + np.concatenate(bias)[None, :, None, None]
            ).astype(np.float32) * np.concatenate(scale)[None, :, None, None]
    np.testing.assert_array_equal(_run(after, x), want)
    np.testing.assert_array_equal(_run(before, x), want)
