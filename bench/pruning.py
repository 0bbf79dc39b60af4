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
there is no TVM BSR contender. Each number is the median over 5 rounds, taken round-robin
over the contenders of one batch, of ``bench.cpu.median_seconds`` (median of 5 timings of one
call with pre-made inputs), ``--threads`` threads (default 1). ``bit_exact``: the compiled model
equals the torch reference bit for bit; the fast-math GELU (``rmsmp.compile``'s default) can
round a few of fc2's 8-bit inputs differently from torch's GELU at batch 128 (with
``fast_math=False`` the builds are exact; the integer layers are exact either way). Rows go to ``bench/results/pruning.json``:
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


def run_ffn(batches, repeat: int, threads: int, cpu: str, ratios, rounds: int = 5):
    """Per scheme and batch: build the dense RMSMP model and the pruned ones, then time them
    round-robin (``rounds`` rounds of ``median_seconds``), so that load from other processes
    falls on all of them alike; each number is the median of its rounds."""
    import statistics

    import torch

    import tvm_rmsmp as rmsmp
    from bench.cpu import ffn_model, median_seconds

    torch.manual_seed(0)
    model = ffn_model().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 768, generator=g) for _ in range(2)]
    pruned = {s: rmsmp.prune(model, rmsmp.PruneConfig(scheme="block_punched", sparsity=s, block=BLOCK))
              for s in SPARSITIES}
    rows = []
    for scheme, ratio in ratios.items():
        cfg = rmsmp.RMSMPConfig(ratio=ratio, act_bits=8, assign="variance")
        dense_q = rmsmp.quantize(model, cfg, calib_data=calib)
        sparse_q = {s: rmsmp.quantize(pm, cfg, calib_data=calib) for s, pm in pruned.items()}
        for batch in batches:
            x = torch.randn(batch, 768, generator=g)
            fns, info = {}, {}
            fns["dense"], info["dense"], _ = _build(dense_q, x)
            for s, q in sparse_q.items():
                fns[s], exact, stats = _build(q, x)
                info[s] = (exact, stats)
                with torch.no_grad():
                    fns[("torch", s)] = (lambda pm=pruned[s]: pm(x))
            times = {k: [] for k in fns}
            with torch.no_grad():
                for _ in range(rounds):
                    for k, fn in fns.items():
                        times[k].append(median_seconds(fn, repeat) * 1e3)
            ms = {k: statistics.median(v) for k, v in times.items()}
            print(f"[{scheme}] batch {batch}: dense RMSMP {ms['dense']:.4f} ms (exact {info['dense']})", flush=True)
            for s in SPARSITIES:
                exact, stats = info[s]
                kinds = sorted(k for k in stats.get("cpu_kernels", {}) if "bsr" in k)
                row = {"workload": "bert_ffn_768_3072", "scheme": f"{scheme}, block_punched {BLOCK[0]}x{BLOCK[1]}",
                       "sparsity": s, "batch": batch, "ms": round(ms[s], 4), "dense_ms": round(ms["dense"], 4),
                       "speedup_vs_dense": round(ms["dense"] / ms[s], 2), "torch_fp32_ms": round(ms[("torch", s)], 4),
                       "bit_exact": exact, "dense_bit_exact": info["dense"], "kernels": kinds,
                       "block_density": {k: v["density"] for k, v in stats["sparse"].items()},
                       "threads": threads, "cpu": cpu}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


#: ResNet-18's 3x3 convolutions at 224 x 224 input (after the stem and max pool): (in, out, stride, input side).
RESNET18_CONVS = ([(64, 64, 1, 56)] * 4 + [(64, 128, 2, 56)] + [(128, 128, 1, 28)] * 3 + [(128, 256, 2, 28)]
                  + [(256, 256, 1, 14)] * 3 + [(256, 512, 2, 14)] + [(512, 512, 1, 7)] * 3)
CONV_FORMS = (("pattern", 0.75), ("pattern", 0.9), ("block_punched", 0.75))


def resnet18_convs():
    """ResNet-18's sixteen 3x3 convolutions (no bias: batch norm follows them), each followed by a
    ReLU, chained in the network's order (the residual adds, batch norms, stem, 1x1 shortcuts
    and classifier left out: the workload is the 3x3 convolutions)."""
    import torch

    layers = []
    for cin, cout, stride, _ in RESNET18_CONVS:
        layers += [torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def run_convs(batch: int, repeat: int, threads: int, cpu: str, rounds: int = 5, forms=CONV_FORMS):
    """ResNet-18's 3x3 convs (:func:`resnet18_convs`, input ``[batch, 64, 56, 56]``), RMSMP 60:35:5:
    the dense build against the pruned ones (``forms``: pattern + connectivity at 75 / 90 %, the
    pattern set of 8; block-punched 8 x 4 at 75 %), built one after the other and timed
    round-robin like :func:`run_ffn`; torch fp32 runs each pruned float model."""
    import statistics
    import warnings

    import torch

    import tvm_rmsmp as rmsmp
    from bench.cpu import median_seconds

    torch.manual_seed(0)
    model = resnet18_convs().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 64, 56, 56, generator=g)
    calib = [torch.randn(2, 64, 56, 56, generator=g)]
    cfg = rmsmp.RMSMPConfig(ratio=RATIOS["rmsmp 60:35:5"], act_bits=8, assign="variance")
    load = [round(v, 2) for v in os.getloadavg()]
    fns, info, pruned = {}, {}, {}
    t0 = time.time()
    fns["dense"], exact, stats = _build(rmsmp.quantize(model, cfg, calib_data=calib), x)
    info["dense"] = (exact, stats)
    for scheme, sp in forms:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # block_punched: "blocks do not divide" does not arise; pattern: none
            pm = rmsmp.prune(model, rmsmp.PruneConfig(scheme=scheme, sparsity=sp, block=(8, 4)))
        pruned[(scheme, sp)] = pm
        fns[(scheme, sp)], exact, stats = _build(rmsmp.quantize(pm, cfg, calib_data=calib), x)
        info[(scheme, sp)] = (exact, stats)
        fns[("torch", scheme, sp)] = (lambda pm=pm: pm(x))
    build_s = time.time() - t0
    times = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for k, fn in fns.items():
                times[k].append(median_seconds(fn, repeat) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    load_after = [round(v, 2) for v in os.getloadavg()]
    print(f"[resnet18 3x3 convs] batch {batch}: dense RMSMP {ms['dense']:.3f} ms (exact {info['dense'][0]}), "
          f"built in {build_s:.0f} s", flush=True)
    rows = []
    for scheme, sp in forms:
        exact, stats = info[(scheme, sp)]
        sparse = {k: v for k, v in stats["sparse"].items() if v.get("op") == "conv2d_pattern"}
        kept = sum(v["quads"] for v in sparse.values())
        row = {"workload": "resnet18_3x3_convs_224", "scheme": f"rmsmp 60:35:5, {scheme}"
               + (" 8x4" if scheme == "block_punched" else " (8 patterns) + connectivity"),
               "sparsity": sp, "batch": batch, "ms": round(ms[(scheme, sp)], 4), "dense_ms": round(ms["dense"], 4),
               "speedup_vs_dense": round(ms["dense"] / ms[(scheme, sp)], 2),
               "torch_fp32_ms": round(ms[("torch", scheme, sp)], 4), "bit_exact": exact,
               "dense_bit_exact": info["dense"][0],
               "kernels": {k: v for k, v in stats.get("cpu_kernels", {}).items() if "conv" in k or "pattern" in k},
               "sparse_layers": len(sparse), "quads": kept,
               "slot_density": {k: v["density"] for k, v in sparse.items()},
               "ms_rounds": [round(t, 3) for t in times[(scheme, sp)]],
               "dense_ms_rounds": [round(t, 3) for t in times["dense"]],
               "load_avg_before_after": [load, load_after], "threads": threads, "cpu": cpu}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def conv_markdown(result) -> str:
    """The docs/pruning.md table of the ResNet-18 3x3 conv rows of a result file."""
    lines = ["| scheme | sparsity | batch | sparse ms | dense RMSMP ms | speedup | torch fp32 ms (pruned) | bit-exact |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result.get("conv_rows", []):
        lines.append(f"| {r['scheme']} | {r['sparsity']:.0%} | {r['batch']} | {r['ms']:.4g} | {r['dense_ms']:.4g} | "
                     f"{r['speedup_vs_dense']:.2f}x | {r['torch_fp32_ms']:.4g} | {r['bit_exact']} |")
    return "\n".join(lines)


def run_accuracy(cpu: str, steps: int = 150, rounds: int = 3, qat_steps: int = 100, seed: int = 0):
    """ResNet-20 / Fashion-MNIST at 75 % block-punched (blocks of 8 filters x 4 channels; the stem
    and the classifier left dense): gradual pruning of the pretrained model in ``rounds`` rounds
    with ``steps`` AdamW steps (batch 64, "fit" split) after each; then RMSMP 60:35:5 (PTQ, and
    QAT with the masks kept for ``qat_steps`` steps per epoch, 3 epochs, distilled from the pruned
    fp32 model). The PTQ / QAT choice is made on "val"; every model is also reported on "test"."""
    import numpy as np
    import torch

    import tvm_rmsmp as rmsmp
    from bench.accuracy import _fmnist_batches
    from tvm_rmsmp.models.data import fashion_mnist_split
    from tvm_rmsmp.models.fmnist_resnet import load_pretrained
    from tvm_rmsmp.models.training import evaluate

    t0 = time.time()
    (xf, yf), (xv, yv), (xt, yt) = (fashion_mnist_split(s) for s in ("fit", "val", "test"))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = load_pretrained()

    def scores(m):
        return {"val": evaluate(m, xv, yv), "test": evaluate(m, xt, yt)}

    def train_fn(m):
        opt = torch.optim.AdamW(m.parameters(), lr=5e-4, weight_decay=0.0)
        m.train()
        for _ in range(steps):
            idx = rng.integers(0, len(xf), 64)
            xb = torch.from_numpy(xf[idx])
            if rng.random() < 0.5:
                xb = xb.flip(-1)
            loss = torch.nn.functional.cross_entropy(m(xb), torch.from_numpy(yf[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()

    out = {"workload": "resnet20_fmnist", "sparsity": 0.75, "scheme": "block_punched 8x4 (stem, fc dense)",
           "dense_fp32": scores(model)}
    pcfg = rmsmp.PruneConfig(scheme="block_punched", sparsity=0.75, block=(8, 4), skip=("stem", "fc"))
    pm = rmsmp.prune(model, pcfg, train_fn=train_fn, steps=rounds)
    masks = rmsmp.prune_masks(pm)
    kept = sum(int(m.sum()) for m in masks.values())
    out["pruned_share_of_pruned_layers"] = round(1 - kept / sum(m.size for m in masks.values()), 4)
    out["pruned_fp32"] = scores(pm)
    idx = np.sort(np.random.default_rng(1000 + seed).permutation(len(xf))[:512])
    calib = [torch.from_numpy(xf[idx[i:i + 128]]) for i in range(0, 512, 128)]
    cfg = rmsmp.RMSMPConfig(ratio={"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}, assign="variance")
    out["pruned_rmsmp_ptq"] = scores(rmsmp.quantize(pm, cfg, calib_data=calib))
    qat = rmsmp.prepare_qat(pm, cfg, calib)
    qcfg = rmsmp.QATConfig(epochs=3, lr=1e-4, scale_lr=1e-3, distill="kl", distill_weight=1.0)
    rmsmp.train_qat(qat, _fmnist_batches(xf, yf, qat_steps, 64, seed), None, qcfg, teacher=pm)
    qq = rmsmp.convert_qat(qat)
    rmsmp.prune_masks(qq)  # the zeros survived QAT (raises otherwise)
    out["pruned_rmsmp_qat"] = scores(qq)
    best = max(("pruned_rmsmp_ptq", "pruned_rmsmp_qat"), key=lambda k: out[k]["val"])
    out["chosen_on_val"] = best
    out["test_drop_vs_dense_fp32_pt"] = round(100 * (out["dense_fp32"]["test"] - out[best]["test"]), 2)
    out["seconds"] = round(time.time() - t0, 1)
    out["cpu"] = cpu
    print(json.dumps(out), flush=True)
    return out


def markdown(result) -> str:
    """The docs/pruning.md tables of a result file."""
    lines = ["| scheme | sparsity | batch | sparse ms | dense RMSMP ms | speedup | torch fp32 ms (pruned) | bit-exact |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result.get("rows", []):
        lines.append(f"| {r['scheme']} | {r['sparsity']:.0%} | {r['batch']} | {r['ms']:.4g} | {r['dense_ms']:.4g} | "
                     f"{r['speedup_vs_dense']:.2f}x | {r['torch_fp32_ms']:.4g} | {r['bit_exact']} |")
    acc = result.get("accuracy")
    if acc:
        lines += ["", "| model | val | test |", "|---|---|---|"]
        for key in ("dense_fp32", "pruned_fp32", "pruned_rmsmp_ptq", "pruned_rmsmp_qat"):
            if key in acc:
                lines.append(f"| {key} | {acc[key]['val']:.4f} | {acc[key]['test']:.4f} |")
    return "\n".join(lines)


def plot(result, path: str) -> None:
    """Speed-up over the dense RMSMP build against sparsity, one line per scheme and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    for r in result.get("rows", []):
        series.setdefault((r["scheme"].split(",")[0], r["batch"]), []).append((r["sparsity"], r["speedup_vs_dense"]))
    for (scheme, batch), pts in sorted(series.items()):
        pts.sort()
        ax.plot([100 * p for p, _ in pts], [v for _, v in pts], marker="o", label=f"{scheme}, batch {batch}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("sparsity (%), block_punched 16 x 4")
    ax.set_ylabel("speed-up over dense RMSMP")
    ax.set_title(f"BERT-base FFN, {result['hardware']['cpu']}, {result['hardware']['threads']} thread(s)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1 only, fewer repeats")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "pruning.json"))
    p.add_argument("--accuracy", action="store_true", help="also ResNet-20 / Fashion-MNIST at 75 %% (a few minutes)")
    p.add_argument("--ft-steps", type=int, default=150, help="--accuracy: AdamW steps after each pruning round")
    p.add_argument("--rounds", type=int, default=3, help="--accuracy: gradual pruning rounds")
    p.add_argument("--no-speed", action="store_true", help="skip the FFN timings (with --accuracy or --convs)")
    p.add_argument("--convs", action="store_true", help="also ResNet-18's 3x3 convs at batch 1 (pattern, block-punched)")
    p.add_argument("--table", action="store_true",
                   help="print the markdown tables of --out, draw docs/img/pruning_speedup.png and exit")
    args = p.parse_args(argv)
    if args.table:
        with open(args.out) as f:
            result = json.load(f)
        print(markdown(result))
        if result.get("conv_rows"):
            print("\n" + conv_markdown(result))
        plot(result, os.path.join(ROOT, "docs", "img", "pruning_speedup.png"))
        return 0
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from bench.cpu import hardware

    hw = hardware(args.threads)
    print(json.dumps(hw), flush=True)
    t0 = time.time()
    batches = (1,) if args.quick else (1, 128)
    rows = [] if args.no_speed else run_ffn(batches, 3 if args.quick else 5, args.threads, hw["cpu"], RATIOS,
                                            rounds=3 if args.quick else 5)
    accuracy = run_accuracy(hw["cpu"], steps=args.ft_steps, rounds=args.rounds) if args.accuracy else None
    conv_rows = run_convs(1, 3 if args.quick else 5, args.threads, hw["cpu"], rounds=3 if args.quick else 5) \
        if args.convs else None
    if os.path.exists(args.out):  # a run of one part keeps the other part's last results
        with open(args.out) as f:
            old = json.load(f)
        rows = rows or old.get("rows", [])
        accuracy = accuracy or old.get("accuracy")
        conv_rows = conv_rows or old.get("conv_rows")
    result = {"hardware": hw, "command": "nice -n -5 python -m bench.pruning " + " ".join(argv or sys.argv[1:]),
              "seconds": round(time.time() - t0, 1), "rows": rows, "accuracy": accuracy}
    if conv_rows:  # the conv rows' own command (the FFN rows' is "command")
        result["conv_rows"] = conv_rows
        result["conv_command"] = result["command"] if args.convs else old.get("conv_command")
    from tvm_rmsmp.runtime.fileio import atomic_write

    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
