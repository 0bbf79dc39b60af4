"""Small IR queries shared by the passes."""

from __future__ import annotations

from typing import Optional

import numpy as np
import tvm


def callee(mod: tvm.IRModule, call) -> Optional[tvm.tirx.PrimFunc]:
    """The PrimFunc a ``relax.call_tir`` calls (None for any other call)."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.call_tir":
        return None
    gv = call.args[0]
    func = mod[gv] if gv in mod.functions else None
    return func if isinstance(func, tvm.tirx.PrimFunc) else None


def rmsmp_attr(func, key: str) -> Optional[str]:
    """A string attribute of an RMSMP PrimFunc (None when absent)."""
    if func is None or func.attrs is None or key not in func.attrs:
        return None
    return str(func.attrs[key])


def const_value(expr) -> Optional[np.ndarray]:
    """The array of a Relax constant (None for any other expression)."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def op_name(expr) -> str:
    """The operator name of a Relax call (``"relax.concat"``; empty for anything else)."""
    op = getattr(expr, "op", None)
    return op.name if isinstance(op, tvm.ir.Op) else ""
