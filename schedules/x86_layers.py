"""Whole dense layers in one x86 kernel: the :class:`~relay_passes.contract.LayerKernels` the
CPU target offers ``relay_passes.FuseDenseLayers`` (the pass matches the layers; this module
says which it can compute and builds the kernels).

On AVX-512 VNNI every split dense layer becomes one kernel whose outputs come in the order the
graph wants them (on AVX2 every layer of a static number of rows), so the concatenation and
the gather go away (128 x 3072 outputs: 35 + 141 us of a 2.0 ms layer), and so do two of
three kernel launches. The kernel:

* up to :func:`~schedules.x86_gemv.gemv_max_rows` activation rows (batch 1, small batches):
  :func:`~schedules.x86_gemv.gemv_layer_kernel`, two rows' codes per byte, decoded in
  registers, since there the vector operations per weight byte are the bound;
* more rows (VNNI): one outer-product GEMM on 512-bit ``vpdpbusd``, outputs in the graph's
  order. A static number of rows: :func:`~schedules.x86_intrin.layer_int8_kernel`, every row
  decoded to int8 at compile time and laid out per register tile (one byte per weight, as on
  AMX); a dynamic batch: :func:`~schedules.x86_intrin.layer_dense_kernel`, the packed rows
  decoded per call. Both BERT FFN layers, 60:35:5 rows, one thread, CPU time: 24 rows 339
  against 485 us (the batch-1 kernel 440), 32 rows 445 against 568, 128 rows 1609 against
  1728 (``RMSMP_AMX=0 python -m bench.layer_kernels --int8 --cpu-time --rows 24 32 128``, the
  AMX Xeon, LLVM rocketlake, machine shared: load 2-3).
* more rows (AVX2, static): :func:`~schedules.x86_intrin.layer_avx2_kernel`, the 4-bit rows
  decoded to bytes at compile time for ``vpmaddubsw`` and the 8-bit rows to int16 pairs for
  ``vpmaddwd`` (which do not saturate), the latter written over their slots. BERT FFN at 128
  rows, two threads, on the AMX Xeon with AVX-512 hidden from CPUID (``python -m bench.cpu
  --avx2-only``): 3.79 ms with a kernel per row group, a concatenation and a gather (a run made
  before this kernel), 2.99 ms with one kernel per layer (ONNX Runtime int8 3.88 ms,
  ``bench/results/cpu-xeon-avx2-2t.json``). A dynamic batch keeps the row groups.

With AMX-INT8 the dense layers from :data:`~schedules.x86_amx.AMX_MIN_ROWS` rows on run
:func:`~schedules.x86_amx.amx_dense_kernel`, and the conv2d layers too become one kernel each
(``LayerKernels.convs``; :class:`~relay_passes.contract.ConvLayer`):
:func:`~schedules.x86_amx_conv.amx_conv_kernel` over all the layer's rows, decoded to int8 at
compile time, so the activations are staged once per layer instead of once per row group, the
16-row tiles are not padded per group and the concatenation goes away (ResNet-18's 64 -> 64
3x3 conv at batch 8, one thread: 1.86 ms for a kernel per row group, 1.04 for one per layer;
the whole model 66.1 -> 54.0 ms; ``python -m bench.amx_conv --model``).

On AVX-512 VNNI without AMX (absent, ``RMSMP_AMX=0``, or refused by the OS) a conv layer of a
static batch of two or more images is one kernel too (``x86-avx512vnni-conv-layer``): the int8
rows' :func:`~schedules.x86_intrin.gemm_kernel` (per-tap GEMMs over channel-last activations,
or an im2col in tap order for the 3-channel stem) over all its rows, decoded to int8 at compile
time in the graph's order (:func:`_vnni_conv_build`), on 512-bit MACs where the channels fill
64-byte steps. ResNet-18 at batch 8, one thread: 190 ms with a kernel per row group, 140 with
one per layer, 124 with 512-bit MACs (``RMSMP_AMX=0 python -m bench.profile_model --batch 8``,
the AMX Xeon, load about 2; the stem alone 31 -> about 8 ms). One image keeps a kernel per row
group.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm.target import Target
from tvm.target.codegen import target_has_features

from relay_passes import contract
from relay_passes.contract import ConvLayer, DenseLayer, LayerKernels
from tvm_rmsmp.quant.schemes import get_scheme, nibble_decode, unpack_nibbles

from .registry import target_cores
from .x86_amx import AMX_MIN_ROWS, amx_dense_kernel, amx_enabled, amx_weights
from .x86_amx_conv import AmxConvPlan, amx_conv_applies, amx_conv_folds, amx_conv_kernel, amx_conv_weights
from .x86_bounds import INT8 as INT8_RANGE
from .x86_bounds import KernelBoundError, KernelBoundWarning, activation_range, max_k
from .x86_gemv import (
    INT8,
    LINEAR,
    GemvLayout,
    block_pairs,
    gemv_layer_bounds,
    gemv_layer_kernel,
    gemv_layer_weights,
    gemv_max_rows,
)
from .x86_intrin import (
    ConvGeometry,
    gemm_kernel,
    layer_avx2_bounds,
    layer_avx2_kernel,
    layer_avx2_weights,
    layer_dense_bounds,
    layer_dense_kernel,
    layer_int8_kernel,
    layer_int8_weights,
    layer_weights,
    tap_order_weights,
    taps_first_weights,
    x86_isa,
)
from .x86_tuning_table import target_cpu

__all__ = ["x86_layer_kernels"]


def _conv_geometry(layer: ConvLayer) -> ConvGeometry:
    return ConvGeometry(*layer.x_shape, *layer.kernel, layer.strides, layer.dilation)


def _accepts_conv(layer: ConvLayer) -> bool:
    """Whether the AMX conv kernel computes the conv layer: static shapes, no padding (the
    activation quantizer pads), int8/uint8 activations, packed 4-bit or int8 groups, the
    geometry :func:`~schedules.x86_amx_conv.amx_conv_applies` takes, the int32 bound."""
    if not all(isinstance(d, int) for d in layer.x_shape) or any(int(p) for p in layer.padding) \
            or layer.x_dtype not in ("uint8", "int8"):
        return False
    for (scheme, w, _, _), packed in zip(layer.groups, layer.packed):
        if not packed and (get_scheme(scheme).kind != "fixed" or w.dtype != np.int8):
            return False
    conv = _conv_geometry(layer)
    n = layer.out_shape[1]
    return amx_conv_applies(conv, n) and conv.k <= max_k(activation_range(layer.x_dtype), INT8_RANGE)


def _accepts_vnni_conv(layer: ConvLayer) -> bool:
    """Whether the VNNI conv layer kernel computes the conv layer (no AMX): what
    :func:`_accepts_conv` asks of the layer, a static batch of at least two images (batch 1
    keeps its row groups' kernels), and input channels that fill whole 32-byte steps (the
    per-tap GEMMs over channel-last activations) or no dilation along the width (an im2col in
    tap order: the 3-channel stem)."""
    if not all(isinstance(d, int) for d in layer.x_shape) or any(int(p) for p in layer.padding) \
            or layer.x_dtype not in ("uint8", "int8") or layer.x_shape[0] < 2 \
            or (layer.x_shape[1] % 32 and int(layer.dilation[1]) != 1):
        return False
    for (scheme, w, _, _), packed in zip(layer.groups, layer.packed):
        if not packed and (get_scheme(scheme).kind != "fixed" or w.dtype != np.int8):
            return False
    return _conv_geometry(layer).k <= max_k(activation_range(layer.x_dtype), INT8_RANGE)


def _conv_rows(layer: ConvLayer, order: Sequence[Tuple[int, int]]):
    """``(weights [n, C, kh, kw] int8, bias, scale)`` in output order, every row decoded to int8."""
    conv = _conv_geometry(layer)
    c, kh, kw = conv.channels, conv.kh, conv.kw
    decoded = [nibble_decode(unpack_nibbles(w, c * kh * kw), get_scheme(scheme)).astype(np.int8).reshape(-1, c, kh, kw)
               if packed else w for (scheme, w, _, _), packed in zip(layer.groups, layer.packed)]
    weights = np.stack([decoded[gi][r] for gi, r in order]).astype(np.int8)
    bias = np.array([layer.groups[gi][2][r] for gi, r in order], np.int32)
    scale = np.array([layer.groups[gi][3][r] for gi, r in order], np.float32)
    return weights, bias, scale


def _vnni_conv_build(layer: ConvLayer, order: Sequence[Tuple[int, int]], cores: int, cpu: Optional[str]):
    """:func:`_build` for a conv layer on VNNI without AMX: the int8 rows' per-tap GEMM kernel
    (:func:`~schedules.x86_intrin.gemm_kernel`) over all the layer's rows, decoded to int8 at
    compile time in output order and reordered taps first: the activations staged once per
    call instead of once per row group, no concatenation. ResNet-18's 3x3 convolutions at batch
    8, one thread, CPU time, one kernel vs the three groups' (60:35:5): 64 -> 64 @56 7.7 vs 11.9
    ms, 128 @28 6.3 vs 8.2, 256 @14 6.2 vs 7.7, 512 @7 5.6 vs 6.2 (the AMX Xeon, AMX off)."""
    conv, schemes = _conv_geometry(layer), [g[0] for g in layer.groups]
    c, kh, kw = conv.channels, conv.kh, conv.kw
    weights, bias, scale = _conv_rows(layer, order)
    key = ("vnni-conv", conv, len(order), layer.x_dtype)

    def make():
        # 512-bit MACs where the channels fill 64-byte steps: ResNet-18's 3x3 convs at batch 8, one
        # thread, 64 @56 7.45 -> 6.71 ms, 128 @28 6.13 -> 5.00, 256 @14 5.74 -> 3.89, 512 @7 5.13 -> 3.45
        kernel = gemm_kernel(conv.m, conv.k, len(order), layer.x_dtype, None, "avx512vnni", conv=conv, num_cores=cores,
                             taps_first=True, cpu=cpu, vec=64 if c % 64 == 0 else None)
        return _with_attrs(kernel, schemes, "x86-avx512vnni-conv-layer").with_attr(contract.OP, "conv2d")

    # the layout the kernel reads: taps first (per-tap GEMMs), or the columns of its im2col (tap order)
    tap_order = make().attrs.get(contract.WEIGHT_TAP_ORDER)
    laid_out = (taps_first_weights(weights, c, kh, kw) if tap_order is None
                else tap_order_weights(weights, c, kh, kw, int(tap_order[3])))
    name = f"rmsmp_conv2d_layer_{conv.batch}x{c}x{conv.height}x{conv.width}_{kh}x{kw}s{conv.strides[0]}x{len(order)}"
    return key, name, make, [(laid_out, "int8"), (bias, "int32"), (scale, "float32")]


def _amx_conv_build(layer: ConvLayer, order: Sequence[Tuple[int, int]], cores: int):
    """:func:`_build` for a conv layer (:mod:`schedules.x86_amx_conv`): every row decoded to int8
    at compile time, one weight tensor in output order; the activations staged once per call
    for all the layer's rows (three times, one kernel per row group)."""
    conv, schemes = _conv_geometry(layer), [g[0] for g in layer.groups]
    c, kh, kw = conv.channels, conv.kh, conv.kw
    weights, bias, scale = _conv_rows(layer, order)
    fold = amx_conv_folds(conv)
    plan = AmxConvPlan(conv.batch, c, conv.height, conv.width, kh, kw, *conv.strides, len(order), fold)
    key = ("amx-conv", plan, layer.x_dtype)

    def make():
        kernel = _with_attrs(amx_conv_kernel(plan, layer.x_dtype, "int8", num_cores=cores), schemes,
                             "x86-amx-conv-layer")
        return kernel.with_attr(contract.OP, "conv2d")

    name = f"rmsmp_conv2d_layer_{conv.batch}x{c}x{conv.height}x{conv.width}_{kh}x{kw}s{conv.strides[0]}x{len(order)}"
    return key, name, make, [(amx_conv_weights(weights, fold), "int8"), (bias, "int32"), (scale, "float32")]


def _accepts(layer: DenseLayer, isa: str, cpu: Optional[str], amx: bool = False) -> bool:
    """Whether one x86 layer kernel computes ``layer``: packed 4-bit groups of at most two
    decode tables, int8 fixed-point groups, int8/uint8 activations, a static number of rows
    (AVX2) or any (VNNI), a reduction within the kernel's integer bounds. A conv layer
    (:class:`~relay_passes.contract.ConvLayer`): only on AMX (:func:`_accepts_conv`)."""
    if isinstance(layer, ConvLayer):
        return _accepts_conv(layer) if amx else isa == "avx512vnni" and _accepts_vnni_conv(layer)
    tables = {scheme for (scheme, _, _, _), packed in zip(layer.groups, layer.packed) if packed}
    for (scheme, w, _, _), packed in zip(layer.groups, layer.packed):
        if not packed and (get_scheme(scheme).kind != "fixed" or w.dtype != np.int8):
            return False  # unpacked SP2 codes
    if len(tables) > 2 or layer.x_dtype not in ("uint8", "int8"):
        return False
    if not isinstance(layer.x_shape[0], int):  # a dynamic batch: the outer-product kernel, any rows (VNNI)
        return isa == "avx512vnni" and _within_bounds(layer, isa, cpu)
    if amx and layer.x_shape[0] >= AMX_MIN_ROWS:  # int8 products in int32 tiles: K up to 65793
        return int(layer.x_shape[1]) <= max_k(activation_range(layer.x_dtype), INT8_RANGE)
    return _within_bounds(layer, isa, cpu)


def _within_bounds(layer: DenseLayer, isa: str, cpu: Optional[str]) -> bool:
    """Whether the layer kernel's integer sums fit for this layer's reduction length
    (:mod:`schedules.x86_bounds`); if not, a warning, and the row groups keep their own kernels
    (which fall back to the portable schedule the same way)."""
    m, k = layer.x_shape
    static = isinstance(m, int)
    levels = [nibble_decode(np.arange(16), get_scheme(scheme)) if packed else None
              for (scheme, _, _, _), packed in zip(layer.groups, layer.packed)]
    tables = list(dict.fromkeys(g[0] for g, lv in zip(layer.groups, levels)
                                if lv is not None and not (lv.min() >= -8 and lv.max() <= 7)))
    try:
        if static and m <= gemv_max_rows(isa, cpu):
            linear = any(lv is not None and lv.min() >= -8 and lv.max() <= 7 for lv in levels)
            layout = GemvLayout(k, 1, int(linear), (1,) * len(tables), int(any(lv is None for lv in levels)),
                                vec=64 if isa == "avx512vnni" else 32)
            gemv_layer_bounds(layout, layer.x_dtype, [levels[[g[0] for g in layer.groups].index(t)] for t in tables])
        elif isa == "avx2":
            layer_avx2_bounds(k, layer.x_dtype, sorted({int(v) for lv in levels if lv is not None for v in lv}),
                              sum(lv is None for lv in levels))
        else:
            layer_dense_bounds(k, layer.x_dtype, [lv for lv in levels if lv is not None],
                               sum(lv is None for lv in levels))
    except KernelBoundError as err:
        warnings.warn(f"dense layer {m}x{k}: {err}; its row groups keep their own kernels", KernelBoundWarning,
                      stacklevel=2)
        return False
    return True


def _gemv_build(layer: DenseLayer, order: Sequence[Tuple[int, int]], cores: int, isa: str, vbmi: bool,
                cpu: Optional[str]):
    """:func:`_build` for a few activation rows: :func:`~schedules.x86_gemv.gemv_layer_kernel`."""
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
    m, k = layer.x_shape
    x_dtype = layer.x_dtype
    bias = np.array([layer.groups[gi][2][r] for gi, r in order], np.int64)
    scale = np.array([layer.groups[gi][3][r] for gi, r in order], np.float32)
    gemv, w4, w8, dest, bias, scale = gemv_layer_weights(order, [g[1] for g in layer.groups], kinds, levels, bias,
                                                         scale, k, x_dtype, pairs=block_pairs(m, isa, cpu), isa=isa)
    key = ("gemv", m, gemv, x_dtype, tuple(schemes), tuple(tables))

    def make():
        kernel = gemv_layer_kernel(gemv, x_dtype, [levels[schemes.index(s)] for s in tables], vbmi=vbmi,
                                   num_cores=cores, m=m, cpu=cpu)
        return _with_attrs(kernel, schemes, f"x86-{isa}-gemv")

    consts = [(w4, "uint8"), (w8, "int8"), (dest, "int32"), (bias, "int32"), (scale, "float32")]
    return key, f"rmsmp_dense_layer_{m}x{k}x{len(order)}", make, consts


def _with_attrs(kernel: tvm.tirx.PrimFunc, schemes: Sequence[str], cpu_kernel: str) -> tvm.tirx.PrimFunc:
    attrs = {contract.OP: "dense", contract.SCHEMES: list(schemes), "op_pattern": 8,
             contract.CPU_KERNEL: cpu_kernel, "tirx.is_scheduled": True}
    for key, value in attrs.items():
        kernel = kernel.with_attr(key, value)
    return kernel


def _decoded(layer: DenseLayer, order: Sequence[Tuple[int, int]]):
    """``(weights [n, k] int8, bias, scale)`` in output order, every row decoded to int8."""
    k = int(layer.x_shape[1])
    decoded = [nibble_decode(unpack_nibbles(w, k), get_scheme(scheme)).astype(np.int8) if packed else w
               for (scheme, w, _, _), packed in zip(layer.groups, layer.packed)]
    weights = np.stack([decoded[gi][r] for gi, r in order]).astype(np.int8)
    bias = np.array([layer.groups[gi][2][r] for gi, r in order], np.int32)
    scale = np.array([layer.groups[gi][3][r] for gi, r in order], np.float32)
    return weights, bias, scale


def _int8_build(layer: DenseLayer, order: Sequence[Tuple[int, int]], cores: int, cpu: Optional[str]):
    """:func:`_build` on VNNI for a static number of rows past the batch-1 kernel's:
    :func:`~schedules.x86_intrin.layer_int8_kernel`, every row decoded to int8 at compile time."""
    m, k = (int(d) for d in layer.x_shape)
    n, schemes = len(order), [g[0] for g in layer.groups]
    weights, bias, scale = _decoded(layer, order)
    key = ("int8-layer", m, k, n, layer.x_dtype)

    def make():
        kernel = layer_int8_kernel(m, k, n, layer.x_dtype, num_cores=cores, cpu=cpu)
        return _with_attrs(kernel, schemes, "x86-avx512vnni-layer")

    return key, f"rmsmp_dense_layer_{m}x{k}x{n}", make, [(layer_int8_weights(weights, layer.x_dtype), "int8"),
                                                        (bias, "int32"), (scale, "float32")]


def _avx2_build(layer: DenseLayer, order: Sequence[Tuple[int, int]], cores: int, cpu: Optional[str]):
    """:func:`_build` on AVX2 for a static number of rows past the batch-1 kernel's:
    :func:`~schedules.x86_intrin.layer_avx2_kernel`, every row decoded at compile time (the
    4-bit ones to one int8 matrix, the 8-bit ones to int16 pairs)."""
    m, k = (int(d) for d in layer.x_shape)
    n, schemes = len(order), [g[0] for g in layer.groups]
    weights, bias, scale = _decoded(layer, order)
    is_int8 = np.array([not layer.packed[gi] for gi, _ in order])
    w4, w8, cols8 = layer_avx2_weights(weights, is_int8, layer.x_dtype)
    n_int8 = int(is_int8.sum())
    levels = sorted({int(v) for (scheme, _, _, _), packed in zip(layer.groups, layer.packed) if packed
                     for v in nibble_decode(np.arange(16), get_scheme(scheme))})
    key = ("avx2-layer", m, k, n, layer.x_dtype, tuple(levels), n_int8)

    def make():
        kernel = layer_avx2_kernel(m, k, n, layer.x_dtype, levels, n_int8, num_cores=cores, cpu=cpu)
        return _with_attrs(kernel, schemes, "x86-avx2-layer")

    bias8 = bias[cols8] if n_int8 else np.zeros(1, np.int32)
    scale8 = scale[cols8] if n_int8 else np.ones(1, np.float32)
    return key, f"rmsmp_dense_layer_{m}x{k}x{n}", make, [(w4, "int8"), (w8, "int8"), (cols8, "int32"), (bias, "int32"),
                                                        (scale, "float32"), (bias8, "int32"), (scale8, "float32")]


def _amx_build(layer: DenseLayer, order: Sequence[Tuple[int, int]], cores: int):
    """:func:`_build` on AMX (:mod:`schedules.x86_amx`): every row decoded to int8 at compile
    time, one matrix in output order, laid out in tiles."""
    m, k = (int(d) for d in layer.x_shape)
    n, schemes = len(order), [g[0] for g in layer.groups]
    weights, bias, scale = _decoded(layer, order)
    key = ("amx", m, k, n, layer.x_dtype)

    def make():
        return _with_attrs(amx_dense_kernel(m, k, n, layer.x_dtype, num_cores=cores), schemes, "x86-amx-layer")

    return key, f"rmsmp_dense_layer_{m}x{k}x{n}", make, [(amx_weights(weights), "int8"), (bias, "int32"),
                                                        (scale, "float32")]


def _build(layer: DenseLayer, order: Sequence[Tuple[int, int]], cores: int, isa: str, vbmi: bool,
           cpu: Optional[str], amx: bool = False):
    """The layer kernel producing output row ``c`` from ``order[c]`` (``LayerKernels.build``).
    Layers of the same shape and schemes share one kernel: their weights are arguments, so
    MiniLM-L6's 36 dense layers build 3 kernels."""
    if isinstance(layer, ConvLayer):
        return _amx_conv_build(layer, order, cores) if amx else _vnni_conv_build(layer, order, cores, cpu)
    static = isinstance(layer.x_shape[0], int)
    if static and amx and layer.x_shape[0] >= AMX_MIN_ROWS:
        return _amx_build(layer, order, cores)
    if static and layer.x_shape[0] <= gemv_max_rows(isa, cpu):
        return _gemv_build(layer, order, cores, isa, vbmi, cpu)
    if static:
        return _avx2_build(layer, order, cores, cpu) if isa == "avx2" else _int8_build(layer, order, cores, cpu)
    schemes = [g[0] for g in layer.groups]
    tables = list(dict.fromkeys(g[0] for g, packed in zip(layer.groups, layer.packed) if packed))
    table_of_group = [tables.index(g[0]) if packed else -1 for g, packed in zip(layer.groups, layer.packed)]
    m, k = layer.x_shape
    if not static:  # a dynamic batch: the kernel's own var for its rows (the call binds it)
        m = tvm.tirx.Var("m", "int32")
    n, x_dtype = len(order), layer.x_dtype
    codes, kinds, w8, cols8 = layer_weights(order, [g[1] for g in layer.groups], table_of_group, k)
    bias = np.array([layer.groups[gi][2][r] for gi, r in order], np.int32)
    scale = np.array([layer.groups[gi][3][r] for gi, r in order], np.float32)
    n_int8 = sum(1 for gi, _ in order if table_of_group[gi] < 0)
    key = (m if static else "any", k, n, x_dtype, tuple(schemes), tuple(tables), n_int8)

    def make():
        levels = [nibble_decode(np.arange(16), get_scheme(s)) for s in tables] or [np.zeros(16, np.int64)]
        kernel = layer_dense_kernel(m, k, n, x_dtype, levels, n_int8, num_cores=cores, vbmi=vbmi, cpu=cpu)
        return _with_attrs(kernel, schemes, "x86-avx512vnni-layer")

    consts = [(codes, "uint8"), (kinds, "uint8"), (w8, "int8"), (cols8, "int32"), (bias, "int32"), (scale, "float32")]
    return key, f"rmsmp_dense_layer_{m if static else 'any'}x{k}x{n}", make, consts


def x86_layer_kernels(target: Target) -> Optional[LayerKernels]:
    """The layer kernels ``target`` has (AVX-512 VNNI: dense layers of any batch and conv layers of
    a static batch, AMX or not; AVX2: small batches of dense layers), or None."""
    isa = x86_isa(target)
    if isa not in ("avx512vnni", "avx2"):
        return None
    cpu = target_cpu(target)  # its row of the constants table (schedules.x86_tuning_table)
    cores = target_cores(target)
    vbmi = target_has_features("avx512vbmi", target)
    amx = isa == "avx512vnni" and amx_enabled(target)
    return LayerKernels(accepts=lambda layer: _accepts(layer, isa, cpu, amx),
                        build=lambda layer, order: _build(layer, order, cores, isa, vbmi, cpu, amx),
                        convs=isa == "avx512vnni")
