"""Which schedule rules realize the row-group ops on which target kind.

A target module in this package registers its rules once::

    register_target("llvm", [RowGroupDense(), RowGroupConv2d()])

and the pipeline asks :func:`rules_for` with the compile target. Adding a target is a new
module here plus its import in ``schedules/__init__.py``; nothing outside ``schedules/`` changes.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tvm
from tvm import s_tir
from tvm.s_tir import dlight as dl
from relay_passes import contract
from relay_passes.contract import ConstantKernel, LayerKernels

__all__ = ["register_target", "rules_for", "registered_kinds", "apply_rules", "graph_kernels", "space_for", "fixed_kernel",
           "OpScheduleRule", "build_pipeline", "INT8_DOT_KEY", "target_cores"]

#: Target key that declares an OpenCL device with an int8 dot-product built-in (target name
#: ``"mali-dot"``: Mali G76 and later); the GPU schedules read it.
INT8_DOT_KEY = "int8_dot"


class OpScheduleRule(dl.ScheduleRule):
    """A dlight-style rule: applies ``schedule(sch, target)`` to PrimFuncs whose ``rmsmp.op``
    is ``op`` when the target's kind is one of ``kinds``; returns None otherwise."""

    def __init__(self, op: str, schedule: Callable, kinds: Sequence[str]):
        super().__init__()
        self.op, self.schedule, self.kinds = op, schedule, tuple(kinds)

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        attrs = getattr(func, "attrs", None)
        if target.kind.name not in self.kinds or attrs is None or str(attrs.get(contract.OP, "")) != self.op:
            return None
        sch = s_tir.Schedule(func)
        self.schedule(sch, target)
        return sch

_RULES: Dict[str, List[dl.ScheduleRule]] = {}
_VERIFY: Dict[str, Callable[[tvm.IRModule, tvm.target.Target], None]] = {}
# op ("dense", "conv2d") -> fn(schedule, target, tunable=True): the space MetaSchedule tunes.
_SPACES: Dict[str, Dict[str, Callable]] = {}
# fn(func, target) -> a hand-written replacement PrimFunc or None (not tuned: no space)
_FIXED: Dict[str, Callable] = {}
# rules for the legalized float operators (matmul, GELU, ...) between RMSMP layers
_FLOAT: Dict[str, List[dl.ScheduleRule]] = {}
# Relax op name -> legalization (bb, call) -> Expr: the target's fast-math float operators
_FAST_MATH: Dict[str, Dict[str, Callable]] = {}
# (layer_kernels, constant_kernels) factories: what the target offers the graph passes
_GRAPH: Dict[str, Tuple[Optional[Callable], Optional[Callable]]] = {}
# float rules used only by fast-math builds (they may reassociate float sums)
_FAST_FLOAT: Dict[str, List[dl.ScheduleRule]] = {}


def target_cores(target: tvm.target.Target) -> int:
    """The cores a kernel for ``target`` splits its work over: the target's ``num-cores``, else this machine's."""
    return int(target.attrs.get("num-cores", 0) or 0) or (os.cpu_count() or 1)


def register_target(
    kind: str,
    rules: Sequence[dl.ScheduleRule],
    verify: Optional[Callable[[tvm.IRModule, tvm.target.Target], None]] = None,
    spaces: Optional[Dict[str, Callable]] = None,
    fixed: Optional[Callable] = None,
    float_rules: Sequence[dl.ScheduleRule] = (),
    fast_math: Optional[Dict[str, Callable]] = None,
    fast_math_rules: Sequence[dl.ScheduleRule] = (),
    layer_kernels: Optional[Callable[[tvm.target.Target], Optional[LayerKernels]]] = None,
    constant_kernels: Optional[Callable[[tvm.target.Target], Optional[ConstantKernel]]] = None,
) -> None:
    """``rules`` schedule the row-group ops for ``kind``; ``verify(mod, target)`` (optional)
    raises if a scheduled kernel breaks a limit of the target; ``spaces`` maps an op to the
    tunable form of its schedule (``fn(sch, target, tunable=True)``, tile sizes sampled);
    ``fixed(func, target)`` returns the hand-written kernel that replaces ``func`` on
    ``target`` (intrinsics), or None; such kernels are not tuned. ``float_rules`` schedule
    the float operators between RMSMP layers after the build legalizes them (see
    :func:`build_pipeline`); they must leave every result unchanged. ``fast_math`` maps Relax
    float operators (``relax.nn.gelu``, ...) to vectorizable legalizations, used unless a
    build asks for ``fast_math=False``; they may round differently from libm.
    ``fast_math_rules`` go before ``float_rules`` in such builds and may reassociate float
    sums (vectorized reductions). ``layer_kernels(target)`` and ``constant_kernels(target)``
    are the target properties the pipeline hands to the graph passes that put target kernels
    in place (``relay_passes.FuseDenseLayers``: whole dense layers in one kernel;
    ``relay_passes.UseTargetKernels``: row groups with constant weights as the target's
    kernels, weights laid out for them at compile time); each returns None for a target
    without such kernels."""
    if kind in _RULES:
        raise ValueError(f"schedules for target kind {kind!r} are already registered")
    _RULES[kind] = list(rules)
    if verify is not None:
        _VERIFY[kind] = verify
    _SPACES[kind] = dict(spaces or {})
    if fixed is not None:
        _FIXED[kind] = fixed
    _FLOAT[kind] = list(float_rules)
    _FAST_MATH[kind] = dict(fast_math or {})
    _FAST_FLOAT[kind] = list(fast_math_rules)
    _GRAPH[kind] = (layer_kernels, constant_kernels)


def fixed_kernel(func, target: tvm.target.Target):
    """The hand-written kernel that the rules put in place of ``func`` on ``target``, or None."""
    rules_for(target)
    fn = _FIXED.get(target.kind.name)
    return None if fn is None else fn(func, target)


def space_for(target: tvm.target.Target, op: str) -> Optional[Callable]:
    """The tunable schedule of ``op`` on ``target`` (None: the op is not tuned there)."""
    rules_for(target)
    return _SPACES.get(target.kind.name, {}).get(op)


def registered_kinds() -> List[str]:
    return sorted(_RULES)


def rules_for(target: tvm.target.Target) -> List[dl.ScheduleRule]:
    try:
        return _RULES[target.kind.name]
    except KeyError:
        raise ValueError(
            f"no row-group schedules for target kind {target.kind.name!r}; registered: {registered_kinds()}"
        ) from None


def graph_kernels(target: tvm.target.Target) -> Tuple[Optional[LayerKernels], Optional[ConstantKernel]]:
    """What ``target`` offers the graph passes that put its kernels in place (see
    :func:`register_target`): its layer kernels and its constant-weight kernels, each None
    where it has none."""
    rules_for(target)
    layer, constant = _GRAPH.get(target.kind.name, (None, None))
    return (None if layer is None else layer(target)), (None if constant is None else constant(target))


def apply_rules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every row-group PrimFunc of ``mod`` for ``target`` (returns a new module).
    Kernels the graph passes put in place (marked ``tirx.is_scheduled``) are left as they are."""
    with target:
        mod = dl.ApplyDefaultSchedule(*rules_for(target))(mod)
    verify = _VERIFY.get(target.kind.name)
    if verify is not None:
        verify(mod, target)
    return mod


def build_pipeline(target: tvm.target.Target, fast_math: bool = True):
    """The Relax build pipeline for ``target``: TVM's default, with the target's float rules
    applied to the legalized, fused float operators and (``fast_math``) its fast-math
    legalizations (None: TVM's default as it is)."""
    rules_for(target)
    rules = _FLOAT.get(target.kind.name)
    if not rules or target.kind.name != "llvm":
        return None
    fast = _FAST_MATH.get(target.kind.name) if fast_math else None
    if fast_math:
        rules = _FAST_FLOAT.get(target.kind.name, []) + rules
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="RMSMPBuildPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            # operators with a fast-math form are legalized first; the rest as TVM does
            first = [tvm.relax.transform.LegalizeOps(customize_legalize_map=fast)] if fast else []
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + first + cpu.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(*rules)]
                + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target) + [_noalias_shape_funcs])
            return seq(mod)

    return _pipeline


@tvm.transform.module_pass(opt_level=0, name="NoaliasShapeFuncs")
def _noalias_shape_funcs(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark the VM's shape functions (``tirx.is_host_func``, one buffer: the shape heap) as
    ``tirx.noalias``. A module with symbolic shapes (a dynamic batch) has one, and in TVM 0.27
    one function without ``tirx.noalias`` makes the LLVM codegen drop the ``noalias`` /
    ``align 64`` compute functions of every kernel in the library: 2x slower GEMMs (seen with
    ``python -m bench.dynamic_batch``: a static 128 x 768 x 3072 FFN in a library with a
    dynamic-batch function)."""
    for gv, func in list(mod.functions.items()):
        attrs = getattr(func, "attrs", None)
        if isinstance(func, tvm.tirx.PrimFunc) and attrs is not None and "tirx.is_host_func" in attrs \
                and "tirx.noalias" not in attrs and len(func.params) == 1:
            mod[gv] = func.with_attr("tirx.noalias", True)
    return mod
