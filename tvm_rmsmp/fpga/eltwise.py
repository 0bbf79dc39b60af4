"""Element-wise programs on the accelerator: the residual add of the integer-only mode.

A residual add (:data:`relay_passes.contract.ADD_REQUANT`) reads two 8-bit code tensors and
writes one: ``out = clamp((qa * ma + qb * mb + 2^(S-1)) >> S, qmin, qmax)``
(:func:`tvm_rmsmp.quant.requant.requantize_add`). The tensors are streamed flat in tiles of at most
``acc_slot_bytes / 4`` codes (an accumulator half of int32; the tile size the cycle model
finds fastest, see :func:`add_stream`). Per tile, on the DSP and LUT
cores in turn (each core's ALU does every other tile, so one tile's store overlaps the next
one's loads)::

    LOAD  acc_<core>[0] <- a[tile]      (load queue, 1 byte per code)
    LOAD  acc_<core>[1] <- b[tile]      -> load-><core>:acc
    ALU   madd_shift acc[0] = (acc[0] * ma + acc[1] * mb + 2^(S-1)) >> S   (one pass)
    STORE acc_<core>[0] -> out[tile], clamp (qmin, qmax)   (1 byte per code)
                                        -> store_<core>->load:acc (the halves are free again)

The ReLU after the add is the store's clamp (``qmin = 0``). The codes move one byte each way;
the ALU does ``alu_lanes`` codes a cycle, so the program is bound by the DRAM read channel
(two bytes per output code).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import attrs
import numpy as np

from .isa import Alu, Load, Store, stream_summary
from .simulator import Simulator

__all__ = ["EltwiseProgram", "add_stream"]


#: Smallest tile tried (codes): below it the DMA set-up latency dominates.
MIN_TILE = 256


def add_stream(name: str, elements: int, params: Dict[str, object], accel, tile: Optional[int] = None) -> list:
    """The instruction stream of a residual add of ``elements`` codes (DRAM tensors ``<name>.a``,
    ``<name>.b``, ``<name>.out``, flat) with ``params`` its :data:`contract.ADD` attribute.
    ``tile``: codes per tile; by default the one of ``acc_slot_bytes / 4 / 2^k`` (at least
    :data:`MIN_TILE`) whose stream the cycle model times fastest (small tiles overlap one
    tile's loads with the last one's ALU pass and store; each transfer costs the DMA set-up)."""
    if tile is None:
        full = accel.acc_slot_bytes // 4
        sizes = [full >> k for k in range(8) if k == 0 or (full >> k) >= MIN_TILE]
        sim = Simulator(accel)
        timed = [(sim.run(add_stream(name, elements, params, accel, t)).cycles, -t) for t in sizes]
        tile = -min(timed)[1]
    imm = (int(params["mult_a"]), int(params["mult_b"]), int(params["shift"]))
    clamp = (int(params["qmin"]), int(params["qmax"]))
    starts = list(range(0, int(elements), tile))
    stream: list = []
    for i, start in enumerate(starts):
        core = ("dsp", "lut")[i % 2]
        region = ((start, min(tile, elements - start)),)
        n = region[0][1]
        loaded, done, free = f"load->{core}:acc", f"{core}->store_{core}:acc", f"store_{core}->load:acc"
        stream += [
            Load(buffer=f"acc_{core}", tensor=f"{name}.a", region=region, slot=0, nbytes=n,
                 wait=(free,) if i >= 2 else (), layer=name),
            Load(buffer=f"acc_{core}", tensor=f"{name}.b", region=region, slot=1, nbytes=n, signal=(loaded,), layer=name),
            Alu(core=core, acc_slot=0, alu_op="madd_shift", elements=n, src_slot=1, imm=imm, wait=(loaded,),
                signal=(done,), layer=name),
            Store(core=core, slot=0, tensor=f"{name}.out", region=region, nbytes=n, clamp=clamp, wait=(done,),
                  signal=(free,) if i + 2 < len(starts) else (), layer=name),
        ]
    return stream


@attrs.define
class EltwiseProgram:
    """A residual add on the accelerator: its stream and where its operands live in the graph
    (``inputs``: the executor's references of ``a`` and ``b``, float views of codes). ``layer``
    names the add (its step in :meth:`FPGACompiledModel.profile`)."""

    layer: str
    stream: list
    inputs: Tuple[object, object]
    out_var: object
    params: Dict[str, object]
    shape: tuple
    schemes: List[str] = attrs.field(factory=lambda: ["add"])

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))

    def stream_for(self, accel) -> list:
        """The stream for another accelerator configuration (a what-if of ``profile``)."""
        return add_stream(self.layer, self.elements, self.params, accel)

    def dram(self, env) -> Dict[str, np.ndarray]:
        """The DRAM tensors of a run: the two inputs' codes (from their float views: exact) and the output."""
        p = self.params
        out: Dict[str, np.ndarray] = {}
        for key, ref, scale in (("a", self.inputs[0], p["scale_a"]), ("b", self.inputs[1], p["scale_b"])):
            x = np.asarray(env[ref], np.float64)
            out[f"{self.layer}.{key}"] = np.round(x / np.float64(np.float32(scale))).astype(np.int16).reshape(-1)
        out[f"{self.layer}.out"] = np.zeros(self.elements, np.int8 if int(p["qmin"]) < 0 else np.uint8)
        return out

    def result(self, dram) -> np.ndarray:
        """The float view of the output codes (float32 codes times the output scale)."""
        codes = dram[f"{self.layer}.out"].reshape(self.shape)
        return codes.astype(np.float32) * np.float32(self.params["out_scale"])

    def summary(self) -> Dict[str, int]:
        return stream_summary(self.stream)


def program_of(name: str, params: Optional[Dict[str, object]], shape, inputs, out_var, accel) -> EltwiseProgram:
    """The :class:`EltwiseProgram` of one residual add call."""
    shape = tuple(int(d) for d in shape)
    return EltwiseProgram(layer=name, stream=add_stream(name, int(np.prod(shape)), params, accel), inputs=tuple(inputs),
                          out_var=out_var, params=dict(params), shape=shape)
