"""Synthesize the FPGA accelerator's RTL units with Yosys for Xilinx 7-series and record the resources.

Each unit of ``tvm_rmsmp/fpga/rtl/`` (a single PE, i.e. a 1x1 array, and the array sizes the
board files use or scale from) goes through ``yosys -p "read_verilog ...; chparam ...;
synth_xilinx -family xc7 -noiopad -flatten -top ...; stat"`` (out of context: no I/O buffers
on the unit's ports). Rows ``{unit, config, luts, ffs, dsps, carry4, muxf, tool}`` go to
``bench/results/fpga_synth.json``; ``tool`` names the Yosys version and the exact script.
Counts are Yosys's technology mapping, not Vivado's, before place and route; timing is not
checked. Yosys is single-threaded: the full run takes about 10 minutes on one core.

Run: python -m bench.fpga_synth [--quick]
"""

from __future__ import annotations

import argparse
import json
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
    ("requant_alu", {"LANES": 8, "MW": 16}),
    ("sp2_array", {"PIX": 28, "RED": 18}),
    ("lut_mac_array", {"PIX": 28, "RED": 18}),
    ("dsp_mac_array_pack2", {"PIX": 28, "RED": 28}),
    ("dsp_mac_array_pack1", {"PIX": 28, "RED": 28}),
    ("requant_alu", {"LANES": 32, "MW": 16}),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the PEs (1x1) and the 7x8 arrays")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fpga_synth.json"))
    args = ap.parse_args(argv)
    version = yosys_version()
    configs = CONFIGS[:7] if args.quick else CONFIGS
    rows = []
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
        result = {"command": "python -m bench.fpga_synth" + (" --quick" if args.quick else ""),
                  "host": f"{platform.machine()} {platform.processor() or ''}".strip(),
                  "note": "Yosys technology mapping for xc7 (out of context, flattened); no place and route, "
                          "no timing. LUTs = LUT1..LUT6; FFs = FDRE/FDSE/FDCE/FDPE.",
                  "rows": rows}
        atomic_write(args.out, json.dumps(result, indent=1))   # partial results survive an interrupt
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
