"""Kernel-sparse convolutions (SparsifyConvs -> schedules/cpu_sparse_conv.py): integer-exact
against numpy for pattern + connectivity and block-punched 3x3 weights, every scheme's levels,
signed and unsigned activations, stride 1 and 2, batch 1 and more; the pass's IR; the contract."""

import warnings

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvm_rmsmp as rmsmp
from relay_passes import SparsifyConvs, contract
from relay_passes.sparsify_convs import conv_pattern_func, conv_quads
from schedules.cpu_sparse_conv import conv_pattern_kernel
from tvm_rmsmp.quant.schemes import get_scheme

AVX2_TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2 without AVX-512: the portable kernel


# ----- independent references -------------------------------------------------------------------
def _np_conv(x, w, stride):
    """int64 convolution of an already padded ``x [N, C, Hp, Wp]`` with ``w [F, C, kh, kw]``."""
    f, _, kh, kw = w.shape
    oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    acc = np.zeros((x.shape[0], f, oh, ow), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            xs = x[:, :, ky:ky + stride * (oh - 1) + 1:stride, kx:kx + stride * (ow - 1) + 1:stride].astype(np.int64)
            acc += np.einsum("nchw,fc->nfhw", xs, w[:, :, ky, kx].astype(np.int64))
    return acc


def _pattern_weight(rng, scheme, f, c, kept_kernels=0.6):
    """Levels of ``scheme`` where each kept kernel has 4 non-zero taps of one of 6 patterns (all
    with the centre) and a share of kernels is removed; row 0 has no kernel at all."""
    levels = get_scheme(scheme).levels
    nonzero = levels[levels != 0]
    pats = np.array([[0, 1, 3, 4], [1, 4, 5, 7], [4, 5, 7, 8], [1, 3, 4, 5], [3, 4, 5, 7], [2, 4, 6, 8]])
    w = np.zeros((f, c, 9), np.int8)
    which = rng.integers(0, len(pats), (f, c))
    keep = rng.random((f, c)) < kept_kernels
    keep[0] = False
    for r in range(f):
        for ch in range(c):
            if keep[r, ch]:
                w[r, ch, pats[which[r, ch]]] = rng.choice(nonzero, 4)
    w[1, 0, :] = 0
    w[1, 0, [0, 4]] = nonzero[:2]  # a kernel with 2 taps (levels rounded to 0)
    if f > 2 and c > 1:
        w[2, 1, :] = rng.choice(nonzero, 9)  # a dense kernel: 3 quads
    return w.reshape(f, c, 3, 3)


def _punched_weight(rng, scheme, f, c):
    """Block-punched 3x3 levels (blocks of 4 rows x 2 channels share their kept positions)."""
    levels = get_scheme(scheme).levels
    w = rng.choice(levels, (f, c, 9)).astype(np.int8)
    keep = rng.random((-(-f // 4), -(-c // 2), 9)) < 0.3
    return (w * np.repeat(np.repeat(keep, 4, 0), 2, 1)[:f, :c]).reshape(f, c, 3, 3)


def test_conv_quads_round_trip():
    rng = np.random.default_rng(0)
    for w in (_pattern_weight(rng, "fixed_8", 12, 5), _punched_weight(rng, "sp2_4", 10, 6)):
        lv, qplane, rptr, pchan, ptaps = conv_quads(w)
        back = np.zeros((w.shape[0], w.shape[1], 9), np.int64)
        for r in range(w.shape[0]):
            assert np.all(np.diff(qplane[rptr[r]:rptr[r + 1]]) > 0), "a row's quads in plane order, one per plane"
            for j in range(rptr[r], rptr[r + 1]):
                for t in range(4):
                    back[r, pchan[qplane[j]], ptaps[qplane[j], t]] += lv[j, t]
        np.testing.assert_array_equal(back.reshape(w.shape), w)
        assert len(set(map(tuple, np.c_[pchan, ptaps]))) == len(pchan), "planes are distinct"
    # a pattern-pruned layer: one quad per kept kernel of 4 taps, none for a removed one
    w = _pattern_weight(rng, "fixed_4", 8, 4)
    w[1, 0], w[2, 1] = 0, 0
    lv, qplane, rptr, _, _ = conv_quads(w)
    assert len(lv) == np.count_nonzero(np.any(w.reshape(8, 4, 9) != 0, axis=2))
    assert rptr[1] == 0, "row 0 has no kernel"


KERNEL_CASES = {  # target -> [(n, c, h, f, stride, x dtype, scheme, form)]; one build per target
    "host": [(1, 8, 10, 20, 1, "int8", "sp2_4", "pattern"), (2, 5, 9, 16, 2, "uint8", "fixed_8", "pattern"),
             (1, 6, 7, 33, 2, "int8", "fixed_4", "punched"), (3, 4, 12, 8, 1, "uint8", "sp2_4", "punched")],
    "avx2": [(1, 8, 10, 20, 1, "int8", "fixed_8", "pattern"), (2, 5, 9, 17, 2, "uint8", "fixed_4", "punched")],
}


@pytest.mark.parametrize("where", sorted(KERNEL_CASES))
def test_conv_pattern_kernel_exact(where):
    """Each case's kernel (and, on the host, the op's own plain loops once) against numpy."""
    target = rmsmp.resolve_target("llvm") if where == "host" else tvm.target.Target(AVX2_TARGET)
    funcs, runs = {}, []
    for ci, (n, c, h, f, stride, x_dtype, scheme, form) in enumerate(KERNEL_CASES[where]):
        rng = np.random.default_rng(100 + ci)
        w = _pattern_weight(rng, scheme, f, c) if form == "pattern" else _punched_weight(rng, scheme, f, c)
        hp = h + 2  # the quantizer pads; the op sees the padded tensor
        lo, hi = (-128, 128) if x_dtype == "int8" else (0, 256)
        x = rng.integers(lo, hi, (n, c, hp, hp)).astype(x_dtype)
        x[:, :, 0, :] = 0  # padding rows as the quantizer writes them
        bias = rng.integers(-1000, 1000, f).astype(np.int32)
        scale = rng.random(f).astype(np.float32)
        ref = (_np_conv(x, w, stride) + bias[None, :, None, None]).astype(np.float32) * scale[None, :, None, None]
        lv, qplane, rptr, pchan, ptaps = conv_quads(w)
        wsum = w.reshape(f, -1).astype(np.int64).sum(1).astype(np.int32)
        func = conv_pattern_func(x.shape, f, 3, 3, [stride, stride], len(lv), len(pchan), x_dtype, "conv",
                                 [scheme] * f)
        kernel = conv_pattern_kernel(func, target)
        if where == "avx2":
            assert str(kernel.attrs[contract.CPU_KERNEL]) == "conv-pattern"
        arrays = (x, lv, qplane, rptr, pchan, ptaps, wsum, bias, scale)
        funcs[f"k{ci}"] = kernel.with_attr("global_symbol", f"k{ci}")
        runs.append((f"k{ci}", arrays, ref))
        if where == "host" and ci == 0:  # the op's own plain loops (what a target without a kernel runs)
            funcs["plain"] = func.with_attr("global_symbol", "plain")
            runs.append(("plain", arrays, ref))
    exe = tvm.compile(tvm.IRModule(funcs), target=target)
    for name, arrays, ref in runs:
        args = [tvm.runtime.tensor(a) for a in arrays + (np.zeros(ref.shape, np.float32),)]
        exe.mod[name](*args)
        np.testing.assert_array_equal(args[-1].numpy(), ref, err_msg=name)


# ----- whole models: prune -> quantize -> compile, against numpy --------------------------------
class _Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 16, 3, 1, 1)
        self.conv2 = torch.nn.Conv2d(16, 24, 3, 2, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def _np_conv_layer(layer, x):
    """The integer contract of one RMSMP conv layer in numpy (symmetric activations)."""
    assert layer.act_zero_point is None
    inv = np.float32(layer.inv_act_scale)
    xq = np.clip(np.rint(x.astype(np.float32) * inv), layer.qmin, layer.qmax).astype(np.int64)
    ph, pw = layer.padding
    xq = np.pad(xq, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    acc = _np_conv(xq, layer.weight_int.numpy(), layer.stride[0])
    return (acc + layer.bias_int.numpy()[None, :, None, None]).astype(np.float32) \
        * layer.out_scale.numpy()[None, :, None, None]


def test_pruned_conv_model_exact():
    torch.manual_seed(0)
    model = _Convs().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 8, 10, 10, generator=g)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = rmsmp.prune(model, rmsmp.PruneConfig(scheme="pattern", sparsity=0.75))
        q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(ratio={"sp2_4": 0.6, "fixed_4": 0.3, "fixed_8": 0.1},
                                                 assign="variance"), calib_data=calib)
    for batch in (2,):  # batch 1 and more: the kernel tests
        x = torch.randn(batch, 8, 10, 10, generator=g)
        exe = rmsmp.compile(q, (x,), target="llvm")
        assert set(exe.stats["sparse"]) == {"conv1", "conv2"}
        assert all(st["op"] == contract.CONV_PATTERN and st["density"] <= 0.5 for st in exe.stats["sparse"].values())
        assert sum(v for k, v in exe.stats["cpu_kernels"].items() if "conv-pattern" in k) == 2
        h = np.maximum(_np_conv_layer(q.conv1, x.numpy()), 0)  # conv2's input: unsigned activations
        np.testing.assert_array_equal(exe(x), _np_conv_layer(q.conv2, h))


def test_pruned_fixed_point_convs_stay_dense_and_exact():
    """The kernel-sparse op has the float epilogue only: layers of RMSMPConfig(requant="fixed_point")
    keep the dense op (its integer epilogue), and the build equals the torch reference."""
    torch.manual_seed(0)
    model = _Convs().eval()
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(4, 8, 10, 10, generator=g)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = rmsmp.prune(model, rmsmp.PruneConfig(scheme="pattern", sparsity=0.75))
        q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(assign="variance", requant="fixed_point"), calib_data=calib)
    x = torch.randn(2, 8, 10, 10, generator=g)
    exe = rmsmp.compile(q, (x,), target="llvm")
    assert exe.stats["sparse"] == {}
    with torch.no_grad():
        np.testing.assert_array_equal(exe(x), q(x).numpy())


# ----- the pass's IR and the contract -----------------------------------------------------------
def _quantized_conv_module(w, x_shape, stride):
    """main(x int8 [padded]) = one quantized conv2d op with weight ``w`` (as the frontend emits it)."""
    from relay_passes import ops

    f = w.shape[0]
    attrs = ops.rmsmp_attrs("conv2d", "conv", **{contract.ROW_SCHEMES: ["fixed_8"] * f})
    attrs[contract.CONV] = {"strides": [stride, stride], "padding": [0, 0], "dilation": [1, 1]}
    qfunc = ops.conv2d_func(x_shape, "int8", list(w.shape), "int8", [stride, stride], (0, 0), (1, 1),
                            ops.fixed_product, attrs)
    oh = (x_shape[2] - 3) // stride + 1
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(x_shape), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(qfunc, "rmsmp_conv2d_conv")
            y = bb.emit_output(relax.call_tir(gv, [x, relax.const(w, "int8"), relax.const(np.zeros(f, np.int32)),
                                                   relax.const(np.ones(f, np.float32))],
                                              relax.TensorType([x_shape[0], f, oh, oh], "float32")))
        bb.emit_func_output(y)
    return bb.get()


def test_sparsify_convs_structure_and_contract():
    rng = np.random.default_rng(3)
    w = _pattern_weight(rng, "fixed_8", 16, 8)
    mod = _quantized_conv_module(w, (1, 8, 10, 10), 2)
    sp = SparsifyConvs()
    out = sp(mod)
    calls = [b.value for b in out["main"].body.blocks[0].bindings]
    assert len(calls) == 1
    func = contract.callee(out, calls[0])
    assert str(func.attrs[contract.OP]) == contract.CONV_PATTERN
    assert contract.conv_geometry(func)["strides"] == [2, 2]
    fields = [f.value.numpy() for f in list(calls[0].args[1].fields)[1:]]
    for got, want in zip(fields, conv_quads(w)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fields[5], w.reshape(16, -1).astype(np.int64).sum(1))
    assert not any(isinstance(f, tvm.tirx.PrimFunc) and contract.ROW_SCHEMES in (f.attrs or {})
                   for f in out.functions.values()), "the dense quantized op is gone"
    assert sp.last_stats["conv"]["quads"] == len(fields[0])
    contract.verify(out)
    # a dense layer stays as it was
    dense = _quantized_conv_module(np.ones((16, 8, 3, 3), np.int8), (1, 8, 10, 10), 1)
    tvm.ir.assert_structural_equal(SparsifyConvs()(dense), dense)
    # constants that break rule 'quads' are refused, naming the layer
    call = calls[0]
    for index, bad_value in ((3, lambda a: a[::-1].copy()), (2, lambda a: a + 1000)):  # rptr falls; a plane past the end
        fs = list(call.args[1].fields)
        fs[index] = relax.const(bad_value(fs[index].value.numpy()), "int32")
        bad = relax.Call(call.op, [call.args[0], relax.Tuple(fs)] + list(call.args[2:]), call.attrs, call.ty_args)
        bb = relax.BlockBuilder(out)
        with bb.function("main2", [out["main"].params[0]]):
            bb.emit_func_output(bb.emit(bad))
        with pytest.raises(contract.ContractError, match=r"layer conv\).*rule 'quads'"):
            contract.verify(bb.get())
    # a function whose parameters disagree with the contract
    with pytest.raises(contract.ContractError, match="rule 'params'"):
        contract.verify_conv_pattern_func("f", conv_pattern_func((1, 8, 10, 10), 15, 3, 3, [1, 1], 4, 2, "int8", "conv",
                                                                 ["fixed_8"] * 16))
