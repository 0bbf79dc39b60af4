"""Run exported AArch64 libraries under qemu-user: the AArch64 TVM runtime and a small VM runner.

The runtime comes from the AArch64 wheels of the TVM packages installed here (same versions,
so the exported library and the runtime agree): ``pip download`` fetches them once into a
cache directory (``$RMSMP_AARCH64_CACHE``, default ``~/.cache/tvm-rmsmp/aarch64-<versions>``),
``libtvm_runtime.so`` and ``libtvm_ffi.so`` are unzipped from them, and ``aarch64_runner.cc``
(next to this file) is built with ``aarch64-linux-gnu-g++`` against the installed x86 wheel's
``tvm_ffi`` headers. ``python tests/aarch64_qemu.py`` prepares the cache (scripts/_setup.sh
calls it); the test fixture does the same on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from typing import List, Optional, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER_SOURCE = os.path.join(HERE, "aarch64_runner.cc")
SYSROOT = "/usr/aarch64-linux-gnu"
CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
#: PyPI's platform tag for the AArch64 wheels (the files are manylinux_2_27/2_28 and 2_24/2_28)
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
PACKAGES = ("apache-tvm", "apache-tvm-ffi")
#: wheel member (by file name) -> the package that holds it
RUNTIME_LIBS = {"libtvm_runtime.so": "apache-tvm", "libtvm_ffi.so": "apache-tvm-ffi"}


class Unavailable(RuntimeError):
    """The AArch64 runner cannot be prepared here; the message says why."""


def _versions() -> dict:
    try:
        return {p: metadata.version(p) for p in PACKAGES}
    except metadata.PackageNotFoundError as err:
        raise Unavailable(f"{err.name} is not installed, so the matching AArch64 runtime is unknown") from err


def cache_dir() -> str:
    env = os.environ.get("RMSMP_AARCH64_CACHE")
    if env:
        return env
    tag = "-".join(_versions()[p] for p in PACKAGES)
    return os.path.join(os.path.expanduser("~"), ".cache", "tvm-rmsmp", f"aarch64-{tag}")


def _ffi_include() -> str:
    import tvm_ffi

    include = os.path.join(os.path.dirname(tvm_ffi.__file__), "include")
    if not os.path.isfile(os.path.join(include, "tvm", "ffi", "extra", "module.h")):
        raise Unavailable(f"the installed tvm_ffi has no C++ headers under {include}")
    return include


def missing_tools() -> Optional[str]:
    """Why the AArch64 toolchain is unusable here, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-user)"
    if shutil.which(CROSS_CXX) is None:
        return f"{CROSS_CXX} not found (apt-get install g++-aarch64-linux-gnu)"
    if not os.path.isdir(os.path.join(SYSROOT, "lib")):
        return f"no AArch64 sysroot at {SYSROOT} (it comes with g++-aarch64-linux-gnu)"
    return None


def _download_wheels(wheel_dir: str) -> List[str]:
    os.makedirs(wheel_dir, exist_ok=True)
    versions = _versions()
    want = [f"{p}=={v}" for p, v in versions.items()]
    have = [f for f in os.listdir(wheel_dir) if f.endswith(".whl") and "aarch64" in f]
    if len(have) < len(PACKAGES):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", WHEEL_PLATFORM,
               "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "-d", wheel_dir, *want]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise Unavailable(f"pip download of the AArch64 wheels ({' '.join(want)}) failed: "
                              f"{(proc.stderr or proc.stdout).strip()[-600:]}")
        have = [f for f in os.listdir(wheel_dir) if f.endswith(".whl") and "aarch64" in f]
    by_package = {}
    for p, v in versions.items():
        stem = p.replace("-", "_") + "-" + v + "-"
        match = [f for f in have if f.startswith(stem)]
        if not match:
            raise Unavailable(f"no AArch64 wheel of {p}=={v} in {wheel_dir}")
        by_package[p] = os.path.join(wheel_dir, match[0])
    return by_package


def _extract_libs(wheels: dict, lib_dir: str) -> None:
    os.makedirs(lib_dir, exist_ok=True)
    for name, package in RUNTIME_LIBS.items():
        dest = os.path.join(lib_dir, name)
        if os.path.exists(dest):
            continue
        with zipfile.ZipFile(wheels[package]) as whl:
            members = [m for m in whl.namelist() if os.path.basename(m) == name]
            if not members:
                raise Unavailable(f"{os.path.basename(wheels[package])} holds no {name}")
            fd, tmp = tempfile.mkstemp(dir=lib_dir)
            with os.fdopen(fd, "wb") as out, whl.open(members[0]) as src:
                shutil.copyfileobj(src, out)
            os.chmod(tmp, 0o755)
            os.replace(tmp, dest)


def prepare() -> str:
    """The path of a built runner (cached); raises :class:`Unavailable` with the reason where a
    tool or the wheels are missing, RuntimeError where the runner does not build."""
    why = missing_tools()
    if why:
        raise Unavailable(why)
    root = cache_dir()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:  # pytest -n: one worker prepares, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(root)


def _prepare_locked(root: str) -> str:
    lib_dir = os.path.join(root, "lib")
    if not all(os.path.exists(os.path.join(lib_dir, n)) for n in RUNTIME_LIBS):
        _extract_libs(_download_wheels(os.path.join(root, "wheels")), lib_dir)
    include = _ffi_include()
    with open(RUNNER_SOURCE, "rb") as fh:
        digest = hashlib.sha256(fh.read() + include.encode()).hexdigest()[:12]
    runner = os.path.join(root, f"runner-{digest}")  # rebuilt when the source changes
    if not os.path.exists(runner):
        tmp = runner + f".tmp{os.getpid()}"
        cmd = [CROSS_CXX, "-std=c++17", "-O1", "-I", include, "-o", tmp, RUNNER_SOURCE, "-L", lib_dir,
               "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:  # the tools are there: a broken runner is a failure, not a skip
            raise RuntimeError(f"building the AArch64 runner failed: {proc.stderr.strip()[-1500:]}")
        os.replace(tmp, runner)
    return runner


def run_library(runner: str, library: str, inputs: Sequence[np.ndarray], workdir: str,
                timeout: float = 300) -> Tuple[List[np.ndarray], str]:
    """Run ``main`` of an exported AArch64 library under qemu on float32 ``inputs``; the
    outputs as numpy arrays, and the runner's stderr (for failure messages)."""
    args = []
    for i, x in enumerate(inputs):
        x = np.ascontiguousarray(x, dtype=np.float32)
        path = os.path.join(workdir, f"in{i}.bin")
        x.tofile(path)
        args.append(f"{path}:{','.join(str(d) for d in x.shape)}")
    out_path = os.path.join(workdir, "out.bin")
    proc = subprocess.run([QEMU, "-L", SYSROOT, runner, library, out_path, *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the AArch64 runner exited with {proc.returncode}: {proc.stderr.strip()[-3000:]}")
    dtypes = {(2, 32): np.float32, (0, 32): np.int32, (0, 8): np.int8, (1, 8): np.uint8, (2, 64): np.float64,
              (0, 64): np.int64}
    raw = open(out_path, "rb").read()
    outputs, offset = [], 0
    for line in proc.stdout.split("\n"):
        if not line.strip():
            continue
        code, bits, *rest = line.split()
        dims = rest[0] if rest else ""
        dtype = np.dtype(dtypes[(int(code), int(bits))])
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        size = int(np.prod(shape)) * dtype.itemsize
        outputs.append(np.frombuffer(raw[offset: offset + size], dtype).reshape(shape).copy())
        offset += size
    assert offset == len(raw), f"runner wrote {len(raw)} bytes, its outputs need {offset}"
    return outputs, proc.stderr


if __name__ == "__main__":
    try:
        print(prepare())
    except Unavailable as err:
        print(f"AArch64 runner unavailable: {err}", file=sys.stderr)
        sys.exit(1)
