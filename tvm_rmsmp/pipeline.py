"""From a (quantized) PyTorch model to a callable, timeable, exportable TVM module.

import (torch.export -> Relax) -> RewriteRowGroups -> FoldRowPermutation -> PackFourBitRows
-> the target's row-group schedules -> TVM's default Relax build for the target.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import tvm
from tvm import relax

import schedules
from relay_passes import FoldRowPermutation, PackFourBitRows, RewriteRowGroups

from .fileio import atomic_write
from .frontend import import_model
from .targets import resolve_target
from .torch_quant import RMSMPWarning, rmsmp_layers

__all__ = ["compile", "load", "CompiledModel", "OpenCLCompiledModel", "lower"]

_FORMAT_VERSION = 1


def _as_numpy(x, where: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{where}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


def checked_inputs(inputs, specs: List[Dict[str, Any]]) -> List[np.ndarray]:
    """Contiguous numpy inputs matching the compiled specs (float inputs are cast between
    float types; any other mismatch is an error naming the input)."""
    if len(inputs) != len(specs):
        raise ValueError(f"model was compiled for {len(specs)} input(s), got {len(inputs)}")
    out = []
    for i, (x, spec) in enumerate(zip(inputs, specs)):
        arr = _as_numpy(x, f"input {i}")
        if list(arr.shape) != spec["shape"]:
            raise ValueError(f"input {i} has shape {list(arr.shape)}, the model was compiled for {spec['shape']}")
        if str(arr.dtype) != spec["dtype"]:
            if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(np.dtype(spec["dtype"]), np.floating):
                arr = arr.astype(spec["dtype"])
            else:
                raise ValueError(f"input {i} has dtype {arr.dtype}, the model was compiled for {spec['dtype']}")
        out.append(np.ascontiguousarray(arr))
    return out


def lower(
    model: torch.nn.Module, example_inputs: Sequence, target, *, schedule: bool = True, tuning: Optional[str] = None
) -> Tuple[tvm.IRModule, Dict[str, int]]:
    """The Relax module after the RMSMP passes and (``schedule``) the target's schedules,
    tuned ones from the ``tuning`` directory where it has them; not yet built."""
    target = resolve_target(target)
    inputs = tuple(torch.from_numpy(_as_numpy(x, f"example_inputs[{i}]")) for i, x in enumerate(example_inputs))
    if not rmsmp_layers(model):
        warnings.warn("model has no RMSMP layer: compiling it in float", RMSMPWarning, stacklevel=3)
    mod = import_model(model, inputs)
    mod = RewriteRowGroups()(mod)
    fold = FoldRowPermutation()
    mod = fold(mod)
    pack = PackFourBitRows()
    mod = pack(mod)
    stats = dict(fold.last_stats, packed=pack.last_packed)
    if not schedule:
        return mod, stats
    if tuning is not None:
        from .tuning import apply_tuning

        mod, used = apply_tuning(mod, target, tuning)
        stats["tuned"] = sum(used.values())
    mod = schedules.apply_rules(mod, target)
    stats["cpu_kernels"] = kernel_kinds(mod)
    return mod, stats


def kernel_kinds(mod: tvm.IRModule) -> Dict[str, int]:
    """How many row-group kernels of each kind a scheduled module has: ``rmsmp.cpu_kernel``
    (an intrinsic kernel, e.g. ``x86-avx512vnni-table-decode``, or ``x86-avx512vnni-layer`` /
    ``x86-avx512vnni-gemv`` for a whole dense layer's row groups in one kernel, from 8 activation
    rows on / at one) or the generic schedule,
    with the SP2 lowering of packed SP2 groups (``shift`` or ``decode``)."""
    kinds: Dict[str, int] = {}
    for _, func in mod.functions.items():
        attrs = getattr(func, "attrs", None)
        if not isinstance(func, tvm.tirx.PrimFunc) or attrs is None or not ("rmsmp.scheme" in attrs or
                                                                             "rmsmp.schemes" in attrs):
            continue
        kind = str(attrs.get("rmsmp.cpu_kernel", "generic"))
        if "rmsmp.sp2_lowering" in attrs and kind == "generic":
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
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of input tensors, e.g. (x,)")
    target = resolve_target(target)
    mod, stats = lower(model, example_inputs, target, tuning=tuning)
    specs = [{"shape": list(_as_numpy(x, "").shape), "dtype": str(_as_numpy(x, "").dtype)} for x in example_inputs]
    if target.kind.name == "opencl":
        return OpenCLCompiledModel(mod, target, specs, stats=stats)
    if target.kind.name in COMPILERS:
        import importlib

        module, _, func = COMPILERS[target.kind.name].partition(":")
        return getattr(importlib.import_module(module), func)(mod, target, specs, stats)
    pipeline = schedules.build_pipeline(target, fast_math=fast_math)
    stats["fast_math"] = bool(fast_math and pipeline is not None)
    exe = tvm.compile(mod, target=target, **({"relax_pipeline": pipeline} if pipeline is not None else {}))
    return CompiledModel(exe, target, specs, ir=mod, stats=stats)


def _to_numpy_outputs(value) -> Union[np.ndarray, tuple]:
    if isinstance(value, tvm.runtime.Tensor):
        return value.numpy()
    items = [_to_numpy_outputs(v) for v in value]
    return items[0] if len(items) == 1 else tuple(items)


class CompiledModel:
    """A compiled model: ``model(x)`` runs it (numpy or torch in, numpy out)."""

    def __init__(self, executable, target, input_specs: List[Dict[str, Any]], ir: Optional[tvm.IRModule] = None,
                 stats: Optional[Dict[str, int]] = None):
        self.executable = executable
        self.target = target
        self.input_specs = input_specs
        self.ir = ir
        self.stats = stats or {}
        self.device = tvm.device(target.kind.name if target.kind.name != "llvm" else "cpu", 0)
        self._vm = None

    @property
    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, self.device)
        return self._vm

    def _inputs(self, inputs) -> List[tvm.runtime.Tensor]:
        return [tvm.runtime.tensor(arr, self.device) for arr in checked_inputs(inputs, self.input_specs)]

    def __call__(self, *inputs):
        return _to_numpy_outputs(self.vm["main"](*self._inputs(inputs)))

    def benchmark(self, *inputs, repeat: int = 20, min_repeat_ms: int = 20) -> float:
        """Median seconds per call over ``repeat`` measurements (TVM's time evaluator)."""
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        args = self._inputs(inputs)
        timer = self.vm.time_evaluator("main", self.device, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return float(timer(*args).median)

    def export_library(self, path: str, cc: Optional[str] = None) -> str:
        """Write the compiled library to ``path`` (and its input specs to ``path + '.json'``), atomically.

        cc: a (cross) C++ compiler to link with, e.g. ``aarch64-linux-gnu-g++`` for an AArch64 target.
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        suffix = os.path.splitext(path)[1] or ".so"
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix)
        os.close(fd)
        meta = {"format": "tvm-rmsmp", "version": _FORMAT_VERSION, "inputs": self.input_specs,
                "target": str(self.target)}
        try:
            if cc is None:
                self.executable.export_library(tmp)
            else:
                from tvm.support import cc as _cc

                self.executable.export_library(
                    tmp, fcompile=lambda out, files, **kw: _cc.create_shared(out, files, cc=cc, **kw)
                )
            atomic_write(path + ".json", json.dumps(meta, indent=1))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


class OpenCLCompiledModel(CompiledModel):
    """A model compiled for an OpenCL target (Mali, Adreno, any OpenCL device).

    Calls run the TVM-generated kernels through pyopencl on the local OpenCL device (PoCL on
    a CPU: a functional check and a relative performance proxy, not a phone).
    :meth:`export_library` writes the TVM library for the device, whose host part runs
    under TVM's runtime with its OpenCL support (e.g. TVM's RPC app on a phone).
    """

    def __init__(self, mod: tvm.IRModule, target, input_specs, stats=None):
        from tvm.relax.backend.gpu_generic import legalize_passes

        from .opencl_runtime import OpenCLGraph

        super().__init__(None, target, input_specs, ir=mod, stats=stats)
        self.device = tvm.cpu()  # inputs are checked and staged on the host; the graph uploads them
        with target:
            self.lowered = tvm.transform.Sequential(legalize_passes(target))(mod)
        self.graph = OpenCLGraph(self.lowered, target)

    @property
    def vm(self):
        raise RuntimeError("an OpenCL model runs through its OpenCL graph executor, not the local VM")

    def __call__(self, *inputs):
        return self.graph.run([t.numpy() for t in self._inputs(inputs)])

    def benchmark(self, *inputs, repeat: int = 20, min_repeat_ms: int = 0) -> float:
        """Median wall-clock seconds per call on the local OpenCL device (inputs and outputs copied)."""
        return self.graph.time([t.numpy() for t in self._inputs(inputs)], repeat=repeat)

    def export_library(self, path: str, cc: Optional[str] = None) -> str:
        """Build with TVM for the target (host part as the target's host says) and export it."""
        if self.executable is None:
            self.executable = tvm.compile(self.ir, target=self.target)
        return super().export_library(path, cc=cc)


def load(path: str) -> CompiledModel:
    """Load a library written by :meth:`CompiledModel.export_library`."""
    meta_path = os.fspath(path) + ".json"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no compiled library at {path!r}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != "tvm-rmsmp" or not isinstance(meta.get("inputs"), list):
            raise ValueError("not a tvm-rmsmp metadata file")
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_path!r} is missing: it holds the input specs written with the library") from None
    except (ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path!r} is corrupt: {err}") from err
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as err:
        raise ValueError(f"{path!r} is not a loadable TVM library: {err}") from err
    target = tvm.target.Target(json.loads(meta["target"])) if meta["target"].startswith("{") else resolve_target("llvm")
    return CompiledModel(lib, target, meta["inputs"])
