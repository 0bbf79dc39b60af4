"""RewriteRowGroups: split each quantized dense/conv2d into one row-group op per scheme.

Before::

    y = R.call_tir(rmsmp_dense_fc, (xq, W, bias, scale))        # rows of mixed schemes

After::

    g0 = R.call_tir(rmsmp_dense_fc_sp2_4, (xq, W[rows0] as SP2 codes, bias[rows0], scale[rows0]))
    g1 = R.call_tir(rmsmp_dense_fc_fixed_4, (xq, W[rows1], bias[rows1], scale[rows1]))
    c = R.concat((g0, g1), axis=channel)
    y = R.take(c, inverse_permutation, axis=channel)           # back to the model's row order

The trailing ``take`` keeps the rewrite self-contained and correct on its own;
:class:`~relay_passes.fold_row_permutation.FoldRowPermutation` then folds it into the
consumers. Groups follow the scheme registry's order, rows keep their order inside a group.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_rmsmp.quant.schemes import (
    get_scheme,
    list_schemes,
)

from . import ops
from . import contract
from .contract import SP2_LOWERINGS, callee, channel_axis, const_value, group_weight, packed_weight, rmsmp_attr, stored_to_int


__all__ = ["SP2_LOWERINGS", "RewriteRowGroups", "group_weight", "packed_weight", "row_group_func", "channel_axis", "stored_to_int"]


def row_group_func(
    op: str, layer: str, scheme_name: str, x_shape, x_dtype: str, w_shape, conv: Optional[dict] = None,
    packed: bool = False, sp2_lowering: str = "shift", requant: Optional[dict] = None,
) -> tvm.tirx.PrimFunc:
    """The target-neutral row-group PrimFunc for ``scheme_name`` rows of a layer.

    ``w_shape`` is the logical weight shape; ``packed`` stores 4-bit codes two per byte
    (``[rows, ceil(R / 2)]`` uint8, see :func:`tvm_rmsmp.quant.schemes.pack_nibbles`).
    ``sp2_lowering`` (packed SP2 rows): ``"shift"`` (two masked shifts of the activation)
    or ``"decode"`` (the code decoded to its integer, then a multiply); recorded in the
    function's ``rmsmp.sp2_lowering`` attribute."""
    scheme = get_scheme(scheme_name)
    extra = {contract.SCHEME: scheme_name, contract.KIND: scheme.kind}
    if requant is not None:  # the fixed-point epilogue (contract.REQUANT)
        extra[contract.REQUANT] = dict(requant)
    if sp2_lowering not in SP2_LOWERINGS:
        raise ValueError(f"sp2_lowering must be one of {SP2_LOWERINGS}, got {sp2_lowering!r}")
    if packed:
        if scheme.bits > 4:
            raise ValueError(f"scheme {scheme_name!r} has {scheme.bits} bits: it cannot be packed two per byte")
        if scheme.kind == "sp2":
            make = ops.sp2_nibble_decode_product if sp2_lowering == "decode" else ops.sp2_nibble_product
            product = make(scheme.m1, scheme.m2)
            extra[contract.SP2_LOWERING] = sp2_lowering
        else:
            product = ops.fixed_nibble_product
        extra[contract.PACKED] = 2
    else:
        product = ops.sp2_product if scheme.kind == "sp2" else ops.fixed_product
    attrs = ops.rmsmp_attrs(op, layer, **extra)
    if op == "dense":
        return ops.dense_func(x_shape, x_dtype, w_shape, "int8", product, attrs, packed=packed)
    attrs[contract.CONV] = conv
    return ops.conv2d_func(
        x_shape, x_dtype, w_shape, "int8", conv["strides"], conv["padding"], conv["dilation"], product, attrs,
        packed=packed,
    )


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.replaced: set = set()
        self.kept: set = set()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        func = callee(self.mod_, call)
        if func is None or rmsmp_attr(func, contract.ROW_SCHEMES) is None:
            return call
        gv = call.args[0]
        xq, w, bias, scale = list(call.args[1].fields)
        w_np, b_np, s_np = const_value(w), const_value(bias), const_value(scale)
        if w_np is None or b_np is None or s_np is None:
            self.kept.add(gv)
            return call  # weights bound late (params as inputs): nothing to split at compile time
        op = str(func.attrs[contract.OP])
        layer = str(func.attrs[contract.LAYER])
        conv = None
        if op == "conv2d":
            conv = contract.conv_geometry(func)
        schemes = np.array([str(s) for s in func.attrs[contract.ROW_SCHEMES]], dtype=object)
        x_ty = xq.ty
        x_shape = [ops.dim(d) for d in x_ty.shape]
        x_dtype = str(x_ty.dtype)
        out_ty = call.ty
        axis = channel_axis(op, len(out_ty.shape))

        parts: List[relax.Expr] = []
        perm: List[np.ndarray] = []
        for name in list_schemes():
            rows = np.nonzero(schemes == name)[0]
            if rows.size == 0:
                continue
            wg = group_weight(w_np[rows], name)
            gfunc = row_group_func(op, layer, name, x_shape, x_dtype, wg.shape, conv,
                                   requant=contract.requant_of(func))
            ggv = self.builder_.add_func(gfunc, f"rmsmp_{op}_{contract.symbol_name(layer)}_{name}")
            out_shape = list(out_ty.shape)
            out_shape[axis] = int(rows.size)
            parts.append(
                self.builder_.emit(
                    relax.call_tir(
                        ggv,
                        [xq, relax.const(wg, "int8"), relax.const(b_np[rows], "int32"), relax.const(s_np[rows], "float32")],
                        relax.TensorType(out_shape, "float32"),
                    )
                )
            )
            perm.append(rows)
        unknown = set(schemes) - set(list_schemes())
        if unknown:
            raise ValueError(f"layer {layer!r}: unknown schemes {sorted(unknown)}")
        self.replaced.add(gv)
        if len(parts) == 1:
            return parts[0]
        order = np.concatenate(perm)
        joined = self.builder_.emit(relax.op.concat(parts, axis=axis))
        if np.array_equal(order, np.arange(order.size)):
            return joined
        inverse = np.argsort(order).astype("int64")
        return relax.op.take(joined, relax.const(inverse, "int64"), axis=axis, mode="clip")


@tvm.transform.module_pass(opt_level=0, name="RewriteRowGroups")
class RewriteRowGroups:
    """Split every quantized dense/conv2d op into row-group ops (see module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        out = rewriter.builder_.get()
        for gv in rewriter.replaced - rewriter.kept:
            if gv in out.functions:
                out = _remove_function(out, gv)
        return out


def _remove_function(mod: tvm.IRModule, gv: tvm.ir.GlobalVar) -> tvm.IRModule:
    funcs = {g: f for g, f in mod.functions.items() if not g.same_as(gv)}
    return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)
