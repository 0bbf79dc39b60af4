"""``tvm-rmsmp`` command line.

    tvm-rmsmp demo [demo options]          the main job on the built-in Fashion-MNIST CNN
    tvm-rmsmp schemes                      registered schemes and their integer levels
    tvm-rmsmp compile --model pkg.mod:factory --input-shape 1,3,224,224 --calib calib.npy --out model.so
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import List, Optional


def _cmd_schemes(_args) -> int:
    from ..quant.schemes import get_scheme, list_schemes

    for name in list_schemes():
        s = get_scheme(name)
        print(f"{name:10s} {s.kind:6s} {s.bits} bits  levels {s.levels.tolist()}")
    return 0


def _load_factory(spec: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise SystemExit(f"--model must look like 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"--model {spec!r}: {err}") from None
    import torch

    if not (isinstance(factory, torch.nn.Module) or callable(factory)):
        raise SystemExit(f"--model {spec!r} names a {type(factory).__name__}: it must be a torch.nn.Module or a "
                         "function returning one")
    try:
        model = factory if isinstance(factory, torch.nn.Module) else factory()
    except TypeError as err:
        raise SystemExit(f"--model {spec!r}: calling it with no arguments failed: {err}") from None
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"--model {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _cmd_compile(args) -> int:
    import numpy as np
    import torch

    from tvm_rmsmp import RMSMPConfig, quantize, row_plans
    from tvm_rmsmp import compile as rmsmp_compile

    model = _load_factory(args.model).eval()
    try:
        shape = tuple(int(d) for d in args.input_shape.split(","))
    except ValueError:
        raise SystemExit(f"--input-shape must be comma-separated integers, got {args.input_shape!r}") from None
    try:
        calib = np.load(args.calib, allow_pickle=False)  # never unpickle user files
    except (OSError, ValueError) as err:
        raise SystemExit(f"--calib {args.calib!r} is not a readable .npy array: {err}") from None
    if calib.ndim != len(shape) or calib.shape[1:] != shape[1:]:
        raise SystemExit(f"--calib {args.calib!r} has shape {calib.shape}, the model input is {shape}")
    if args.calib_batch < 1:
        raise SystemExit(f"--calib-batch must be at least 1, got {args.calib_batch}")
    if calib.shape[0] == 0:
        raise SystemExit(f"--calib {args.calib!r} holds no samples (shape {calib.shape})")
    calib_t = torch.from_numpy(np.ascontiguousarray(calib, dtype=np.float32))
    batches = list(torch.split(calib_t, args.calib_batch))
    try:
        ratio = json.loads(args.ratio) if args.ratio else None
    except json.JSONDecodeError as err:
        raise SystemExit(f"--ratio {args.ratio!r} is not JSON ({err}); "
                         'e.g. \'{"sp2_4": 0.6, "fixed_4": 0.35, "fixed_8": 0.05}\'') from None
    try:
        opts = dict(act_bits=args.act_bits, rounding=args.rounding, act_granularity=args.act_granularity,
                    act_zero_point=args.act_zero_point)
        cfg = RMSMPConfig(ratio=ratio, **opts) if ratio else RMSMPConfig(**opts)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--ratio / --act-bits / --rounding / --act-granularity / --act-zero-point: {err}") from None
    q = quantize(model, cfg, batches)
    for name, plan in row_plans(q).items():
        print(f"{name:30s} {plan.num_rows:6d} rows {plan.counts()}")
    exe = rmsmp_compile(q, (torch.zeros(shape),), target=args.target, fast_math=not args.no_fast_math)
    path = exe.export_library(args.out)
    print(f"wrote {path} and {path}.json (target {exe.target.kind.name})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tvm-rmsmp", description="RMSMP quantization from PyTorch to TVM")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="the main job on the built-in Fashion-MNIST CNN", add_help=False)
    sub.add_parser("schemes", help="list registered schemes")
    c = sub.add_parser("compile", help="quantize a model and export a compiled library")
    c.add_argument("--model", required=True, help="'package.module:factory' returning a torch.nn.Module")
    c.add_argument("--input-shape", required=True, help="e.g. 1,3,224,224")
    c.add_argument("--calib", required=True, help=".npy array of calibration inputs [N, ...]")
    c.add_argument("--calib-batch", type=int, default=64)
    c.add_argument("--ratio", default=None, help='JSON, e.g. \'{"sp2_4": 0.6, "fixed_4": 0.35, "fixed_8": 0.05}\'')
    c.add_argument("--act-bits", type=int, default=8)
    c.add_argument("--rounding", choices=("gptq", "nearest"), default="gptq",
                   help="how rows are rounded onto their grids (default: gptq, error-compensating)")
    c.add_argument("--act-granularity", choices=("per_tensor", "per_token"), default="per_tensor",
                   help="activation scales of Linear inputs: static per tensor, or per token at run time")
    c.add_argument("--act-zero-point", choices=("never", "auto", "always"), default="never",
                   help="asymmetric per-tensor activations for signed Linear inputs")
    c.add_argument("--target", default="llvm")
    c.add_argument("--no-fast-math", action="store_true",
                   help="CPU: libm's erf/exp/tanh between the layers instead of TVM's vectorizable approximations")
    c.add_argument("--out", required=True, help="output library path (.so)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    args = ap.parse_args(argv)
    return {"schemes": _cmd_schemes, "compile": _cmd_compile}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
