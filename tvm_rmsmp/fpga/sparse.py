"""Pruned row groups on the accelerator: weights stored as kept blocks only, GEMMs issuing only
the kept columns.

A row group whose weights are mostly zero (a pruned layer: ``rmsmp.prune`` then
``rmsmp.quantize``; its zeros survive quantization) is stored per weight tile (the rows x
reduction columns one weight LOAD moves, as ``schedules/fpga.py`` tiles the layer) as
*runs*: consecutive rows that share one kept-column mask, each stored as

* a header: 2 bytes (the run's row count) and a bit mask of the tile's reduction columns
  (``ceil(columns / 8)`` bytes), and
* the kept columns' codes of each row of the run (``bits`` per code, as the dense tile).

A block-punched layer (``block=(rows, channels)``: the same kernel positions removed from a
block of filters x channels) gives one run per block of filters (of the row group's rows), its
mask the kept (channel, kernel position) columns. Runs are formed greedily from the tile's
rows in order: a row joins the current run when at most :data:`JOIN_NEW` of its non-zero
columns are outside the run's mask (quantization adds zeros inside the kept blocks, so rows of
one pruning block differ a little), else it starts a new run; the mask is the union.

The GEMM array walks a tile row by row (``rows x ceil(pixels / P) x ceil(reduction / R)``
passes, :meth:`Simulator.duration`); on a sparse tile each run's rows take
``ceil(kept / R)`` reduction passes instead of ``ceil(columns / R)``: the array's ``R``
reduction lanes read the input buffer at the (channel, ky, kx) addresses of the mask's kept
columns (the dense design already generates one im2col address per lane; here they come
from the mask) and the kept codes in order. Weight LOADs move the stored runs (headers and
kept codes) only. A row group stays dense when its stored runs would keep more than
:data:`MAX_DENSITY` of the dense tile's codes (an unpruned layer's quantization zeros never
make it sparse).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import attrs
import numpy as np

from .isa import GemmDSP, GemmLUT, Load, SparseGemmDSP, SparseGemmLUT
from .simulator import WeightTensor

__all__ = ["SparseTile", "SparseWeightTensor", "compress_tile", "sparsify_stream", "MAX_DENSITY", "JOIN_NEW",
           "RUN_HEADER_BYTES"]

#: A row group is stored sparse when its runs keep at most this share of the dense codes.
MAX_DENSITY = 0.6
#: A row joins the current run when at most this share of its non-zero columns are new to it.
JOIN_NEW = 0.25
#: Bytes of a run's header besides its column mask (the run's row count).
RUN_HEADER_BYTES = 2


@attrs.define
class SparseTile:
    """One weight tile as stored: ``runs`` of ``(first row, mask [columns] bool, codes [rows, kept])``."""

    rows: int
    columns: int
    bits: int
    runs: List[Tuple[int, np.ndarray, np.ndarray]]

    @property
    def shape(self) -> Tuple[int, int]:
        return self.rows, self.columns

    @property
    def nbytes(self) -> int:
        """Bytes a weight LOAD moves: every run's header and mask, then its kept codes."""
        mask_bytes = (self.columns + 7) // 8
        return sum(RUN_HEADER_BYTES + mask_bytes + (v.size * self.bits + 7) // 8 for _, _, v in self.runs)

    @property
    def kept(self) -> int:
        """Codes stored (rows x kept columns over the runs)."""
        return sum(v.size for _, _, v in self.runs)

    def run_shapes(self) -> Tuple[Tuple[int, int], ...]:
        return tuple((int(v.shape[0]), int(m.sum())) for _, m, v in self.runs)

    def product(self, a: np.ndarray) -> np.ndarray:
        """``a [P, columns] @ W.T`` over the kept columns only: ``[P, rows]`` (float64, exact)."""
        out = np.zeros((a.shape[0], self.rows), np.float64)
        for r0, mask, vals in self.runs:
            if vals.size:
                out[:, r0:r0 + vals.shape[0]] = a[:, mask] @ vals.T
        return out

    def dense(self) -> np.ndarray:
        """The tile's levels ``[rows, columns]`` decoded from the runs."""
        w = np.zeros((self.rows, self.columns), np.float64)
        for r0, mask, vals in self.runs:
            w[r0:r0 + vals.shape[0], mask] = vals
        return w


def compress_tile(levels: np.ndarray, bits: int) -> SparseTile:
    """The runs of a weight tile ``levels [rows, columns]`` (module docstring)."""
    rows, cols = levels.shape
    nz = levels != 0
    starts: List[Tuple[int, np.ndarray]] = []  # (first row, mask)
    for r in range(rows):
        new = nz[r] & ~starts[-1][1] if starts else nz[r]
        count = int(nz[r].sum())
        if starts and int(new.sum()) <= JOIN_NEW * count:
            starts[-1] = (starts[-1][0], starts[-1][1] | nz[r])
        else:
            starts.append((r, nz[r].copy()))
    runs = []
    for i, (r0, mask) in enumerate(starts):
        r1 = starts[i + 1][0] if i + 1 < len(starts) else rows
        runs.append((r0, mask, np.ascontiguousarray(levels[r0:r1][:, mask])))
    return SparseTile(rows=rows, columns=cols, bits=bits, runs=runs)


@attrs.define
class SparseWeightTensor(WeightTensor):
    """A pruned row group's weights in DRAM: the dense tensor's description plus each weight
    tile's stored runs (``tiles``, keyed by the LOAD's region); a LOAD of a region moves and
    returns its :class:`SparseTile`."""

    tiles: Dict[tuple, SparseTile] = attrs.field(factory=dict)

    def tile(self, region):
        key = tuple(tuple(d) for d in region)
        if key not in self.tiles:
            raise ValueError(f"sparse weight tensor: no stored tile for the region {region}")
        return self.tiles[key]


def sparsify_stream(stream: Sequence, constants: Dict[str, object], bits_of: Dict[str, int],
                    max_density: float = MAX_DENSITY) -> Tuple[list, Dict[str, dict]]:
    """The stream with every mostly-zero row group's weight tiles stored as runs: its weight
    LOADs move the runs' bytes and its GEMMs issue only their kept columns (the stream's
    order and tokens are unchanged). ``constants`` maps DRAM names to :class:`WeightTensor`
    (replaced in place by :class:`SparseWeightTensor` for the sparse row groups); ``bits_of``
    gives each weight tensor's code width. Returns ``(stream, {weight name: stats})``."""
    regions: Dict[str, List[tuple]] = {}
    for ins in stream:
        if isinstance(ins, Load) and ins.buffer.startswith("wgt_") and isinstance(constants.get(ins.tensor), WeightTensor):
            regions.setdefault(ins.tensor, [])
            if ins.region not in regions[ins.tensor]:
                regions[ins.tensor].append(ins.region)
    stats: Dict[str, dict] = {}
    for name, regs in regions.items():
        wt = constants[name]
        if isinstance(wt, SparseWeightTensor):  # already stored as runs (a stream made again)
            tiles = wt.tiles
        else:
            tiles = {r: compress_tile(np.asarray(wt.tile(r)), bits_of[name]) for r in regs}
        dense = sum(t.rows * t.columns for t in tiles.values())
        kept = sum(t.kept for t in tiles.values())
        if not isinstance(wt, SparseWeightTensor):
            if not dense or kept > max_density * dense:
                continue
            constants[name] = SparseWeightTensor(stored=wt.stored, levels=wt.levels, codes_per_byte=wt.codes_per_byte,
                                                 tiles=tiles)
        stats[name] = {"density": round(kept / dense, 4), "tiles": len(tiles),
                       "runs": sum(len(t.runs) for t in tiles.values()),
                       "stored_bytes": sum(t.nbytes for t in tiles.values()),
                       "dense_bytes": sum(t.rows * ((t.columns * t.bits + 7) // 8) for t in tiles.values())}
    if not stats:
        return list(stream), stats
    out, loaded = [], {}  # core -> the weight tile its next GEMM multiplies
    for ins in stream:
        if isinstance(ins, Load) and ins.buffer.startswith("wgt_"):
            core = ins.buffer[4:]
            wt = constants.get(ins.tensor)
            if isinstance(wt, SparseWeightTensor):
                tile = wt.tiles[tuple(ins.region)]
                loaded[core] = tile
                ins = attrs.evolve(ins, nbytes=tile.nbytes)
            else:
                loaded[core] = None
        elif isinstance(ins, (GemmDSP, GemmLUT)):
            tile: Optional[SparseTile] = loaded.get(ins.core)
            if tile is not None:
                cls = SparseGemmDSP if ins.core == "dsp" else SparseGemmLUT
                fields = {a.name: getattr(ins, a.name) for a in attrs.fields(type(ins)) if a.init}
                ins = cls(**fields, runs=tile.run_shapes())
        out.append(ins)
    return out, stats
