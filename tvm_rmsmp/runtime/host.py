"""The machine this process runs on, as a TVM target."""

from __future__ import annotations

import os
from typing import Dict

__all__ = ["host_cpu_target"]


def host_cpu_target() -> Dict[str, object]:
    """The machine this runs on: LLVM with its CPU model, so the kernels use its vector ISA."""
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": os.cpu_count() or 1}
