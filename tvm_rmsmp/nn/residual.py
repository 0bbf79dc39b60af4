"""Residual adds in the integer-only mode (``RMSMPConfig(requant="fixed_point")``).

A model's ``a + b`` whose two inputs are code tensors at known scales (outputs of fixed-point
layers, through ReLU / max-pooling / flatten, or of another such add) becomes an
:class:`RMSMPAdd` module calling ``rmsmp::qadd_requant`` (:mod:`tvm_rmsmp.nn.ops`): the sum of
the two codes times 16-bit multipliers and one rounding shift, clamped to the output codes
(:func:`tvm_rmsmp.quant.requant.requantize_add`). :func:`insert_adds` finds them in a torch.fx
trace and returns a ``torch.fx.GraphModule`` with the modules in place (under
``rmsmp_adds.<fx node name>``); :func:`tvm_rmsmp.nn.layers.requant_model` chooses their scales.
An add stays a float add until :meth:`RMSMPAdd.set_requant` is called.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..quant.requant import add_multipliers
from . import ops  # noqa: F401  (registers rmsmp::qadd_requant)

__all__ = ["RMSMPAdd", "insert_adds", "rmsmp_adds", "ADD_FUNCTIONS"]

#: fx call targets of a plain two-tensor add.
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}

Source = Tuple[str, str]  # ("layer" | "add", name)


class RMSMPAdd(nn.Module):
    """``a + b`` of two code tensors: a float add (recording a sample of its outputs while
    ``recording`` is set) until :meth:`set_requant`, then ``rmsmp::qadd_requant``.

    ``name``: where the add is (the module path of the ``forward`` it was in, else of the layer
    making its first input, plus ``.add``; ``_1``, ... for further adds there);
    ``sources``: what produces ``a`` and ``b`` (``("layer", layer name)`` or ``("add", add name)``)."""

    rmsmp_residual_add = True
    #: most output samples kept for calibration
    MAX_SAMPLES = 1 << 18

    def __init__(self, name: str, sources: Tuple[Source, Source]):
        super().__init__()
        self.add_name = name
        self.sources = tuple(sources)
        self.requant: Optional[dict] = None
        self.recording: Optional[List[np.ndarray]] = None
        self.shapes_differ = False

    def set_requant(self, scale_a: float, scale_b: float, out_act) -> None:
        """Switch to the integer add: inputs are float views of codes at ``scale_a`` / ``scale_b``
        (float32 values), the output the codes of ``out_act`` (an ``ActQuant``, symmetric or
        unsigned per tensor); ``None`` switches back to the float add."""
        if out_act is None:
            self.requant = None
            return
        out_scale = float(np.float32(out_act.scale))
        try:
            ma, mb, shift = add_multipliers(scale_a, scale_b, out_scale)
        except ValueError as err:
            raise ValueError(f"residual add {self.add_name!r}: {err}") from err
        self.requant = {"scale_a": float(np.float32(scale_a)), "scale_b": float(np.float32(scale_b)),
                        "mult_a": ma, "mult_b": mb, "shift": shift, "out_scale": out_scale,
                        "qmin": int(out_act.qmin), "qmax": int(out_act.qmax)}

    @property
    def out_act_scale(self) -> Optional[float]:
        return None if self.requant is None else self.requant["out_scale"]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r = self.requant
        if r is not None:
            return torch.ops.rmsmp.qadd_requant(a, b, r["scale_a"], r["scale_b"], r["mult_a"], r["mult_b"], r["shift"],
                                                r["out_scale"], r["qmin"], r["qmax"], self.add_name)
        y = a + b
        if self.recording is not None:
            self.shapes_differ |= tuple(a.shape) != tuple(b.shape)
            flat = y.detach().reshape(-1).to(torch.float32).cpu().numpy()
            left = self.MAX_SAMPLES - sum(s.size for s in self.recording)
            if left > 0:
                self.recording.append(flat[:: max(1, flat.size // left)][:left].copy())
        return y

    def extra_repr(self) -> str:
        if self.requant is None:
            return f"{self.add_name}: float"
        r = self.requant
        return f"{self.add_name}: ({r['mult_a']} qa + {r['mult_b']} qb) >> {r['shift']} -> [{r['qmin']}, {r['qmax']}]"


def rmsmp_adds(model: nn.Module) -> Dict[str, RMSMPAdd]:
    """``{add name: module}`` in the order the model's modules list them (the fx graph's)."""
    return {m.add_name: m for m in model.modules() if isinstance(m, RMSMPAdd)}


def _where(node) -> str:
    """The module path whose ``forward`` holds ``node`` (from the fx trace), or ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    for value in reversed(list(stack.values())):
        path = value[0] if isinstance(value, tuple) else value
        if isinstance(path, str):
            return path
    return ""


def insert_adds(model: nn.Module, graph: torch.fx.Graph, layer_name: Callable[[object], Optional[str]],
                is_pass: Callable[[object], bool]) -> Optional[torch.fx.GraphModule]:
    """A GraphModule of ``model`` (traced as ``graph``) with every add of two code tensors as an
    :class:`RMSMPAdd`, or None when there is none. ``layer_name(node)``: the RMSMP layer's name
    if the node calls one (its output: codes); ``is_pass(node)``: the node passes its first
    input's codes on unchanged (ReLU, max-pooling, flatten, ...)."""
    made: Dict[object, str] = {}
    names: Dict[str, int] = {}
    found = []

    def source(node) -> Optional[Source]:
        while isinstance(node, torch.fx.Node):
            name = layer_name(node)
            if name is not None:
                return ("layer", name)
            if node in made:
                return ("add", made[node])
            if not is_pass(node) or not node.args:
                return None
            node = node.args[0]
        return None

    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ADD_FUNCTIONS or node.kwargs or len(node.args) != 2:
            continue
        srcs = tuple(source(a) for a in node.args)
        if None in srcs:
            continue
        # where the add is: the module whose forward holds it, or (a model fx already flattened,
        # e.g. by BN folding) the module holding the layer that makes its first input
        where = _where(node) or (srcs[0][1].rpartition(".")[0] if srcs[0][0] == "layer" else "")
        base = f"{where}.add" if where else "add"
        names[base] = names.get(base, 0) + 1
        made[node] = base if names[base] == 1 else f"{base}_{names[base] - 1}"
        found.append((node, srcs))
    if not found:
        return None
    container = nn.Module()
    for node, srcs in found:
        container.add_module(node.name, RMSMPAdd(made[node], srcs))
        with graph.inserting_after(node):
            new = graph.call_module(f"rmsmp_adds.{node.name}", tuple(node.args))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    model.add_module("rmsmp_adds", container)  # GraphModule copies the submodules the graph calls
    try:
        gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    finally:
        delattr(model, "rmsmp_adds")
    return gm
