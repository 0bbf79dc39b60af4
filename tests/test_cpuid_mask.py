"""``bench/cpuid_mask.c``: CPUID faulting hides AVX-512, AVX-VNNI and AMX from a process, so that
every contender of ``python -m bench.cpu --avx2-only`` runs its AVX2 path.

Everything runs in child processes started with the library preloaded."""

import json
import os
import platform
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import cpuid_mask  # noqa: E402

pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                       reason="CPUID faulting is a Linux x86-64 interface"),
    pytest.mark.skipif(not cpuid_mask.cpu_can_fault(), reason="this CPU or kernel has no CPUID faulting (cpuid_fault)"),
    pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler to build the library"),
]

CHILD = r'''
import faulthandler, json, subprocess, sys, threading, warnings
import numpy as np
sys.path.insert(0, ".")
from bench.cpuid_mask import active, check_masked, cpuid

report = {"active": active()}
check_masked("test")
ebx, ecx, edx = cpuid(7, 0)[1:]
report["leaf7"] = {"avx2": ebx >> 5 & 1, "avx512f": ebx >> 16 & 1, "avx512vnni": ecx >> 11 & 1, "amx_int8": edx >> 25 & 1}
box = []
t = threading.Thread(target=lambda: box.append((active(), cpuid(7, 0)[1] >> 16 & 1)))
t.start(); t.join()
report["thread"] = box[0]
report["child"] = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); "
    "from bench.cpuid_mask import active, cpuid; print(active(), cpuid(7, 0)[1] >> 16 & 1)"],
    capture_output=True, text=True).stdout.strip()
faulthandler.enable()  # installs a SIGSEGV handler: chained behind the mask's, CPUID still answered
report["after_faulthandler"] = (active(), cpuid(7, 0)[1] >> 16 & 1)

import tvm, tvm_ffi
feats = dict(tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")())
report["llvm"] = {f: bool(feats.get(f)) for f in ("avx2", "avx512f", "avxvnni", "amx-int8")}
import torch
report["torch_capability"] = torch.backends.cpu.get_cpu_capability()

import tvm_rmsmp as rmsmp
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(77, 61), torch.nn.ReLU(), torch.nn.Linear(61, 45)).eval()
q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_bits=8), [torch.randn(40, 77) for _ in range(2)])
report["rmsmp"] = {}
for rows in (1, 33):
    x = torch.randn(rows, 77)
    exe = rmsmp.compile(q, (x,), "llvm")
    report["rmsmp"][rows] = {"kernels": dict(exe.stats["cpu_kernels"]),
                             "exact": bool(np.array_equal(exe(x), q(x).detach().numpy()))}

from bench.refuse_amx import matmul_integer_session
rng = np.random.default_rng(0)
m, k, n = 16, 64, 32
b = np.full((k, n), 127, np.int8)
b[:, ::2] = rng.integers(-128, 128, (k, n // 2))
try:
    sess = matmul_integer_session(b, m)
except ImportError:
    report["ort"] = None
else:
    small = rng.integers(0, 64, (m, k)).astype(np.uint8)   # pair sums below 2^15: exact on every path
    big = np.full((m, k), 255, np.uint8)                   # 255 * 127 * 2 > 2^15 - 1: vpmaddubsw saturates
    ref = lambda a: a.astype(np.int64) @ b.astype(np.int64)
    report["ort"] = {"small_exact": bool(np.array_equal(sess.run(None, {"A": small})[0], ref(small))),
                     "big_exact": bool(np.array_equal(sess.run(None, {"A": big})[0], ref(big)))}
print("REPORT " + json.dumps(report), flush=True)
'''


def _run(code, env, timeout=300):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_under_the_mask_every_library_sees_an_avx2_cpu():
    """With the library preloaded: CPUID shows AVX2 without AVX-512F, AVX512-VNNI or AMX-INT8 in
    the main thread, a new thread and a child process, also after Python's faulthandler installed
    its SIGSEGV handler; LLVM's host query and torch see AVX2; a model compiled for this host gets
    AVX2 kernels only and equals the torch reference bit for bit at 1 and 33 rows; ONNX Runtime's
    int8 GEMM saturates its int16 pair sums (``vpmaddubsw``: its AVX2 kernel) where the pair sums
    pass 2^15 and is exact where they do not. Without the mask the same process sees the host."""
    proc = _run(CHILD, cpuid_mask.masked_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["active"]
    assert report["leaf7"] == {"avx2": 1, "avx512f": 0, "avx512vnni": 0, "amx_int8": 0}, report["leaf7"]
    assert report["thread"] == [True, 0]
    assert report["child"] == "True 0"
    assert report["after_faulthandler"] == [True, 0]
    assert report["llvm"] == {"avx2": True, "avx512f": False, "avxvnni": False, "amx-int8": False}
    assert report["torch_capability"] == "AVX2"
    for rows, got in report["rmsmp"].items():
        assert got["exact"], (rows, got)
        assert got["kernels"] and all(kind.startswith("x86-avx2-") for kind in got["kernels"]), (rows, got)
    if report["ort"] is not None:
        assert report["ort"] == {"small_exact": True, "big_exact": False}, report["ort"]


def test_without_the_mask_cpuid_is_the_hosts():
    """The library's CPUID helper in a process started without it is not loaded (``active`` is
    false and ``check_masked`` refuses); loaded, it reports what /proc/cpuinfo's flags say of AVX-512F."""
    code = ("import sys; sys.path.insert(0, '.'); from bench.cpuid_mask import active, check_masked\n"
            "print(active())\n"
            "try:\n    check_masked('test')\nexcept RuntimeError as err:\n    print('refused', err)")
    proc = _run(code, dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "False" and lines[1].startswith("refused --avx2-only: CPUID does not fault in the test process")


def test_other_segfaults_reach_the_programs_handler_or_end_the_process():
    """A real fault (reading address 1) is not swallowed: with faulthandler enabled its handler
    runs (its report on stderr) and the process dies of SIGSEGV; without a handler the default
    action ends it."""
    crash = "import ctypes\nctypes.string_at(1, 1)"
    env = cpuid_mask.masked_env()
    proc = _run("import faulthandler; faulthandler.enable()\n" + crash, env, timeout=60)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-2000:])
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    proc = _run(crash, env, timeout=60)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-2000:])


def test_the_library_is_built_once_under_its_source_hash(tmp_path, monkeypatch):
    """``library()`` names the build by the source's hash and reuses it; a failing compiler
    leaves no file behind and names the source."""
    path = cpuid_mask.library()
    assert os.path.basename(path).startswith("cpuid_mask-") and os.path.exists(path)
    assert cpuid_mask.library() == path
    monkeypatch.setattr(cpuid_mask, "BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with pytest.raises(RuntimeError, match="cpuid_mask.c"):
        cpuid_mask.library()
    assert os.listdir(tmp_path) == []


def test_masked_env_puts_the_library_first_and_keeps_other_settings():
    env = cpuid_mask.masked_env({"LD_PRELOAD": "/x/other.so", "GLIBC_TUNABLES": "glibc.malloc.check=0"})
    parts = env["LD_PRELOAD"].split(":")
    assert parts[0] == cpuid_mask.library() and parts[1:] == ["/x/other.so"]
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert tunables[0].startswith("glibc.cpu.hwcaps=-AVX512F,") and "-AMX_INT8" in tunables[0]
    assert tunables[1:] == ["glibc.malloc.check=0"]
