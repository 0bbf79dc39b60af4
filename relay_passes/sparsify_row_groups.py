"""SparsifyRowGroups: a quantized dense op whose weight constant has block structure becomes
one block-sparse (BSR) op that only multiplies the blocks holding a non-zero.

Before (a pruned layer, weights int levels ``[N, K]``, mostly zero blocks)::

    y = R.call_tir(rmsmp_dense_fc, (xq, W, bias, scale))             # rmsmp.row_schemes

After::

    y = R.call_tir(rmsmp_dense_bsr_fc, (xq, blocks, col, ptr, wsum, bias, scale))

with ``blocks [nnzb, br, bc]`` int8 levels, ``col [nnzb]`` their block columns and ``ptr
[N / br + 1]`` each block row's first block (:func:`tvm_rmsmp.quant.sparsity.bsr_blocks`),
``wsum [N]`` each row's sum of levels (for kernels that offset the activations). The op keeps
the model's row order and every row's scheme (:data:`~relay_passes.contract.SPARSE_ROW_SCHEMES`):
the row groups are not formed, because RMSMP assigns schemes row by row, and splitting a
pruned layer into its schemes' groups would break the blocks' rows apart (a block of 16 rows
holds rows of every scheme). All three schemes' levels are int8 (SP2: |level| <= 8), so one
integer MAC serves every row, exactly as the row groups would compute it; the blocks store
levels as int8 (not two 4-bit codes per byte).

It runs first, on the quantized ops, before ``RewriteRowGroups`` (which then leaves these ops
alone) and before ``FoldRowPermutation`` (whose column permutations would scatter the blocks'
columns; a permuted tensor reaching a sparse op gets its gather back, as before any op the
fold does not know).

The kernel block is ``(br, bc)``: ``bc = 4`` (four input channels: one int32 lane of a byte
MAC), ``br`` the largest of :data:`ROW_BLOCKS` dividing the rows whose block density is within
:data:`ROW_BLOCK_SLACK` of the 4-column slivers' (pruning blocks of 16 x 4 give ``br = 16``;
8 x 4 give 8), unless ``blocks={layer: (br, bc)}`` says. Layers whose density is above
``max_density`` stay dense (their dense kernels are faster there).
"""


from typing import Dict, Optional, Tuple

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T

from tvm_rmsmp.quant.sparsity import block_density, bsr_blocks

from . import contract
from .contract import callee, const_value, rmsmp_attr

__all__ = ["SparsifyRowGroups", "bsr_dense_func", "choose_block", "ROW_BLOCKS", "MAX_DENSITY"]

#: Candidate rows of a kernel block, largest first.
ROW_BLOCKS = (16, 8, 4, 2, 1)
#: Columns of a kernel block (one int32 lane of four bytes).
COL_BLOCK = 4
#: A taller block is taken while its density is at most this factor of the 1 x 4 slivers'.
ROW_BLOCK_SLACK = 1.1
#: Layers denser than this (share of kernel blocks kept) stay dense.
MAX_DENSITY = 0.6


def choose_block(w: np.ndarray) -> Optional[Tuple[int, int]]:
    """The kernel block of a ``[N, K]`` weight (module docstring); None when K % 4 != 0."""
    n, k = w.shape
    if k % COL_BLOCK:
        return None
    base = block_density(w, 1, COL_BLOCK)
    for br in ROW_BLOCKS:
        if n % br == 0 and block_density(w, br, COL_BLOCK) <= ROW_BLOCK_SLACK * base + 1e-12:
            return br, COL_BLOCK
    return 1, COL_BLOCK


def bsr_dense_func(m: int, k: int, n: int, br: int, bc: int, nnzb: int, x_dtype: str, layer: str,
                   row_schemes) -> tvm.tirx.PrimFunc:
    """The target-neutral block-sparse dense op: ``out[i, r] = float32(sum over the kept blocks
    of row r's block row of x * level + bias[r]) * scale[r]`` as plain loops (parameters:
    :data:`~relay_passes.contract.SPARSE_PARAMS`)."""
    nrb = n // br

    @T.prim_func(private=True)
    def func(x: T.Buffer((m, k), x_dtype), w: T.Buffer((max(nnzb, 1), br, bc), "int8"),
             col: T.Buffer((max(nnzb, 1),), "int32"), ptr: T.Buffer((nrb + 1,), "int32"),
             wsum: T.Buffer((n,), "int32"), bias: T.Buffer((n,), "int32"), scale: T.Buffer((n,), "float32"),
             out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        acc = T.alloc_buffer((1,), "int32")
        for i, rb, r in T.grid(m, nrb, br):
            acc[0] = 0
            for j in T.serial(ptr[rb], ptr[rb + 1]):
                for c in T.serial(bc):
                    acc[0] = acc[0] + T.Cast("int32", x[i, col[j] * bc + c]) * T.Cast("int32", w[j, r, c])
            out[i, rb * br + r] = T.Cast("float32", acc[0] + bias[rb * br + r]) * scale[rb * br + r]

    attrs = {contract.OP: contract.DENSE_BSR, contract.LAYER: layer, contract.SPARSE_BLOCK: [int(br), int(bc)],
             contract.SPARSE_ROW_SCHEMES: [str(s) for s in row_schemes], "op_pattern": 8}
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    return func


@mutator
class _Sparsifier(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, max_density: float, blocks: Dict[str, Tuple[int, int]]):
        super().__init__(mod)
        self.mod_, self.max_density, self.blocks = mod, max_density, blocks
        self.replaced, self.kept = set(), set()
        self.stats: Dict[str, dict] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        func = callee(self.mod_, call)
        if func is None or rmsmp_attr(func, contract.ROW_SCHEMES) is None or rmsmp_attr(func, contract.OP) != "dense":
            return call
        if contract.REQUANT in func.attrs:  # the block-sparse kernel has the float epilogue only
            self.kept.add(call.args[0])
            return call
        gv = call.args[0]
        xq, w, bias, scale = list(call.args[1].fields)
        w_np, b_np, s_np = const_value(w), const_value(bias), const_value(scale)
        if w_np is None or b_np is None or s_np is None or w_np.ndim != 2:
            self.kept.add(gv)
            return call
        layer = str(func.attrs[contract.LAYER])
        n, k = w_np.shape
        if layer not in self.blocks and np.count_nonzero(w_np) > self.max_density * w_np.size:
            self.kept.add(gv)  # blocks are at least as dense as their weights: a dense layer, quickly
            return call
        block = self.blocks.get(layer) or choose_block(w_np)
        if block is None or n % block[0] or k % block[1]:
            self.kept.add(gv)
            return call
        br, bc = block
        density = block_density(w_np, br, bc)
        if density > self.max_density:
            self.kept.add(gv)
            return call
        blk, col, ptr = bsr_blocks(w_np, br, bc)
        nnzb = int(col.size)
        if nnzb == 0:  # every weight pruned: one zero block keeps the buffers non-empty
            blk, col = np.zeros((1, br, bc), np.int8), np.zeros(1, np.int32)
        wsum = w_np.astype(np.int64).sum(axis=1).astype(np.int32)
        x_shape = [int(d) for d in xq.ty.shape]
        sfunc = bsr_dense_func(x_shape[0], k, n, br, bc, nnzb, str(xq.ty.dtype), layer,
                               [str(s) for s in func.attrs[contract.ROW_SCHEMES]])
        sgv = self.builder_.add_func(sfunc, f"rmsmp_dense_bsr_{contract.symbol_name(layer)}")
        self.replaced.add(gv)
        self.stats[layer] = {"density": round(density, 4), "blocks_kept": nnzb, "blocks": (n // br) * (k // bc),
                             "block": [br, bc], "weight_density": round(float(np.count_nonzero(w_np)) / w_np.size, 4)}
        out_ty = call.ty_args[0]
        return relax.call_tir(sgv, [xq, relax.const(blk, "int8"), relax.const(col, "int32"),
                                    relax.const(ptr, "int32"), relax.const(wsum, "int32"), bias, scale],
                              relax.TensorType([int(d) for d in out_ty.shape], out_ty.dtype))


@tvm.transform.module_pass(opt_level=0, name="SparsifyRowGroups")
class SparsifyRowGroups:
    """Block-sparse ops for pruned dense layers (module docstring); ``last_stats`` is
    ``{layer: {"density", "blocks_kept", "blocks", "block", "weight_density"}}``."""

    def __init__(self, max_density: float = MAX_DENSITY, blocks: Optional[Dict[str, Tuple[int, int]]] = None):
        if not 0.0 <= float(max_density) <= 1.0:
            raise ValueError(f"max_density must be in [0, 1], got {max_density!r}")
        self.max_density, self.blocks = float(max_density), dict(blocks or {})
        self.last_stats: Dict[str, dict] = {}

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        sp = _Sparsifier(mod, self.max_density, self.blocks)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                sp.builder_.update_func(gv, sp.visit_expr(func))
        self.last_stats = sp.stats
        out = sp.builder_.get()
        if sp.replaced - sp.kept:
            out = relax.transform.DeadCodeElimination()(out)
        return out
