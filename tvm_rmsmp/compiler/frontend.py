"""Import a quantized PyTorch model into Relax.

``torch.export`` keeps each RMSMP layer as one ``rmsmp::qlinear`` / ``rmsmp::qconv2d`` node;
the converters here turn each into the activation quantizer (Relax elementwise ops) and one
call to the layer's *quantized op* (see :mod:`relay_passes.ops`), whose PrimFunc carries the
layer's row schemes. Everything else goes through TVM's own torch frontend.
"""

from __future__ import annotations

import functools
import operator
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import tvm
from tvm import relax

from relay_passes import ops

from ..nn.layers import _RMSMPLayer, rmsmp_layers
from ..nn.residual import RMSMPAdd, RMSMPAvgPool, RMSMPMaxPool, rmsmp_adds, rmsmp_maxpools, rmsmp_pools
from relay_passes import contract

__all__ = ["import_model", "quantized_op_func", "emit_quantized_layer", "emit_token_quantizer", "emit_residual_add",
           "emit_global_pool", "emit_max_pool", "index_bounds"]


def quantized_op_func(layer: _RMSMPLayer, x_shape: Sequence[int]) -> tvm.tirx.PrimFunc:
    """The layer's quantized op: all rows, plain integer products, schemes as an attribute."""
    x_dtype = "int8" if layer.act_signed else "uint8"
    w_shape = tuple(layer.weight_int.shape)
    attrs = ops.rmsmp_attrs(layer.op, layer.layer_name, **{contract.ROW_SCHEMES: list(layer.schemes)})
    if layer.out_act is not None:  # RMSMPConfig(requant="fixed_point"): the integer epilogue
        attrs[contract.REQUANT] = {"qmin": layer.out_act.qmin, "qmax": layer.out_act.qmax,
                                   "out_scale": layer.out_act_scale}
    if layer.op == "dense":
        return ops.dense_func(x_shape, x_dtype, w_shape, "int8", ops.fixed_product, attrs)
    # The activation quantizer already zero-padded x (see emit_quantize_activation).
    conv = {"strides": list(layer.stride), "padding": [0, 0], "dilation": list(layer.dilation)}
    attrs[contract.CONV] = conv
    return ops.conv2d_func(
        x_shape, x_dtype, w_shape, "int8", layer.stride, (0, 0), layer.dilation, ops.fixed_product, attrs
    )


def emit_quantize_activation(bb: relax.BlockBuilder, x: relax.Expr, layer: _RMSMPLayer, pad_hw=(0, 0)) -> relax.Var:
    """The layer's activation quantizer: same float32 multiply and half-to-even rounding as torch
    (plus the convolution's zero padding, if any)."""
    shape = [ops.dim(d) for d in x.ty.shape]
    dtype = "int8" if layer.act_signed else "uint8"
    func = ops.quantize_func(
        shape, np.float32(layer.inv_act_scale), layer.qmin, layer.qmax, dtype, layer.layer_name, pad_hw,
        zero_point=layer.act_zero_point,
    )
    gv = bb.add_func(func, f"rmsmp_quantize_{contract.symbol_name(layer.layer_name)}")
    out_shape, _ = ops.output_shape(func)
    return bb.emit(relax.call_tir(gv, [x], relax.TensorType(ops.call_shape(out_shape, shape[0]), dtype)))


def _emit_func(bb: relax.BlockBuilder, func, prefix: str, layer: _RMSMPLayer, args, shape, dtype) -> relax.Var:
    gv = bb.add_func(func, f"{prefix}_{contract.symbol_name(layer.layer_name)}")
    return bb.emit(relax.call_tir(gv, args, relax.TensorType([ops.dim(d) for d in shape], dtype)))


def emit_token_quantizer(bb: relax.BlockBuilder, x: relax.Expr, layer: _RMSMPLayer) -> Tuple[relax.Var, relax.Var]:
    """Per-token activations of a 2-D ``x``: ``(x_q, e)``, the int8 codes and the int32 exponents."""
    shape = [ops.dim(d) for d in x.ty.shape]
    e = _emit_func(bb, ops.token_exponent_func(shape, layer.act_bits, layer.layer_name), "rmsmp_token_exponent",
                   layer, [x], shape[:1], "int32")
    xq = _emit_func(bb, ops.quantize_per_token_func(shape, layer.act_bits, layer.layer_name), "rmsmp_quantize",
                    layer, [x, e], shape, "int8")
    return xq, e


def emit_quantized_layer(bb: relax.BlockBuilder, x: relax.Expr, layer: _RMSMPLayer) -> relax.Var:
    x_shape = [ops.dim(d) for d in x.ty.shape]
    lead = x_shape[:-1]
    w_shape = list(layer.weight_int.shape)
    axis, rank = (-1, None) if layer.op == "dense" else (1, 4)
    if (rank is not None and len(x_shape) != rank) or x_shape[axis] != w_shape[1]:
        what = "features (last axis)" if layer.op == "dense" else "channels (axis 1 of NCHW)"
        raise ValueError(f"layer {layer.layer_name!r} ({layer.op}) takes {w_shape[1]} input {what}, "
                         f"the example inputs give it shape {x_shape}")
    if layer.op == "dense" and len(x_shape) != 2:
        # Dense ops are 2-D ([rows of activations, K]); batch/sequence axes fold into the first.
        rows = ops.dim(functools.reduce(operator.mul, lead, 1))  # symbolic with a dynamic batch
        x = bb.emit(relax.op.reshape(x, [rows, x_shape[-1]]))
        x_shape = [rows, x_shape[-1]]
    pad_hw = tuple(layer.padding) if layer.op == "conv2d" else (0, 0)
    per_token = layer.op == "dense" and layer.act_per_token
    if per_token:
        xq, e = emit_token_quantizer(bb, x, layer)
    else:
        xq = emit_quantize_activation(bb, x, layer, pad_hw)
    func = quantized_op_func(layer, [ops.dim(d) for d in xq.ty.shape])
    gv = bb.add_func(func, f"rmsmp_{layer.op}_{contract.symbol_name(layer.layer_name)}")
    out_shape, out_dtype = ops.output_shape(func)
    out_shape = ops.call_shape(out_shape, x_shape[0])
    args = [
        xq,
        relax.const(layer.weight_int.numpy(), "int8"),
        relax.const(layer.bias_int.numpy(), "int32"),
        # the fixed-point epilogue's scale is each row's exact m * 2^-s (contract.REQUANT)
        relax.const((layer.out_scale if layer.out_act is None else layer.requant_scale).numpy(), "float32"),
    ]
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, out_dtype)))
    if per_token:  # bias_int is 0 and out_scale the row scale: y0 * 2^e + bias
        y = _emit_func(bb, ops.token_epilogue_func(out_shape, layer.layer_name), "rmsmp_token_epilogue", layer,
                       [y, e, relax.const(layer.bias.numpy(), "float32")], out_shape, "float32")
    if layer.op == "dense" and len(lead) != 1:
        y = bb.emit(relax.op.reshape(y, lead + [out_shape[-1]]))
    return y


def emit_residual_add(bb: relax.BlockBuilder, a: relax.Expr, b: relax.Expr, add: RMSMPAdd) -> relax.Var:
    """An integer residual add (``rmsmp::qadd_requant``) as one :data:`contract.ADD_REQUANT` op."""
    shape = [ops.dim(d) for d in a.ty.shape]
    other = [ops.dim(d) for d in b.ty.shape]
    if shape != other:
        raise ValueError(f"residual add {add.op_name!r}: the inputs' shapes differ ({shape} and {other})")
    func = ops.add_requant_func(shape, add.requant, add.op_name)
    gv = bb.add_func(func, f"rmsmp_add_{contract.symbol_name(add.op_name)}")
    return bb.emit(relax.call_tir(gv, [a, b], relax.TensorType(shape, "float32")))


def emit_global_pool(bb: relax.BlockBuilder, x: relax.Expr, pool: RMSMPAvgPool) -> relax.Var:
    """An integer global average pooling (``rmsmp::qavgpool_requant``) as one
    :data:`contract.AVGPOOL_REQUANT` op."""
    shape = [ops.dim(d) for d in x.ty.shape]
    func = ops.avgpool_requant_func(shape, pool.requant, pool.op_name)
    gv = bb.add_func(func, f"rmsmp_avgpool_{contract.symbol_name(pool.op_name)}")
    return bb.emit(relax.call_tir(gv, [x], relax.TensorType(shape[:2] + [1, 1], "float32")))


def emit_max_pool(bb: relax.BlockBuilder, x: relax.Expr, pool: RMSMPMaxPool) -> relax.Var:
    """A max-pooling of codes (``rmsmp::qmaxpool2d``) as one :data:`contract.MAXPOOL_CODES` op."""
    shape = [ops.dim(d) for d in x.ty.shape]
    params = {"kernel": pool.kernel, "stride": pool.stride, "padding": pool.padding}
    if pool.scale_in is not None:  # the input codes' scale: the FPGA executor hands the accelerator codes
        params["scale_in"] = pool.scale_in
    func = ops.maxpool_codes_func(shape, params, pool.op_name)
    gv = bb.add_func(func, f"rmsmp_maxpool_{contract.symbol_name(pool.op_name)}")
    out_shape, _ = ops.output_shape(func)
    return bb.emit(relax.call_tir(gv, [x], relax.TensorType(ops.call_shape(out_shape, shape[0]), "float32")))


def _check_static_shape(x: relax.Expr, layer: str):
    """Every dimension of a layer's input is static but the leading one (a dynamic batch)."""
    ty = x.ty
    if not all(isinstance(d, tvm.tirx.IntImm) for d in list(ty.shape)[1:]):
        raise ValueError(f"layer {layer!r}: input shape {list(ty.shape)} has a symbolic dimension other than the "
                         "leading (batch) one; only the batch may be dynamic: compile with fixed shapes otherwise")


def _dynamic_batch_args(example_inputs: Tuple[torch.Tensor, ...]):
    """``(inputs, dynamic_shapes)`` for ``torch.export`` with dimension 0 of every input one
    symbolic batch (>= 1). A batch-1 example is traced at batch 2 (its rows repeated): torch
    specializes a size of 1."""
    batches = {int(x.shape[0]) if x.dim() else None for x in example_inputs}
    if None in batches:
        raise ValueError("dynamic_batch: every input needs a leading batch dimension; a scalar input has none")
    if len(batches) != 1:
        raise ValueError(f"dynamic_batch: the inputs' leading dimensions differ ({sorted(batches)}); they must be "
                         "one batch")
    if batches == {1}:
        example_inputs = tuple(torch.cat([x, x]) for x in example_inputs)
    batch = torch.export.Dim("batch", min=1)
    return tuple(example_inputs), tuple({0: batch} for _ in example_inputs)


def check_dynamic_batch(mod: tvm.IRModule) -> Optional[tvm.tirx.Var]:
    """The batch var of a dynamic-batch import: raise ValueError naming the input where any
    dimension but the leading one is symbolic, or the leading ones differ."""
    batch = None
    for i, param in enumerate(mod["main"].params):
        shape = list(getattr(param.ty, "shape", None) or [])
        for axis, d in enumerate(shape):
            if isinstance(d, tvm.tirx.IntImm):
                continue
            if axis != 0 or not isinstance(d, tvm.tirx.Var) or (batch is not None and not d.same_as(batch)):
                raise ValueError(f"dynamic_batch: input {i} has a symbolic dimension {axis} ({d}); only the batch "
                                 "(dimension 0, one for all inputs) may be dynamic: compile with fixed shapes")
            batch = d
    return batch


def import_model(model: torch.nn.Module, example_inputs: Tuple[torch.Tensor, ...],
                 dynamic_batch: bool = False) -> tvm.IRModule:
    """``torch.export`` the (quantized or float) model and convert it to a Relax IRModule;
    ``dynamic_batch``: dimension 0 of every input is one symbolic batch (>= 1)."""
    from tvm.relax.frontend.torch import from_exported_program

    layers = rmsmp_layers(model)
    adds = rmsmp_adds(model)
    pools = rmsmp_pools(model)
    maxpools = rmsmp_maxpools(model)

    def maxpool_converter(node, importer) -> relax.Var:
        name = node.args[-1]
        if name not in maxpools:
            raise ValueError(f"exported graph names a max-pooling of codes {name!r} the model does not have")
        return emit_max_pool(importer.block_builder, importer.env[node.args[0]], maxpools[name])

    def pool_converter(node, importer) -> relax.Var:
        name = node.args[-1]
        if name not in pools or pools[name].requant is None:
            raise ValueError(f"exported graph names an integer average pooling {name!r} the model does not have")
        return emit_global_pool(importer.block_builder, importer.env[node.args[0]], pools[name])

    def add_converter(node, importer) -> relax.Var:
        name = node.args[-1]
        if name not in adds or adds[name].requant is None:
            raise ValueError(f"exported graph names an integer residual add {name!r} the model does not have")
        a, b = (importer.env[arg] for arg in node.args[:2])
        return emit_residual_add(importer.block_builder, a, b, adds[name])

    def converter(node, importer) -> relax.Var:
        name = node.args[-1]
        if name not in layers:
            raise ValueError(f"exported graph names an RMSMP layer {name!r} the model does not have")
        x = importer.env[node.args[0]]
        _check_static_shape(x, name)
        return emit_quantized_layer(importer.block_builder, x, layers[name])

    model = model.eval()
    inputs, dynamic = _dynamic_batch_args(example_inputs) if dynamic_batch else (tuple(example_inputs), None)
    # torch 2.13 warns about its own internals when an exported program with dynamic shapes is copied
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        try:
            ep = torch.export.export(model, inputs, dynamic_shapes=dynamic)
        except Exception as err:
            raise ValueError(f"torch.export failed on the model: {type(err).__name__}: {err}") from err
        custom = {f"{op}.default": converter for op in ("qlinear", "qlinear_asym", "qlinear_per_token", "qconv2d",
                                                         "qlinear_requant", "qconv2d_requant")}
        custom["qadd_requant.default"] = add_converter
        custom["qavgpool_requant.default"] = pool_converter
        custom["qmaxpool2d.default"] = maxpool_converter
        try:
            mod = from_exported_program(ep, custom_convert_map=custom)
        except AssertionError as err:
            if "Unsupported function types" in str(err):
                raise ValueError(f"the TVM importer does not support these torch ops: {err}") from err
            raise
    if dynamic_batch and check_dynamic_batch(mod) is None:
        raise ValueError("dynamic_batch: the exported model has no symbolic batch (torch.export specialized it): "
                         "the model's result depends on the batch size; compile with fixed shapes")
    return mod


#: Ops that move an integer input's values unchanged on their way to a gather.
_VALUE_PRESERVING = {"relax.astype", "relax.reshape", "relax.permute_dims", "relax.flatten", "relax.squeeze",
                     "relax.expand_dims"}


def index_bounds(mod: tvm.IRModule) -> Dict[int, int]:
    """``{input position: n}`` for the integer inputs of ``main`` that index a constant table
    (an embedding: ``take(table, indices)``): valid values are ``0 <= i < n``. TVM's gather
    does not check its indices (torch raises), so the compiled model checks these inputs."""
    main = mod["main"]
    origin: Dict[relax.Var, int] = {p: i for i, p in enumerate(main.params)}
    bounds: Dict[int, int] = {}
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            name = contract.op_name(value)
            if name in _VALUE_PRESERVING and value.args and value.args[0] in origin:
                origin[binding.var] = origin[value.args[0]]
            elif name == "relax.take" and value.args[1] in origin and isinstance(value.args[0], tvm.ir.GenericConst):
                axis = int(value.attrs.axis) if value.attrs.axis is not None else 0
                n = int(value.args[0].ty.shape[axis])
                i = origin[value.args[1]]
                bounds[i] = min(bounds.get(i, n), n)
    return bounds
