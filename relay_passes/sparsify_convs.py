"""SparsifyConvs: a quantized conv2d whose kernels are pruned (pattern + connectivity pruning,
NPAS / PatDNN; block-punched 3x3 convs, YOLObile) becomes one kernel-sparse op that only
multiplies the kept weights.

Before (weights int levels ``[F, C, kh, kw]``, most kernels with at most 4 non-zero taps)::

    y = R.call_tir(rmsmp_conv2d_l, (xq, W, bias, scale))             # rmsmp.row_schemes

After::

    y = R.call_tir(rmsmp_conv2d_pattern_l, (xq, w, qplane, rptr, pchan, ptaps, wsum, bias, scale))

Each kept (row ``f``, channel ``c``) kernel's non-zero taps, in ascending order, are cut into
*quads* of 4 taps (one int32 lane of a byte MAC): a pattern-pruned kernel is one quad, a
removed kernel (connectivity pruning) none. A quad of fewer than 4 non-zero taps (a level
rounded to 0, a block-punched kernel) is filled with level-0 taps: those of the channel's most
common 4-tap set that holds it, else the lowest free taps. Quads with the same channel and taps
form a *plane*; the op lists the planes (``pchan``, ``ptaps``), each row's quads (``rptr``,
CSR: by row, then plane), every quad's plane (``qplane``) and 4 levels (``w``), and each row's
sum of levels (``wsum``, for kernels that offset the activations). Kernels pack each plane's 4
shifted taps of the activations once per tile of output pixels, then run each row's quads
against them (``schedules/cpu_sparse_conv.py``). Rows keep the model's order and every row's
scheme (:data:`~relay_passes.contract.SPARSE_ROW_SCHEMES`): SP2-4, Fixed-4 and Fixed-8 levels
all fit int8, so one integer MAC computes every row exactly as its row group would. No filter
reordering: a row's quads name their planes, so rows of different patterns need no grouping.

Runs on the quantized ops (like ``SparsifyRowGroups``, LLVM targets only), on convolutions of
dilation 1 with at least 4 taps whose quads hold at most ``max_density`` of the layer's
``F * C * kh * kw`` weight slots (a dense 3x3 kernel is 3 quads: 12 slots for 9 weights).
"""

from typing import Dict, List, Tuple

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T

from . import contract
from .contract import callee, const_value, rmsmp_attr

__all__ = ["SparsifyConvs", "conv_quads", "conv_pattern_func", "MAX_SLOT_DENSITY"]

#: Layers whose quads fill more than this share of the weight slots stay dense. Pattern pruning
#: alone (4 of 9) gives 0.44; the dense kernel's quads would give 1.33.
MAX_SLOT_DENSITY = 0.5
QUAD = 4


def _fill(taps: List[int], full: List[Tuple[int, ...]], ntaps: int) -> Tuple[int, ...]:
    """``taps`` (< 4) grown to a quad: the first of ``full`` (4-tap sets, most common first) that
    holds them, else the lowest taps not in it."""
    for quad in full:
        if set(taps) <= set(quad):
            return quad
    free = [t for t in range(ntaps) if t not in taps]
    return tuple(sorted(taps + free[:QUAD - len(taps)]))


def conv_quads(w: np.ndarray):
    """``(levels [nq, 4] int8, qplane [nq], rptr [F + 1], pchan [np], ptaps [np, 4])`` (int32) of
    an int weight ``[F, C, kh, kw]`` (module docstring): quads by row, then plane; planes in
    (channel, taps) order."""
    f, c, kh, kw = w.shape
    ntaps = kh * kw
    if ntaps < QUAD:
        raise ValueError(f"conv_quads: a kernel of {kh}x{kw} has fewer than {QUAD} taps")
    flat = w.reshape(f, c, ntaps)
    code = (flat != 0).astype(np.int64) @ (np.int64(1) << np.arange(ntaps, dtype=np.int64))  # [F, C]
    planes: Dict[Tuple[int, Tuple[int, ...]], List[Tuple[np.ndarray, np.ndarray]]] = {}
    for ci in range(c):
        codes = code[:, ci]
        uniq, counts = np.unique(codes[codes > 0], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        full = [tuple(t for t in range(ntaps) if u >> t & 1) for u in uniq[order]]
        full = [q for q in full if len(q) == QUAD]
        for u in uniq:
            taps = [t for t in range(ntaps) if int(u) >> t & 1]
            fs = np.nonzero(codes == u)[0]
            for start in range(0, len(taps), QUAD):
                chunk = taps[start:start + QUAD]
                quad = tuple(chunk) if len(chunk) == QUAD else _fill(chunk, full, ntaps)
                levels = flat[fs][:, ci][:, list(quad)] * np.isin(quad, chunk)  # filled taps: level 0
                planes.setdefault((ci, quad), []).append((fs, levels))
    keys = sorted(planes)
    rows, levels, qplane = [], [], []
    for pi, key in enumerate(keys):
        for fs, lv in planes[key]:
            rows.append(fs)
            levels.append(lv)
            qplane.append(np.full(len(fs), pi))
    pchan = np.array([k[0] for k in keys], np.int32).reshape(-1)
    ptaps = np.array([k[1] for k in keys], np.int32).reshape(-1, QUAD)
    if not rows:  # every weight pruned: one quad of zeros keeps the buffers non-empty
        rptr = np.zeros(f + 1, np.int32)
        rptr[1:] = 1
        return (np.zeros((1, QUAD), np.int8), np.zeros(1, np.int32), rptr, np.zeros(1, np.int32),
                np.arange(QUAD, dtype=np.int32)[None])
    rows, levels, qplane = np.concatenate(rows), np.concatenate(levels), np.concatenate(qplane)
    order = np.lexsort((qplane, rows))  # by row, then plane (channel order)
    rptr = np.zeros(f + 1, np.int64)
    np.add.at(rptr, rows + 1, 1)
    return (levels[order].astype(np.int8), qplane[order].astype(np.int32), np.cumsum(rptr).astype(np.int32), pchan,
            ptaps)


def conv_pattern_func(x_shape, f: int, kh: int, kw: int, strides, nq: int, npl: int, x_dtype: str, layer: str,
                      row_schemes) -> tvm.tirx.PrimFunc:
    """The target-neutral kernel-sparse conv as plain loops: ``acc[b, r, oy, ox] += x[b,
    pchan[i], oy * sh + ky, ox * sw + kx] * w[j, t]`` over the rows ``r``, their quads ``j`` (plane
    ``i = qplane[j]``) and taps ``t`` (``ptaps[i, t] = ky * kw + kx``), then ``float32(acc + bias) * scale``
    (parameters: :data:`~relay_passes.contract.CONV_PATTERN_PARAMS`)."""
    n, c, hp, wp = (int(d) for d in x_shape)
    sh, sw = (int(s) for s in strides)
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1

    @T.prim_func(private=True)
    def func(x: T.Buffer((n, c, hp, wp), x_dtype), w: T.Buffer((nq, 4), "int8"), qplane: T.Buffer((nq,), "int32"),
             rptr: T.Buffer((f + 1,), "int32"), pchan: T.Buffer((npl,), "int32"), ptaps: T.Buffer((npl, 4), "int32"),
             wsum: T.Buffer((f,), "int32"), bias: T.Buffer((f,), "int32"), scale: T.Buffer((f,), "float32"),
             out: T.Buffer((n, f, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        acc = T.alloc_buffer((n, f, oh, ow), "int32")
        for b, r, y, z in T.grid(n, f, oh, ow):
            acc[b, r, y, z] = 0
        for b, r in T.grid(n, f):
            for j in T.serial(rptr[r], rptr[r + 1]):
                for y, z, t in T.grid(oh, ow, 4):
                    acc[b, r, y, z] = acc[b, r, y, z] + T.Cast("int32", x[
                        b, pchan[qplane[j]], y * sh + ptaps[qplane[j], t] // kw,
                        z * sw + ptaps[qplane[j], t] % kw]) * T.Cast("int32", w[j, t])
        for b, r, y, z in T.grid(n, f, oh, ow):
            out[b, r, y, z] = T.Cast("float32", acc[b, r, y, z] + bias[r]) * scale[r]

    attrs = {contract.OP: contract.CONV_PATTERN, contract.LAYER: layer,
             contract.SPARSE_ROW_SCHEMES: [str(s) for s in row_schemes], contract.SPARSE_KERNEL: [kh, kw],
             contract.CONV: {"strides": [sh, sw], "padding": [0, 0], "dilation": [1, 1]}, "op_pattern": 8}
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    return func


@mutator
class _ConvSparsifier(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, max_density: float):
        super().__init__(mod)
        self.mod_, self.max_density = mod, max_density
        self.replaced = False
        self.stats: Dict[str, dict] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        func = callee(self.mod_, call)
        if func is None or rmsmp_attr(func, contract.ROW_SCHEMES) is None or rmsmp_attr(func, contract.OP) != "conv2d":
            return call
        if contract.REQUANT in func.attrs:  # the kernel-sparse op has the float epilogue only
            return call
        xq, w, bias, scale = list(call.args[1].fields)
        w_np, b_np, s_np = const_value(w), const_value(bias), const_value(scale)
        geo = contract.conv_geometry(func)
        x_shape = list(xq.ty.shape)
        if (w_np is None or b_np is None or s_np is None or w_np.ndim != 4 or geo is None or geo["padding"] != [0, 0]
                or geo["dilation"] != [1, 1] or w_np.shape[2] * w_np.shape[3] < QUAD
                or not all(isinstance(d, tvm.tirx.IntImm) for d in x_shape)):
            return call
        f, c, kh, kw = w_np.shape
        nz = np.count_nonzero(w_np)
        if nz > self.max_density * w_np.size:  # quads hold at least the non-zeros: a dense layer, quickly
            return call
        levels, qplane, rptr, pchan, ptaps = conv_quads(w_np)
        density = QUAD * len(qplane) / w_np.size
        if density > self.max_density:
            return call
        layer = str(func.attrs[contract.LAYER])
        wsum = w_np.reshape(f, -1).astype(np.int64).sum(axis=1).astype(np.int32)
        sfunc = conv_pattern_func([int(d) for d in x_shape], f, kh, kw, geo["strides"], len(qplane), len(pchan),
                                  str(xq.ty.dtype), layer, [str(s) for s in func.attrs[contract.ROW_SCHEMES]])
        sgv = self.builder_.add_func(sfunc, f"rmsmp_conv2d_pattern_{contract.symbol_name(layer)}")
        self.replaced = True
        kernels = int(np.count_nonzero(np.any(w_np.reshape(f, c, -1) != 0, axis=2)))
        self.stats[layer] = {"op": contract.CONV_PATTERN, "density": round(density, 4), "quads": int(len(qplane)),
                             "planes": int(len(pchan)), "kernels_kept": kernels, "kernels": int(f * c),
                             "weight_density": round(float(nz) / w_np.size, 4)}
        out_ty = call.ty_args[0]
        args = [xq, relax.const(levels, "int8"), relax.const(qplane, "int32"), relax.const(rptr, "int32"),
                relax.const(pchan, "int32"), relax.const(ptaps, "int32"), relax.const(wsum, "int32"), bias, scale]
        return relax.call_tir(sgv, args, relax.TensorType([int(d) for d in out_ty.shape], out_ty.dtype))


@tvm.transform.module_pass(opt_level=0, name="SparsifyConvs")
class SparsifyConvs:
    """Kernel-sparse ops for pruned convolutions (module docstring); ``last_stats`` is
    ``{layer: {"op", "density", "quads", "planes", "kernels_kept", "kernels", "weight_density"}}``."""

    def __init__(self, max_density: float = MAX_SLOT_DENSITY):
        if not 0.0 <= float(max_density) <= 1.0:
            raise ValueError(f"max_density must be in [0, 1], got {max_density!r}")
        self.max_density = float(max_density)
        self.last_stats: Dict[str, dict] = {}

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        sp = _ConvSparsifier(mod, self.max_density)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                sp.builder_.update_func(gv, sp.visit_expr(func))
        self.last_stats = sp.stats
        out = sp.builder_.get()
        if sp.replaced:
            out = relax.transform.DeadCodeElimination()(out)
        return out
