"""Save a quantized model to a directory and load it back: safetensors and JSON, no pickle.

    rmsmp.save_quantized(q, "resnet-q", factory="my_models:resnet20")   # or hessians=True
    q2 = rmsmp.load_quantized("resnet-q")                      # the factory builds the float model
    q2 = rmsmp.load_quantized("resnet-q", model=ResNet20())    # or: a float model you build

The directory (format ``tvm-rmsmp-quantized``, version :data:`FORMAT_VERSION`):

``weights.safetensors``
    The quantized model's whole ``state_dict``: every RMSMP layer's integer weights
    (``weight_int``), row scales, float and integer bias, output scales, and the float state of
    everything else (embeddings, norms, BatchNorms that could not be folded, skipped layers).
    Plus, per RMSMP layer, its row plan as scheme ids (``__rmsmp__.<layer>.scheme_ids``, uint8
    indices into the layer's ``scheme_table`` in ``config.json``).
``config.json``
    The format name and version, the :class:`~tvm_rmsmp.RMSMPConfig`, the factory (if any), the
    size and sha256 of each safetensors file, and per RMSMP layer: its kind (``RMSMPLinear`` /
    ``RMSMPConv2d``), the activation quantizer (bits, signed codes, scale and the float32
    reciprocal the kernels use, zero point, per-token, clamp bounds ``qmin``/``qmax``),
    stride/padding/dilation/groups, the scheme table and the weight shape.
``hessians.safetensors`` (``hessians=True``)
    The per-row Hessian traces (``q.rmsmp_row_hessian``), so another configuration can be
    quantized from the same estimate (``quantize(..., row_hessian=q.rmsmp_row_hessian)``)
    without the minutes the estimate takes on a CPU.

**How the module is rebuilt.** A state dict is not a model: the architecture (the Python
code of the float model) has to come from somewhere. :func:`load_quantized` builds the float
model (``model=`` an instance, a callable returning one, or a ``"module:callable"`` string;
with ``model=None`` the factory recorded at save time), then replays the structural steps
:func:`tvm_rmsmp.quantize` took (BatchNorm folding when the config says so,
``nn.MultiheadAttention`` decomposed into Linear projections), puts an RMSMP layer at every
saved layer's place and loads the saved state into it. Module names, kinds and shapes are
checked first; a mismatch names the layer (or the tensor) and both shapes. The float model's
own weights are never used: it may be freshly initialized.

**Trust.** Loading never unpickles anything (safetensors and JSON only), but the factory is
code: ``load_quantized(path)`` with ``model=None`` *imports the module named in the
directory's config.json and calls it*. Load directories whose factory you trust, as you would
import their package, or pass ``model=`` yourself (the recorded factory is then ignored).

Writes are atomic: the directory is written under a temporary name next to ``path`` and
renamed into place; an existing saved model at ``path`` is replaced only once the new one is
complete, and a directory that is not one is never overwritten.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, Optional, Tuple, Union

import attrs
import numpy as np
import torch
from torch import nn

from ..quant.config import HessianConfig, RMSMPConfig, RMSMPWarning, skip_matcher
from ..quant.plan import RowPlan
from .attention import decompose_attention
from .layers import ActQuant, RMSMPConv2d, RMSMPLinear, _fold_batchnorm, _RMSMPLayer, _set_submodule

__all__ = ["save_quantized", "load_quantized", "FORMAT", "FORMAT_VERSION"]

FORMAT = "tvm-rmsmp-quantized"
#: 1: first version
FORMAT_VERSION = 1
WEIGHTS, CONFIG, HESSIANS = "weights.safetensors", "config.json", "hessians.safetensors"
#: prefix of the tensors in weights.safetensors that are not in the model's state dict
_PLAN_PREFIX = "__rmsmp__."
_KINDS = {"RMSMPLinear": RMSMPLinear, "RMSMPConv2d": RMSMPConv2d}
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


# --------------------------------------------------------------------------------------------
# The factory: "module:callable" (+ JSON arguments)
# --------------------------------------------------------------------------------------------
def _resolve(spec: str) -> Callable:
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _json_value(value, what: str):
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError(f"factory: {what} {value!r} is not JSON (only JSON arguments can be recorded)") from None
    return json.loads(text)


def _factory_record(factory) -> Optional[Dict[str, Any]]:
    """``{"callable": "module:qualname", "args": [...], "kwargs": {...}}`` for a factory given as
    a string, an importable function or class, or a ``functools.partial`` of one with JSON
    arguments; checked now (it must resolve) so a bad factory fails at save time, not load."""
    if factory is None:
        return None
    args, kwargs = [], {}
    if isinstance(factory, functools.partial):
        args = _json_value(list(factory.args), "positional arguments")
        kwargs = _json_value(dict(factory.keywords), "keyword arguments")
        factory = factory.func
    if isinstance(factory, str):
        spec = factory
        if not _FACTORY_RE.match(spec):
            raise ValueError(f"factory must be 'module:callable' (e.g. 'my_models:build_resnet'), got {spec!r}")
        try:
            target = _resolve(spec)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"factory {spec!r} does not resolve: {type(err).__name__}: {err}") from err
        if not callable(target):
            raise ValueError(f"factory {spec!r} is a {type(target).__name__}, not a callable")
    elif callable(factory):
        module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
        if not module or not qualname or "<" in qualname or module == "__main__":
            raise ValueError(
                f"factory {factory!r} cannot be found again by a later process (a lambda, a local function or one "
                "defined in __main__); give a function or class importable from a module, as 'module:callable'"
            )
        spec = f"{module}:{qualname}"
        try:
            same = _resolve(spec) is factory
        except (ImportError, AttributeError):
            same = False
        if not same:
            raise ValueError(f"factory {factory!r} is not importable as {spec!r}; give it as 'module:callable'")
    else:
        raise TypeError(f"factory must be a 'module:callable' string, a function or a functools.partial, "
                        f"got {type(factory).__name__}")
    return {"callable": spec, "args": args, "kwargs": kwargs}


def _call_factory(record: Dict[str, Any], where: str) -> nn.Module:
    spec = record.get("callable") if isinstance(record, dict) else None
    if not isinstance(spec, str) or not _FACTORY_RE.match(spec):
        raise ValueError(f"{where}: invalid factory {record!r}")
    try:
        fn = _resolve(spec)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{where}: the factory {spec!r} does not import here ({type(err).__name__}: {err}); "
                         "install the package that defines the model, or pass load_quantized(path, model=...)") from err
    model = fn(*record.get("args", []), **record.get("kwargs", {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: the factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


# --------------------------------------------------------------------------------------------
# JSON forms
# --------------------------------------------------------------------------------------------
def _config_json(cfg: RMSMPConfig) -> Dict[str, Any]:
    d = attrs.asdict(cfg, recurse=True)
    d["skip"] = list(cfg.skip)
    return d


def _config_from_json(d: Dict[str, Any], where: str) -> RMSMPConfig:
    try:
        d = dict(d)
        d["hessian"] = HessianConfig(**d.get("hessian", {}))
        return RMSMPConfig(**d)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{where}: invalid quantization config ({type(err).__name__}: {err})") from err


def _jsonable(value):
    if attrs.has(type(value)):
        return _jsonable(attrs.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _layer_json(layer: _RMSMPLayer) -> Dict[str, Any]:
    table = list(dict.fromkeys(layer.schemes))
    out = {
        "kind": type(layer).__name__,
        "layer_name": layer.layer_name,
        "op": layer.op,
        "weight_shape": list(layer.weight_int.shape),
        "scheme_table": table,
        "rows": {s: int(sum(1 for r in layer.schemes if r == s)) for s in table},
        "act": {"bits": int(layer.act_bits), "signed": bool(layer.act_signed), "scale": float(layer.act_scale),
                "inv_scale": float(layer.inv_act_scale), "zero_point": layer.act_zero_point,
                "per_token": bool(layer.act_per_token), "qmin": int(layer.qmin), "qmax": int(layer.qmax)},
    }
    if layer.op == "conv2d":
        out.update(stride=[int(v) for v in layer.stride], padding=[int(v) for v in layer.padding],
                   dilation=[int(v) for v in layer.dilation], groups=1)
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _digest(path: str) -> Tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors; tensors sharing storage (tied weights) are
    copied apart (safetensors stores each once; loading ties them again through the model)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.numel() else None
        if key is not None and (key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        if key is not None:
            seen.add(key)
        out[k] = t
    return out


def _is_saved_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, CONFIG), encoding="utf-8") as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _place(tmp: str, path: str) -> None:
    """Rename the finished ``tmp`` directory to ``path``; an existing saved model (or an empty
    directory) there is replaced, anything else is refused."""
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise FileExistsError(f"{path!r} exists and is not a directory: not overwritten")
        if os.listdir(path) and not _is_saved_dir(path):
            raise FileExistsError(f"{path!r} is a non-empty directory that is not a saved quantized model "
                                  f"(no {CONFIG} of format {FORMAT!r}): not overwritten")
        old = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.old.")
        os.rmdir(old)
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def save_quantized(q: nn.Module, path: Union[str, os.PathLike], *, hessians: bool = False,
                   factory: Union[None, str, Callable] = None) -> str:
    """Write the quantized model ``q`` (from :func:`tvm_rmsmp.quantize` or
    :func:`tvm_rmsmp.convert_qat`) to the directory ``path``; returns the path.

    hessians: also write ``q.rmsmp_row_hessian`` (the row Hessian traces; an error if the
        model's assignment rule did not estimate them).
    factory: how :func:`load_quantized` can build the float model without being given one:
        ``"module:callable"`` (a function or class, called without arguments), the callable
        itself if it is importable (not a lambda, a local function or one in ``__main__``), or a
        ``functools.partial`` of one with JSON arguments. It is resolved now, so a factory that
        does not import fails here. Loading imports it: see the module docstring, "Trust".

    The directory appears complete or not at all (written under a temporary name and renamed);
    an existing saved model at ``path`` is replaced, any other existing path is refused.
    """
    from safetensors.torch import save_file

    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a quantized torch.nn.Module, got {type(q).__name__}")
    fake = [getattr(m, "layer_name", n) for n, m in q.named_modules()
            if getattr(m, "rmsmp_quantized_layer", False) and not isinstance(m, _RMSMPLayer)]
    if fake:
        raise ValueError(f"q has QAT (fake-quantized) layers {fake[:4]}: save the integer model, "
                         "save_quantized(convert_qat(qat), path)")
    layers = {n: m for n, m in q.named_modules() if isinstance(m, _RMSMPLayer)}
    if not layers:
        raise ValueError("q has no RMSMP layer: save_quantized saves the result of tvm_rmsmp.quantize or convert_qat")
    cfg = getattr(q, "rmsmp_config", None)
    if not isinstance(cfg, RMSMPConfig):
        raise ValueError("q has no rmsmp_config: save_quantized saves the result of tvm_rmsmp.quantize or convert_qat")
    fixed = [n for n, m in layers.items() if getattr(m, "out_act", None) is not None]
    if fixed:
        raise ValueError(f"q uses requant='fixed_point' (layers {fixed[:4]}): save_quantized does not store the "
                         "fixed-point epilogue's output quantizers yet; save the float-epilogue model and "
                         "quantize again with requant='fixed_point'")
    row_hessian = getattr(q, "rmsmp_row_hessian", None) or {}
    if hessians and not row_hessian:
        rule = (getattr(q, "rmsmp_report", None) or {}).get("assign")
        raise ValueError(f"hessians=True but q holds no row Hessian traces (its assignment rule {rule!r} did not "
                         "estimate them): save without hessians, or quantize with assign='hessian'")
    record = _factory_record(factory)

    tensors = _state_tensors(q)
    for name, layer in layers.items():
        table = list(dict.fromkeys(layer.schemes))
        if len(table) > 255:
            raise ValueError(f"layer {name!r}: more than 255 schemes")
        tensors[f"{_PLAN_PREFIX}{name}.scheme_ids"] = torch.tensor([table.index(s) for s in layer.schemes],
                                                                   dtype=torch.uint8, device="cpu")
        mask = getattr(layer, "prune_mask", None)  # a pruned layer (nn/prune.py): its mask travels with it
        if isinstance(mask, torch.Tensor):
            tensors[f"{_PLAN_PREFIX}{name}.prune_mask"] = mask.detach().cpu().to(torch.uint8).contiguous()
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(path))}.tmp.")
    try:
        files = {}
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        files[WEIGHTS] = _digest(os.path.join(tmp, WEIGHTS))
        if hessians:
            h = {n: torch.from_numpy(np.ascontiguousarray(np.asarray(v, np.float64))) for n, v in row_hessian.items()}
            save_file(h, os.path.join(tmp, HESSIANS), metadata={"format": FORMAT})
            files[HESSIANS] = _digest(os.path.join(tmp, HESSIANS))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tvm_rmsmp_version": getattr(sys.modules[__name__.split(".")[0]], "__version__", None),
            "torch_version": torch.__version__.split("+")[0],
            "files": {k: {"size": s, "sha256": d} for k, (s, d) in files.items()},
            "factory": record,
            "config": _config_json(cfg),
            "structure": {"bn_folded": cfg.fold_bn, "attention_decomposed": True},
            "layers": {n: _layer_json(m) for n, m in layers.items()},
            "report": _jsonable(getattr(q, "rmsmp_report", None) or {}),
        }
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o666 & ~_umask())
            _fsync(os.path.join(tmp, f))
        os.chmod(tmp, 0o777 & ~_umask())
        _place(tmp, path)
        _fsync(parent)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# load_quantized
# --------------------------------------------------------------------------------------------
def _read_config(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved quantized model at {path!r} (the directory does not exist)")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path!r} is not a directory: save_quantized writes a directory "
                                 f"({CONFIG}, {WEIGHTS})")
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path!r} is not a saved quantized model: it has no {CONFIG} "
                         "(save_quantized writes one)")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path!r} is corrupt: not JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path!r} is not a saved quantized model: {CONFIG} has format {got!r}, "
                         f"expected {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{cfg_path!r} is corrupt: format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path!r} was written in format version {version} by a newer tvm-rmsmp "
                         f"({meta.get('tvm_rmsmp_version')!r}); this one reads versions up to {FORMAT_VERSION}: "
                         "upgrade tvm-rmsmp")
    for key, kind in (("files", dict), ("config", dict), ("layers", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{cfg_path!r} is corrupt: {key!r} missing or not a JSON object")
    if WEIGHTS not in meta["files"]:
        raise ValueError(f"{cfg_path!r} is corrupt: no entry for {WEIGHTS} in 'files'")
    return meta


def _load_tensors(path: str, name: str, meta: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file!r} is missing from the saved model")
    entry = meta["files"][name]
    size, sha = _digest(file)
    if not isinstance(entry, dict) or size != entry.get("size") or sha != entry.get("sha256"):
        raise ValueError(f"{file!r} is corrupt or truncated: {size} bytes, sha256 {sha[:16]}..., but {CONFIG} "
                         f"records {entry.get('size') if isinstance(entry, dict) else '?'} bytes; save the model again")
    try:
        return load_file(file)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"{file!r} is not a readable safetensors file ({type(err).__name__}: {err})") from err


def _float_model(model, meta: Dict[str, Any], path: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
    if isinstance(model, str):
        record = _factory_record(model)
        return _call_factory(record, f"model={model!r}")
    if callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"model() returned a {type(built).__name__}, not a torch.nn.Module")
        return built
    if model is not None:
        raise TypeError(f"model must be a float torch.nn.Module, a callable returning one, a 'module:callable' "
                        f"string or None, got {type(model).__name__}")
    if not meta.get("factory"):
        raise ValueError(f"{path!r} records no factory for the float model: pass one, "
                         "load_quantized(path, model=YourModel()) (a freshly built float model of the same "
                         "architecture), or save with save_quantized(q, path, factory='module:callable')")
    return _call_factory(meta["factory"], f"{path!r}")


def _rebuild_layer(name: str, info: Dict[str, Any], tensors: Dict[str, torch.Tensor], where: str) -> _RMSMPLayer:
    try:
        kind = _KINDS[info["kind"]]
        act = info["act"]
        table = list(info["scheme_table"])
        ids = tensors[f"{_PLAN_PREFIX}{name}.scheme_ids"].numpy()
        w = tensors[f"{name}.weight_int"]
        schemes = [table[int(i)] for i in ids]
        plan = RowPlan(info["layer_name"], kind.op, schemes, w.numpy(), tensors[f"{name}.row_scale"].numpy())
        quant = ActQuant(act["scale"], act["bits"], act["signed"], act["zero_point"], act["per_token"])
        bias = tensors[f"{name}.bias"].numpy()
        if kind is RMSMPConv2d:
            layer = kind(info["layer_name"], plan, bias, quant, info["stride"], info["padding"], info["dilation"])
        else:
            layer = kind(info["layer_name"], plan, bias, quant)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: layer {name!r} cannot be rebuilt from the saved data "
                         f"({type(err).__name__}: {err})") from err
    # the saved values exactly (the constructor re-derives them; a file is what it holds)
    layer.act_scale, layer.inv_act_scale = float(act["scale"]), float(act["inv_scale"])
    layer.qmin, layer.qmax = int(act["qmin"]), int(act["qmax"])
    mask = tensors.get(f"{_PLAN_PREFIX}{name}.prune_mask")
    if mask is not None:
        if tuple(mask.shape) != tuple(layer.weight_int.shape):
            raise ValueError(f"{where}: layer {name!r}: the saved prune mask has shape {list(mask.shape)}, "
                             f"the layer's weights {list(layer.weight_int.shape)}")
        if bool(((layer.weight_int != 0) & (mask == 0)).any()):
            raise ValueError(f"{where}: layer {name!r}: weights outside the saved prune mask are not zero")
        layer.register_buffer("prune_mask", mask.bool(), persistent=False)
    return layer


def _check_shapes(rebuilt: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor], path: str) -> None:
    missing = [k for k in saved if k not in rebuilt]
    extra = [k for k in rebuilt if k not in saved]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"saved tensors the model has no place for: {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
        if extra:
            parts.append(f"model tensors not in the saved model: {extra[:8]}" + (" ..." if len(extra) > 8 else ""))
        raise ValueError(f"{path!r}: the model's architecture differs from the saved one ({'; '.join(parts)}); "
                         "build the same float model that was quantized")
    for k, t in saved.items():
        r = rebuilt[k]
        if tuple(r.shape) != tuple(t.shape) or r.dtype != t.dtype:
            layer = k.rpartition(".")[0] or k
            raise ValueError(f"{path!r}: layer {layer!r}: tensor {k!r} is {list(t.shape)} {t.dtype} in the saved "
                             f"model and {list(r.shape)} {r.dtype} in the given model")


def load_quantized(path: Union[str, os.PathLike], model=None) -> nn.Module:
    """The quantized model saved by :func:`save_quantized` at ``path``, in eval mode, computing
    exactly what the saved one computed (bit-equal outputs; it compiles to the same library).

    model: the architecture, as a float model of the same kind as the one quantized: an
        ``nn.Module`` (copied, left untouched; its weights are not used, a freshly built one
        will do), a callable returning one, or a ``"module:callable"`` string. None: the factory
        recorded by ``save_quantized(..., factory=...)`` is imported and called; this runs code
        named by the directory (see the module docstring, "Trust").

    The result has ``rmsmp_config``, ``rmsmp_report`` (as saved: JSON values) and
    ``rmsmp_row_hessian`` (the saved traces, or ``{}`` if saved without ``hessians=True``).

    Errors: FileNotFoundError for a missing directory or file; ValueError for a directory
    that is not a saved model (no ``config.json`` or another format), one written in a newer
    format version, a corrupt or truncated file (checked against the sizes and sha256 in
    ``config.json`` before anything is parsed), and a model whose modules or shapes differ from
    the saved ones (naming the layer or tensor).
    """
    path = os.fspath(path)
    meta = _read_config(path)
    where = repr(path)
    cfg = _config_from_json(meta["config"], where)
    tensors = _load_tensors(path, WEIGHTS, meta)
    row_hessian: Dict[str, np.ndarray] = {}
    if HESSIANS in meta["files"]:
        row_hessian = {k: v.numpy() for k, v in _load_tensors(path, HESSIANS, meta).items()}

    q = _float_model(model, meta, path).eval()
    with warnings.catch_warnings():  # the quantize run already warned about what stays in float
        warnings.simplefilter("ignore", RMSMPWarning)
        if meta.get("structure", {}).get("bn_folded", cfg.fold_bn):
            q = _fold_batchnorm(q).eval()
        q, _ = decompose_attention(q, skip_matcher(cfg.skip))
    q.eval()

    modules = dict(q.named_modules())
    for name, info in meta["layers"].items():
        if not isinstance(info, dict):
            raise ValueError(f"{where}: config.json is corrupt: layer {name!r} is not a JSON object")
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"{where}: layer {name!r} was quantized but the given model has no module {name!r}; "
                             "build the same float model that was quantized")
        want = nn.Linear if info.get("kind") == "RMSMPLinear" else nn.Conv2d
        if not isinstance(mod, want):
            raise ValueError(f"{where}: layer {name!r} is a {type(mod).__name__} in the given model, the saved "
                             f"model quantized a {want.__name__} there")
        shape = list(mod.weight.shape)
        if shape != info.get("weight_shape"):
            raise ValueError(f"{where}: layer {name!r} has weight shape {shape} in the given model, "
                             f"{info.get('weight_shape')} in the saved model")
        _set_submodule(q, name, _rebuild_layer(name, info, tensors, where))
    state = {k: v for k, v in tensors.items() if not k.startswith(_PLAN_PREFIX)}
    _check_shapes(q.state_dict(), state, path)
    q.load_state_dict(state, strict=True)
    q.rmsmp_config = cfg
    q.rmsmp_row_hessian = row_hessian
    q.rmsmp_report = meta.get("report", {})
    return q.eval()
