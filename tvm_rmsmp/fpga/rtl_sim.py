"""Verilator simulation of the accelerator's RTL (``tvm_rmsmp/fpga/rtl/*.v``), driven from Python.

The RTL holds the compute units of the two cores and the ALU: the SP2-4 shift-add array
(``sp2_pe.v``), the DSP multiply-accumulate array with two 4-bit products per DSP48E1 or one
(``dsp_mac.v``), the Fixed-4 LUT multiplier array of the ``fixed4_lut_dsp`` baseline (``lut_mac.v``) and the requantization ALU (``requant_alu.v``). ``rtl_tb.v`` instantiates one of
each at small sizes and ``rtl_tb.cpp`` clocks them from commands on stdin (one cycle per line).

:class:`RTLSim` sequences a GEMM tile through an array the way the core's controller does
(one weight row per cycle, blocks of pixels and reduction lanes, the accumulators cleared by
the first reduction block) from the tile's activations and the weight *codes* as stored in
DRAM (4-bit nibbles or int8 bytes, decoded by the RTL itself), so its result can be compared
with :class:`tvm_rmsmp.fpga.simulator.Simulator`'s, which multiplies decoded levels.

The Verilator build is cached under ``~/.cache/tvm-rmsmp/rtl/<hash of sources and tool>``
(``$TVM_RMSMP_CACHE`` overrides the root), built under a file lock so that concurrent test
processes build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["RTL_DIR", "RTL_SOURCES", "tools_missing", "build", "RTLSim", "ALU_OPCODES"]

RTL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rtl")
#: The synthesizable units (the testbench files are ``rtl_tb.v`` / ``rtl_tb.cpp``).
RTL_SOURCES = ("sp2_pe.v", "lut_mac.v", "dsp_mac.v", "requant_alu.v")
_TB = ("rtl_tb.v", "rtl_tb.cpp")
#: ``requant_alu`` opcodes, by the ALU op names of :mod:`tvm_rmsmp.fpga.isa`.
ALU_OPCODES = {"add_bias": 0, "mul_shift": 1, "shift": 2, "relu": 3, "madd_shift": 4, "max": 5, "max4": 6, "min": 7}
_VERILATOR_FLAGS = ["-Wno-fatal", "-Wno-WIDTH"]


def tools_missing(*tools: str) -> Optional[str]:
    """A reason string when one of ``tools`` (default: verilator and a C++ compiler) is missing."""
    tools = tools or ("verilator", "make", "g++")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install yosys verilator; scripts/_setup.sh does it)"
    return None


def _cache_root() -> str:
    root = os.environ.get("TVM_RMSMP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tvm-rmsmp")
    return os.path.join(root, "rtl")


def _source_key() -> str:
    h = hashlib.sha256()
    for name in RTL_SOURCES + _TB:
        with open(os.path.join(RTL_DIR, name), "rb") as fh:
            h.update(name.encode() + b"\0" + fh.read())
    version = subprocess.run(["verilator", "--version"], capture_output=True, text=True, check=True).stdout
    h.update(version.encode() + " ".join(_VERILATOR_FLAGS).encode())
    return h.hexdigest()[:16]


def build() -> str:
    """Path of the Verilator executable of ``rtl_tb`` (built once per source version)."""
    reason = tools_missing()
    if reason:
        raise RuntimeError(f"cannot build the RTL simulation: {reason}")
    root = _cache_root()
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, _source_key())
    exe = os.path.join(final, "Vrtl_tb")
    if os.path.exists(exe):
        return exe
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(exe):
            return exe
        work = tempfile.mkdtemp(dir=root, prefix=".build-")
        try:
            cmd = (["verilator", "--cc", "--exe", "--build", "-j", "2", "--top-module", "rtl_tb", "-Mdir", work]
                   + _VERILATOR_FLAGS + [os.path.join(RTL_DIR, f) for f in RTL_SOURCES + _TB])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"verilator failed on {RTL_DIR} ({proc.returncode}):\n{proc.stderr[-4000:]}")
            staged = tempfile.mkdtemp(dir=root, prefix=".staged-")
            shutil.copy2(os.path.join(work, "Vrtl_tb"), os.path.join(staged, "Vrtl_tb"))
            os.replace(staged, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return exe


class RTLSim:
    """The units of ``rtl_tb.v`` behind a Python interface (see the module docstring)."""

    def __init__(self, exe: Optional[str] = None):
        self.exe = exe or build()
        sp2_pix, sp2_red, dp_pix, dp_red, d1_pix, d1_red, lanes = (int(v) for v in self._run(["dims"])[0].split())
        #: unit -> (DSP columns or pixel lanes, reduction lanes, activations per column)
        self.dims = {"sp2": (sp2_pix, sp2_red, 1), "l4": (sp2_pix, sp2_red, 1), "dp": (dp_pix, dp_red, 2), "d1": (d1_pix, d1_red, 1)}
        self.lanes = lanes
        self.cycles = 0

    def _run(self, lines: Sequence[str]) -> List[str]:
        proc = subprocess.run([self.exe], input="\n".join(lines) + "\n", capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.exe} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc.stdout.splitlines()

    def gemm(self, unit: str, acts: np.ndarray, codes: np.ndarray, act_signed: bool, w8: bool = False,
             bias: Optional[np.ndarray] = None) -> np.ndarray:
        """``[rows, pixels]`` int64: the accumulators of ``unit`` ("sp2", "l4": Fixed-4 LUT
        multipliers, "dp": two products per DSP, "d1": one) after running weight codes ``codes [rows, K]`` (uint8: nibbles, or int8
        bytes with ``w8``) against activations ``acts [pixels, K]`` (uint8 or int8 values);
        ``bias [rows]``: each row's accumulation starts from it (else from 0)."""
        if unit not in self.dims:
            raise ValueError(f"unit must be one of {sorted(self.dims)}, got {unit!r}")
        if unit in ("sp2", "l4") and w8:
            raise ValueError(f"the {unit} array takes 4-bit codes only")
        cols, red, per_col = self.dims[unit]
        slots = cols * per_col                      # activation slots in the array's port
        block = cols if w8 else slots               # pixels per cycle: 8-bit weights take one per DSP
        acts = np.asarray(acts, dtype=np.int64) & 0xFF
        codes = np.asarray(codes, dtype=np.int64) & (0xFF if w8 else 0xF)
        npix, k = acts.shape
        rows = codes.shape[0]
        if codes.shape[1] != k:
            raise ValueError(f"codes have {codes.shape[1]} columns, activations {k}")
        kb = -(-k // red)
        pad_a = np.zeros((-(-npix // block) * block, kb * red), np.int64)
        pad_a[:npix, :k] = acts
        pad_w = np.zeros((rows, kb * red), np.int64)
        pad_w[:, :k] = codes
        lines = []
        for f in range(rows):
            lines.append(f"bias {0 if bias is None else int(bias[f])}")
            for p0 in range(0, npix, block):
                for b in range(kb):
                    lanes = slice(b * red, (b + 1) * red)
                    port = np.zeros((slots, red), np.int64)
                    port[:block] = pad_a[p0:p0 + block, lanes]
                    flags = f"{int(b == 0)} {int(act_signed)}" + ("" if unit in ("sp2", "l4") else f" {int(w8)}")
                    lines.append(f"{unit} " + flags + " " + " ".join(map(str, port.ravel())) + " "
                                 + " ".join(map(str, pad_w[f, lanes])))
                lines.append(f"rd {unit}")
        self.cycles += sum(not line.startswith("bias") for line in lines)
        out = self._run(lines)
        vals = np.array([[int(v) for v in line.split()][:block] for line in out], np.int64)
        return vals.reshape(rows, -1)[:, :npix]

    def alu(self, op: str, acc: np.ndarray, operand: np.ndarray, shift: np.ndarray,
            acc_b: Optional[np.ndarray] = None) -> np.ndarray:
        """``requant_alu`` applied element-wise (flat arrays of equal length, int32 range);
        ``acc_b``: the second accumulator of ``madd_shift`` (whose ``operand`` packs
        ``ma + mb * 2^16``) and of ``max`` / ``min`` (a window tap of ``isa`` op ``max_window``;
        a bound of ``isa`` op ``clamp``)."""
        acc_b = np.zeros_like(np.asarray(acc)) if acc_b is None else acc_b
        acc, operand, shift, acc_b = (np.asarray(a, dtype=np.int64).ravel() for a in (acc, operand, shift, acc_b))
        n, lanes = acc.size, self.lanes
        pad = -(-n // lanes) * lanes
        a, m, s, b = (np.concatenate([x, np.zeros(pad - n, np.int64)]) for x in (acc, operand, shift, acc_b))
        lines = []
        for i in range(0, pad, lanes):
            fields = ([str(v) for v in a[i:i + lanes]] + [str(v) for v in m[i:i + lanes]] + [str(v) for v in s[i:i + lanes]]
                      + [str(v) for v in b[i:i + lanes]])
            lines.append(f"alu {ALU_OPCODES[op]} " + " ".join(fields))
        out = self._run(lines)
        return np.array([int(v) for line in out for v in line.split()], np.int64)[:n]
