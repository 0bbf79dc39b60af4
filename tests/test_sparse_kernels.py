"""Block-sparse dense kernels (SparsifyRowGroups -> schedules/cpu_sparse.py): integer-exact
against numpy, every scheme x sparsity form, batch 1 and more; the pass's IR; the contract."""

import warnings

import numpy as np
import pytest
import torch
import tvm
from conftest import TwoLayerMLP, block_sparse_levels, np_bsr, np_dense_layer
from tvm import relax

import schedules
import tvm_rmsmp as rmsmp
from relay_passes import SparsifyRowGroups, contract
from relay_passes.sparsify_row_groups import bsr_dense_func
from schedules.cpu_sparse import bsr_kernel
from schedules.x86_tuning_table import x86_isa
from tvm_rmsmp.quant.schemes import get_scheme

VNNI = x86_isa(rmsmp.resolve_target("llvm")) == "avx512vnni"
AVX2_TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2 without AVX-512


def _sparse_weight(rng, scheme, n, k, br, bc, density):
    return block_sparse_levels(rng, get_scheme(scheme).levels, n, k, br, bc, density)


def _run_kernel(kernel, target, *arrays):
    mod = tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")})
    exe = tvm.compile(mod, target=target)
    args = [tvm.runtime.tensor(a) for a in arrays]
    exe.mod["main"](*args)
    return args[-1].numpy()


KERNEL_CASES = [  # (m, k, n, br, bc, x dtype, scheme, target)
    (1, 64, 48, 16, 4, "int8", "sp2_4", "host"),
    (3, 128, 32, 16, 4, "uint8", "fixed_8", "host"),
    (5, 32, 16, 8, 4, "int8", "fixed_4", "host"),
    (2, 64, 24, 8, 4, "uint8", "sp2_4", "host"),
    (1, 36, 12, 4, 4, "int8", "fixed_8", "host"),   # 4-row blocks: the portable kernel everywhere
    (3, 64, 32, 16, 4, "int8", "fixed_8", "avx2"),  # the AVX2 kernel (vpmaddwd)
    (5, 64, 32, 16, 4, "uint8", "sp2_4", "avx2"),
    (2, 32, 24, 8, 4, "uint8", "fixed_8", "avx2"),
    (1, 32, 12, 2, 4, "int8", "fixed_4", "avx2"),  # 2-row blocks on AVX2: the portable kernel
    (2, 48, 16, 2, 8, "int8", "fixed_8", "host"),   # blocks of 8 columns: the generic loop nest
    (3, 32, 6, 1, 4, "uint8", "sp2_4", "host"),     # one-row blocks: the generic loop nest
]


@pytest.mark.parametrize("m,k,n,br,bc,x_dtype,scheme,where", KERNEL_CASES)
def test_bsr_kernel_exact(m, k, n, br, bc, x_dtype, scheme, where):
    rng = np.random.default_rng(m * 1000 + k + n + br)
    target = rmsmp.resolve_target("llvm") if where == "host" else tvm.target.Target(AVX2_TARGET)
    w = _sparse_weight(rng, scheme, n, k, br, bc, 0.4)
    blocks, col, ptr = np_bsr(w, br, bc)
    x = rng.integers(0, 256, (m, k)).astype("uint8") if x_dtype == "uint8" else \
        rng.integers(-128, 128, (m, k)).astype("int8")
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    scale = (rng.random(n) * 1e-3 + 1e-4).astype(np.float32)
    wsum = w.astype(np.int64).sum(1).astype(np.int32)
    func = bsr_dense_func(m, k, n, br, bc, int(col.size), x_dtype, "fc", [scheme] * n)
    kernel = bsr_kernel(func, target)
    expect_vnni = VNNI and where == "host" and br in (8, 16) and bc == 4
    expect_avx2 = where == "avx2" and br % 4 == 0 and bc == 4
    assert str(kernel.attrs[contract.CPU_KERNEL]) == (
        "x86-avx512vnni-bsr" if expect_vnni else "x86-avx2-bsr" if expect_avx2 else "bsr")
    out = _run_kernel(kernel, target, x, blocks, col, ptr, wsum, bias, scale, np.zeros((m, n), np.float32))
    ref = (x.astype(np.int64) @ w.astype(np.int64).T + bias).astype(np.float32) * scale
    np.testing.assert_array_equal(out, ref)
    # the target-neutral op itself (plain loops) computes the same
    ref_op = _run_kernel(func, target, x, blocks, col, ptr, wsum, bias, scale, np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(ref_op, ref)


# ----- whole models: prune -> quantize -> compile, against numpy --------------------------------
MODEL_CASES = [  # (ratio, prune scheme, block)
    ({"sp2_4": 1.0}, "block_punched", (16, 4)),
    ({"fixed_4": 1.0}, "block_row", (8, 4)),
    # fixed_8 rows among the others; Linear layers: pattern falls back to block_row
    ({"sp2_4": 0.6, "fixed_4": 0.2, "fixed_8": 0.2}, "pattern", (4, 8)),
]


@pytest.mark.parametrize("ratio,scheme,block", MODEL_CASES)
def test_pruned_model_exact(ratio, scheme, block):
    torch.manual_seed(0)
    model = TwoLayerMLP().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 64, generator=g)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = rmsmp.prune(model, rmsmp.PruneConfig(scheme=scheme, sparsity=0.75, block=block))
        q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(ratio=ratio, assign="variance"), calib_data=calib)
    for batch in (1, 3):
        x = torch.randn(batch, 64, generator=g)
        exe = rmsmp.compile(q, (x,), target="llvm")
        assert set(exe.stats["sparse"]) == {"fc1", "fc2"}
        for layer in ("fc1", "fc2"):
            st = exe.stats["sparse"][layer]
            assert st["density"] <= 0.3 and st["block"][1] == 4
        h = np.maximum(np_dense_layer(q.fc1, x.numpy()), 0)  # fc2's input: unsigned activations
        ref = np_dense_layer(q.fc2, h)
        np.testing.assert_array_equal(exe(x), ref)


# ----- the pass's IR --------------------------------------------------------------------------
def _quantized_module(w, n, k):
    """main(x float32 [1, k]) = one quantized dense op with weight ``w`` (as the frontend emits it)."""
    from relay_passes import ops

    qfunc = ops.dense_func([1, k], "int8", [n, k], "int8", ops.fixed_product,
                           ops.rmsmp_attrs("dense", "fc", **{contract.ROW_SCHEMES: ["fixed_8"] * n}))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, k], "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(qfunc, "rmsmp_dense_fc")
            y = bb.emit_output(relax.call_tir(gv, [x, relax.const(w, "int8"), relax.const(np.zeros(n, np.int32)),
                                                   relax.const(np.ones(n, np.float32))],
                                              relax.TensorType([1, n], "float32")))
        bb.emit_func_output(y)
    return bb.get()


def test_sparsify_pass_structure():
    rng = np.random.default_rng(3)
    n, k = 32, 64
    w = _sparse_weight(rng, "fixed_8", n, k, 16, 4, 0.3)
    mod = _quantized_module(w, n, k)
    sp = SparsifyRowGroups()
    out = sp(mod)
    calls = [b.value for b in out["main"].body.blocks[0].bindings]
    assert len(calls) == 1
    func = contract.callee(out, calls[0])
    assert str(func.attrs[contract.OP]) == contract.DENSE_BSR
    assert [int(v) for v in func.attrs[contract.SPARSE_BLOCK]] == [16, 4]
    fields = list(calls[0].args[1].fields)
    blocks, col, ptr = np_bsr(w, 16, 4)
    np.testing.assert_array_equal(fields[1].value.numpy(), blocks)
    np.testing.assert_array_equal(fields[2].value.numpy(), col)
    np.testing.assert_array_equal(fields[3].value.numpy(), ptr)
    np.testing.assert_array_equal(fields[4].value.numpy(), w.astype(np.int64).sum(1))
    assert not any(isinstance(f, tvm.tirx.PrimFunc) and contract.ROW_SCHEMES in (f.attrs or {})
                   for f in out.functions.values()), "the dense quantized op is gone"
    assert sp.last_stats["fc"]["blocks_kept"] == int(ptr[-1])
    contract.verify(out)
    # a dense layer (no zero blocks) stays as it was
    dense = _quantized_module(np.ones((n, k), np.int8), n, k)
    tvm.ir.assert_structural_equal(SparsifyRowGroups()(dense), dense)


def test_contract_refuses_bad_bsr():
    rng = np.random.default_rng(4)
    n, k = 32, 64
    w = _sparse_weight(rng, "fixed_8", n, k, 16, 4, 0.3)
    out = SparsifyRowGroups()(_quantized_module(w, n, k))
    call = out["main"].body.blocks[0].bindings[0].value
    fields = list(call.args[1].fields)
    ptr = fields[3].value.numpy().copy()
    ptr[1] = ptr[2] + 1  # falls again: not a valid row pointer
    fields[3] = relax.const(ptr, "int32")
    bad = relax.Call(call.op, [call.args[0], relax.Tuple(fields)] + list(call.args[2:]), call.attrs, call.ty_args)
    bb = relax.BlockBuilder(out)
    x = out["main"].params[0]
    with bb.function("main2", [x]):
        y = bb.emit(bad)
        bb.emit_func_output(y)
    with pytest.raises(contract.ContractError, match=r"layer fc\).*rule 'bsr'"):
        contract.verify(bb.get())
    # a sparse op whose block does not fit its weights
    func = contract.callee(out, call).with_attr(contract.SPARSE_BLOCK, [8, 4])
    with pytest.raises(contract.ContractError, match="rule 'params'"):
        contract.verify_sparse_func("f", func)


def test_cpu_and_gpu_targets_get_sparse_ops_the_fpga_skips_in_its_streams():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = rmsmp.prune(TwoLayerMLP().eval(), rmsmp.PruneConfig(sparsity=0.75, block=(16, 4)))
        q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(assign="variance"), calib_data=[torch.randn(8, 64)])
    x = torch.randn(1, 64)
    for target, sparse in (("llvm", True), ("mali", True), ("fpga:xc7z020", False)):
        mod, stats = rmsmp.lower(q, (x,), target, schedule=False)
        ops = {str(f.attrs[contract.OP]) for f in mod.functions.values()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and contract.OP in f.attrs}
        assert (contract.DENSE_BSR in ops) == sparse, target
        assert bool(stats["sparse"]) == sparse
