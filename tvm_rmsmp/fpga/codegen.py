"""Instruction generation: from the scheduled row-group PrimFuncs of a layer to one stream.

1. :func:`tile_events` interprets the tile-level loop nest of a PrimFunc scheduled by
   ``schedules/fpga.py``: it runs the loops outside the blocks tagged ``fpga.intrin`` and, for
   each tagged block instance, evaluates the block's read and write regions (affine in the
   loop variables, taken from the TIR) into a *tile event*: a GEMM tile (input, weight and
   accumulator regions, whether it starts the accumulation) or an epilogue tile
   (accumulator, bias and output regions).
2. :func:`layer_stream` turns the events of all row groups of a layer into one instruction
   stream for the two cores: an input tile is loaded once into the shared input buffer and
   used by every row group (each core waits for its ``load-><core>:inp`` token); the tiles of the LUT core (SP2 rows) and of the DSP core
   (fixed rows) are interleaved so both run at once; weights and accumulators alternate
   between buffer halves; dependency tokens order every buffer reuse (see :mod:`.isa`).
   Every token an instruction waits for is pushed by an instruction earlier in the stream,
   so executing the stream in order is always possible (no deadlock by construction).

   With ``residual`` (the integer-only mode, :class:`Residual`) a residual add is fused into the
   layer's epilogue: each output tile also loads the add's other operand (8-bit codes, the
   tile's channels and pixels) into the core's residual buffer while its GEMMs run, and its ALU
   requantizes the accumulators to the layer's codes (``mul_shift``, then ``clamp`` to the
   layer's code range), adds the residual (``madd_shift`` from the residual buffer) and the
   store clamps to the add's codes: the layer's output never goes to DRAM and back.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import attrs
import numpy as np
from tvm import tirx
from tvm.sym import Analyzer

from .isa import Alu, GemmDSP, GemmLUT, Load, Store, region_size
from relay_passes import contract

__all__ = ["TileEvent", "tile_events", "RowGroup", "Residual", "layer_stream", "chain_streams"]

INTRIN = "fpga.intrin"


@attrs.define
class TileEvent:
    intrin: str
    reads: Dict[str, tuple]    # buffer name -> ((start, extent), ...)
    writes: Dict[str, tuple]
    first: bool               # the reduction iterators are at their first tile


def _buffer_name(region) -> str:
    src = getattr(region, "source", None)
    if src is None:
        src = region.buffer
    return str(getattr(src, "name", None) or getattr(src, "name_hint", None) or src)


class _Template:
    """A tagged block under its loops; every region bound and reduction index is compiled to
    an affine form ``c0 + sum(c_i * loop_i)`` of the enclosing loop variables, by evaluating
    the TIR expressions (TVM's arithmetic analyzer) at zero, at each unit vector, and at one
    more point that checks the form."""

    def __init__(self, block, iter_values, loop_vars, extents):
        self.intrin = str(block.annotations[INTRIN])
        exprs = []
        layout = {"reads": [], "writes": []}
        for kind, regions in (("reads", block.reads), ("writes", block.writes)):
            for r in regions:
                dims = []
                for rng in r.region:
                    dims.append((len(exprs), len(exprs) + 1))
                    exprs += [rng.min, rng.extent]
                layout[kind].append((_buffer_name(r), dims))
        reduce_idx = []
        for iv in block.iter_vars:
            if int(iv.iter_type) == 2:  # CommReduce
                reduce_idx.append((len(exprs), int(iv.dom.min)))
                exprs.append(iv.var)
        self.layout, self.reduce_idx = layout, reduce_idx

        def at(point):
            analyzer = Analyzer()
            for var, value in zip(loop_vars, point):
                analyzer.bind(var, tirx.const(value, str(var.ty.dtype)))
            for iv, value in zip(block.iter_vars, iter_values):
                analyzer.bind(iv.var, value)
            out = []
            for e in exprs:
                v = analyzer.simplify(e)
                if not isinstance(v, tirx.IntImm):
                    raise ValueError(f"tile region {e} of {self.intrin} is not a constant once the loops are fixed")
                out.append(int(v.value))
            return np.array(out, dtype=np.int64)

        n = len(loop_vars)
        base = at([0] * n)
        coef = np.stack([at([1 if j == i else 0 for j in range(n)]) - base for i in range(n)], axis=1) if n else \
            np.zeros((len(exprs), 0), np.int64)
        probe = [e - 1 for e in extents]
        if n and not np.array_equal(at(probe), base + coef @ np.array(probe, dtype=np.int64)):
            bad = [str(exprs[i]) for i in np.nonzero(at(probe) != base + coef @ np.array(probe))[0]]
            raise ValueError(f"the regions of {self.intrin} are not affine in the tile loops: {bad}")
        self.base, self.coef = base, coef

    def event(self, values) -> TileEvent:
        v = self.base + self.coef @ np.asarray(values, dtype=np.int64) if len(values) else self.base

        def regions(kind):
            return {name: tuple((int(v[a]), int(v[b])) for a, b in dims) for name, dims in self.layout[kind]}

        first = all(int(v[i]) == lo for i, lo in self.reduce_idx)
        return TileEvent(self.intrin, regions("reads"), regions("writes"), first)


def tile_events(func: tirx.PrimFunc) -> List[TileEvent]:
    """The tile events of a scheduled row-group PrimFunc, in program order (see module docstring)."""
    events: List[TileEvent] = []
    templates: Dict[int, _Template] = {}

    def run(stmt, loop_vars, values, extents=()):
        kind = type(stmt).__name__
        if kind == "SeqStmt":
            for s in stmt.seq:
                run(s, loop_vars, values, extents)
        elif kind == "For":
            lo, ext = int(stmt.min), int(stmt.extent)
            for v in range(lo, lo + ext):
                run(stmt.body, loop_vars + [stmt.loop_var], values + [v], tuple(extents) + (ext,))
        elif kind == "SBlockRealize":
            block = stmt.block
            if INTRIN in block.annotations:
                key = id(stmt)
                if key not in templates:
                    templates[key] = (_Template(block, stmt.iter_values, loop_vars, extents), stmt)
                events.append(templates[key][0].event(values))
            else:
                if block.init is not None:
                    run(block.init, loop_vars, values, extents)
                run(block.body, loop_vars, values, extents)
        elif kind in ("SBlock",):
            run(stmt.body, loop_vars, values, extents)
        elif hasattr(stmt, "body"):  # LetStmt, AttrStmt, allocations, DeclBuffer
            run(stmt.body, loop_vars, values, extents)
        else:
            raise NotImplementedError(f"instruction generation: unexpected {kind} outside the tagged tiles")

    run(func.body, [], [])
    return events


@attrs.define
class RowGroup:
    """One row group of a layer as the accelerator sees it: DRAM tensor names and its events."""

    scheme: str
    core: str               # "lut" | "dsp"
    bits: int               # 4 (packed codes) or 8
    op: str                 # "conv2d" | "dense"
    weight: str             # DRAM names
    bias: str
    output: str
    events: List[TileEvent]
    kernel: tuple = (1, 1)
    stride: tuple = (1, 1)
    #: the fixed-point epilogue (contract.REQUANT): {"mult", "shift": DRAM names, "qmin", "qmax"}
    requant: Optional[dict] = None


@attrs.define
class Residual:
    """A residual add fused into a layer's epilogue: ``out = clamp((q * m_layer + r * m_res +
    2^(S-1)) >> S, *clamp)`` with ``q`` the layer's codes and ``r`` the add's other operand,
    the DRAM tensor ``tensor`` ``[N, C, H, W]`` in the layer's channel order (its row groups
    concatenated); ``offsets[g]``: row group ``g``'s first channel in it."""

    tensor: str
    imm: Tuple[int, int, int]  # (m_layer, m_res, S)
    clamp: Tuple[int, int]
    offsets: List[int]


def _tiles(events: List[TileEvent]):
    """Group events into output tiles: ([gemm events], epilogue event), with their band key."""
    tiles, gemms = [], []
    for ev in events:
        if ev.intrin.startswith("gemm_"):
            gemms.append(ev)
        elif ev.intrin == "alu_store":
            if not gemms:
                raise ValueError("an epilogue tile without GEMM tiles before it")
            acc = ev.reads[contract.ACC_BLOCK]
            band = tuple(d for i, d in enumerate(acc) if i != 1)
            tiles.append((band, gemms, ev))
            gemms = []
        else:
            raise ValueError(f"unknown fpga.intrin {ev.intrin!r}")
    if gemms:
        raise ValueError("GEMM tiles without an epilogue after them")
    return tiles


def _estimate(g: RowGroup, gemms, accel) -> float:
    arr = accel.dsp_array if g.core == "dsp" else accel.lut_array
    rate = arr.units * (accel.dsp_products_4bit if g.core == "dsp" and g.bits <= 4 else 1)
    return sum(region_size(ev.writes[contract.ACC_BLOCK]) * _reduction(g, ev) for ev in gemms) / rate


def _reduction(g: RowGroup, ev: TileEvent) -> int:
    x = ev.reads["x"]
    if g.op == "conv2d":
        return x[1][1] * g.kernel[0] * g.kernel[1]
    return x[1][1]


def layer_stream(layer: str, x_name: str, groups: Sequence[RowGroup], accel, residual: Optional[Residual] = None) -> list:
    """One instruction stream computing every row group of ``layer`` (see module docstring);
    ``residual``: the residual add fused into its epilogue (conv2d row groups in the integer
    mode, an accelerator with residual buffers)."""
    if residual is not None:
        bad = [g.scheme for g in groups if g.op != "conv2d" or g.requant is None]
        if bad or accel.res_buffer_kib == 0:
            raise ValueError(f"layer {layer!r}: a fused residual add needs conv2d row groups with the fixed-point "
                             f"epilogue and residual buffers (res_buffer_kib > 0); not so for {bad or 'the buffers'}")
    per_group = [_tiles(g.events) for g in groups]
    bands: List[tuple] = []
    for tiles in per_group:
        for band, _, _ in tiles:
            if band not in bands:
                bands.append(band)
    order = []  # (group index, gemms, epilogue) in issue order
    for band in bands:
        queues = {"lut": [], "dsp": []}
        for gi, tiles in enumerate(per_group):
            for b, gemms, epi in tiles:
                if b == band:
                    queues[groups[gi].core].append((gi, gemms, epi))
        load = {"lut": 0.0, "dsp": 0.0}
        while queues["lut"] or queues["dsp"]:
            core = min((c for c in queues if queues[c]), key=lambda c: load[c])
            gi, gemms, epi = queues[core].pop(0)
            load[core] += _estimate(groups[gi], gemms, accel)
            order.append((gi, gemms, epi))

    # input loads: a new one whenever a GEMM needs an input region other than the resident one
    plan = []  # per gemm: (gi, ev, inp load index)
    inp_regions: List[tuple] = []
    resident = None
    for gi, gemms, epi in order:
        for ev in gemms:
            region = ev.reads["x"]
            if region != resident:
                inp_regions.append(region)
                resident = region
            plan.append((gi, ev, len(inp_regions) - 1))
    last_reader = {}  # (inp load, core) -> index into plan
    first_reader = {}
    for p, (gi, ev, j) in enumerate(plan):
        last_reader[(j, groups[gi].core)] = p
        first_reader.setdefault((j, groups[gi].core), p)
    readers_of = {}
    for (j, core) in last_reader:
        readers_of.setdefault(j, []).append(core)

    stream = []
    n_wgt = {"lut": 0, "dsp": 0}
    n_acc = {"lut": 0, "dsp": 0}
    issued_inp = -1
    p = 0
    for gi, gemms, epi in order:
        g = groups[gi]
        core = g.core
        acc_slot = n_acc[core] % accel.acc_slots
        gemm_cls = GemmLUT if core == "lut" else GemmDSP
        for k, ev in enumerate(gemms):
            _, _, j = plan[p]
            if j != issued_inp:
                wait = tuple(f"{c}->load:inp" for c in readers_of.get(j - 2, ())) if j >= 2 else ()
                region = inp_regions[j]
                stream.append(Load(buffer="inp", tensor=x_name, region=region, slot=j % 2,
                                   nbytes=region_size(region), wait=wait, layer=layer,
                                   signal=tuple(f"load->{c}:inp" for c in readers_of[j])))
                issued_inp = j
            wregion = ev.reads["w"]
            wait = (f"{core}->load:wgt",) if n_wgt[core] >= 2 else ()
            stream.append(Load(buffer=f"wgt_{core}", tensor=g.weight, region=wregion, slot=n_wgt[core] % 2,
                               nbytes=region_size(wregion), wait=wait, signal=(f"load->{core}:data",), layer=layer))
            acc = ev.writes[contract.ACC_BLOCK]
            rows = acc[1][1]
            if g.op == "conv2d":
                out_hw = (acc[2][1], acc[3][1])
                pixels = out_hw[0] * out_hw[1] * acc[0][1]
            else:
                out_hw = (1, 1)
                pixels = acc[0][1]
            gwait = (f"load->{core}:data",)
            if first_reader[(j, core)] == p:
                gwait += (f"load->{core}:inp",)
            if k == 0 and n_acc[core] >= accel.acc_slots:
                gwait += (f"store->{core}:acc",)
            signal = (f"{core}->load:wgt",)
            if last_reader.get((j, core)) == p:
                signal += (f"{core}->load:inp",)
            if k == len(gemms) - 1:  # the tile's accumulators are done: its ALU ops (or its store) may start
                signal += (f"{core}->alu:acc",) if g.requant else (f"{core}->store:acc",)
            stream.append(gemm_cls(op=g.op, inp_slot=j % 2, wgt_slot=n_wgt[core] % 2, acc_slot=acc_slot, rows=rows,
                                   pixels=pixels, reduction=_reduction(g, ev), reset=(k == 0), bits=g.bits,
                                   kernel=g.kernel, stride=g.stride, out_hw=out_hw, wait=gwait, signal=signal,
                                   layer=layer, bias=g.bias if k == 0 else None,
                                   row0=epi.reads["bias"][0][0] if k == 0 else 0))
            if k == 0 and not ev.first:
                raise ValueError(f"layer {layer!r}: a GEMM tile starts an accumulation mid-reduction")
            if k == 0 and residual is not None:  # the residual codes load (on the core's DMA queue) during the GEMMs
                stream.append(_res_load(layer, gi, epi, residual, core, n_acc[core], accel.acc_slots))
            n_wgt[core] += 1
            p += 1
        out_region = epi.writes[contract.OUT_BLOCK]
        row0 = epi.reads["bias"][0][0]
        elements, row_axis = region_size(out_region), 0 if g.op == "conv2d" else 1
        done = (f"{core}->store:acc",)
        clamp = (g.requant["qmin"], g.requant["qmax"]) if g.requant else None
        if g.requant:  # the fixed-point epilogue: rounding shift on chip, 8-bit codes out (the bias is in already)
            stream.append(Alu(core=core, acc_slot=acc_slot, alu_op="mul_shift", elements=elements,
                              operand=g.requant["mult"], shift_operand=g.requant["shift"], row0=row0,
                              row_axis=row_axis, wait=(f"{core}->alu:acc",), signal=() if residual else done,
                              layer=layer))
        if residual is not None:  # the layer's codes (clamped) plus the residual's, rounded once
            stream.append(Alu(core=core, acc_slot=acc_slot, alu_op="clamp", elements=elements, imm=clamp, layer=layer))
            stream.append(Alu(core=core, acc_slot=acc_slot, alu_op="madd_shift", elements=elements,
                              src_buffer="res", src_slot=acc_slot, imm=residual.imm, wait=(f"load->{core}:res",),
                              signal=done, layer=layer))
            clamp = tuple(residual.clamp)
        out_bytes = 1 if g.requant else accel.store_bytes_per_output
        # with a residual, the store (after the madd_shift that read the residual part) frees that part
        # for the next residual load: so the store, which the next GEMM waits for, goes on the bus first
        stream.append(Store(core=core, slot=acc_slot, tensor=g.output, region=out_region,
                            nbytes=out_bytes * elements, wait=done, layer=layer, clamp=clamp,
                            signal=(f"store->{core}:acc",) + ((f"{core}->load:res",) if residual else ())))
        n_acc[core] += 1
    return stream


def _res_load(layer: str, gi: int, epi: TileEvent, residual: Residual, core: str, n: int, slots: int) -> Load:
    """The LOAD of an output tile's residual codes (its channels shifted to the row group's place)."""
    (b, nb), (r0, nr), *pix = epi.writes[contract.OUT_BLOCK]
    region = ((b, nb), (residual.offsets[gi] + r0, nr), *pix)
    return Load(buffer=f"res_{core}", tensor=residual.tensor, region=region, slot=n % slots, nbytes=region_size(region),
                wait=(f"{core}->load:res",) if n >= slots else (), signal=(f"load->{core}:res",), layer=layer)


def weight_levels(stored: np.ndarray, scheme_name: str, packed: bool) -> np.ndarray:
    """Integer levels ``[rows, R]`` of a row group's stored weights (packed nibbles or int8 codes)."""
    from relay_passes.contract import stored_to_int
    from tvm_rmsmp.quant.schemes import get_scheme, nibble_decode

    if packed:
        flat = stored.reshape(stored.shape[0], -1).astype(np.uint8)
        codes = np.empty((flat.shape[0], flat.shape[1] * 2), np.uint8)
        codes[:, 0::2] = flat & 15
        codes[:, 1::2] = flat >> 4
        return nibble_decode(codes, get_scheme(scheme_name)).astype(np.float64)
    return stored_to_int(stored, scheme_name).reshape(stored.shape[0], -1).astype(np.float64)


def chain_streams(streams: Sequence[list]) -> list:
    """The layers' streams as one program with **weight prefetch across layers**: a layer's
    weight loads start as soon as the previous layer's last GEMMs on that core free the weight
    buffer halves, while its input loads wait until every store of the previous layer is done
    (the input is an earlier layer's output; host ops between layers take no time here, as in
    the per-layer model). Each layer's tokens are renamed ``<channel>@<layer index>`` so that
    no token crosses a layer except these:

    * ``layer@<i>:<store queue>``: pushed by layer ``i``'s last STORE on each store queue,
      popped by layer ``i + 1``'s first input LOAD (or accumulator LOAD, for an element-wise
      program of :mod:`.eltwise`; a barrier: all of layer ``i``'s GEMMs, ALU ops and stores are
      done, so its input and accumulator parts are free); that load pushes
      ``barrier@<i + 1>->res_<core>`` for the first residual load on each core's queue;
    * ``<core>->load:wgt@<k>``: the (at most two) tokens that layer ``k``'s last GEMMs on a
      core push and no load of layer ``k`` pops; the next layer with weight loads on that core
      pops them all at its first one (``k`` is the last layer that used the core).

    Every token is pushed earlier in the program than it is popped, so the chained program
    cannot deadlock either; the simulator still checks every buffer access."""
    out: list = []
    pending_wgt: Dict[str, tuple] = {}  # core -> (layer index, tokens left) of the last layer using it
    barrier: tuple = ()
    for i, stream in enumerate(streams):
        layer = [attrs.evolve(ins, wait=tuple(f"{w}@{i}" for w in ins.wait),
                              signal=tuple(f"{s}@{i}" for s in ins.signal)) for ins in stream]
        first_inp, first_wgt, first_res, last_store, gemms = None, {}, {}, {}, {}
        for k, ins in enumerate(layer):
            if isinstance(ins, Load) and ins.queue == "load" and first_inp is None:
                first_inp = k  # the first activation load (input, or an element-wise program's codes)
            elif isinstance(ins, Load) and ins.buffer.startswith("wgt_"):
                first_wgt.setdefault(ins.buffer[4:], k)
            elif isinstance(ins, Load) and ins.buffer.startswith("res_"):
                first_res.setdefault(ins.buffer[4:], k)
            elif isinstance(ins, Store):
                last_store[ins.queue] = k
            elif isinstance(ins, (GemmDSP, GemmLUT)):
                gemms[ins.core] = gemms.get(ins.core, 0) + 1
        if first_inp is not None and barrier:
            # residual loads read DRAM too: they start after the first input load, itself after the barrier
            after = tuple(f"barrier@{i}->res_{c}" for c in first_res)
            layer[first_inp] = attrs.evolve(layer[first_inp], wait=layer[first_inp].wait + barrier,
                                            signal=layer[first_inp].signal + after)
            for c, k in first_res.items():
                layer[k] = attrs.evolve(layer[k], wait=layer[k].wait + (f"barrier@{i}->res_{c}",))
        for core, k in first_wgt.items():
            if core in pending_wgt:
                j, n = pending_wgt.pop(core)
                layer[k] = attrs.evolve(layer[k], wait=layer[k].wait + (f"{core}->load:wgt@{j}",) * n)
        for q, k in last_store.items():
            layer[k] = attrs.evolve(layer[k], signal=layer[k].signal + (f"layer@{i}:{q}",))
        barrier = tuple(f"layer@{i}:{q}" for q in last_store)
        for core, n in gemms.items():
            pending_wgt[core] = (i, min(n, 2))
        out.extend(layer)
    return out
