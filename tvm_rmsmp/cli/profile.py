"""Where a compiled model spends its time: milliseconds per kind of call of the Relax VM.

    tvm-rmsmp profile model.so --input x.npy [--repeat 10] [--top 20] [--json out.json]

Every call the VM makes (kernels, allocations, glue) is timed through its instrument hook over
``repeat`` runs after one warm-up run. Calls are grouped by name with the numbers removed
(``rmsmp_conv2d_layer#_#_conv#_sp#_#_packed`` is every SP2 group of a residual block's
convolutions), so the table says which kind of kernel or glue costs most. The hook adds a few
microseconds per call: compare the rows with each other, not the total with ``exe.benchmark``.
``bench/profile_model.py`` runs it on the built-in benchmark models.
"""

from __future__ import annotations

import collections
import re
import time
from typing import Dict, List, Sequence, Tuple

__all__ = ["profile", "top_calls", "format_table"]


def profile(exe, inputs: Sequence, repeat: int = 10) -> Dict[str, float]:
    """{call kind: mean milliseconds per model run} of a CPU :class:`CompiledModel`
    (``rmsmp.compile`` or ``rmsmp.load``), from the VM's instrument hook."""
    from tvm import relax

    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    executable = getattr(exe, "executable", None)
    if executable is None or not hasattr(exe, "_inputs"):
        raise TypeError(f"profile needs a compiled CPU model (rmsmp.compile / rmsmp.load), got {type(exe).__name__}")
    kind = exe.target.kind.name
    if kind != "llvm":
        raise ValueError(f"profile runs CPU (llvm) libraries on this machine; this one is for {kind!r}")
    vm = relax.VirtualMachine(executable, exe.device)
    args = exe._inputs(inputs)
    vm["main"](*args)  # warm up: first-call allocations and page faults
    spent: Dict[str, float] = collections.defaultdict(float)
    started: Dict[str, float] = {}

    def instrument(func, name, before_run, ret_value, *call_args):
        if before_run:
            started[name] = time.perf_counter()
        else:
            spent[re.sub(r"\d+", "#", str(name))] += time.perf_counter() - started.pop(name)
        return 0

    vm.set_instrument(instrument)
    for _ in range(repeat):
        vm["main"](*args)
    return {k: 1e3 * v / repeat for k, v in spent.items()}


def top_calls(rows: Dict[str, float], top: int = 20) -> List[Tuple[str, float]]:
    """The ``top`` most expensive call kinds, most expensive first."""
    return sorted(rows.items(), key=lambda kv: -kv[1])[:top]


def format_table(rows: Dict[str, float], top: int = 20) -> str:
    """The per-call-kind table as text: milliseconds, share of all calls, call kind."""
    total = sum(rows.values())
    lines = [f"{'ms':>9}  {'share':>6}  call"]
    for name, ms in top_calls(rows, top):
        lines.append(f"{ms:9.3f}  {100 * ms / max(total, 1e-12):5.1f}%  {name}")
    lines.append(f"{total:9.3f}  100.0%  all calls")
    return "\n".join(lines)
