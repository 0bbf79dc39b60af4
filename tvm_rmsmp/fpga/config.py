"""The FPGA hardware model: a board (datasheet resources) and the accelerator built on it.

One JSON file per board in ``tvm_rmsmp/fpga/boards/`` (like VTA's ``vta_config.json``)::

    {"board": {"name", "part", "luts", "flip_flops", "dsps", "bram36", "clock_mhz"},
     "accelerator": {"dsp_array": {"pixels", "reduction"}, "dsp_products_4bit",
                     "lut_array": {"pixels", "reduction"}, "luts_per_sp2_mac", "lut_overhead",
                     "inp_buffer_kib", "wgt_buffer_kib", "acc_buffer_kib", "res_buffer_kib", "acc_slots",
                     "dram_bytes_per_cycle", "dram_bus", "dma_latency_cycles", "gemm_pipeline_cycles",
                     "alu_lanes", "alu_unit"},
     "provenance": {...}}   # optional, not read: where each number comes from

The accelerator has two GEMM cores that share one input buffer:

* the DSP core, a ``pixels x reduction`` array of DSP48 slices (fixed-point rows). A DSP48
  multiplies a 4-bit weight by two activations packed into its 25-bit port at once
  (``dsp_products_4bit``), so each slice serves two output pixels of a Fixed-4 row per
  cycle, or one of a Fixed-8 row;
* the LUT core, a ``pixels x reduction`` array of shift-add units built from LUTs (SP2 rows,
  ``luts_per_sp2_mac`` LUTs each: two barrel shifts, an add, a conditional negate and a share
  of the adder tree).

Each core has its own weight and accumulator buffers (``wgt_buffer_kib``, ``acc_buffer_kib``
per core) and, where ``res_buffer_kib`` is set, a residual buffer (8-bit codes of the other
operand of a residual add fused into the layer's epilogue, one per accumulator: a quarter of
the accumulator buffer); every buffer is split in two halves for double buffering. The clock is a design
choice (the parts run faster), not a datasheet number.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Union

import attrs

__all__ = ["Board", "ArrayShape", "AcceleratorConfig", "FPGAConfig", "load_board", "known_boards", "BOARD_DIR"]

BOARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "boards")

#: Bytes of one BRAM36 block (36 Kib, of which 32 Kib are data bits at byte width).
BRAM36_BYTES = 4096
#: Share of the LUTs a design can use before routing fails (placement headroom).
MAX_LUT_UTILIZATION = 0.85


def _positive_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


def _non_negative_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative integer, got {value!r}")


def _positive_number(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


@attrs.frozen
class Board:
    """An FPGA part's resources (Xilinx datasheet DS190) and the accelerator clock."""

    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    part: str = attrs.field(validator=attrs.validators.instance_of(str))
    luts: int = attrs.field(validator=_positive_int)
    flip_flops: int = attrs.field(validator=_positive_int)
    dsps: int = attrs.field(validator=_positive_int)
    bram36: int = attrs.field(validator=_positive_int)
    clock_mhz: float = attrs.field(validator=_positive_number)

    @property
    def bram_bytes(self) -> int:
        return self.bram36 * BRAM36_BYTES


@attrs.frozen
class ArrayShape:
    """A MAC array: ``pixels`` output pixels in parallel, each summing ``reduction`` products."""

    pixels: int = attrs.field(validator=_positive_int)
    reduction: int = attrs.field(validator=_positive_int)

    @property
    def units(self) -> int:
        return self.pixels * self.reduction


def _array(value) -> ArrayShape:
    if isinstance(value, ArrayShape):
        return value
    if not isinstance(value, dict) or set(value) != {"pixels", "reduction"}:
        raise ValueError(f"an array must be {{'pixels': int, 'reduction': int}}, got {value!r}")
    return ArrayShape(**value)


@attrs.frozen
class AcceleratorConfig:
    """The two-core accelerator (see the module docstring); sizes in KiB are per core."""

    dsp_array: ArrayShape = attrs.field(converter=_array)
    lut_array: ArrayShape = attrs.field(converter=_array)
    dsp_products_4bit: int = attrs.field(default=2, validator=_positive_int)
    luts_per_sp2_mac: int = attrs.field(default=48, validator=_positive_int)
    lut_overhead: int = attrs.field(default=12000, validator=_non_negative_int)
    inp_buffer_kib: int = attrs.field(default=64, validator=_positive_int)
    wgt_buffer_kib: int = attrs.field(default=32, validator=_positive_int)
    acc_buffer_kib: int = attrs.field(default=96, validator=_positive_int)
    #: Per core: the residual buffer holding the 8-bit codes a fused residual add reads beside
    #: the accumulators (:func:`tvm_rmsmp.fpga.codegen.layer_stream`, ``residual``); 0: none,
    #: every residual add runs as a program of its own (:mod:`.eltwise`).
    res_buffer_kib: int = attrs.field(default=0, validator=_non_negative_int)
    #: Parts the accumulator (and residual) buffer is split into: 2 is double buffering; 3 lets
    #: a core start a tile while the two before it are in the ALU and the store.
    acc_slots: int = attrs.field(default=2)

    @acc_slots.validator
    def _check_acc_slots(self, attribute, value):
        from .isa import MAX_SLOTS

        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_SLOTS:
            raise ValueError(f"acc_slots must be an integer from 2 to {MAX_SLOTS}, got {value!r}")
    dram_bytes_per_cycle: int = attrs.field(default=8, validator=_positive_int)
    #: How reads and writes share the DRAM: ``"shared"``, one bus moving ``dram_bytes_per_cycle``
    #: in all, transfers served one after the other first come, first served (a DDR3 bus is
    #: half-duplex: a read stream alone gets all of it); ``"split"``, a read and a write
    #: channel of ``dram_bytes_per_cycle`` each, running at once (the model before the boards'
    #: DRAM was derived; the default, so older board files time as they did).
    dram_bus: str = attrs.field(default="split")
    dma_latency_cycles: int = attrs.field(default=64, validator=_non_negative_int)
    gemm_pipeline_cycles: int = attrs.field(default=8, validator=_non_negative_int)
    alu_lanes: int = attrs.field(default=16, validator=_positive_int)
    #: ``"own"``: each core's ALU (``rtl/requant_alu.v``, its own DSP48s) is a unit with its own
    #: instruction queue, working on one accumulator part while the GEMM array fills another
    #: (the parts are separate BRAM banks); ``"core"``: ALU instructions take turns with the
    #: core's GEMMs on one queue, as in VTA (the default, so older board files time as they did).
    alu_unit: str = attrs.field(default="core")
    #: Bytes written back per output: 4 (int32 ``acc + bias``; the host does the float
    #: epilogue, which keeps results bit-exact) is what the compiled model runs. 1 models a
    #: design whose ALU requantizes to 8 bits on chip: a timing what-if only (see docs/fpga.md).
    store_bytes_per_output: int = attrs.field(default=4)

    @alu_unit.validator
    def _check_alu_unit(self, attribute, value):
        if value not in ("own", "core"):
            raise ValueError(f"alu_unit must be 'own' or 'core', got {value!r}")

    @dram_bus.validator
    def _check_dram_bus(self, attribute, value):
        if value not in ("shared", "split"):
            raise ValueError(f"dram_bus must be 'shared' or 'split', got {value!r}")

    @store_bytes_per_output.validator
    def _check_store_bytes(self, attribute, value):
        if value not in (1, 2, 4):
            raise ValueError(f"store_bytes_per_output must be 1, 2 or 4, got {value!r}")

    @property
    def inp_slot_bytes(self) -> int:
        """One half of the (double-buffered) input buffer."""
        return self.inp_buffer_kib * 1024 // 2

    @property
    def wgt_slot_bytes(self) -> int:
        return self.wgt_buffer_kib * 1024 // 2

    @property
    def acc_slot_bytes(self) -> int:
        return self.acc_buffer_kib * 1024 // self.acc_slots

    @property
    def res_slot_bytes(self) -> int:
        return self.res_buffer_kib * 1024 // self.acc_slots

    @property
    def dsp_slices(self) -> int:
        return self.dsp_array.units

    @property
    def core_luts(self) -> int:
        """LUTs of the shift-add array plus the fixed overhead (control, DMA, ALU, glue)."""
        return self.lut_array.units * self.luts_per_sp2_mac + self.lut_overhead

    def macs_per_cycle(self, core: str, bits: int = 4) -> int:
        """Products per cycle of ``core`` ("dsp" or "lut") for weights of ``bits`` bits."""
        if core == "lut":
            return self.lut_array.units
        if core == "dsp":
            return self.dsp_array.units * (self.dsp_products_4bit if bits <= 4 else 1)
        raise ValueError(f"core must be 'dsp' or 'lut', got {core!r}")

    def min_tile_check(self, where: str) -> None:
        """The smallest tile (one output pixel of one row, one array-width of reduction,
        int32 accumulators) must fit every buffer half; otherwise nothing can run."""
        need = {
            "inp_buffer_kib": max(self.dsp_array.reduction, self.lut_array.reduction),
            "wgt_buffer_kib": max(self.dsp_array.reduction, self.lut_array.reduction),
            "acc_buffer_kib": 4 * max(self.dsp_array.pixels, self.lut_array.pixels),
        }
        for field, nbytes in need.items():
            half = getattr(self, field) * 1024 // (self.acc_slots if field == "acc_buffer_kib" else 2)
            if half < nbytes:
                raise ValueError(
                    f"{where}: {field}={getattr(self, field)} gives {half} bytes per buffer part, less than the "
                    f"smallest tile ({nbytes} bytes)"
                )


@attrs.frozen
class FPGAConfig:
    """A board and the accelerator on it, checked against each other."""

    board: Board
    accelerator: AcceleratorConfig
    source: str = "<memory>"

    def __attrs_post_init__(self):
        b, a, where = self.board, self.accelerator, self.source
        if a.dsp_slices > b.dsps:
            raise ValueError(f"{where}: the DSP array needs {a.dsp_slices} DSP slices, board {b.name} has {b.dsps}")
        lut_limit = int(b.luts * MAX_LUT_UTILIZATION)
        if a.core_luts > lut_limit:
            raise ValueError(
                f"{where}: the accelerator needs {a.core_luts} LUTs (array {a.lut_array.units} x "
                f"{a.luts_per_sp2_mac} + overhead {a.lut_overhead}), over {MAX_LUT_UTILIZATION:.0%} of board "
                f"{b.name}'s {b.luts}"
            )
        buffers = (a.inp_buffer_kib + 2 * (a.wgt_buffer_kib + a.acc_buffer_kib + a.res_buffer_kib)) * 1024
        if buffers > b.bram_bytes:
            raise ValueError(
                f"{where}: on-chip buffers need {buffers} bytes, board {b.name} has {b.bram_bytes} bytes of BRAM "
                f"({b.bram36} BRAM36)"
            )
        a.min_tile_check(where)

    @property
    def name(self) -> str:
        return self.board.name

    def summary(self) -> Dict[str, object]:
        b, a = self.board, self.accelerator
        return {
            "board": b.name, "clock_mhz": b.clock_mhz,
            "dsp_slices": f"{a.dsp_slices}/{b.dsps}", "luts": f"{a.core_luts}/{b.luts}",
            "fixed4_macs_per_cycle": a.macs_per_cycle("dsp", 4), "sp2_macs_per_cycle": a.macs_per_cycle("lut"),
            "dram_bytes_per_cycle": a.dram_bytes_per_cycle, "dram_bus": a.dram_bus,
        }


def known_boards() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(BOARD_DIR) if f.endswith(".json"))


def _build(cls, data, path: str, section: str):
    if not isinstance(data, dict):
        raise ValueError(f"{path}: '{section}' must be an object, got {type(data).__name__}")
    names = {f.name for f in attrs.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown} in '{section}'; known: {sorted(names)}")
    missing = sorted(f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING and f.name not in data)
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing} in '{section}'")
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad value in '{section}': {err}") from err


def load_board(board: Union[str, "FPGAConfig"]) -> FPGAConfig:
    """The configuration for a board name (``"xc7z045"``) or a path to a board JSON file."""
    if isinstance(board, FPGAConfig):
        return board
    if not isinstance(board, str):
        raise TypeError(f"board must be a name or a JSON path, got {type(board).__name__}")
    if board.endswith(".json") or os.sep in board:
        path = board
        if not os.path.exists(path):
            raise FileNotFoundError(f"no board file {path!r}")
    else:
        path = os.path.join(BOARD_DIR, f"{board}.json")
        if not os.path.exists(path):
            raise ValueError(f"unknown FPGA board {board!r}; known boards: {known_boards()}")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or not {"board", "accelerator"} <= set(data) <= {"board", "accelerator", "provenance"}:
        raise ValueError(f"{path}: expected an object with 'board', 'accelerator' and optionally 'provenance'")
    return FPGAConfig(_build(Board, data["board"], path, "board"),
                      _build(AcceleratorConfig, data["accelerator"], path, "accelerator"), source=path)
