"""From a (quantized) PyTorch model to a callable, timeable, exportable TVM module.

import (torch.export -> Relax) -> SparsifyRowGroups (LLVM, OpenCL, CUDA targets: pruned dense layers as
block-sparse ops), SparsifyConvs (LLVM targets: pruned convolutions as kernel-sparse ops) -> RewriteRowGroups
-> FoldRowPermutation -> PackFourBitRows
-> the row-group op contract's verifier -> tuned schedules (if any) -> the target's graph passes
(FuseDenseLayers, UseTargetKernels, from what its schedules offer) -> the target's row-group
schedules -> TVM's default Relax build for the target.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

import schedules
from relay_passes import FoldRowPermutation, FuseDenseLayers, PackFourBitRows, RewriteRowGroups, UseTargetKernels
from relay_passes import SparsifyConvs, SparsifyRowGroups

from ..nn.layers import RMSMPWarning, rmsmp_layers
from ..quant.progress import progress
from ..runtime.native_log import filtered_native_log
from ..runtime.library import ANY_BATCH, CompiledModel, OpenCLCompiledModel, as_numpy, check_output_structure, load
from .frontend import import_model, index_bounds
from .records import apply_tuning
from .targets import resolve_target
from relay_passes import contract

__all__ = ["compile", "load", "CompiledModel", "OpenCLCompiledModel", "lower", "merge_functions", "DYNAMIC_BATCH_KINDS"]


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


class KeywordInputs(torch.nn.Module):
    """``model(**dict(zip(names, args)))``: a model whose example inputs were given as a dict
    (keyword inputs: a tokenizer's output), exported with them as positional inputs in the
    dict's order. The compiled model keeps the names (calls take the same dict)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args)))


def keyword_inputs(model: torch.nn.Module, example_inputs) -> Tuple[torch.nn.Module, Sequence, Optional[List[str]]]:
    """``(model, positional example inputs, names or None)``: example inputs given as a mapping
    become positional inputs of a :class:`KeywordInputs` wrapper of ``model``."""
    if not isinstance(example_inputs, Mapping):
        return model, example_inputs, None
    bad = [k for k in example_inputs if not isinstance(k, str)]
    if bad or not example_inputs:
        raise TypeError(f"example_inputs as a dict maps input names (strings) to tensors, got keys {list(example_inputs)}")
    names = list(example_inputs)
    return KeywordInputs(model, names).eval(), tuple(example_inputs.values()), names


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
    model: torch.nn.Module, example_inputs: Sequence, target, *, schedule: bool = True, tuning: Optional[str] = None,
    dynamic_batch: bool = False,
) -> Tuple[tvm.IRModule, Dict[str, int]]:
    """The Relax module after the RMSMP passes and (``schedule``) the target's schedules,
    tuned ones from the ``tuning`` directory where it has them; not yet built.
    ``dynamic_batch``: dimension 0 of the inputs is one symbolic batch (the portable
    schedules; tuning and the kernels built for a number of rows apply to static shapes)."""
    target = resolve_target(target)
    model, example_inputs, _ = keyword_inputs(model, example_inputs)
    inputs = example_tensors(model, example_inputs)
    if not rmsmp_layers(model):
        warnings.warn("model has no RMSMP layer: compiling it in float", RMSMPWarning, stacklevel=3)
    mod = import_model(model, inputs, dynamic_batch=dynamic_batch)
    sparse = SparsifyRowGroups()  # pruned dense layers -> block-sparse ops (CPU and GPU kernels)
    sparse_conv = SparsifyConvs()  # pruned convolutions -> kernel-sparse ops (LLVM kernels only)
    if target.kind.name in SPARSE_KINDS and not dynamic_batch:
        # the any-batch function keeps dense row groups; its batch specialisations are static
        mod = sparse(mod)
        if target.kind.name == "llvm":
            mod = sparse_conv(mod)
    mod = RewriteRowGroups()(mod)
    fold = FoldRowPermutation()
    mod = fold(mod)
    pack = PackFourBitRows()
    mod = pack(mod)
    stats = dict(fold.last_stats, packed=pack.last_packed, sparse={**sparse.last_stats, **sparse_conv.last_stats})
    contract.verify(mod)  # what the schedules may rely on, checked before any of them runs
    if not schedule:
        return mod, stats
    if tuning is not None and not dynamic_batch:
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
                contract.SCHEME in attrs or contract.SCHEMES in attrs or contract.SPARSE_BLOCK in attrs
                or contract.SPARSE_KERNEL in attrs):
            continue
        kind = str(attrs.get(contract.CPU_KERNEL, "generic"))
        if contract.SP2_LOWERING in attrs and kind == "generic":
            kind += f" (sp2 {attrs['rmsmp.sp2_lowering']})"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


#: Target kinds whose schedules have block-sparse kernels (``contract.DENSE_BSR``): pruned dense
#: layers become block-sparse ops there (the FPGA model skips pruned weights in its own streams).
SPARSE_KINDS = ("llvm", "opencl", "cuda")

#: Target kinds whose compiled model is not a TVM build -> "module:function(mod, target, input_specs,
#: stats)" returning it (imported on first use). ``ext_dev`` is the FPGA accelerator ("fpga:<board>").
COMPILERS: Dict[str, str] = {
    "ext_dev": "tvm_rmsmp.fpga.runtime:compile_fpga",
}


def compile(model: torch.nn.Module, example_inputs: Sequence, target="llvm", *, tuning: Optional[str] = None,  # noqa: A001
            fast_math: bool = True, dynamic_batch: Union[bool, Sequence[int]] = False) -> "CompiledModel":
    """Compile ``model`` for ``target``; ``example_inputs`` fix the input shapes and dtypes:
    a tuple of positional inputs, or a dict of keyword inputs (``{"input_ids": ...,
    "attention_mask": ...}``, a tokenizer's output), whose order is then the compiled order.

    dynamic_batch: dimension 0 of every input is a batch of any size >= 1 (the other
    dimensions stay those of the examples), with functions specialised for batch 1 and the
    examples' batch; a sequence of batch sizes (``dynamic_batch=(8, 32)``) specialises those
    too. See :func:`compile_dynamic_batch`.

    tuning: a directory written by :func:`tvm_rmsmp.tune` for the same target; its best
    schedules replace the defaults (``exe.stats["tuned"]`` counts the kernels that had one).
    fast_math: on CPUs, the float operators between RMSMP layers (GELU, softmax, exp, tanh)
    use TVM's vectorizable approximations instead of libm (errors of the order of torch's own
    vectorized GELU); False keeps libm's results. The integer layers are exact either way.
    """
    target = resolve_target(target)
    model, example_inputs, names = keyword_inputs(model, example_inputs)
    example_inputs = example_tensors(model, example_inputs)
    if dynamic_batch is not False and dynamic_batch is not None:
        sizes = () if dynamic_batch is True else dynamic_batch
        if not isinstance(sizes, (tuple, list)) or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
            raise ValueError(f"dynamic_batch must be True, False or a sequence of batch sizes >= 1 to specialise, "
                             f"got {dynamic_batch!r}")
        return compile_dynamic_batch(model, example_inputs, target, tuning=tuning, fast_math=fast_math,
                                     specialise=sizes, names=names)
    bar = progress(desc=f"compile ({target.kind.name})", total=2, unit="step")
    bar.set_postfix_str("import, passes, schedules")
    mod, stats = lower(model, example_inputs, target, tuning=tuning)
    bar.update()
    bar.set_postfix_str("build")
    specs = [{"shape": list(x.shape), "dtype": str(x.numpy().dtype)} for x in example_inputs]
    for i, (spec, param) in enumerate(zip(specs, mod["main"].params)):
        # forward's parameter names (or the dict's keys): calls may pass inputs by name
        spec["name"] = names[i] if names is not None else str(param.name)
    for i, n in index_bounds(mod).items():
        specs[i]["index_bound"] = n  # embedding indices: checked at call time, as torch does
    if target.kind.name in ("opencl", *COMPILERS):
        bar.close()
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
    bar.update()
    bar.close()
    return CompiledModel(exe, target, specs, ir=mod, stats=stats, outputs=output_structure(model, example_inputs, mod))




#: Target kinds a dynamic-batch build supports: ``llvm`` (one library: a function for any batch
#: and functions specialised for batch 1 and the examples' batch), ``opencl`` (a graph per batch
#: size, batch 1 and the examples' batch compiled up front, others on first use), ``ext_dev``
#: (the FPGA accelerator: a program per batch size, as OpenCL), ``cuda`` (one library, as LLVM:
#: the GPU schedules over a symbolic number of rows, and static batch specialisations).
DYNAMIC_BATCH_KINDS = ("llvm", "opencl", "ext_dev", "cuda")


def _at_batch(inputs: Tuple[torch.Tensor, ...], batch: int) -> Tuple[torch.Tensor, ...]:
    """The example inputs at another batch size (their rows repeated or cut)."""
    return tuple(x[torch.arange(batch) % x.shape[0]] for x in inputs)


def _specialised_name(batch: int) -> str:
    return f"main_b{batch}"


def compile_dynamic_batch(model: torch.nn.Module, example_inputs: Tuple[torch.Tensor, ...], target: tvm.target.Target,
                          *, tuning: Optional[str] = None, fast_math: bool = True,
                          specialise: Sequence[int] = (), names: Optional[List[str]] = None) -> "CompiledModel":
    """A build for any batch: ``torch.export`` with dimension 0 of every input one symbolic
    batch (>= 1) gives a Relax ``main`` over that batch, scheduled with the portable
    schedules; the model is also compiled for batch 1 (the GEMV kernels), for the examples'
    batch and for the batches in ``specialise`` (their kernels, tuned ones from ``tuning``;
    each specialisation adds its compile time), and a call runs the function
    specialised for its batch where there is one (``exe.variants``, ``exe.last_function``,
    ``exe.stats["variants"]``). The input specs record dimension 0 as ``ANY_BATCH`` (-1).

    Targets: :data:`DYNAMIC_BATCH_KINDS`; any other kind (Vulkan, Metal, ROCm, C: no row-group
    schedules of ours were checked over a symbolic batch there) is refused with a ValueError:
    compile it once per batch size."""
    kind = target.kind.name
    if kind not in DYNAMIC_BATCH_KINDS:
        raise ValueError(
            f"dynamic_batch is not supported for target kind {kind!r} ({target.attrs.get('device', '') or kind}): "
            f"its row-group kernels were not checked over a symbolic batch; compile with dynamic_batch=False "
            f"once per batch size "
            f"(dynamic_batch supports {', '.join(DYNAMIC_BATCH_KINDS)})")
    if any(x.dim() == 0 for x in example_inputs):
        raise ValueError("dynamic_batch: every input needs a leading batch dimension; a scalar input has none")
    batch = int(example_inputs[0].shape[0])
    if any(int(x.shape[0]) != batch for x in example_inputs):
        raise ValueError(f"dynamic_batch: the inputs' leading dimensions differ "
                         f"({[int(x.shape[0]) for x in example_inputs]}); they must be one batch")
    mod_any, stats = lower(model, example_inputs, target, dynamic_batch=True, schedule=kind in ("llvm", "cuda"))
    if kind == "cuda":
        mod_any = _unfused_row_ops(mod_any)
    specs = [{"shape": [ANY_BATCH] + list(x.shape[1:]), "dtype": str(x.numpy().dtype)} for x in example_inputs]
    for i, (spec, param) in enumerate(zip(specs, mod_any["main"].params)):
        spec["name"] = names[i] if names is not None else str(param.name)  # calls may pass inputs by name
    for i, n in index_bounds(mod_any).items():
        specs[i]["index_bound"] = n
    sizes = sorted({1, batch, *specialise})
    specialised = {b: lower(model, _at_batch(example_inputs, b), target, tuning=tuning) for b in sizes}
    stats = dict(stats, dynamic_batch=True, variants={
        "any": {"function": "main", "cpu_kernels": stats.get("cpu_kernels", {})},
        **{str(b): {"function": _specialised_name(b), **st} for b, (_, st) in specialised.items()}})
    if kind == "opencl":
        def at_batch(n: int) -> tvm.IRModule:
            return lower(model, _at_batch(example_inputs, n), target, tuning=tuning)[0]

        return OpenCLCompiledModel(mod_any, target, specs, stats=stats, specialise=at_batch,
                                   variants={b: m for b, (m, _) in specialised.items()})
    if kind in COMPILERS:  # the FPGA accelerator: a program per batch size, as OpenCL's graphs
        import importlib

        def static_specs(n: int) -> List[Dict]:
            return [dict(spec, shape=[n] + spec["shape"][1:]) for spec in specs]

        def program_at(n: int):
            return lower(model, _at_batch(example_inputs, n), target, tuning=tuning)[0], static_specs(n)

        module, _, func = COMPILERS[kind].partition(":")
        return getattr(importlib.import_module(module), func)(
            mod_any, target, specs, stats, specialise=program_at, example_batch=batch,
            variants={b: (m, static_specs(b)) for b, (m, _) in specialised.items()})
    merged = merge_functions({"main": mod_any, **{_specialised_name(b): m for b, (m, _) in specialised.items()}})
    pipeline = schedules.build_pipeline(target, fast_math=fast_math)
    stats["fast_math"] = bool(fast_math and pipeline is not None)
    with filtered_native_log():
        exe = tvm.compile(merged, target=target, **({"relax_pipeline": pipeline} if pipeline is not None else {}))
    return CompiledModel(exe, target, specs, ir=merged, stats=stats,
                         outputs=output_structure(model, example_inputs, mod_any),
                         variants={b: _specialised_name(b) for b in sizes})


def _unfused_row_ops(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with the RMSMP ops' PrimFuncs marked opaque to operator fusion (``op_pattern``
    kOpaque, which ``AnnotateTIROpPattern`` keeps). Their leading dimension is their own var;
    TVM 0.27's FuseTIR cannot map it to a producer's extent that is an expression of the batch
    (``batch * 6`` rows of a transformer: "Inconsistent buffers ... mapped to the same relax
    var"), as TVM's CUDA pipeline fuses a per-token epilogue with the concatenation before it.
    Used for the any-batch function of a CUDA build (its static specialisations keep fusion)."""
    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and contract.rmsmp_attr(func, contract.OP) is not None:
            func = func.with_attr("op_pattern", 8)
        out[gv] = func
    return tvm.IRModule(out, attrs=mod.attrs, global_infos=mod.global_infos)


@mutator
class _Renamer(PyExprMutator):
    def __init__(self, names: Dict[tvm.ir.GlobalVar, tvm.ir.GlobalVar]):
        super().__init__()
        self.names = names

    def visit_global_var_(self, gv):
        return self.names.get(gv, gv)


def merge_functions(mods: Dict[str, tvm.IRModule]) -> tvm.IRModule:
    """One module with each module's ``main`` under its key (``{"main": m0, "main_b1": m1}``),
    with the functions each calls (renamed where names meet; the same function is kept once)."""
    bb = relax.BlockBuilder()
    for name, mod in mods.items():
        names: Dict[tvm.ir.GlobalVar, tvm.ir.GlobalVar] = {}
        suffix = "" if name == "main" else f"_{name[len('main_'):] if name.startswith('main_') else name}"
        for gv, func in mod.functions.items():
            if not isinstance(func, relax.Function):
                names[gv] = bb.add_func(func, gv.name_hint + suffix)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                new_name = name if gv.name_hint == "main" else gv.name_hint + suffix
                func = _Renamer(names).visit_expr(func).with_attr("global_symbol", new_name)
                added = bb.add_func(func, new_name)
                if added.name_hint != new_name:
                    raise ValueError(f"merge_functions: two Relax functions named {new_name!r}")
    first = next(iter(mods.values()))
    return tvm.IRModule(dict(bb.get().functions.items()), attrs=first.attrs, global_infos=first.global_infos)
