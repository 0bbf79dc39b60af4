"""Residual adds, max-pooling and global average pooling in the integer-only mode
(``RMSMPConfig(requant="fixed_point")``).

A model's ``a + b`` whose two inputs are code tensors at known scales (outputs of fixed-point
layers, through ReLU / max-pooling / flatten, or of another such add) becomes an
:class:`RMSMPAdd` module calling ``rmsmp::qadd_requant`` (:mod:`tvm_rmsmp.nn.ops`): the sum of
the two codes times 16-bit multipliers and one rounding shift, clamped to the output codes
(:func:`tvm_rmsmp.quant.requant.requantize_add`). :func:`insert_int_ops` finds them in a torch.fx
trace and returns a ``torch.fx.GraphModule`` with the modules in place (under
``rmsmp_ops.<fx node name>``); :func:`tvm_rmsmp.nn.layers.requant_model` chooses their scales.
An add stays a float add until :meth:`RMSMPAdd.set_requant` is called.

Global average pooling of codes (``F.adaptive_avg_pool2d(x, 1)`` or ``nn.AdaptiveAvgPool2d(1)``
on a code tensor) likewise becomes an :class:`RMSMPAvgPool` calling ``rmsmp::qavgpool_requant``:
the sum of each channel's codes, times a 16-bit multiplier and a rounding shift to the output
scale (``s_in / (H W s_out)``, :func:`tvm_rmsmp.quant.requant.quantize_multiplier`;
:func:`~tvm_rmsmp.quant.requant.requantize` on the sums), usually the classifier's input scale.
Max-pooling of codes (``nn.MaxPool2d`` / ``F.max_pool2d``, dilation 1, floor mode) becomes an
:class:`RMSMPMaxPool` (``rmsmp::qmaxpool2d``, exactly ``F.max_pool2d``: the codes pass through
it unchanged), only so that it reaches the FPGA executor as one op. All three kinds live under
``rmsmp_ops.<fx node name>``, in graph order.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..quant.requant import add_multipliers, quantize_multiplier
from . import ops  # noqa: F401  (registers rmsmp::qadd_requant)

__all__ = ["RMSMPAdd", "RMSMPAvgPool", "RMSMPMaxPool", "insert_int_ops", "rmsmp_adds", "rmsmp_pools", "rmsmp_int_ops",
           "rmsmp_maxpools", "ADD_FUNCTIONS"]

#: fx call targets of a plain two-tensor add.
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}

Source = Tuple[str, str]  # ("layer" | "add" | "pool", name)


def _record(module, y: torch.Tensor) -> None:
    """Keep a strided sample of ``y`` for calibration: at most ``module.quota`` per call (set to
    a share of ``MAX_SAMPLES`` per calibration batch) and ``MAX_SAMPLES`` over all calls."""
    flat = y.detach().reshape(-1).to(torch.float32).cpu().numpy()
    left = min(getattr(module, "quota", module.MAX_SAMPLES), module.MAX_SAMPLES - sum(s.size for s in module.recording))
    if left > 0:
        module.recording.append(flat[:: max(1, flat.size // left)][:left].copy())


class RMSMPAdd(nn.Module):
    """``a + b`` of two code tensors: a float add (recording a sample of its outputs while
    ``recording`` is set) until :meth:`set_requant`, then ``rmsmp::qadd_requant``.

    ``name``: where the add is (the module path of the ``forward`` it was in, else of the layer
    making its first input, plus ``.add``; ``_1``, ... for further adds there);
    ``sources``: what produces ``a`` and ``b`` (``("layer", layer name)``, ``("add", add name)`` or
    ``("pool", pooling name)``)."""

    #: most output samples kept for calibration
    MAX_SAMPLES = 1 << 18

    def __init__(self, name: str, sources: Tuple[Source, Source]):
        super().__init__()
        self.op_name = name
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
            raise ValueError(f"residual add {self.op_name!r}: {err}") from err
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
                                                r["out_scale"], r["qmin"], r["qmax"], self.op_name)
        y = a + b
        if self.recording is not None:
            self.shapes_differ |= tuple(a.shape) != tuple(b.shape)
            _record(self, y)
        return y

    def extra_repr(self) -> str:
        if self.requant is None:
            return f"{self.op_name}: float"
        r = self.requant
        return f"{self.op_name}: ({r['mult_a']} qa + {r['mult_b']} qb) >> {r['shift']} -> [{r['qmin']}, {r['qmax']}]"


class RMSMPAvgPool(nn.Module):
    """Global average pooling of a code tensor ``[N, C, H, W]`` to ``[N, C, 1, 1]``: a float
    ``adaptive_avg_pool2d(x, 1)`` (recording its outputs while ``recording`` is set) until
    :meth:`set_requant`, then ``rmsmp::qavgpool_requant``."""

    MAX_SAMPLES = 1 << 18

    def __init__(self, name: str, sources: Tuple[Source]):
        super().__init__()
        self.op_name = name
        self.sources = tuple(sources)
        self.requant: Optional[dict] = None
        self.recording: Optional[List[np.ndarray]] = None
        self.shapes_differ = False  # not a 4-D input
        self.hw: Optional[int] = None

    def set_requant(self, scale_in: float, out_act) -> None:
        """Switch to the integer pooling of codes at ``scale_in`` (float32 value) into ``out_act``'s
        codes; needs the input's ``H * W`` (seen in calibration); ``None``: back to float."""
        if out_act is None:
            self.requant = None
            return
        out_scale = float(np.float32(out_act.scale))
        try:
            m, s = quantize_multiplier(float(np.float32(scale_in)) / (self.hw * out_scale))
        except ValueError as err:
            raise ValueError(f"average pooling {self.op_name!r}: {err}") from err
        self.requant = {"scale_in": float(np.float32(scale_in)), "mult": m, "shift": s, "out_scale": out_scale,
                        "qmin": int(out_act.qmin), "qmax": int(out_act.qmax)}

    @property
    def out_act_scale(self) -> Optional[float]:
        return None if self.requant is None else self.requant["out_scale"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.requant
        if r is not None:
            return torch.ops.rmsmp.qavgpool_requant(x, r["scale_in"], r["mult"], r["shift"], r["out_scale"], r["qmin"],
                                                    r["qmax"], self.op_name)
        y = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        if self.recording is not None:
            self.shapes_differ |= x.dim() != 4
            hw = int(x.shape[-1] * x.shape[-2]) if x.dim() == 4 else None
            self.shapes_differ |= self.hw is not None and hw != self.hw
            self.hw = hw
            _record(self, y)
        return y

    def extra_repr(self) -> str:
        if self.requant is None:
            return f"{self.op_name}: float"
        r = self.requant
        return f"{self.op_name}: (sum * {r['mult']}) >> {r['shift']} -> [{r['qmin']}, {r['qmax']}]"


class RMSMPMaxPool(nn.Module):
    """``F.max_pool2d`` of a code tensor (square or not; dilation 1, floor mode) as ``rmsmp::qmaxpool2d``."""

    def __init__(self, name: str, kernel, stride, padding, sources: Tuple[Source] = ()):
        super().__init__()
        self.op_name = name
        self.sources = tuple(sources)
        #: the input codes' scale (float32 value), once known (``attach_requant``): the FPGA
        #: executor hands the accelerator the codes
        self.scale_in: Optional[float] = None
        pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]  # noqa: E731
        self.kernel, self.stride, self.padding = pair(kernel), pair(stride if stride else kernel), pair(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rmsmp.qmaxpool2d(x, self.kernel, self.stride, self.padding, self.op_name)

    def extra_repr(self) -> str:
        return f"{self.op_name}: kernel {self.kernel}, stride {self.stride}, padding {self.padding}"


def rmsmp_maxpools(model: nn.Module) -> Dict[str, RMSMPMaxPool]:
    """``{name: module}`` of the max-poolings of codes, in graph order."""
    return {m.op_name: m for m in model.modules() if isinstance(m, RMSMPMaxPool)}


def rmsmp_int_ops(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of the residual adds and poolings, in graph order."""
    return {m.op_name: m for m in model.modules() if isinstance(m, (RMSMPAdd, RMSMPAvgPool))}


def rmsmp_adds(model: nn.Module) -> Dict[str, RMSMPAdd]:
    """``{add name: module}`` in the order the model's modules list them (the fx graph's)."""
    return {m.op_name: m for m in model.modules() if isinstance(m, RMSMPAdd)}


def rmsmp_pools(model: nn.Module) -> Dict[str, RMSMPAvgPool]:
    """``{pooling name: module}`` in graph order."""
    return {m.op_name: m for m in model.modules() if isinstance(m, RMSMPAvgPool)}


def _where(node) -> str:
    """The module path whose ``forward`` holds ``node`` (from the fx trace), or ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    for value in reversed(list(stack.values())):
        path = value[0] if isinstance(value, tuple) else value
        if isinstance(path, str):
            return path
    return ""


def _is_global_pool(node, model: nn.Module) -> bool:
    """``adaptive_avg_pool2d(x, 1)`` (function or module) on one input."""
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        return isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1), [1, 1])
    if node.op != "call_function" or node.target is not torch.nn.functional.adaptive_avg_pool2d:
        return False
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    return len(node.args) >= 1 and size in (1, (1, 1), [1, 1])


def _max_pool_args(node, model: nn.Module):
    """``(kernel, stride, padding)`` of a max-pooling the accelerator can run (dilation 1, floor
    mode, no indices), or None."""
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        if type(mod) is not nn.MaxPool2d or mod.dilation not in (1, (1, 1)) or mod.ceil_mode or mod.return_indices:
            return None
        return mod.kernel_size, mod.stride, mod.padding
    if node.op != "call_function" or node.target is not torch.nn.functional.max_pool2d:
        return None
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    args = dict(zip(names, node.args), **node.kwargs)
    if args.get("dilation", 1) not in (1, (1, 1)) or args.get("ceil_mode") or args.get("return_indices"):
        return None
    return args["kernel_size"], args.get("stride") or args["kernel_size"], args.get("padding", 0)


def insert_int_ops(model: nn.Module, graph: torch.fx.Graph, layer_name: Callable[[object], Optional[str]],
                is_pass: Callable[[object], bool]) -> Optional[torch.fx.GraphModule]:
    """A GraphModule of ``model`` (traced as ``graph``) with every add of two code tensors as an
    :class:`RMSMPAdd` and every global average pooling of a code tensor as an
    :class:`RMSMPAvgPool`, or None when there is neither. ``layer_name(node)``: the RMSMP
    layer's name if the node calls one (its output: codes); ``is_pass(node)``: the node passes
    its first input's codes on unchanged (ReLU, max-pooling, flatten, ...)."""
    made: Dict[object, Source] = {}
    names: Dict[str, int] = {}
    found = []

    def source(node) -> Optional[Source]:
        while isinstance(node, torch.fx.Node):
            name = layer_name(node)
            if name is not None:
                return ("layer", name)
            if node in made and made[node][0] != "maxpool":
                return made[node]
            if not is_pass(node) or not node.args:
                return None
            node = node.args[0]
        return None

    for node in graph.nodes:
        if node.op == "call_function" and node.target in ADD_FUNCTIONS and not node.kwargs and len(node.args) == 2:
            kind, args = "add", tuple(node.args)
        elif _is_global_pool(node, model):
            kind, args = "pool", (node.args[0],)
        elif _max_pool_args(node, model) is not None and node.args:
            kind, args = "maxpool", (node.args[0],)
        else:
            continue
        srcs = tuple(source(a) for a in args)
        if None in srcs:
            continue
        # where the op is: the module whose forward holds it, or (a model fx already flattened,
        # e.g. by BN folding) the module holding the layer that makes its first input
        where = _where(node) or (srcs[0][1].rpartition(".")[0] if srcs[0][0] == "layer" else "")
        base = (f"{where}." if where else "") + {"add": "add", "pool": "avgpool", "maxpool": "maxpool"}[kind]
        if node.op == "call_module":  # a pooling module: its own path
            base = str(node.target)
        names[base] = names.get(base, 0) + 1
        made[node] = (kind, base if names[base] == 1 else f"{base}_{names[base] - 1}")
        found.append((node, srcs, args))
    if not found:
        return None
    container = nn.Module()
    for node, srcs, _ in found:
        kind, name = made[node]
        if kind == "maxpool":
            op = RMSMPMaxPool(name, *_max_pool_args(node, model), sources=srcs)
        else:
            op = RMSMPAdd(name, srcs) if kind == "add" else RMSMPAvgPool(name, srcs)
        container.add_module(node.name, op)
        # the node's arguments now (an earlier replacement may have rewritten them)
        args = tuple(node.args) if kind == "add" else (node.args[0],)
        with graph.inserting_after(node):
            new = graph.call_module(f"rmsmp_ops.{node.name}", args)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    model.add_module("rmsmp_ops", container)  # GraphModule copies the submodules the graph calls
    try:
        gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    finally:
        delattr(model, "rmsmp_ops")
    return gm
