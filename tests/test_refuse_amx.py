"""``bench/refuse_amx.py``: the seccomp filter that makes the OS refuse the AMX tile state, so
that every contender of ``python -m bench.cpu --refuse-amx`` runs its VNNI path.

Everything runs in a child process: the filter cannot be removed from the process it is in."""

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                                reason="a seccomp filter for Linux x86-64")

CHILD = r'''
import ctypes, errno, json, subprocess, sys, threading, warnings
import numpy as np
sys.path.insert(0, ".")
from bench.refuse_amx import amx_request_errno, refuse_amx

with open("/proc/cpuinfo") as f:
    host_amx = "amx_int8" in next((l for l in f if l.startswith("flags")), "").split()
report = {"host_amx": host_amx}
refuse_amx()
report["errno"] = errno.errorcode.get(amx_request_errno())
box = []
t = threading.Thread(target=lambda: box.append(amx_request_errno()))
t.start(); t.join()
report["thread_errno"] = errno.errorcode.get(box[0])
report["child_errno"] = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); "
    "from bench.refuse_amx import amx_request_errno as a; import errno; print(errno.errorcode.get(a()))"],
    capture_output=True, text=True).stdout.strip()
# another arch_prctl request still passes: ARCH_GET_XCOMP_PERM (0x1022)
libc = ctypes.CDLL(None, use_errno=True)
mask = ctypes.c_ulong(0)
report["get_perm_rc"] = libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1022), ctypes.byref(mask))

import torch
import tvm_rmsmp as rmsmp

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(77, 61), torch.nn.ReLU(), torch.nn.Linear(61, 45)).eval()
q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_bits=8), [torch.randn(40, 77) for _ in range(2)])
x = torch.randn(33, 77)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    exe = rmsmp.compile(q, (x,), "llvm")
report["warned"] = any("refused the tile state" in str(w.message) for w in caught)
report["kernels"] = dict(exe.stats["cpu_kernels"])
report["rmsmp_exact"] = bool(np.array_equal(exe(x), q(x).detach().numpy()))

rng = np.random.default_rng(0)
m, k, n = 64, 192, 96
a = rng.integers(0, 256, (m, k)).astype(np.uint8)
b = rng.integers(-128, 128, (k, n)).astype(np.int8)
ref = a.astype(np.int64) @ b.astype(np.int64)
x8 = torch.from_numpy((a.astype(np.int16) - 128).astype(np.int8))
report["torch_exact"] = bool(np.array_equal(torch._int_mm(x8, torch.from_numpy(b)).numpy(),
                                            (a.astype(np.int64) - 128) @ b.astype(np.int64)))
from bench.refuse_amx import matmul_integer_session
try:
    sess = matmul_integer_session(b, m)
except ImportError:
    report["ort_exact"] = None
else:
    report["ort_exact"] = bool(np.array_equal(sess.run(None, {"A": a})[0], ref))
print("REPORT " + json.dumps(report), flush=True)
'''


def test_under_the_filter_amx_is_refused_and_everyone_falls_back_to_vnni():
    """In a process with the filter: the tile-state request fails with EPERM in it, in a thread
    and in a child process, while other ``arch_prctl`` requests pass; a model compiled for this
    host gets no AMX kernel (on an AMX host a warning names the refusal) and equals the torch
    reference bit for bit; torch's and ONNX Runtime's int8 GEMMs equal numpy's integer product
    (oneDNN reports no AMX in its ISA line)."""
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, ONEDNN_VERBOSE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["errno"] == report["thread_errno"] == report["child_errno"] == "EPERM", report
    assert report["get_perm_rc"] == 0
    assert report["rmsmp_exact"] and report["kernels"], report
    assert not any("amx" in kind for kind in report["kernels"]), report["kernels"]
    if report["host_amx"]:
        assert report["warned"]
        assert report["kernels"] == {"x86-avx512vnni-layer": 2}
    assert report["torch_exact"]
    assert report["ort_exact"] in (True, None)
    isa = [line for line in proc.stdout.splitlines() if line.startswith("onednn_verbose") and ",isa:" in line]
    assert all("AMX" not in line for line in isa), isa


def test_the_filter_is_a_narrow_program():
    """The BPF program: checks the architecture first, and its only non-ALLOW return is
    ERRNO(EPERM), reached only through arch_prctl (158) with 0x1023 in args[0]."""
    from bench.refuse_amx import filter_program

    prog = filter_program()
    assert prog[0] == (0x20, 0, 0, 4) and prog[1][3] == 0xC000003E
    rets = [(i, insn[3]) for i, insn in enumerate(prog) if insn[0] == 0x06]
    assert sorted(k for _, k in rets) == [0x00050001, 0x7FFF0000]
    # walk every path: the EPERM return needs arch, nr and args[0] all to match
    data = {4: 0xC000003E, 0: 158, 16: 0x1023}

    def run(fields):
        pc, acc = 0, None
        while True:
            code, jt, jf, k = prog[pc]
            if code == 0x20:
                acc, pc = fields.get(k, 0), pc + 1
            elif code == 0x15:
                pc += 1 + (jt if acc == k else jf)
            else:
                return k

    assert run(data) == 0x00050001
    for key, other in ((4, 0x40000003), (0, 157), (16, 0x1022)):
        assert run({**data, key: other}) == 0x7FFF0000, key
