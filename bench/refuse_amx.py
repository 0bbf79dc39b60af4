"""Make the OS refuse this process (and every process it starts) the AMX tile state.

Linux hands a process the AMX tile registers only after it asks:
``arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18)``. Every AMX user asks
before its first tile instruction and falls back to AVX-512 VNNI when refused: tvm-rmsmp
(``schedules/x86_amx.py``), oneDNN inside torch, ONNX Runtime's MLAS (``MlasInitAMX``). A
seccomp filter that answers that one request with ``EPERM`` therefore turns an AMX Xeon into
a stand-in for a VNNI-only host for all contenders alike, on the same silicon, caches and
clock (``python -m bench.cpu --refuse-amx``). It is a proxy, not a VNNI-only CPU: the cores
still have AMX's power and cache behaviour, and a library that used the tile unit without
asking would fault, not fall back.

The filter (classic BPF, installed with ``seccomp(SECCOMP_SET_MODE_FILTER,
SECCOMP_FILTER_FLAG_TSYNC)`` so every thread of the process has it, after
``prctl(PR_SET_NO_NEW_PRIVS)``; ``prctl(PR_SET_SECCOMP)`` where ``seccomp(2)`` is missing):
architecture x86-64, system call ``arch_prctl`` (158) and the low 32 bits of its first
argument (an ``int``) ``0x1023`` -> ``ERRNO(EPERM)``; everything else is allowed. Filters
are inherited across ``fork`` and kept across ``execve``, so spawned workers have it too and
nothing can remove it. Linux x86-64 only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

__all__ = ["ARCH_REQ_XCOMP_PERM", "XFEATURE_XTILEDATA", "filter_program", "refuse_amx", "amx_request_errno",
           "matmul_integer_session", "run_showing_isa"]

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64
SYS_SECCOMP = 317  # x86-64
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 38, 22
SECCOMP_MODE_FILTER = 2  # prctl(PR_SET_SECCOMP, ...)
SECCOMP_SET_MODE_FILTER = 1  # seccomp(op, ...)
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
# classic BPF opcodes
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
# offsets in struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
NR, ARCH, ARG0_LOW = 0, 4, 16  # little endian: the low half of args[0] first


def filter_program():
    """The BPF instructions ``(code, jt, jf, k)``: jumps count instructions skipped."""
    return [
        (BPF_LD_W_ABS, 0, 0, ARCH),
        (BPF_JEQ_K, 0, 5, AUDIT_ARCH_X86_64),  # another ABI: allow
        (BPF_LD_W_ABS, 0, 0, NR),
        (BPF_JEQ_K, 0, 3, SYS_ARCH_PRCTL),
        (BPF_LD_W_ABS, 0, 0, ARG0_LOW),
        (BPF_JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def refuse_amx() -> None:
    """Install the filter in this process (module docstring); raises OSError where the
    kernel refuses it and RuntimeError off Linux x86-64. Irreversible for this process."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"refuse_amx: Linux x86-64 only, not {platform.system()} {platform.machine()}")
    prog = filter_program()
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"refuse_amx: prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(SYS_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if rc != 0 and ctypes.get_errno() == errno.ENOSYS:  # no seccomp(2): this thread only
        rc = libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"refuse_amx: installing the seccomp filter failed (rc {rc}): {os.strerror(err)}")


def amx_request_errno() -> int:
    """Ask for the tile state as the AMX libraries do: 0 where granted, else the errno
    (``EPERM`` under :func:`refuse_amx`). Granting it to a process that was refused is not
    possible, so this is safe to call before or after."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                      ctypes.c_long(XFEATURE_XTILEDATA))
    return 0 if rc == 0 else ctypes.get_errno()


# ----- python -m bench.refuse_amx: what the peers do with and without the tile state ----------
def matmul_integer_session(b, m: int, threads: int = 0):
    """An ONNX Runtime session of ``MatMulInteger(A uint8 [m, k], B)`` with the int8 ``b``
    ``[k, n]`` a constant (MLAS's int8 GEMM); ``threads`` 0: ORT's default. ImportError where
    onnxruntime or onnx is missing."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k, n = b.shape
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
                              [helper.make_tensor("B", TensorProto.INT8, [k, n], b.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_showing_isa(cmd, root: str, env) -> int:
    """Run ``cmd`` in ``root`` with ``ONEDNN_VERBOSE=1``, print its output with only oneDNN's ISA
    line of its verbose output (and its stderr where it fails); its return code."""
    import subprocess

    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=dict(env, ONEDNN_VERBOSE="1"))
    for line in proc.stdout.splitlines():
        if not line.startswith("onednn_verbose") or ",isa:" in line:
            print(line.replace("onednn_verbose,v1,info,cpu,", "  oneDNN "))
    if proc.returncode:
        print(proc.stderr[-2000:])
    return proc.returncode


def _peers(m: int, k: int, n: int, repeat: int) -> None:
    """In this process: ONNX Runtime's ``MatMulInteger`` (uint8 x int8, MLAS) and torch's
    ``_int_mm`` (int8 x int8, oneDNN) on one thread, checked against numpy, timed (medians)."""
    import statistics
    import time

    import numpy as np
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    b = rng.integers(-128, 128, (k, n)).astype(np.int8)

    def timed(fn):
        fn()
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    x8, w8 = torch.from_numpy((a.astype(np.int16) - 128).astype(np.int8)), torch.from_numpy(b)
    exact = np.array_equal(torch._int_mm(x8, w8).numpy(), (a.astype(np.int64) - 128) @ b.astype(np.int64))
    t = timed(lambda: torch._int_mm(x8, w8))
    print(f"  torch _int_mm (oneDNN): exact {exact}, {t * 1e6:.0f} us, {m * k * n / t / 1e9:.0f} GMAC/s", flush=True)
    try:
        sess = matmul_integer_session(b, m, threads=1)
    except ImportError:
        print("  onnxruntime not installed: ORT left out")
        return
    exact = np.array_equal(sess.run(None, {"A": a})[0], a.astype(np.int64) @ b.astype(np.int64))
    t = timed(lambda: sess.run(None, {"A": a}))
    print(f"  ORT MatMulInteger (MLAS): exact {exact}, {t * 1e6:.0f} us, {m * k * n / t / 1e9:.0f} GMAC/s", flush=True)


def main(argv=None) -> int:
    """``python -m bench.refuse_amx [--shape M K N]``: the peers' int8 GEMMs on one thread, in a
    process granted the AMX tile state and in one refused it (oneDNN's ISA line included)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 768, 3072], metavar=("M", "K", "N"))
    ap.add_argument("--repeat", type=int, default=31)
    ap.add_argument("--child", choices=["granted", "refused"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.child == "refused":
            refuse_amx()
        got = amx_request_errno()
        print(f"{args.child}: arch_prctl(ARCH_REQ_XCOMP_PERM) -> {errno.errorcode.get(got, got) if got else 'granted'}")
        _peers(*args.shape, args.repeat)
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for child in ("granted", "refused"):
        rc = run_showing_isa([sys.executable, "-m", "bench.refuse_amx", "--child", child, "--shape", *map(str, args.shape),
                              "--repeat", str(args.repeat)], root, os.environ)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
