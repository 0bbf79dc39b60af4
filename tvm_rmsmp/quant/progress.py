"""Progress bars (tqdm) for the long steps: calibration, the Hessian estimate, GPTQ, QAT,
compile and tuning; one switch for all of them.

Whether bars are shown, first match wins:

1. :func:`set_progress` (``True``/``False``; ``None`` returns to the default), e.g. the CLI's
   ``--quiet``;
2. the environment: ``TVM_RMSMP_QUIET=1`` (any value but ``""``/``"0"``) hides them;
3. the default: shown when stderr is a terminal, hidden otherwise (logs, CI, notebooks that
   redirect stderr), so library users see no bars in their logs unless they ask.

No numpy or torch here: every part may use it.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

__all__ = ["set_progress", "progress_enabled", "progress"]

_FORCED: Optional[bool] = None


def set_progress(enabled: Optional[bool]) -> None:
    """Show (True) or hide (False) every progress bar of tvm-rmsmp in this process; None: the
    default (``TVM_RMSMP_QUIET``, else shown on a terminal only)."""
    global _FORCED
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_progress takes True, False or None, got {enabled!r}")
    _FORCED = enabled


def progress_enabled() -> bool:
    """Whether bars are shown now (see the module's docstring)."""
    if _FORCED is not None:
        return _FORCED
    if os.environ.get("TVM_RMSMP_QUIET", "") not in ("", "0"):
        return False
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress(iterable: Optional[Iterable] = None, desc: str = "", *, total: Optional[int] = None,
             unit: str = "it", leave: bool = False):
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), disabled per
    :func:`progress_enabled`. Bars of finished steps are cleared (``leave=False``)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not progress_enabled(),
                dynamic_ncols=True)
