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

from typing import Optional

from tvm import s_tir
from tvm.target import Target

from .registry import OpScheduleRule, register_target

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
    m, n, k = sch.get_loops(acc)
    if tunable:
        mo, mi = sch.split(m, sch.sample_perfect_tile(m, n=2, max_innermost_factor=8))
        no, ni = sch.split(n, sch.sample_perfect_tile(n, n=2, max_innermost_factor=64))
    else:
        mo, mi = sch.split(m, [None, _largest_divisor(_extent(sch, m), (4, 2))])
        no, ni = sch.split(n, [None, _largest_divisor(_extent(sch, n), (8, 4, 2))])
    sch.reorder(mo, no, mi, ni, k)
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


#: Row-group dense: parallel row tiles, contiguous inner reduction.
RowGroupDense = OpScheduleRule("dense", schedule_dense, kinds=("llvm",))
#: Row-group conv2d (NCHW): parallel over (image, channel tile, output row), vector over pixels.
RowGroupConv2d = OpScheduleRule("conv2d", schedule_conv2d, kinds=("llvm",))


register_target("llvm", [RowGroupDense, RowGroupConv2d], spaces={"dense": schedule_dense, "conv2d": schedule_conv2d})
