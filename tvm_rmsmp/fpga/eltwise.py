"""Programs on the accelerator besides the layers: the residual add and the global average
pooling of the integer-only mode.

A residual add (:data:`relay_passes.contract.ADD_REQUANT`) reads two 8-bit code tensors and
writes one: ``out = clamp((qa * ma + qb * mb + 2^(S-1)) >> S, qmin, qmax)``
(:func:`tvm_rmsmp.quant.requant.requantize_add`). The tensors are streamed flat in tiles of at most
``acc_slot_bytes / 4`` codes (an accumulator part of int32; the tile size the cycle model
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

A global average pooling (:data:`relay_passes.contract.AVGPOOL_REQUANT`) is a dense GEMM on
the DSP core with one row of ones as weights: the codes ``[N C, H W]`` stream through the
input buffer in tiles of rows, ``acc[m] = sum_k x[m, k] * 1`` sums each channel's codes, ``ALU
mul_shift`` scales the sums by the pooling's multiplier and shift, and the store clamps them
to the output codes (the classifier's input): no new hardware (:func:`pool_stream`).

A max-pooling of codes (:data:`relay_passes.contract.MAXPOOL_CODES`) loads blocks of channels
(or of rows, where a padded plane does not fit) of the padded codes into one accumulator part,
four to a word, and takes each window's max into the other (``ALU max_window``: the rows' max
over ``kh`` taps on the packed words, four codes a lane, then the columns' over ``kw`` taps,
one a lane; two-input maxes, the first of each taking two taps), then stores one byte per code; the DSP and LUT cores take the tiles in turn
(:func:`maxpool_stream`). The padding is the value -128, below every code (the DMA pads).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import attrs
import numpy as np

from .isa import Alu, GemmDSP, Load, Store, stream_summary
from .simulator import Simulator, WeightTensor

__all__ = ["EltwiseProgram", "PoolProgram", "MaxPoolProgram", "add_stream", "codes_of", "pool_stream", "pool_fits", "maxpool_stream",
           "maxpool_tiles", "add_program_of", "pool_program_of", "maxpool_program_of"]


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
            Load(buffer=f"acc_{core}", tensor=f"{name}.b", region=region, slot=1, nbytes=n, signal=(loaded,),
                 layer=name),
            Alu(core=core, acc_slot=0, alu_op="madd_shift", elements=n, src_slot=1, imm=imm, wait=(loaded,),
                signal=(done,), layer=name),
            Store(core=core, slot=0, tensor=f"{name}.out", region=region, nbytes=n, clamp=clamp, wait=(done,),
                  signal=(free,) if i + 2 < len(starts) else (), layer=name),
        ]
    return stream


def codes_of(x, scale: float) -> np.ndarray:
    """The integer codes (int16) of a float view ``float32(q) * scale`` of 8-bit codes (exact)."""
    return np.round(np.asarray(x, np.float64) / np.float64(np.float32(scale))).astype(np.int16)


class _Program:
    """What the executor and ``profile`` ask of every program besides the layers."""

    def summary(self) -> Dict[str, int]:
        return stream_summary(self.stream)


@attrs.define
class EltwiseProgram(_Program):
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
            out[f"{self.layer}.{key}"] = codes_of(env[ref], scale).reshape(-1)
        out[f"{self.layer}.out"] = np.zeros(self.elements, np.int8 if int(p["qmin"]) < 0 else np.uint8)
        return out

    def result(self, dram) -> np.ndarray:
        """The float view of the output codes (float32 codes times the output scale)."""
        codes = dram[f"{self.layer}.out"].reshape(self.shape)
        return codes.astype(np.float32) * np.float32(self.params["out_scale"])


def add_program_of(name: str, params: Optional[Dict[str, object]], shape, inputs, out_var, accel) -> EltwiseProgram:
    """The :class:`EltwiseProgram` of one residual add call."""
    shape = tuple(int(d) for d in shape)
    return EltwiseProgram(layer=name, stream=add_stream(name, int(np.prod(shape)), params, accel), inputs=tuple(inputs),
                          out_var=out_var, params=dict(params), shape=shape)


def pool_fits(rows: int, k: int, accel) -> Optional[str]:
    """None if a pooling of ``rows`` channels of ``k`` codes fits the buffers, else why not."""
    if k > accel.inp_slot_bytes or k > accel.wgt_slot_bytes:
        return (f"{k} codes per channel exceed an input ({accel.inp_slot_bytes} B) or weight "
                f"({accel.wgt_slot_bytes} B) buffer half")
    return None


def pool_stream(name: str, rows: int, k: int, params: Dict[str, object], accel) -> list:
    """The instruction stream of a global average pooling of ``rows`` (``N C``) channels of ``k``
    (``H W``) codes: DRAM tensors ``<name>.x`` ``[rows, k]``, ``<name>.w`` (one row of ``k`` ones),
    ``<name>.mult`` / ``<name>.shift`` (``[1]``) and ``<name>.out`` ``[rows, 1]``."""
    why = pool_fits(rows, k, accel)
    if why is not None:
        raise ValueError(f"average pooling {name!r}: {why}")
    tile = max(1, min(rows, accel.inp_slot_bytes // k, accel.acc_slot_bytes // 4))
    starts = list(range(0, rows, tile))
    clamp = (int(params["qmin"]), int(params["qmax"]))
    stream: list = [Load(buffer="wgt_dsp", tensor=f"{name}.w", region=((0, 1), (0, k)), slot=0, nbytes=k,
                         signal=("load->dsp:data",), layer=name)]
    for i, m0 in enumerate(starts):
        mn, slot = min(tile, rows - m0), i % 2
        more = i + 2 < len(starts)
        stream.append(Load(buffer="inp", tensor=f"{name}.x", region=((m0, mn), (0, k)), slot=slot, nbytes=mn * k,
                           wait=("dsp->load:inp",) if i >= 2 else (), signal=("load->dsp:inp",), layer=name))
        wait = ("load->dsp:inp",) + (("load->dsp:data",) if i == 0 else ()) + (("store->dsp:acc",) if i >= 2 else ())
        # the last GEMMs leave "weight half free" tokens, as a layer's do (codegen.chain_streams)
        signal = (("dsp->load:inp",) if more else ()) + (("dsp->load:wgt",) if i >= len(starts) - 2 else ())
        stream.append(GemmDSP(op="dense", inp_slot=slot, wgt_slot=0, acc_slot=slot, rows=1, pixels=mn, reduction=k,
                              reset=True, bits=8, wait=wait, signal=signal + ("dsp->alu:acc",), layer=name))
        stream.append(Alu(core="dsp", acc_slot=slot, alu_op="mul_shift", elements=mn, operand=f"{name}.mult",
                          shift_operand=f"{name}.shift", row_axis=1, wait=("dsp->alu:acc",),
                          signal=("dsp->store:acc",), layer=name))
        stream.append(Store(core="dsp", slot=slot, tensor=f"{name}.out", region=((m0, mn), (0, 1)), nbytes=mn,
                            clamp=clamp, wait=("dsp->store:acc",), signal=("store->dsp:acc",) if more else (),
                            layer=name))
    return stream


@attrs.define
class PoolProgram(_Program):
    """A global average pooling on the accelerator (its step in ``profile``: ``layer``)."""

    layer: str
    stream: list
    x_ref: object
    out_var: object
    params: Dict[str, object]
    shape: tuple  # the input's [N, C, H, W]
    schemes: List[str] = attrs.field(factory=lambda: ["avgpool"])

    @property
    def rows(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def k(self) -> int:
        return self.shape[2] * self.shape[3]

    def stream_for(self, accel) -> list:
        return pool_stream(self.layer, self.rows, self.k, self.params, accel)

    def dram(self, env) -> Dict[str, object]:
        p = self.params
        ones = np.ones((1, self.k), np.int8)
        return {f"{self.layer}.x": codes_of(env[self.x_ref], p["scale_in"]).reshape(self.rows, self.k),
                f"{self.layer}.w": WeightTensor(stored=ones, levels=ones.astype(np.int64), codes_per_byte=1),
                f"{self.layer}.mult": np.array([p["mult"]], np.int64),
                f"{self.layer}.shift": np.array([p["shift"]], np.int64),
                f"{self.layer}.out": np.zeros((self.rows, 1), np.int8 if int(p["qmin"]) < 0 else np.uint8)}

    def result(self, dram) -> np.ndarray:
        codes = dram[f"{self.layer}.out"].reshape(self.shape[0], self.shape[1], 1, 1)
        return codes.astype(np.float32) * np.float32(self.params["out_scale"])


def pool_program_of(name: str, params, shape, x_ref, out_var, accel) -> PoolProgram:
    """The :class:`PoolProgram` of one pooling call (raises ValueError when it does not fit)."""
    shape = tuple(int(d) for d in shape)
    stream = pool_stream(name, shape[0] * shape[1], shape[2] * shape[3], params, accel)
    return PoolProgram(layer=name, stream=stream, x_ref=x_ref, out_var=out_var, params=dict(params), shape=shape)


#: The value padding a max-pooling's input on chip: below every 8-bit code.
MAXPOOL_PAD = -128


def maxpool_tiles(shape, params, accel, cap: Optional[int] = None) -> Optional[list]:
    """``[(n, c0, cb, r0, rb)]``: the max-pooling's tiles (a batch item, a block of ``cb``
    channels from ``c0``, output rows ``r0 .. r0 + rb``) of at most ``cap`` input codes (default:
    an accumulator part), or None when one output row's window rows do not fit."""
    n, c, h, w = (int(d) for d in shape)
    (kh, kw), (sh, sw), (ph, pw) = (params[k] for k in ("kernel", "stride", "padding"))
    hp, wp = h + 2 * ph, w + 2 * pw
    oh = (hp - kh) // sh + 1
    cap = cap or accel.acc_slot_bytes // 4
    if hp * wp <= cap:
        cb, rb = min(c, cap // (hp * wp)), oh
    else:
        cb, rb = 1, (cap // wp - kh) // sh + 1
        if rb < 1:
            return None
    # blocks of equal size, so that the two cores (which take the tiles in turn) get equal work
    cb, rb = -(-c // -(-c // cb)), -(-oh // -(-oh // rb))
    return [(b, c0, min(cb, c - c0), r0, min(rb, oh - r0)) for b in range(n) for c0 in range(0, c, cb)
            for r0 in range(0, oh, rb)]


def maxpool_stream(name: str, shape, params, accel, cap: Optional[int] = None) -> list:
    """The instruction stream of a max-pooling of codes ``[N, C, H, W]`` (DRAM tensors
    ``<name>.x``, padded by ``MAXPOOL_PAD``, and ``<name>.out``); ``params``: kernel, stride,
    padding (``[h, w]`` each). The input codes load packed, four to a word (one byte each in
    the half), and the ALU takes the rows' max on the packed words, then the columns' (see
    :class:`~tvm_rmsmp.fpga.isa.Alu`); the outputs, one to a word, fill the other half. ``cap``:
    input codes per tile; by default the one of ``full / 2^k`` (``full``: a half's bytes times
    the stride's area / 4, at most a half's bytes, so that the outputs fit; at least
    :data:`MIN_TILE`) the cycle model times fastest. Raises ValueError when a tile does not fit."""
    (kh, kw), (sh, sw), (ph, pw) = (params[k] for k in ("kernel", "stride", "padding"))
    wp = int(shape[3]) + 2 * pw
    ow = (wp - kw) // sw + 1
    if cap is None:
        full = min(accel.acc_slot_bytes, accel.acc_slot_bytes // 4 * sh * sw)
        sim, timed = Simulator(accel), []
        for k in range(4):
            tiles = maxpool_tiles(shape, params, accel, full >> k)
            if k and (full >> k) < MIN_TILE or tiles is None or any(
                    4 * cb * rb * ow > accel.acc_slot_bytes for _, _, cb, _, rb in tiles):
                continue
            timed.append((sim.run(maxpool_stream(name, shape, params, accel, full >> k)).cycles, -(full >> k)))
        cap = -min(timed)[1] if timed else accel.acc_slot_bytes // 4
    tiles = maxpool_tiles(shape, params, accel, cap)
    if tiles is None or any(4 * cb * rb * ow > accel.acc_slot_bytes for _, _, cb, _, rb in tiles):
        raise ValueError(f"max-pooling {name!r}: the window rows of one output row, or its outputs, do not fit an "
                         f"accumulator part")
    stream: list = []
    for i, (b, c0, cb, r0, rb) in enumerate(tiles):
        core = ("dsp", "lut")[i % 2]
        rows_in = sh * (rb - 1) + kh
        more = i + 2 < len(tiles)
        # half 0 (input) is free again once the ALU has read it, half 1 (output) once it is stored
        loaded, done = f"load->{core}:acc", f"{core}->store_{core}:acc"
        in_free, out_free = f"{core}->load:acc", f"store_{core}->{core}:acc"
        stream += [
            Load(buffer=f"acc_{core}", tensor=f"{name}.x", region=((b, 1), (c0, cb), (r0 * sh, rows_in), (0, wp)),
                 slot=0, nbytes=cb * rows_in * wp, wait=(in_free,) if i >= 2 else (), signal=(loaded,), layer=name,
                 packed=True),
            Alu(core=core, acc_slot=1, alu_op="max_window", elements=cb * rb * ow * max(kw - 1, 1),
                row_pass=cb * rb * -(-wp // 4) * 4 * (kh - 1), src_slot=0,
                imm=(kh, kw, sh, sw), wait=(loaded,) + ((out_free,) if i >= 2 else ()),
                signal=(done,) + ((in_free,) if more else ()), layer=name),
            Store(core=core, slot=1, tensor=f"{name}.out", region=((b, 1), (c0, cb), (r0, rb), (0, ow)),
                  nbytes=cb * rb * ow, wait=(done,), signal=(out_free,) if more else (), layer=name),
        ]
    return stream


@attrs.define
class MaxPoolProgram(_Program):
    """A max-pooling of codes on the accelerator (its step in ``profile``: ``layer``)."""

    layer: str
    stream: list
    x_ref: object
    out_var: object
    params: Dict[str, object]
    shape: tuple  # the input's [N, C, H, W]
    out_shape: tuple
    schemes: List[str] = attrs.field(factory=lambda: ["maxpool"])

    def stream_for(self, accel) -> list:
        return maxpool_stream(self.layer, self.shape, self.params, accel)

    def dram(self, env) -> Dict[str, np.ndarray]:
        (ph, pw) = self.params["padding"]
        codes = codes_of(env[self.x_ref], self.params["scale_in"])
        padded = np.pad(codes, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=MAXPOOL_PAD)
        return {f"{self.layer}.x": padded, f"{self.layer}.out": np.zeros(self.out_shape, np.int16)}

    def result(self, dram) -> np.ndarray:
        return dram[f"{self.layer}.out"].astype(np.float32) * np.float32(self.params["scale_in"])


def maxpool_program_of(name: str, params, shape, out_shape, x_ref, out_var, accel) -> MaxPoolProgram:
    """The :class:`MaxPoolProgram` of one max-pooling call (ValueError: it cannot run on the accelerator)."""
    if params.get("scale_in") is None:
        raise ValueError(f"max-pooling {name!r}: its input codes' scale is unknown")
    params = {"kernel": [int(v) for v in params["kernel"]], "stride": [int(v) for v in params["stride"]],
              "padding": [int(v) for v in params["padding"]], "scale_in": float(params["scale_in"])}
    shape = tuple(int(d) for d in shape)
    return MaxPoolProgram(layer=name, stream=maxpool_stream(name, shape, params, accel), x_ref=x_ref, out_var=out_var,
                          params=params, shape=shape, out_shape=tuple(int(d) for d in out_shape))
