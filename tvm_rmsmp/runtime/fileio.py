"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Files are created with the permissions ``open()`` would give them (``0o666`` less the
process umask), not ``mkstemp``'s ``0o600``: a library or sidecar another user (a service
account, a container) should read is readable by it exactly when a plain write would be.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Optional, Union

__all__ = ["atomic_write", "atomic_output", "file_mode", "current_umask"]


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no race-free read elsewhere: set and restore at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created regular file gets: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def _temp_in(path: str, suffix: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_output(path: str, suffix: str = ".tmp", mode: Optional[int] = None) -> Iterator[str]:
    """A temporary path next to ``path`` to write; on a normal exit it gets ``mode``
    (default :func:`file_mode`) and replaces ``path``; on an error it is removed and
    ``path`` is untouched. ``suffix`` keeps the extension tools dispatch on (``.so``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory")
    tmp = _temp_in(path, suffix)
    try:
        yield tmp
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def atomic_write(path: str, data: Union[str, bytes], mode: Optional[int] = None) -> str:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename
    (flushed to disk first), with ``mode`` or the umask's permissions."""
    path = os.fspath(path)
    with atomic_output(path, mode=mode) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
    return path
