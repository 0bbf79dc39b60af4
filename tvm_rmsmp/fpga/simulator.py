"""Functional and cycle-level simulator of the two-core accelerator.

One pass over an instruction stream does both:

* **timing**: each queue (see :mod:`.isa`) executes its instructions in order; an
  instruction starts when its queue is free and every token it waits for has been pushed,
  and lasts a modelled number of cycles (DMA: bytes over the DRAM channel width plus a
  set-up latency; with ``dram_bus="shared"`` loads and stores share one bus, else loads share
  the read channel and stores the write channel; first come, first served; GEMM: array passes plus the pipeline depth; ALU: elements over its lanes). Instructions are processed in order of start time, so buffer accesses are
  checked as the hardware would see them: a read of a buffer half still being written, or
  a write over a half still being read, by another queue, is a missing dependency token
  (:class:`HazardError`, naming both instructions); a queue waiting for a token nobody will
  push is a deadlock (:class:`DeadlockError`, naming every blocked instruction).
* **function** (when DRAM contents are given): integer-exact. Tiles are held as float64
  and multiplied with BLAS, exact because every partial sum stays far below 2^53
  (|x| <= 255, |w| <= 127, at most 2^20 products per output in any layer here).
"""

from __future__ import annotations

import collections
import math
from typing import Dict, List, Optional, Sequence

import attrs
import numpy as np

from .config import AcceleratorConfig, FPGAConfig
from .isa import QUEUES, Alu, Instruction, Load, Store, _Gemm, _SparseGemm, region_size

__all__ = ["Simulator", "SimResult", "WeightTensor", "DependencyError", "DeadlockError", "HazardError"]


class DependencyError(RuntimeError):
    """An instruction stream whose dependency tokens do not order its buffer accesses."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


class DeadlockError(DependencyError):
    pass


class HazardError(DependencyError):
    pass


@attrs.define
class WeightTensor:
    """A weight tensor in DRAM: its stored bytes (what DMA moves) and its integer levels
    ``[rows, R]`` (what the core computes with after decoding the codes)."""

    stored: np.ndarray
    levels: np.ndarray
    codes_per_byte: int

    def tile(self, region) -> np.ndarray:
        """Levels of the rows and (row-major contiguous) columns a weight LOAD moves."""
        (r0, nr), rest = region[0], region[1:]
        shape = self.stored.shape[1:]
        partial = [i for i, ((a, n), d) in enumerate(zip(rest, shape)) if (a, n) != (0, d)]
        if partial and any(rest[i] != (0, shape[i]) for i in range(partial[0] + 1, len(shape))):
            raise ValueError(f"weight region {region} is not contiguous in a row of {list(self.stored.shape)}")
        b0 = int(np.ravel_multi_index([a for a, _ in rest], shape)) if rest else 0
        nb = int(np.prod([n for _, n in rest])) if rest else 1
        c0 = b0 * self.codes_per_byte
        c1 = min((b0 + nb) * self.codes_per_byte, self.levels.shape[1])
        return self.levels[r0:r0 + nr, c0:c1]


@attrs.define
class SimResult:
    cycles: int
    busy: Dict[str, int]
    macs: Dict[str, int]
    instructions: int
    timeline: List[tuple] = attrs.field(factory=list)  # (queue, start, end, index) when recorded

    def utilization(self) -> Dict[str, float]:
        return {q: (b / self.cycles if self.cycles else 0.0) for q, b in self.busy.items()}


def _slices(region):
    return tuple(slice(a, a + n) for a, n in region)


class Simulator:
    """Runs instruction streams on the accelerator of ``config``."""

    def __init__(self, config):
        self.config = config
        self.acc: AcceleratorConfig = config.accelerator if isinstance(config, FPGAConfig) else config
        self._patches = None

    # ----- cycle model -----------------------------------------------------------------
    def duration(self, ins: Instruction) -> int:
        a = self.acc
        if isinstance(ins, (Load, Store)):
            return math.ceil(ins.nbytes / a.dram_bytes_per_cycle) + a.dma_latency_cycles
        if isinstance(ins, _Gemm):
            arr = a.dsp_array if ins.core == "dsp" else a.lut_array
            # a DSP48 multiplies a 4-bit weight by dsp_products_4bit packed activations (pixels)
            pack = a.dsp_products_4bit if (ins.core == "dsp" and ins.bits <= 4) else 1
            passes = ins.rows * math.ceil(ins.pixels / (arr.pixels * pack)) * math.ceil(ins.reduction / arr.reduction)
            if isinstance(ins, _SparseGemm):  # a pruned tile: each run of rows over its kept columns only
                passes = sum(rows * math.ceil(ins.pixels / (arr.pixels * pack)) * math.ceil(kept / arr.reduction)
                             for rows, kept in ins.runs)
            return passes + a.gemm_pipeline_cycles
        if isinstance(ins, Alu):  # a clamp is two passes (requant_alu ops max and min)
            cycles = (2 if ins.alu_op == "clamp" else 1) * math.ceil(ins.elements / a.alu_lanes) + 2
            if ins.row_pass:  # a max-pooling's row pass over packed codes, four a lane, first
                cycles += math.ceil(ins.row_pass / (4 * a.alu_lanes)) + 2
            return cycles
        raise TypeError(f"unknown instruction {type(ins).__name__}")

    def queue_of(self, ins: Instruction) -> str:
        """The queue ``ins`` runs on here: ALU instructions on the core's own queue where the
        accelerator's ALU is not a unit of its own (``alu_unit="core"``)."""
        if isinstance(ins, Alu) and self.acc.alu_unit == "core":
            return ins.core
        return ins.queue

    def peak_macs(self, core: str) -> int:
        return self.acc.macs_per_cycle(core, 4)

    # ----- execution -------------------------------------------------------------------
    def run(self, stream: Sequence[Instruction], dram: Optional[Dict[str, object]] = None,
            record: bool = False) -> SimResult:
        queues: Dict[str, List[int]] = {q: [] for q in QUEUES}
        for i, ins in enumerate(stream):
            queues[self.queue_of(ins)].append(i)
        head = {q: 0 for q in QUEUES}
        free_at = {q: 0 for q in QUEUES}
        busy = {q: 0 for q in QUEUES}
        busy.update(dma_read=0, dma_write=0)
        channel_free = {"dma_read": 0, "dma_write": 0, "dram": 0}
        macs = {"lut": 0, "dsp": 0}
        tokens: Dict[str, collections.deque] = collections.defaultdict(collections.deque)
        writer: Dict[tuple, tuple] = {}   # (buffer, slot) -> (index, queue, end)
        readers: Dict[tuple, list] = collections.defaultdict(list)  # -> [(index, queue, end)]
        data: Dict[tuple, np.ndarray] = {}
        timeline = []
        end_time = 0
        self._patches = None
        while True:
            best = None
            for q in QUEUES:
                if head[q] >= len(queues[q]):
                    continue
                ins = stream[queues[q][head[q]]]
                need = collections.Counter(ins.wait)
                if any(len(tokens[ch]) < n for ch, n in need.items()):
                    continue
                start = free_at[q]
                for ch, n in need.items():
                    start = max(start, tokens[ch][n - 1])
                if best is None or start < best[0]:
                    best = (start, q)
            if best is None:
                blocked = [q for q in QUEUES if head[q] < len(queues[q])]
                if not blocked:
                    break
                lines = []
                for q in blocked:
                    i = queues[q][head[q]]
                    ins = stream[i]
                    missing = [ch for ch in ins.wait if not tokens[ch]]
                    lines.append(f"queue {q} at instruction #{i} {ins.describe()} (layer {ins.layer!r}) "
                                 f"waits for token(s) {missing} that no instruction will push")
                raise DeadlockError("deadlock: " + "; ".join(lines), queues[blocked[0]][head[blocked[0]]])
            start, q = best
            i = queues[q][head[q]]
            ins = stream[i]
            for ch in ins.wait:
                tokens[ch].popleft()
            dur = self.duration(ins)
            if isinstance(ins, (Load, Store)):  # wait for the DRAM bus (or its channel)
                channel = "dma_read" if isinstance(ins, Load) else "dma_write"
                bus = "dram" if self.acc.dram_bus == "shared" else channel
                start = max(start, channel_free[bus])
                channel_free[bus] = start + dur
                busy[channel] += dur
            end = start + dur
            self._check_access(stream, i, ins, q, start, end, writer, readers)
            if dram is not None:
                self._execute(i, ins, dram, data)
            elif isinstance(ins, Load):
                self._check_capacity(i, ins)
            for ch in ins.signal:
                tokens[ch].append(end)
            free_at[q] = end
            busy[q] += dur
            if isinstance(ins, _Gemm):
                macs[ins.core] += ins.macs
            head[q] += 1
            end_time = max(end_time, end)
            if record:
                timeline.append((q, start, end, i))
        return SimResult(cycles=end_time, busy=busy, macs=macs, instructions=len(stream), timeline=timeline)

    @staticmethod
    def _check_access(stream, i, ins, q, start, end, writer, readers):
        for key in ins.reads():
            w = writer.get(key)
            if w is None:
                raise HazardError(
                    f"read-before-write: instruction #{i} {ins.describe()} (layer {ins.layer!r}) reads "
                    f"{key[0]}[{key[1]}], which no instruction has written", i)
            if w[1] != q and w[2] > start:
                raise HazardError(
                    f"read-before-write: instruction #{i} {ins.describe()} (layer {ins.layer!r}) reads "
                    f"{key[0]}[{key[1]}] at cycle {start} while instruction #{w[0]} {stream[w[0]].describe()} "
                    f"writes it until cycle {w[2]} (missing dependency token)", i)
        for key in ins.writes():
            for r in readers.get(key, ()):
                if r[1] != q and r[2] > start and r[0] != i:
                    raise HazardError(
                        f"write-after-read: instruction #{i} {ins.describe()} (layer {ins.layer!r}) overwrites "
                        f"{key[0]}[{key[1]}] at cycle {start} while instruction #{r[0]} {stream[r[0]].describe()} "
                        f"reads it until cycle {r[2]} (missing dependency token)", i)
            w = writer.get(key)
            if w is not None and w[1] != q and w[2] > start:
                raise HazardError(
                    f"write-after-write: instruction #{i} {ins.describe()} (layer {ins.layer!r}) writes "
                    f"{key[0]}[{key[1]}] at cycle {start} while instruction #{w[0]} still writes it until "
                    f"cycle {w[2]}", i)
        for key in ins.reads():
            readers[key].append((i, q, end))
        for key in ins.writes():
            writer[key] = (i, q, end)
            readers[key] = [r for r in readers[key] if r[0] == i]

    def _check_capacity(self, i, ins: Load):
        if ins.buffer.startswith("acc_"):  # 8-bit codes widened to int32 accumulators (or packed)
            need, limit = (1 if ins.packed else 4) * region_size(ins.region), self.acc.acc_slot_bytes
        elif ins.buffer.startswith("res_"):  # 8-bit codes, one byte each
            need, limit = region_size(ins.region), self.acc.res_slot_bytes
        else:
            need, limit = ins.nbytes, self.acc.inp_slot_bytes if ins.buffer == "inp" else self.acc.wgt_slot_bytes
        if need > limit:
            raise ValueError(f"instruction #{i} {ins.describe()} (layer {ins.layer!r}) moves {need} bytes into "
                             f"{ins.buffer}, whose half holds {limit}")

    # ----- function --------------------------------------------------------------------
    def _execute(self, i, ins, dram, data):
        if isinstance(ins, Load):
            self._check_capacity(i, ins)
            src = dram[ins.tensor]
            if isinstance(src, WeightTensor):
                tile = src.tile(ins.region)
            else:
                tile = np.asarray(src[_slices(ins.region)], dtype=np.float64)
                if len(ins.region) == 4:  # conv input [1, C, H, W] -> [C, H, W]
                    tile = tile[0]
            data[(ins.buffer, ins.slot)] = tile
            if ins.buffer == "inp":
                self._patches = None
        elif isinstance(ins, _Gemm):
            if ins.rows * ins.pixels * 4 > self.acc.acc_slot_bytes:
                raise ValueError(f"instruction #{i} {ins.describe()} (layer {ins.layer!r}): an accumulator tile of "
                                 f"{ins.rows * ins.pixels * 4} bytes exceeds the {self.acc.acc_slot_bytes}-byte half")
            inp = data[("inp", ins.inp_slot)]
            wgt = data[(f"wgt_{ins.core}", ins.wgt_slot)]
            if hasattr(wgt, "product"):  # a pruned tile (fpga.sparse.SparseTile): kept columns only
                a = inp if ins.op == "dense" else self._conv_patches(inp, ins)
                prod = wgt.product(a)
                prod = prod if ins.op == "dense" else prod.T.reshape(wgt.shape[0], *ins.out_hw)
            elif ins.op == "dense":
                prod = inp @ wgt.T  # [M, F]
            else:
                prod = (wgt @ self._conv_patches(inp, ins).T).reshape(wgt.shape[0], *ins.out_hw)
            key = (f"acc_{ins.core}", ins.acc_slot)
            if ins.bias is not None:  # the accumulation starts from the rows' bias
                rows = np.asarray(dram[ins.bias][ins.row0:ins.row0 + ins.rows], dtype=np.float64)
                prod = prod + (rows[None, :] if ins.op == "dense" else rows[:, None, None])
            data[key] = prod if ins.reset else data[key] + prod
        elif isinstance(ins, Alu) and ins.alu_op == "max_window":  # a max-pooling: src half -> this half
            kh, kw, sh, sw = (int(v) for v in ins.imm)
            src = data[(f"acc_{ins.core}", ins.src_slot)]
            oh, ow = (src.shape[-2] - kh) // sh + 1, (src.shape[-1] - kw) // sw + 1
            taps = [src[..., ky: ky + sh * (oh - 1) + 1: sh, kx: kx + sw * (ow - 1) + 1: sw]
                    for ky in range(kh) for kx in range(kw)]
            data[(f"acc_{ins.core}", ins.acc_slot)] = np.max(np.stack(taps), axis=0)
        elif isinstance(ins, Alu):
            key = (f"acc_{ins.core}", ins.acc_slot)
            acc = data[key]
            shape = [1] * acc.ndim
            shape[ins.row_axis] = -1
            n = acc.shape[ins.row_axis]

            def operand(name):
                return np.asarray(dram[name][ins.row0:ins.row0 + n], dtype=np.float64).reshape(shape)

            if ins.alu_op == "madd_shift":  # a residual add: this half and the other (or the residual
                ma, mb, sh = (int(v) for v in ins.imm)  # buffer's), immediates (ma, mb, S)
                other = data[(f"{ins.src_buffer}_{ins.core}", ins.src_slot)]
                if other.shape != acc.shape:
                    raise ValueError(f"instruction #{i} {ins.describe()} (layer {ins.layer!r}): operand tiles of "
                                     f"shapes {acc.shape} and {other.shape}")
                total = acc.astype(np.int64) * ma + other.astype(np.int64) * mb + ((1 << sh) >> 1)
                acc = (total >> sh).astype(np.float64)
            elif ins.alu_op == "add_bias":
                acc = acc + operand(ins.operand)
            elif ins.alu_op == "relu":
                acc = np.maximum(acc, 0)
            elif ins.alu_op == "clamp":
                acc = np.clip(acc, int(ins.imm[0]), int(ins.imm[1]))
            else:
                a = acc.astype(np.int64)
                mult = operand(ins.operand).astype(np.int64) if ins.alu_op == "mul_shift" else 1
                sh = operand(ins.shift_operand).astype(np.int64)
                rnd = np.where(sh > 0, np.left_shift(1, np.maximum(sh - 1, 0)), 0)
                acc = ((a * mult + rnd) >> sh).astype(np.float64)
            data[key] = acc
        elif isinstance(ins, Store):
            tile = data[(f"acc_{ins.core}", ins.slot)]
            dst = dram[ins.tensor]
            view = dst[_slices(ins.region)]
            if len(ins.region) == 4:
                tile = tile[None]
            if tile.shape != view.shape:
                raise ValueError(f"instruction #{i} {ins.describe()} (layer {ins.layer!r}): the accumulator tile "
                                 f"has shape {tile.shape}, the region {view.shape}")
            if ins.clamp is not None:  # narrowing to 8-bit codes saturates
                tile = np.clip(tile, ins.clamp[0], ins.clamp[1])
            dst[_slices(ins.region)] = tile.astype(dst.dtype)

    def _conv_patches(self, inp: np.ndarray, ins) -> np.ndarray:
        """im2col of the input tile, ``[out_h * out_w, C * kh * kw]``, cached per loaded tile."""
        key = (id(inp), ins.kernel, ins.stride, ins.out_hw)
        if self._patches is not None and self._patches[0] == key:
            return self._patches[1]
        kh, kw = ins.kernel
        sh, sw = ins.stride
        oh, ow = ins.out_hw
        win = np.lib.stride_tricks.sliding_window_view(inp, (kh, kw), axis=(1, 2))  # [C, H', W', kh, kw]
        win = win[:, : (oh - 1) * sh + 1: sh, : (ow - 1) * sw + 1: sw]
        patches = np.ascontiguousarray(win.transpose(1, 2, 0, 3, 4)).reshape(oh * ow, -1)
        self._patches = (key, patches)
        return patches
