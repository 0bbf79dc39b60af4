"""From a (quantized) PyTorch model to a callable, timeable, exportable TVM module.

import (torch.export -> Relax) -> SparsifyRowGroups (LLVM targets: pruned dense layers as block-sparse
ops) -> RewriteRowGroups -> FoldRowPermutation -> PackFourBitRows
-> the row-group op contract's verifier -> tuned schedules (if any) -> the target's graph passes
(FuseDenseLayers, UseTargetKernels, from what its schedules offer) -> the target's row-group
schedules -> TVM's default Relax build for the target.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import tvm

import schedules
from relay_passes import FoldRowPermutation, FuseDenseLayers, PackFourBitRows, RewriteRowGroups, UseTargetKernels
from relay_passes import SparsifyRowGroups

from ..nn.layers import RMSMPWarning, rmsmp_layers
from ..runtime.native_log import filtered_native_log
from ..runtime.library import CompiledModel, OpenCLCompiledModel, as_numpy, check_output_structure, load
from .frontend import import_model, index_bounds
from .records import apply_tuning
from .targets import resolve_target
from relay_passes import contract

__all__ = ["compile", "load", "CompiledModel", "OpenCLCompiledModel", "lower"]


def example_tensors(model: torch.nn.Module, example_inputs: Sequence) -> Tuple[torch.Tensor, ...]:
    """The example inputs as torch tensors, checked: no zero-size dimension; float inputs in
    the model's float dtype (a float64 array for a float32 model is cast, as calls are)."""
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of input tensors, e.g. (x,)")
    floats = [p.dtype for p in list(model.parameters()) + list(model.buffers()) if p.dtype.is_floating_point]
    dtype = floats[0] if floats else torch.float32
    out = []
    for i, x in enumerate(example_inputs):
        t = torch.from_numpy(np.ascontiguousarray(as_numpy(x, f"example_inputs[{i}]")))
        if 0 in t.shape:
            raise ValueError(f"example_inputs[{i}] has shape {list(t.shape)}: every dimension must be at least 1 "
                             "(the compiled model's shapes are those of the example inputs)")
        out.append(t.to(dtype) if t.dtype.is_floating_point and t.dtype != dtype else t)
    return tuple(out)


def _structure(value):
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, dict):
        return {"dict": [[str(k), _structure(v)] for k, v in value.items()]}
    if isinstance(value, (tuple, list)):
        return {"tuple": [_structure(v) for v in value]}
    raise TypeError(type(value).__name__)


def _has_dict(spec) -> bool:
    return isinstance(spec, dict) and ("dict" in spec or any(_has_dict(v) for v in spec["tuple"]))


def _relax_leaves(ty) -> int:
    fields = getattr(ty, "fields", None)
    return 1 if fields is None else sum(_relax_leaves(f) for f in fields)


def output_structure(model: torch.nn.Module, example_inputs: Sequence, mod: tvm.IRModule):
    """The structure of the model's result where it has a dict (``{"logits": ..., "hidden": ...}``),
    for the compiled model to return the same keys; None otherwise (an array, or a tuple)."""
    with torch.no_grad():
        try:
            spec = _structure(model(*example_inputs))
        except TypeError:  # a result with something other than tensors: returned as a tuple
            return None
    if not _has_dict(spec):
        return None
    leaves = check_output_structure(spec)
    return spec if leaves == _relax_leaves(mod["main"].ret_ty) else None


def lower(
    model: torch.nn.Module, example_inputs: Sequence, target, *, schedule: bool = True, tuning: Optional[str] = None
) -> Tuple[tvm.IRModule, Dict[str, int]]:
    """The Relax module after the RMSMP passes and (``schedule``) the target's schedules,
    tuned ones from the ``tuning`` directory where it has them; not yet built."""
    target = resolve_target(target)
    inputs = example_tensors(model, example_inputs)
    if not rmsmp_layers(model):
        warnings.warn("model has no RMSMP layer: compiling it in float", RMSMPWarning, stacklevel=3)
    mod = import_model(model, inputs)
    sparse = SparsifyRowGroups()  # pruned dense layers -> block-sparse ops (LLVM kernels only)
    if target.kind.name == "llvm":
        mod = sparse(mod)
    mod = RewriteRowGroups()(mod)
    fold = FoldRowPermutation()
    mod = fold(mod)
    pack = PackFourBitRows()
    mod = pack(mod)
    stats = dict(fold.last_stats, packed=pack.last_packed, sparse=sparse.last_stats)
    contract.verify(mod)  # what the schedules may rely on, checked before any of them runs
    if not schedule:
        return mod, stats
    if tuning is not None:
        mod, used = apply_tuning(mod, target, tuning)
        stats["tuned"] = sum(used.values())
    mod = apply_target_passes(mod, target)
    mod = schedules.apply_rules(mod, target)
    stats["cpu_kernels"] = kernel_kinds(mod)
    return mod, stats


def target_passes(target: tvm.target.Target) -> List[tvm.transform.Pass]:
    """The graph passes that put ``target``'s own kernels in place, from what its schedules
    offer (``schedules.graph_kernels``): whole dense layers in one kernel, then row groups with
    constant weights as the target's kernels with their weights laid out at compile time."""
    layer_kernels, constant_kernel = schedules.graph_kernels(target)
    passes: List[tvm.transform.Pass] = []
    if layer_kernels is not None:
        passes.append(FuseDenseLayers(layer_kernels))
    if constant_kernel is not None:
        passes.append(UseTargetKernels(constant_kernel))
    return passes


def apply_target_passes(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` after :func:`target_passes` (a new module; ``mod`` itself is left as it is)."""
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)
    for p in target_passes(target):
        mod = p(mod)
    return mod


def kernel_kinds(mod: tvm.IRModule) -> Dict[str, int]:
    """How many row-group kernels of each kind a scheduled module has: ``rmsmp.cpu_kernel``
    (an intrinsic kernel, e.g. ``x86-avx512vnni-table-decode``, or ``x86-avx512vnni-layer`` /
    ``x86-avx512vnni-gemv`` for a whole dense layer's row groups in one kernel, from 8 activation
    rows on / at one) or the generic schedule,
    with the SP2 lowering of packed SP2 groups (``shift`` or ``decode``)."""
    kinds: Dict[str, int] = {}
    for _, func in mod.functions.items():
        attrs = getattr(func, "attrs", None)
        if not isinstance(func, tvm.tirx.PrimFunc) or attrs is None or not (
                contract.SCHEME in attrs or contract.SCHEMES in attrs or contract.SPARSE_BLOCK in attrs):
            continue
        kind = str(attrs.get(contract.CPU_KERNEL, "generic"))
        if contract.SP2_LOWERING in attrs and kind == "generic":
            kind += f" (sp2 {attrs['rmsmp.sp2_lowering']})"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


#: Target kinds whose compiled model is not a TVM build -> "module:function(mod, target, input_specs,
#: stats)" returning it (imported on first use). ``ext_dev`` is the FPGA accelerator ("fpga:<board>").
COMPILERS: Dict[str, str] = {
    "ext_dev": "tvm_rmsmp.fpga.runtime:compile_fpga",
}


def compile(model: torch.nn.Module, example_inputs: Sequence, target="llvm", *, tuning: Optional[str] = None,  # noqa: A001
            fast_math: bool = True) -> "CompiledModel":
    """Compile ``model`` for ``target``; ``example_inputs`` fix the input shapes and dtypes.

    tuning: a directory written by :func:`tvm_rmsmp.tune` for the same target; its best
    schedules replace the defaults (``exe.stats["tuned"]`` counts the kernels that had one).
    fast_math: on CPUs, the float operators between RMSMP layers (GELU, softmax, exp, tanh)
    use TVM's vectorizable approximations instead of libm (errors of the order of torch's own
    vectorized GELU); False keeps libm's results. The integer layers are exact either way.
    """
    target = resolve_target(target)
    example_inputs = example_tensors(model, example_inputs)
    mod, stats = lower(model, example_inputs, target, tuning=tuning)
    specs = [{"shape": list(x.shape), "dtype": str(x.numpy().dtype)} for x in example_inputs]
    for i, n in index_bounds(mod).items():
        specs[i]["index_bound"] = n  # embedding indices: checked at call time, as torch does
    if target.kind.name == "opencl":
        return OpenCLCompiledModel(mod, target, specs, stats=stats)
    if target.kind.name in COMPILERS:
        import importlib

        module, _, func = COMPILERS[target.kind.name].partition(":")
        return getattr(importlib.import_module(module), func)(mod, target, specs, stats)
    pipeline = schedules.build_pipeline(target, fast_math=fast_math)
    stats["fast_math"] = bool(fast_math and pipeline is not None)
    with filtered_native_log():
        exe = tvm.compile(mod, target=target, **({"relax_pipeline": pipeline} if pipeline is not None else {}))
    return CompiledModel(exe, target, specs, ir=mod, stats=stats, outputs=output_structure(model, example_inputs, mod))


