"""Structure of the graph passes, the TVM way: TVMScript Before/Expected + structural equality."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from relay_passes import FoldRowPermutation, RewriteRowGroups
from tvm_rmsmp.quant.schemes import get_scheme, sp2_encode

# Weights of a 3-row dense layer whose rows are fixed_4, sp2_4, fixed_4.
W = np.array([[1, -7, 3], [5, -8, 0], [-2, 6, 7]], np.int8)
B = np.array([10, -20, 30], np.int32)
S = np.array([0.5, 0.25, 0.125], np.float32)


def _bind(mod, **params):
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


def test_rewrite_row_groups_splits_by_scheme():
    @I.ir_module(s_tir=True)
    class Before:
        @T.prim_func(private=True, s_tir=True)
        def rmsmp_dense_fc(x: T.Buffer((2, 3), "uint8"), w: T.Buffer((3, 3), "int8"), bias: T.Buffer((3,), "int32"), scale: T.Buffer((3,), "float32"), out: T.Buffer((2, 3), "float32")):
            T.func_attr({"op_pattern": 8, "rmsmp.layer": "fc", "rmsmp.op": "dense", "rmsmp.row_schemes": ["fixed_4", "sp2_4", "fixed_4"], "tirx.noalias": True})
            acc = T.sblock_alloc_buffer((2, 3), "int32")
            for m, n, k in T.grid(2, 3, 3):
                with T.sblock("acc"):
                    v_m, v_n, v_k = T.axis.remap("SSR", [m, n, k])
                    T.reads(x[v_m, v_k], w[v_n, v_k])
                    T.writes(acc[v_m, v_n])
                    with T.init():
                        acc[v_m, v_n] = 0
                    acc[v_m, v_n] = acc[v_m, v_n] + T.Cast("int32", x[v_m, v_k]) * T.Cast("int32", w[v_n, v_k])
            for i0, i1 in T.grid(2, 3):
                with T.sblock("out"):
                    v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                    T.reads(acc[v_i0, v_i1], bias[v_i1], scale[v_i1])
                    T.writes(out[v_i0, v_i1])
                    out[v_i0, v_i1] = T.Cast("float32", acc[v_i0, v_i1] + bias[v_i1]) * scale[v_i1]

        @R.function
        def main(xq: R.Tensor((2, 3), "uint8"), w: R.Tensor((3, 3), "int8"), b: R.Tensor((3,), "int32"), s: R.Tensor((3,), "float32")) -> R.Tensor((2, 3), "float32"):
            cls = Before
            with R.dataflow():
                y = R.call_tir(cls.rmsmp_dense_fc, (xq, w, b, s), out_ty=R.Tensor((2, 3), "float32"))
                R.output(y)
            return y

    @I.ir_module(s_tir=True)
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def rmsmp_dense_fc_sp2_4(x: T.Buffer((2, 3), "uint8"), w: T.Buffer((1, 3), "int8"), bias: T.Buffer((1,), "int32"), scale: T.Buffer((1,), "float32"), out: T.Buffer((2, 1), "float32")):
            T.func_attr({"op_pattern": 8, "rmsmp.kind": "sp2", "rmsmp.layer": "fc", "rmsmp.op": "dense", "rmsmp.scheme": "sp2_4", "tirx.noalias": True})
            acc = T.sblock_alloc_buffer((2, 1), "int32")
            for m, n, k in T.grid(2, 1, 3):
                with T.sblock("acc"):
                    v_m, v_n, v_k = T.axis.remap("SSR", [m, n, k])
                    T.reads(x[v_m, v_k], w[v_n, v_k])
                    T.writes(acc[v_m, v_n])
                    with T.init():
                        acc[v_m, v_n] = 0
                    # two masked shifts, an add, a branch-free sign: no multiply
                    acc[v_m, v_n] = acc[v_m, v_n] + (((T.Cast("int32", x[v_m, v_k]) << (T.Cast("int32", w[v_n, v_k]) & 7) >> 1 & 0 - ((T.Cast("int32", w[v_n, v_k]) & 7) + 7 >> 3)) + (T.Cast("int32", x[v_m, v_k]) << (T.Cast("int32", w[v_n, v_k]) >> 3 & 7) >> 1 & 0 - ((T.Cast("int32", w[v_n, v_k]) >> 3 & 7) + 7 >> 3)) ^ 0 - (T.Cast("int32", w[v_n, v_k]) >> 6 & 1)) + (T.Cast("int32", w[v_n, v_k]) >> 6 & 1))
            for i0, i1 in T.grid(2, 1):
                with T.sblock("out"):
                    v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                    T.reads(acc[v_i0, v_i1], bias[v_i1], scale[v_i1])
                    T.writes(out[v_i0, v_i1])
                    out[v_i0, v_i1] = T.Cast("float32", acc[v_i0, v_i1] + bias[v_i1]) * scale[v_i1]

        @T.prim_func(private=True, s_tir=True)
        def rmsmp_dense_fc_fixed_4(x: T.Buffer((2, 3), "uint8"), w: T.Buffer((2, 3), "int8"), bias: T.Buffer((2,), "int32"), scale: T.Buffer((2,), "float32"), out: T.Buffer((2, 2), "float32")):
            T.func_attr({"op_pattern": 8, "rmsmp.kind": "fixed", "rmsmp.layer": "fc", "rmsmp.op": "dense", "rmsmp.scheme": "fixed_4", "tirx.noalias": True})
            acc = T.sblock_alloc_buffer((2, 2), "int32")
            for m, n, k in T.grid(2, 2, 3):
                with T.sblock("acc"):
                    v_m, v_n, v_k = T.axis.remap("SSR", [m, n, k])
                    T.reads(x[v_m, v_k], w[v_n, v_k])
                    T.writes(acc[v_m, v_n])
                    with T.init():
                        acc[v_m, v_n] = 0
                    acc[v_m, v_n] = acc[v_m, v_n] + T.Cast("int32", x[v_m, v_k]) * T.Cast("int32", w[v_n, v_k])
            for i0, i1 in T.grid(2, 2):
                with T.sblock("out"):
                    v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                    T.reads(acc[v_i0, v_i1], bias[v_i1], scale[v_i1])
                    T.writes(out[v_i0, v_i1])
                    out[v_i0, v_i1] = T.Cast("float32", acc[v_i0, v_i1] + bias[v_i1]) * scale[v_i1]

        @R.function
        def main(xq: R.Tensor((2, 3), "uint8"), w_sp2: R.Tensor((1, 3), "int8"), b_sp2: R.Tensor((1,), "int32"), s_sp2: R.Tensor((1,), "float32"), w_fx: R.Tensor((2, 3), "int8"), b_fx: R.Tensor((2,), "int32"), s_fx: R.Tensor((2,), "float32"), inverse: R.Tensor((3,), "int64")) -> R.Tensor((2, 3), "float32"):
            cls = Expected
            with R.dataflow():
                g0 = R.call_tir(cls.rmsmp_dense_fc_sp2_4, (xq, w_sp2, b_sp2, s_sp2), out_ty=R.Tensor((2, 1), "float32"))
                g1 = R.call_tir(cls.rmsmp_dense_fc_fixed_4, (xq, w_fx, b_fx, s_fx), out_ty=R.Tensor((2, 2), "float32"))
                c = R.concat((g0, g1), axis=1)
                y = R.take(c, inverse, axis=1, mode="clip")
                R.output(y)
            return y

    after = RewriteRowGroups()(_bind(Before, w=W, b=B, s=S))
    fx = [0, 2]
    expected = _bind(
        Expected,
        w_sp2=sp2_encode(W[[1]], get_scheme("sp2_4")).astype(np.int8), b_sp2=B[[1]], s_sp2=S[[1]],
        w_fx=W[fx], b_fx=B[fx], s_fx=S[fx],
        inverse=np.array([1, 0, 2], np.int64),  # rows are [sp2: 1 | fixed: 0, 2] -> model row r is at inverse[r]
    )
    tvm.ir.assert_structural_equal(after, expected)


W2 = np.arange(12, dtype=np.int8).reshape(4, 3)
B2 = np.zeros(4, np.int32)
S2 = np.ones(4, np.float32)
INVERSE = np.array([1, 0, 2], np.int64)
ORDER = np.argsort(INVERSE)  # c[:, i] == y[:, ORDER[i]]


def test_fold_row_permutation_into_next_layer():
    @I.ir_module(s_tir=True)
    class Before:
        @T.prim_func(private=True, s_tir=True)
        def consumer(x: T.Buffer((2, 3), "uint8"), w: T.Buffer((4, 3), "int8"), bias: T.Buffer((4,), "int32"), scale: T.Buffer((4,), "float32"), out: T.Buffer((2, 4), "float32")):
            T.func_attr({"op_pattern": 8, "rmsmp.kind": "fixed", "rmsmp.layer": "next", "rmsmp.op": "dense", "rmsmp.scheme": "fixed_8", "tirx.noalias": True})
            for m, n in T.grid(2, 4):
                with T.sblock("out"):
                    v_m, v_n = T.axis.remap("SS", [m, n])
                    out[v_m, v_n] = T.Cast("float32", x[v_m, 0]) * scale[v_n]

        @R.function
        def main(a: R.Tensor((2, 1), "float32"), b: R.Tensor((2, 2), "float32"), inverse: R.Tensor((3,), "int64"), w: R.Tensor((4, 3), "int8"), bias: R.Tensor((4,), "int32"), scale: R.Tensor((4,), "float32")) -> R.Tensor((2, 4), "float32"):
            cls = Before
            with R.dataflow():
                c = R.concat((a, b), axis=1)
                y = R.take(c, inverse, axis=1, mode="clip")
                r = R.nn.relu(y)
                m = R.multiply(r, R.const(2.0, "float32"))
                q = R.round(m)
                cl = R.clip(q, T.float64(0.0), T.float64(255.0))
                xq = R.astype(cl, dtype="uint8")
                z = R.call_tir(cls.consumer, (xq, w, bias, scale), out_ty=R.Tensor((2, 4), "float32"))
                R.output(z)
            return z

    @I.ir_module(s_tir=True)
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def consumer(x: T.Buffer((2, 3), "uint8"), w: T.Buffer((4, 3), "int8"), bias: T.Buffer((4,), "int32"), scale: T.Buffer((4,), "float32"), out: T.Buffer((2, 4), "float32")):
            T.func_attr({"op_pattern": 8, "rmsmp.kind": "fixed", "rmsmp.layer": "next", "rmsmp.op": "dense", "rmsmp.scheme": "fixed_8", "tirx.noalias": True})
            for m, n in T.grid(2, 4):
                with T.sblock("out"):
                    v_m, v_n = T.axis.remap("SS", [m, n])
                    out[v_m, v_n] = T.Cast("float32", x[v_m, 0]) * scale[v_n]

        @R.function
        def main(a: R.Tensor((2, 1), "float32"), b: R.Tensor((2, 2), "float32"), w: R.Tensor((4, 3), "int8"), bias: R.Tensor((4,), "int32"), scale: R.Tensor((4,), "float32")) -> R.Tensor((2, 4), "float32"):
            cls = Expected
            with R.dataflow():
                c = R.concat((a, b), axis=1)
                r = R.nn.relu(c)
                m = R.multiply(r, R.const(2.0, "float32"))
                q = R.round(m)
                cl = R.clip(q, T.float64(0.0), T.float64(255.0))
                xq = R.astype(cl, dtype="uint8")
                z = R.call_tir(cls.consumer, (xq, w, bias, scale), out_ty=R.Tensor((2, 4), "float32"))
                R.output(z)
            return z

    fold = FoldRowPermutation()
    after = fold(_bind(Before, inverse=INVERSE, w=W2, bias=B2, scale=S2))
    expected = _bind(Expected, w=np.ascontiguousarray(W2[:, ORDER]), bias=B2, scale=S2)
    tvm.ir.assert_structural_equal(after, expected)
    assert fold.last_stats == {"folded": 1, "kept": 0}


def test_fold_gives_a_layer_output_its_order_back_where_it_meets_model_order():
    """A residual add of a layer's output (its row groups as they come) and a tensor in model
    order: the layer output gets its order back, the one gather a target can fold into the
    layer's kernel; nothing after it carries an order."""

    @I.ir_module(s_tir=True)
    class Before:
        @R.function
        def main(a: R.Tensor((2, 1), "float32"), b: R.Tensor((2, 2), "float32"), skip: R.Tensor((2, 3), "float32"), inverse: R.Tensor((3,), "int64")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                c = R.concat((a, b), axis=1)
                y = R.take(c, inverse, axis=1, mode="clip")
                s = R.add(y, skip)
                r = R.nn.relu(s)
                R.output(r)
            return r

    fold = FoldRowPermutation()
    after = fold(_bind(Before, inverse=INVERSE))
    tvm.ir.assert_structural_equal(after, _bind(Before, inverse=INVERSE))
    assert fold.last_stats == {"folded": 0, "kept": 1}


def test_fold_keeps_one_gather_where_orders_meet():
    """A permuted tensor that is no longer a layer's bare output (after a ReLU) meets one in
    model order: gather the latter once, keep the permutation flowing; what leaves the dataflow
    block gets the model order back."""

    @I.ir_module(s_tir=True)
    class Before:
        @R.function
        def main(a: R.Tensor((2, 1), "float32"), b: R.Tensor((2, 2), "float32"), skip: R.Tensor((2, 3), "float32"), inverse: R.Tensor((3,), "int64")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                c = R.concat((a, b), axis=1)
                y = R.take(c, inverse, axis=1, mode="clip")
                h = R.nn.relu(y)
                s = R.add(h, skip)
                r = R.nn.relu(s)
                R.output(r)
            return r

    @I.ir_module(s_tir=True)
    class Expected:
        @R.function
        def main(a: R.Tensor((2, 1), "float32"), b: R.Tensor((2, 2), "float32"), skip: R.Tensor((2, 3), "float32"), order: R.Tensor((3,), "int64"), inverse: R.Tensor((3,), "int64")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                c = R.concat((a, b), axis=1)
                h = R.nn.relu(c)
                skip_p = R.take(skip, order, axis=1, mode="clip")
                s = R.add(h, skip_p)
                s_model_order = R.take(s, inverse, axis=1, mode="clip")
                r = R.nn.relu(s_model_order)
                R.output(r)
            return r

    fold = FoldRowPermutation()
    after = fold(_bind(Before, inverse=INVERSE))
    expected = _bind(Expected, order=ORDER.astype(np.int64), inverse=INVERSE)
    tvm.ir.assert_structural_equal(after, expected)
    assert fold.last_stats == {"folded": 0, "kept": 2}


def test_fold_permutes_per_channel_constants_and_flattens():
    """NCHW: a per-channel bias add and a flatten carry the permutation (as a block permutation)."""
    bias_c = np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 3, 1, 1)

    @I.ir_module(s_tir=True)
    class Before:
        @R.function
        def main(c: R.Tensor((1, 3, 2, 2), "float32"), inverse: R.Tensor((3,), "int64"), bias: R.Tensor((1, 3, 1, 1), "float32")) -> R.Tensor((1, 12), "float32"):
            with R.dataflow():
                y = R.take(c, inverse, axis=1, mode="clip")
                s = R.add(y, bias)
                f = R.reshape(s, R.shape([1, 12]))
                out = R.take(f, R.const(np.arange(12, dtype="int64")), axis=1)
                R.output(out)
            return out

    fold = FoldRowPermutation()
    after = fold(_bind(Before, inverse=INVERSE, bias=bias_c))
    # run both on numbers: same result; and the bias constant was permuted, not gathered at runtime
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 2)).astype(np.float32)
    ref = (x[:, INVERSE] + bias_c).reshape(1, 12)
    exe = tvm.compile(after, target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, ref)
    text = after.script()
    assert text.count("R.take") == 2  # the restore before the output + the identity take
    assert fold.last_stats["kept"] == 1


def test_pack_four_bit_rows_halves_weight_bytes_and_keeps_results(small_resnet):
    import torch

    import tvm_rmsmp as rmsmp
    from relay_passes import PackFourBitRows
    from tvm_rmsmp.compiler.frontend import import_model

    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    x = torch.randn(2, 1, 16, 16)
    mod = FoldRowPermutation()(RewriteRowGroups()(import_model(q, (x,))))
    pack = PackFourBitRows()
    packed = pack(mod)

    def weight_bytes(m, bits):
        total = 0
        for gv, f in m.functions.items():
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "rmsmp.scheme" in f.attrs:
                if get_scheme(str(f.attrs["rmsmp.scheme"])).bits == bits:
                    w = f.params[1]
                    n = 1
                    for d in w.shape:
                        n *= int(d)
                    total += n * tvm.DataType(w.dtype).bits // 8
        return total

    assert pack.last_packed == 12  # sp2_4 and fixed_4 groups of 6 layers
    assert weight_bytes(packed, 4) * 2 <= weight_bytes(mod, 4) + 64  # odd lengths round up
    assert weight_bytes(packed, 8) == weight_bytes(mod, 8)
    assert "rmsmp.packed" in packed.script()
    target = tvm.target.Target({"kind": "llvm"})
    run = lambda m: relax.VirtualMachine(tvm.compile(m, target=target), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))  # noqa: E731
    np.testing.assert_array_equal(run(packed)[0].numpy(), run(mod)[0].numpy())


def test_fold_carries_the_permutation_through_layer_norm():
    """LayerNorm over the channels: gamma and beta permuted at compile time, no gather before
    it; the values match the model-order LayerNorm up to float rounding."""
    gamma = np.array([1.0, 2.0, 3.0], np.float32)
    beta = np.array([0.5, -0.5, 0.25], np.float32)

    @I.ir_module(s_tir=True)
    class Before:
        @R.function
        def main(c: R.Tensor((2, 3), "float32"), inverse: R.Tensor((3,), "int64"), g: R.Tensor((3,), "float32"),
                 b: R.Tensor((3,), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                y = R.take(c, inverse, axis=1, mode="clip")
                n = R.nn.layer_norm(y, g, b, axes=[-1])
                r = R.nn.relu(n)
                R.output(r)
            return r

    @I.ir_module(s_tir=True)
    class Expected:
        @R.function
        def main(c: R.Tensor((2, 3), "float32"), inverse: R.Tensor((3,), "int64"), g: R.Tensor((3,), "float32"),
                 b: R.Tensor((3,), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                n = R.nn.layer_norm(c, g, b, axes=[-1])
                n_model_order = R.take(n, inverse, axis=1, mode="clip")
                r = R.nn.relu(n_model_order)
                R.output(r)
            return r

    fold = FoldRowPermutation()
    after = fold(_bind(Before, inverse=INVERSE, g=gamma, b=beta))
    expected = _bind(Expected, inverse=INVERSE, g=gamma[ORDER], b=beta[ORDER])
    tvm.ir.assert_structural_equal(after, expected)
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    y = x[:, INVERSE].astype(np.float64)
    ref = np.maximum((y - y.mean(1, keepdims=True)) / np.sqrt(y.var(1, keepdims=True) + 1e-5) * gamma + beta, 0)
    exe = tvm.compile(after, target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert fold.last_stats == {"folded": 0, "kept": 1}
