"""CPU (LLVM: x86, AArch64) schedules for the RMSMP row-group dense and conv2d ops.

Both rules parallelize over the cores and keep the int32 accumulator tile small enough to
live in registers / L1, with the epilogue computed right after each tile:

* dense ``[M, K] x [N, K]``: tiles of output rows, reduction over ``k`` innermost and
  contiguous in both operands, which LLVM vectorizes as an integer reduction (exact in any
  order). At batch 1 this streams the weights once, the memory-bound optimum.
* conv2d NCHW: for each (image, tile of output channels, output row), a vector over the
  output row's pixels accumulates ``x[pixel] * w`` with the weight broadcast, so SP2 decoding
  (shift amounts, masks, sign) happens once per weight, not once per pixel.

Rules follow dlight: ``apply`` returns None when the function is not theirs.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Callable, Optional

import numpy as np
import tvm
from tvm import s_tir, tirx, topi
from tvm.s_tir import dlight as dl
from tvm.sym.analyzer import Analyzer
from tvm.target import Target

from relay_passes import contract
from relay_passes.contract import ConstantKernel
from tvm_rmsmp.quant.schemes import get_scheme, nibble_decode, unpack_nibbles

from .registry import OpScheduleRule, register_target, target_cores
from .cpu_sparse import SparseDense
from .cpu_sparse_conv import SparseConv
from .x86_amx import amx_enabled
from .x86_amx_conv import AmxConvPlan, amx_conv_applies, amx_conv_folds, amx_conv_kernel, amx_conv_weights
from .x86_bounds import KernelBoundError, KernelBoundWarning
from .x86_intrin import (
    ConvGeometry,
    broadcast_dense_kernel,
    gemm_kernel,
    supports_packed_dense,
    tap_order_weights,
    taps_first_weights,
    tile_weights,
    warn_fallback,
    x86_isa,
)
from .x86_layers import x86_layer_kernels
from .x86_tuning_table import target_cpu, x86_constants

__all__ = ["RowGroupDense", "RowGroupConv2d", "FloatMatmul", "FloatElementwise", "FloatRowReduction", "FAST_MATH",
           "schedule_dense", "schedule_conv2d"]


def _largest_divisor(n: Optional[int], candidates) -> int:
    if n is None:  # a symbolic extent (a dynamic batch): no known divisor
        return 1
    for c in candidates:
        if n % c == 0:
            return c
    return 1


def _extent(sch: s_tir.Schedule, loop) -> Optional[int]:
    """A loop's extent; None where it is symbolic (a dynamic batch: taken as many iterations)."""
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _many(extent: Optional[int]) -> int:
    """An extent for comparisons: a symbolic one counts as large."""
    return 1 << 30 if extent is None else extent


def _static_but_batch(func) -> bool:
    """Whether every buffer dimension of ``func`` but the leading one is constant."""
    return all(isinstance(d, tirx.IntImm) for p in func.params if hasattr(p, "shape") for d in list(p.shape)[1:])


def _static(func) -> bool:
    """Whether every buffer of ``func`` has a constant shape (not a dynamic batch's symbolic one)."""
    return all(isinstance(d, tirx.IntImm) for p in func.params if hasattr(p, "shape") for d in p.shape)


def schedule_dense(sch: s_tir.Schedule, target: Optional[Target] = None, tunable: bool = False) -> None:
    """Row-group dense on a CPU; ``tunable`` samples the tile sizes (MetaSchedule search)."""
    acc, out = sch.get_sblock(contract.ACC_BLOCK), sch.get_sblock(contract.OUT_BLOCK)
    m, n, *reduction = sch.get_loops(acc)  # packed 4-bit rows: (byte, nibble)
    if not isinstance(sch.get(m).extent, tirx.IntImm):  # a dynamic batch: one row per task
        mo, mi = sch.split(m, [None, 1])
        no, ni = sch.split(n, [None, _largest_divisor(_extent(sch, n), (8, 4, 2))])
    elif tunable:
        mo, mi = sch.split(m, sch.sample_perfect_tile(m, n=2, max_innermost_factor=8))
        no, ni = sch.split(n, sch.sample_perfect_tile(n, n=2, max_innermost_factor=64))
    else:
        mo, mi = sch.split(m, [None, _largest_divisor(_extent(sch, m), (4, 2))])
        no, ni = sch.split(n, [None, _largest_divisor(_extent(sch, n), (8, 4, 2))])
    sch.reorder(mo, no, mi, ni, *reduction)
    if len(reduction) == 2:
        sch.unroll(reduction[1])  # both nibbles of a byte in one vector iteration
    outer = sch.fuse(mo, no)
    sch.parallel(outer)
    sch.reverse_compute_at(out, outer)
    sch.decompose_reduction(acc, mi)


def schedule_conv2d(sch: s_tir.Schedule, target: Optional[Target] = None, tunable: bool = False) -> None:
    """Row-group conv2d (NCHW) on a CPU; ``tunable`` samples the channel and pixel tiles."""
    acc, out = sch.get_sblock(contract.ACC_BLOCK), sch.get_sblock(contract.OUT_BLOCK)
    n, f, y, x, rc, ry, rx = sch.get_loops(acc)
    ow = _extent(sch, x)
    if tunable:
        fo, fi = sch.split(f, sch.sample_perfect_tile(f, n=2, max_innermost_factor=8))
        xo, xi = sch.split(x, sch.sample_perfect_tile(x, n=2, max_innermost_factor=32))
        whole = True
    else:
        ft = _largest_divisor(_extent(sch, f), (4, 2))
        xt = ow if ow <= 16 else _largest_divisor(ow, (16, 14, 12, 8))
        if xt == 1:
            xt = 8  # a remainder tile beats a scalar loop
        fo, fi = sch.split(f, [None, ft])
        xo, xi = sch.split(x, [None, xt])
        whole = ow % xt == 0
    sch.reorder(n, fo, y, xo, rc, ry, rx, fi, xi)
    outer = sch.fuse(n, fo, y)
    sch.parallel(outer)
    sch.reverse_compute_at(out, xo)
    if whole:
        sch.vectorize(xi)
    sch.unroll(fi)
    sch.decompose_reduction(acc, rc)


def x86_replacement(func, target: Target, relayout: bool = False):
    """The x86 MAC-intrinsic kernel for a row-group dense or conv2d, or None.

    Packed 4-bit groups (fixed and SP2: table decode + MAC) on AVX2 or AVX-512 VNNI; int8
    groups (fixed_8) with VNNI's byte MAC, on AVX2 as int16 pairs (``vpmaddwd``). Convolutions
    run as per-tap GEMMs over channel-last
    activations or through an im2col (see :mod:`schedules.x86_intrin`). ``relayout``: the
    weights will be laid out for the kernel at compile time (dense: tiled, and from
    the target's ``broadcast_min_rows`` activation rows on the outer-product kernel
    (:func:`~schedules.x86_tuning_table.x86_constants`); conv: taps first, or on a target with
    AMX-INT8 the AMX conv (:mod:`schedules.x86_amx_conv`, weights decoded to int8 tiles) for
    every geometry it takes, of a static batch).
    None when the function is not a row group, the target is not x86 with
    AVX2 (then the portable schedule runs, with a warning for an x86 target without AVX2: no
    instruction the target lacks is ever emitted), the reduction is too long for the kernel's
    integer sums (:mod:`schedules.x86_bounds`; a :class:`~schedules.x86_bounds.KernelBoundWarning`,
    and the portable schedule, which sums exact int32 products), or the group has a (tuned)
    schedule already.

    A packed SP2 group's ``rmsmp.sp2_lowering`` (``"shift"``, the pipeline's, or ``"decode"``)
    does not change the kernel built here: it is the product of the portable schedule only.
    ``python -m bench.sp2_lowering`` (1 x 768 x 3072 SP2 rows, one thread): portable shift-add
    980 us, decode 371 us, this kernel 36 us (AVX2) / 19 us (VNNI) on rocketlake (2026-12-05);
    874 / 669 / 46 / 36 us on znver4 (bench/results/sp2_lowering_cpu.json). So on x86 with
    AVX2 the lowering only matters where the portable schedule runs (no AVX2, a reduction past
    the kernel's integer bounds); ``"decode"`` stays an option the bench (and
    tests/test_cpu_kernels.py) use, and would be the better default for portable targets
    (a change to ``relay_passes``, which picks it).
    """
    attrs = func.attrs
    op = str(attrs.get(contract.OP, "")) if attrs is not None else ""
    if op not in ("dense", "conv2d") or attrs.get(contract.SCHEME) is None or "tirx.is_scheduled" in attrs:
        return None
    if attrs.get(contract.REQUANT) is not None:
        return None  # the x86 kernels have the float epilogue only: the portable schedule runs fixed_point layers
    images = None  # a dynamic batch: convolutions run one image's kernel per image
    if not _static(func):
        if op != "conv2d" or not _static_but_batch(func):
            return None  # dense kernels are built for a number of rows (FuseDenseLayers has one for any)
        images = tirx.Var("images", "int32")
    packed = attrs.get(contract.PACKED) is not None
    scheme = get_scheme(str(attrs[contract.SCHEME]))
    x_buf, w_buf, out_buf = func.params[0], func.params[1], func.params[-1]
    if not packed and (scheme.kind != "fixed" or str(w_buf.dtype) != "int8"):
        return None  # unpacked SP2 codes: the portable shift-add schedule
    isa = x86_isa(target)
    if isa is None:
        triple = str(target.attrs.get("mtriple", "") or "")
        if target.kind.name == "llvm" and (not triple or triple.startswith("x86")):
            warn_fallback(f"{op} {attrs.get('rmsmp.layer', '')}", target)
        return None
    x_shape = [1 if images is not None and i == 0 else int(d) for i, d in enumerate(x_buf.shape)]
    n_rows = int(w_buf.shape[0])
    conv = None
    if op == "conv2d":
        geometry = attrs[contract.CONV]
        if any(int(p) for p in geometry["padding"]):
            return None  # the activation quantizer pads; a padded row group is not ours
        sch = s_tir.Schedule(func)
        *_, ry, rx = sch.get_loops(sch.get_sblock(contract.ACC_BLOCK))
        conv = ConvGeometry(*x_shape, _extent(sch, ry), _extent(sch, rx),
                            tuple(int(v) for v in geometry["strides"]), tuple(int(v) for v in geometry["dilation"]))
        if [n_rows, *conv.out_hw] != [int(d) for d in out_buf.shape[1:]] or (
                images is None and conv.batch != int(out_buf.shape[0])):
            return None
        m, k = conv.m, conv.k
    else:
        if len(x_shape) != 2:
            return None
        m, k = x_shape
        if packed and not supports_packed_dense(x_shape, int(w_buf.shape[1])):
            return None
    cpu = target_cpu(target)  # its row of the constants table (schedules.x86_tuning_table)
    if relayout and conv is not None and images is None and isa == "avx512vnni" and amx_enabled(target) \
            and amx_conv_applies(conv, n_rows):
        try:
            return _amx_conv(func, conv, n_rows, str(x_buf.dtype), str(w_buf.dtype), target_cores(target))
        except KernelBoundError:  # past the int32 bound: the VNNI kernels below refuse it the same way
            pass
    outer_product = relayout and conv is None and m >= x86_constants(target)["broadcast_min_rows"]
    levels = nibble_decode(np.arange(16), scheme) if packed else None
    cores = target_cores(target)
    try:
        if outer_product:
            kernel = broadcast_dense_kernel(m, k, n_rows, str(x_buf.dtype), levels, isa, num_cores=cores, cpu=cpu)
        else:
            kernel = gemm_kernel(m, k, n_rows, str(x_buf.dtype), levels, isa, conv=conv, num_cores=cores, images=images,
                                 tiled=relayout and conv is None, taps_first=relayout and conv is not None,
                                 cpu=cpu)
    except KernelBoundError as err:  # the reduction is too long for the kernel's integer sums
        warnings.warn(f"{op} {attrs.get('rmsmp.layer', '')} ({scheme.name}): {err}; using the portable schedule",
                      KernelBoundWarning, stacklevel=2)
        return None
    for key, value in attrs.items():
        kernel = kernel.with_attr(key, value)
    kind = "table-decode" if packed else "int8"
    return kernel.with_attr(contract.CPU_KERNEL, f"x86-{isa}-{kind}").with_attr("tirx.is_scheduled", True)


def _amx_conv(func, conv: ConvGeometry, n_rows: int, x_dtype: str, w_dtype: str, cores: int):
    """The AMX conv kernel of a row group (:mod:`schedules.x86_amx_conv`), the weights laid out
    at compile time (decoded to int8 tiles; a packed group's constant keeps its uint8 type)."""
    fold = amx_conv_folds(conv)
    plan = AmxConvPlan(conv.batch, conv.channels, conv.height, conv.width, conv.kh, conv.kw, *conv.strides, n_rows, fold)
    kernel = amx_conv_kernel(plan, x_dtype, w_dtype, num_cores=cores)
    for key, value in func.attrs.items():
        kernel = kernel.with_attr(key, value)
    return (kernel.with_attr(contract.WEIGHT_AMX_CONV, [conv.channels, conv.kh, conv.kw, int(fold)])
            .with_attr(contract.CPU_KERNEL, "x86-amx-conv").with_attr("tirx.is_scheduled", True))


def x86_constant_kernel(target: Target) -> Optional[ConstantKernel]:
    """The x86 kernel of a row group whose weights are constants, with the layout it reads
    them in (the :data:`~relay_passes.contract.ConstantKernel` of the CPU target, for
    ``relay_passes.UseTargetKernels``), or None where the target has none:

    * dense: tiled (:func:`schedules.x86_intrin.tile_weights`): a tile of rows is one
      sequential stream, zero-padded. Batch 1 from L3: 1 x 3072 x 461 SP2 rows 22.2 -> 17.4 us.
      From the target's ``broadcast_min_rows`` (:mod:`schedules.x86_tuning_table`;
      :data:`~schedules.x86_intrin.BROADCAST_MIN_ROWS` by default) activation rows on, tiles of
      8 rows x 4 bytes for the outer-product kernel
      (:func:`schedules.x86_intrin.broadcast_dense_kernel`): 1.11x at 128 x 768 x 1843;
    * conv2d whose channels fill whole vector steps: taps first
      (:func:`schedules.x86_intrin.taps_first_weights`), the order of the per-tap GEMMs, which
      the kernel otherwise made per call; with that copy gone they beat the im2col at every
      ResNet-18 stage (512 channels at 7 x 7, SP2 rows: 445 -> 383 us).
      The other convolutions (a 3-channel stem): tap order
      (:func:`schedules.x86_intrin.tap_order_weights`), the columns of their im2col.
      With AMX-INT8: the AMX conv's int8 tiles (:func:`schedules.x86_amx_conv.amx_conv_weights`,
      4-bit codes decoded; ``relay_passes.FuseDenseLayers`` has most conv layers in one AMX
      kernel already, :mod:`schedules.x86_layers`).

    The pass leaves functions called with a weight that is not a constant to the rules, which
    give them the kernel that reads the weights as they are."""
    if x86_isa(target) is None:
        return None

    def kernel_for(func):
        kernel = x86_replacement(func, target, relayout=True)
        return None if kernel is None else (kernel, _weight_layout(kernel))

    return kernel_for


def _weight_layout(kernel) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """numpy function giving the weights in the layout ``kernel`` reads (None: as they are)."""
    attrs = kernel.attrs
    if contract.WEIGHT_TILES in attrs:
        rows, vec = (int(v) for v in attrs[contract.WEIGHT_TILES])
        return lambda w: tile_weights(w, rows, vec)
    if contract.WEIGHT_TAPS_FIRST in attrs:
        channels, kh, kw = (int(v) for v in attrs[contract.WEIGHT_TAPS_FIRST])
        return lambda w: taps_first_weights(w, channels, kh, kw)
    if contract.WEIGHT_AMX_CONV in attrs:
        channels, kh, kw, fold = (int(v) for v in attrs[contract.WEIGHT_AMX_CONV])
        scheme = get_scheme(str(attrs[contract.SCHEME]))
        if contract.PACKED in attrs:  # 4-bit codes decoded to their int8 levels, then viewed as the uint8 constant
            return lambda w: amx_conv_weights(nibble_decode(unpack_nibbles(w, channels * kh * kw), scheme).astype(
                np.int8).reshape(len(w), channels, kh, kw), bool(fold)).view(np.uint8)
        return lambda w: amx_conv_weights(w, bool(fold))
    if contract.WEIGHT_TAP_ORDER in attrs:
        channels, kh, kw, vec = (int(v) for v in attrs[contract.WEIGHT_TAP_ORDER])
        return lambda w: tap_order_weights(w, channels, kh, kw, vec)
    return None


class _X86Rule(OpScheduleRule):
    """The x86 intrinsic kernel where it applies, else the portable schedule of the op."""

    def apply(self, func, target: Target, _tunable: bool):
        if target.kind.name in self.kinds:
            attrs = getattr(func, "attrs", None)
            if attrs is not None and str(attrs.get(contract.OP, "")) == self.op:
                kernel = x86_replacement(func, target)
                if kernel is not None:
                    return s_tir.Schedule(kernel)
        return super().apply(func, target, _tunable)


def _glue_func(func, target: Target, float_only: bool) -> bool:
    """An operator between RMSMP layers (not a row group) on an LLVM target; ``float_only``:
    every buffer float."""
    if target.kind.name != "llvm" or not isinstance(func, tirx.PrimFunc):
        return False
    if func.attrs is not None and str(func.attrs.get(contract.OP, "")) in ("dense", "conv2d"):
        return False
    buffers = [p for p in func.params if hasattr(p, "shape")]
    return bool(buffers) and (not float_only or all(str(b.dtype).startswith("float") for b in buffers))


def _blocks_and_kinds(sch: s_tir.Schedule):
    """The root's child blocks and each block's axis kinds ("S" spatial, "R" reduction); none
    for a function without a root block (hand-written TIR, e.g. TOPI's cumsum of RoBERTa's
    position ids), which the rules then leave to the default schedule."""
    try:
        root = sch.get_sblock("root")
    except s_tir.ScheduleError:
        return [], []
    blocks = sch.get_child_blocks(root)
    kinds = ["".join("S" if int(iv.iter_type) == 0 else "R" if int(iv.iter_type) == 2 else "?"
                     for iv in sch.get(b).iter_vars) for b in blocks]
    return blocks, kinds


class FloatMatmul(dl.ScheduleRule):
    """A single float reduction block ``S..S R..R`` (matmul, batched matmul): parallel over the
    outer spatial loops, tiles of up to 4 rows x one vector of the innermost spatial loop
    inside the reduction (rows unrolled, columns vectorized). Every
    output still sums over the reduction in the original order, so results are unchanged
    bit for bit; only the loop nest around them moves."""

    def apply(self, func, target: Target, _tunable: bool):
        if not _glue_func(func, target, float_only=True):
            return None
        sch = s_tir.Schedule(func)
        blocks, kinds = _blocks_and_kinds(sch)
        if len(blocks) != 1 or not re.fullmatch("S{2,}R+", kinds[0]):
            return None
        block = blocks[0]
        loops = sch.get_loops(block)
        if len(loops) != len(kinds[0]):
            return None
        n_s = len(kinds[0].rstrip("R"))
        spatial, reduction = loops[:n_s], loops[n_s:]
        try:
            inner = spatial[-1]
            lanes = _largest_divisor(_extent(sch, inner), (16, 8, 4))
            jo, ji = sch.split(inner, [None, lanes])
            # a few rows per vector of columns: independent accumulators per reduction step
            # (one chain of dependent FMAs per vector was latency-bound: 2.4x on attention)
            rows = _largest_divisor(_extent(sch, spatial[-2]), (4, 2))
            io, ii = sch.split(spatial[-2], [None, rows])
            sch.reorder(*spatial[:-2], io, jo, *reduction, ii, ji)
            outer = sch.fuse(*spatial[:-2], io) if len(spatial) > 2 else io
            sch.parallel(outer)
            sch.unroll(ii)
            if lanes > 1:
                sch.vectorize(ji)  # before the init is split off: the block must still be a reduction
            sch.decompose_reduction(block, reduction[0])
        except s_tir.ScheduleError:  # e.g. a reduction whose output is not indexed by its spatial loops alone
            return None
        return sch


class FloatElementwise(dl.ScheduleRule):
    """Element-wise and injective chains between RMSMP layers (concatenation of the row
    groups, GELU, activation quantizers, casts): producers inlined into the last block, whose
    outer loops run in parallel and whose innermost loop is split where the concatenated row
    groups meet. Per-element arithmetic is as before, so results are unchanged."""

    def apply(self, func, target: Target, _tunable: bool):
        if not _glue_func(func, target, float_only=False):
            return None
        sch = s_tir.Schedule(func)
        blocks, kinds = _blocks_and_kinds(sch)
        if not blocks or any(set(k) != {"S"} for k in kinds):
            return None
        try:
            for block in blocks[:-1]:
                sch.compute_inline(block)
            loops = sch.get_loops(blocks[-1])
            starts = _input_starts(sch, blocks[-1], loops[-1])
            parallel = len(loops) >= 2 and math.prod(_many(_extent(sch, lp)) for lp in loops) >= 4096
            if not (parallel or starts):
                return None  # small: a parallel launch costs more than the loop
            if not starts and _transposes(sch, blocks[-1]) and all((_extent(sch, lp) or 1) % 8 == 0 for lp in loops[-2:]):
                # a transposition of the two innermost axes (attention's K^T): 8 x 8 tiles,
                # each read row used for 8 vector stores (BERT's 12 x 64 x 128: 96 -> 20 us)
                (ao, ai), (bo, bi) = (sch.split(lp, [None, 8]) for lp in loops[-2:])
                sch.reorder(ao, bo, ai, bi)
                sch.unroll(ai)
                sch.vectorize(bi)
                loops = [*loops[:-2], ao, bo]
            if parallel:
                # the innermost loop stays whole (contiguous, index math LLVM vectorizes);
                # fusing it into 1024-element chunks put a div/mod per element and made the
                # padded activation quantizers 10x slower. The outer loops are not fused
                # either: the first one of more than one iteration runs in parallel (fused, the
                # reshape-transpose-reshape splitting attention heads ran 2.6x slower than
                # unscheduled, 38 vs 14 us; this way 3.6 us)
                outer = [lp for lp in loops[:-1] if _many(_extent(sch, lp)) > 1]
                sch.parallel(outer[0] if outer else loops[0])
            if starts:
                # a concatenation along the innermost axis (the row groups of a layer): one
                # loop per input, whose selects then fold away and whose body LLVM vectorizes
                sch.loop_partition(loops[-1], [b - a for a, b in zip([0] + starts[:-1], starts)] + [None])
        except s_tir.ScheduleError:  # not a pure element-wise chain: leave it
            return None
        return sch


class FloatRowReduction(dl.ScheduleRule):
    """Reductions along the innermost axis with their element-wise neighbours (LayerNorm,
    softmax): one parallel loop over the rows, each row's blocks computed under it (its
    intermediates stay in L1), single-use element-wise blocks inlined, the others vectorized.

    A reduction is one chain of dependent scalar adds per row; ``reassociate`` splits it into
    ``lanes`` vectorized partial sums added at the end (``rfactor``), which changes the float
    rounding, so it is a fast-math rule. Max / min reductions are split either way (exact in
    any order). LayerNorm over 128 x 768: 185 -> 22 us; softmax over 12 x 128 x 128: 230 ->
    86 us (one thread, ``rfactor``); without it the chains bound both (195 and 208 us)."""

    def __init__(self, reassociate: bool, lanes: int = 16):
        super().__init__()
        self.reassociate, self.lanes = reassociate, lanes

    def apply(self, func, target: Target, _tunable: bool):
        if not _glue_func(func, target, float_only=True):
            return None
        sch = s_tir.Schedule(func)
        blocks, kinds = _blocks_and_kinds(sch)
        if len(blocks) < 2 or not any("R" in k for k in kinds) or "R" in kinds[-1]:
            return None
        n_rows = len(kinds[-1]) - 1  # the output's axes but the innermost index the rows
        if n_rows < 1 or any(not re.fullmatch("S{%d}[RS]?" % n_rows, k) for k in kinds):
            return None
        rows = [_extent(sch, lp) for lp in sch.get_loops(blocks[-1])[:n_rows]]
        if any([_extent(sch, lp) for lp in sch.get_loops(b)[:n_rows]] != rows for b in blocks[:-1]):
            return None
        try:
            partial = {}  # name of a partial-sum block -> its lanes
            for block, kind in zip(blocks[:-1], kinds[:-1]):
                if kind.endswith("R"):
                    self._split_reduction(sch, block, partial)
                elif len(kind) > n_rows and len(sch.get_consumers(block)) == 1:
                    sch.compute_inline(block)  # e.g. softmax's x - max, read once by its exp
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            loops = sch.get_loops(blocks[-1])
            row = sch.fuse(*loops[:n_rows]) if n_rows > 1 else loops[0]
            sch.parallel(row)
            for block in reversed(blocks[:-1]):
                sch.compute_at(block, row, preserve_unit_loops=False)
            for block in blocks:
                name, iters = sch.get(block).name_hint, sch.get(block).iter_vars
                if name in partial:
                    sch = self._vectorize_partial(sch, block, partial[name])
                elif len(iters) == n_rows + 1 and all(int(iv.iter_type) == 0 for iv in iters):
                    inner = sch.get_loops(block)[-1]
                    lanes = _largest_divisor(_extent(sch, inner), (self.lanes, 8, 4))
                    if lanes > 1:
                        sch.vectorize(sch.split(inner, [None, lanes])[1])
        except s_tir.ScheduleError:
            return None
        return sch

    @staticmethod
    def _vectorize_partial(sch: s_tir.Schedule, block, lanes: int) -> s_tir.Schedule:
        """The partial-sum block under its row: lanes innermost and vectorized, the reduction
        over the row's chunks outside. Two loops are left under the row; when both have
        ``lanes`` iterations (a row of ``lanes ** 2``), only the lane loop can be vectorized,
        so each is tried on a copy of the schedule."""
        inner = [lp for lp in sch.get_loops(block)[1:] if _many(_extent(sch, lp)) > 1]
        if len(inner) != 2:
            raise s_tir.ScheduleError(f"{len(inner)} loops under the row, expected 2")
        for ko, ki in (inner, inner[::-1]):
            if _extent(sch, ki) != lanes:
                continue
            trial = sch.copy()
            try:
                trial.reorder(ko, ki)
                trial.vectorize(ki)
                trial.decompose_reduction(block, ko)
                return trial
            except s_tir.ScheduleError:
                continue
        raise s_tir.ScheduleError("no vectorizable lane loop")

    def _split_reduction(self, sch: s_tir.Schedule, block, partial) -> None:
        """``lanes`` partial results of ``block`` (a new block before it), when allowed."""
        value = getattr(sch.get(block).body, "value", None)
        exact = isinstance(value, (tirx.Max, tirx.Min))
        k = sch.get_loops(block)[-1]
        lanes = _largest_divisor(_extent(sch, k), (self.lanes, 8, 4))
        if lanes == 1 or not (exact or self.reassociate):
            return
        _, ki = sch.split(k, [None, lanes])
        # the lanes as the partial buffer's innermost axis: contiguous vector stores
        rf = sch.rfactor(ki, factor_axis=len(sch.get(block).iter_vars) - 1)
        partial[sch.get(rf).name_hint] = lanes


def _transposes(sch: s_tir.Schedule, block) -> bool:
    """Whether ``block`` reads some buffer with its two innermost axes swapped: the last
    index of the read follows the block's second-to-last axis and not its last one."""
    iters = sch.get(block).iter_vars
    if len(iters) < 2:
        return False
    last, second = iters[-1].var, iters[-2].var
    analyzer = Analyzer()
    for iv in iters:  # index expressions of fused reshapes simplify within the axes' ranges
        analyzer.bind(iv.var, iv.dom)
    for region in sch.get(block).reads:
        if len(region.region) < 2:
            continue
        used = [tirx.analysis.undefined_vars(analyzer.simplify(r.min)) for r in region.region]
        in_last = [any(v.same_as(last) for v in u) for u in used]
        in_second = [any(v.same_as(second) for v in u) for u in used]
        if in_second[-1] and not in_last[-1] and any(in_last[:-1]):
            return True
    return False


def _input_starts(sch: s_tir.Schedule, block, loop):
    """Where inputs read at a constant shift along ``loop`` start (``x[..., i - 1843]``: a
    concatenation's later inputs), sorted, inside the loop's extent."""
    extent = _extent(sch, loop)
    starts = set()
    for region in sch.get(block).reads:
        if not region.region:  # a 0-d buffer (a scalar index such as ``t[0]``)
            continue
        low = region.region[-1].min
        if isinstance(low, tirx.Sub) and isinstance(low.b, tirx.IntImm) and 0 < int(low.b.value) < _many(extent):
            starts.add(int(low.b.value))
    return sorted(starts)


def _legalize_float32(op_name: str, fast: Callable):
    """A legalization that builds ``fast(bb, x, call)`` for float32 inputs and TVM's own one
    for every other dtype."""

    def legalize(bb, call):
        if str(getattr(call.args[0].ty, "dtype", "")) != "float32":
            return tvm.ir.Op.get(op_name).get_attr("FLegalize")(bb, call)
        return fast(bb, call.args[0], call)

    return legalize


def _fast_gelu(x):
    return x * (tirx.const(0.5, "float32") + topi.fast_erf(x * tirx.const(0.5**0.5, "float32")) * tirx.const(0.5, "float32"))


def _fast_gelu_tanh(x):
    inner = tirx.const((2.0 / np.pi) ** 0.5, "float32") * x * (tirx.const(1.0, "float32") + tirx.const(0.044715, "float32") * x * x)
    return tirx.const(0.5, "float32") * x * (tirx.const(1.0, "float32") + topi.fast_tanh(inner))


#: Float operators legalized to TVM's vectorizable approximations (``topi.fast_erf``, ...)
#: instead of a libm call per element, which LLVM cannot vectorize: GELU and the next
#: quantizer over 128 x 3072 took 2.5-3.5 ms that way, 0.15 ms now. GELU's largest error stays
#: below torch's own (9.4e-7 vs 1.2e-6 over 2^20 normal inputs; the bound is asserted in
#: tests/test_cpu_kernels.py).
FAST_MATH = {
    "relax.nn.gelu": _legalize_float32("relax.nn.gelu", lambda bb, x, call: bb.call_te(_fast_gelu, x, primfunc_name_hint="gelu")),
    "relax.nn.gelu_tanh": _legalize_float32(
        "relax.nn.gelu_tanh", lambda bb, x, call: bb.call_te(_fast_gelu_tanh, x, primfunc_name_hint="gelu_tanh")),
    "relax.erf": _legalize_float32("relax.erf", lambda bb, x, call: bb.call_te(topi.fast_erf, x)),
    "relax.tanh": _legalize_float32("relax.tanh", lambda bb, x, call: bb.call_te(topi.fast_tanh, x)),
    "relax.exp": _legalize_float32("relax.exp", lambda bb, x, call: bb.call_te(topi.fast_exp, x)),
    "relax.nn.softmax": _legalize_float32(
        "relax.nn.softmax", lambda bb, x, call: bb.call_te(topi.nn.fast_softmax, x, call.attrs.axis)),
}


#: Row-group dense: parallel row tiles, contiguous inner reduction (x86: MAC intrinsics).
RowGroupDense = _X86Rule("dense", schedule_dense, kinds=("llvm",))
#: Row-group conv2d (NCHW): parallel over (image, channel tile, output row), vector over pixels
#: (x86: per-tap GEMMs or im2col + MAC intrinsics).
RowGroupConv2d = _X86Rule("conv2d", schedule_conv2d, kinds=("llvm",))


register_target("llvm", [RowGroupDense, RowGroupConv2d, SparseDense, SparseConv],
                spaces={"dense": schedule_dense, "conv2d": schedule_conv2d},
                fixed=x86_replacement, float_rules=[FloatMatmul(), FloatElementwise(), FloatRowReduction(reassociate=False)],
                fast_math=FAST_MATH, fast_math_rules=[FloatRowReduction(reassociate=True)], layer_kernels=x86_layer_kernels, constant_kernels=x86_constant_kernel)
