"""The row-group op contract: what the graph passes emit and what every schedule may rely on.

The passes (``RewriteRowGroups``, ``FoldRowPermutation``, ``PackFourBitRows``, the target
layout passes) write PrimFuncs and graphs of this form; the schedules of every target and the
FPGA code generator read them through the names below and nothing else. :func:`verify` checks
a module against it after the passes and before the schedules (the pipeline calls it), and
names the function and the rule it breaks.

A *row-group op* is a PrimFunc with attribute :data:`OP` in :data:`OPS`:

* parameters, in this order (:data:`PARAMS`): activations ``x`` (int8 or uint8: dense
  ``[M, K]``, conv2d ``[N, C, H, W]``), weights ``w`` (int8 ``[rows, K]`` / ``[rows, C, kh, kw]``;
  uint8 ``[rows, ceil(K / 2)]`` two 4-bit codes per byte when :data:`PACKED` is 2), ``bias``
  (int32 ``[rows]``), ``scale`` (float32 ``[rows]``) and the output ``out`` (float32, rows on the
  :func:`channel_axis`);
* two blocks: :data:`ACC_BLOCK` writes the int32 sums into the buffer of the same name (``K``
  products of activations and levels: their worst case must fit int32, :data:`INT32_MAX`), and
  :data:`OUT_BLOCK` computes ``float32(acc + bias) * scale`` (one multiply: never fused into
  an FMA), or, with :data:`REQUANT` (``RMSMPConfig(requant="fixed_point")``), the integer
  rounding shift to 8-bit codes times the output scale (see :data:`REQUANT`);
* attributes: :data:`LAYER` (the torch module path); before ``RewriteRowGroups``
  :data:`ROW_SCHEMES` (one scheme per output row: the *quantized* op), after it :data:`SCHEME`
  and :data:`KIND` (one registered scheme for all rows: a *row-group* op); :data:`CONV`
  (strides, padding, dilation) for conv2d; :data:`PACKED` = 2 for 4-bit rows packed two per
  byte; :data:`SP2_LOWERING` in :data:`SP2_LOWERINGS` for packed SP2 rows.

In the graph, the row groups of one layer each take the same activations and their outputs
are joined by one ``relax.concat`` along the channel axis; ``FoldRowPermutation`` moves the
gather that restores the layer's row order into the consumers' constants where it can
(``relax.take`` after the concat where it cannot). Target layout passes may replace a
layer's row groups by one kernel, which then carries :data:`SCHEMES` (the groups' schemes in
order) and :data:`CPU_KERNEL`.

A pruned dense layer may instead be one *block-sparse op* (:data:`OP` :data:`DENSE_BSR`,
made by ``SparsifyRowGroups``; parameters :data:`SPARSE_PARAMS`, checked by
:func:`verify_sparse_func` and, for its constants, rule ``bsr``).

Around a layer, the *activation functions* (:data:`OP` in :data:`ACTIVATION_OPS`) quantize its
input: :data:`QUANTIZE` (per tensor; with :data:`ZERO_POINT` asymmetric, uint8 codes, the zero
point folded into the row groups' bias) or, per token, :data:`TOKEN_EXPONENT`,
:data:`QUANTIZE_PER_TOKEN` and after the row groups :data:`TOKEN_EPILOGUE` (see
:func:`verify_activation_func` and docs/design.md). Rule ``acc_bound`` also counts the bias
constants a row-group op is called with: ``acc + bias`` is an int32 add.

In the integer-only mode a residual add of two code tensors is one op, :data:`OP`
:data:`ADD_REQUANT` with :data:`ADD` (:func:`verify_add_func`), and a global average pooling of
codes one :data:`AVGPOOL_REQUANT` with :data:`POOL` (:func:`verify_pool_func`), a max-pooling
of codes one :data:`MAXPOOL_CODES` with :data:`MAXPOOL` (:func:`verify_maxpool_func`): the FPGA
executor runs them on the accelerator, every other target as the PrimFuncs they are.
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence, Tuple

import attrs
import numpy as np
import tvm
from tvm.sym import Analyzer

from tvm_rmsmp.quant.schemes import get_scheme, list_schemes, nibble_codes, pack_nibbles, sp2_decode, sp2_encode

__all__ = [
    "OP", "LAYER", "ROW_SCHEMES", "SCHEME", "KIND", "CONV", "PACKED", "SP2_LOWERING", "SCHEMES", "CPU_KERNEL",
    "WEIGHT_TILES", "WEIGHT_TAPS_FIRST", "WEIGHT_TAP_ORDER", "WEIGHT_AMX_CONV", "OPS", "SP2_LOWERINGS", "ACC_BLOCK", "OUT_BLOCK",
    "ZERO_POINT", "ACT_BITS", "REQUANT", "requant_of", "QUANTIZE", "TOKEN_EXPONENT", "QUANTIZE_PER_TOKEN", "TOKEN_EPILOGUE", "ACTIVATION_OPS",
    "verify_activation_func", "ADD_REQUANT", "ADD", "ADD_PARAMS", "add_params", "verify_add_func",
    "AVGPOOL_REQUANT", "POOL", "pool_params", "verify_pool_func", "MAXPOOL_CODES", "MAXPOOL", "verify_maxpool_func",
    "PARAMS", "INT32_MAX", "ContractError", "verify", "verify_func", "callee", "attr", "rmsmp_attr", "conv_geometry", "symbol_name", "const_value", "op_name",
    "channel_axis", "group_weight", "stored_to_int", "packed_weight", "DenseLayer", "ConvLayer", "LayerKernels",
    "ConstantKernel", "DENSE_BSR", "SPARSE_OPS", "SPARSE_PARAMS", "SPARSE_BLOCK", "SPARSE_ROW_SCHEMES",
    "verify_sparse_func", "CONV_PATTERN", "CONV_PATTERN_PARAMS", "SPARSE_KERNEL", "verify_conv_pattern_func",
]

# ----- attribute keys -------------------------------------------------------------------------
OP = "rmsmp.op"                        #: "dense" | "conv2d" (and "quantize" for the activation quantizer)
LAYER = "rmsmp.layer"                  #: the torch module path of the layer
ROW_SCHEMES = "rmsmp.row_schemes"      #: quantized op: one scheme name per output row
SCHEME = "rmsmp.scheme"                #: row-group op: the scheme of all its rows
KIND = "rmsmp.kind"                    #: row-group op: that scheme's kind ("sp2" | "fixed")
CONV = "rmsmp.conv"                    #: conv2d: {"strides", "padding", "dilation"}
PACKED = "rmsmp.packed"                #: 2: two 4-bit codes per weight byte
SP2_LOWERING = "rmsmp.sp2_lowering"    #: packed SP2 rows: one of SP2_LOWERINGS
SCHEMES = "rmsmp.schemes"              #: a target kernel for a whole layer: its groups' schemes in order
CPU_KERNEL = "rmsmp.cpu_kernel"        #: the intrinsic kernel that realizes a group or layer
WEIGHT_TILES = "rmsmp.weight_tiles"    #: x86 layout pass: weights stored in row tiles
WEIGHT_TAPS_FIRST = "rmsmp.weight_taps_first"  #: x86 layout pass: conv weights taps first
WEIGHT_TAP_ORDER = "rmsmp.weight_tap_order"    #: x86 layout pass: conv weights in im2col tap order
WEIGHT_AMX_CONV = "rmsmp.weight_amx_conv"      #: x86 layout pass: conv weights decoded to int8 AMX tiles

ZERO_POINT = "rmsmp.zero_point"        #: asymmetric activation quantizer: its integer zero point
ACT_BITS = "rmsmp.act_bits"            #: per-token activation functions: the activation bit width
#: the fixed-point epilogue (RMSMPConfig(requant="fixed_point")): ``{"qmin", "qmax", "out_scale"}``;
#: then ``scale`` holds each row's exact ``m * 2^-s`` and :data:`OUT_BLOCK` computes
#: ``float32(clamp(floor(float64(acc + bias) * float64(scale) + 0.5), qmin, qmax)) * out_scale``
#: (tvm_rmsmp.quant.requant; the float64 evaluation is exact). Kernels that only know the float
#: epilogue must decline a function with this attribute.
REQUANT = "rmsmp.requant"
#: a residual add in the integer-only mode (:data:`OP` :data:`ADD_REQUANT`): ``{"scale_a", "scale_b",
#: "mult_a", "mult_b", "shift", "qmin", "qmax", "out_scale"}`` (see :func:`verify_add_func`).
ADD = "rmsmp.add"
#: a global average pooling in the integer-only mode (:data:`OP` :data:`AVGPOOL_REQUANT`):
#: ``{"scale_in", "mult", "shift", "qmin", "qmax", "out_scale"}`` (see :func:`verify_pool_func`).
POOL = "rmsmp.pool"
#: a max-pooling of codes in the integer-only mode (:data:`OP` :data:`MAXPOOL_CODES`):
#: ``{"kernel", "stride", "padding"}``, each ``[h, w]``, and ``"scale_in"`` (the codes' scale) where known.
MAXPOOL = "rmsmp.maxpool"

# ----- values ---------------------------------------------------------------------------------
OPS = ("dense", "conv2d")
#: The activation functions around a layer (:data:`OP` values; not row-group ops):
QUANTIZE = "quantize"                  #: per-tensor quantizer ``x -> x_q`` (with :data:`ZERO_POINT`: asymmetric)
TOKEN_EXPONENT = "token_exponent"      #: per token: ``x [M, K] float32 -> e [M] int32``
QUANTIZE_PER_TOKEN = "quantize_per_token"  #: per token: ``(x, e) -> x_q int8 [M, K]``
TOKEN_EPILOGUE = "token_epilogue"      #: per token: ``(y0 [M, N], e, bias float32 [N]) -> y0 * 2^e + bias``
ACTIVATION_OPS = (QUANTIZE, TOKEN_EXPONENT, QUANTIZE_PER_TOKEN, TOKEN_EPILOGUE)
#: :data:`OP` of a residual add of two code tensors in the integer-only mode (``rmsmp::qadd_requant``).
ADD_REQUANT = "add_requant"
#: Its parameters: ``a``, ``b`` and ``out``, float32 of one shape (float views of 8-bit codes).
ADD_PARAMS = ("a", "b", "out")
#: :data:`OP` of a global average pooling of codes in the integer-only mode (``rmsmp::qavgpool_requant``):
#: parameters ``x [N, C, H, W]`` and ``out [N, C, 1, 1]``, float32.
AVGPOOL_REQUANT = "avgpool_requant"
#: :data:`OP` of a max-pooling of codes (``rmsmp::qmaxpool2d``): ``x [N, C, H, W]``, ``out [N, C, OH, OW]``, float32.
MAXPOOL_CODES = "maxpool_codes"
#: How packed SP2 rows multiply: shift-add on the activation, or decode to an integer and MAC.
SP2_LOWERINGS = ("shift", "decode")
ACC_BLOCK = "acc"
OUT_BLOCK = "out"
PARAMS = ("x", "w", "bias", "scale", "out")
#: The ``acc`` sums are int32: ``K * max|x| * max|level|`` must stay within it (rule "acc_bound").
INT32_MAX = 2**31 - 1
_RANK = {"dense": 2, "conv2d": 4}


class ContractError(ValueError):
    """A module breaks the row-group op contract (the message names the function and the rule)."""


# ----- IR queries -----------------------------------------------------------------------------
def callee(mod: tvm.IRModule, call) -> Optional[tvm.tirx.PrimFunc]:
    """The PrimFunc a ``relax.call_tir`` calls (None for any other call)."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.call_tir":
        return None
    gv = call.args[0]
    func = mod[gv] if gv in mod.functions else None
    return func if isinstance(func, tvm.tirx.PrimFunc) else None


def rmsmp_attr(func, key: str) -> Optional[str]:
    """A string attribute of an RMSMP PrimFunc (None when absent)."""
    if func is None or func.attrs is None or key not in func.attrs:
        return None
    return str(func.attrs[key])


def attr(func, key: str, default=None):
    """An attribute of a PrimFunc as stored (``default`` when the function has none of that key)."""
    attrs_ = getattr(func, "attrs", None)
    if attrs_ is None or key not in attrs_:
        return default
    return attrs_[key]


def const_value(expr) -> Optional[np.ndarray]:
    """The array of a Relax constant (None for any other expression)."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def op_name(expr) -> str:
    """The operator name of a Relax call (``"relax.concat"``; empty for anything else)."""
    op = getattr(expr, "op", None)
    return op.name if isinstance(op, tvm.ir.Op) else ""


def requant_of(func) -> Optional[dict]:
    """The :data:`REQUANT` attribute of a function as ``{"qmin": int, "qmax": int, "out_scale": float}``, or None."""
    value = func.attrs.get(REQUANT) if func is not None and func.attrs is not None else None
    if value is None:
        return None
    return {"qmin": int(value["qmin"]), "qmax": int(value["qmax"]), "out_scale": float(value["out_scale"])}


def conv_geometry(func) -> Optional[dict]:
    """``{"strides", "padding", "dilation"}`` of a conv2d op as lists of ints (None for dense)."""
    c = attr(func, CONV)
    return None if c is None else {k: [int(v) for v in c[k]] for k in ("strides", "padding", "dilation")}


def symbol_name(text: str) -> str:
    """``text`` (a torch module path) as a function name: every character not in [0-9a-zA-Z_] as ``_``."""
    return re.sub(r"[^0-9a-zA-Z_]", "_", text) or "layer"


# ----- weight forms ---------------------------------------------------------------------------
def channel_axis(op: str, ndim: int) -> int:
    """Axis of the output rows in the op's result: last for dense, 1 (NCHW) for conv2d."""
    return ndim - 1 if op == "dense" else 1


def group_weight(w_int: np.ndarray, scheme_name: str) -> np.ndarray:
    """The stored form of a group's weights: SP2 codes for SP2 schemes, integers otherwise."""
    scheme = get_scheme(scheme_name)
    if scheme.kind == "sp2":
        return sp2_encode(w_int, scheme).astype(np.int8)
    return np.asarray(w_int, dtype=np.int8)


def stored_to_int(stored: np.ndarray, scheme_name: str) -> np.ndarray:
    """Inverse of :func:`group_weight`: the integer levels of a group's stored weights."""
    scheme = get_scheme(scheme_name)
    return sp2_decode(stored.astype(np.uint8)) if scheme.kind == "sp2" else stored.astype(np.int64)


def packed_weight(w_int: np.ndarray, scheme_name: str) -> np.ndarray:
    """The stored form of a group's weights, two 4-bit codes per byte."""
    scheme = get_scheme(scheme_name)
    return pack_nibbles(nibble_codes(w_int, scheme))


# ----- what targets offer the graph passes ------------------------------------------------------
@attrs.frozen
class DenseLayer:
    """The row groups of one dense layer, as ``FuseDenseLayers`` hands them to a target: the
    activations' shape and dtype (``[M, K]``, int8 or uint8) and, per group in concatenation
    order, ``(scheme, stored weights, bias, scale)`` (numpy arrays as the groups' constants
    hold them: packed uint8 for :data:`PACKED` groups, int8 otherwise)."""

    x_shape: Tuple[int, int]
    x_dtype: str
    groups: Tuple[Tuple[str, np.ndarray, np.ndarray, np.ndarray], ...]
    packed: Tuple[bool, ...]

    @property
    def concat_order(self) -> List[Tuple[int, int]]:
        """(group, row) of each output channel of the concatenation."""
        return [(gi, r) for gi, (_, w, _, _) in enumerate(self.groups) for r in range(w.shape[0])]


@attrs.frozen
class ConvLayer:
    """The row groups of one conv2d layer (NCHW, groups 1), as ``FuseDenseLayers`` hands them
    to a target whose :class:`LayerKernels` take convolutions: the activations' shape
    ``[B, C, H, W]`` (zero-padded already where the groups have padding 0) and dtype, the
    kernel's ``(kh, kw)``, ``strides`` / ``padding`` / ``dilation`` as the groups' attributes
    (:data:`CONV`), and the groups as :class:`DenseLayer`'s (stored weights: packed uint8
    ``[rows, ceil(C kh kw / 2)]``, or int8 ``[rows, C, kh, kw]``)."""

    x_shape: Tuple[int, int, int, int]
    x_dtype: str
    kernel: Tuple[int, int]
    strides: Tuple[int, int]
    padding: Tuple[int, ...]
    dilation: Tuple[int, int]
    groups: Tuple[Tuple[str, np.ndarray, np.ndarray, np.ndarray], ...]
    packed: Tuple[bool, ...]

    concat_order = DenseLayer.concat_order

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        """``[B, rows, OH, OW]`` of the layer (all its groups' rows)."""
        (b, _, h, w), (kh, kw), (sh, sw), (dh, dw) = self.x_shape, self.kernel, self.strides, self.dilation
        pads = list(self.padding) + [0] * (4 - len(self.padding))
        top, left, bottom, right = pads if len(self.padding) == 4 else (pads[0], pads[1], pads[0], pads[1])
        return (b, sum(g[1].shape[0] for g in self.groups), (h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
                (w + left + right - dw * (kw - 1) - 1) // sw + 1)


#: ``build(layer, order)``: ``(key, name, make_kernel, constants)``: a kernel computing output
#: channel ``c`` from ``order[c]`` (a ``(group, row)``), called as ``kernel(x, *constants, out)``;
#: ``constants`` are ``(array, dtype)``; layers with equal ``key`` share one kernel (named
#: ``name``), so ``make_kernel()`` runs once per key. The kernel carries its own attributes (:data:`OP`,
#: :data:`SCHEMES`, :data:`CPU_KERNEL`, ``tirx.is_scheduled``).
LayerBuild = Callable[[DenseLayer, Sequence[Tuple[int, int]]],
                      Tuple[tuple, str, Callable[[], "tvm.tirx.PrimFunc"], List[Tuple[np.ndarray, str]]]]


@attrs.frozen
class LayerKernels:
    """A target's kernels for whole dense layers (read by ``FuseDenseLayers``): ``accepts(layer)``
    says whether one kernel can compute the layer; ``build`` makes it (see :data:`LayerBuild`).
    ``convs``: both are also handed conv2d layers (:class:`ConvLayer`; the kernel's output
    ``[B, rows, OH, OW]``, channel ``c`` from ``order[c]``)."""

    accepts: Callable[[DenseLayer], bool]
    build: LayerBuild
    convs: bool = False


#: ``kernel_for(row_group_func)``: ``(kernel, weight_layout)`` where the target has a kernel of its
#: own for a row group whose weights are constants, ``weight_layout(w)`` giving the weights in
#: the layout it reads (None: as they are); None where it has none (read by ``UseTargetKernels``).
ConstantKernel = Callable[["tvm.tirx.PrimFunc"],
                          Optional[Tuple["tvm.tirx.PrimFunc", Optional[Callable[[np.ndarray], np.ndarray]]]]]


# ----- the verifier ---------------------------------------------------------------------------
def _has_block(func: tvm.tirx.PrimFunc, name: str) -> bool:
    from tvm import s_tir

    try:
        s_tir.Schedule(func).get_sblock(name)
        return True
    except Exception:  # noqa: BLE001  (TVM raises its own error types for a missing block)
        return False


def _acc_terms(func: tvm.tirx.PrimFunc) -> Tuple[int, int, int]:
    """``(K, largest |activation|, largest |level|)`` of a row-group or quantized op: the
    ``acc`` sums are at most their product in magnitude."""
    x, w = func.params[0], func.params[1]
    packed = rmsmp_attr(func, PACKED)
    scheme, row_schemes = rmsmp_attr(func, SCHEME), attr(func, ROW_SCHEMES)
    names = [scheme] if scheme is not None else sorted({str(v) for v in row_schemes})
    level = max(int(np.abs(get_scheme(n).levels).max()) for n in names)
    k = int(np.prod([int(d) for d in w.shape[1:]])) * (2 if packed else 1)
    return k, (255 if str(x.dtype) == "uint8" else 128), level


def _checked_op(name: str, func: tvm.tirx.PrimFunc, contract: str, ops):
    """``(op, broken)`` after the rules every contract shares (``op`` in ``ops``, a ``layer``);
    ``broken(rule, detail)`` raises the :class:`ContractError` naming the function, its layer and the rule."""

    def broken(rule: str, detail: str):
        layer = rmsmp_attr(func, LAYER)
        raise ContractError(f"{name}{f' (layer {layer})' if layer else ''} breaks the {contract}, "
                            f"rule '{rule}': {detail}")

    op = rmsmp_attr(func, OP)
    if op not in ops:
        broken("op", f"{OP} is {op!r}, not one of {ops}")
    if rmsmp_attr(func, LAYER) is None:
        broken("layer", f"no {LAYER} attribute")
    return op, broken


def verify_func(name: str, func: tvm.tirx.PrimFunc) -> None:
    """Check one PrimFunc with an :data:`OP` attribute of :data:`OPS`; raise :class:`ContractError`."""
    op, broken = _checked_op(name, func, "row-group op contract", OPS)
    row_schemes, scheme = func.attrs.get(ROW_SCHEMES), rmsmp_attr(func, SCHEME)
    if (row_schemes is None) == (scheme is None):
        broken("scheme", f"exactly one of {ROW_SCHEMES} (quantized op) and {SCHEME} (row-group op) is required")
    known = set(list_schemes())
    for s in ([str(v) for v in row_schemes] if row_schemes is not None else [scheme]):
        if s not in known:
            broken("scheme", f"scheme {s!r} is not registered")
    if scheme is not None and rmsmp_attr(func, KIND) != get_scheme(scheme).kind:
        broken("kind", f"{KIND} is {rmsmp_attr(func, KIND)!r}, scheme {scheme!r} is {get_scheme(scheme).kind!r}")
    if len(func.params) != len(PARAMS):
        broken("params", f"{len(func.params)} parameters, the contract has {len(PARAMS)}: {PARAMS}")
    bufs = list(func.params)  # TVM 0.27: a parameter is its buffer var (dtype and shape)
    x, w, bias, scale, out = bufs
    rank = _RANK[op]
    packed = rmsmp_attr(func, PACKED)
    rows = w.shape[0]
    checks = [
        ("x", str(x.dtype) in ("int8", "uint8") and len(x.shape) == rank, f"int8/uint8 of rank {rank}"),
        ("w", str(w.dtype) == ("uint8" if packed else "int8") and len(w.shape) == (2 if packed else rank),
         f"{'uint8 [rows, ceil(K/2)]' if packed else 'int8'} weights"),
        ("bias", str(bias.dtype) == "int32" and len(bias.shape) == 1, "int32 [rows]"),
        ("scale", str(scale.dtype) == "float32" and len(scale.shape) == 1, "float32 [rows]"),
        ("out", str(out.dtype) == "float32" and len(out.shape) == rank, f"float32 of rank {rank}"),
    ]
    for pname, ok, want in checks:
        if not ok:
            b = bufs[PARAMS.index(pname)]
            broken("params", f"parameter {PARAMS.index(pname)} ({pname}) is {b.dtype}{list(b.shape)}, expected {want}")
    analyzer = Analyzer()
    for pname, b in (("bias", bias), ("scale", scale)):
        if not analyzer.can_prove_equal(b.shape[0], rows):
            broken("params", f"{pname} has {b.shape[0]} entries for {rows} rows")
    if not analyzer.can_prove_equal(out.shape[channel_axis(op, rank)], rows):
        broken("params", f"out has {out.shape[channel_axis(op, rank)]} channels on axis "
                         f"{channel_axis(op, rank)} for {rows} rows")
    if packed is not None:
        if packed != "2" or scheme is None or get_scheme(scheme).bits > 4:
            broken("packed", f"{PACKED}={packed} needs a row-group op of a scheme of at most 4 bits, value 2")
    lowering = rmsmp_attr(func, SP2_LOWERING)
    if lowering is not None and (lowering not in SP2_LOWERINGS or packed is None or get_scheme(scheme).kind != "sp2"):
        broken("sp2_lowering", f"{SP2_LOWERING}={lowering!r} is for packed SP2 rows, one of {SP2_LOWERINGS}")
    k, act_max, level = _acc_terms(func)
    if k * act_max * level > INT32_MAX:
        broken("acc_bound", f"{k} products of activations up to {act_max} "
                            f"and levels up to {level} can reach {k * act_max * level}, past int32 ({INT32_MAX})")
    requant = func.attrs.get(REQUANT)
    if requant is not None and any(k not in requant for k in ("qmin", "qmax", "out_scale")):
        broken("requant", f"{REQUANT} needs qmin, qmax and out_scale")
    if op == "conv2d":
        conv = func.attrs.get(CONV)
        if conv is None or any(k not in conv for k in ("strides", "padding", "dilation")):
            broken("conv", f"conv2d needs {CONV} with strides, padding and dilation")
    if "tirx.is_scheduled" not in func.attrs:
        for block in (ACC_BLOCK, OUT_BLOCK):
            if not _has_block(func, block):
                broken("blocks", f"no block named {block!r}")


_FLOAT_IN = "float32"


def verify_activation_func(name: str, func: tvm.tirx.PrimFunc) -> None:
    """Check one activation function (:data:`OP` in :data:`ACTIVATION_OPS`): its parameters'
    dtypes and shapes, and :data:`ZERO_POINT` / :data:`ACT_BITS`; raise :class:`ContractError`."""
    op, broken = _checked_op(name, func, "activation contract", ACTIVATION_OPS)
    bufs = list(func.params)
    spec = {  # op -> [(name, dtypes, rank)] in parameter order
        QUANTIZE: [("x", (_FLOAT_IN,), None), ("x_q", ("int8", "uint8"), None)],
        TOKEN_EXPONENT: [("x", (_FLOAT_IN,), 2), ("e", ("int32",), 1)],
        QUANTIZE_PER_TOKEN: [("x", (_FLOAT_IN,), 2), ("e", ("int32",), 1), ("x_q", ("int8",), 2)],
        TOKEN_EPILOGUE: [("y0", (_FLOAT_IN,), 2), ("e", ("int32",), 1), ("bias", (_FLOAT_IN,), 1), ("y", (_FLOAT_IN,), 2)],
    }[op]
    if len(bufs) != len(spec):
        broken("params", f"{len(bufs)} parameters, expected {len(spec)}: {[n for n, _, _ in spec]}")
    for i, ((pname, dtypes, rank), b) in enumerate(zip(spec, bufs)):
        if str(b.dtype) not in dtypes or (rank is not None and len(b.shape) != rank):
            broken("params", f"parameter {i} ({pname}) is {b.dtype}{list(b.shape)}, expected {'/'.join(dtypes)}"
                             f"{f' of rank {rank}' if rank else ''}")
    analyzer = Analyzer()
    if op != QUANTIZE and not analyzer.can_prove_equal(bufs[0].shape[0], bufs[1].shape[0]):
        broken("params", f"e has {bufs[1].shape[0]} entries for {bufs[0].shape[0]} tokens")
    if op == TOKEN_EPILOGUE and not analyzer.can_prove_equal(bufs[2].shape[0], bufs[0].shape[1]):
        broken("params", f"bias has {bufs[2].shape[0]} entries for {bufs[0].shape[1]} channels")
    zp = attr(func, ZERO_POINT)
    if zp is not None and (op != QUANTIZE or str(bufs[1].dtype) != "uint8" or not 0 <= int(zp) <= 255):
        broken("zero_point", f"{ZERO_POINT}={zp} needs a {QUANTIZE} op with uint8 output, in [0, 255]")
    if op in (TOKEN_EXPONENT, QUANTIZE_PER_TOKEN):
        bits = attr(func, ACT_BITS)
        if bits is None or not 2 <= int(bits) <= 8:
            broken("act_bits", f"{ACT_BITS} is {bits!r}, expected an integer in [2, 8]")


def add_params(func) -> Optional[dict]:
    """The :data:`ADD` attribute of a residual add (a PrimFunc, or ``{"params": dict}``) with
    Python ints and floats, or None."""
    value = func["params"] if isinstance(func, dict) else attr(func, ADD)
    if value is None:
        return None
    ints = ("mult_a", "mult_b", "shift", "qmin", "qmax")
    return {**{k: int(value[k]) for k in ints}, **{k: float(value[k]) for k in ("scale_a", "scale_b", "out_scale")}}


def verify_add_func(name: str, func: tvm.tirx.PrimFunc) -> None:
    """Check one residual add (rules ``op``, ``layer``, ``params``: ``a``, ``b``, ``out`` float32
    of one shape; ``add``: :data:`ADD` with multipliers in ``[0, 2^15)``, the larger at least
    2^14, a shift in ``[1, 62]``, positive scales and ``[qmin, qmax]`` within int8 or uint8);
    raise :class:`ContractError`. What it computes: ``out = float32(clamp((qa * mult_a + qb *
    mult_b + 2^(shift-1)) >> shift, qmin, qmax)) * out_scale`` with ``q = round(x / scale)`` the
    codes of each input (tvm_rmsmp.quant.requant.requantize_add)."""
    _, broken = _checked_op(name, func, "residual add contract", (ADD_REQUANT,))
    bufs = list(func.params)
    if len(bufs) != len(ADD_PARAMS):
        broken("params", f"{len(bufs)} parameters, expected {len(ADD_PARAMS)}: {list(ADD_PARAMS)}")
    analyzer = Analyzer()
    for pname, b in zip(ADD_PARAMS, bufs):
        if str(b.dtype) != "float32" or len(b.shape) != len(bufs[0].shape) or not all(
                analyzer.can_prove_equal(d, e) for d, e in zip(b.shape, bufs[0].shape)):
            broken("params", f"parameter {pname} is {b.dtype}{list(b.shape)}, expected float32{list(bufs[0].shape)}")
    try:
        p = add_params(func)
    except (KeyError, TypeError, ValueError) as err:
        broken("add", f"{ADD} is incomplete ({err!r})")
    if p is None:
        broken("add", f"no {ADD} attribute")
    ok = (0 <= p["mult_a"] < 2**15 and 0 <= p["mult_b"] < 2**15 and max(p["mult_a"], p["mult_b"]) >= 2**14
          and 1 <= p["shift"] <= 62 and min(p["scale_a"], p["scale_b"], p["out_scale"]) > 0
          and -128 <= p["qmin"] <= p["qmax"] <= 255 and (p["qmin"] >= 0 or p["qmax"] <= 127))
    if not ok:
        broken("add", f"{ADD} out of range: {p}")


def pool_params(func) -> Optional[dict]:
    """The :data:`POOL` attribute of a global pooling (a PrimFunc, or ``{"params": dict}``) with
    Python ints and floats, or None."""
    value = func["params"] if isinstance(func, dict) else attr(func, POOL)
    if value is None:
        return None
    return {**{k: int(value[k]) for k in ("mult", "shift", "qmin", "qmax")},
            **{k: float(value[k]) for k in ("scale_in", "out_scale")}}


def verify_pool_func(name: str, func: tvm.tirx.PrimFunc) -> None:
    """Check one global average pooling (rules ``op``, ``layer``, ``params``: ``x`` float32
    ``[N, C, H, W]``, ``out`` float32 ``[N, C, 1, 1]``; ``pool``: :data:`POOL` with a multiplier in
    ``[2^14, 2^15)``, a shift in ``[1, 62]``, positive scales and an 8-bit range); raise
    :class:`ContractError`. It computes ``out = float32(clamp((sum_hw q * mult + 2^(shift-1)) >>
    shift, qmin, qmax)) * out_scale``, ``q = round(x / scale_in)`` the input's codes."""
    _, broken = _checked_op(name, func, "average pooling contract", (AVGPOOL_REQUANT,))
    bufs = list(func.params)
    analyzer = Analyzer()
    if len(bufs) != 2 or any(str(b.dtype) != "float32" or len(b.shape) != 4 for b in bufs) or not all(
            analyzer.can_prove_equal(bufs[0].shape[i], bufs[1].shape[i]) for i in (0, 1)) or not all(
            analyzer.can_prove_equal(bufs[1].shape[i], 1) for i in (2, 3)):
        broken("params", f"parameters {[f'{b.dtype}{list(b.shape)}' for b in bufs]}, expected x float32 "
                         "[N, C, H, W] and out float32 [N, C, 1, 1]")
    try:
        p = pool_params(func)
    except (KeyError, TypeError, ValueError) as err:
        broken("pool", f"{POOL} is incomplete ({err!r})")
    if p is None:
        broken("pool", f"no {POOL} attribute")
    ok = (2**14 <= p["mult"] < 2**15 and 1 <= p["shift"] <= 62 and min(p["scale_in"], p["out_scale"]) > 0
          and -128 <= p["qmin"] <= p["qmax"] <= 255 and (p["qmin"] >= 0 or p["qmax"] <= 127))
    if not ok:
        broken("pool", f"{POOL} out of range: {p}")


def verify_maxpool_func(name: str, func: tvm.tirx.PrimFunc) -> None:
    """Check one max-pooling of codes (rules ``op``, ``layer``, ``params``: float32 ``x`` and
    ``out`` of rank 4, ``out``'s shape the pooling's; ``maxpool``: :data:`MAXPOOL` with positive
    kernel and stride, padding below the kernel); raise :class:`ContractError`."""
    _, broken = _checked_op(name, func, "max-pooling contract", (MAXPOOL_CODES,))
    value = attr(func, MAXPOOL)
    try:
        (kh, kw), (sh, sw), (ph, pw) = ([int(v) for v in value[k]] for k in ("kernel", "stride", "padding"))
    except (KeyError, TypeError, ValueError):
        broken("maxpool", f"{MAXPOOL} must hold kernel, stride and padding, each [h, w]; got {value!r}")
    if min(kh, kw, sh, sw) < 1 or not (0 <= ph < kh and 0 <= pw < kw):
        broken("maxpool", f"{MAXPOOL} out of range: {value}")
    bufs = list(func.params)
    if len(bufs) != 2 or any(str(b.dtype) != "float32" or len(b.shape) != 4 for b in bufs):
        broken("params", f"parameters {[f'{b.dtype}{list(b.shape)}' for b in bufs]}, expected float32 x and out "
                         "of rank 4")
    x, out = ([d for d in b.shape] for b in bufs)
    analyzer = Analyzer()
    want = [x[0], x[1], (x[2] + 2 * ph - kh) // sh + 1, (x[3] + 2 * pw - kw) // sw + 1]
    if not all(analyzer.can_prove_equal(a, b) for a, b in zip(out, want)):
        broken("params", f"out is {list(out)}, the pooling of x {list(x)} gives {want}")


def _relax_calls(mod: tvm.IRModule) -> List[tvm.relax.Call]:
    """Every call in the module's Relax functions, collected first: an error raised inside
    TVM's visitor would come out as a RuntimeError."""
    calls: List[tvm.relax.Call] = []
    for _, fn in mod.functions.items():
        if isinstance(fn, tvm.relax.Function):
            tvm.relax.analysis.post_order_visit(
                fn.body, lambda e: calls.append(e) if isinstance(e, tvm.relax.Call) else None)
    return calls


def _verify_bias_bounds(mod: tvm.IRModule) -> None:
    """Rule ``acc_bound`` with the bias: ``acc + bias`` is an int32 add, so the largest ``|acc|``
    plus the largest constant ``|bias|`` (a folded zero point makes it large) must fit int32."""
    for call in _relax_calls(mod):
        func = callee(mod, call)
        if func is None or rmsmp_attr(func, OP) not in OPS or len(call.args[1].fields) != len(PARAMS) - 1:
            continue
        bias = const_value(call.args[1].fields[PARAMS.index("bias")])
        if bias is None or not bias.size:
            continue
        k, act_max, level = _acc_terms(func)
        bias_max = int(np.abs(bias.astype(np.int64)).max())
        if k * act_max * level + bias_max > INT32_MAX:
            raise ContractError(
                f"{call.args[0].name_hint} (layer {rmsmp_attr(func, LAYER)}) breaks the row-group op contract, rule "
                f"'acc_bound': {k} products of activations up to {act_max} and levels up to {level} plus a bias up "
                f"to {bias_max} can reach {k * act_max * level + bias_max}, past int32 ({INT32_MAX})")


def verify(mod: tvm.IRModule) -> tvm.IRModule:
    """Check every row-group op of ``mod`` (and every quantized op), every activation function,
    and the bias constants the row-group ops are called with; returns ``mod`` unchanged."""
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and OP in func.attrs:
            if str(func.attrs[OP]) in ACTIVATION_OPS:
                verify_activation_func(gv.name_hint, func)
            elif str(func.attrs[OP]) == CONV_PATTERN:
                verify_conv_pattern_func(gv.name_hint, func)
            elif str(func.attrs[OP]) in SPARSE_OPS:
                verify_sparse_func(gv.name_hint, func)
            elif str(func.attrs[OP]) == ADD_REQUANT:
                verify_add_func(gv.name_hint, func)
            elif str(func.attrs[OP]) == AVGPOOL_REQUANT:
                verify_pool_func(gv.name_hint, func)
            elif str(func.attrs[OP]) == MAXPOOL_CODES:
                verify_maxpool_func(gv.name_hint, func)
            else:
                verify_func(gv.name_hint, func)
    _verify_bias_bounds(mod)
    _verify_sparse_calls(mod)
    _verify_conv_pattern_calls(mod)
    return mod


# ----- the block-sparse dense op (relay_passes/sparsify_row_groups.py) -----------------------------
#: :data:`OP` of a block-sparse dense layer: one op for all rows of a pruned layer, rows in the
#: model's order, each with its scheme in :data:`SPARSE_ROW_SCHEMES`; weights as int8 levels in
#: blocks of :data:`SPARSE_BLOCK` ``[br, bc]`` (BSR: the blocks holding a non-zero, their block
#: columns, each block row's first block).
DENSE_BSR = "dense_bsr"
#: :data:`OP` of a kernel-sparse 3x3 (or any kh x kw >= 4 taps) convolution (pattern, connectivity,
#: block-punched pruning; made by ``SparsifyConvs``): the kept weights of each (row, channel)
#: kernel in *quads* of 4 taps, grouped by *plane* (an input channel and 4 taps).
CONV_PATTERN = "conv2d_pattern"
SPARSE_OPS = (DENSE_BSR, CONV_PATTERN)
SPARSE_BLOCK = "rmsmp.sparse_block"            #: [br, bc]: rows x input columns of a block
SPARSE_ROW_SCHEMES = "rmsmp.sparse_row_schemes"  #: one scheme per output row (model order)
#: ``x [M, K]`` int8/uint8, ``w [nnzb, br, bc]`` int8 levels, ``col [nnzb]`` int32 block columns,
#: ``ptr [N / br + 1]`` int32 (block row ``i``: blocks ``ptr[i] .. ptr[i + 1] - 1``), ``wsum [N]``
#: int32 (each row's sum of levels), ``bias [N]`` int32, ``scale [N]`` float32, ``out [M, N]`` float32.
SPARSE_PARAMS = ("x", "w", "col", "ptr", "wsum", "bias", "scale", "out")


def verify_sparse_func(name: str, func: tvm.tirx.PrimFunc) -> None:
    """Check one block-sparse op (rules ``op``, ``layer``, ``scheme``, ``block``, ``params``,
    ``acc_bound``); raise :class:`ContractError`."""
    _, broken = _checked_op(name, func, "block-sparse op contract", (DENSE_BSR,))
    schemes = attr(func, SPARSE_ROW_SCHEMES)
    if schemes is None or not len(schemes):
        broken("scheme", f"no {SPARSE_ROW_SCHEMES} attribute")
    known = set(list_schemes())
    names = sorted({str(v) for v in schemes})
    for s in names:
        if s not in known:
            broken("scheme", f"scheme {s!r} is not registered")
    block = attr(func, SPARSE_BLOCK)
    if block is None or len(block) != 2 or min(int(b) for b in block) < 1:
        broken("block", f"{SPARSE_BLOCK} must be [rows, cols] of positive ints, got {block!r}")
    br, bc = (int(b) for b in block)
    if len(func.params) != len(SPARSE_PARAMS):
        broken("params", f"{len(func.params)} parameters, the contract has {len(SPARSE_PARAMS)}: {SPARSE_PARAMS}")
    bufs = dict(zip(SPARSE_PARAMS, func.params))
    shapes = {k: [int(d) for d in b.shape] for k, b in bufs.items()}
    m, k = shapes["x"] if len(shapes["x"]) == 2 else (0, 0)
    n = len(schemes)
    want = {
        "x": (("int8", "uint8"), [m, k]), "w": (("int8",), [shapes["w"][0] if shapes["w"] else 0, br, bc]),
        "col": (("int32",), [shapes["w"][0] if shapes["w"] else 0]), "ptr": (("int32",), [n // br + 1]),
        "wsum": (("int32",), [n]), "bias": (("int32",), [n]), "scale": (("float32",), [n]),
        "out": (("float32",), [m, n]),
    }
    for pname, (dtypes, shape) in want.items():
        b = bufs[pname]
        if str(b.dtype) not in dtypes or shapes[pname] != shape:
            broken("params", f"parameter {SPARSE_PARAMS.index(pname)} ({pname}) is {b.dtype}{shapes[pname]}, "
                             f"expected {'/'.join(dtypes)}{shape}")
    if n % br or k % bc:
        broken("block", f"block [{br}, {bc}] does not divide the layer's {n} rows x {k} columns")
    level = max(int(np.abs(get_scheme(s).levels).max()) for s in names)
    act_max = 255 if str(bufs["x"].dtype) == "uint8" else 128
    if level > 127 or k * act_max * level > INT32_MAX:
        broken("acc_bound", f"{k} products of activations up to {act_max} and levels up to {level} "
                            f"(int8 blocks: at most 127) can reach {k * act_max * level}, past int32 ({INT32_MAX})")


def _verify_sparse_calls(mod: tvm.IRModule) -> None:
    """Rule ``bsr`` on the constants a block-sparse op is called with: ``ptr`` rising from 0 to
    the block count, block columns inside the layer; and ``acc_bound`` with the bias."""
    for call in _relax_calls(mod):
        func = callee(mod, call)
        if func is None or rmsmp_attr(func, OP) != DENSE_BSR:
            continue
        where = f"{call.args[0].name_hint} (layer {rmsmp_attr(func, LAYER)}) breaks the block-sparse op contract"
        fields = list(call.args[1].fields)
        col, ptr, bias = (const_value(fields[SPARSE_PARAMS.index(p)]) for p in ("col", "ptr", "bias"))
        k = int(func.params[0].shape[1])
        bc = int(attr(func, SPARSE_BLOCK)[1])
        nnzb = int(func.params[1].shape[0])
        if ptr is not None and (ptr[0] != 0 or np.any(np.diff(ptr.astype(np.int64)) < 0) or ptr[-1] > nnzb):
            raise ContractError(f"{where}, rule 'bsr': ptr must rise from 0 to at most {nnzb} blocks")
        if col is not None and col.size and (col.min() < 0 or int(col.max()) * bc + bc > k):
            raise ContractError(f"{where}, rule 'bsr': block columns must lie in [0, {k // bc})")
        if bias is not None and bias.size:
            level = max(int(np.abs(get_scheme(str(s)).levels).max()) for s in attr(func, SPARSE_ROW_SCHEMES))
            act_max = 255 if str(func.params[0].dtype) == "uint8" else 128
            total = k * act_max * level + int(np.abs(bias.astype(np.int64)).max())
            if total > INT32_MAX:
                raise ContractError(f"{where}, rule 'acc_bound': products plus a bias can reach {total}, past int32")


# ----- the kernel-sparse convolution (relay_passes/sparsify_convs.py) -------------------------------
SPARSE_KERNEL = "rmsmp.sparse_kernel"  #: [kh, kw]: the convolution's kernel size
#: ``x [N, C, Hp, Wp]`` int8/uint8 (already zero-padded: ``CONV`` padding is 0), ``w [nq, 4]`` int8
#: levels of the quads, ``qplane [nq]`` int32 each quad's plane, ``rptr [F + 1]`` int32 (row ``r``:
#: quads ``rptr[r] .. rptr[r + 1] - 1``), ``pchan [np]`` int32 each plane's input channel,
#: ``ptaps [np, 4]`` int32 its taps ``ky * kw + kx`` (a quad's level ``t`` multiplies tap
#: ``ptaps[i, t]``), ``wsum [F]`` int32 each row's sum of levels, ``bias [F]`` int32, ``scale [F]``
#: float32, ``out [N, F, OH, OW]`` float32. Rows are in the model's order, schemes in
#: :data:`SPARSE_ROW_SCHEMES`.
CONV_PATTERN_PARAMS = ("x", "w", "qplane", "rptr", "pchan", "ptaps", "wsum", "bias", "scale", "out")


def verify_conv_pattern_func(name: str, func: tvm.tirx.PrimFunc) -> None:
    """Check one kernel-sparse convolution (rules ``op``, ``layer``, ``scheme``, ``conv``,
    ``params``, ``acc_bound``); raise :class:`ContractError`."""
    _, broken = _checked_op(name, func, "kernel-sparse conv contract", (CONV_PATTERN,))
    schemes = attr(func, SPARSE_ROW_SCHEMES)
    if schemes is None or not len(schemes):
        broken("scheme", f"no {SPARSE_ROW_SCHEMES} attribute")
    names = sorted({str(v) for v in schemes})
    known = set(list_schemes())
    for s in names:
        if s not in known:
            broken("scheme", f"scheme {s!r} is not registered")
    geo, ksize = conv_geometry(func), attr(func, SPARSE_KERNEL)
    if geo is None or geo["padding"] != [0, 0] or geo["dilation"] != [1, 1] or ksize is None or len(ksize) != 2:
        broken("conv", f"needs {CONV} with padding [0, 0] (x comes padded) and dilation [1, 1], and {SPARSE_KERNEL}")
    kh, kw = (int(v) for v in ksize)
    if len(func.params) != len(CONV_PATTERN_PARAMS):
        broken("params", f"{len(func.params)} parameters, the contract has {len(CONV_PATTERN_PARAMS)}: "
                         f"{CONV_PATTERN_PARAMS}")
    bufs = dict(zip(CONV_PATTERN_PARAMS, func.params))
    shapes = {k: [int(d) for d in b.shape] for k, b in bufs.items()}
    n, c, hp, wp = shapes["x"] if len(shapes["x"]) == 4 else (0, 0, 0, 0)
    f = len(schemes)
    sh, sw = geo["strides"]
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    nq = shapes["w"][0] if shapes["w"] else 0
    npl = shapes["pchan"][0] if shapes["pchan"] else 0
    want = {
        "x": (("int8", "uint8"), [n, c, hp, wp]), "w": (("int8",), [nq, 4]), "qplane": (("int32",), [nq]),
        "rptr": (("int32",), [f + 1]), "pchan": (("int32",), [npl]), "ptaps": (("int32",), [npl, 4]),
        "wsum": (("int32",), [f]), "bias": (("int32",), [f]), "scale": (("float32",), [f]),
        "out": (("float32",), [n, f, oh, ow]),
    }
    for pname, (dtypes, shape) in want.items():
        b = bufs[pname]
        if str(b.dtype) not in dtypes or shapes[pname] != shape:
            broken("params", f"parameter {CONV_PATTERN_PARAMS.index(pname)} ({pname}) is {b.dtype}{shapes[pname]}, "
                             f"expected {'/'.join(dtypes)}{shape}")
    level = max(int(np.abs(get_scheme(s).levels).max()) for s in names)
    act_max = 255 if str(bufs["x"].dtype) == "uint8" else 128
    k = c * kh * kw
    if level > 127 or k * act_max * level > INT32_MAX:
        broken("acc_bound", f"{k} products of activations up to {act_max} and levels up to {level} "
                            f"(int8 quads: at most 127) can reach {k * act_max * level}, past int32 ({INT32_MAX})")


def _verify_conv_pattern_calls(mod: tvm.IRModule) -> None:
    """Rule ``quads`` on the constants a kernel-sparse conv is called with: ``rptr`` rising from 0
    to the quad count, planes, channels and taps inside the layer; and ``acc_bound`` with the bias."""
    for call in _relax_calls(mod):
        func = callee(mod, call)
        if func is None or rmsmp_attr(func, OP) != CONV_PATTERN:
            continue
        where = f"{call.args[0].name_hint} (layer {rmsmp_attr(func, LAYER)}) breaks the kernel-sparse conv contract"
        vals = {p: const_value(e) for p, e in zip(CONV_PATTERN_PARAMS, call.args[1].fields)}
        _, c, _, _ = (int(d) for d in func.params[0].shape)
        kh, kw = (int(v) for v in attr(func, SPARSE_KERNEL))
        npl, nq = int(func.params[4].shape[0]), int(func.params[1].shape[0])
        rptr, qplane, pchan, ptaps = vals["rptr"], vals["qplane"], vals["pchan"], vals["ptaps"]
        if rptr is not None and (rptr[0] != 0 or np.any(np.diff(rptr.astype(np.int64)) < 0) or rptr[-1] > nq):
            raise ContractError(f"{where}, rule 'quads': rptr must rise from 0 to at most the {nq} quads")
        for what, arr, hi in (("qplane", qplane, npl), ("pchan", pchan, c), ("ptaps", ptaps, kh * kw)):
            if arr is not None and arr.size and (arr.min() < 0 or arr.max() >= hi):
                raise ContractError(f"{where}, rule 'quads': {what} must lie in [0, {hi})")
        bias = vals["bias"]
        if bias is not None and bias.size:
            level = max(int(np.abs(get_scheme(str(s)).levels).max()) for s in attr(func, SPARSE_ROW_SCHEMES))
            act_max = 255 if str(func.params[0].dtype) == "uint8" else 128
            total = c * kh * kw * act_max * level + int(np.abs(bias.astype(np.int64)).max())
            if total > INT32_MAX:
                raise ContractError(f"{where}, rule 'acc_bound': products plus a bias can reach {total}, past int32")
