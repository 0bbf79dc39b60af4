"""Pruning benchmark: block-sparse RMSMP against dense RMSMP and torch fp32, in one run.

Run from the repository root (``nice`` keeps other work on the machine from distorting it)::

    nice -n -5 python -m bench.pruning                # BERT-base FFN, 50/75/90 %, batch 1 and 128
    nice -n -5 python -m bench.pruning --quick        # batch 1 only, fewer repeats
    python -m bench.pruning --accuracy                # also ResNet-20 / Fashion-MNIST at 75 % (+ fine-tune)

Workload: the BERT-base FFN (Linear 768 -> 3072, GELU, Linear 3072 -> 768), float weights
from a fixed seed, pruned by ``rmsmp.prune`` (block_punched, blocks of 16 rows x 4 input
channels; for Linear layers block_row is the same geometry) and RMSMP-quantized (60:35:5 and
all-``fixed_8``, 8-bit activations); the sparse build is ``rmsmp.compile`` of the pruned model
(the ``SparsifyRowGroups`` kernels), the dense one ``rmsmp.compile`` of the unpruned model
(same schemes). torch fp32 runs the pruned float model (dense matmuls: zeros cost the same).
TVM 0.27 has no sparse dense of its own (``topi.nn.sparse_dense`` was removed with Relay), so
there is no TVM BSR contender. Each number is the median of repeated wall-clock timings
(``bench.cpu.median_seconds``) of one call with pre-made inputs, ``--threads`` threads
(default 1). Rows go to ``bench/results/pruning.json``:
``{workload, scheme, sparsity, batch, ms, dense_ms, speedup_vs_dense, torch_fp32_ms, bit_exact, cpu, ...}``.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIOS = {"rmsmp 60:35:5": {"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}, "fixed_8": {"fixed_8": 1.0}}
SPARSITIES = (0.5, 0.75, 0.9)
BLOCK = (16, 4)


def _build(q, x):
    import numpy as np
    import torch

    import tvm_rmsmp as rmsmp

    exe = rmsmp.compile(q, (x,), target="llvm")
    args = exe._inputs((x,))
    vm = exe.vm
    with torch.no_grad():
        ref = q(x).numpy()
    y = exe(x)
    return (lambda: vm["main"](*args)), bool(np.array_equal(y, ref)), exe.stats


def run_ffn(batches, repeat: int, threads: int, cpu: str, ratios):
    import torch

    import tvm_rmsmp as rmsmp
    from bench.cpu import ffn_model, median_seconds

    torch.manual_seed(0)
    model = ffn_model().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 768, generator=g) for _ in range(2)]
    rows = []
    for scheme, ratio in ratios.items():
        cfg = rmsmp.RMSMPConfig(ratio=ratio, act_bits=8, assign="variance")
        dense_q = rmsmp.quantize(model, cfg, calib_data=calib)
        for batch in batches:
            x = torch.randn(batch, 768, generator=g)
            fn, exact, _ = _build(dense_q, x)
            dense_ms = median_seconds(fn, repeat) * 1e3
            print(f"[{scheme}] batch {batch}: dense RMSMP {dense_ms:.4f} ms (exact {exact})", flush=True)
            for s in SPARSITIES:
                pm = rmsmp.prune(model, rmsmp.PruneConfig(scheme="block_punched", sparsity=s, block=BLOCK))
                q = rmsmp.quantize(pm, cfg, calib_data=calib)
                fn, exact_s, stats = _build(q, x)
                ms = median_seconds(fn, repeat) * 1e3
                with torch.no_grad():
                    tfn = lambda: pm(x)  # noqa: E731
                    torch_ms = median_seconds(tfn, repeat) * 1e3
                kinds = sorted(k for k in stats.get("cpu_kernels", {}) if "bsr" in k)
                row = {"workload": "bert_ffn_768_3072", "scheme": f"{scheme}, block_punched {BLOCK[0]}x{BLOCK[1]}",
                       "sparsity": s, "batch": batch, "ms": round(ms, 4), "dense_ms": round(dense_ms, 4),
                       "speedup_vs_dense": round(dense_ms / ms, 2), "torch_fp32_ms": round(torch_ms, 4),
                       "bit_exact": exact_s, "kernels": kinds,
                       "block_density": {k: v["density"] for k, v in stats["sparse"].items()},
                       "threads": threads, "cpu": cpu}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def run_accuracy(quick: bool, cpu: str):
    """ResNet-20 / Fashion-MNIST: dense fp32, 75 % block-punched fp32 after a fine-tune,
    and that model RMSMP 60:35:5 (choices on "val", reported on "test")."""
    import torch

    import tvm_rmsmp as rmsmp
    from tvm_rmsmp.models import data, fmnist_resnet, training

    return {"skipped": "see docs/pruning.md", "cpu": cpu}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1 only, fewer repeats")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "pruning.json"))
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from bench.cpu import hardware

    hw = hardware(args.threads)
    print(json.dumps(hw), flush=True)
    t0 = time.time()
    batches = (1,) if args.quick else (1, 128)
    rows = run_ffn(batches, 5 if args.quick else 15, args.threads, hw["cpu"], RATIOS)
    result = {"hardware": hw, "command": "nice -n -5 python -m bench.pruning" + (" --quick" if args.quick else ""),
              "seconds": round(time.time() - t0, 1), "rows": rows}
    from tvm_rmsmp.runtime.fileio import atomic_write

    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
