"""``tvm-rmsmp`` command line (also ``python -m tvm_rmsmp``).

    tvm-rmsmp quantize --model pkg.mod:factory --calib calib.npy --out q_dir      # PTQ -> a saved quantized dir
    tvm-rmsmp qat      --model pkg.mod:factory --data pkg.mod:train_batches --out q_dir
    tvm-rmsmp compile  --model q_dir --input-shape 1,3,224,224 --out model.so     # or --model pkg.mod:factory --calib ...
    tvm-rmsmp tune     --model q_dir --input-shape 1,3,224,224 --target '{"kind": "llvm", ...}' --work-dir tuning/
                       [--rpc-tracker HOST:PORT --rpc-key KEY]
    tvm-rmsmp report   q_dir --out report/ [--model pkg.mod:factory --calib calib.npy] [--library model.so --input x.npy]
    tvm-rmsmp profile  model.so --input x.npy
    tvm-rmsmp demo [demo options]          the main job on the built-in Fashion-MNIST CNN
    tvm-rmsmp schemes                      registered schemes and their integer levels
    tvm-rmsmp --version

``--model`` takes a saved quantized directory (``tvm_rmsmp.save_quantized``) or
``package.module:callable``, a function returning a float ``torch.nn.Module`` (or the module
itself): that imports and runs the named module's code, with your permissions. Calibration
data (``--calib``) are ``.npy`` arrays (never unpickled), ``.pt`` tensors (read with
``torch.load(weights_only=True)``: tensors, lists and dicts of tensors only) or a dataset
callable ``package.module:callable`` returning an iterable of batches (also user code).
Progress bars go to stderr on a terminal; ``--quiet`` hides them.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import os
import sys
from typing import List, Optional, Sequence


def _die(msg: str):
    raise SystemExit(msg)


# --------------------------------------------------------------------------------------------
# Reading the arguments: models, calibration data, shapes, targets
# --------------------------------------------------------------------------------------------
def _import_callable(spec: str, flag: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        _die(f"{flag} must be a saved quantized directory or look like 'package.module:callable', got {spec!r}")
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        _die(f"{flag} {spec!r}: {err}")
    return obj


def _load_factory(spec: str):
    """The float model from ``package.module:callable`` (a module, or a function returning one)."""
    factory = _import_callable(spec, "--model")
    import torch

    if not (isinstance(factory, torch.nn.Module) or callable(factory)):
        _die(f"--model {spec!r} names a {type(factory).__name__}: it must be a torch.nn.Module or a "
             "function returning one")
    try:
        model = factory if isinstance(factory, torch.nn.Module) else factory()
    except TypeError as err:
        _die(f"--model {spec!r}: calling it with no arguments failed: {err}")
    if not isinstance(model, torch.nn.Module):
        _die(f"--model {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _saved_api():
    import tvm_rmsmp

    try:
        return tvm_rmsmp.save_quantized, tvm_rmsmp.load_quantized
    except AttributeError:
        _die("this tvm-rmsmp has no save_quantized/load_quantized (saved quantized directories)")


def _load_saved(path: str, float_model=None):
    _, load_quantized = _saved_api()
    try:
        return load_quantized(path) if float_model is None else load_quantized(path, model=float_model)
    except (OSError, ValueError, KeyError, TypeError) as err:
        _die(str(err) if repr(path) in str(err) else f"{path!r}: {err}")


def _is_saved_dir(spec: str) -> bool:
    return os.path.isdir(spec)


def _load_model(spec: str, float_spec: Optional[str] = None):
    """``(model, quantized)``: a saved quantized directory (its float model from ``float_spec``
    or the factory it records), or a float model from a callable."""
    if _is_saved_dir(spec):
        return _load_saved(spec, _load_factory(float_spec) if float_spec else None), True
    if os.sep in spec and ":" not in spec:
        _die(f"--model {spec!r}: no such directory")
    return _load_factory(spec).eval(), False


def _array_file(path: str, flag: str):
    """A tensor, a list/tuple of tensors or a dict of tensors from ``.npy`` or ``.pt``."""
    import numpy as np
    import torch

    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)  # never unpickle user files
        except (OSError, ValueError) as err:
            _die(f"{flag} {path!r} is not a readable .npy array: {err}")
        return torch.from_numpy(np.ascontiguousarray(arr))
    if path.endswith((".pt", ".pth")):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code
        except Exception as err:  # noqa: BLE001 - torch raises several kinds for a bad file
            _die(f"{flag} {path!r} is not a readable tensor file (torch.load with weights_only=True): "
                 f"{type(err).__name__}: {err}")
        ok = isinstance(obj, torch.Tensor) or (
            isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj)) or (
            isinstance(obj, dict) and obj and all(isinstance(t, torch.Tensor) for t in obj.values()))
        if not ok:
            _die(f"{flag} {path!r} holds a {type(obj).__name__}: give a tensor [N, ...], a list of tensors "
                 "(one per model input) or a dict of tensors (keyword inputs)")
        return obj
    _die(f"{flag} {path!r}: give a .npy or .pt file, or a dataset callable 'package.module:callable'")


def _split(data, batch: int, flag: str) -> list:
    """Batches of ``batch`` samples from a tensor, a list of tensors (several inputs) or a dict."""
    import torch

    if isinstance(data, torch.Tensor):
        data = data.to(torch.float32) if data.is_floating_point() else data
        if data.dim() == 0 or data.shape[0] == 0:
            _die(f"{flag} holds no samples (shape {tuple(data.shape)})")
        return list(torch.split(data, batch))
    items = list(data.values()) if isinstance(data, dict) else list(data)
    n = {int(t.shape[0]) if t.dim() else -1 for t in items}
    if len(n) != 1 or -1 in n or 0 in n:
        _die(f"{flag}: every input needs the same number of samples (axis 0), got shapes "
             f"{[tuple(t.shape) for t in items]}")
    parts = [_split(t, batch, flag) for t in items]
    if isinstance(data, dict):
        return [dict(zip(data.keys(), chunk)) for chunk in zip(*parts)]
    return [tuple(chunk) for chunk in zip(*parts)]


def _load_calib(specs: Sequence[str], batch: int, limit: Optional[int] = None, first_only: bool = False) -> list:
    """Calibration batches from ``--calib`` (one file per model input, or one dataset callable)."""
    if batch < 1:
        _die(f"--calib-batch must be at least 1, got {batch}")
    if limit is not None and limit < 1:
        _die(f"--calib-limit must be at least 1, got {limit}")
    if len(specs) == 1 and ":" in specs[0] and not os.path.exists(specs[0]):
        source = _import_callable(specs[0], "--calib")
        try:
            it = source() if callable(source) else source
            batches = list(itertools.islice(iter(it), limit))
        except TypeError as err:
            _die(f"--calib {specs[0]!r} must be (or return) an iterable of batches: {err}")
        if first_only:
            batches = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
        if not batches:
            _die(f"--calib {specs[0]!r} gave no batches")
        return batches
    files = [_array_file(s, "--calib") for s in specs]
    if len(files) > 1 and any(not hasattr(f, "dim") for f in files):
        _die("--calib given several times takes one tensor per file (one per model input); a .pt holding a list "
             "or dict of tensors is given alone")
    data = files[0] if len(files) == 1 else files
    batches = _split(data, batch, f"--calib {' '.join(specs)}")
    return batches[:limit] if limit else batches


def _parse_shapes(shapes: Sequence[str], dtypes: Sequence[str]) -> List[tuple]:
    out = []
    for s in shapes:
        try:
            out.append(tuple(int(d) for d in s.split(",")))
        except ValueError:
            _die(f"--input-shape must be comma-separated integers, got {s!r}")
        if not out[-1] or min(out[-1]) < 1:
            _die(f"--input-shape {s!r}: every dimension must be at least 1")
    if dtypes and len(dtypes) != len(out):
        _die(f"--input-dtype given {len(dtypes)} times for {len(out)} --input-shape")
    return out


def _example_inputs(args) -> tuple:
    """Zero tensors of ``--input-shape`` / ``--input-dtype``."""
    import torch

    if not args.input_shape:
        _die("--input-shape is required (the compiled model's input shape, e.g. 1,3,224,224; repeat it for "
             "several inputs)")
    shapes = _parse_shapes(args.input_shape, args.input_dtype or [])
    dtypes = args.input_dtype or ["float32"] * len(shapes)
    out = []
    for shape, dt in zip(shapes, dtypes):
        dtype = getattr(torch, dt, None)
        if not isinstance(dtype, torch.dtype):
            _die(f"--input-dtype {dt!r} is not a torch dtype (float32, int64, ...)")
        out.append(torch.zeros(shape, dtype=dtype))
    return tuple(out)


def _check_calib_shape(calib: list, shapes: Sequence[tuple], spec: str) -> None:
    import torch

    first = calib[0]
    tensors = [first] if isinstance(first, torch.Tensor) else list(first) if isinstance(first, (tuple, list)) else []
    for t, shape in zip(tensors, shapes):
        if isinstance(t, torch.Tensor) and (t.dim() != len(shape) or tuple(t.shape[1:]) != tuple(shape[1:])):
            whole = (sum(int(b.shape[0]) for b in calib), *t.shape[1:]) if len(tensors) == 1 else tuple(t.shape)
            _die(f"--calib {spec!r} has shape {whole}, the model input is {tuple(shape)}")


def _parse_target(text: str):
    if text.lstrip().startswith("{"):
        try:
            target = json.loads(text)
        except json.JSONDecodeError as err:
            _die(f"--target {text!r} is not a JSON target dict: {err}")
        return target
    return text


def _config(args):
    from tvm_rmsmp import RMSMPConfig

    try:
        ratio = json.loads(args.ratio) if args.ratio else None
    except json.JSONDecodeError as err:
        _die(f"--ratio {args.ratio!r} is not JSON ({err}); "
             'e.g. \'{"sp2_4": 0.6, "fixed_4": 0.35, "fixed_8": 0.05}\'')
    opts = dict(act_bits=args.act_bits, rounding=args.rounding, act_granularity=args.act_granularity,
                act_zero_point=args.act_zero_point)
    if args.assign:
        opts["assign"] = args.assign
    if args.skip:
        opts["skip"] = tuple(args.skip)
    try:
        return RMSMPConfig(ratio=ratio, **opts) if ratio else RMSMPConfig(**opts)
    except (TypeError, ValueError) as err:
        _die(f"--ratio / --act-bits / --rounding / --assign / --act-granularity / --act-zero-point / --skip: {err}")


def _print_plans(q) -> None:
    from tvm_rmsmp import row_plans

    for name, plan in row_plans(q).items():
        print(f"{name:30s} {plan.num_rows:6d} rows {plan.counts()}")


def _quantize(args, model, row_hessian=None):
    from tvm_rmsmp import quantize

    calib = _load_calib(args.calib, args.calib_batch, args.calib_limit, args.calib_first)
    if args.input_shape:
        _check_calib_shape(calib, _parse_shapes(args.input_shape, []), " ".join(args.calib))
    try:
        return quantize(model, _config(args), calib, row_hessian=row_hessian)
    except (TypeError, ValueError) as err:
        _die(f"quantize: {err}" + (" (on the command line: --calib-first)" if "input_fn" in str(err) else ""))


def _save(q, out: str, factory, hessians: bool) -> None:
    save_quantized, _ = _saved_api()
    # the row Hessians where the rule estimated them: a later re-quantization reuses them
    kwargs = {"hessians": hessians and bool(getattr(q, "rmsmp_row_hessian", None))}
    if factory:
        kwargs["factory"] = factory
    try:
        save_quantized(q, out, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        _die(f"--out {out!r}: {err}")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def _cmd_schemes(_args) -> int:
    from ..quant.schemes import get_scheme, list_schemes

    for name in list_schemes():
        s = get_scheme(name)
        print(f"{name:10s} {s.kind:6s} {s.bits} bits  levels {s.levels.tolist()}")
    return 0


def _float_model_for(spec: str, flag: str = "--model"):
    """``(float model, factory to record)`` behind ``spec``: a callable, or the factory that a
    saved directory records (``save_quantized(factory=...)``)."""
    if not _is_saved_dir(spec):
        return _load_factory(spec).eval(), _factory_of(spec)
    record = _saved_factory(spec)
    if record is None:
        _die(f"{flag} {spec!r} is a saved quantized directory that records no factory for the float model; "
             "give it as --float-model package.module:callable")
    fn = _import_callable(record["callable"], f"{flag} {spec!r} (its recorded factory)")
    args, kwargs = record.get("args") or [], record.get("kwargs") or {}
    try:
        model = fn(*args, **kwargs)
    except TypeError as err:
        _die(f"{flag} {spec!r}: calling its factory {record['callable']!r} failed: {err}")
    if not hasattr(model, "eval") or not hasattr(model, "named_modules"):
        _die(f"{flag} {spec!r}: its factory {record['callable']!r} gave a {type(model).__name__}, not a torch.nn.Module")
    factory = record["callable"] if not (args or kwargs) else functools.partial(fn, *args, **kwargs)
    return model.eval(), factory


def _factory_of(spec: str):
    """What ``save_quantized`` records for ``--model spec``: the spec, unless it names a module
    instance rather than a function (then nothing: load it with ``--float-model`` / ``model=``)."""
    import torch

    return None if isinstance(_import_callable(spec, "--model"), torch.nn.Module) else spec


def _saved_factory(path: str) -> Optional[dict]:
    """The factory record of a saved directory's config.json (``{"callable", "args", "kwargs"}``)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            record = json.load(fh).get("factory")
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("callable"), str) else None


def _cmd_quantize(args) -> int:
    hessians = None
    if _is_saved_dir(args.model):  # re-quantize: the float model from the recorded factory, the saved Hessians
        model, factory = _float_model_for(args.float_model or args.model)
        saved = _load_saved(args.model, model)
        hessians = getattr(saved, "rmsmp_row_hessian", None) or None
        if hessians:
            print(f"re-quantizing with the row Hessians saved in {args.model}")
    else:
        model, factory = _float_model_for(args.model)
    q = _quantize(args, model, hessians)
    _print_plans(q)
    _save(q, args.out, factory, not args.no_hessians)
    print(f"wrote {args.out}")
    return 0


def _cmd_qat(args) -> int:
    import torch

    from tvm_rmsmp import QATConfig, convert_qat, prepare_qat, train_qat

    model = _load_factory(args.model).eval()
    source = _import_callable(args.data, "--data")
    if not callable(source):
        _die(f"--data {args.data!r} must be a callable returning an iterable of (inputs, target) batches")

    def epoch_batches(_epoch):
        it = source()
        return itertools.islice(iter(it), args.max_steps) if args.max_steps else it

    if args.calib:
        calib = _load_calib(args.calib, args.calib_batch, args.calib_limit, args.calib_first)
    else:  # the inputs of the first training batches
        calib = [b[0] for b in itertools.islice(iter(source()), args.calib_limit or 4)]
        if not calib:
            _die(f"--data {args.data!r} gave no batches")
    losses = {"cross_entropy": torch.nn.functional.cross_entropy, "mse": torch.nn.functional.mse_loss}
    try:
        qcfg = QATConfig(epochs=args.epochs, lr=args.lr, scale_lr=args.scale_lr, distill=args.distill,
                         distill_weight=0.5 if args.distill and args.loss else 1.0, steps_per_epoch=args.max_steps)
        qat = prepare_qat(model, _config(args), calib, qcfg)
        train_qat(qat, epoch_batches, None if args.distill and args.loss is None else losses[args.loss or
                  "cross_entropy"], qcfg, teacher=model if args.distill else None, log=print)
    except (TypeError, ValueError, FloatingPointError) as err:
        _die(f"qat: {err}")
    q = convert_qat(qat)
    _print_plans(q)
    _save(q, args.out, _factory_of(args.model), not args.no_hessians)
    print(f"wrote {args.out}")
    return 0


def _compiled_model(args):
    """The quantized model of ``--model`` (a saved directory, or a callable quantized with ``--calib``)."""
    model, quantized = _load_model(args.model, args.float_model)
    if quantized:
        return model
    if not args.calib:
        _die(f"--model {args.model!r} is a float model: give --calib to quantize it first "
             "(or --model a saved quantized directory)")
    q = _quantize(args, model)
    _print_plans(q)
    return q


def _cmd_compile(args) -> int:
    import inspect

    example = _example_inputs(args)
    q = _compiled_model(args)
    from tvm_rmsmp import compile as rmsmp_compile  # TVM loads in seconds: after the arguments are checked

    kwargs = dict(target=_parse_target(args.target), fast_math=not args.no_fast_math)
    if args.tuning:
        kwargs["tuning"] = args.tuning
    if args.dynamic_batch:
        if "dynamic_batch" not in inspect.signature(rmsmp_compile).parameters:
            _die("--dynamic-batch: this tvm-rmsmp has no compile(..., dynamic_batch=True)")
        kwargs["dynamic_batch"] = True
    try:
        exe = rmsmp_compile(q, example, **kwargs)
    except (TypeError, ValueError) as err:
        _die(f"compile: {err}")
    path = exe.export_library(args.out)
    print(f"wrote {path} and {path}.json (target {exe.target.kind.name})")
    return 0


def _rpc_runner(args):
    if not args.rpc_tracker and not args.rpc_key:
        return None
    if not (args.rpc_tracker and args.rpc_key):
        _die("--rpc-tracker and --rpc-key go together (the tracker's HOST:PORT and the key its servers registered)")
    host, _, port = args.rpc_tracker.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        _die(f"--rpc-tracker must be HOST:PORT (e.g. 192.168.1.5:9190), got {args.rpc_tracker!r}")
    if args.rpc_timeout <= 0:
        _die(f"--rpc-timeout must be positive, got {args.rpc_timeout}")
    import types

    from tvm.s_tir import meta_schedule as ms

    from tvm_rmsmp.compiler.tuning import check_tracker

    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=args.rpc_key,
                                 session_timeout_sec=args.rpc_timeout)
    try:  # before the runner (whose construction starts a worker process) and any other work
        check_tracker(types.SimpleNamespace(rpc_config=config))
    except ConnectionError as err:
        _die(f"tune: {err}")
    return ms.runner.RPCRunner(rpc_config=config, max_workers=args.rpc_workers)


def _cmd_tune(args) -> int:
    from tvm_rmsmp import tune

    from ..quant.extras import require

    require("tune", "tvm-rmsmp tune")  # before any work: a clear error naming the extra
    if args.trials < 1:
        _die(f"--trials must be at least 1, got {args.trials}")
    runner = _rpc_runner(args)  # flags checked, and the tracker reached, before the model is loaded
    example = _example_inputs(args)
    q = _compiled_model(args)
    try:
        report = tune(q, example, _parse_target(args.target), args.work_dir, trials=args.trials,
                      trials_per_task=args.trials_per_task, trials_per_iter=args.trials_per_iter, runner=runner,
                      seed=args.seed)
    except ConnectionError as err:
        _die(f"tune: {err}")
    except ValueError as err:
        _die(f"tune: {err}")
    print(f"tuned {len(report.tasks)} kernels, {report.trials} trials; records in {report.work_dir}")
    for name, secs in report.tasks.items():
        print(f"  {name:40s} {'-' if secs is None else f'{secs * 1e6:.1f} us'}")
    print(f"compile with: tvm-rmsmp compile ... --tuning {report.work_dir}")
    return 0


def _inputs_from(specs: Sequence[str], flag: str) -> tuple:
    import torch

    out = []
    for s in specs:
        obj = _array_file(s, flag)
        if isinstance(obj, dict):
            _die(f"{flag} {s!r}: keyword inputs are not supported here; give one file per input, in order")
        out += [obj] if isinstance(obj, torch.Tensor) else list(obj)
    return tuple(t.numpy() for t in out)


def _load_library(path: str, flag: str):
    from tvm_rmsmp.runtime.library import load

    try:
        return load(path)
    except (OSError, ValueError) as err:
        _die(f"{flag} {path!r}: {err}")


def _cmd_profile(args) -> int:
    from .profile import format_table, profile

    inputs = _inputs_from(args.input, "--input")
    exe = _load_library(args.library, "profile")
    try:
        rows = profile(exe, inputs, args.repeat)
    except (TypeError, ValueError) as err:
        _die(f"profile: {err}")
    print(f"{args.library}: mean of {args.repeat} runs")
    print(format_table(rows, args.top))
    if args.json:
        from ..runtime.fileio import atomic_write

        atomic_write(args.json, json.dumps({"library": args.library, "repeat": args.repeat, "ms": rows}, indent=1))
    return 0


def _cmd_report(args) -> int:
    from ..runtime.fileio import atomic_write
    from . import report as rep

    if not args.no_plots:
        try:
            rep.require_matplotlib()
        except ImportError as err:
            _die(str(err))
    if not _is_saved_dir(args.saved):
        _die(f"{args.saved!r} is not a directory (give a saved quantized directory: tvm-rmsmp quantize --out)")
    if bool(args.library) != bool(args.input):
        _die("--library and --input go together (the latency breakdown runs the library on that input)")
    float_model = None
    if args.calib:  # the float model for the per-layer error (load_quantized below builds its own)
        float_model, _ = _float_model_for(args.model or args.saved, "report")
    q = _load_saved(args.saved, _load_factory(args.model) if args.model else None)
    traces = getattr(q, "rmsmp_row_hessian", None) or None
    calib = _load_calib(args.calib, args.calib_batch, args.calib_limit, args.calib_first) if args.calib else None
    latency = None
    if args.library:
        from .profile import profile

        try:
            latency = profile(_load_library(args.library, "--library"), _inputs_from(args.input, "--input"),
                              args.repeat)
        except (TypeError, ValueError) as err:
            _die(f"report --library {args.library!r}: {err}")
    try:
        doc = rep.build_report(q, row_hessian=traces, float_model=float_model, calib_data=calib, latency_ms=latency,
                               source=os.path.abspath(args.saved))
    except (TypeError, ValueError) as err:
        _die(f"report: {err}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "report.json")
    atomic_write(path, json.dumps(doc, indent=1))
    written = [path]
    if not args.no_plots:
        written += rep.write_plots(q, doc, args.out, traces, args.layer)
    t = doc["totals"]
    print(f"{t['layers']} layers, rows {t['rows_per_scheme']}, 8-bit weights {100 * t['share_8bit_weights']:.1f}%")
    print("wrote " + ", ".join(written))
    return 0


def _cmd_version(_args=None) -> int:
    from importlib import metadata

    import tvm_rmsmp

    def ver(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    print(f"tvm-rmsmp {tvm_rmsmp.__version__} (apache-tvm {ver('apache-tvm')}, apache-tvm-ffi "
          f"{ver('apache-tvm-ffi')}, torch {ver('torch')}, Python {sys.version.split()[0]})")
    return 0


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------
_MODEL_HELP = ("a saved quantized directory, or 'package.module:callable' returning a float torch.nn.Module "
               "(imports and runs that module: only name code you trust)")


_FLOAT_HELP = ("'package.module:callable' building the float model's architecture when --model is a saved "
               "directory (default: the factory the directory records)")


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization (as RMSMPConfig)")
    g.add_argument("--ratio", default=None, help='JSON, e.g. \'{"sp2_4": 0.6, "fixed_4": 0.35, "fixed_8": 0.05}\'')
    g.add_argument("--act-bits", type=int, default=8)
    g.add_argument("--rounding", choices=("gptq", "nearest"), default="gptq",
                   help="how rows are rounded onto their grids (default: gptq, error-compensating)")
    g.add_argument("--assign", default=None,
                   help="row-assignment rule: hessian (default), hessian_error, variance, or a registered one")
    g.add_argument("--act-granularity", choices=("per_tensor", "per_token"), default="per_tensor",
                   help="activation scales of Linear inputs: static per tensor, or per token at run time")
    g.add_argument("--act-zero-point", choices=("never", "auto", "always"), default="never",
                   help="asymmetric per-tensor activations for signed Linear inputs")
    g.add_argument("--skip", action="append", default=[], help="a module kept in float (repeatable)")


def _add_calib_options(p: argparse.ArgumentParser, required: bool, help_extra: str = "") -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib", action="append", default=[], required=required,
                   help=".npy or .pt file of inputs [N, ...] (repeat for several inputs; a .pt may hold a list or "
                        "dict of tensors), or a dataset 'package.module:callable' returning an iterable of batches"
                        + help_extra)
    g.add_argument("--calib-batch", type=int, default=64, help="samples per batch when splitting a file")
    g.add_argument("--calib-limit", type=int, default=None, help="use at most this many batches")
    g.add_argument("--calib-first", action="store_true",
                   help="dataset batches are (inputs, target) pairs: calibrate on their first element")


def _add_shape_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[],
                   help="the compiled model's input shape, e.g. 1,3,224,224 (repeat for several inputs)")
    p.add_argument("--input-dtype", action="append", default=[], help="torch dtype per input (default float32)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not undo a --quiet given before it
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    ap = argparse.ArgumentParser(prog="tvm-rmsmp", description="RMSMP quantization from PyTorch to TVM",
                                 parents=[common])
    ap.add_argument("--version", action="store_true", help="print the versions and exit")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("demo", help="the main job on the built-in Fashion-MNIST CNN", add_help=False)
    sub.add_parser("schemes", help="list registered schemes", parents=[common])

    p = sub.add_parser("quantize", parents=[common], help="post-training quantization -> a saved quantized directory")
    p.add_argument("--model", required=True, help=_MODEL_HELP + "; a saved directory is re-quantized from its "
                   "recorded float model, reusing its saved Hessians")
    p.add_argument("--float-model", default=None, help=_FLOAT_HELP)
    p.add_argument("--input-shape", action="append", default=[], help="checked against the calibration data")
    p.add_argument("--no-hessians", action="store_true", help="do not save the row Hessians (they make a "
                   "re-quantization with another ratio fast)")
    p.add_argument("--out", required=True, help="the saved quantized directory to write")
    _add_quant_options(p)
    _add_calib_options(p, required=True)

    p = sub.add_parser("qat", parents=[common], help="quantization-aware training -> a saved quantized directory")
    p.add_argument("--model", required=True, help="'package.module:callable' returning the float model")
    p.add_argument("--data", required=True, help="'package.module:callable' returning an iterable of "
                   "(inputs, target) training batches (called once per epoch)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="batches per epoch at most")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scale-lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=("cross_entropy", "mse"), default=None, help="task loss (default cross_entropy)")
    p.add_argument("--distill", choices=("kl", "mse", "cosine"), default=None,
                   help="distill from the float model (alone unless --loss is given too)")
    p.add_argument("--no-hessians", action="store_true")
    p.add_argument("--out", required=True, help="the saved quantized directory to write")
    _add_quant_options(p)
    _add_calib_options(p, required=False, help_extra=" (default: the inputs of the first training batches)")

    p = sub.add_parser("compile", parents=[common], help="compile a (saved or freshly quantized) model to a library")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--float-model", default=None, help=_FLOAT_HELP)
    _add_shape_options(p)
    p.add_argument("--target", default="llvm", help="a name (llvm, aarch64, mali, cuda, fpga:xc7z020) or a JSON "
                   "TVM target dict")
    p.add_argument("--tuning", default=None, help="a work directory of `tvm-rmsmp tune` for the same target")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size at run time")
    p.add_argument("--no-fast-math", action="store_true",
                   help="CPU: libm's erf/exp/tanh between the layers instead of TVM's vectorizable approximations")
    p.add_argument("--out", required=True, help="output library path (.so); its sidecar goes to OUT.json")
    _add_quant_options(p)
    _add_calib_options(p, required=False, help_extra=" (needed when --model is a float model)")

    p = sub.add_parser("tune", parents=[common], help="MetaSchedule tuning of the row-group kernels")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--float-model", default=None, help=_FLOAT_HELP)
    _add_shape_options(p)
    p.add_argument("--target", default="llvm", help="as for compile; an llvm target needs 'num-cores' in its dict")
    p.add_argument("--work-dir", default="rmsmp_tuning", help="records (JSON lines; a second run resumes)")
    p.add_argument("--trials", type=int, default=64, help="measurements in total")
    p.add_argument("--trials-per-task", type=int, default=None)
    p.add_argument("--trials-per-iter", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker: measure on its servers")
    p.add_argument("--rpc-key", default=None, help="the key the boards' servers registered with the tracker")
    p.add_argument("--rpc-timeout", type=float, default=60.0, help="seconds per RPC session")
    p.add_argument("--rpc-workers", type=int, default=1, help="measurements at once through the tracker")
    _add_quant_options(p)
    _add_calib_options(p, required=False, help_extra=" (needed when --model is a float model)")

    p = sub.add_parser("report", parents=[common], help="report.json and plots of a saved quantized directory")
    p.add_argument("saved", help="a saved quantized directory")
    p.add_argument("--out", required=True, help="folder for report.json and the PNG plots")
    p.add_argument("--model", default=None, help="the float model 'package.module:callable' for the per-layer error "
                   "(default: the one the directory records)")
    p.add_argument("--library", default=None, help="a compiled library of the model: latency per kind of call")
    p.add_argument("--input", action="append", default=[], help="input .npy/.pt for --library (one per input)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--layer", default=None, help="the layer of the row plot (default: the most sensitive)")
    p.add_argument("--no-plots", action="store_true", help="report.json only (no matplotlib needed)")
    _add_calib_options(p, required=False, help_extra=" (for the per-layer quantization error)")

    p = sub.add_parser("profile", parents=[common], help="milliseconds per kind of VM call of a compiled library")
    p.add_argument("library", help="an exported library (.so with its .json sidecar)")
    p.add_argument("--input", action="append", required=True, help=".npy/.pt input (one per model input)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the table as JSON")
    return ap


_COMMANDS = {"schemes": _cmd_schemes, "quantize": _cmd_quantize, "qat": _cmd_qat, "compile": _cmd_compile,
             "tune": _cmd_tune, "report": _cmd_report, "profile": _cmd_profile}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    if os.getcwd() not in sys.path and "" not in sys.path:
        # as `python -m` does: --model / --calib / a saved directory's factory may name modules
        # next to where the command runs
        sys.path.insert(0, os.getcwd())
    if args.version:
        return _cmd_version()
    if args.cmd is None:
        ap.error("a command is required (tvm-rmsmp --help lists them)")
    from ..quant.progress import set_progress

    set_progress(False if getattr(args, "quiet", False) else None)
    try:
        return _COMMANDS[args.cmd](args)
    except ImportError as err:
        if "pip install 'tvm-rmsmp[" in str(err):  # an optional dependency: say which extra, no traceback
            _die(str(err))
        raise
    finally:
        set_progress(None)


if __name__ == "__main__":
    sys.exit(main())
