"""UseTargetKernels: row groups whose weights are constants get the target's own kernel at
compile time, with their weight constants in the layout that kernel reads.

A target with such kernels (x86: ``schedules.cpu.x86_constant_kernel``) offers a
:data:`~relay_passes.contract.ConstantKernel`; the pipeline hands it to this pass, which never
imports the schedules. For every row-group PrimFunc all of whose callers pass constant
weights, ``kernel_for(func)`` gives the kernel and a numpy function laying the weights out
for it (x86: weights in row tiles for the dense kernels, taps first or in im2col tap order
for the convolutions); the calls are redirected to the kernel and their weight constants
replaced. Groups called with a weight that is not a constant are left to the schedule rules,
which give them a kernel that reads the weights as they are.
"""

from __future__ import annotations

import tvm
from tvm import relax

from . import contract
from .contract import ConstantKernel, callee

__all__ = ["UseTargetKernels"]


@tvm.transform.module_pass(opt_level=0, name="UseTargetKernels")
class UseTargetKernels:
    """Row groups with constant weights as the target's kernels (module docstring);
    ``last_replaced`` counts the PrimFuncs replaced."""

    def __init__(self, kernel_for: ConstantKernel):
        self.kernel_for = kernel_for
        self.last_replaced = 0

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        original = mod
        sites = {}  # GlobalVar of a PrimFunc -> the calls to it

        def record(expr) -> None:
            if isinstance(expr, relax.Call) and callee(original, expr) is not None:
                sites.setdefault(expr.args[0], []).append(expr)

        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func.body, record)
        replaced, layouts = {}, {}
        for gv, calls in sites.items():
            if contract.SCHEME in (mod[gv].attrs or {}) and all(
                    isinstance(c.args[1].fields[1], tvm.ir.GenericConst) for c in calls):
                found = self.kernel_for(mod[gv])
                if found is not None:
                    replaced[gv], layouts[gv] = found
        self.last_replaced = len(replaced)
        if not replaced:
            return mod
        # new GlobalVars (an existing one keeps the signature it was made with), typed by add_func
        builder = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in replaced},
                                                  attrs=mod.attrs, global_infos=mod.global_infos))
        renamed = {gv: builder.add_func(kernel, gv.name_hint) for gv, kernel in replaced.items()}
        mod = builder.get()
        layout_of = {renamed[gv]: layouts[gv] for gv in replaced}

        @relax.expr_functor.mutator
        class _Relayout(relax.PyExprMutator):
            def visit_call_(self, call):
                call = super().visit_call_(call)
                if callee(original, call) is None or call.args[0] not in renamed:
                    return call
                gv = renamed[call.args[0]]
                fields = list(call.args[1].fields)
                if layout_of[gv] is not None:
                    fields[1] = relax.const(layout_of[gv](fields[1].value.numpy()), str(fields[1].ty.dtype))
                return relax.Call(call.op, [gv, relax.Tuple(fields)] + list(call.args[2:]), call.attrs, call.ty_args)

        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gv] = _Relayout(mod).visit_expr(func)
        return mod
