"""A compiled model as the runtime sees it: run, time, export and load a TVM library.

Needs TVM and numpy, never torch: a deployment machine loads an exported library with
:func:`load` and runs it on numpy arrays (torch tensors are accepted where torch is present).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tvm
from tvm import relax

from .fileio import atomic_output
from .native_log import filtered_native_log
from .host import cpu_part, host_triple, missing_host_features, target_cpu_features, target_triple, triple_arch

__all__ = ["CompiledModel", "OpenCLCompiledModel", "load", "checked_inputs", "arrange_inputs", "as_numpy",
           "check_host_compatible", "cache_dir", "ANY_BATCH", "input_batch"]

_FORMAT = "tvm-rmsmp"
#: 2: the target as a JSON object, the library's size and sha256, its arch, triple and CPU features
_FORMAT_VERSION = 2
#: 3: a dynamic-batch build: input shapes with :data:`ANY_BATCH` as dimension 0 and ``variants``,
#: the batch sizes with a specialised function (``{"1": "main_b1"}``); static builds still write 2
_DYNAMIC_FORMAT_VERSION = 3
_READ_VERSIONS = (_FORMAT_VERSION, _DYNAMIC_FORMAT_VERSION)
#: Dimension 0 of a dynamic-batch build's input spec: any batch >= 1
ANY_BATCH = -1
_DEVICE_NAMES = {"cuda": "CUDA", "rocm": "ROCm", "opencl": "OpenCL", "vulkan": "Vulkan", "metal": "Metal"}
_REQUIRED = ("size", "sha256", "inputs", "target", "arch", "triple", "cpu_features")
#: TVM's allocation alignment (``kAllocAlignment``): compiled kernels may assume it of their arguments
_ALIGN = 64
_KDL_CPU = 1


def as_numpy(x, where: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach"):  # a torch.Tensor, torch not imported here
        return x.detach().cpu().numpy()
    raise TypeError(f"{where}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


def _shape_text(shape) -> str:
    if shape and shape[0] == ANY_BATCH:
        return "[" + ", ".join(["batch"] + [str(d) for d in shape[1:]]) + "] (any batch >= 1)"
    return str(list(shape))


def _shape_matches(shape, spec_shape) -> bool:
    if spec_shape and spec_shape[0] == ANY_BATCH:
        return len(shape) == len(spec_shape) and shape[0] >= 1 and list(shape[1:]) == list(spec_shape[1:])
    return list(shape) == list(spec_shape)


def input_batch(arrays: List[np.ndarray], specs: List[Dict[str, Any]]) -> Optional[int]:
    """The batch of checked inputs to a dynamic-batch build (None: a static build)."""
    dynamic = [a.shape[0] for a, s in zip(arrays, specs) if s["shape"] and s["shape"][0] == ANY_BATCH]
    return dynamic[0] if dynamic else None


@functools.lru_cache(maxsize=None)
def _np_dtype(name: str) -> np.dtype:
    """``np.dtype(name)``, made once per name (``str(arr.dtype)`` per call cost 2.5 us at batch 1)."""
    return np.dtype(name)


def checked_inputs(inputs, specs: List[Dict[str, Any]]) -> List[np.ndarray]:
    """Contiguous numpy inputs matching the compiled specs (float inputs are cast between
    float types; any other mismatch is an error naming the input). Float inputs with NaN are
    refused (ValueError), and so are embedding indices outside the table (IndexError, as torch).
    A spec whose dimension 0 is :data:`ANY_BATCH` (a dynamic-batch build) takes any batch
    >= 1 there, the same for every such input."""
    if len(inputs) != len(specs):
        raise ValueError(f"model was compiled for {len(specs)} input(s), got {len(inputs)}")
    out = []
    batch = None
    for i, (x, spec) in enumerate(zip(inputs, specs)):
        arr = as_numpy(x, f"input {i}")
        if not _shape_matches(arr.shape, spec["shape"]):
            raise ValueError(f"input {i} has shape {list(arr.shape)}, the model was compiled for "
                             f"{_shape_text(spec['shape'])}")
        if spec["shape"] and spec["shape"][0] == ANY_BATCH:
            if batch is not None and arr.shape[0] != batch[1]:
                raise ValueError(f"input {i} has batch {arr.shape[0]}, input {batch[0]} has {batch[1]}: the inputs "
                                 "of a dynamic-batch model share one batch")
            batch = batch or (i, arr.shape[0])
        want = _np_dtype(spec["dtype"])
        if arr.dtype != want:
            if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(want, np.floating):
                arr = arr.astype(want)
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


def arrange_inputs(args: Sequence, named: Dict[str, Any], specs: List[Dict[str, Any]]) -> List[Any]:
    """The inputs in the compiled order from a call's positional inputs, one dict of inputs
    (``exe({"input_ids": ids, "attention_mask": mask})``, a tokenizer's output) or keyword
    inputs, matched by the input names exported with the model (``spec["name"]``). TypeError
    naming the input for an unknown, missing or doubly given one."""
    if len(args) == 1 and isinstance(args[0], Mapping):
        if named:
            raise TypeError("give the inputs as one dict or as keywords, not both")
        named, args = dict(args[0]), ()
    if not named:
        return list(args)
    names = [s.get("name") for s in specs]
    if any(not isinstance(n, str) for n in names):
        raise TypeError("this model's inputs have no names (exported by an older tvm-rmsmp): pass them "
                        "positionally, in the compiled order")
    if len(args) > len(specs):
        raise ValueError(f"model was compiled for {len(specs)} input(s) {names}, got {len(args)} positional ones")
    out: List[Any] = list(args) + [None] * (len(specs) - len(args))
    for key, value in named.items():
        if key not in names:
            raise TypeError(f"unknown input {key!r}: the model's inputs are {names}")
        i = names.index(key)
        if out[i] is not None:
            raise TypeError(f"input {key!r} given twice (positionally and by name)")
        out[i] = value
    missing = [n for n, v in zip(names, out) if v is None]
    if missing:
        raise TypeError(f"missing input(s) {missing}: the model's inputs are {names}")
    return out


#: What calls return: numpy arrays (the default) or torch tensors sharing the output's memory.
OUTPUT_KINDS = ("numpy", "torch")


def host_tensor(arr: np.ndarray) -> tvm.runtime.Tensor:
    """A CPU tensor holding a copy of ``arr``, in a fresh numpy buffer aligned as TVM's kernels
    expect and handed over by DLPack (a quarter of ``tvm.runtime.tensor``'s cost, which
    allocates through the device API: 3 vs 13 us for one 768-float row)."""
    buf = np.empty(arr.nbytes + _ALIGN, np.uint8)
    start = (-buf.ctypes.data) % _ALIGN
    view = buf[start:start + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    np.copyto(view, arr)
    try:
        return tvm.runtime.from_dlpack(view)
    except (TypeError, ValueError, RuntimeError, BufferError):  # a dtype DLPack cannot carry
        return tvm.runtime.tensor(arr, tvm.cpu(0))


def numpy_copy(t) -> np.ndarray:
    """A numpy copy of an output: CPU tensors through DLPack (0.5 vs 5 us for ``Tensor.numpy()``,
    which parses the dtype and allocates through ctypes); other devices copy back as usual."""
    if not isinstance(t, tvm.runtime.Tensor):
        return t
    if t.device.dlpack_device_type() == _KDL_CPU:
        try:
            return np.from_dlpack(t).copy()
        except (TypeError, ValueError, RuntimeError, BufferError):
            pass
    return t.numpy()


def _output_converter(output: str):
    """The leaf converter of a call's ``output``: a numpy copy or ``torch.from_dlpack``
    (torch imported only here, when asked for: the runtime itself never needs it)."""
    if output == "numpy":
        return numpy_copy
    if output == "torch":
        try:  # a lazy, optional import: the runtime works where torch is absent
            torch = importlib.import_module("torch")
        except ImportError as err:
            raise ImportError(f"output='torch' needs torch, which does not import here ({err}); "
                              "the default output='numpy' does not") from err
        return lambda t: torch.from_numpy(t) if isinstance(t, np.ndarray) else torch.from_dlpack(t)
    raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")


def _to_numpy_outputs(value, leaf=numpy_copy) -> Union[np.ndarray, tuple]:
    if isinstance(value, (tvm.runtime.Tensor, np.ndarray)):
        return leaf(value)
    items = [_to_numpy_outputs(v, leaf) for v in value]
    return items[0] if len(items) == 1 else tuple(items)


def _map_arrays(value, fn):
    """``value`` (an array, or tuples and dicts of them) with ``fn`` applied to each array."""
    if isinstance(value, np.ndarray):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_arrays(v, fn) for k, v in value.items()}
    return tuple(_map_arrays(v, fn) for v in value)


def _leaves(value, leaf=numpy_copy) -> List[np.ndarray]:
    if isinstance(value, (tvm.runtime.Tensor, np.ndarray)):
        return [leaf(value)]
    return [x for v in value for x in _leaves(v, leaf)]


def check_output_structure(spec, where: str = "outputs") -> int:
    """Validate an output structure (see :class:`CompiledModel`); the number of its leaves."""
    if spec == "tensor":
        return 1
    if isinstance(spec, dict) and isinstance(spec.get("dict"), list) and all(
            isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) for item in spec["dict"]):
        return sum(check_output_structure(v, where) for _, v in spec["dict"])
    if isinstance(spec, dict) and isinstance(spec.get("tuple"), list):
        return sum(check_output_structure(v, where) for v in spec["tuple"])
    raise ValueError(f"{where}: not an output structure: {spec!r}")


def _rebuild(spec, leaves):
    if spec == "tensor":
        return leaves.pop(0)
    if "dict" in spec:
        return {k: _rebuild(v, leaves) for k, v in spec["dict"]}
    return tuple(_rebuild(v, leaves) for v in spec["tuple"])


class CompiledModel:
    """A compiled model: ``model(x)`` runs it (numpy or torch in, numpy out).

    Inputs: positional in the compiled order (``exe(ids, mask)``), one dict
    (``exe({"input_ids": ids, "attention_mask": mask})``, e.g. a tokenizer's output) or keywords
    (``exe(input_ids=ids, attention_mask=mask)``), named as the model's ``forward`` names them
    (``input_names``). ``output="torch"`` (per call, or ``exe.default_output = "torch"``)
    returns torch tensors that share the outputs' memory (DLPack, no copy); the default is numpy.
    ``output`` is therefore no input name to pass as a keyword (give such an input in a dict).

    ``outputs``: the structure of the model's result, as the torch model returned it
    (``"tensor"``, ``{"tuple": [...]}`` or ``{"dict": [[key, ...], ...]}``); calls return the
    same structure of arrays. None: a single array, or a tuple of them.

    ``variants`` (a dynamic-batch build, whose input specs have :data:`ANY_BATCH` as dimension
    0): ``{batch: function}``, the functions specialised for a batch size (``{1: "main_b1"}``);
    a call at another batch runs ``main``, built for any batch. ``last_function`` is the
    function the last call ran."""

    #: what calls return unless they say: "numpy" or "torch"
    default_output = "numpy"

    def __init__(self, executable, target, input_specs: List[Dict[str, Any]], ir: Optional[tvm.IRModule] = None,
                 stats: Optional[Dict[str, int]] = None, outputs=None, variants: Optional[Dict[int, str]] = None):
        if outputs is not None:
            check_output_structure(outputs)
        self.variants = {int(b): str(f) for b, f in (variants or {}).items()}
        self.last_function: Optional[str] = None
        self._batch: Optional[int] = None
        self.outputs = outputs
        self.executable = executable
        self.target = target
        self.input_specs = input_specs
        self.ir = ir
        self.stats = stats or {}
        self.device = tvm.device(target.kind.name if target.kind.name != "llvm" else "cpu", 0)
        self._vm = None
        self._functions: Dict[str, Any] = {}  # the VM's functions by name, looked up once

    def _require_device(self) -> None:
        """Raise a clear error where this machine lacks the device the model was compiled for
        (compiling for one, e.g. CUDA, works anywhere; running needs the device)."""
        kind = self.target.kind.name
        if kind == "llvm" or self.device.exist:
            return
        name = _DEVICE_NAMES.get(kind, kind)
        raise RuntimeError(
            f"no {name} device on this machine: this model was compiled for target kind {kind!r} and runs only "
            f"where one is. Export it here with export_library(path) and load and run it on a machine with a "
            f"{name} device (tvm_rmsmp.load(path))"
        )

    @property
    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            self._require_device()
            self._vm = relax.VirtualMachine(self.executable, self.device)
        return self._vm

    @property
    def dynamic_batch(self) -> bool:
        """Whether this build takes any batch (>= 1) as dimension 0 of its inputs."""
        return any(s["shape"] and s["shape"][0] == ANY_BATCH for s in self.input_specs)

    def function_for(self, batch: Optional[int]) -> str:
        """The function that runs a call at ``batch``: a specialised one where the build has it."""
        return self.variants.get(batch, "main") if batch is not None else "main"

    def _inputs(self, inputs) -> List[tvm.runtime.Tensor]:
        arrays = checked_inputs(inputs, self.input_specs)
        self._require_device()
        self._batch = input_batch(arrays, self.input_specs)
        if self.device.dlpack_device_type() == _KDL_CPU:
            return [host_tensor(arr) for arr in arrays]
        return [tvm.runtime.tensor(arr, self.device) for arr in arrays]

    def _function(self, name: str):
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self.vm[name]
        return fn

    @property
    def input_names(self) -> List[Optional[str]]:
        """The inputs' names, in the compiled order (None for a library exported without them)."""
        return [s.get("name") for s in self.input_specs]

    def __call__(self, *inputs, output: Optional[str] = None, **named):
        leaf = _output_converter(self.default_output if output is None else output)
        args = self._inputs(arrange_inputs(inputs, named, self.input_specs))  # input errors, then a missing device
        self.last_function = self.function_for(self._batch)
        return self._structured(self._function(self.last_function)(*args), leaf)

    def _structured(self, value, leaf=numpy_copy):
        if self.outputs is None:
            return _to_numpy_outputs(value, leaf)
        return _rebuild(self.outputs, _leaves(value, leaf))

    def benchmark(self, *inputs, repeat: int = 20, min_repeat_ms: int = 20) -> float:
        """Median seconds per call over ``repeat`` measurements (TVM's time evaluator)."""
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        args = self._inputs(arrange_inputs(inputs, {}, self.input_specs))  # positional or one dict
        timer = self.vm.time_evaluator(self.function_for(self._batch), self.device, number=1, repeat=repeat,
                                       min_repeat_ms=min_repeat_ms)
        return float(timer(*args).median)

    def export_library(self, path: str, cc: Optional[str] = None) -> str:
        """Write the compiled library to ``path`` and then its sidecar ``path + '.json'``.

        Each file is written to a temporary name and renamed into place, with the permissions
        a plain write would give it (``0o666`` less the umask). The sidecar holds what
        :func:`load` checks before it runs anything: the input specs, the target, the
        library's size and sha256, and the architecture (triple) and CPU features the code was
        compiled for. If anything fails, neither file is left behind (nor a temporary one).

        cc: a (cross) C++ compiler to link with, e.g. ``aarch64-linux-gnu-g++`` for an AArch64 target.
        """
        path = os.fspath(path)
        meta_path = path + ".json"
        for p in (path, meta_path):
            if os.path.isdir(p):
                raise IsADirectoryError(f"cannot export the library to {path!r}: {p!r} is a directory")
        cpu = cpu_part(self.target)
        triple = target_triple(cpu)
        suffix = os.path.splitext(path)[1] or ".so"
        placed = False
        try:
            with atomic_output(meta_path) as meta_tmp:
                with atomic_output(path, suffix=suffix) as lib_tmp:
                    with filtered_native_log():  # TVM 0.27 logs one line per function saved
                        if cc is None:
                            self.executable.export_library(lib_tmp)
                        else:
                            from tvm.support import cc as _cc

                            self.executable.export_library(
                                lib_tmp, fcompile=lambda out, files, **kw: _cc.create_shared(out, files, cc=cc, **kw)
                            )
                    size, sha = _digest(lib_tmp, sync=True)
                    meta = {
                        "format": _FORMAT,
                        "version": _DYNAMIC_FORMAT_VERSION if self.dynamic_batch else _FORMAT_VERSION,
                        "library": os.path.basename(path),
                        "size": size,
                        "sha256": sha,
                        "inputs": self.input_specs,
                        "outputs": self.outputs,
                        "target": json.loads(str(self.target)),
                        "arch": triple_arch(triple),
                        "triple": triple,
                        "cpu_features": target_cpu_features(cpu),
                    }
                    if self.dynamic_batch:
                        meta["variants"] = {str(b): f for b, f in sorted(self.variants.items())}
                    with open(meta_tmp, "w") as fh:
                        json.dump(meta, fh, indent=1)
                        fh.flush()
                        os.fsync(fh.fileno())
                placed = True  # the library is in place; its sidecar follows
        except BaseException:
            if placed and os.path.lexists(path):
                os.unlink(path)  # a library without its sidecar is no export
            raise
        return path


class OpenCLCompiledModel(CompiledModel):
    """A model compiled for an OpenCL target (Mali, Adreno, any OpenCL device).

    Calls run the TVM-generated kernels through pyopencl on the local OpenCL device (PoCL on
    a CPU: a functional check and a relative performance proxy, not a phone).
    :meth:`export_library` writes the TVM library for the device, whose host part runs
    under TVM's runtime with its OpenCL support (e.g. TVM's RPC app on a phone).

    A dynamic-batch build (``specialise``: batch -> the model's scheduled module at that
    batch; ``variants``: the batches compiled up front, ``{batch: module}``) runs each batch
    size through its own graph, compiled on the first call at that size; it cannot be
    exported (compile once per batch size for that).
    """

    def __init__(self, mod: tvm.IRModule, target, input_specs, stats=None, specialise=None,
                 variants: Optional[Dict[int, tvm.IRModule]] = None):
        super().__init__(None, target, input_specs, ir=mod, stats=stats,
                         variants={b: f"main_b{b}" for b in (variants or {})})
        self.device = tvm.cpu()  # inputs are checked and staged on the host; the graph uploads them
        self.specialise = specialise
        self._graphs: Dict[int, Any] = {}
        if specialise is None:
            self.lowered, self.graph = self._graph(mod)
        for b, m in (variants or {}).items():
            self._graphs[int(b)] = self._graph(m)[1]

    def _graph(self, mod: tvm.IRModule):
        from tvm.relax.backend.gpu_generic import legalize_passes

        from ..runtime.opencl import OpenCLGraph

        with self.target:
            lowered = tvm.transform.Sequential(legalize_passes(self.target))(mod)
        return lowered, OpenCLGraph(lowered, self.target)

    def _graph_for(self, arrays):
        if self.specialise is None:
            return self.graph
        batch = self._batch
        if batch not in self._graphs:
            self._graphs[batch] = self._graph(self.specialise(batch))[1]
            self.variants[batch] = f"main_b{batch}"
        self.last_function = f"main_b{batch}"
        return self._graphs[batch]

    @property
    def vm(self):
        raise RuntimeError("an OpenCL model runs through its OpenCL graph executor, not the local VM")

    def __call__(self, *inputs, output: Optional[str] = None, **named):
        leaf = _output_converter(self.default_output if output is None else output)
        arrays = [t.numpy() for t in self._inputs(arrange_inputs(inputs, named, self.input_specs))]
        return _map_arrays(self._graph_for(arrays).run(arrays), leaf)

    def benchmark(self, *inputs, repeat: int = 20, min_repeat_ms: int = 0) -> float:
        """Median wall-clock seconds per call on the local OpenCL device (inputs and outputs copied)."""
        arrays = [t.numpy() for t in self._inputs(arrange_inputs(inputs, {}, self.input_specs))]
        return self._graph_for(arrays).time(arrays, repeat=repeat)

    def export_library(self, path: str, cc: Optional[str] = None) -> str:
        """Build with TVM for the target (host part as the target's host says) and export it."""
        if self.specialise is not None:
            raise ValueError("an OpenCL dynamic-batch build has a graph per batch size and cannot be exported as "
                             "one library: compile with dynamic_batch=False for the batch size to export")
        if self.executable is None:
            self.executable = tvm.compile(self.ir, target=self.target)
        return super().export_library(path, cc=cc)


def _digest(path: str, sync: bool = False) -> Tuple[int, str]:
    """(size, sha256 hex) of a file; ``sync`` also flushes it to disk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(fh.fileno())
    return size, h.hexdigest()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_sidecar(path: str) -> Dict[str, Any]:
    """The sidecar of the library at ``path``, checked key by key; errors name the file."""
    meta_path = path + ".json"
    try:
        with open(meta_path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{meta_path!r} is missing: it holds the input specs, target and checksum written with the library"
        ) from None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path!r} is corrupt: not JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path!r} is corrupt: expected a JSON object, got a {type(meta).__name__}")
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{meta_path!r} is not a tvm-rmsmp sidecar (format {meta.get('format')!r}, expected {_FORMAT!r})")
    version = meta.get("version")
    if version not in _READ_VERSIONS:
        raise ValueError(
            f"{meta_path!r} has sidecar version {version!r}; this tvm-rmsmp reads versions "
            f"{', '.join(str(v) for v in _READ_VERSIONS)}: export the library again with this version"
        )
    any_batch = version == _DYNAMIC_FORMAT_VERSION
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{meta_path!r} is corrupt: missing {', '.join(repr(k) for k in missing)}")
    checks = {
        "size": _is_int(meta["size"]) and meta["size"] >= 0,
        "sha256": isinstance(meta["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]) is not None,
        "inputs": isinstance(meta["inputs"], list) and all(
            isinstance(s, dict) and isinstance(s.get("dtype"), str) and isinstance(s.get("shape"), list)
            and all(_is_int(d) and (d >= 0 or (any_batch and axis == 0 and d == ANY_BATCH))
                    for axis, d in enumerate(s["shape"]))
            and (s.get("index_bound") is None or (_is_int(s["index_bound"]) and s["index_bound"] >= 1))
            and (s.get("name") is None or isinstance(s["name"], str))
            for s in meta["inputs"]),
        "target": isinstance(meta["target"], dict) and isinstance(meta["target"].get("kind"), str),
        "arch": isinstance(meta["arch"], str) and bool(meta["arch"]),
        "triple": isinstance(meta["triple"], str) and bool(meta["triple"]),
        "cpu_features": isinstance(meta["cpu_features"], list) and all(isinstance(f, str) for f in meta["cpu_features"]),
    }
    if any_batch:
        variants = meta.get("variants")
        checks["variants"] = isinstance(variants, dict) and all(
            isinstance(b, str) and b.isdigit() and int(b) >= 1 and isinstance(f, str) and f
            for b, f in variants.items())
    if meta.get("outputs") is not None:
        try:
            check_output_structure(meta["outputs"])
        except ValueError:
            checks["outputs"] = False
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{meta_path!r} is corrupt: invalid {', '.join(repr(k) for k in bad)}")
    return meta


def check_host_compatible(meta: Dict[str, Any], path: str) -> None:
    """Raise ValueError if this machine cannot run the code a sidecar describes: another
    architecture, or CPU features this CPU lacks (instead of SIGILL at the first kernel)."""
    target = meta["target"]
    cpu = target if target.get("kind") == "llvm" else target.get("host")
    cpu = cpu if isinstance(cpu, dict) else {}
    part = "" if target.get("kind") == "llvm" else f" (the host code of a {target.get('kind')} library)"
    here = host_triple()
    if meta["arch"] != triple_arch(here):
        raise ValueError(
            f"{path!r}{part} was built for {meta['arch']} ({meta['triple']}); this machine is "
            f"{triple_arch(here)} ({here}): run it on a {meta['arch']} machine or recompile it for this one"
        )
    missing = missing_host_features(meta["cpu_features"])
    if missing:
        raise ValueError(
            f"{path!r}{part} was built for a CPU (mcpu {cpu.get('mcpu', 'generic')!r}) with features this "
            f"machine lacks: {', '.join(missing)}; recompile it for this machine (target 'llvm') or run it "
            f"on a CPU that has them"
        )


def cache_dir() -> str:
    """The private directory (this user's only, mode 0700) that :func:`load` copies libraries
    into, one file per content (named by its sha256): ``$TVM_RMSMP_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/tvm-rmsmp/libraries`` (``~/.cache``), else one in the temp directory."""
    env = os.environ.get("TVM_RMSMP_CACHE_DIR")
    if env:
        candidates = [env]
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        candidates = [os.path.join(base, "tvm-rmsmp", "libraries"),
                      os.path.join(tempfile.gettempdir(), f"tvm-rmsmp-libraries-{uid}")]
    errors = []
    for d in candidates:
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError("not a directory")
            if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
                raise PermissionError("not owned by this user, or writable by others")
            return d
        except OSError as err:
            errors.append(f"{d!r}: {err}")
    raise OSError(f"no private directory to load libraries from: {'; '.join(errors)}")


def load(path: str) -> CompiledModel:
    """Load a library written by :meth:`CompiledModel.export_library`.

    Before anything is mapped: the sidecar is validated, the library's size and sha256 must
    be the sidecar's (a truncated library or a sidecar of another one is refused, not a
    SIGBUS), and the code must suit this machine (architecture, CPU features: an error, not a
    SIGILL). The library then runs from a private copy named by its content, so a library
    re-exported to the same path and loaded again in this process is the new one (the
    dynamic loader caches by path).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no compiled library at {path!r}")
    meta = _read_sidecar(path)
    meta_path = path + ".json"
    try:
        target = tvm.target.Target(meta["target"])
    except Exception as err:  # noqa: BLE001 - TVM's error types vary
        raise ValueError(f"{meta_path!r} is corrupt: its target is not a TVM target ({err})") from err
    actual = os.path.getsize(path)
    if actual != meta["size"]:
        raise ValueError(
            f"{path!r} is {actual} bytes but its sidecar {meta_path!r} says {meta['size']}: the library is "
            f"truncated or the sidecar belongs to another library; export it again"
        )
    suffix = os.path.splitext(path)[1] or ".so"
    private = os.path.join(cache_dir(), meta["sha256"] + suffix)
    with atomic_output(private, suffix=suffix, mode=0o600) as tmp:
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
                size += len(chunk)
        if size != meta["size"] or h.hexdigest() != meta["sha256"]:
            raise ValueError(
                f"{path!r} does not match its sidecar {meta_path!r} (sha256 {h.hexdigest()[:16]}..., the sidecar "
                f"says {meta['sha256'][:16]}...): the sidecar belongs to another library or the library was "
                f"changed; export it again"
            )
        check_host_compatible(meta, path)
    try:
        with filtered_native_log():  # and one per function loaded
            lib = tvm.runtime.load_module(private)
    except Exception as err:  # noqa: BLE001
        try:
            os.unlink(private)  # it never loaded: keep no copy of it
        except OSError:
            pass
        raise ValueError(f"{path!r} is not a loadable TVM library: {err}") from err
    variants = {int(b): f for b, f in (meta.get("variants") or {}).items()}
    return CompiledModel(lib, target, meta["inputs"], outputs=meta.get("outputs"), variants=variants)
