"""PackFourBitRows: store the weights of 4-bit row groups two codes per byte.

Runs after :class:`~relay_passes.fold_row_permutation.FoldRowPermutation` (which permutes
weight columns, one code per column). Each row-group op whose scheme has at most 4 bits is
replaced by its packed form: the same computation reading ``[rows, ceil(R / 2)]`` bytes
(fixed rows as 4-bit two's complement, SP2 rows as term indices and a sign; see
:func:`tvm_rmsmp.quant.schemes.nibble_codes`). Half the weight bytes: at batch 1 a dense layer is
bound by streaming its weights. Rows of 8-bit schemes are left as they are.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_rmsmp.quant.schemes import get_scheme

from . import contract, ops
from .contract import callee, packed_weight, rmsmp_attr, stored_to_int
from .rewrite_row_groups import row_group_func

__all__ = ["PackFourBitRows"]


def _packable(func) -> bool:
    scheme = rmsmp_attr(func, contract.SCHEME)
    return scheme is not None and rmsmp_attr(func, contract.PACKED) is None and get_scheme(scheme).bits <= 4


@mutator
class _Packer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.packed = 0
        self.cache = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        func = callee(self.mod_, call)
        if not _packable(func):
            return call
        gv = call.args[0]
        x, w, bias, scale = list(call.args[1].fields)
        if not isinstance(w, tvm.ir.GenericConst):
            return call
        scheme = str(func.attrs[contract.SCHEME])
        op = str(func.attrs[contract.OP])
        stored = w.value.numpy()
        packed = packed_weight(stored_to_int(stored, scheme), scheme)
        key = (gv.name_hint,)
        if key not in self.cache:
            conv = None
            if op == "conv2d":
                conv = contract.conv_geometry(func)
            x_ty = x.ty
            new_func = row_group_func(
                op, str(func.attrs[contract.LAYER]), scheme, [ops.dim(d) for d in x_ty.shape], str(x_ty.dtype),
                list(stored.shape), conv, packed=True, requant=contract.requant_of(func),
            )
            self.cache[key] = self.builder_.add_func(new_func, gv.name_hint + "_packed")
        self.packed += 1
        out_ty = call.ty_args[0]
        return relax.call_tir(
            self.cache[key], [x, relax.const(packed, "uint8"), bias, scale],
            relax.TensorType([ops.dim(d) for d in out_ty.shape], out_ty.dtype),
        )


@tvm.transform.module_pass(opt_level=0, name="PackFourBitRows")
class PackFourBitRows:
    """Pack 4-bit row groups two codes per byte (see module docstring); ``last_packed`` counts them."""

    def __init__(self):
        self.last_packed = 0

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        packer = _Packer(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                packer.builder_.update_func(gv, packer.visit_expr(func))
        self.last_packed = packer.packed
        return relax.transform.DeadCodeElimination()(packer.builder_.get())
