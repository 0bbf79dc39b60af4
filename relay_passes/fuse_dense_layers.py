"""FuseDenseLayers: a split dense layer as one target kernel, where the target has one.

The passes leave a split dense layer as one row-group call per scheme, joined by a
concatenation and, where :class:`~relay_passes.fold_row_permutation.FoldRowPermutation` could
not fold it, a gather restoring the model's row order::

    g0 = call_tir(sp2_4 rows, (x, W0, b0, s0)); g1 = ...; g2 = ...
    c = concat((g0, g1, g2), axis=-1)
    y = take(c, inverse, axis=-1)                  # where the order could not be folded
                                                   # (also through reshapes keeping axis -1 last)

Where the target's kernels take convolutions (``LayerKernels.convs``; x86 with AVX-512 VNNI), the
row groups of a conv2d layer joined by a concatenation along the channels become one kernel
too (:class:`~relay_passes.contract.ConvLayer`, outputs in the concatenation's order).

A target that computes whole layers in one kernel (x86: :mod:`schedules.x86_layers`) offers
:class:`~relay_passes.contract.LayerKernels`; the pipeline hands them to this pass, which
never imports the schedules. Every layer the target accepts becomes one ``call_tir`` of its
kernel, whose outputs come in the order the graph wants them: ``y`` (or ``c``, when no
gather follows or something else reads it) is replaced, the concatenation and the gather go
away, and so do the dead group calls. A layer qualifies when its groups share the
activations, their weights, biases and scales are constants, and none has a (tuned)
schedule of its own.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import contract, ops
from .contract import ConvLayer, DenseLayer, LayerKernels, callee, const_value, op_name

__all__ = ["FuseDenseLayers", "dense_layer_at", "conv_layer_at"]


def _uses(func: relax.Function) -> Dict[relax.Var, int]:
    """How many bindings (and the function's result) read each variable of ``func``."""
    counts: Dict[relax.Var, int] = {}
    body = func.body
    values = [binding.value for block in body.blocks for binding in block.bindings] + [body.body]
    for value in values:
        for var in relax.analysis.free_vars(value):
            counts[var] = counts.get(var, 0) + 1
    return counts


def dense_layer_at(mod: tvm.IRModule, var2val, concat: relax.Call) -> Optional[Tuple[relax.Expr, DenseLayer]]:
    """``(x, layer)`` for the row groups of one dense layer joined by ``concat``, or None."""
    if op_name(concat) != "relax.concat" or not isinstance(concat.args[0], relax.Tuple):
        return None
    ndim = len(concat.ty.shape)
    if ndim != 2 or concat.attrs.axis is None or int(concat.attrs.axis) % ndim != 1:
        return None
    x, layer, groups, packed = None, None, [], []
    for field in concat.args[0].fields:
        call = var2val.get(field) if isinstance(field, relax.Var) else None
        func = callee(mod, call) if isinstance(call, relax.Call) else None
        attrs = func.attrs if func is not None else None
        if attrs is None or contract.SCHEME not in attrs or contract.REQUANT in attrs \
                or str(attrs.get(contract.OP, "")) != "dense" \
                or "tirx.is_scheduled" in attrs:
            return None  # not a row group, or one with a schedule of its own (tuned)
        xq, w, bias, scale = list(call.args[1].fields)
        values = [const_value(w), const_value(bias), const_value(scale)]
        if any(v is None for v in values) or (x is not None and not xq.same_as(x)) \
                or (layer is not None and layer != str(attrs[contract.LAYER])):
            return None
        x, layer = xq, str(attrs[contract.LAYER])
        groups.append((str(attrs[contract.SCHEME]), *values))
        packed.append(contract.PACKED in attrs)
    shape = tuple(ops.dim(d) for d in x.ty.shape)  # M symbolic with a dynamic batch: the target decides
    return x, DenseLayer(shape, str(x.ty.dtype), tuple(groups), tuple(packed))


def _kernel_size(func) -> Tuple[int, int]:
    """``(kh, kw)`` of a conv2d row group: its reduction loops over the kernel (packed weights
    keep only ``C kh kw`` codes per row)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    *_, ry, rx = sch.get_loops(sch.get_sblock(contract.ACC_BLOCK))
    return int(sch.get(ry).extent), int(sch.get(rx).extent)


def conv_layer_at(mod: tvm.IRModule, var2val, concat: relax.Call) -> Optional[Tuple[relax.Expr, ConvLayer]]:
    """``(x, layer)`` for the row groups of one conv2d layer joined by ``concat`` (NCHW, axis 1),
    or None."""
    if op_name(concat) != "relax.concat" or not isinstance(concat.args[0], relax.Tuple) \
            or len(concat.ty.shape) != 4 or concat.attrs.axis is None or int(concat.attrs.axis) % 4 != 1:
        return None
    x, layer, groups, packed, geometry = None, None, [], [], None
    for field in concat.args[0].fields:
        call = var2val.get(field) if isinstance(field, relax.Var) else None
        func = callee(mod, call) if isinstance(call, relax.Call) else None
        attrs = func.attrs if func is not None else None
        if attrs is None or contract.SCHEME not in attrs or contract.REQUANT in attrs \
                or str(attrs.get(contract.OP, "")) != "conv2d" or "tirx.is_scheduled" in attrs:
            return None
        xq, w, bias, scale = list(call.args[1].fields)
        values = [const_value(w), const_value(bias), const_value(scale)]
        conv, kernel = contract.conv_geometry(func), _kernel_size(func)
        if any(v is None for v in values) or (x is not None and not xq.same_as(x)) \
                or (layer is not None and layer != str(attrs[contract.LAYER])) or conv is None \
                or (geometry is not None and geometry != (conv, kernel)):
            return None
        x, layer, geometry = xq, str(attrs[contract.LAYER]), (conv, kernel)
        groups.append((str(attrs[contract.SCHEME]), *values))
        packed.append(contract.PACKED in attrs)
    shape = tuple(ops.dim(d) for d in x.ty.shape)
    conv, kernel = geometry
    return x, ConvLayer(shape, str(x.ty.dtype), kernel, tuple(conv["strides"]), tuple(conv["padding"]),
                        tuple(conv["dilation"]), tuple(groups), tuple(packed))


@tvm.transform.module_pass(opt_level=0, name="FuseDenseLayers")
class FuseDenseLayers:
    """Every split dense layer ``kernels.accepts`` as one kernel (module docstring);
    ``last_fused`` counts them."""

    def __init__(self, kernels: LayerKernels):
        self.kernels = kernels
        self.last_fused = 0

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        original, kernels, fused = mod, self.kernels, 0

        @mutator
        class _Fuse(PyExprMutator):
            def __init__(self, mod, var2val, uses):
                super().__init__(mod)
                self.var2val, self.uses, self.fused = var2val, uses, 0
                self.cache: Dict[tuple, tvm.ir.GlobalVar] = {}
                self.folded = []  # concatenations whose only reader is a gather folded into the kernel
                for value in var2val.values():
                    data = value.args[0] if op_name(value) == "relax.take" else None
                    found = self._gather(value) if isinstance(data, relax.Var) and uses.get(data, 0) == 1 else None
                    if found is not None:
                        self.folded.append(found[2])

            def _accepted(self, concat) -> Optional[Tuple[relax.Expr, DenseLayer]]:
                found = dense_layer_at(original, self.var2val, concat)
                if found is None and kernels.convs:
                    found = conv_layer_at(original, self.var2val, concat)
                return found if found is not None and kernels.accepts(found[1]) else None

            def _gather(self, take: relax.Call):
                """(x and layer, output order, concatenation) of a gather over an accepted
                layer's concatenation (through reshapes that keep the channel axis last and
                have no other reader), or None."""
                data, indices = take.args
                index = const_value(indices)
                ndim = len(take.ty.shape) if take.ty is not None else 0
                if index is None or index.ndim != 1 or ndim < 2 or take.attrs.axis is None \
                        or int(take.attrs.axis) % ndim != ndim - 1 or not isinstance(data, relax.Var):
                    return None
                source = self.var2val.get(data)
                while op_name(source) == "relax.reshape" and isinstance(source.args[0], relax.Var) \
                        and self.uses.get(source.args[0], 0) == 1:
                    source = self.var2val.get(source.args[0])
                found = self._accepted(source) if op_name(source) == "relax.concat" else None
                if found is None or not isinstance(found[1], DenseLayer) or sorted(index.tolist()) != list(range(len(found[1].concat_order))):
                    return None
                return found, [found[1].concat_order[i] for i in index], source

            def _call(self, x: relax.Expr, layer: DenseLayer, order: List[Tuple[int, int]]) -> relax.Call:
                key, name, make, constants = kernels.build(layer, order)
                if key not in self.cache:
                    self.cache[key] = self.builder_.add_func(make(), name)
                args = [x] + [relax.const(a, dtype) for a, dtype in constants]
                shape = [layer.x_shape[0], len(order)] if isinstance(layer, DenseLayer) else list(layer.out_shape)
                return relax.call_tir(self.cache[key], args, relax.TensorType(shape, "float32"))

            def visit_call_(self, call):
                if op_name(call) == "relax.take":
                    found = self._gather(call)
                    if found is not None and any(found[2].same_as(c) for c in self.folded):
                        self.fused += 1
                        (x, layer), order, _ = found
                        fused = self._call(x, layer, order)
                        shape = [ops.dim(d) for d in call.ty.shape]
                        if shape == [layer.x_shape[0], len(order)]:
                            return fused
                        return relax.op.reshape(self.builder_.emit(fused), shape)
                if op_name(call) == "relax.concat" and not any(call.same_as(c) for c in self.folded):
                    found = self._accepted(call)
                    if found is not None:
                        self.fused += 1
                        return self._call(found[0], found[1], found[1].concat_order)
                return super().visit_call_(call)

        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function):
                continue
            fuser = _Fuse(mod, relax.analysis.get_var2val(func), _uses(func))
            new_func = fuser.visit_expr(func)
            if fuser.fused:
                fused += fuser.fused
                mod = fuser.builder_.get()
                mod[gv] = new_func
        self.last_fused = fused
        if not fused:
            return original
        return relax.transform.DeadCodeElimination()(mod)
