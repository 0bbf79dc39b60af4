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

import os
from typing import Optional

import numpy as np
from tvm import s_tir
from tvm.target import Target

from tvm_rmsmp.schemes import get_scheme, nibble_decode

from .registry import OpScheduleRule, register_target
from .x86_intrin import packed_dense_kernel, supports_packed_dense, warn_fallback, x86_isa

__all__ = ["RowGroupDense", "RowGroupConv2d", "schedule_dense", "schedule_conv2d"]


def _largest_divisor(n: int, candidates) -> int:
    for c in candidates:
        if n % c == 0:
            return c
    return 1


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def schedule_dense(sch: s_tir.Schedule, target: Optional[Target] = None, tunable: bool = False) -> None:
    """Row-group dense on a CPU; ``tunable`` samples the tile sizes (MetaSchedule search)."""
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    m, n, *reduction = sch.get_loops(acc)  # packed 4-bit rows: (byte, nibble)
    if tunable:
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
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
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


def packed_dense_replacement(func, target: Target):
    """The x86 table-decode + MAC kernel for a packed 4-bit dense row group, or None.

    None when the function is not a packed dense group, the shapes do not fit the kernel, or
    the target is not x86 with AVX2 (then the portable schedule runs, with a warning for an
    x86 target without AVX2: no instruction the target lacks is ever emitted).
    """
    attrs = func.attrs
    if attrs is None or str(attrs.get("rmsmp.op", "")) != "dense" or attrs.get("rmsmp.packed") is None:
        return None
    isa = x86_isa(target)
    if isa is None:
        triple = str(target.attrs.get("mtriple", "") or "")
        if target.kind.name == "llvm" and (not triple or triple.startswith("x86")):
            warn_fallback(f"packed dense {attrs.get('rmsmp.layer', '')}", target)
        return None
    x_buf, w_buf = func.params[0], func.params[1]
    x_shape = [int(d) for d in x_buf.shape]
    n_rows, n_bytes = (int(d) for d in w_buf.shape)
    if not supports_packed_dense(x_shape, n_bytes):
        return None
    scheme = get_scheme(str(attrs["rmsmp.scheme"]))
    levels = nibble_decode(np.arange(16), scheme)
    cores = int(target.attrs.get("num-cores", 0) or 0) or (os.cpu_count() or 1)
    kernel = packed_dense_kernel(x_shape[0], x_shape[1], n_rows, str(x_buf.dtype), levels, isa, num_cores=cores)
    for key, value in attrs.items():
        kernel = kernel.with_attr(key, value)
    return kernel.with_attr("rmsmp.cpu_kernel", f"x86-{isa}-table-decode").with_attr("tirx.is_scheduled", True)


class _RowGroupDenseRule(OpScheduleRule):
    """Dense: the x86 intrinsic kernel for packed 4-bit groups where it applies, else
    :func:`schedule_dense`."""

    def apply(self, func, target: Target, _tunable: bool):
        if target.kind.name in self.kinds:
            kernel = packed_dense_replacement(func, target)
            if kernel is not None:
                return s_tir.Schedule(kernel)
        return super().apply(func, target, _tunable)


#: Row-group dense: parallel row tiles, contiguous inner reduction (x86 packed rows: intrinsics).
RowGroupDense = _RowGroupDenseRule("dense", schedule_dense, kinds=("llvm",))
#: Row-group conv2d (NCHW): parallel over (image, channel tile, output row), vector over pixels.
RowGroupConv2d = OpScheduleRule("conv2d", schedule_conv2d, kinds=("llvm",))


register_target("llvm", [RowGroupDense, RowGroupConv2d], spaces={"dense": schedule_dense, "conv2d": schedule_conv2d},
                fixed=packed_dense_replacement)
