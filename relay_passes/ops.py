"""Target-neutral RMSMP operators, as TE compute definitions turned into PrimFuncs.

The importer emits one *quantized* op per layer (all rows, plain integer products); the
:class:`~relay_passes.rewrite_row_groups.RewriteRowGroups` pass splits it into *row-group*
ops, one per scheme, whose products are written the way the scheme's hardware computes them:

* fixed rows: ``int32(x) * int32(w)`` (multiply-accumulate);
* SP2 rows: two masked shifts, an add and a branch-free conditional negate, decoded from the
  per-weight code of :func:`tvm_rmsmp.quant.schemes.sp2_encode` (no multiply on the data path).

Every op computes ``out = float32(acc + bias_int) * out_scale`` with ``acc`` the int32 sum.
The PrimFuncs carry attributes that say what they are, so per-target schedules can find
them without knowing how they were built:

``rmsmp.op``: "dense" | "conv2d";  ``rmsmp.layer``: the torch module path;
``rmsmp.row_schemes``: one scheme per output row (quantized op only);
``rmsmp.scheme`` / ``rmsmp.kind``: the group's scheme and its kind (row-group op only);
``rmsmp.conv``: strides, padding, dilation (conv2d only).
They are marked opaque to operator fusion: the epilogue must stay one multiply, never fused
with a following add into an FMA that would round differently from the reference.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import tvm
from tvm import te, tirx, topi

from tvm_rmsmp.quant.config import TOKEN_EXP_MAX, TOKEN_EXP_MIN
from tvm_rmsmp.quant.schemes import SP2_TERM_BITS
from . import contract

__all__ = [
    "OP_PATTERN_OPAQUE",
    "OP_PATTERN_ELEMWISE",
    "quantize_func",
    "token_exponent_func",
    "quantize_per_token_func",
    "token_epilogue_func",
    "add_requant_func",
    "avgpool_requant_func",
    "maxpool_codes_func",
    "fixed_product",
    "sp2_product",
    "sp2_nibble_decode_product",
    "dense_func",
    "conv2d_func",
    "rmsmp_attrs",
    "dim",
    "func_shape",
    "call_shape",
]

#: relax.OpPatternKind.kOpaque: never fused with neighbours.
OP_PATTERN_OPAQUE = 8
#: relax.OpPatternKind.kElemWise: may fuse into the op before it (e.g. ReLU, pooling).
OP_PATTERN_ELEMWISE = 0
#: relax.OpPatternKind.kBroadcast: elementwise with a broadcast operand (a per-token exponent).
OP_PATTERN_BROADCAST = 1

Product = Callable[[tvm.ir.Expr, tvm.ir.Expr], tvm.ir.Expr]


def dim(d):
    """A shape dimension: an ``int`` where it is a constant, else its (symbolic) expression."""
    if isinstance(d, (int, tirx.IntImm)):
        return int(d)
    if isinstance(d, tvm.ir.Expr):
        return d
    raise TypeError(f"not a shape dimension: {d!r}")


def func_shape(shape) -> list:
    """``shape`` as an op's PrimFunc takes it: constant dimensions as ints, a symbolic leading
    dimension (the batch of a dynamic-batch build, or batch x sequence of a dense op) as the
    PrimFunc's own int64 var ``n``; a symbolic dimension anywhere else is an error."""
    dims = [dim(d) for d in shape]
    if any(not isinstance(d, int) for d in dims[1:]):
        raise ValueError(f"shape {list(shape)}: only the leading (batch) dimension may be symbolic")
    if dims and not isinstance(dims[0], int):
        dims[0] = tirx.Var("n", "int64")
    return dims


def call_shape(out_shape, lead) -> list:
    """An op's output shape (as its PrimFunc declares it) at a call whose input's leading
    dimension is ``lead``: a symbolic leading dimension is the call's."""
    dims = [dim(d) for d in out_shape]
    if dims and not isinstance(dims[0], int):
        dims[0] = dim(lead)
    return dims


def fixed_product(x: tvm.ir.Expr, w: tvm.ir.Expr) -> tvm.ir.Expr:
    """Integer multiply, int32 result."""
    return x.astype("int32") * w.astype("int32")


def sp2_product(x: tvm.ir.Expr, code: tvm.ir.Expr) -> tvm.ir.Expr:
    """``x * w`` for an SP2 code, as shifts, masks and adds only.

    Code fields: ``a | b << 3 | sign << 6``; a term ``t`` is ``((x << t) >> 1)`` when ``t > 0``
    and is masked to 0 by ``-((t + 7) >> 3)`` when ``t == 0``; the sign is applied as
    ``(v ^ s) - s`` with ``s`` in ``{0, -1}``.
    """
    x32 = x.astype("int32")
    c = code.astype("int32")
    field = (1 << SP2_TERM_BITS) - 1
    a = c & field
    b = (c >> SP2_TERM_BITS) & field
    s = tirx.const(0, "int32") - ((c >> (2 * SP2_TERM_BITS)) & 1)
    present = lambda t: tirx.const(0, "int32") - ((t + field) >> SP2_TERM_BITS)  # noqa: E731
    ta = ((x32 << a) >> 1) & present(a)
    tb = ((x32 << b) >> 1) & present(b)
    v = ta + tb
    return (v ^ s) - s


def quantize_func(
    shape: Sequence[int], inv_scale: float, qmin: int, qmax: int, out_dtype: str, layer: str, pad_hw=(0, 0),
    zero_point: Optional[int] = None,
) -> tirx.PrimFunc:
    """The activation quantizer: ``clamp(nearbyint(x * inv_scale), qmin, qmax)`` cast to int8/uint8;
    with ``zero_point`` (asymmetric, uint8) ``clamp(nearbyint(x * inv_scale) + zero_point, qmin, qmax)``.

    ``nearbyint`` rounds half to even on every target (C ``round``, which OpenCL and CUDA
    would use for a plain round, goes half away from zero and disagrees with PyTorch).
    ``pad_hw`` zero-pads the last two axes (NCHW) for the convolution that follows, once per
    layer, so its row-group kernels read a padded tensor without bounds checks (a quantized
    0.0 is exactly 0 for symmetric and unsigned quantizers alike).
    """
    # int64 shapes, like Relax's own legalized ops: the quantizer fuses with the ReLU/pooling
    # before it, and fused buffers must agree in type.
    i64 = _i64
    shape = func_shape(shape)
    x = te.placeholder(tuple(i64(d) for d in shape), "float32", name="x")
    inv = tirx.const(float(inv_scale), "float32")
    lo = tirx.const(float(qmin), "float32")
    hi = tirx.const(float(qmax), "float32")
    if zero_point is None:
        q = lambda *i: tirx.min(tirx.max(tirx.nearbyint(x(*i) * inv), lo), hi).astype(out_dtype)  # noqa: E731
    else:
        zp = tirx.const(float(zero_point), "float32")
        q = lambda *i: tirx.min(tirx.max(tirx.nearbyint(x(*i) * inv) + zp, lo), hi).astype(out_dtype)  # noqa: E731
    ph, pw = (int(p) for p in pad_hw)
    if ph or pw:
        n, c, h, w = shape
        zero = tirx.const(0, out_dtype)

        def padded(b, ch, yy, xx):
            inside = tirx.all(yy >= i64(ph), yy < i64(h + ph), xx >= i64(pw), xx < i64(w + pw))
            return tirx.if_then_else(inside, q(b, ch, yy - i64(ph), xx - i64(pw)), zero)

        out = te.compute((i64(n), i64(c), i64(h + 2 * ph), i64(w + 2 * pw)), padded, name="xq")
        pattern = 2  # injective
    else:
        out = te.compute(tuple(i64(d) for d in shape), q, name="xq")
        pattern = OP_PATTERN_ELEMWISE
    attrs = {contract.OP: contract.QUANTIZE, contract.LAYER: layer, "op_pattern": pattern}
    if zero_point is not None:
        attrs[contract.ZERO_POINT] = int(zero_point)
    return _finish([x, out], attrs)


def _i64(v) -> tvm.ir.Expr:
    """An int64 dimension: a constant, or a symbolic one (see :func:`func_shape`) as it is."""
    v = dim(v)
    return tirx.IntImm("int64", v) if isinstance(v, int) else v


def pow2(e: tvm.ir.Expr) -> tvm.ir.Expr:
    """``2^e`` (float32) from its bits, for an int32 ``e`` whose result is a normal number."""
    return tirx.reinterpret("float32", (e + 127) << 23)


def token_exponent_func(shape: Sequence[int], bits: int, layer: str) -> tirx.PrimFunc:
    """Per-token exponents of ``x [M, K]`` (float32): ``e[m] = clamp(E_m - (bits - 2), TOKEN_EXP_MIN,
    TOKEN_EXP_MAX)`` with ``E_m`` the unbiased exponent field of ``max_k |x[m, k]|`` (a max:
    exact in any order, so any reduction schedule gives the same bits)."""
    m, k = func_shape(shape)
    x = te.placeholder((_i64(m), _i64(k)), "float32", name="x")
    r = te.reduce_axis((_i64(0), _i64(k)), name="k")
    amax = te.compute((_i64(m),), lambda i: te.max(tirx.abs(x[i, r]), axis=r), name="amax")

    def exponent(i):
        field = (tirx.reinterpret("int32", amax[i]) >> 23) & 0xFF
        e = field - (127 + bits - 2)
        return tirx.min(tirx.max(e, tirx.const(TOKEN_EXP_MIN, "int32")), tirx.const(TOKEN_EXP_MAX, "int32"))

    e = te.compute((_i64(m),), exponent, name="e")
    attrs = {contract.OP: contract.TOKEN_EXPONENT, contract.LAYER: layer, contract.ACT_BITS: int(bits),
             "op_pattern": OP_PATTERN_OPAQUE}
    return _finish([x, e], attrs)


def quantize_per_token_func(shape: Sequence[int], bits: int, layer: str) -> tirx.PrimFunc:
    """``x_q[m, k] = clamp(nearbyint(x[m, k] * 2^-e[m]), -qmax, qmax)`` as int8 (an exact multiply)."""
    m, k = func_shape(shape)
    x = te.placeholder((_i64(m), _i64(k)), "float32", name="x")
    e = te.placeholder((_i64(m),), "int32", name="e")
    qmax = tirx.const(float(2 ** (bits - 1) - 1), "float32")
    xq = te.compute(
        (_i64(m), _i64(k)),
        lambda i, j: tirx.min(tirx.max(tirx.nearbyint(x[i, j] * pow2(0 - e[i])), -qmax), qmax).astype("int8"),
        name="xq")
    attrs = {contract.OP: contract.QUANTIZE_PER_TOKEN, contract.LAYER: layer, contract.ACT_BITS: int(bits),
             "op_pattern": OP_PATTERN_BROADCAST}
    return _finish([x, e, xq], attrs)


def token_epilogue_func(shape: Sequence[int], layer: str) -> tirx.PrimFunc:
    """``y[m, n] = y0[m, n] * 2^e[m] + bias[n]`` (float32). The product is exact, so a fused
    multiply-add rounds as the separate multiply and add do: targets may contract it."""
    m, n = func_shape(shape)
    y0 = te.placeholder((_i64(m), _i64(n)), "float32", name="y0")
    e = te.placeholder((_i64(m),), "int32", name="e")
    bias = te.placeholder((_i64(n),), "float32", name="bias")
    y = te.compute((_i64(m), _i64(n)), lambda i, j: y0[i, j] * pow2(e[i]) + bias[j], name="y")
    attrs = {contract.OP: contract.TOKEN_EPILOGUE, contract.LAYER: layer, "op_pattern": OP_PATTERN_BROADCAST}
    return _finish([y0, e, bias, y], attrs)


def _f32_const(value: float) -> tvm.ir.Expr:
    """A float32 constant from its bits: a decimal literal in generated source (OpenCL) may not round-trip."""
    bits = int(np.array(float(value), np.float32).view(np.uint32))
    return tirx.reinterpret("float32", tirx.const(bits, "uint32"))


def add_requant_func(shape: Sequence[int], params: Dict[str, object], name: str) -> tirx.PrimFunc:
    """A residual add in the integer-only mode (:data:`contract.ADD_REQUANT`; ``params`` its
    :data:`contract.ADD` attribute): ``a``, ``b`` float32 views of codes at ``scale_a`` /
    ``scale_b``, ``out = float32(clamp((qa * mult_a + qb * mult_b + 2^(shift-1)) >> shift, qmin,
    qmax)) * out_scale`` with ``q = nearbyint(float64(x) / float64(scale))`` (exact for 8-bit codes)
    and the sum in int64, ``>>`` the floor division by ``2^shift`` (so any target agrees)."""
    p = contract.add_params({"params": params})
    if not 1 <= p["shift"] <= 62:
        raise ValueError(f"residual add {name!r}: shift {p['shift']} outside [1, 62]")
    shape = func_shape(shape)
    a = te.placeholder(tuple(_i64(d) for d in shape), "float32", name="a")
    b = te.placeholder(tuple(_i64(d) for d in shape), "float32", name="b")
    f64 = lambda v: tirx.const(float(np.float32(v)), "float64")  # noqa: E731  (an exact float32 value)
    sa, sb = f64(p["scale_a"]), f64(p["scale_b"])
    ma, mb = tirx.const(p["mult_a"], "int64"), tirx.const(p["mult_b"], "int64")
    rnd, div = tirx.const(1 << (p["shift"] - 1), "int64"), tirx.const(1 << p["shift"], "int64")
    lo, hi = tirx.const(p["qmin"], "int64"), tirx.const(p["qmax"], "int64")
    out_scale = _f32_const(p["out_scale"])

    def f(*i):
        qa = tirx.nearbyint(a(*i).astype("float64") / sa).astype("int64")
        qb = tirx.nearbyint(b(*i).astype("float64") / sb).astype("int64")
        q = tirx.floordiv(qa * ma + qb * mb + rnd, div)
        return tirx.max(tirx.min(q, hi), lo).astype("float32") * out_scale

    out = te.compute(tuple(_i64(d) for d in shape), f, name="out")
    attrs = {contract.OP: contract.ADD_REQUANT, contract.LAYER: name, contract.ADD: dict(p),
             "op_pattern": OP_PATTERN_OPAQUE}
    return _finish([a, b, out], attrs)


def avgpool_requant_func(shape: Sequence[int], params: Dict[str, object], name: str) -> tirx.PrimFunc:
    """Global average pooling in the integer-only mode (:data:`contract.AVGPOOL_REQUANT`; ``params``
    its :data:`contract.POOL` attribute): ``x [N, C, H, W]`` a float32 view of codes at
    ``scale_in``, ``out [N, C, 1, 1] = float32(clamp((sum_hw q * mult + 2^(shift-1)) >> shift,
    qmin, qmax)) * out_scale`` with ``q = nearbyint(float64(x) / float64(scale_in))`` (exact), the
    sum in int64 (any order: exact) and ``>>`` the floor division."""
    p = contract.pool_params({"params": params})
    if not 1 <= p["shift"] <= 62:
        raise ValueError(f"average pooling {name!r}: shift {p['shift']} outside [1, 62]")
    n, c, h, w = func_shape(shape)
    x = te.placeholder((_i64(n), _i64(c), _i64(h), _i64(w)), "float32", name="x")
    scale = tirx.const(float(np.float32(p["scale_in"])), "float64")
    ry, rx = te.reduce_axis((_i64(0), _i64(h)), name="ry"), te.reduce_axis((_i64(0), _i64(w)), name="rx")
    total = te.compute(
        (_i64(n), _i64(c)),
        lambda i, j: te.sum(tirx.nearbyint(x[i, j, ry, rx].astype("float64") / scale).astype("int64"), axis=[ry, rx]),
        name="sum")
    mult, rnd = tirx.const(p["mult"], "int64"), tirx.const(1 << (p["shift"] - 1), "int64")
    div = tirx.const(1 << p["shift"], "int64")
    lo, hi = tirx.const(p["qmin"], "int64"), tirx.const(p["qmax"], "int64")
    out_scale = _f32_const(p["out_scale"])
    out = te.compute(
        (_i64(n), _i64(c), _i64(1), _i64(1)),
        lambda i, j, a, b: tirx.max(tirx.min(tirx.floordiv(total[i, j] * mult + rnd, div), hi), lo).astype("float32")
        * out_scale,
        name="out")
    attrs = {contract.OP: contract.AVGPOOL_REQUANT, contract.LAYER: name, contract.POOL: dict(p),
             "op_pattern": OP_PATTERN_OPAQUE}
    return _finish([x, out], attrs)


def maxpool_codes_func(shape: Sequence[int], params: Dict[str, object], name: str) -> tirx.PrimFunc:
    """Max-pooling of a float32 view of codes (:data:`contract.MAXPOOL_CODES`; ``params`` its
    :data:`contract.MAXPOOL` attribute ``{"kernel", "stride", "padding"}`` and, where known, the
    input codes' ``scale_in``): the max over each
    window, padding never chosen (``-inf``), as ``F.max_pool2d``; exact."""
    n, c, h, w = func_shape(shape)
    (kh, kw), (sh, sw), (ph, pw) = ([int(v) for v in params[k]] for k in ("kernel", "stride", "padding"))
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    x = te.placeholder((_i64(n), _i64(c), _i64(h), _i64(w)), "float32", name="x")
    ry, rx = te.reduce_axis((_i64(0), _i64(kh)), name="ry"), te.reduce_axis((_i64(0), _i64(kw)), name="rx")
    low = tirx.const(float("-inf"), "float32")

    def window(i, j, y, z):
        yy, xx = y * _i64(sh) + ry - _i64(ph), z * _i64(sw) + rx - _i64(pw)
        inside = tirx.all(yy >= _i64(0), yy < _i64(h), xx >= _i64(0), xx < _i64(w))
        return te.max(tirx.if_then_else(inside, x[i, j, yy, xx], low), axis=[ry, rx])

    out = te.compute((_i64(n), _i64(c), _i64(oh), _i64(ow)), window, name="out")
    attr = {k: [int(v) for v in params[k]] for k in ("kernel", "stride", "padding")}
    if params.get("scale_in") is not None:
        attr["scale_in"] = float(params["scale_in"])
    attrs = {contract.OP: contract.MAXPOOL_CODES, contract.LAYER: name, contract.MAXPOOL: attr,
             "op_pattern": OP_PATTERN_OPAQUE}
    return _finish([x, out], attrs)


def fixed_nibble_product(x: tvm.ir.Expr, nibble: tvm.ir.Expr) -> tvm.ir.Expr:
    """``x`` times a 4-bit two's-complement code (sign-extended as ``(v ^ 8) - 8``)."""
    v = nibble.astype("int32")
    return x.astype("int32") * ((v ^ 8) - 8)


def sp2_nibble_product(m1: int, m2: int) -> Product:
    """``x`` times a 4-bit SP2 code ``ia | ib << m1 | sign << (m1 + m2)``: masked shifts only.

    Term ``i`` of a field is ``2^(E - i)`` (``i > 0``) with ``E`` the largest exponent, so the
    product is ``(x << (E - ia)) & -(ia != 0)`` plus the same for ``ib``, then the sign.
    """
    e = max(2**m1 - 1, 2**m2 - 1)

    def product(x: tvm.ir.Expr, nibble: tvm.ir.Expr) -> tvm.ir.Expr:
        x32 = x.astype("int32")
        c = nibble.astype("int32")
        zero = tirx.const(0, "int32")
        ia = c & ((1 << m1) - 1)
        ib = (c >> m1) & ((1 << m2) - 1)
        s = zero - ((c >> (m1 + m2)) & 1)
        ta = (x32 << (e - ia)) & (zero - ((ia + ((1 << m1) - 1)) >> m1))
        tb = (x32 << (e - ib)) & (zero - ((ib + ((1 << m2) - 1)) >> m2))
        return ((ta + tb) ^ s) - s

    return product


def sp2_nibble_decode_product(m1: int, m2: int) -> Product:
    """``x`` times a 4-bit SP2 code decoded to its integer first (decode, then multiply).

    The magnitude of the ``m1 + m2`` index bits is read from one 32-bit constant holding a
    4-bit entry per index (one variable shift and a mask), the sign bit negates it. On CPUs
    whose integer multiply-accumulate is wide (``vpmaddwd``, VNNI, ``sdot``) this beats the
    shift-add form, which must shift every activation twice; both are exact.
    """
    if m1 + m2 > 3:
        raise ValueError(f"SP2 decode table: m1 + m2 = {m1 + m2} index bits do not fit 8 entries")
    e = max(2**m1 - 1, 2**m2 - 1)
    t1 = [0] + [2 ** (e - i) for i in range(1, 2**m1)]
    t2 = [0] + [2 ** (e - i) for i in range(1, 2**m2)]
    table = 0
    for ia in range(2**m1):
        for ib in range(2**m2):
            mag = t1[ia] + t2[ib]
            if mag > 15:
                raise ValueError(f"SP2 decode table: magnitude {mag} needs more than 4 bits")
            table |= mag << (4 * (ia | ib << m1))
    if table >= 2**31:
        table -= 2**32
    index_mask = (1 << (m1 + m2)) - 1

    def product(x: tvm.ir.Expr, nibble: tvm.ir.Expr) -> tvm.ir.Expr:
        c = nibble.astype("int32")
        s = tirx.const(0, "int32") - ((c >> (m1 + m2)) & 1)
        mag = (tirx.const(table, "int32") >> ((c & index_mask) * 4)) & 15
        return x.astype("int32") * ((mag ^ s) - s)

    return product


def nibble_at(w: te.Tensor, row, index) -> tvm.ir.Expr:
    """The 4-bit code ``index`` of ``row`` in a two-codes-per-byte weight (low nibble first)."""
    byte = w[row, index // 2].astype("int32")
    return (byte >> ((index % 2) * 4)) & 15


def _epilogue(acc: te.Tensor, bias: te.Tensor, scale: te.Tensor, channel_axis: int, requant=None) -> te.Tensor:
    """``float32(acc + bias) * scale``, or with ``requant`` (the :data:`contract.REQUANT` attribute) the
    fixed-point epilogue ``float32(clamp(floor(float64(acc + bias) * scale + 0.5), qmin, qmax)) * out_scale``."""
    if requant is not None:
        lo, hi = tirx.const(float(int(requant["qmin"])), "float64"), tirx.const(float(int(requant["qmax"])), "float64")
        # from its bits: a decimal literal in generated source (OpenCL) may not round-trip
        bits = int(np.array(float(requant["out_scale"]), np.float32).view(np.uint32))
        out_scale = tirx.reinterpret("float32", tirx.const(bits, "uint32"))

        def fixed(*idx):
            c = idx[channel_axis]
            v = (acc(*idx) + bias[c]).astype("float64") * scale[c].astype("float64") + tirx.const(0.5, "float64")
            return tirx.max(tirx.min(tirx.floor(v), hi), lo).astype("float32") * out_scale

        return te.compute(acc.shape, fixed, name=contract.OUT_BLOCK)

    def f(*idx):
        c = idx[channel_axis]
        return (acc(*idx) + bias[c]).astype("float32") * scale[c]

    return te.compute(acc.shape, f, name=contract.OUT_BLOCK)


def rmsmp_attrs(op: str, layer: str, **extra) -> Dict[str, object]:
    attrs = {contract.OP: op, contract.LAYER: layer, "op_pattern": OP_PATTERN_OPAQUE}
    attrs.update(extra)
    return attrs


def _finish(tensors, attrs: Dict[str, object]) -> tirx.PrimFunc:
    # Private function: the module names it on add_func, so drop TE's default symbol "main".
    func = te.create_prim_func(tensors).without_attr("global_symbol")
    for k, v in attrs.items():
        func = func.with_attr(k, v)
    return func


def dense_func(
    x_shape: Sequence[int], x_dtype: str, w_shape: Sequence[int], w_dtype: str, product: Product, attrs: Dict,
    packed: bool = False,
) -> tirx.PrimFunc:
    """``out[m, n] = float32(sum_k product(x[m, k], w[n, k]) + bias[n]) * scale[n]`` (2-D x;
    ``m`` may be symbolic, see :func:`func_shape`)."""
    x_shape, w_shape = func_shape(x_shape), [int(d) for d in w_shape]
    if len(x_shape) != 2 or len(w_shape) != 2 or x_shape[1] != w_shape[1]:
        raise ValueError(f"dense: expected x [M, K] and w [N, K], got x {list(x_shape)} and w {list(w_shape)}")
    x = te.placeholder(tuple(x_shape), x_dtype, name="x")
    n_rows, k_dim = w_shape
    bias = te.placeholder((n_rows,), "int32", name="bias")
    scale = te.placeholder((n_rows,), "float32", name="scale")
    if packed and k_dim % 2 == 0:
        # One byte, both its nibbles: reduction over (byte j, nibble h), so a vectorized j
        # loads each weight byte once (indexing codes by k // 2, k % 2 defeats vectorization).
        # Schedules that want one reduction loop fuse (j, h) back into k.
        w = te.placeholder((n_rows, k_dim // 2), "uint8", name="w")
        j = te.reduce_axis((0, k_dim // 2), name="j")
        h = te.reduce_axis((0, 2), name="h")

        def packed_sum(m, n):
            nibble = (w[n, j].astype("int32") >> (h * 4)) & 15
            return te.sum(product(x[m, 2 * j + h], nibble), axis=[j, h])

        acc = te.compute((x_shape[0], n_rows), packed_sum, name=contract.ACC_BLOCK)
    elif packed:  # odd K: one code per reduction step, the last byte half empty
        w = te.placeholder((n_rows, (k_dim + 1) // 2), "uint8", name="w")
        k = te.reduce_axis((0, k_dim), name="k")
        acc = te.compute((x_shape[0], n_rows), lambda m, n: te.sum(product(x[m, k], nibble_at(w, n, k)), axis=k),
                         name=contract.ACC_BLOCK)
    else:
        k = te.reduce_axis((0, k_dim), name="k")
        w = te.placeholder(tuple(w_shape), w_dtype, name="w")
        acc = te.compute((x_shape[0], n_rows), lambda m, n: te.sum(product(x[m, k], w[n, k]), axis=k), name=contract.ACC_BLOCK)
    out = _epilogue(acc, bias, scale, 1, attrs.get(contract.REQUANT))
    return _finish([x, w, bias, scale, out], attrs)


def conv2d_func(
    x_shape: Sequence[int],
    x_dtype: str,
    w_shape: Sequence[int],
    w_dtype: str,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    product: Product,
    attrs: Dict,
    packed: bool = False,
) -> tirx.PrimFunc:
    """NCHW direct convolution (groups=1) with the RMSMP epilogue; zero padding (x_q of 0.0 is 0).
    The batch ``n`` may be symbolic (see :func:`func_shape`)."""
    x_shape = func_shape(x_shape)
    n, c, h, w_ = x_shape
    f, c2, kh, kw = w_shape
    if c != c2:
        raise ValueError(f"conv2d: input has {c} channels, weight expects {c2}")
    sh, sw = strides
    ph, pw = padding
    dh, dw = dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w_ + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = te.placeholder(tuple(x_shape), x_dtype, name="x")
    if packed:  # [F, C*kh*kw] codes, two per byte
        w = te.placeholder((f, (c * kh * kw + 1) // 2), "uint8", name="w")
        code = lambda o, ci, yy, xx: nibble_at(w, o, (ci * kh + yy) * kw + xx)  # noqa: E731
    else:
        w = te.placeholder(tuple(w_shape), w_dtype, name="w")
        code = lambda o, ci, yy, xx: w[o, ci, yy, xx]  # noqa: E731
    bias = te.placeholder((f,), "int32", name="bias")
    scale = te.placeholder((f,), "float32", name="scale")
    xp = topi.nn.pad(x, [0, 0, ph, pw], [0, 0, ph, pw], pad_value=0, name="pad") if (ph or pw) else x
    rc = te.reduce_axis((0, c), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    acc = te.compute(
        (n, f, oh, ow),
        lambda b, o, y, z: te.sum(
            product(xp[b, rc, y * sh + ry * dh, z * sw + rx * dw], code(o, rc, ry, rx)), axis=[rc, ry, rx]
        ),
        name=contract.ACC_BLOCK,
    )
    out = _epilogue(acc, bias, scale, 1, attrs.get(contract.REQUANT))
    return _finish([x, w, bias, scale, out], attrs)


def output_shape(func: tirx.PrimFunc):
    """Shape and dtype of a PrimFunc's last parameter (its output buffer); a symbolic leading
    dimension is the PrimFunc's own var (:func:`call_shape` gives a call's)."""
    buf = func.params[-1]
    return [dim(d) for d in buf.shape], str(buf.dtype)
