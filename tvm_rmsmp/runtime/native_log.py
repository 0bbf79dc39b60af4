"""TVM's C++ log lines that say nothing to a user of this package, kept off stderr.

TVM 0.27 writes some warnings from C++ straight to file descriptor 2, where Python's
``warnings`` filters cannot reach them: one "Scope Saving:" / "Scope Loaded:" line per
function whenever a Relax executable is exported or loaded, and "Fast mode segfaults when
there are out-of-bounds indices" for every gather it legalizes (the row-order gathers of this
package have constant, in-range indices; embedding indices are checked before each call).
:func:`filtered_native_log` captures fd 2 for the duration of a call and writes back every
other line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator, Sequence

__all__ = ["filtered_native_log", "NOISE"]

#: Substrings of the C++ log lines dropped (everything else is written back).
NOISE: Sequence[str] = (
    "Warning: Scope Saving:",
    "Warning: Scope Loaded:",
    "Fast mode segfaults when there are out-of-bounds indices",
)


@contextlib.contextmanager
def filtered_native_log(drop: Sequence[str] = NOISE) -> Iterator[None]:
    """Run the body with fd 2 captured; afterwards write back the lines that match none of ``drop``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): leave the log alone
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(d in line for d in drop)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
