"""FoldRowPermutation: remove the runtime gathers that restore row order after row groups.

:class:`~relay_passes.rewrite_row_groups.RewriteRowGroups` leaves ``y = take(c, inv, axis)``
after each split layer, where ``c`` holds the rows grouped by scheme. This pass drops the
``take`` and carries "``c`` is ``y`` with its channels in order ``p``" forward:

* through ops that treat channels alike (ReLU, rounding, clipping, casts, pooling in NCHW),
  emitting them on ``c`` directly;
* through elementwise ops with a per-channel constant (a bias, a scale), permuting the
  constant once at compile time;
* through a LayerNorm over the channel axis alone, whose mean and variance do not depend on
  the channels' order, permuting its constant gamma and beta (the sums run in another order,
  so the result may differ from the unpermuted one by float rounding);
* through a flatten (``reshape`` that merges the channel axis with the axes after it), where
  the permutation becomes a block permutation of the flattened features, and through
  reshapes that keep the channel axis last;
* through the next layer's activation quantizer (elementwise), and
* into the next quantized layer, by permuting its weights' input channels (axis 1 of the
  dense ``[out, in]`` and conv ``[out, in, kh, kw]`` weights) at compile time.

Where a layer's output, as its row groups left it, meets a tensor in the model's order (a
residual add), the layer's output gets its order back: the one gather either way, but this
one a target can fold into the layer's kernel (x86 with many activation rows), and nothing
downstream carries an order. Where two permuted tensors meet, one is brought into the
other's order and the permutation keeps flowing.

Anything else that reads a permuted tensor (a residual add with a differently ordered tensor,
a function output, an op this pass does not know) gets the ``take`` back right before it, so
the result is always correct and the gather survives only where it cannot be folded.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import tvm
from tvm.sym.analyzer import Analyzer
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import contract, ops
from .contract import callee, rmsmp_attr
from .contract import const_value as _const
from .contract import op_name as _op_name

__all__ = ["FoldRowPermutation"]

_CHANNEL_ALIKE = {
    "relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu", "relax.sigmoid", "relax.tanh",
    "relax.round", "relax.floor", "relax.ceil", "relax.clip", "relax.astype", "relax.abs", "relax.negative",
    "relax.zeros_like", "relax.ones_like", "relax.nn.leakyrelu",
}
_ELEMENTWISE_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum"}
_POOL_NCHW = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d"}


class _Permuted:
    """``src[..., i, ...] == original[..., order[i], ...]`` along ``axis``; ``from_layer``:
    ``src`` is a layer's row groups as they come (concatenated, at most reshaped)."""

    def __init__(self, src: relax.Expr, order: np.ndarray, axis: int, from_layer: bool = False):
        self.src, self.order, self.axis, self.from_layer = src, order, axis, from_layer


def _shape(expr):
    """The shape as ints, a symbolic (batch) dimension as its simplified text, so that shapes compare."""
    return [d if isinstance(d, int) else f"sym:{_ANALYZER.simplify(d)}" for d in (ops.dim(d) for d in expr.ty.shape)]


_ANALYZER = Analyzer()


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.permuted: Dict[relax.Var, _Permuted] = {}
        # Tuples of permuted tensors, emitted only if something other than a field access uses them.
        self.pending_tuples: Dict[relax.Var, relax.Tuple] = {}
        self.folded = 0
        self.kept = 0

    # ----- helpers ------------------------------------------------------------------------
    def _materialize(self, var: relax.Var):
        p = self.permuted.pop(var)
        inverse = np.argsort(p.order).astype("int64")
        restored = self.builder_.emit(relax.op.take(p.src, relax.const(inverse, "int64"), axis=p.axis, mode="clip"))
        self.set_var_remap(var, restored)
        self.kept += 1

    def _emit(self, var: relax.Var, value: relax.Expr, permuted: Optional[_Permuted] = None):
        if isinstance(var, relax.DataflowVar):
            new = self.builder_.emit(value, name_hint=var.name)
        else:
            new = self.builder_.emit_output(value, name_hint=var.name)
        if permuted is None:
            self.set_var_remap(var, new)
        else:
            permuted.src = new
            self.permuted[var] = permuted

    # ----- the rules ----------------------------------------------------------------------
    def _as_permutation_take(self, call: relax.Call) -> Optional[_Permuted]:
        if _op_name(call) != "relax.take":
            return None
        idx = _const(call.args[1])
        data = call.args[0]
        if idx is None or idx.ndim != 1 or data in self.permuted:
            return None
        axis = int(call.attrs.axis) % len(_shape(data))
        if idx.size != _shape(data)[axis] or not np.array_equal(np.sort(idx), np.arange(idx.size)):
            return None
        return _Permuted(self.visit_expr(data), np.argsort(idx), axis, from_layer=True)

    def _reorder(self, expr: relax.Expr, index: np.ndarray, axis: int) -> relax.Expr:
        """One gather that puts ``expr``'s channels into another order."""
        self.kept += 1
        return self.builder_.emit(relax.op.take(expr, relax.const(index.astype("int64"), "int64"), axis=axis, mode="clip"))

    def _fold_binary(self, var, call) -> bool:
        a, b = call.args
        pa, pb = self.permuted.get(a), self.permuted.get(b)
        out_shape = _shape(var)
        if pa is not None and pb is not None:
            if pa.axis != pb.axis or _shape(a) != out_shape or _shape(b) != out_shape:
                return False
            b_src = pb.src
            if not np.array_equal(pa.order, pb.order):
                # Bring b into a's channel order: one gather instead of restoring both.
                b_src = self._reorder(pb.src, np.argsort(pb.order)[pa.order], pa.axis)
            self._emit(var, relax.Call(call.op, [pa.src, b_src], call.attrs, call.ty_args), _Permuted(None, pa.order, pa.axis))
            return True
        p = pa or pb
        other = b if pa is not None else a
        if _shape(a if pa is not None else b) != out_shape:
            return False
        c = _const(other)
        if c is None:
            if not isinstance(other, relax.Var) or _shape(other) != out_shape:
                return False
            if p.from_layer:
                # A layer's output meets a tensor in the model's order: give the layer output its
                # order back (the same one gather), where a target can fold it into the layer's
                # kernel, instead of permuting the other tensor and carrying the order on.
                self._materialize(a if pa is not None else b)
                return False
            # A tensor in the model's order meets a permuted one: permute it (one gather) and
            # keep going, so the permutation can still fold into a later consumer.
            other = self._reorder(self.visit_expr(other), p.order, p.axis)
        else:
            cax = p.axis - (len(out_shape) - c.ndim)
            if cax >= 0 and c.shape[cax] != 1:
                if c.shape[cax] != p.order.size:
                    return False
                other = relax.const(np.take(c, p.order, axis=cax), str(other.ty.dtype))
        args = [p.src, other] if pa is not None else [other, p.src]
        self._emit(var, relax.Call(call.op, args, call.attrs, call.ty_args), _Permuted(None, p.order, p.axis))
        return True

    def _fold_layer_norm(self, var, call) -> bool:
        p = self.permuted[call.args[0]]
        ndim = len(_shape(call.args[0]))
        axes = sorted(int(a) % ndim for a in call.attrs.axes)
        gamma, beta = _const(call.args[1]), _const(call.args[2])
        if axes != [p.axis] or gamma is None or beta is None or gamma.shape != (p.order.size,) or beta.shape != gamma.shape:
            return False
        args = [p.src, relax.const(gamma[p.order], str(call.args[1].ty.dtype)),
                relax.const(beta[p.order], str(call.args[2].ty.dtype))]
        self._emit(var, relax.Call(call.op, args, call.attrs, call.ty_args), _Permuted(None, p.order, p.axis))
        return True

    def _fold_reshape(self, var, call) -> bool:
        p = self.permuted[call.args[0]]
        src_shape, dst_shape = _shape(call.args[0]), _shape(var)
        a = p.axis
        inner = int(np.prod(src_shape[a + 1:], dtype=np.int64))
        if dst_shape == src_shape:
            order = p.order
        elif a == len(src_shape) - 1 and dst_shape[-1] == src_shape[-1]:
            # leading axes merged or split, channel axis stays last (dense on [B, T, C])
            order, a = p.order, len(dst_shape) - 1
        elif len(dst_shape) == a + 1 and dst_shape[:a] == src_shape[:a] and dst_shape[a] == src_shape[a] * inner:
            order = (p.order[:, None] * inner + np.arange(inner)[None, :]).reshape(-1)
        else:
            return False
        self._emit(var, relax.Call(call.op, [p.src] + [self.visit_expr(x) for x in call.args[1:]], call.attrs, call.ty_args),
                   _Permuted(None, order, a, from_layer=p.from_layer and a == len(dst_shape) - 1
                                                 and p.axis == len(src_shape) - 1))
        return True

    def _fold_into_consumer(self, var, call) -> bool:
        """A quantized/row-group op reading a permuted input: permute its weight's input channels."""
        op = self._callee_op(call)
        if op not in ("dense", "conv2d"):
            return False
        gv = call.args[0]
        fields = list(call.args[1].fields)
        x, w = fields[0], fields[1]
        p = self.permuted.get(x)
        w_np = _const(w)
        if p is None or w_np is None or any(f in self.permuted for f in fields[1:]):
            return False
        expected_axis = len(_shape(x)) - 1 if op == "dense" else 1
        if p.axis != expected_axis or w_np.shape[1] != p.order.size:
            return False
        new_w = relax.const(np.ascontiguousarray(np.take(w_np, p.order, axis=1)), str(w.ty.dtype))
        args = [p.src, new_w] + [self.visit_expr(f) for f in fields[2:]]
        out_ty = call.ty_args[0]
        self._emit(var, relax.call_tir(gv, args, relax.TensorType([ops.dim(d) for d in out_ty.shape], out_ty.dtype)))
        self.folded += 1
        return True

    def _try_fold(self, var, call: relax.Call) -> bool:
        take = self._as_permutation_take(call)
        if take is not None:
            self.permuted[var] = take
            return True
        if not any(isinstance(a, relax.Var) and a in self.permuted for a in call.args) and _op_name(call) != "relax.call_tir":
            return False
        name = _op_name(call)
        if name in _CHANNEL_ALIKE and call.args[0] in self.permuted:
            p = self.permuted[call.args[0]]
            rest = [self.visit_expr(x) for x in call.args[1:]]
            self._emit(var, relax.Call(call.op, [p.src] + rest, call.attrs, call.ty_args), _Permuted(None, p.order, p.axis))
            return True
        if name in _POOL_NCHW and call.args[0] in self.permuted:
            p = self.permuted[call.args[0]]
            if p.axis != 1 or str(call.attrs.layout) != "NCHW" or str(call.attrs.out_layout) != "NCHW":
                return False
            self._emit(var, relax.Call(call.op, [p.src], call.attrs, call.ty_args), _Permuted(None, p.order, 1))
            return True
        if name in _ELEMENTWISE_BINARY:
            return self._fold_binary(var, call)
        if name == "relax.nn.layer_norm" and call.args[0] in self.permuted:
            return self._fold_layer_norm(var, call)
        if name == "relax.reshape" and call.args[0] in self.permuted:
            return self._fold_reshape(var, call)
        if name == "relax.call_tir":
            folded = self._fold_activation(var, call)
            return folded if folded is not None else self._fold_into_consumer(var, call)
        return False

    def _fold_activation(self, var, call) -> Optional[bool]:
        """The activation functions around a layer (None: ``call`` is none of them).

        Quantizers are elementwise in ``x`` (a per-token quantizer's exponents are per row, in
        no channel order): their codes keep ``x``'s order. A token's exponent is a max over
        its channels, in any order. The per-token epilogue adds a per-channel bias, permuted
        at compile time; its output stays a layer's output."""
        op = self._callee_op(call)
        if op not in contract.ACTIVATION_OPS:
            return None
        fields = list(call.args[1].fields)
        p = self.permuted.get(fields[0])
        if p is None or any(f in self.permuted for f in fields[1:]) or p.axis != len(_shape(fields[0])) - 1 \
                and op != contract.QUANTIZE:
            return False
        rest = [self.visit_expr(f) for f in fields[1:]]
        if op == contract.TOKEN_EPILOGUE:
            bias = _const(fields[2])
            if bias is None:
                return False
            rest[1] = relax.const(np.ascontiguousarray(np.take(bias, p.order)), "float32")
        out_ty = call.ty_args[0]
        new_call = relax.call_tir(call.args[0], [p.src] + rest,
                                  relax.TensorType([ops.dim(d) for d in out_ty.shape], out_ty.dtype))
        if op == contract.TOKEN_EXPONENT:
            self._emit(var, new_call)
        else:
            self._emit(var, new_call, _Permuted(None, p.order, p.axis, from_layer=op == contract.TOKEN_EPILOGUE
                                                and p.from_layer))
        return True

    def _callee_op(self, call: relax.Call) -> Optional[str]:
        return rmsmp_attr(callee(self.mod_, call), contract.OP)

    # ----- the mutator hook ---------------------------------------------------------------
    def _fold_tuple(self, var, value) -> bool:
        if isinstance(value, relax.Tuple):
            if any(isinstance(f, relax.Var) and f in self.permuted for f in value.fields):
                self.pending_tuples[var] = value
                return True
            return False
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.pending_tuples:
            field = self.pending_tuples[value.tuple_value].fields[value.index]
            if isinstance(field, relax.Var) and field in self.permuted:
                self.permuted[var] = self.permuted[field]
            else:
                self.set_var_remap(var, self.visit_expr(field))
            return True
        return False

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var, value = binding.var, binding.value
        if isinstance(var, relax.DataflowVar):
            if isinstance(value, relax.Call) and self._try_fold(var, value):
                return
            if self._fold_tuple(var, value):
                return
        elif isinstance(value, relax.Call) and _op_name(value) == "relax.call_tir":
            # Leaves the dataflow block, but its result is in the model's order: absorbing is safe.
            if self._fold_into_consumer(var, value):
                return
        for v in relax.analysis.free_vars(value):
            if v in self.pending_tuples:
                tup = self.pending_tuples.pop(v)
                for f in tup.fields:
                    if isinstance(f, relax.Var) and f in self.permuted:
                        self._materialize(f)
                self.set_var_remap(v, self.builder_.emit(self.visit_expr(tup)))
        for v in relax.analysis.free_vars(value):
            if v in self.permuted:
                self._materialize(v)
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="FoldRowPermutation")
class FoldRowPermutation:
    """Fold row-group permutations into consumers (see module docstring).

    After the pass, ``self.last_stats`` holds ``{"folded": n, "kept": m}``: consumers that
    absorbed a permutation, and gathers that had to stay.
    """

    def __init__(self):
        self.last_stats = {"folded": 0, "kept": 0}

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = relax.transform.CanonicalizeBindings()(mod)
        folder = _Folder(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                folder.builder_.update_func(gv, folder.visit_expr(func))
        self.last_stats = {"folded": folder.folded, "kept": folder.kept}
        return relax.transform.DeadCodeElimination()(folder.builder_.get())
