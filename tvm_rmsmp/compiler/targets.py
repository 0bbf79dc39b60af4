"""Named compile targets.

A target is a name from :data:`TARGET_NAMES`, a ``tvm.target.Target``, or a TVM target dict
(TVM 0.27 accepts dicts only, not "llvm -mcpu=..." strings).
"""

from __future__ import annotations

from typing import Callable, Dict, Union

import tvm

__all__ = ["resolve_target", "check_cpu", "TARGET_NAMES", "TARGET_PREFIXES", "host_cpu_target", "INT8_DOT_KEY"]

from schedules.registry import INT8_DOT_KEY

from ..runtime.host import host_cpu_target


def _aarch64() -> Dict[str, object]:
    return {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": "cortex-a76",
        "mattr": ["+neon", "+dotprod"],
        "num-cores": 4,
    }


def _opencl(device: str, int8_dot: bool = False) -> Callable[[], Dict[str, object]]:
    """Mobile GPU through OpenCL; the host part is this machine (for PoCL runs and RPC).
    ``int8_dot``: the device has an int8 dot-product built-in (key :data:`INT8_DOT_KEY`)."""
    extra = {"keys": [device, "opencl", "gpu", INT8_DOT_KEY]} if int8_dot else {}
    return lambda: {"kind": "opencl", "device": device, **extra, "host": host_cpu_target()}


TARGET_NAMES: Dict[str, Callable[[], Dict[str, object]]] = {
    "mali": _opencl("mali"),
    "mali-dot": _opencl("mali", int8_dot=True),  # Mali G76 and later: arm_dot_acc
    "adreno": _opencl("adreno"),
    "opencl": _opencl("mali"),
    "cuda": lambda: {"kind": "cuda", "host": host_cpu_target()},
    "llvm": host_cpu_target,
    "cpu": host_cpu_target,
    "x86": host_cpu_target,
    "aarch64": _aarch64,
    "arm": _aarch64,
}


#: Names of the form "<prefix>:<argument>" -> "module:function" returning the target dict for
#: the argument (imported on first use). "fpga:xc7z045" is the FPGA accelerator on that board.
TARGET_PREFIXES: Dict[str, str] = {
    "fpga": "tvm_rmsmp.fpga.target:fpga_target",
}


def _prefixed(name: str) -> Dict[str, object]:
    import importlib

    prefix, _, arg = name.partition(":")
    module, _, func = TARGET_PREFIXES[prefix].partition(":")
    if not arg:
        raise ValueError(f"target {name!r} needs an argument after {prefix + ':'!r}")
    return getattr(importlib.import_module(module), func)(arg)


def check_cpu(target: "tvm.target.Target") -> "tvm.target.Target":
    """Raise ValueError if an LLVM target (or a device target's LLVM host) names a CPU that
    LLVM does not know for its triple: LLVM would otherwise compile for a generic CPU silently."""
    import difflib

    from tvm.target import codegen

    parts = [target] + ([target.host] if target.host is not None else [])
    for part in parts:
        if part.kind.name != "llvm" or not part.attrs.get("mcpu"):
            continue
        mcpu = str(part.attrs["mcpu"])
        triple = str(part.attrs.get("mtriple") or codegen.llvm_get_system_triple())
        if codegen.llvm_is_valid_cpu(mcpu, triple):
            continue
        try:
            known = [str(c) for c in codegen.llvm_get_cpu_archlist(part)]
        except Exception:  # noqa: BLE001 - the list is a hint only
            known = []
        close = difflib.get_close_matches(mcpu, known, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        where = "" if part is target else f" (the host of the {target.kind.name} target)"
        raise ValueError(
            f"unknown CPU {mcpu!r}{where}: LLVM {codegen.llvm_version_major()} has no CPU of that name for "
            f"{triple}{hint} (tvm.target.codegen.llvm_get_cpu_archlist lists them)"
        )
    return target


def resolve_target(target: Union[str, dict, "tvm.target.Target"]) -> "tvm.target.Target":
    """The ``tvm.target.Target`` for a name, a TVM target dict or a Target, with its CPU
    (``mcpu``, the host's too) checked against LLVM's list (:func:`check_cpu`)."""
    return check_cpu(_resolve(target))


def _resolve(target: Union[str, dict, "tvm.target.Target"]) -> "tvm.target.Target":
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) and target.partition(":")[0] in TARGET_PREFIXES and ":" in target:
        return tvm.target.Target(_prefixed(target))
    if isinstance(target, str):
        if target not in TARGET_NAMES:
            raise ValueError(
                f"unknown target {target!r}; known names: {sorted(TARGET_NAMES)}, "
                f"{[p + ':<arg>' for p in TARGET_PREFIXES]}, or pass a TVM target dict"
            )
        return tvm.target.Target(TARGET_NAMES[target]())
    if isinstance(target, dict):
        try:
            return tvm.target.Target(target)
        except Exception as err:
            raise ValueError(f"invalid target dict {target!r}: {err}") from err
    raise TypeError(f"target must be a name, a dict or a tvm.target.Target, got {type(target).__name__}")
