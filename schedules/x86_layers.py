"""Whole dense layers in one x86 kernel (part of the CPU target's ``prepare`` step).

The passes leave a split dense layer as one row-group call per scheme, joined by a
concatenation and, where :class:`~relay_passes.fold_row_permutation.FoldRowPermutation` could
not fold it, a gather restoring the model's row order::

    g0 = call_tir(sp2_4 rows, (x, W0, b0, s0)); g1 = ...; g2 = ...
    c = concat((g0, g1, g2), axis=-1)
    y = take(c, inverse, axis=-1)                  # where the order could not be folded
                                                   # (also through reshapes keeping axis -1 last)

On AVX-512 VNNI every such layer becomes one kernel whose outputs come in the order the
graph wants them (on AVX2 every layer with at most
:data:`~schedules.x86_gemv.GEMV_MAX_ROWS_AVX2` activation rows), so the concatenation and
the gather go away (128 x 3072 outputs: 35 + 141 us of a 2.0 ms layer), and so do two of
three kernel launches. ``y`` (or ``c``, when no gather
follows or something else reads it) becomes one ``call_tir`` of that kernel; the dead group
calls are removed. The kernel:

* up to :func:`~schedules.x86_gemv.gemv_max_rows` activation rows (batch 1, small batches):
  :func:`~schedules.x86_gemv.gemv_layer_kernel`, two rows' codes per byte, decoded in
  registers, since there the vector operations per weight byte are the bound;
* more rows (VNNI): :func:`~schedules.x86_intrin.layer_dense_kernel`: the groups are decoded
  to int8 once per call, into one matrix in output order, then one outer-product GEMM. (On
  AVX2 such layers keep a kernel per row group, the outer-product one.)
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.target import Target
from tvm.target.codegen import target_has_features

from relay_passes import contract
from relay_passes.contract import callee, const_value, op_name
from tvm_rmsmp.quant.schemes import get_scheme, nibble_decode

from .x86_gemv import (
    INT8,
    LINEAR,
    block_pairs,
    gemv_layer_kernel,
    gemv_layer_weights,
    gemv_max_rows,
)
from .x86_intrin import layer_dense_kernel, layer_weights, x86_isa

__all__ = ["fuse_dense_layers"]


def _uses(func: relax.Function) -> Dict[relax.Var, int]:
    """How many bindings (and the function's result) read each variable of ``func``."""
    counts: Dict[relax.Var, int] = {}
    body = func.body
    values = [binding.value for block in body.blocks for binding in block.bindings] + [body.body]
    for value in values:
        for var in relax.analysis.free_vars(value):
            counts[var] = counts.get(var, 0) + 1
    return counts


class _Layer:
    """The row groups of one dense layer joined by a concatenation, in concatenation order."""

    def __init__(self, x: relax.Expr, groups: List[Tuple[str, np.ndarray, np.ndarray, np.ndarray]]):
        self.x, self.groups = x, groups  # groups: (scheme, stored weights, bias, scale)

    @property
    def concat_order(self) -> List[Tuple[int, int]]:
        return [(gi, r) for gi, (_, w, _, _) in enumerate(self.groups) for r in range(w.shape[0])]


def _layer(mod: tvm.IRModule, var2val, concat: relax.Call, max_rows: Optional[int]) -> Optional[_Layer]:
    """The layer behind ``concat`` if one kernel can compute it (with at most ``max_rows``
    activation rows, None: any), else None."""
    if op_name(concat) != "relax.concat" or not isinstance(concat.args[0], relax.Tuple):
        return None
    ndim = len(concat.ty.shape)
    if ndim != 2 or concat.attrs.axis is None or int(concat.attrs.axis) % ndim != 1:
        return None
    x, layer, groups, tables = None, None, [], set()
    for field in concat.args[0].fields:
        call = var2val.get(field) if isinstance(field, relax.Var) else None
        func = callee(mod, call) if isinstance(call, relax.Call) else None
        attrs = func.attrs if func is not None else None
        if attrs is None or contract.SCHEME not in attrs or str(attrs.get(contract.OP, "")) != "dense" \
                or "tirx.is_scheduled" in attrs:
            return None  # not a row group, or one with a schedule of its own (tuned)
        xq, w, bias, scale = list(call.args[1].fields)
        values = [const_value(w), const_value(bias), const_value(scale)]
        if any(v is None for v in values) or (x is not None and not xq.same_as(x)) \
                or (layer is not None and layer != str(attrs[contract.LAYER])):
            return None
        x, layer = xq, str(attrs[contract.LAYER])
        scheme = str(attrs[contract.SCHEME])
        if contract.PACKED in attrs:
            tables.add(scheme)
        elif get_scheme(scheme).kind != "fixed" or values[0].dtype != np.int8:
            return None  # unpacked SP2 codes
        groups.append((scheme, *values))
    if len(tables) > 2 or str(x.ty.dtype) not in ("uint8", "int8"):
        return None
    if max_rows is not None and int(x.ty.shape[0]) > max_rows:
        return None
    return _Layer(x, groups)


def _gemv_call(builder: relax.BlockBuilder, layer: _Layer, order: Sequence[Tuple[int, int]], cores: int,
               isa: str, vbmi: bool, kernels: Dict[tuple, tvm.ir.GlobalVar]):
    """:func:`_kernel_call` for a few activation rows: :func:`~schedules.x86_gemv.gemv_layer_kernel`."""
    schemes = [g[0] for g in layer.groups]
    levels = [nibble_decode(np.arange(16), get_scheme(s)) if w.dtype == np.uint8 else None
              for s, w, _, _ in layer.groups]
    tables: List[str] = []
    kinds = []
    for (scheme, w, _, _), lv in zip(layer.groups, levels):
        if lv is None:
            kinds.append(INT8)
        elif lv.min() >= -8 and lv.max() <= 7:
            kinds.append(LINEAR)
        else:
            if scheme not in tables:
                tables.append(scheme)
            kinds.append(tables.index(scheme))
    m, k = (int(d) for d in layer.x.ty.shape)
    x_dtype = str(layer.x.ty.dtype)
    bias = np.array([layer.groups[gi][2][r] for gi, r in order], np.int64)
    scale = np.array([layer.groups[gi][3][r] for gi, r in order], np.float32)
    gemv, w4, w8, dest, bias, scale = gemv_layer_weights(order, [g[1] for g in layer.groups], kinds, levels, bias,
                                                         scale, k, x_dtype, pairs=block_pairs(m, isa), isa=isa)
    key = ("gemv", m, gemv, x_dtype, tuple(schemes), tuple(tables))
    if key not in kernels:
        kernel = gemv_layer_kernel(gemv, x_dtype, [levels[schemes.index(s)] for s in tables], vbmi=vbmi,
                                   num_cores=cores, m=m)
        kernels[key] = _add_kernel(builder, kernel, schemes, f"x86-{isa}-gemv",
                                   f"rmsmp_dense_layer_{m}x{k}x{len(order)}")
    consts = [relax.const(w4, "uint8"), relax.const(w8, "int8"), relax.const(dest, "int32"),
              relax.const(bias, "int32"), relax.const(scale, "float32")]
    return relax.call_tir(kernels[key], [layer.x] + consts, relax.TensorType([m, len(order)], "float32"))


def _add_kernel(builder: relax.BlockBuilder, kernel: tvm.tirx.PrimFunc, schemes: Sequence[str], cpu_kernel: str,
                name: str) -> tvm.ir.GlobalVar:
    attrs = {contract.OP: "dense", contract.SCHEMES: list(schemes), "op_pattern": 8,
             contract.CPU_KERNEL: cpu_kernel, "tirx.is_scheduled": True}
    for key, value in attrs.items():
        kernel = kernel.with_attr(key, value)
    return builder.add_func(kernel, name)


def _kernel_call(builder: relax.BlockBuilder, layer: _Layer, order: Sequence[Tuple[int, int]], cores: int,
                 isa: str, vbmi: bool, kernels: Dict[tuple, tvm.ir.GlobalVar]):
    """``call_tir`` of the layer kernel producing output row ``c`` from ``order[c]``. Layers of
    the same shape and schemes share one kernel (``kernels``): their weights are arguments,
    so MiniLM-L6's 36 dense layers build 3 kernels."""
    if int(layer.x.ty.shape[0]) <= gemv_max_rows(isa):
        return _gemv_call(builder, layer, order, cores, isa, vbmi, kernels)
    schemes = [g[0] for g in layer.groups]
    tables = list(dict.fromkeys(s for s, w, _, _ in layer.groups if w.dtype == np.uint8))
    table_of_group = [tables.index(s) if w.dtype == np.uint8 else -1 for s, w, _, _ in layer.groups]
    m, k = (int(d) for d in layer.x.ty.shape)
    n, x_dtype = len(order), str(layer.x.ty.dtype)
    codes, kinds, w8, cols8 = layer_weights(order, [g[1] for g in layer.groups], table_of_group, k)
    bias = np.array([layer.groups[gi][2][r] for gi, r in order], np.int32)
    scale = np.array([layer.groups[gi][3][r] for gi, r in order], np.float32)
    n_int8 = sum(1 for gi, _ in order if table_of_group[gi] < 0)
    key = (m, k, n, x_dtype, tuple(schemes), tuple(tables), n_int8)
    if key not in kernels:
        levels = [nibble_decode(np.arange(16), get_scheme(s)) for s in tables] or [np.zeros(16, np.int64)]
        kernel = layer_dense_kernel(m, k, n, x_dtype, levels, n_int8, num_cores=cores, vbmi=vbmi)
        kernels[key] = _add_kernel(builder, kernel, schemes, "x86-avx512vnni-layer", f"rmsmp_dense_layer_{m}x{k}x{n}")
    consts = [relax.const(codes, "uint8"), relax.const(kinds, "uint8"), relax.const(w8, "int8"),
              relax.const(cols8, "int32"), relax.const(bias, "int32"), relax.const(scale, "float32")]
    return relax.call_tir(kernels[key], [layer.x] + consts, relax.TensorType([m, n], "float32"))


def fuse_dense_layers(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """Every split dense layer as one kernel (module docstring); ``mod`` as it is on targets
    without AVX2."""
    isa = x86_isa(target)
    if isa not in ("avx512vnni", "avx2"):
        return mod
    max_rows = None if isa == "avx512vnni" else gemv_max_rows(isa)
    cores = int(target.attrs.get("num-cores", 0) or 0) or (os.cpu_count() or 1)
    vbmi = target_has_features("avx512vbmi", target)
    original = mod

    @mutator
    class _Fuse(PyExprMutator):
        def __init__(self, mod, var2val, uses):
            super().__init__(mod)
            self.var2val, self.uses, self.fused = var2val, uses, 0
            self.kernels: Dict[tuple, tvm.ir.GlobalVar] = {}
            self.folded = []  # concatenations whose only reader is a gather folded into the kernel
            for value in var2val.values():
                data = value.args[0] if op_name(value) == "relax.take" else None
                found = self._gather(value) if isinstance(data, relax.Var) and uses.get(data, 0) == 1 else None
                if found is not None:
                    self.folded.append(found[2])

        def _is_folded(self, concat) -> bool:
            return any(concat.same_as(c) for c in self.folded)

        def _gather(self, take: relax.Call):
            """(layer, output order, concatenation) of a gather over a fusable layer's
            concatenation (through reshapes that keep the channel axis last and have no other
            reader), or None."""
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
            layer = _layer(original, self.var2val, source, max_rows) if op_name(source) == "relax.concat" else None
            if layer is None or sorted(index.tolist()) != list(range(len(layer.concat_order))):
                return None
            return layer, [layer.concat_order[i] for i in index], source

        def visit_call_(self, call):
            if op_name(call) == "relax.take":
                found = self._gather(call)
                if found is not None and self._is_folded(found[2]):
                    self.fused += 1
                    out = self.builder_.emit(_kernel_call(self.builder_, found[0], found[1], cores, isa, vbmi,
                                                                  self.kernels))
                    shape = [int(d) for d in call.ty.shape]
                    return out if shape == [int(d) for d in out.ty.shape] else relax.op.reshape(out, shape)
            if op_name(call) == "relax.concat" and not self._is_folded(call):
                layer = _layer(original, self.var2val, call, max_rows)
                if layer is not None:
                    self.fused += 1
                    return _kernel_call(self.builder_, layer, layer.concat_order, cores, isa, vbmi, self.kernels)
            return super().visit_call_(call)

    fused = 0
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        fuser = _Fuse(mod, relax.analysis.get_var2val(func), _uses(func))
        new_func = fuser.visit_expr(func)
        if fuser.fused:
            fused += fuser.fused
            mod = fuser.builder_.get()
            mod[gv] = new_func
    if not fused:
        return original
    return relax.transform.DeadCodeElimination()(mod)
