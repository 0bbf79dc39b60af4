"""Run TVM-generated OpenCL kernels with pyopencl (PoCL on a CPU, or any OpenCL device).

The apache-tvm wheel generates OpenCL C but ships no OpenCL runtime. This module executes a
compiled model's kernels itself: every PrimFunc of the lowered Relax module is built for the
OpenCL target by TVM; its OpenCL C source comes from the device module and its launches
(kernel name, argument order, grid and work-group sizes) from the host function just before
``tirx.MakePackedAPI``. The Relax ``main`` of a static-shape model is a straight sequence of
``call_tir`` bindings, which :class:`OpenCLGraph` replays on device buffers.

The same model built by :func:`tvm.compile` for the same target runs under TVM's own OpenCL
runtime on a phone (TVM RPC); this executor is how it is checked here, kernel for kernel.
"""

from __future__ import annotations

import hashlib
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tvm
from tvm import relax, tirx

from .graph import bind_alias, shape_dtype, unsupported_binding

__all__ = ["OpenCLUnavailable", "opencl_context", "KernelLaunch", "OpenCLPrimFunc", "OpenCLGraph"]


class OpenCLUnavailable(RuntimeError):
    """No OpenCL platform (install PoCL: apt-get install pocl-opencl-icd; pip install pyopencl)."""


_CTX = None


def opencl_context():
    """``(context, queue, device)`` for the first OpenCL device (PoCL here), created once."""
    global _CTX
    if _CTX is None:
        try:
            import pyopencl as cl
        except ImportError as err:
            raise OpenCLUnavailable("pyopencl is not installed: pip install 'tvm-rmsmp[opencl]'") from err
        try:
            platforms = cl.get_platforms()
        except cl.Error as err:
            raise OpenCLUnavailable(f"no OpenCL platform: {err}; install pocl-opencl-icd") from err
        devices = [d for p in platforms for d in p.get_devices()]
        if not devices:
            raise OpenCLUnavailable("no OpenCL device found; install pocl-opencl-icd")
        ctx = cl.Context([devices[0]])
        _CTX = (ctx, cl.CommandQueue(ctx), devices[0])
    return _CTX


class KernelLaunch:
    """One ``call_ffi_kernel`` of a host function."""

    def __init__(self, name: str, args: List[Tuple[str, object]], grid: Tuple[int, int, int], block: Tuple[int, int, int]):
        self.name, self.args, self.grid, self.block = name, args, grid, block

    @property
    def global_size(self) -> Tuple[int, ...]:
        return tuple(g * b for g, b in zip(self.grid, self.block))

    def __repr__(self):
        return f"KernelLaunch({self.name}, grid={self.grid}, block={self.block})"


def _walk(node, visit):
    visit(node)
    for attr in ("seq", "body", "value", "then_case", "else_case"):
        child = getattr(node, attr, None)
        if child is None or isinstance(child, (int, float, str)):
            continue
        if isinstance(child, (list, tuple)) or type(child).__name__ == "Array":
            for c in child:
                _walk(c, visit)
        elif hasattr(child, "same_as"):  # an IR node
            _walk(child, visit)


_LAUNCH_DIMS = {"x": 0, "y": 1, "z": 2}


def _is_buffer_data(expr) -> bool:
    return isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "tirx.buffer_data"


def _parse_host(host: tirx.PrimFunc) -> Tuple[List[KernelLaunch], List[int]]:
    """Kernel launches of a host function, and the byte sizes of its intermediate buffers."""
    decls: List[Tuple[object, object]] = []  # (declared buffer var, its data expression)
    allocs: List[Tuple[object, int]] = []  # (allocated buffer var, bytes)
    calls: List[object] = []

    def visit(node):
        kind = type(node).__name__
        if kind == "DeclBuffer":
            decls.append((node.buffer, node.data))
        elif kind in ("AllocBuffer", "Allocate") and hasattr(node, "buffer"):
            buf = node.buffer
            size = 1
            for d in buf.shape:
                size *= int(d)
            allocs.append((buf, size * tvm.DataType(buf.dtype).bits // 8))
        elif isinstance(node, tvm.ir.Call) and isinstance(node.op, tvm.ir.Op) and node.op.name == "tirx.call_ffi_kernel":
            calls.append(node)

    _walk(host.body, visit)

    def resolve(expr, depth=0):
        if depth > 16:
            return None
        if _is_buffer_data(expr):
            expr = expr.args[0]
        for i, p in enumerate(host.params):
            if expr.same_as(p):
                return ("param", i)
        for var, data in decls:
            if expr.same_as(var) and data is not None:
                return resolve(data, depth + 1)
        for j, (var, _) in enumerate(allocs):
            if expr.same_as(var):
                return ("workspace", j)
        return None

    launches: List[KernelLaunch] = []
    unsupported: List[str] = []
    for node in calls:
        tags = [str(t) for t in node.attrs.launch_params]
        if any(not t.startswith(("blockIdx.", "threadIdx.")) for t in tags):
            unsupported.append(f"launch tags {tags}")
            continue
        args = list(node.args)
        values = args[len(args) - len(tags):]
        grid, block = [1, 1, 1], [1, 1, 1]
        for tag, v in zip(tags, values):
            kind, dim = tag.split(".")
            (grid if kind == "blockIdx" else block)[_LAUNCH_DIMS[dim]] = int(v)
        resolved = []
        for a in args[1:len(args) - len(tags)]:
            kind = type(a).__name__
            if kind == "IntImm":
                resolved.append(("int", (int(a.value), str(a.ty))))
            elif kind == "FloatImm":
                resolved.append(("float", (float(a.value), str(a.ty))))
            else:
                r = resolve(a)
                if r is None:
                    unsupported.append(f"kernel argument {a}")
                resolved.append(r)
        launches.append(KernelLaunch(str(args[0].value), resolved, tuple(grid), tuple(block)))
    if unsupported:
        raise NotImplementedError(f"host function: unsupported {unsupported}")
    return launches, [n for _, n in allocs]


_PROGRAMS: Dict[str, object] = {}  # OpenCL C source hash -> built program (one build per process)
_KERNELS: Dict[tuple, object] = {}


class OpenCLPrimFunc:
    """One PrimFunc built for an OpenCL target, runnable on pyopencl buffers.

    Its OpenCL C source and launches can be saved (:meth:`artifact`) and rebuilt elsewhere
    (:meth:`from_artifact`): MetaSchedule's builder and runner workers exchange them.
    """

    def __init__(self, func: Optional[tirx.PrimFunc], target: Optional[tvm.target.Target], name: str = "main",
                 _artifact: Optional[dict] = None):
        if _artifact is None:
            _artifact = self._compile(func, target, name)
        self.name = _artifact["name"]
        self.source = _artifact["source"]
        self.launches = [KernelLaunch(l["kernel"], [tuple(a) if a[0] in ("param", "workspace") else (a[0], tuple(a[1]))
                                                    for a in l["args"]], tuple(l["grid"]), tuple(l["block"]))
                         for l in _artifact["launches"]]
        self.workspace_bytes = list(_artifact["workspaces"])
        self.param_specs = [(list(s), d) for s, d in _artifact["params"]]
        self._build()

    @staticmethod
    def _compile(func, target, name) -> dict:
        captured = {}

        @tvm.instrument.pass_instrument
        class _Capture:
            def run_before_pass(self, mod, info):
                if info.name == "tirx.MakePackedAPI":
                    captured["mod"] = mod

        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        with tvm.transform.PassContext(instruments=[_Capture()]):
            built = tvm.compile(mod, target=target)
        host = captured["mod"]["main"]
        launches, workspaces = _parse_host(host)
        return {
            "name": name,
            "source": built.mod.imports[0].inspect_source() if built.mod.imports else "",
            "launches": [{"kernel": l.name, "args": [list(a) for a in l.args], "grid": list(l.grid),
                          "block": list(l.block)} for l in launches],
            "workspaces": workspaces,
            "params": [([int(d) for d in p.shape], str(p.dtype)) for p in host.params],
        }

    def artifact(self) -> dict:
        return {
            "name": self.name, "source": self.source, "workspaces": self.workspace_bytes,
            "launches": [{"kernel": l.name, "args": [list(a) for a in l.args], "grid": list(l.grid),
                          "block": list(l.block)} for l in self.launches],
            "params": [[s, d] for s, d in self.param_specs],
        }

    @classmethod
    def from_artifact(cls, artifact: dict) -> "OpenCLPrimFunc":
        return cls(None, None, _artifact=artifact)

    def _build(self):
        import pyopencl as cl

        ctx, _, device = opencl_context()
        max_wg = int(device.max_work_group_size)
        for launch in self.launches:
            if int(np.prod(launch.block)) > max_wg:
                raise ValueError(
                    f"kernel {self.name}/{launch.name}: work-group of {int(np.prod(launch.block))} items exceeds the "
                    f"device's {max_wg}"
                )
        key = hashlib.sha256(self.source.encode()).hexdigest()
        if key not in _PROGRAMS and self.launches:
            try:
                _PROGRAMS[key] = cl.Program(ctx, self.source).build()
            except cl.Error as err:
                raise RuntimeError(f"OpenCL build of {self.name} failed: {err}") from err
        self.program = _PROGRAMS.get(key)

    def _kernel(self, kname):
        import pyopencl as cl

        key = (id(self.program), kname)
        if key not in _KERNELS:
            _KERNELS[key] = cl.Kernel(self.program, kname)
        return _KERNELS[key]

    def workspaces(self) -> List[object]:
        """Device buffers for the intermediate tensors of this function's kernels."""
        import pyopencl as cl

        ctx, _, _ = opencl_context()
        return [cl.Buffer(ctx, cl.mem_flags.READ_WRITE, size=max(n, 1)) for n in self.workspace_bytes]

    def enqueue(self, queue, buffers: Sequence[object], workspaces: Sequence[object] = ()) -> None:
        for launch in self.launches:
            args = []
            for kind, value in launch.args:
                if kind == "param":
                    args.append(buffers[value])
                elif kind == "workspace":
                    args.append(workspaces[value])
                else:
                    num, dtype = value
                    args.append(np.dtype(dtype).type(num))
            self._kernel(launch.name)(queue, launch.global_size, launch.block, *args)


class OpenCLGraph:
    """Replays a lowered static-shape Relax ``main`` (call_tir, tuples, constants) with pyopencl."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        import pyopencl as cl

        self.ctx, self.queue, self.device = opencl_context()
        main = mod["main"]
        self.inputs = [(p, shape_dtype(p.ty)) for p in main.params]
        self.steps = []  # (OpenCLPrimFunc, [arg refs], out ref)
        self.buffers: Dict[object, object] = {}  # relax var -> cl.Buffer
        self.specs: Dict[object, Tuple[List[int], str]] = {}
        self.funcs: Dict[str, OpenCLPrimFunc] = {}
        mf = cl.mem_flags
        total = 0
        alias: Dict[object, object] = {}

        def ref(expr):
            if isinstance(expr, tvm.ir.GenericConst):
                arr = np.ascontiguousarray(expr.value.numpy())
                key = ("const", len(self.buffers))
                self.buffers[key] = cl.Buffer(self.ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=arr) if arr.nbytes else None
                self.specs[key] = (list(arr.shape), str(arr.dtype))
                return key
            if isinstance(expr, tvm.ir.Var):
                return alias.get(expr, expr)
            raise NotImplementedError(f"OpenCL executor: unsupported argument {type(expr).__name__}")

        for p, spec in self.inputs:
            self.specs[p] = spec
        for block in main.body.blocks:
            for binding in block.bindings:
                var, value = binding.var, binding.value
                if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir":
                    gv = value.args[0]
                    fname = gv.name_hint
                    if fname not in self.funcs:
                        self.funcs[fname] = OpenCLPrimFunc(mod[gv], target, fname)
                    args = [ref(a) for a in value.args[1].fields]
                    shape, dtype = shape_dtype(value.ty_args[0] if value.ty_args else var.ty)
                    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                    total += nbytes
                    self.specs[var] = (shape, dtype)
                    self.buffers[var] = cl.Buffer(self.ctx, mf.READ_WRITE, size=max(nbytes, 1))
                    self.steps.append((self.funcs[fname], args, var))
                elif not bind_alias(var, value, alias, ref):
                    raise unsupported_binding("OpenCL executor", var, value)
        out = main.body.body
        self.output = alias.get(out, out) if isinstance(out, tvm.ir.Var) else tuple(ref(f) for f in out.fields)
        if isinstance(self.output, tuple):
            self.output = tuple(alias.get(o, o) if not isinstance(o, tuple) else o for o in self.output)
        mem = int(self.device.global_mem_size)
        if total > mem:
            raise MemoryError(f"model needs {total} bytes of device buffers, the device has {mem}")
        self.device_bytes = total
        self.workspaces = {name: f.workspaces() for name, f in self.funcs.items()}

    def run(self, arrays: Sequence[np.ndarray]) -> Union[np.ndarray, tuple]:
        import pyopencl as cl

        mf = cl.mem_flags
        for (p, (shape, dtype)), arr in zip(self.inputs, arrays):
            self.buffers[p] = cl.Buffer(self.ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(arr, dtype))
        for func, args, out in self.steps:
            func.enqueue(self.queue, [self.buffers[a] for a in args] + [self.buffers[out]], self.workspaces[func.name])
        return self._read(self.output)

    def _read(self, ref):
        import pyopencl as cl

        if isinstance(ref, tuple):
            items = tuple(self._read(r) for r in ref)
            return items[0] if len(items) == 1 else items
        shape, dtype = self.specs[ref]
        host = np.empty(shape, dtype)
        cl.enqueue_copy(self.queue, host, self.buffers[ref])
        self.queue.finish()
        return host

    def time(self, arrays: Sequence[np.ndarray], repeat: int = 20) -> float:
        """Median wall-clock seconds of a full run (inputs uploaded, outputs read back)."""
        self.run(arrays)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.run(arrays)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
