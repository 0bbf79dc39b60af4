"""The main job: RMSMP on the built-in Fashion-MNIST CNN, from PyTorch to a compiled CPU module.

Prints test accuracy of the float model, of the RMSMP torch reference and of the RMSMP TVM
build (the last two must agree: the TVM build is integer-exact), batch-1 latency of each,
and the per-layer row counts by scheme. ``python -m tvm_rmsmp.cli.demo --help`` for options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.models.data import load_fashion_mnist
from tvm_rmsmp.models.fmnist_cnn import load_pretrained


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _torch_latency(model, x, repeat: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _predict_torch(model, x: np.ndarray, batch: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch])).numpy())
    return np.concatenate(out)


def _predict_tvm(exe, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([exe(x[i:i + batch]) for i in range(0, len(x), batch)])


def run(limit: int = 10000, batch: int = 100, calib_batches: int = 4, repeat: int = 50, seed: int = 0,
        ratio=None, act_bits: int = 8, target: str = "llvm", quiet: bool = False) -> dict:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t_start = time.time()
    torch.manual_seed(seed)
    x_test, y_test = load_fashion_mnist("test")
    x_train, _ = load_fashion_mnist("train")
    if not 0 < limit <= len(x_test):
        raise ValueError(f"--limit must be in [1, {len(x_test)}], got {limit}")
    if limit % batch:
        raise ValueError(f"--limit ({limit}) must be a multiple of --batch ({batch})")
    x_test, y_test = x_test[:limit], y_test[:limit]
    rng = np.random.default_rng(seed)
    calib = [torch.from_numpy(x_train[rng.choice(len(x_train), 128, replace=False)]) for _ in range(calib_batches)]

    model = load_pretrained()
    cfg = rmsmp.RMSMPConfig(ratio=ratio or rmsmp.DEFAULT_RATIO, act_bits=act_bits)
    say(f"quantizing FashionCNN with RMSMP {cfg.ratio}, A{cfg.act_bits}, {calib_batches}x128 calibration images")
    t0 = time.time()
    q = rmsmp.quantize(model, cfg, calib)
    t_quant = time.time() - t0

    say(f"compiling for {target} (batch {batch} and batch 1)")
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exe = rmsmp.compile(q, (torch.from_numpy(x_test[:batch]),), target=target)
        exe1 = rmsmp.compile(q, (torch.from_numpy(x_test[:1]),), target=target)
    t_compile = time.time() - t0

    logits_fp32 = _predict_torch(model, x_test, batch)
    logits_ref = _predict_torch(q, x_test, batch)
    logits_tvm = _predict_tvm(exe, x_test, batch)
    acc = {
        "fp32 (torch)": float((logits_fp32.argmax(1) == y_test).mean()),
        "RMSMP reference (torch)": float((logits_ref.argmax(1) == y_test).mean()),
        "RMSMP (TVM)": float((logits_tvm.argmax(1) == y_test).mean()),
    }
    identical = bool(np.array_equal(logits_ref, logits_tvm))
    x1 = torch.from_numpy(x_test[:1])
    torch.set_num_threads(os.cpu_count() or 1)
    lat = {
        "fp32 (torch)": _torch_latency(model, x1, repeat),
        "RMSMP reference (torch)": _torch_latency(q, x1, repeat),
        "RMSMP (TVM)": exe1.benchmark(x1, repeat=repeat),
    }
    plans = rmsmp.row_plans(q)
    schemes = list(cfg.schemes)
    result = {
        "hardware": f"{_cpu_name()}, {os.cpu_count()} cores ({platform.machine()})",
        "target": str(exe.target),
        "test_images": limit,
        "accuracy": acc,
        "latency_batch1_ms": {k: v * 1e3 for k, v in lat.items()},
        "tvm_equals_reference_bitwise": identical,
        "rows": {name: {s: p.counts().get(s, 0) for s in schemes} for name, p in plans.items()},
        "gathers": exe.stats,
        "seconds": {"quantize": t_quant, "compile": t_compile, "total": time.time() - t_start},
    }

    say("")
    say(f"Fashion-MNIST test set, {limit} images; {result['hardware']}; TVM target {exe.target.kind.name} "
        f"mcpu={exe.target.attrs.get('mcpu', '-') if hasattr(exe.target, 'attrs') else '-'}")
    say(f"{'model':<26}{'top-1 accuracy':>16}{'latency, batch 1':>20}")
    for k in acc:
        say(f"{k:<26}{acc[k] * 100:>15.2f}%{lat[k] * 1e3:>17.3f} ms")
    say(f"TVM logits equal the torch reference bit for bit: {'yes' if identical else 'NO'}")
    say("")
    header = f"{'layer':<16}{'rows':>6}" + "".join(f"{s:>10}" for s in schemes)
    say("rows per scheme in each quantized layer")
    say(header)
    for name, p in plans.items():
        counts = p.counts()
        say(f"{name:<16}{p.num_rows:>6}" + "".join(f"{counts.get(s, 0):>10}" for s in schemes))
    say("")
    say(f"row-order gathers folded into consumers: {exe.stats.get('folded', 0)}, kept: {exe.stats.get('kept', 0)}")
    say(f"time: quantize {t_quant:.1f} s, compile {t_compile:.1f} s, total {result['seconds']['total']:.1f} s")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=10000, help="test images to evaluate (default: all 10000)")
    ap.add_argument("--batch", type=int, default=100, help="batch size of the accuracy build")
    ap.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 128 training images")
    ap.add_argument("--repeat", type=int, default=50, help="latency measurements (median reported)")
    ap.add_argument("--act-bits", type=int, default=8)
    ap.add_argument("--ratio", type=str, default=None, help='JSON, e.g. \'{"sp2_4": 0.65, "fixed_4": 0.3, "fixed_8": 0.05}\'')
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    try:
        ratio = json.loads(args.ratio) if args.ratio else None
    except json.JSONDecodeError as err:
        ap.error(f"--ratio is not valid JSON: {err}")
    result = run(args.limit, args.batch, args.calib_batches, args.repeat, ratio=ratio, act_bits=args.act_bits,
                 target=args.target)
    if args.json:
        from ..runtime.fileio import atomic_write

        atomic_write(args.json, json.dumps(result, indent=1))
    return 0 if result["tvm_equals_reference_bitwise"] else 1


if __name__ == "__main__":
    sys.exit(main())
