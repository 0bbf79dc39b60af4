"""Show every process an AVX2 CPU on a CPU with AVX-512 and AMX: CPUID faulting.

The x86 int8 libraries pick their kernels from the CPUID instruction: oneDNN inside torch (and
torch's own ``cpuinfo``), ONNX Runtime's MLAS, LLVM's host query that tvm-rmsmp builds its
target from. Linux can make CPUID fault in a thread (``arch_prctl(ARCH_SET_CPUID, 0)``, where
the CPU has CPUID faulting: the ``cpuid_fault`` flag of ``/proc/cpuinfo``, which KVM guests
get too). ``bench/cpuid_mask.c``, loaded with ``LD_PRELOAD`` before the program's own code,
turns faulting on, answers each CPUID from its SIGSEGV handler with the real values less the
bits of AVX-512 (all subsets), AVX-VNNI (and its INT8/INT16/IFMA kin), AVX10 and AMX, and
chains every other SIGSEGV to the program's handler. Threads inherit the faulting; a program
started with ``execve`` loads the library again through the inherited ``LD_PRELOAD``. glibc's
own string functions pick their variant before any library loads; ``GLIBC_TUNABLES`` takes
AVX-512 from them too.

So ``python -m bench.cpu --avx2-only`` times every contender on the AVX2 (and FMA, BMI2) path
of the same silicon: a stand-in for an AVX2-only host (AMD Zen 2/3, Intel before Ice Lake
servers), named so in the JSON (``avx2_only``) and the docs. It is a proxy, not such a CPU: the
caches, memory and clock are this CPU's, and a program that reads the ISA from elsewhere
(``/proc/cpuinfo``, a hard-coded choice) or executes AVX-512 without asking is not masked.
``python -m bench.cpuid_mask`` shows what each library sees with and without the mask.
Linux x86-64 only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Tuple

__all__ = ["SOURCE", "library", "cpu_can_fault", "masked_env", "active", "cpuid", "check_masked", "GLIBC_HIDE"]

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cpuid_mask.c")
BUILD_DIR = os.path.join(HERE, ".build")
#: glibc's names of the features its string functions would otherwise still use
GLIBC_HIDE = ("AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX512ER", "AVX512PF",
              "AVX512_VBMI", "AVX512_VBMI2", "AVX512_VNNI", "AVX512_BITALG", "AVX512_IFMA", "AVX512_VPOPCNTDQ",
              "AVX512_FP16", "AVX512_BF16", "AVX_VNNI", "AMX_TILE", "AMX_INT8", "AMX_BF16")


def library() -> str:
    """The compiled library (``bench/.build/cpuid_mask-<source hash>.so``), built on first use
    with the system C compiler; written to a temporary name and renamed, so a failed or
    concurrent build never leaves a half-written file under the final name."""
    with open(SOURCE, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    path = os.path.join(BUILD_DIR, f"cpuid_mask-{digest}.so")
    if os.path.exists(path):
        return path
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("cpuid_mask: no C compiler (cc/gcc) to build bench/cpuid_mask.c")
    os.makedirs(BUILD_DIR, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cpuid_mask-", suffix=".so", dir=BUILD_DIR)
    os.close(fd)
    try:
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, SOURCE, "-ldl"],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"cpuid_mask: {cc} failed on {SOURCE}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cpu_can_fault() -> bool:
    """Whether the kernel reports CPUID faulting for this CPU (``cpuid_fault`` in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "cpuid_fault" in line.split()
    except OSError:
        pass
    return False


def masked_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``env`` (default: this process's) with the library first in ``LD_PRELOAD`` and glibc told
    to leave AVX-512 and AMX alone: what a process started with it sees is an AVX2 CPU."""
    env = dict(os.environ if env is None else env)
    lib = library()
    env["LD_PRELOAD"] = ":".join([lib] + [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != lib])
    hwcaps = "glibc.cpu.hwcaps=" + ",".join(f"-{f}" for f in GLIBC_HIDE)
    env["GLIBC_TUNABLES"] = ":".join([hwcaps] + [t for t in env.get("GLIBC_TUNABLES", "").split(":")
                                                 if t and not t.startswith("glibc.cpu.hwcaps=")])
    return env


def _lib() -> Optional[ctypes.CDLL]:
    lib = ctypes.CDLL(None)
    try:
        lib.rmsmp_cpuid_faulting
    except AttributeError:
        return None
    return lib


def active() -> bool:
    """Whether the library is loaded in this process and CPUID faults in this thread."""
    lib = _lib()
    return bool(lib is not None and lib.rmsmp_cpuid_faulting() == 1)


def cpuid(leaf: int, subleaf: int = 0) -> Tuple[int, int, int, int]:
    """``(eax, ebx, ecx, edx)`` of the CPUID instruction as this process sees it (through the
    mask where :func:`active`); needs the library loaded."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("cpuid_mask: the library is not loaded in this process (start it with masked_env())")
    out = (ctypes.c_uint32 * 4)()
    lib.rmsmp_cpuid(ctypes.c_uint32(leaf), ctypes.c_uint32(subleaf), out)
    return tuple(int(v) for v in out)


def check_masked(who: str) -> None:
    """Raise unless CPUID in this process reports no AVX-512F, AVX-VNNI nor AMX-INT8 while
    reporting AVX2 (``--avx2-only``: never time a process that could see more)."""
    if not active():
        raise RuntimeError(f"--avx2-only: CPUID does not fault in the {who} process (LD_PRELOAD of "
                           f"bench/cpuid_mask.c missing, or the CPU has no CPUID faulting)")
    _, ebx, _, edx = cpuid(7, 0)
    eax1 = cpuid(7, 1)[0]
    seen = [name for name, on in (("AVX512F", ebx >> 16 & 1), ("AMX-INT8", edx >> 25 & 1), ("AVX-VNNI", eax1 >> 4 & 1))
            if on]
    if seen or not ebx >> 5 & 1:
        raise RuntimeError(f"--avx2-only: the {who} process sees {seen or 'no AVX2'} through CPUID")


# ----- python -m bench.cpuid_mask: what each library sees with and without the mask ------------
def _report() -> None:
    import torch
    import tvm_ffi
    from tvm.target import codegen

    if _lib() is not None:
        check_masked("this")
    feats = dict(tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")())
    shown = ("avx2", "fma", "avxvnni", "avx512f", "avx512vnni", "amx-int8")
    print(f"  LLVM host: {codegen.llvm_get_system_cpu()}, " + ", ".join(f"{f} {bool(feats.get(f))}" for f in shown))
    print(f"  torch CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    sys.path.insert(0, os.path.dirname(HERE))
    from tvm_rmsmp.compiler.targets import resolve_target

    from schedules.x86_intrin import x86_isa

    print(f"  tvm-rmsmp x86 kernels: {x86_isa(resolve_target('llvm'))}")
    from bench.refuse_amx import _peers

    _peers(128, 768, 3072, 31)
    lib = _lib()
    if lib is not None:
        print(f"  CPUID instructions answered by the mask: {lib.rmsmp_cpuid_mask_count()}")


def main(argv=None) -> int:
    """``python -m bench.cpuid_mask``: in a process as started and in one with the mask, what
    LLVM, torch and tvm-rmsmp see, and the peers' int8 GEMMs (oneDNN's ISA line included)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _report()
        return 0
    if not cpu_can_fault():
        print("this CPU (or kernel) has no CPUID faulting (no cpuid_fault in /proc/cpuinfo): nothing to mask")
        return 1
    from bench.refuse_amx import run_showing_isa

    root = os.path.dirname(HERE)
    for name, env in (("as started", dict(os.environ)), ("CPUID masked to AVX2", masked_env())):
        print(f"{name}:", flush=True)
        rc = run_showing_isa([sys.executable, "-m", "bench.cpuid_mask", "--child"], root, dict(env, PYTHONPATH=root))
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
