"""A compiled model as the runtime sees it: run, time, export and load a TVM library.

Needs TVM and numpy, never torch: a deployment machine loads an exported library with
:func:`load` and runs it on numpy arrays (torch tensors are accepted where torch is present).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Union

import numpy as np
import tvm
from tvm import relax

from .fileio import atomic_write
from .host import host_cpu_target

__all__ = ["CompiledModel", "OpenCLCompiledModel", "load", "checked_inputs", "as_numpy"]

_FORMAT_VERSION = 1


def as_numpy(x, where: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach"):  # a torch.Tensor, torch not imported here
        return x.detach().cpu().numpy()
    raise TypeError(f"{where}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


def checked_inputs(inputs, specs: List[Dict[str, Any]]) -> List[np.ndarray]:
    """Contiguous numpy inputs matching the compiled specs (float inputs are cast between
    float types; any other mismatch is an error naming the input). Float inputs with NaN are
    refused (ValueError), and so are embedding indices outside the table (IndexError, as torch)."""
    if len(inputs) != len(specs):
        raise ValueError(f"model was compiled for {len(specs)} input(s), got {len(inputs)}")
    out = []
    for i, (x, spec) in enumerate(zip(inputs, specs)):
        arr = as_numpy(x, f"input {i}")
        if list(arr.shape) != spec["shape"]:
            raise ValueError(f"input {i} has shape {list(arr.shape)}, the model was compiled for {spec['shape']}")
        if str(arr.dtype) != spec["dtype"]:
            if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(np.dtype(spec["dtype"]), np.floating):
                arr = arr.astype(spec["dtype"])
            else:
                raise ValueError(f"input {i} has dtype {arr.dtype}, the model was compiled for {spec['dtype']}")
        if arr.dtype.kind == "f" and np.isnan(arr).any():
            where = tuple(int(v) for v in np.argwhere(np.isnan(arr))[0])
            raise ValueError(f"input {i} has NaN at index {where}: the integer layers cannot carry NaN (the torch "
                             "reference would return NaN for the outputs it reaches); clean the input first")
        bound = spec.get("index_bound")
        if bound is not None and arr.size and (arr.min() < 0 or arr.max() >= bound):
            bad = arr.min() if arr.min() < 0 else arr.max()
            raise IndexError(f"input {i} indexes a table of {bound} rows (an embedding) with {int(bad)}: "
                             f"indices must be in [0, {bound})")
        out.append(np.ascontiguousarray(arr))
    return out


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

        from ..runtime.opencl import OpenCLGraph

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
    target = tvm.target.Target(json.loads(meta["target"])) if meta["target"].startswith("{") else tvm.target.Target(host_cpu_target())
    return CompiledModel(lib, target, meta["inputs"])
