"""A model compiled for the FPGA target: row-group layers on the accelerator (simulated),
every other op on the host CPU through TVM.

After the RMSMP passes and the FPGA schedules, the Relax module is legalized as for a CPU;
its ``main`` is a static sequence of ``call_tir`` bindings (like the OpenCL executor in
:mod:`tvm_rmsmp.runtime.opencl`). Each layer's row-group calls become one
:class:`LayerProgram` (an instruction stream, its packed weights and biases); the other
calls are PrimFuncs built for the host (``llvm``) on first use. A row-group op the
accelerator cannot run (no tile fits, unsupported geometry) is built for the host instead,
with an :class:`FPGAFallbackWarning` naming the layer.

On the accelerator a layer computes ``acc + bias`` in int32 (the GEMM cores, the bias starting
each accumulation); the host
finishes the integer contract's single float multiply ``float32(acc + bias) * out_scale``,
so results equal the torch reference bit for bit. The activation functions around a layer
run on the host like any other call: the per-tensor quantizer (with a zero point, folded into
the bias the accelerator adds), and per token the exponent, the quantizer and the epilogue
``y0 * 2^e + bias`` after the accelerator's integer GEMM (whose bias is then 0).

In the integer-only mode (``RMSMPConfig(requant="fixed_point")``) the layers store 8-bit codes
and each residual add (a :data:`relay_passes.contract.ADD_REQUANT` call) runs on the ALUs too,
as an :class:`~tvm_rmsmp.fpga.eltwise.EltwiseProgram`, and each global average pooling
(:data:`~relay_passes.contract.AVGPOOL_REQUANT`) on the DSP core as a
:class:`~tvm_rmsmp.fpga.eltwise.PoolProgram` (``exe.programs`` lists layers, adds and poolings
in order; ``exe.layers`` the layers). Where the accelerator has residual buffers
(``res_buffer_kib``) a residual add whose operand is a convolution's output (its row groups
concatenated, put back in channel order, used by nothing else) is instead fused into that
convolution's epilogue (:class:`~tvm_rmsmp.fpga.codegen.Residual`; the layer runs at the add's
place, ``LayerProgram.fused_add``). The executor keeps every tensor as the graph has it, a
float view of the codes, and hands the simulator the codes (``round(x / scale)``, exact).
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import attrs
import numpy as np
import tvm
from tvm import relax

from ..runtime.graph import bind_alias, shape_dtype, unsupported_binding
from .codegen import Residual, RowGroup, chain_streams, layer_stream, tile_events, weight_levels
from .config import AcceleratorConfig, FPGAConfig, load_board
from .eltwise import (EltwiseProgram, MaxPoolProgram, PoolProgram, add_program_of, add_stream, codes_of,
                      maxpool_program_of, pool_program_of)
from .isa import stream_summary
from .simulator import SimResult, Simulator, WeightTensor
from .sparse import sparsify_stream
from relay_passes import contract

__all__ = ["DynamicBatchFPGAModel", "FPGACompiledModel", "FPGAFallbackWarning", "LayerProgram", "compile_fpga"]


class FPGAFallbackWarning(UserWarning):
    """A layer runs on the host CPU instead of the accelerator."""


@attrs.define
class LayerProgram:
    """One layer on the accelerator: its stream, DRAM constants and outputs per row group."""

    layer: str
    stream: list
    x_var: object
    constants: Dict[str, object]
    # (relax var, DRAM name, scale, channel axis, shape, requant dict or None)
    outputs: List[Tuple[object, str, np.ndarray, int, tuple, Optional[dict]]]
    schemes: List[str]
    groups: list = attrs.field(factory=list)
    #: pruned row groups stored as runs of kept columns: {weight name: stats} (:mod:`.sparse`)
    sparse: Dict[str, dict] = attrs.field(factory=dict)
    #: the residual add fused into the epilogue (:class:`FusedAdd`), or None
    fused_add: Optional["FusedAdd"] = None

    @property
    def residual(self) -> Optional[Residual]:
        return None if self.fused_add is None else self.fused_add.residual

    def summary(self) -> Dict[str, int]:
        return stream_summary(self.stream)


@attrs.define
class FusedAdd:
    """A residual add fused into a convolution's epilogue: the add's call (``name``, ``params``
    of :data:`contract.ADD`, output ``out_var`` of ``shape``), its other operand (``other``, a
    float view of codes of scale ``scale_other``), ``perm`` (channel ``c`` of the add's operand is
    channel ``perm[c]`` of the layer's row groups concatenated) and the stream's view of it."""

    name: str
    params: Dict[str, object]
    shape: tuple
    out_var: object
    other: object
    scale_other: float
    perm: np.ndarray
    residual: Residual


def _is_row_group(func) -> bool:
    return isinstance(func, tvm.tirx.PrimFunc) and contract.attr(func, contract.SCHEME) is not None and str(
        contract.attr(func, contract.OP, "")) in ("dense", "conv2d")


def _scheduled_for_fpga(func) -> bool:
    """True when ``schedules/fpga.py`` tagged the function's tiles (found by walking its TIR)."""

    def visit(stmt) -> bool:
        kind = type(stmt).__name__
        if kind == "SBlockRealize":
            return "fpga.intrin" in stmt.block.annotations or visit(stmt.block.body)
        if kind == "SeqStmt":
            return any(visit(s) for s in stmt.seq)
        body = getattr(stmt, "body", None)
        return body is not None and visit(body)

    return visit(func.body)


class FPGACompiledModel:
    """``exe(x)`` runs the model (accelerator layers on the simulator); ``exe.profile()``
    reports the modelled cycles per layer and unit."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, input_specs, stats=None,
                 config: Optional[FPGAConfig] = None):
        from tvm.relax.backend.cpu_generic import legalize_passes

        self.target = target
        self.host = target.host if target.host is not None else tvm.target.Target({"kind": "llvm"})
        self.config = config or load_board(str(target.attrs["model"]))
        self.input_specs = input_specs
        self.stats = dict(stats or {})
        self.ir = mod
        with self.host:
            self.lowered = tvm.transform.Sequential(legalize_passes(self.host))(mod)
        self.simulator = Simulator(self.config)
        self._host_funcs: Dict[str, object] = {}
        self._profile = None
        self._build_steps()

    # ----- graph ------------------------------------------------------------------------
    def _build_steps(self):
        from schedules.fpga import plan_tiles

        main = self.lowered["main"]
        self.inputs = [p for p in main.params]
        self.steps = []           # ("host", gv name, [arg refs], out var) | ("fpga", LayerProgram | EltwiseProgram)
        self.layers: List[LayerProgram] = []
        #: everything the accelerator runs, in order: the layers and the residual adds (:mod:`.eltwise`)
        self.programs: List[object] = []
        self.fallbacks: List[str] = []
        alias: Dict[object, object] = {}
        consts: Dict[object, np.ndarray] = {}

        def ref(expr):
            if isinstance(expr, tvm.ir.GenericConst):
                key = ("const", len(consts))
                consts[key] = expr.value.numpy()
                return key
            if isinstance(expr, tvm.ir.Var):
                return alias.get(expr, expr)
            raise NotImplementedError(f"FPGA executor: unsupported argument {type(expr).__name__}")

        bindings = [b for block in main.body.blocks for b in block.bindings]
        row_calls = []
        for binding in bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir":
                func = self.lowered[value.args[0]]
                if _is_row_group(func) and _scheduled_for_fpga(func):
                    row_calls.append(binding)
        groups_of: Dict[tuple, list] = {}
        for binding in row_calls:
            func = self.lowered[binding.value.args[0]]
            key = (str(func.attrs[contract.LAYER]), binding.value.args[1].fields[0])
            groups_of.setdefault(key, []).append(binding)
        emitted = set()
        self.consts = consts
        fused, skipped = self._fusable_adds(bindings, groups_of, ref) if self.config.accelerator.res_buffer_kib else ({}, set())
        deferred = {key for key, _, _ in fused.values()}
        for binding in bindings:
            var, value = binding.var, binding.value
            if var in skipped:  # a fused layer's concatenation / channel order: inside its program
                continue
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir":
                gv = value.args[0]
                func = self.lowered[gv]
                if var in fused:  # a residual add fused into the layer that computes one operand
                    key, info, _ = fused[var]
                    prog = self._layer_program(key[0], groups_of[key], ref, fused_add=info)
                    self.layers.append(prog)
                    self.programs.append(prog)
                    self.steps.append(("fpga", prog))
                    continue
                if _is_row_group(func) and _scheduled_for_fpga(func):
                    key = (str(func.attrs[contract.LAYER]), value.args[1].fields[0])
                    if key not in emitted and key not in deferred:
                        emitted.add(key)
                        prog = self._layer_program(key[0], groups_of[key], ref)
                        self.layers.append(prog)
                        self.programs.append(prog)
                        self.steps.append(("fpga", prog))
                    continue
                if contract.rmsmp_attr(func, contract.OP) == contract.ADD_REQUANT:  # a residual add: the ALU
                    shape, _ = shape_dtype(value.ty_args[0] if value.ty_args else var.ty)
                    prog = add_program_of(str(func.attrs[contract.LAYER]), contract.add_params(func), shape,
                                      [ref(a) for a in value.args[1].fields], var, self.config.accelerator)
                    self.programs.append(prog)
                    self.steps.append(("fpga", prog))
                    continue
                op = contract.rmsmp_attr(func, contract.OP)
                if op in (contract.AVGPOOL_REQUANT, contract.MAXPOOL_CODES):  # DSP GEMM of ones / ALU max
                    x = value.args[1].fields[0]
                    x_shape, _ = shape_dtype(x.ty)
                    name = str(func.attrs[contract.LAYER])
                    try:
                        if op == contract.AVGPOOL_REQUANT:
                            prog = pool_program_of(name, contract.pool_params(func), x_shape, ref(x), var,
                                                   self.config.accelerator)
                        else:
                            out_shape, _ = shape_dtype(value.ty_args[0] if value.ty_args else var.ty)
                            prog = maxpool_program_of(name, dict(contract.attr(func, contract.MAXPOOL)), x_shape,
                                                      out_shape, ref(x), var, self.config.accelerator)
                    except ValueError as err:
                        msg = f"{err}: it runs on the host CPU"
                        warnings.warn(msg, FPGAFallbackWarning, stacklevel=4)
                        self.fallbacks.append(msg)
                    else:
                        self.programs.append(prog)
                        self.steps.append(("fpga", prog))
                        continue
                if _is_row_group(func):
                    _, reason = plan_tiles(func, self.config.accelerator)
                    reason = reason or "not scheduled for the accelerator"
                    msg = (f"layer {str(func.attrs['rmsmp.layer'])!r} ({func.attrs['rmsmp.scheme']} rows) runs on the "
                           f"host CPU: {reason}")
                    warnings.warn(msg, FPGAFallbackWarning, stacklevel=4)
                    self.fallbacks.append(msg)
                args = [ref(a) for a in value.args[1].fields]
                self.steps.append(("host", gv.name_hint, args, var, shape_dtype(value.ty_args[0] if value.ty_args else var.ty)))
            elif not bind_alias(var, value, alias, ref):
                raise unsupported_binding("FPGA executor", var, value)
        out = main.body.body
        if isinstance(out, relax.Tuple):
            self.output = tuple(ref(f) for f in out.fields)
        else:
            self.output = ref(out)

    def _fusable_adds(self, bindings, groups_of, ref):
        """``({add var: (layer key, FusedAdd, side)}, vars whose bindings the fused programs
        replace)``: each residual add one of whose operands is ``take(concatenate(row groups of a
        conv layer in the integer mode), channel order)`` (or the concatenation alone), every
        intermediate used once. The concatenation and the channel order are checked by running
        them on probe values (a fused ReLU or another axis fails the check: no fusion)."""
        uses: Dict[object, int] = {}

        def count(expr):
            if isinstance(expr, tvm.ir.Var):
                uses[expr] = uses.get(expr, 0) + 1
            elif isinstance(expr, (relax.Tuple,)):
                for f in expr.fields:
                    count(f)
            elif isinstance(expr, relax.Call):
                for a in expr.args:
                    count(a)
            elif isinstance(expr, relax.TupleGetItem):
                count(expr.tuple_value)

        producer = {}
        for b in bindings:
            count(b.value)
            producer[b.var] = b
        count(self.lowered["main"].body.body)  # the function's result
        group_key = {b.var: key for key, bs in groups_of.items() for b in bs}
        first = {}
        for i, b in enumerate(bindings):
            if b.var in group_key:
                first.setdefault(group_key[b.var], i)

        def call_args(b):
            v = b.value if b is not None else None
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.call_tir":
                return v.args[0], list(v.args[1].fields)
            return None, None

        def candidate(operand):
            """(layer key, concat binding or None, take binding or None) when ``operand`` is a
            conv layer's output: ``[take(][concatenate(]row groups[)][, order)]``."""
            if not isinstance(operand, tvm.ir.Var) or uses.get(operand) != 1:
                return None
            take = cat = None
            if operand not in group_key:
                gv, args = call_args(producer.get(operand))
                if gv is None:
                    return None
                if len(args) == 2 and isinstance(args[1], tvm.ir.GenericConst) and isinstance(args[0], tvm.ir.Var):
                    take, operand = producer[operand], args[0]
                    if uses.get(operand) != 1:
                        return None
            if operand in group_key:
                outs = [operand]
            else:
                cat = producer.get(operand)
                gv, outs = call_args(cat)
                if gv is None or not outs or any(not isinstance(a, tvm.ir.Var) or uses.get(a) != 1 for a in outs):
                    return None
            key = group_key.get(outs[0])
            if key is None or [b.var for b in groups_of[key]] != outs:
                return None
            funcs = [self.lowered[b.value.args[0]] for b in groups_of[key]]
            if any(str(contract.attr(f, contract.OP)) != "conv2d" or contract.requant_of(f) is None for f in funcs):
                return None
            return key, cat, take

        fused, skipped = {}, set()
        for b in bindings:
            gv, args = call_args(b)
            if gv is None or contract.rmsmp_attr(self.lowered[gv], contract.OP) != contract.ADD_REQUANT:
                continue
            found = [(self._reduction(groups_of[c[0]]), first[c[0]], side, c) for side in (0, 1)
                     for c in [candidate(args[side])] if c is not None]
            # the layer with the most products per output first (its GEMMs hide the epilogue's
            # passes; e.g. a block's 3x3 conv, not its 1x1 shortcut), then the later one
            for _, _, side, (key, cat, take) in sorted(found, key=lambda t: (-t[0], -t[1])):
                perm = self._channel_order(groups_of[key], cat, take, ref)
                params = contract.add_params(self.lowered[gv])
                a, o = ("a", "b") if side == 0 else ("b", "a")
                scales = {float(np.float32(contract.requant_of(self.lowered[g.value.args[0]])["out_scale"]))
                          for g in groups_of[key]}
                if perm is None or scales != {float(np.float32(params[f"scale_{a}"]))}:
                    continue
                shape, _ = shape_dtype(b.value.ty_args[0] if b.value.ty_args else b.var.ty)
                offsets = np.cumsum([0] + [int(shape_dtype(g.var.ty)[0][1]) for g in groups_of[key]])[:-1]
                residual = Residual(tensor=f"{key[0]}.res", imm=(params[f"mult_{a}"], params[f"mult_{o}"], params["shift"]),
                                    clamp=(params["qmin"], params["qmax"]), offsets=[int(v) for v in offsets])
                info = FusedAdd(name=str(self.lowered[gv].attrs[contract.LAYER]), params=params, shape=tuple(shape),
                                out_var=b.var, other=args[1 - side], scale_other=params[f"scale_{o}"], perm=perm,
                                residual=residual)
                fused[b.var] = (key, info, side)
                skipped |= {x.var for x in (cat, take) if x is not None}
                break
        return fused, skipped

    def _reduction(self, bindings) -> int:
        """Products per output of a conv layer (input channels x kernel taps)."""
        func = self.lowered[bindings[0].value.args[0]]
        kh, kw = _kernel_of(func)
        return int(bindings[0].value.args[1].fields[0].ty.shape[1]) * kh * kw

    def _channel_order(self, groups, cat, take, ref) -> Optional[np.ndarray]:
        """``perm`` (channel ``c`` of ``take(cat)`` is channel ``perm[c]`` of ``cat``) when ``cat``
        concatenates the row groups' outputs along the channels (or is None: one row group) and
        ``take`` (or nothing) reorders the channels; None otherwise. Found by running both on
        probe values."""
        shapes = [tuple(shape_dtype(g.var.ty)[0]) for g in groups]
        offsets = np.cumsum([0] + [s[1] for s in shapes])
        probes = [np.broadcast_to(-(o + np.arange(s[1]) + 1).astype(np.float32)[None, :, None, None], s)
                  for o, s in zip(offsets, shapes)]
        want = -(np.arange(offsets[-1], dtype=np.float32) + 1)[None, :, None, None]
        got = probes[0] if cat is None else self._run_host(cat.value.args[0].name_hint, probes, shape_dtype(cat.var.ty))
        if got.shape[1] != offsets[-1] or not np.array_equal(got, np.broadcast_to(want, got.shape)):
            return None
        if take is None:
            return np.arange(offsets[-1])
        args = take.value.args[1].fields
        out = self._run_host(take.value.args[0].name_hint, [got, self.consts[ref(args[1])]], shape_dtype(take.var.ty))
        if out.shape != got.shape:
            return None
        perm = (-out[0, :, 0, 0] - 1).astype(np.int64)
        if sorted(perm.tolist()) != list(range(got.shape[1])) or not np.array_equal(
                out, np.broadcast_to(-(perm.astype(np.float32) + 1)[None, :, None, None], out.shape)):
            return None
        return perm

    def _run_host(self, name: str, arrays, out) -> np.ndarray:
        """Run the host PrimFunc ``name`` on ``arrays``; ``out``: (shape, dtype) of its result."""
        dev = tvm.cpu()
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
        result = tvm.runtime.tensor(np.empty(out[0], out[1]), dev)
        self._host_func(name)["main"](*tensors, result)
        return result.numpy()

    def _layer_program(self, layer: str, bindings, ref, fused_add: Optional[FusedAdd] = None) -> LayerProgram:
        x_var = bindings[0].value.args[1].fields[0]
        x_name = f"{layer}.x"
        constants: Dict[str, object] = {}
        groups, outputs, schemes = [], [], []
        for binding in bindings:
            func = self.lowered[binding.value.args[0]]
            scheme = str(func.attrs[contract.SCHEME])
            _, w, bias, scale = list(binding.value.args[1].fields)
            if not all(isinstance(c, tvm.ir.GenericConst) for c in (w, bias, scale)):
                raise NotImplementedError(f"layer {layer!r}: weights must be constants for the accelerator")
            stored = w.value.numpy()
            packed = contract.attr(func, contract.PACKED) is not None
            base = f"{layer}.{scheme}"
            op = str(func.attrs[contract.OP])
            kernel, stride = (1, 1), (1, 1)
            if op == "conv2d":
                kernel = _kernel_of(func)
                s = [int(v) for v in func.attrs[contract.CONV]["strides"]]
                stride = (s[0], s[1])
            codes = int(x_var.ty.shape[1]) * kernel[0] * kernel[1]
            levels = weight_levels(stored, scheme, packed)[:, :codes]
            constants[base + ".w"] = WeightTensor(stored=stored, levels=np.ascontiguousarray(levels),
                                                  codes_per_byte=2 if packed else 1)
            constants[base + ".bias"] = bias.value.numpy().astype(np.int64)
            core = "lut" if str(func.attrs[contract.KIND]) == "sp2" else "dsp"
            requant = contract.requant_of(func)
            scale_np = scale.value.numpy().astype(np.float32)
            if requant is not None:  # scale is m * 2^-s exactly: the ALU's multiplier and shift
                m, s = requant_pair(scale_np)
                constants[base + ".mult"], constants[base + ".shift"] = m, s
                requant = {"mult": base + ".mult", "shift": base + ".shift", "qmin": requant["qmin"],
                           "qmax": requant["qmax"], "out_scale": requant["out_scale"]}
            groups.append(RowGroup(scheme=scheme, core=core, bits=4 if packed else 8, op=op, weight=base + ".w",
                                   bias=base + ".bias", output=base + ".out", events=tile_events(func),
                                   kernel=kernel, stride=stride, requant=requant))
            shape, _ = shape_dtype(binding.value.ty_args[0] if binding.value.ty_args else binding.var.ty)
            outputs.append((binding.var, base + ".out", scale_np, 1 if op == "conv2d" else len(shape) - 1,
                            tuple(shape), requant))
            schemes.append(scheme)
        if fused_add is not None:
            fused_add.other = ref(fused_add.other)
            schemes.append("add")
        stream = layer_stream(layer, x_name, groups, self.config.accelerator,
                              residual=fused_add.residual if fused_add else None)
        stream, sparse = sparsify_stream(stream, constants, {g.weight: g.bits for g in groups})  # pruned row groups
        return LayerProgram(layer=layer, stream=stream, x_var=ref(x_var), constants=constants, outputs=outputs,
                            schemes=schemes, groups=groups, sparse=sparse, fused_add=fused_add)

    # ----- execution --------------------------------------------------------------------
    def _host_func(self, name: str):
        if name not in self._host_funcs:
            func = self.lowered[name].with_attr("global_symbol", "main")
            self._host_funcs[name] = tvm.compile(tvm.IRModule({"main": func}), target=self.host)
        return self._host_funcs[name]

    def _inputs(self, inputs) -> List[np.ndarray]:
        from ..runtime.library import checked_inputs

        return checked_inputs(inputs, self.input_specs)

    def __call__(self, *inputs):
        env: Dict[object, np.ndarray] = dict(self.consts)
        for p, arr in zip(self.inputs, self._inputs(inputs)):
            env[p] = arr
        for step in self.steps:
            if step[0] == "host":
                _, name, args, out, out_type = step
                env[out] = self._run_host(name, [env[a] for a in args], out_type)
            elif isinstance(step[1], (EltwiseProgram, PoolProgram, MaxPoolProgram)):
                prog = step[1]
                dram = prog.dram(env)
                self.simulator.run(prog.stream, dram)
                env[prog.out_var] = prog.result(dram)
            else:
                prog: LayerProgram = step[1]
                dram = dict(prog.constants)
                dram[f"{prog.layer}.x"] = env[prog.x_var]
                fa = prog.fused_add
                for _, name, _, _, shape, rq in prog.outputs:
                    if rq is None:
                        dram[name] = np.zeros(shape, np.int32)
                        continue
                    lo = rq["qmin"] if fa is None else fa.residual.clamp[0]
                    dram[name] = np.zeros(shape, np.int8 if lo < 0 else np.uint8)
                if fa is not None:  # the other operand's codes, in the layer's channel order
                    codes = codes_of(env[fa.other], fa.scale_other)
                    dram[fa.residual.tensor] = np.empty_like(codes)
                    dram[fa.residual.tensor][:, fa.perm] = codes
                self.simulator.run(prog.stream, dram)
                if fa is not None:  # the add's codes, back in the graph's channel order
                    cat = np.concatenate([dram[name] for _, name, *_ in prog.outputs], axis=1)[:, fa.perm]
                    env[fa.out_var] = cat.astype(np.float32) * np.float32(fa.params["out_scale"])
                    continue
                for var, name, scale, axis, shape, rq in prog.outputs:
                    if rq is not None:  # 8-bit codes: the float view is codes * the output scale (float32)
                        env[var] = dram[name].astype(np.float32) * np.float32(rq["out_scale"])
                        continue
                    bshape = [1] * len(shape)
                    bshape[axis] = -1
                    env[var] = dram[name].astype(np.float32) * scale.reshape(bshape)
        return self._read(env, self.output)

    def _read(self, env, ref):
        if isinstance(ref, tuple):
            items = tuple(self._read(env, r) for r in ref)
            return items[0] if len(items) == 1 else items
        return env[ref]

    # ----- performance model ------------------------------------------------------------
    def profile(self, accelerator: Optional[AcceleratorConfig] = None, prefetch: bool = False) -> Dict[str, object]:
        """Modelled cycles of the accelerator layers (host ops are not counted): per layer the
        cycles, busy cycles per unit, MACs per core; totals, latency and utilization. The
        residual adds and global poolings of the integer-only mode (:mod:`.eltwise`) are steps
        of their own, named after the op (e.g. ``layer1.0.add``, ``schemes`` ``["add"]``, no MACs;
        ``avgpool``, ``["avgpool"]``, its sums counted as DSP MACs); a residual add fused into a
        convolution is part of that layer's step (its ``schemes`` end with ``"add"``).

        accelerator: another configuration of the same board's accelerator with the same
        buffers (e.g. ``attrs.evolve(cfg, store_bytes_per_output=1)``): the streams are
        regenerated from the same tiles and timed with it (a what-if; ``exe(x)`` is unchanged);
        without residual buffers (``res_buffer_kib=0``) the fused adds are timed as steps of
        their own again.
        prefetch: time the layers as one program with weight prefetch across layers
        (:func:`~tvm_rmsmp.fpga.codegen.chain_streams`) instead of one after the other; a
        layer's cycles are then from the previous layer's end to its own.
        """
        if accelerator is None and not prefetch and self._profile is not None:
            return self._profile
        acc = accelerator or self.config.accelerator
        simulator = Simulator(acc)
        layers = []
        total = 0
        busy: Dict[str, int] = {}
        macs = {"lut": 0, "dsp": 0}
        def retimed(prog):
            """``[(step name, schemes, stream)]`` of a program for ``accelerator`` (pruned row groups
            kept sparse; a fused add as a program of its own where it has no residual buffers)."""
            if accelerator is None:
                return [(prog.layer, prog.schemes, prog.stream)]
            if isinstance(prog, (EltwiseProgram, PoolProgram, MaxPoolProgram)):
                return [(prog.layer, prog.schemes, prog.stream_for(acc))]
            fa = prog.fused_add if acc.res_buffer_kib else None
            stream = layer_stream(prog.layer, f"{prog.layer}.x", prog.groups, acc, residual=fa and fa.residual)
            if prog.sparse:
                stream = sparsify_stream(stream, prog.constants, {g.weight: g.bits for g in prog.groups})[0]
            if prog.fused_add is None or fa is not None:
                return [(prog.layer, prog.schemes, stream)]
            add = prog.fused_add
            return [(prog.layer, prog.schemes[:-1], stream),
                    (add.name, ["add"], add_stream(add.name, int(np.prod(add.shape)), add.params, acc))]

        steps = [entry for prog in self.programs for entry in retimed(prog)]
        if prefetch:
            layers, total, busy, macs = self._chained_profile(simulator, steps)
        for name, schemes, stream in steps if not prefetch else []:
            r: SimResult = simulator.run(stream)
            total += r.cycles
            for q, b in r.busy.items():
                busy[q] = busy.get(q, 0) + b
            for c in macs:
                macs[c] += r.macs[c]
            layers.append({"layer": name, "cycles": r.cycles, "busy": dict(r.busy), "macs": dict(r.macs),
                           "schemes": list(schemes), "instructions": r.instructions})
        clock = self.config.board.clock_mhz
        util = {q: (busy[q] / total if total else 0.0) for q in busy}
        mac_util = {c: (macs[c] / (total * acc.macs_per_cycle(c, 4)) if total else 0.0) for c in macs}
        result = {
            "board": self.config.name, "clock_mhz": clock, "cycles": total, "latency_ms": total / (clock * 1e3),
            "busy": busy, "utilization": util, "mac_utilization": mac_util, "macs": macs, "layers": layers,
            "host_fallbacks": list(self.fallbacks),
        }
        if accelerator is None and not prefetch:
            self._profile = result
        return result

    def _chained_profile(self, simulator: Simulator, steps):
        """``(layers, total, busy, macs)`` of the steps ``[(name, schemes, stream)]`` run as one chained program."""
        from .isa import Load, Store, _Gemm

        streams = [stream for _, _, stream in steps]
        program = chain_streams(streams)
        r = simulator.run(program, record=True)
        owner = np.repeat(np.arange(len(streams)), [len(s) for s in streams])
        ends = np.zeros(len(streams), np.int64)
        per = [{} for _ in streams]
        mac = [{"lut": 0, "dsp": 0} for _ in streams]
        for q, start, end, i in r.timeline:
            k = owner[i]
            ends[k] = max(ends[k], end)
            per[k][q] = per[k].get(q, 0) + end - start
            ins = program[i]
            if isinstance(ins, (Load, Store)):
                ch = "dma_read" if isinstance(ins, Load) else "dma_write"
                per[k][ch] = per[k].get(ch, 0) + end - start
            if isinstance(ins, _Gemm):
                mac[k][ins.core] += ins.macs
        ends = np.maximum.accumulate(ends)
        layers = [{"layer": name, "cycles": int(ends[k] - (ends[k - 1] if k else 0)), "busy": per[k],
                   "macs": mac[k], "schemes": list(schemes), "instructions": len(streams[k])}
                  for k, (name, schemes, _) in enumerate(steps)]
        return layers, int(r.cycles), dict(r.busy), dict(r.macs)

    def benchmark(self, *inputs, repeat: int = 1, min_repeat_ms: int = 0) -> float:
        """Modelled accelerator seconds per inference (the cycle model, not a measurement)."""
        return self.profile()["latency_ms"] / 1e3

    def export_library(self, path, cc=None):
        raise NotImplementedError("the FPGA target has no device library to export; see docs/fpga.md")


def requant_pair(scale: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(m, s)`` (int64) from the fixed-point epilogue's ``scale = m * 2^-s`` (exact float32,
    ``2^14 <= m < 2^15``; see :mod:`tvm_rmsmp.quant.requant`)."""
    frac, exp = np.frexp(scale.astype(np.float64))
    m = frac * 2.0**15
    if not np.array_equal(m, np.round(m)) or np.any(m < 2**14):
        raise ValueError("a fixed-point epilogue scale is not a 15-bit multiplier times a power of two")
    return m.astype(np.int64), (15 - exp).astype(np.int64)


def _kernel_of(func) -> Tuple[int, int]:
    """The conv kernel the schedule recorded on the GEMM tile block."""
    found = []

    def visit(stmt):
        kind = type(stmt).__name__
        if kind == "SBlockRealize":
            ann = stmt.block.annotations
            if "fpga.kernel_h" in ann:
                found.append((int(ann["fpga.kernel_h"]), int(ann["fpga.kernel_w"])))
            visit(stmt.block.body)
        elif kind == "SeqStmt":
            for s in stmt.seq:
                visit(s)
        elif getattr(stmt, "body", None) is not None:
            visit(stmt.body)

    visit(func.body)
    if not found:
        raise ValueError("a scheduled conv2d row group without its kernel annotation")
    return found[0]


class DynamicBatchFPGAModel:
    """A dynamic-batch build for the FPGA target: one accelerator program (an
    :class:`FPGACompiledModel`) per batch size, those in ``variants`` (``{batch: model}``:
    batch 1 and the examples' batch) compiled up front, any other batch on the first call at
    that size through ``specialise`` (batch -> its model); so it keeps a reference to the
    quantized model. ``exe.last_function`` names the batch's program (``main_b<batch>``);
    :meth:`profile` and :meth:`benchmark` model one batch (the examples' by default)."""

    def __init__(self, target: tvm.target.Target, input_specs, stats, specialise, variants, example_batch: int):
        self.target = target
        self.input_specs = input_specs
        self.stats = dict(stats or {})
        self.specialise = specialise
        self.models: Dict[int, FPGACompiledModel] = dict(variants)
        self.variants = {b: f"main_b{b}" for b in self.models}
        self.example_batch = int(example_batch)
        self.last_function: Optional[str] = None

    @property
    def dynamic_batch(self) -> bool:
        return True

    def at_batch(self, batch: int) -> FPGACompiledModel:
        """The static model for ``batch`` (compiled now if it was not yet)."""
        batch = int(batch)
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if batch not in self.models:
            self.models[batch] = self.specialise(batch)
            self.variants[batch] = f"main_b{batch}"
        return self.models[batch]

    def _model(self, inputs):
        from ..runtime.library import checked_inputs, input_batch

        arrays = checked_inputs(inputs, self.input_specs)
        model = self.at_batch(input_batch(arrays, self.input_specs))
        self.last_function = self.variants[int(arrays[0].shape[0])]
        return model, arrays

    def __call__(self, *inputs):
        model, arrays = self._model(inputs)
        return model(*arrays)

    def profile(self, accelerator: Optional[AcceleratorConfig] = None, batch: Optional[int] = None):
        """:meth:`FPGACompiledModel.profile` of the program for ``batch`` (default: the examples')."""
        return self.at_batch(self.example_batch if batch is None else batch).profile(accelerator)

    def benchmark(self, *inputs, repeat: int = 1, min_repeat_ms: int = 0) -> float:
        """Modelled accelerator seconds per inference at the inputs' batch."""
        return self._model(inputs)[0].benchmark()

    def export_library(self, path, cc=None):
        raise NotImplementedError("the FPGA target has no device library to export (a dynamic-batch FPGA build "
                                  "compiles a program per batch size in this process); see docs/fpga.md")


def compile_fpga(mod: tvm.IRModule, target: tvm.target.Target, input_specs, stats=None, *, specialise=None,
                 variants=None, example_batch: int = 1):
    """The pipeline's hook for ``ext_dev`` targets (``target="fpga:<board>"``). With
    ``specialise`` (batch -> ``(module, input specs)`` at that batch) a dynamic-batch build:
    ``mod`` is unused, ``variants`` (``{batch: (module, input specs)}``) are compiled now."""
    if specialise is None:
        return FPGACompiledModel(mod, target, input_specs, stats=stats)

    def build(batch: int) -> FPGACompiledModel:
        m, specs = specialise(batch)
        return FPGACompiledModel(m, target, specs, stats=stats)

    built = {b: FPGACompiledModel(m, target, specs, stats=stats) for b, (m, specs) in (variants or {}).items()}
    return DynamicBatchFPGAModel(target, input_specs, stats, build, built, example_batch)
