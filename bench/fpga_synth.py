"""Synthesize the FPGA accelerator's RTL units with Yosys for Xilinx 7-series and record the resources.

Each unit of ``tvm_rmsmp/fpga/rtl/`` (a single PE, i.e. a 1x1 array, and the array sizes the
board files use or scale from) goes through ``yosys -p "read_verilog ...; chparam ...;
synth_xilinx -family xc7 -noiopad -flatten -top ...; stat"`` (out of context: no I/O buffers
on the unit's ports). Rows ``{unit, config, luts, ffs, dsps, carry4, muxf, tool}`` go to
``bench/results/fpga_synth.json``; ``tool`` names the Yosys version and the exact script.
Counts are Yosys's technology mapping, not Vivado's, before place and route; timing is not
checked. Yosys is single-threaded: the full run takes about 10 minutes on one core.

``--update-boards`` then rewrites the resource fields of ``tvm_rmsmp/fpga/boards/*.json`` from
these rows (``--from-json`` reuses a finished run instead of synthesizing again), with the
provenance of every number in the file's ``provenance`` object:

* ``luts_per_sp2_mac``: LUTs of the 28 x 18 SP2 array / its 504 MACs (adder trees and
  accumulators included);
* ``lut_overhead``: the DSP array's fabric LUTs (packing, accumulators) at the board's size
  + the two cores' ALUs at the board's lanes + ``CONTROL_LUTS`` for control, instruction queues
  and DMA (an estimate: those are not in the RTL);
* ``lut_array``: the board's pixel lanes, and as many reduction lanes as fit in
  ``LUT_TARGET`` of the part's LUTs after the overhead (a utilization at which placement
  and routing usually succeed; not tuned to any ratio);
* ``alu_lanes``: lanes of each core's ALU (two ALUs, one beside each core): as many as the
  DSP48E1s left by the DSP array allow for both, up to the plan's value; ``alu_unit``: "own"
  (each ALU is a unit of its own, see the config);
* ``res_buffer_kib``: a quarter of the accumulator buffer (one 8-bit residual code per int32
  accumulator, for the residual adds fused into the convolutions' epilogues);
* ``dram_bytes_per_cycle``, ``dram_bus``: the board's DRAM (see ``DRAM`` below and docs/fpga.md).

Run: python -m bench.fpga_synth [--quick] [--update-boards [--from-json]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

from tvm_rmsmp.fpga.synth import synthesize, yosys_version
from tvm_rmsmp.runtime.fileio import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (unit, parameters): PEs (1x1), the arrays at the sizes the board files use, and smaller
# arrays to see how the cost per MAC scales.
CONFIGS = [
    ("sp2_array", {"PIX": 1, "RED": 1}),
    ("lut_mac_array", {"PIX": 1, "RED": 1}),
    ("dsp_mac_array_pack2", {"PIX": 1, "RED": 1}),
    ("dsp_mac_array_pack1", {"PIX": 1, "RED": 1}),
    ("requant_alu", {"LANES": 1, "MW": 16}),
    ("sp2_array", {"PIX": 7, "RED": 8}),
    ("lut_mac_array", {"PIX": 7, "RED": 8}),
    ("dsp_mac_array_pack2", {"PIX": 14, "RED": 14}),
    ("dsp_mac_array_pack1", {"PIX": 14, "RED": 14}),
    ("requant_alu", {"LANES": 4, "MW": 16}),
    ("sp2_array", {"PIX": 28, "RED": 18}),
    ("lut_mac_array", {"PIX": 28, "RED": 18}),
    ("dsp_mac_array_pack2", {"PIX": 28, "RED": 28}),
    ("dsp_mac_array_pack1", {"PIX": 28, "RED": 28}),
    ("requant_alu", {"LANES": 16, "MW": 16}),
]


LUT_TARGET = 0.70
CONTROL_LUTS = 6000
# Per board: the DSP array, the LUT core's pixel lanes, the ALU lanes wanted, the DRAM.
PLAN = {
    "xc7z020": {"dsp": (14, 14), "lut_pixels": 28, "alu_lanes": 16},
    "xc7z045": {"dsp": (28, 28), "lut_pixels": 56, "alu_lanes": 64},
}
# Bytes per accelerator cycle of the DRAM bus, reads and writes together (``dram_bus="shared"``:
# a DDR3 bus is half-duplex, so a read stream alone gets all of it): the DDR peak times an
# efficiency, capped by the AXI ports one direction can use at the accelerator clock (XC7Z020:
# two 64-bit HP ports; XC7Z045: the MIG controller's 512-bit user interface).
DRAM = {
    "xc7z020": {
        "memory": "PS DDR3 of the PYNQ-Z1 / PYNQ-Z2: 16-bit bus at 1050 MT/s (Digilent PYNQ-Z1 reference "
                  "manual; TUL PYNQ-Z2 specification), reached through the Zynq HP ports (UG585: four 64-bit "
                  "AXI_HP slave ports); the ZedBoard's PS DDR3 is 32-bit at 1066 MT/s, twice this",
        "peak_bytes_per_s": 16 / 8 * 1050e6, "efficiency": 0.75, "clock_mhz": 100.0, "port_bytes_per_cycle": 16},
    "xc7z045": {
        "memory": "PL DDR3 SODIMM of the ZC706: 64-bit at 1600 MT/s through a MIG controller (UG954, ZC706 "
                  "evaluation board user guide); the board's PS DDR3 (32-bit, 1066 MT/s) is not used",
        "peak_bytes_per_s": 64 / 8 * 1600e6, "efficiency": 0.75, "clock_mhz": 200.0, "port_bytes_per_cycle": 64},
}


def dram_bytes_per_cycle(board: str) -> int:
    d = DRAM[board]
    bus = d["peak_bytes_per_s"] * d["efficiency"] / (d["clock_mhz"] * 1e6)
    return int(min(bus, d["port_bytes_per_cycle"]))


def _find(rows, unit, **params):
    for r in rows:
        if r["unit"] == unit and all(r["config"].get(k) == v for k, v in params.items()):
            return r
    raise KeyError(f"no synthesis row for {unit} {params}: run python -m bench.fpga_synth without --quick")


def update_boards(rows, tool: str):
    """Rewrite the resource fields of the board JSON files from the synthesis rows."""
    from tvm_rmsmp.fpga.config import load_board

    sp2 = _find(rows, "sp2_array", PIX=28, RED=18)
    l4 = _find(rows, "lut_mac_array", PIX=28, RED=18)
    per_sp2 = math.ceil(sp2["luts"] / (28 * 18))
    per_l4 = math.ceil(l4["luts"] / (28 * 18))
    for board, plan in PLAN.items():
        path = load_board(board).source
        with open(path) as fh:
            data = json.load(fh)
        b, acc = data["board"], data["accelerator"]
        pix, red = plan["dsp"]
        dsp = _find(rows, "dsp_mac_array_pack2", PIX=pix, RED=red)
        alu1 = _find(rows, "requant_alu", LANES=1)
        lanes = plan["alu_lanes"]
        while lanes > 1 and dsp["dsps"] + 2 * lanes * alu1["dsps"] > b["dsps"]:  # an ALU beside each core
            lanes //= 2
        alu = _find(rows, "requant_alu", LANES=lanes)
        overhead = dsp["luts"] + 2 * alu["luts"] + CONTROL_LUTS
        lut_pix = plan["lut_pixels"]
        lut_red = int((LUT_TARGET * b["luts"] - overhead) // (lut_pix * per_sp2))
        acc.update({"dsp_array": {"pixels": pix, "reduction": red}, "lut_array": {"pixels": lut_pix, "reduction": lut_red},
                    "luts_per_sp2_mac": per_sp2, "lut_overhead": overhead, "alu_lanes": lanes,
                    "dram_bytes_per_cycle": dram_bytes_per_cycle(board), "dram_bus": "shared",
                    "alu_unit": "own", "res_buffer_kib": acc["acc_buffer_kib"] // 4, "acc_slots": 3})
        buffers = acc["inp_buffer_kib"] + 2 * (acc["wgt_buffer_kib"] + acc["acc_buffer_kib"] + acc["res_buffer_kib"])
        total_luts = lut_pix * lut_red * per_sp2 + overhead
        data["provenance"] = {
            "written_by": "python -m bench.fpga_synth --update-boards (rows in bench/results/fpga_synth.json)",
            "tool": tool,
            "luts_per_sp2_mac": f"{sp2['luts']} LUTs of sp2_array 28x18 / 504 MACs, rounded up",
            "luts_per_fixed4_lut_mac": per_l4,
            "luts_per_fixed4_lut_mac_source": f"{l4['luts']} LUTs of lut_mac_array 28x18 (radix-4 Booth, -nodsp) / 504",
            "lut_overhead": {"dsp_array_fabric": dsp["luts"], "alus": 2 * alu["luts"], "control_dma_estimate": CONTROL_LUTS},
            "lut_array": f"{lut_pix} pixel lanes; reduction lanes: the most that keep the design within "
                         f"{LUT_TARGET:.0%} of {b['luts']} LUTs ({total_luts} LUTs, {total_luts / b['luts']:.1%})",
            "dsp48e1": {"dsp_array": dsp["dsps"], "alus": 2 * alu["dsps"], "total": dsp["dsps"] + 2 * alu["dsps"],
                        "part": b["dsps"]},
            "alu_lanes": f"{lanes} per core's ALU (two ALUs): {alu1['dsps']} DSP48E1 per lane (32 x 16-bit multiply), "
                         f"within the DSPs the array leaves",
            "alu_unit": "own: each core's ALU is its own unit (own DSP48s, counted above) with its own queue, on one "
                        "accumulator half (its own BRAM bank) while the array fills the other",
            "acc_slots": "3: the accumulator and residual buffers in three parts, so a core starts a tile while the two "
                         "before it are in its ALU and its store (with two, a tile whose epilogue is long, e.g. a fused "
                         "residual add's four ALU passes, holds up the next GEMM but one); python -m bench.fpga's "
                         "'double-buffered accumulators' row times the same tiles with two",
            "res_buffer_kib": "a quarter of acc_buffer_kib: one 8-bit code of a fused residual add's other operand per "
                              f"int32 accumulator; BRAM: inp + 2 x (wgt + acc + res) = {buffers} KiB of "
                              f"{b['bram36'] * 4} KiB",
            "dram": {**DRAM[board], "bus": "shared: reads and writes one after the other on one bus",
                     "bytes_per_cycle": dram_bytes_per_cycle(board)},
            "clock_mhz": "a design choice; timing closure at this clock is assumed, not checked (no place and route)",
        }
        atomic_write(path, json.dumps(data, indent=2) + "\n")
        load_board(path)   # still valid
        print(f"updated {os.path.relpath(path, ROOT)}: lut_array {lut_pix}x{lut_red}, {per_sp2} LUTs/SP2 MAC, "
              f"overhead {overhead}, alu_lanes {lanes}, DRAM {dram_bytes_per_cycle(board)} B/cycle (shared bus)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the PEs (1x1) and the 7x8 arrays")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fpga_synth.json"))
    ap.add_argument("--units", nargs="+", help="only these units; their rows replace the same rows in --out")
    ap.add_argument("--update-boards", action="store_true", help="rewrite the board JSON resource fields")
    ap.add_argument("--from-json", action="store_true", help="with --update-boards: reuse --out, do not synthesize")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.out) as fh:
            rows = json.load(fh)["rows"]
        update_boards(rows, rows[0]["tool"].split(":")[0])
        return rows
    version = yosys_version()
    configs = CONFIGS[:7] if args.quick else CONFIGS
    rows = []
    if args.units:
        configs = [c for c in configs if c[0] in args.units]
        with open(args.out) as fh:
            rows = [r for r in json.load(fh)["rows"] if r["unit"] not in args.units]
    for unit, params in configs:
        t0 = time.time()
        r = synthesize(unit, params)
        macs = params.get("PIX", 0) * params.get("RED", 0) * (2 if unit == "dsp_mac_array_pack2" else 1)
        row = {"unit": unit, "config": params, "luts": r["luts"], "ffs": r["ffs"], "dsps": r["dsps"],
               "carry4": r["carry4"], "muxf": r["muxf"], "products_per_cycle": macs or None,
               "tool": f"{version}: yosys -p \"{r['script'].replace(ROOT + os.sep, '')}\"",
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{unit:20} {json.dumps(params):28} LUT {r['luts']:>7} FF {r['ffs']:>6} DSP {r['dsps']:>4} "
              f"CARRY4 {r['carry4']:>5}  ({row['seconds']} s)", flush=True)
        result = {"command": "python -m bench.fpga_synth" + (" --quick" if args.quick else "")
                  + (" --units " + " ".join(args.units) if args.units else ""),
                  "host": f"{platform.machine()} {platform.processor() or ''}".strip(),
                  "note": "Yosys technology mapping for xc7 (out of context, flattened); no place and route, "
                          "no timing. LUTs = LUT1..LUT6; FFs = FDRE/FDSE/FDCE/FDPE.",
                  "rows": rows}
        atomic_write(args.out, json.dumps(result, indent=1))   # partial results survive an interrupt
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    if args.update_boards:
        update_boards(rows, version)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
