"""Dynamic batch against static builds: is ``compile(..., dynamic_batch=True)`` as fast?

Run from the repository root::

    python -m bench.dynamic_batch              # about 3-5 min on 2 cores
    python -m bench.dynamic_batch --threads 1

For each workload the RMSMP-quantized model (60:35:5, 8-bit activations, as ``bench.cpu``) is
compiled three times: static at batch 1, static at batch 128, and once with
``dynamic_batch=True`` from a batch-1 example (so its functions are the batch-1
specialisation and the one for any batch; batch 128 runs the latter). Every build's output
is compared with the quantized torch model first (largest difference recorded: 0 for the
CNN; the FFN's GELU is TVM's fast-math one, as in ``bench.cpu``). Timings: ``exe.benchmark`` (TVM's time
evaluator, median of 10), in rounds that alternate the builds; the table gives each build's
fastest round (other processes on the machine slow some rounds, never speed one up).
Writes ``bench/results/dynamic_batch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = {"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}
LARGE = 128


def ffn():
    import torch

    nn = torch.nn
    return nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)), (768,)


def cnn():
    """A small CIFAR-sized CNN: its convolutions run the portable schedule at a batch with no
    specialisation (the x86 convolution kernels are built for a number of images)."""
    import torch

    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    return model, (3, 32, 32)


WORKLOADS = {"FFN 768-3072-768": ffn, "CNN 3x32x32 (3 conv + dense)": cnn}


def measure(name: str, factory, rounds: int) -> Dict[str, object]:
    import torch

    import tvm_rmsmp as rmsmp

    torch.manual_seed(0)
    model, shape = factory()
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = rmsmp.quantize(model.eval(), rmsmp.RMSMPConfig(ratio=RATIO, act_bits=8),
                           [torch.randn(16, *shape, generator=g) for _ in range(2)])
    builds = {"static b1": rmsmp.compile(q, (torch.randn(1, *shape),)),
              f"static b{LARGE}": rmsmp.compile(q, (torch.randn(LARGE, *shape),)),
              "dynamic": rmsmp.compile(q, (torch.randn(1, *shape),), dynamic_batch=True)}
    cases = [("static b1", 1), ("dynamic", 1), (f"static b{LARGE}", LARGE), ("dynamic", LARGE), ("dynamic", 17)]
    inputs = {b: torch.randn(b, *shape, generator=g) for b in (1, 17, LARGE)}
    diff = {}
    for who, b in cases:
        exe = builds[who]
        with torch.no_grad():
            ref = q(inputs[b]).numpy()
        diff[f"{who} @ {b}"] = float(np.abs(exe(inputs[b]) - ref).max())
    times: Dict[str, List[float]] = {f"{who} @ {b}": [] for who, b in cases}
    for _ in range(rounds):
        for who, b in cases:
            times[f"{who} @ {b}"].append(builds[who].benchmark(inputs[b], repeat=10))
    dyn = builds["dynamic"]
    return {"workload": name, "ms": {k: 1e3 * min(v) for k, v in times.items()},
            "rounds_ms": {k: [1e3 * t for t in v] for k, v in times.items()}, "max_abs_diff": diff,
            "functions": {str(b): dyn.function_for(b) for b in (1, 17, LARGE)},
            "kernels": {k: v.get("cpu_kernels", {}) for k, v in dyn.stats["variants"].items()},
            "static_kernels": {k: builds[k].stats.get("cpu_kernels", {}) for k in ("static b1", f"static b{LARGE}")}}


def markdown(report: Dict[str, object]) -> str:
    hw = report["hardware"]
    lines = [f"CPU: {hw['cpu']} (LLVM `{hw['llvm_mcpu']}`, x86 kernels {hw['x86_kernel_isa']}), "
             f"{hw['threads']} threads; `{report['command']}`; ms, fastest of {report['rounds']} rounds.", "",
             f"| workload | static b1 @ 1 | dynamic @ 1 | static b{LARGE} @ {LARGE} | dynamic @ {LARGE} | dynamic @ 17 |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in report["workloads"]:
        ms = row["ms"]
        keys = ["static b1 @ 1", "dynamic @ 1", f"static b{LARGE} @ {LARGE}", f"dynamic @ {LARGE}", "dynamic @ 17"]
        lines.append(f"| {row['workload']} | " + " | ".join(f"{ms[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "dynamic_batch.json"))
    args = ap.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        ap.error("--threads and --rounds must be at least 1")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from bench.cpu import hardware

    command = "python -m bench.dynamic_batch" + (f" --threads {args.threads}" if args.threads != os.cpu_count() else "")
    report = {"hardware": hardware(args.threads), "command": command, "rounds": args.rounds,
              "workloads": [measure(name, f, args.rounds) for name, f in WORKLOADS.items()]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(markdown(report))
    for row in report["workloads"]:
        print(f"{row['workload']}: largest difference from torch {max(row['max_abs_diff'].values()):.3g}; "
              f"dynamic build's functions by batch {row['functions']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
