"""FPGA (two-core VTA-style accelerator) schedules for the RMSMP row-group dense and conv2d.

The target is ``{"kind": "ext_dev", "device": "rmsmp_fpga", "model": <board>}``; the board's
buffer sizes (``tvm_rmsmp/fpga/boards/<board>.json``) fix the tiles:

* conv2d NCHW (input already zero-padded by the quantizer): loops ``b, y_o, f_o, c_o`` over
  tiles of ``Ty`` output rows, ``Tf`` output channels and ``Tc`` input channels; the input
  tile ``Tc x ((Ty-1) s + kh) x W`` fits half the input buffer (the other half is loaded
  meanwhile), ``Tf`` rows of weights half a weight buffer, ``Tf x Ty x OW`` int32 half an
  accumulator buffer. ``Ty`` and ``Tc`` depend on the layer shape only, so every row group of
  a layer (SP2 rows on the LUT core, fixed rows on the DSP core) reads the same input
  tiles, which the accelerator loads once for both cores.
* dense ``[M, K] x [F, K]``: loops ``m_o, f_o, k_o`` the same way.

The inner tile loops are blockized into one block per instruction kind, tagged with the
annotation ``fpga.intrin`` (``gemm_lut`` / ``gemm_dsp`` for a tile GEMM, ``alu_store`` for the
epilogue tile: bias add on the accelerator's ALU, then a store). The instruction generator
(:mod:`tvm_rmsmp.fpga.codegen`) walks this scheduled TIR and reads every tile's buffer
regions from the blocks. Tile sizes divide the loop extents (``blockize`` needs whole
tiles); a layer with no valid tiling is left unscheduled and runs on the host CPU.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

from tvm import s_tir, tirx
from tvm.target import Target

from tvm_rmsmp.fpga.config import load_board
from tvm_rmsmp.fpga.target import FPGA_DEVICE

from .registry import register_target
from relay_passes import contract

__all__ = ["FPGARowGroupRule", "plan_tiles", "schedule_row_group", "FPGA_DEVICE", "INTRIN"]

INTRIN = "fpga.intrin"
#: Aim for at least this many rows per accumulator tile when choosing the output rows per tile.
_ROWS_HINT = 32
#: Aim for this many row tiles per row group and band.
_ROW_TILES = 4


@functools.lru_cache(maxsize=None)
def _board(model: str):
    return load_board(model)


def board_of(target: Target):
    attrs = target.attrs
    if "model" not in attrs:
        raise ValueError(f"FPGA target {target} has no 'model' (the board name)")
    return _board(str(attrs["model"]))


def _divisors_desc(n: int):
    return [d for d in range(n, 0, -1) if n % d == 0]


def _row_tiles(rows: int):
    """Row-tile sizes to try, best first: about a quarter of the rows (several tiles per core
    let loads, compute and stores overlap), dividing ``rows``; then every smaller divisor."""
    cap = max(1, -(-rows // _ROW_TILES))
    divs = _divisors_desc(rows)
    below = [d for d in divs if d <= cap]
    above = [d for d in reversed(divs) if d > cap]
    if below and below[0] * 2 <= cap and above:  # poor divisors (e.g. a prime row count)
        return [above[0]] + below
    return below


def _core(func) -> str:
    return "lut" if str(contract.attr(func, contract.KIND, "")) == "sp2" else "dsp"


def _bits(func) -> int:
    return 4 if contract.attr(func, contract.PACKED) is not None else 8


def _kernel(func) -> Tuple[int, int]:
    """Kernel height and width of an unscheduled conv2d: its ``acc`` block's last two axes."""
    sch = s_tir.Schedule(func)
    block = sch.get(sch.get_sblock(contract.ACC_BLOCK))
    dims = [int(iv.dom.extent) for iv in block.iter_vars]
    return dims[-2], dims[-1]


def plan_tiles(func: tirx.PrimFunc, accel) -> Tuple[Optional[Dict[str, int]], str]:
    """Tile sizes for a row-group PrimFunc on accelerator ``accel``, or ``(None, reason)``."""
    op = str(contract.attr(func, contract.OP, ""))
    if op not in ("dense", "conv2d") or contract.attr(func, contract.SCHEME) is None:
        return None, "not a row-group op"
    bits = _bits(func)
    packed = bits == 4
    params = list(func.params)
    x, w, out = params[0], params[1], params[-1]
    if str(x.dtype) not in ("int8", "uint8"):
        return None, f"input dtype {x.dtype} is not 8-bit"
    rows = int(w.shape[0])

    def weight_bytes(tf, codes):
        return tf * ((codes * bits + 7) // 8)

    if op == "conv2d":
        conv = contract.attr(func, contract.CONV)
        strides = [int(v) for v in conv["strides"]]
        padding = [int(v) for v in conv["padding"]]
        dilation = [int(v) for v in conv["dilation"]]
        if any(padding):
            return None, "padding inside the op (the accelerator expects the quantizer to pad)"
        if dilation != [1, 1]:
            return None, f"dilation {dilation} is not supported by the accelerator"
        if strides[0] != strides[1]:
            return None, f"unequal strides {strides}"
        _, c, hp, wp = (int(d) for d in x.shape)
        _, _, oh, ow = (int(d) for d in out.shape)
        s = strides[0]
        kh, kw = _kernel(func)
        for rows_hint in (_ROWS_HINT, 1):
            for tc in _divisors_desc(c):
                if packed and tc != c and (tc * kh * kw) % 2:
                    continue
                for ty in _divisors_desc(oh):
                    inp = tc * ((ty - 1) * s + kh) * wp
                    if inp > accel.inp_slot_bytes or rows_hint * ty * ow * 4 > accel.acc_slot_bytes:
                        continue
                    for tf in _row_tiles(rows):
                        if (weight_bytes(tf, tc * kh * kw) <= accel.wgt_slot_bytes
                                and tf * ty * ow * 4 <= accel.acc_slot_bytes):
                            return {"op": "conv2d", "tc": tc, "ty": ty, "tf": tf, "kh": kh, "kw": kw, "stride": s}, ""
        return None, (f"no tile of {x.shape} x {rows} rows fits the buffers (input half {accel.inp_slot_bytes} B, "
                      f"weight half {accel.wgt_slot_bytes} B, accumulator part {accel.acc_slot_bytes} B)")
    m, k = (int(d) for d in x.shape)
    for rows_hint in (_ROWS_HINT, 1):
        for tk in _divisors_desc(k):
            if packed and tk != k and tk % 2:
                continue
            for tm in _divisors_desc(m):
                if tm * tk > accel.inp_slot_bytes or rows_hint * tm * 4 > accel.acc_slot_bytes:
                    continue
                for tf in _row_tiles(rows):
                    if weight_bytes(tf, tk) <= accel.wgt_slot_bytes and tf * tm * 4 <= accel.acc_slot_bytes:
                        return {"op": "dense", "tk": tk, "tm": tm, "tf": tf}, ""
    return None, (f"no tile of x {list(x.shape)} x {rows} rows fits the buffers (input half {accel.inp_slot_bytes} B, "
                  f"weight half {accel.wgt_slot_bytes} B)")


def schedule_row_group(sch: s_tir.Schedule, plan: Dict[str, int], core: str) -> None:
    """Tile, reorder and blockize a row-group PrimFunc as described in the module docstring."""
    acc, out = sch.get_sblock(contract.ACC_BLOCK), sch.get_sblock(contract.OUT_BLOCK)
    if plan["op"] == "conv2d":
        b, f, y, x, rc, ry, rx = sch.get_loops(acc)
        fo, fi = sch.split(f, [None, plan["tf"]])
        yo, yi = sch.split(y, [None, plan["ty"]])
        co, ci = sch.split(rc, [None, plan["tc"]])
        sch.reorder(b, yo, fo, co, fi, yi, x, ci, ry, rx)
        tile = sch.blockize(fi)
        sch.reverse_compute_at(out, fo)
    else:
        m, f, *reduction = sch.get_loops(acc)
        k = sch.fuse(*reduction) if len(reduction) > 1 else reduction[0]  # packed rows: (byte, nibble)
        mo, mi = sch.split(m, [None, plan["tm"]])
        fo, fi = sch.split(f, [None, plan["tf"]])
        ko, ki = sch.split(k, [None, plan["tk"]])
        sch.reorder(mo, fo, ko, mi, fi, ki)
        tile = sch.blockize(mi)
        sch.reverse_compute_at(out, fo)
    sch.annotate(tile, INTRIN, f"gemm_{core}")
    if plan["op"] == "conv2d":  # unit kernel loops vanish from the tile's iterators: keep the geometry
        sch.annotate(tile, "fpga.kernel_h", plan["kh"])
        sch.annotate(tile, "fpga.kernel_w", plan["kw"])
        sch.annotate(tile, "fpga.stride", plan["stride"])
    anchor = sch.get(fo)
    loops = sch.get_loops(out)
    below = [i for i, lp in enumerate(loops) if sch.get(lp).same_as(anchor)]
    inner = loops[below[0] + 1:] if below else []
    store = sch.blockize(inner[0]) if inner else out  # a one-element tile is the block itself
    sch.annotate(store, INTRIN, "alu_store")


class FPGARowGroupRule(s_tir.dlight.ScheduleRule):
    """Schedules a row-group op for the board of the target; None (host fallback) when no tile fits."""

    def apply(self, func, target: Target, _tunable: bool):
        if target.kind.name != "ext_dev" or contract.attr(func, contract.SCHEME) is None:
            return None
        if str(contract.attr(func, contract.OP, "")) not in ("dense", "conv2d"):
            return None
        plan, _ = plan_tiles(func, board_of(target).accelerator)
        if plan is None:
            return None
        sch = s_tir.Schedule(func)
        schedule_row_group(sch, plan, _core(func))
        return sch


register_target("ext_dev", [FPGARowGroupRule()])
