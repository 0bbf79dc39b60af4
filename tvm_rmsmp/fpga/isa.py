"""The accelerator's instruction set (VTA-style, with two GEMM cores).

Nine in-order queues run at the same time: ``load`` (DMA of input tiles into the shared
input buffer), ``load_lut`` / ``load_dsp`` (DMA of each core's weights), ``lut`` and ``dsp``
(one GEMM core each), ``alu_lut`` / ``alu_dsp`` (each core's ALU, working on one accumulator
half while the array fills the other; with ``AcceleratorConfig.alu_unit="core"`` the ALU
instructions run on the core's queue instead, as in VTA), ``store_lut`` / ``store_dsp`` (DMA
of each core's results back to DRAM). Each core is thus a VTA-like load-compute-store pipeline; the two share the
input tiles and DRAM, one bus moving ``dram_bytes_per_cycle`` for reads and writes together
(``dram_bus="shared"``, the boards'; or a read and a write channel of that width each, "split"),
serving the DMA queues first come, first served. Queues synchronize only through
dependency tokens, as in VTA: an instruction first
pops one token from each channel in ``wait`` (blocking until the producer pushed it) and
pushes one token to each channel in ``signal`` when it finishes. Channels are named
``"<from>-><to>:<what>"``, e.g. ``"load->dsp:data"`` (weight tile loaded), ``"load->dsp:inp"``
(input tile loaded) or ``"dsp->load:wgt"`` (weight buffer half free again).

On-chip buffers (each split in two halves, ``slot`` 0/1, for double buffering; the accumulator
and residual buffers in ``AcceleratorConfig.acc_slots`` parts): ``inp``
(shared by both cores), ``wgt_lut``/``wgt_dsp``, ``acc_lut``/``acc_dsp`` (int32) and
``res_lut``/``res_dsp`` (8-bit codes: the other operand of a residual add fused into a layer's
epilogue, where the accelerator has them, ``AcceleratorConfig.res_buffer_kib``).

A region is a tuple of ``(start, extent)`` per axis of a DRAM tensor.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import attrs

__all__ = ["Instruction", "Load", "GemmDSP", "GemmLUT", "Alu", "Store", "CORES", "QUEUES", "ALU_OPS"]

CORES = ("lut", "dsp")
QUEUES = ("load", "load_lut", "load_dsp", "lut", "dsp", "alu_lut", "alu_dsp", "store_lut", "store_dsp")
ALU_OPS = ("add_bias", "mul_shift", "shift", "relu", "madd_shift", "max_window", "clamp")
#: Buffers a LOAD fills: the shared input buffer and, for element-wise programs (:mod:`.eltwise`),
#: the cores' accumulators (8-bit codes widened to int32), on the ``load`` queue; the weights and,
#: for fused residual adds, the residual buffers (8-bit codes) on each core's own load queue.
LOAD_BUFFERS = ("inp", "acc_lut", "acc_dsp", "res_lut", "res_dsp", "wgt_lut", "wgt_dsp")

Region = Tuple[Tuple[int, int], ...]


def _region(value) -> Region:
    return tuple((int(a), int(b)) for a, b in value)


#: The most parts a buffer is split into (``AcceleratorConfig.acc_slots``: the accumulators may
#: have more than the two halves of double buffering).
MAX_SLOTS = 4


def _slot(instance, attribute, value):
    if value not in range(MAX_SLOTS):
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be a buffer part 0 .. {MAX_SLOTS - 1}, "
                         f"got {value!r}")


def _core(instance, attribute, value):
    if value not in CORES:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be one of {CORES}, got {value!r}")


def region_size(region: Region) -> int:
    n = 1
    for _, extent in region:
        n *= extent
    return n


@attrs.define(eq=False)
class Instruction:
    """Fields every instruction has: tokens to wait for / signal, and the layer it belongs to."""

    wait: Tuple[str, ...] = attrs.field(default=(), converter=tuple, kw_only=True)
    signal: Tuple[str, ...] = attrs.field(default=(), converter=tuple, kw_only=True)
    layer: str = attrs.field(default="", kw_only=True)

    @property
    def queue(self) -> str:
        raise NotImplementedError

    def reads(self) -> Tuple[Tuple[str, int], ...]:
        return ()

    def writes(self) -> Tuple[Tuple[str, int], ...]:
        return ()

    def describe(self) -> str:
        fields = []
        for a in attrs.fields(type(self)):
            if a.name in ("wait", "signal", "layer"):
                continue
            fields.append(f"{a.name}={getattr(self, a.name)!r}")
        return f"{type(self).__name__.upper()}({', '.join(fields)})"


@attrs.define(eq=False)
class Load(Instruction):
    """DMA ``region`` of DRAM ``tensor`` into ``buffer`` half ``slot``.

    buffer: "inp", "acc_lut"/"acc_dsp" (8-bit codes, one byte each on the bus, widened to the
    accumulator's int32: the operands of an element-wise ALU op), "res_lut"/"res_dsp" (8-bit
    codes: a fused residual add's other operand) or "wgt_lut"/"wgt_dsp". For
    weights the region is in stored bytes (two 4-bit codes per byte for 4-bit schemes);
    ``nbytes`` is what crosses the bus. Activations (input and accumulator loads) go through the
    ``load`` queue, weights and residual codes through each core's own (a core's residual load
    waits for that core's ALU only, never holding up the other core's inputs).
    """

    buffer: str = attrs.field()
    tensor: str = attrs.field()
    region: Region = attrs.field(converter=_region)
    slot: int = attrs.field(validator=_slot)
    nbytes: int = attrs.field(default=0)
    #: into an accumulator part: the codes stay four to a 32-bit word (a max-pooling's input,
    #: for the ALU's packed row pass) instead of one widened code per word
    packed: bool = attrs.field(default=False)

    @buffer.validator
    def _check_buffer(self, attribute, value):
        if value not in LOAD_BUFFERS:
            raise ValueError(f"LOAD.buffer must be one of {LOAD_BUFFERS}, got {value!r}")

    @property
    def queue(self) -> str:
        return "load_" + self.buffer[4:] if self.buffer.startswith(("wgt_", "res_")) else "load"

    def writes(self):
        return ((self.buffer, self.slot),)


@attrs.define(eq=False)
class _Gemm(Instruction):
    """``acc[acc_slot] (=|+=) inp[inp_slot] (*) wgt[wgt_slot]``.

    op "conv2d": inp tile ``[C, H, W]`` (already padded), weights ``[F, C*kh*kw]`` codes,
    acc ``[F, out_h, out_w]``; op "dense": inp ``[M, K]``, weights ``[F, K]``, acc ``[M, F]``.
    ``reset`` starts a new accumulation (the first reduction tile), from 0 or, with ``bias``
    (a constant vector's DRAM name, rows ``row0 ..``), from each output row's bias: the arrays'
    accumulators add it where they would add zero (``rtl/*.v`` port ``bias``), so no ALU pass
    adds it.
    """

    op: str = attrs.field()
    inp_slot: int = attrs.field(validator=_slot)
    wgt_slot: int = attrs.field(validator=_slot)
    acc_slot: int = attrs.field(validator=_slot)
    rows: int = attrs.field()
    pixels: int = attrs.field()
    reduction: int = attrs.field()
    reset: bool = attrs.field(default=True)
    bits: int = attrs.field(default=4)
    kernel: Tuple[int, int] = attrs.field(default=(1, 1), converter=tuple)
    stride: Tuple[int, int] = attrs.field(default=(1, 1), converter=tuple)
    out_hw: Tuple[int, int] = attrs.field(default=(1, 1), converter=tuple)
    bias: Optional[str] = attrs.field(default=None)
    row0: int = attrs.field(default=0)

    @op.validator
    def _check_op(self, attribute, value):
        if value not in ("conv2d", "dense"):
            raise ValueError(f"GEMM.op must be 'conv2d' or 'dense', got {value!r}")

    core = "?"

    def __attrs_post_init__(self):
        if self.bias is not None and not self.reset:
            raise ValueError(f"GEMM bias {self.bias!r} on a GEMM that does not start the accumulation (reset=False)")

    @property
    def queue(self) -> str:
        return self.core

    def reads(self):
        r = (("inp", self.inp_slot), (f"wgt_{self.core}", self.wgt_slot))
        return r if self.reset else r + ((f"acc_{self.core}", self.acc_slot),)

    def writes(self):
        return ((f"acc_{self.core}", self.acc_slot),)

    @property
    def macs(self) -> int:
        return self.rows * self.pixels * self.reduction


@attrs.define(eq=False)
class GemmDSP(_Gemm):
    """GEMM on the DSP core (fixed-point rows; ``bits`` 4 packs two products per DSP48)."""

    core = "dsp"


@attrs.define(eq=False)
class GemmLUT(_Gemm):
    """GEMM on the LUT shift-add core (SP2 rows)."""

    core = "lut"


@attrs.define(eq=False)
class Alu(Instruction):
    """Element-wise integer op on an accumulator tile, per output row ``r`` of the tile.

    add_bias: ``acc += bias[r]``; mul_shift: ``acc = (acc * mult[r] + 2^(shift[r]-1)) >> shift[r]``
    (requantization by an integer multiply and a rounding shift); shift: the same with
    ``mult = 1``; relu: ``max(acc, 0)``; clamp: ``min(max(acc, lo), hi)`` with ``imm = (lo,
    hi)``, two passes (``requant_alu`` ops ``max`` and ``min``: the layer's codes a fused
    residual add reads).
    ``bias``/``mult``/``shift`` name constant vectors (DRAM tensors fetched with the
    instruction stream) and the first row of the tile.

    madd_shift (a residual add, :mod:`.eltwise`): two accumulator parts of the core,
    ``acc[acc_slot] = (acc[acc_slot] * ma + acc[src_slot] * mb + 2^(S-1)) >> S`` with the
    immediates ``imm = (ma, mb, S)`` (16-bit multipliers, a 6-bit shift), element by element;
    with ``src_buffer="res"`` the second operand is half ``src_slot`` of the core's residual
    buffer instead (a residual add fused into a layer's epilogue: ``acc`` holds the layer's
    requantized codes, ``res`` the other operand's, in the same tile shape).

    max_window (a max-pooling, :mod:`.eltwise`): ``acc[acc_slot][c, y, x] = max over the window
    (kh, kw) at (y sh, x sw) of acc[src_slot][c]`` (``imm = (kh, kw, sh, sw)``), the lanes'
    elementwise max (``requant_alu`` op ``max``) of two operands: the first pass takes two taps
    from the source half, each later one the running max and one more tap, so ``elements``
    counts output elements times ``kh kw - 1`` (at least one pass: a 1x1 window is a copy).
    With ``row_pass`` (the source loaded ``packed``, four codes to a word) the window runs as
    two passes: the rows' max over ``kh`` taps on the packed words (``requant_alu`` op ``max4``,
    four codes a lane; ``row_pass`` codes: output rows x padded width x ``(kh - 1)``), written
    in place, then the columns' max over ``kw`` taps, one code a lane (``elements``: outputs x
    ``(kw - 1)``; the read path picks each code out of its word).
    """

    core: str = attrs.field(validator=_core)
    acc_slot: int = attrs.field(validator=_slot)
    alu_op: str = attrs.field()
    elements: int = attrs.field()
    operand: Optional[str] = attrs.field(default=None)
    shift_operand: Optional[str] = attrs.field(default=None)
    row0: int = attrs.field(default=0)
    row_axis: int = attrs.field(default=0)
    src_slot: Optional[int] = attrs.field(default=None)
    imm: Tuple[int, ...] = attrs.field(default=(), converter=tuple)
    src_buffer: str = attrs.field(default="acc")
    row_pass: int = attrs.field(default=0)

    @alu_op.validator
    def _check_op(self, attribute, value):
        if value not in ALU_OPS:
            raise ValueError(f"ALU op must be one of {ALU_OPS}, got {value!r}")

    def __attrs_post_init__(self):
        if self.alu_op == "max_window":
            if self.src_slot not in range(MAX_SLOTS) or self.src_slot == self.acc_slot or len(self.imm) != 4 or min(
                    int(v) for v in self.imm) < 1:
                raise ValueError(f"ALU max_window needs src_slot, the other half than acc_slot, and imm (kh, kw, sh, "
                                 f"sw) of positive ints; got src_slot={self.src_slot!r}, imm={self.imm!r}")
        if self.src_buffer not in ("acc", "res") or (self.src_buffer == "res" and self.alu_op != "madd_shift"):
            raise ValueError(f"ALU src_buffer must be 'acc', or 'res' for madd_shift; got {self.src_buffer!r} "
                             f"for {self.alu_op}")
        if self.row_pass and self.alu_op != "max_window":
            raise ValueError(f"ALU row_pass is max_window's packed row pass; got it on {self.alu_op}")
        if self.alu_op == "clamp" and not (len(self.imm) == 2 and -2**31 <= int(self.imm[0]) <= int(self.imm[1]) < 2**31):
            raise ValueError(f"ALU clamp needs imm (lo, hi), int32, lo <= hi; got imm={self.imm!r}")
        if self.alu_op == "madd_shift":
            same_half = self.src_buffer == "acc" and self.src_slot == self.acc_slot
            ok = (self.src_slot in range(MAX_SLOTS) and not same_half and len(self.imm) == 3
                  and all(0 <= int(v) < 2**15 for v in self.imm[:2]) and 0 <= int(self.imm[2]) <= 63)
            if not ok:
                raise ValueError(f"ALU madd_shift needs src_slot (of the accumulator, the other half than acc_slot; "
                                 f"or of the residual buffer), and imm (ma, mb, "
                                 f"S) with 16-bit multipliers and a shift in [0, 63]; got src_slot="
                                 f"{self.src_slot!r}, imm={self.imm!r}")

    @property
    def queue(self) -> str:
        return "alu_" + self.core

    def reads(self):
        if self.alu_op == "max_window":
            return ((f"acc_{self.core}", self.src_slot),)
        if self.alu_op == "madd_shift":
            return ((f"acc_{self.core}", self.acc_slot), (f"{self.src_buffer}_{self.core}", self.src_slot))
        return ((f"acc_{self.core}", self.acc_slot),)

    def writes(self):
        return ((f"acc_{self.core}", self.acc_slot),)


@attrs.define(eq=False)
class Store(Instruction):
    """DMA the accumulator tile in ``acc_<core>`` half ``slot`` to ``region`` of DRAM ``tensor``:
    int32, or with ``clamp = (lo, hi)`` narrowed to 8-bit codes, saturating to ``[lo, hi]`` (the
    fixed-point epilogue's clamp, a folded ReLU when ``lo = 0``; ``nbytes`` then counts one byte
    per element)."""

    core: str = attrs.field(validator=_core)
    slot: int = attrs.field(validator=_slot)
    tensor: str = attrs.field()
    region: Region = attrs.field(converter=_region)
    nbytes: int = attrs.field(default=0)
    clamp: Optional[Tuple[int, int]] = attrs.field(default=None)

    @clamp.validator
    def _check_clamp(self, attribute, value):
        if value is not None and not (len(value) == 2 and -128 <= value[0] <= value[1] <= 255
                                      and (value[0] >= 0 or value[1] <= 127)):
            raise ValueError(f"STORE.clamp must be (lo, hi) within int8 or uint8, got {value!r}")

    @property
    def queue(self) -> str:
        return "store_" + self.core

    def reads(self):
        return ((f"acc_{self.core}", self.slot),)


def stream_summary(stream) -> Dict[str, int]:
    """Instruction counts by kind."""
    out: Dict[str, int] = {}
    for ins in stream:
        name = type(ins).__name__
        out[name] = out.get(name, 0) + 1
    return out


def _runs(value) -> Tuple[Tuple[int, int], ...]:
    return tuple((int(r), int(k)) for r, k in value)


@attrs.define(eq=False)
class _SparseGemm(_Gemm):
    """A GEMM tile of a pruned row group (:mod:`.sparse`): the weight buffer holds only the kept
    columns of each *run* of rows (rows sharing one kept-column mask), and the array issues
    only those: ``runs`` is ``((rows, kept columns), ...)`` in row order. ``reduction`` stays
    the dense tile's (the input tile and the accumulator are the dense GEMM's)."""

    runs: Tuple[Tuple[int, int], ...] = attrs.field(default=(), converter=_runs)

    @property
    def macs(self) -> int:
        return self.pixels * sum(r * k for r, k in self.runs)


@attrs.define(eq=False)
class SparseGemmDSP(_SparseGemm):
    """:class:`GemmDSP` over the kept columns of a pruned row group."""

    core = "dsp"


@attrs.define(eq=False)
class SparseGemmLUT(_SparseGemm):
    """:class:`GemmLUT` over the kept columns of a pruned row group."""

    core = "lut"
