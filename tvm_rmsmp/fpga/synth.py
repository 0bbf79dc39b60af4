"""Yosys synthesis of the accelerator's RTL units for Xilinx 7-series (``synth_xilinx -family xc7``).

Each unit is synthesized out of context (``-noiopad``: no IBUF/OBUF on its ports, as inside a
larger design) and flattened, and Yosys's ``stat`` is parsed into LUT, flip-flop, DSP48E1 and
CARRY4 counts. These are Yosys's mapping, before place and route: Vivado's counts differ
(it packs LUTs further and may pack more adders into DSPs); no timing is checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Dict, Mapping

from .rtl_sim import RTL_DIR

__all__ = ["UNITS", "yosys_script", "parse_stat", "synthesize", "yosys_version"]

#: unit name -> (Verilog file, top module, fixed parameters, extra synth_xilinx flags)
UNITS = {
    "sp2_array": ("sp2_pe.v", "sp2_array", {}, ""),
    "lut_mac_array": ("lut_mac.v", "lut_mac_array", {}, " -nodsp"),   # LUT multipliers by design
    "dsp_mac_array_pack2": ("dsp_mac.v", "dsp_mac_array", {"PACK": 2}, ""),
    "dsp_mac_array_pack1": ("dsp_mac.v", "dsp_mac_array", {"PACK": 1}, ""),
    "requant_alu": ("requant_alu.v", "requant_alu", {}, ""),
}

_FF_CELLS = ("FDRE", "FDSE", "FDCE", "FDPE")


def yosys_script(unit: str, params: Mapping[str, int], rtl_dir: str = RTL_DIR) -> str:
    """The Yosys command string (``yosys -p <this>``) for ``unit`` with ``params``."""
    if unit not in UNITS:
        raise ValueError(f"unknown RTL unit {unit!r}; known: {sorted(UNITS)}")
    fname, top, fixed, flags = UNITS[unit]
    allp = {**fixed, **params}
    chparam = " ".join(f"-set {k} {int(v)}" for k, v in allp.items())
    path = os.path.join(rtl_dir, fname)
    return (f"read_verilog {path}; " + (f"chparam {chparam} {top}; " if allp else "")
            + f"synth_xilinx -family xc7 -noiopad -flatten{flags} -top {top}; stat")


def parse_stat(text: str) -> Dict[str, int]:
    """Cell counts from the last ``stat`` report in Yosys output: ``luts`` (LUT1-LUT6), ``ffs``
    (FDRE/FDSE/FDCE/FDPE), ``dsps`` (DSP48E1), ``carry4``, ``muxf`` (MUXF7/MUXF8) and ``cells``."""
    start = text.rfind("Number of cells:")
    if start < 0:
        raise ValueError("no 'Number of cells:' in the Yosys output (did the script end with 'stat'?)")
    block = text[start:]
    total = int(re.match(r"Number of cells:\s+(\d+)", block).group(1))
    counts: Dict[str, int] = {}
    for line in block.splitlines()[1:]:
        m = re.match(r"\s+(\$?[A-Za-z_][\w$]*)\s+(\d+)\s*$", line)
        if not m:
            if line.strip():
                break
            continue
        counts[m.group(1)] = counts.get(m.group(1), 0) + int(m.group(2))
    unmapped = sorted(c for c in counts if c.startswith("$"))
    if unmapped:
        raise ValueError(f"Yosys left generic cells {unmapped}: the design was not mapped to 7-series cells")
    return {
        "luts": sum(n for c, n in counts.items() if re.fullmatch(r"LUT[1-6]", c)),
        "ffs": sum(counts.get(c, 0) for c in _FF_CELLS),
        "dsps": counts.get("DSP48E1", 0),
        "carry4": counts.get("CARRY4", 0),
        "muxf": counts.get("MUXF7", 0) + counts.get("MUXF8", 0),
        "cells": total,
    }


def yosys_version() -> str:
    if shutil.which("yosys") is None:
        raise RuntimeError("yosys is not installed (apt-get install yosys; scripts/_setup.sh does it)")
    return subprocess.run(["yosys", "-V"], capture_output=True, text=True, check=True).stdout.strip()


def synthesize(unit: str, params: Mapping[str, int], timeout: float = 3600) -> Dict[str, object]:
    """Synthesize one unit; returns the counts of :func:`parse_stat` plus ``script`` and ``log_tail``."""
    yosys_version()
    script = yosys_script(unit, params)
    proc = subprocess.run(["yosys", "-q", "-p", script.replace("; stat", "; tee -o /dev/stdout stat")],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"yosys failed on {unit} {dict(params)}:\n{proc.stderr[-3000:]}")
    out = parse_stat(proc.stdout)
    out["script"] = script
    return out
