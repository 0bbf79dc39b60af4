"""Helpers shared by the executors that replay a lowered Relax ``main`` op by op in Python
(the OpenCL executor and the FPGA simulator's executor)."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import tvm
from tvm import relax

__all__ = ["shape_dtype", "bind_alias", "unsupported_binding"]


def shape_dtype(ty) -> Tuple[List[int], str]:
    """Static shape and dtype of a Relax tensor type."""
    return [int(d) for d in ty.shape], str(ty.dtype)


def bind_alias(var, value, alias: Dict, ref: Callable) -> bool:
    """Record ``var = value`` when ``value`` only renames, packs or unpacks other values
    (a Var, a Tuple, a TupleGetItem); returns False for anything that computes."""
    if isinstance(value, tvm.ir.Var):
        alias[var] = ref(value)
    elif isinstance(value, relax.Tuple):
        alias[var] = tuple(ref(f) for f in value.fields)
    elif isinstance(value, relax.TupleGetItem):
        alias[var] = alias[value.tuple_value][value.index]
    else:
        return False
    return True


def unsupported_binding(executor: str, var, value) -> NotImplementedError:
    what = value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else type(value).__name__
    return NotImplementedError(f"{executor}: unsupported binding {var.name} = {what}")
