"""Pruning benchmark: block-sparse RMSMP against dense RMSMP and torch fp32, in one run.

Run from the repository root (``nice`` keeps other work on the machine from distorting it)::

    nice -n -5 python -m bench.pruning                # BERT-base FFN, 50/75/90 %, batch 1 and 128
    nice -n -5 python -m bench.pruning --quick        # batch 1 only, fewer repeats
    python -m bench.pruning --accuracy --no-speed --seeds 0   # ResNet-20 / Fashion-MNIST at 75 % (4-epoch fine-tune)
    python -m bench.pruning --aggregate-only --no-speed       # seeds' raw results -> mean, std in pruning.json

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


def _round_robin(fns, rounds: int, repeat: int):
    """``(times, ms)``: each build's median of ``repeat`` timings (ms) per round, ``rounds`` rounds
    taking the builds in turn (a change of machine load hits all alike), and the median per build."""
    import statistics

    import torch

    from bench.cpu import median_seconds

    times = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for k, fn in fns.items():
                times[k].append(median_seconds(fn, repeat) * 1e3)
    return times, {k: statistics.median(v) for k, v in times.items()}


def run_ffn(batches, repeat: int, threads: int, cpu: str, ratios, rounds: int = 5):
    """Per scheme and batch: build the dense RMSMP model and the pruned ones, then time them
    round-robin (``rounds`` rounds of ``median_seconds``), so that load from other processes
    falls on all of them alike; each number is the median of its rounds."""
    import torch

    import tvm_rmsmp as rmsmp
    from bench.cpu import ffn_model

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
            times, ms = _round_robin(fns, rounds, repeat)
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
    import warnings

    import torch

    import tvm_rmsmp as rmsmp

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
    times, ms = _round_robin(fns, rounds, repeat)
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


def _speed_table(rows) -> list:
    """Markdown lines of speed rows (FFN or conv): sparse vs dense RMSMP vs pruned torch fp32."""
    lines = ["| scheme | sparsity | batch | sparse ms | dense RMSMP ms | speedup | torch fp32 ms (pruned) | bit-exact |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['sparsity']:.0%} | {r['batch']} | {r['ms']:.4g} | {r['dense_ms']:.4g} | "
                     f"{r['speedup_vs_dense']:.2f}x | {r['torch_fp32_ms']:.4g} | {r['bit_exact']} |")
    return lines


def conv_markdown(result) -> str:
    """The docs/pruning.md table of the ResNet-18 3x3 conv rows of a result file."""
    return "\n".join(_speed_table(result.get("conv_rows", [])))


#: The accuracy recipe's defaults (``--help`` lists them; docs/pruning.md says how they were chosen on "val").
ACC_DEFAULTS = {"epochs": 4.0, "rounds": 4, "final_frac": 0.5, "batch": 128, "opt": "adamw", "lr": 2e-3,
                "schedule": "cosine", "kd": 0.5, "temperature": 4.0, "importance": "magnitude", "block": (8, 4),
                "qat_steps": 100, "qat_teacher": "pruned"}
RAW_DIR = os.path.join(ROOT, "bench", "results", "raw")
ACC_MODELS = ("dense_fp32", "pruned_fp32", "pruned_rmsmp_ptq", "pruned_rmsmp_qat", "chosen_on_val")


def _round_steps(total: int, rounds: int, final_frac: float):
    """Steps per pruning round: the last round (at the final rate) gets ``final_frac`` of
    ``total``, the earlier ones share the rest equally."""
    if rounds == 1:
        return [total]
    last = round(final_frac * total)
    each = (total - last) // (rounds - 1)
    return [each] * (rounds - 1) + [total - each * (rounds - 1)]


def _finetune_fn(xf, yf, teacher, rng, total: int, rounds: int, r):
    """The ``train_fn`` of gradual pruning: one learning-rate schedule over all rounds' steps
    (cosine: ``lr * (1 + cos(pi k / total)) / 2`` at global step ``k``; or constant), a fresh
    optimizer each round (the pruned weights' moments start at zero) with a linear warm-up over
    its first 5 % (at most 100 steps), batches drawn as epochs (permutations) of "fit" with random
    horizontal flips, and a loss of ``(1 - kd) * CE + kd * T^2 * KL(teacher / T || student / T)``
    with the dense fp32 model as the teacher."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    plan = _round_steps(total, rounds, r["final_frac"])
    state = {"round": 0, "k": 0, "perm": np.empty(0, np.int64), "pos": 0, "log": []}

    def next_idx(n):
        if state["pos"] + n > len(state["perm"]):
            state["perm"], state["pos"] = rng.permutation(len(xf)), 0
        j = state["perm"][state["pos"]:state["pos"] + n]
        state["pos"] += n
        return j

    def train_fn(m):
        steps = plan[state["round"]]
        params = [p for p in m.parameters() if p.requires_grad]
        if r["opt"] == "sgd":
            opt = torch.optim.SGD(params, lr=r["lr"], momentum=0.9, nesterov=True, weight_decay=5e-5)
        else:
            opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=0.0)
        warm = max(1, min(100, steps // 20))
        m.train()
        t0, tot_loss = time.time(), 0.0
        for i in range(steps):
            k = state["k"]
            base = r["lr"] * (0.5 * (1 + math.cos(math.pi * k / total)) if r["schedule"] == "cosine" else 1.0)
            for g in opt.param_groups:
                g["lr"] = base * min(1.0, (i + 1) / warm)
            j = next_idx(r["batch"])
            xb = torch.from_numpy(xf[j])
            if rng.random() < 0.5:
                xb = xb.flip(-1)
            out = m(xb)
            loss = F.cross_entropy(out, torch.from_numpy(yf[j]))
            if r["kd"] > 0:
                with torch.no_grad():
                    tl = teacher(xb)
                t = r["temperature"]
                kl = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(tl / t, 1), log_target=True,
                              reduction="batchmean") * t * t
                loss = (1 - r["kd"]) * loss + r["kd"] * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            state["k"] += 1
            tot_loss += loss.item()
        m.eval()
        state["log"].append({"round": state["round"] + 1, "steps": steps, "loss": round(tot_loss / max(steps, 1), 4),
                             "seconds": round(time.time() - t0, 1)})
        print(f"  round {state['round'] + 1}/{rounds}: {steps} steps, mean loss {tot_loss / max(steps, 1):.4f}, "
              f"{time.time() - t0:.0f}s", flush=True)
        state["round"] += 1

    return train_fn, plan, state


def run_accuracy(cpu: str, seed: int = 0, recipe=None, raw_path=None, quant: bool = True):
    """ResNet-20 / Fashion-MNIST at 75 % block-punched (the stem and the classifier left dense):
    gradual pruning of the pretrained model in ``recipe["rounds"]`` rounds (cubic schedule) with
    ``recipe["epochs"]`` epochs of "fit" in all as the fine-tune (:func:`_finetune_fn`); then
    RMSMP 60:35:5 (PTQ, and QAT with the masks kept, ``qat_steps`` steps per epoch, 3 epochs,
    distilled from the pruned fp32 model or the dense one). The PTQ / QAT choice is made on
    "val"; every model is also reported on "test". ``seed`` fixes the fine-tune's data order
    and the QAT batches. With ``raw_path`` the result is written there after every stage, so an
    interrupted run keeps what it measured."""
    import numpy as np
    import torch

    import tvm_rmsmp as rmsmp
    from bench.accuracy import _fmnist_batches
    from tvm_rmsmp.models.data import fashion_mnist_split
    from tvm_rmsmp.models.fmnist_resnet import load_pretrained
    from tvm_rmsmp.models.training import evaluate
    from tvm_rmsmp.runtime.fileio import atomic_write

    r = dict(ACC_DEFAULTS, **(recipe or {}))
    r["block"] = tuple(r["block"])
    t0 = time.time()
    (xf, yf), (xv, yv), (xt, yt) = (fashion_mnist_split(s) for s in ("fit", "val", "test"))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = load_pretrained().eval()
    total = round(r["epochs"] * len(xf) / r["batch"])

    out = {"workload": "resnet20_fmnist", "sparsity": 0.75, "seed": seed,
           "scheme": f"block_punched {r['block'][0]}x{r['block'][1]} (stem, fc dense)",
           "recipe": dict(r, block=list(r["block"]), ft_steps=total), "cpu": cpu}

    def save(stage):
        out["stage"], out["seconds"] = stage, round(time.time() - t0, 1)
        print(f"[seed {seed}] {stage}: " + json.dumps({k: v for k, v in out.items() if k in ACC_MODELS}), flush=True)
        if raw_path:
            atomic_write(raw_path, json.dumps(out, indent=1) + "\n")

    def scores(m, test=True):
        return {"val": evaluate(m, xv, yv), **({"test": evaluate(m, xt, yt)} if test else {})}

    out["dense_fp32"] = scores(model, test=quant)  # a sweep (quant=False) looks at "val" alone
    save("dense")
    idx = np.sort(np.random.default_rng(1000 + seed).permutation(len(xf))[:512])
    calib = [torch.from_numpy(xf[idx[i:i + 128]]) for i in range(0, 512, 128)]
    train_fn, plan, state = _finetune_fn(xf, yf, model, rng, total, r["rounds"], r)
    pcfg = rmsmp.PruneConfig(scheme="block_punched", sparsity=0.75, block=r["block"], skip=("stem", "fc"),
                             importance=r["importance"])
    pm = rmsmp.prune(model, pcfg, calib_data=calib if r["importance"] == "activation" else None,
                     train_fn=train_fn, steps=r["rounds"])
    out["rounds"] = state["log"]
    out["round_steps"] = plan
    masks = rmsmp.prune_masks(pm)
    kept = sum(int(m.sum()) for m in masks.values())
    out["pruned_share_of_pruned_layers"] = round(1 - kept / sum(m.size for m in masks.values()), 4)
    out["pruned_fp32"] = scores(pm, test=quant)
    save("pruned")
    if quant:
        cfg = rmsmp.RMSMPConfig(ratio={"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}, assign="variance")
        out["pruned_rmsmp_ptq"] = scores(rmsmp.quantize(pm, cfg, calib_data=calib))
        save("ptq")
        qat = rmsmp.prepare_qat(pm, cfg, calib)
        qcfg = rmsmp.QATConfig(epochs=3, lr=1e-4, scale_lr=1e-3, distill="kl", distill_weight=1.0)
        teacher = model if r["qat_teacher"] == "dense" else pm
        rmsmp.train_qat(qat, _fmnist_batches(xf, yf, r["qat_steps"], 64, seed), None, qcfg, teacher=teacher)
        qq = rmsmp.convert_qat(qat)
        rmsmp.prune_masks(qq)  # the zeros survived QAT (raises otherwise)
        out["pruned_rmsmp_qat"] = scores(qq)
        best = max(("pruned_rmsmp_ptq", "pruned_rmsmp_qat"), key=lambda k: out[k]["val"])
        out["chosen_on_val"] = dict(out[best], model=best)
        out["test_drop_vs_dense_fp32_pt"] = round(100 * (out["dense_fp32"]["test"] - out[best]["test"]), 2)
    save("done")
    return out


def run_minilm_accuracy(cpu: str, sparsities=SPARSITIES, block=(16, 4)):
    """MiniLM-L6 (all-MiniLM-L6-v2) pruned one-shot (block_punched, activation-weighted importance
    from the calibration sentences, no fine-tune), fp32 and RMSMP 60:35:5 PTQ (8-bit activations,
    variance assignment, first/last layer fixed_8): the mean cosine of the sentence embeddings to
    the dense fp32 ones on ``bench.accuracy``'s held-out sentences ("val": 300 of amazon+imdb,
    "test": yelp's 1,000)."""
    import numpy as np

    import tvm_rmsmp as rmsmp
    from bench.accuracy import _minilm_scores, _minilm_setup

    t0 = time.time()
    d = _minilm_setup(False, 0)
    model = d["model"]
    fp = _minilm_scores(model, d)
    cfg = rmsmp.RMSMPConfig(ratio={"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}, act_bits=8, assign="variance",
                            edge_scheme="fixed_8")

    def cos(m):
        sc = _minilm_scores(m, d, fp)
        return {"val": round(float(np.mean(sc["cosine_val"])), 5), "test": round(float(np.mean(sc["cosine"])), 5)}

    out = {"workload": "minilm_l6_sentences", "metric": "mean cosine to dense fp32 embeddings",
           "scheme": f"block_punched {block[0]}x{block[1]}, activation importance, one-shot (no fine-tune)",
           "rmsmp_ptq_dense": cos(rmsmp.quantize(model, cfg, calib_data=d["calib"])), "rows": [], "cpu": cpu}
    for sp in sparsities:
        pcfg = rmsmp.PruneConfig(scheme="block_punched", sparsity=sp, block=block, importance="activation")
        pm = rmsmp.prune(model, pcfg, calib_data=d["calib"])
        row = {"sparsity": sp, "pruned_fp32": cos(pm),
               "pruned_rmsmp_ptq": cos(rmsmp.quantize(pm, cfg, calib_data=d["calib"]))}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def aggregate(paths):
    """mean, sample std, min and max over the seeds' raw results of every model's val and test
    top-1, and of the chosen model's drop below dense fp32 on test. A run interrupted after its
    pruned fp32 model counts for the models it reached (each model's ``n`` says how many seeds)."""
    import statistics

    runs = []
    for path in sorted(paths):
        with open(path) as f:
            run = json.load(f)
        if "pruned_fp32" in run:
            runs.append(run)
    if not runs:
        raise ValueError(f"no accuracy run that got as far as the pruned model among {sorted(paths)}")
    recipes = {json.dumps(x["recipe"], sort_keys=True) for x in runs}
    if len(recipes) > 1:
        raise ValueError(f"the raw results mix recipes: {sorted(recipes)}")

    def stats(vals):
        return {"mean": round(statistics.fmean(vals), 5), "std": round(statistics.stdev(vals), 5) if len(vals) > 1
                else None, "min": min(vals), "max": max(vals), "n": len(vals)}

    agg = {"workload": runs[0]["workload"], "sparsity": runs[0]["sparsity"], "scheme": runs[0]["scheme"],
           "recipe": runs[0]["recipe"], "seeds": [x["seed"] for x in runs], "cpu": runs[0]["cpu"],
           "seconds_per_seed": [x["seconds"] for x in runs], "stages": [x.get("stage") for x in runs]}
    for key in ACC_MODELS:
        have = [x[key] for x in runs if key in x]
        if have:
            agg[key] = {split: stats([h[split] for h in have]) for split in ("val", "test")
                        if all(split in h for h in have)}
    agg["chosen_models"] = [x["chosen_on_val"]["model"] for x in runs if "chosen_on_val" in x]
    drops = [x["test_drop_vs_dense_fp32_pt"] for x in runs if "test_drop_vs_dense_fp32_pt" in x]
    if drops:
        agg["test_drop_vs_dense_fp32_pt"] = stats(drops)
        agg["goal_within_1pt_met"] = agg["test_drop_vs_dense_fp32_pt"]["mean"] <= 1.0
    agg["per_seed"] = [{k: x[k] for k in ("seed", "stage", *ACC_MODELS, "test_drop_vs_dense_fp32_pt", "seconds",
                                          "rounds") if k in x} for x in runs]
    return agg


def markdown(result) -> str:
    """The docs/pruning.md tables of a result file."""
    lines = _speed_table(result.get("rows", []))
    acc = result.get("accuracy")
    if acc and "seeds" in acc:  # aggregated over seeds: mean +- sample std (top-1, %)
        def cell(s):
            return f"{100 * s['mean']:.2f}" + ("" if s["std"] is None else f" ± {100 * s['std']:.2f}")
        lines += ["", "| model | seeds | val top-1 % | test top-1 % | test min-max |", "|---|---|---|---|---|"]
        for key in ACC_MODELS:
            if key in acc and "test" in acc[key]:
                t = acc[key]["test"]
                lines.append(f"| {key} | {t['n']} | {cell(acc[key]['val'])} | {cell(t)} | "
                             f"{100 * t['min']:.2f}-{100 * t['max']:.2f} |")
        if "test_drop_vs_dense_fp32_pt" in acc:
            d = acc["test_drop_vs_dense_fp32_pt"]
            per_seed = ", ".join(str(x["test_drop_vs_dense_fp32_pt"]) for x in acc["per_seed"]
                                 if "test_drop_vs_dense_fp32_pt" in x)
            lines += ["", (f"chosen on val minus dense fp32 on test: {d['mean']:.2f}"
                           + ("" if d["std"] is None else f" ± {d['std']:.2f}") + " pt "
                           f"(per seed {per_seed})")]
    elif acc:
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


def _accuracy_main(args, cpu: str, argv):
    """--accuracy / --aggregate-only: run the seeds (each to its raw file), then aggregate."""
    import glob

    try:
        block = tuple(int(v) for v in args.block.lower().split("x"))
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--block must be RxC (e.g. 8x4) and --seeds comma-separated ints: {args.block!r}, "
                         f"{args.seeds!r}") from None
    recipe = {"epochs": args.ft_epochs, "rounds": args.rounds, "final_frac": args.final_frac, "batch": args.ft_batch,
              "opt": args.ft_opt, "lr": args.ft_lr, "schedule": args.ft_schedule, "kd": args.kd,
              "temperature": args.kd_temp, "importance": args.importance, "block": block,
              "qat_steps": args.qat_steps, "qat_teacher": args.qat_teacher}
    os.makedirs(args.raw_dir, exist_ok=True)
    if not args.aggregate_only:
        for seed in seeds:
            run_accuracy(cpu, seed=seed, recipe=recipe, quant=not args.no_quant,
                         raw_path=os.path.join(args.raw_dir, f"acc_{args.tag}_seed{seed}.json"))
    if args.no_quant:
        return None
    agg = aggregate(glob.glob(os.path.join(args.raw_dir, f"acc_{args.tag}_seed*.json")))
    sweep = []  # the recipe sweep (--no-quant --tag sweep_*): pruned fp32 on "val" alone
    for path in sorted(glob.glob(os.path.join(args.raw_dir, "acc_sweep_*_seed*.json"))):
        with open(path) as f:
            run = json.load(f)
        if run.get("stage") == "done" and "pruned_fp32" in run:
            diff = {k: v for k, v in run["recipe"].items() if agg["recipe"].get(k) != v}
            sweep.append({"tag": os.path.basename(path)[4:-5], "seed": run["seed"], "recipe": run["recipe"],
                          "differs_from_chosen": diff, "pruned_fp32_val": run["pruned_fp32"]["val"],
                          "seconds": run["seconds"]})
    if sweep:
        agg["sweep_on_val"] = sweep
    agg["command"] = ("nice -n 10 python -m bench.pruning --accuracy --no-speed --tag " + args.tag +
                      " --seeds " + ",".join(str(s) for s in agg["seeds"]) + " (each seed its own process; then "
                      "--aggregate-only --tag " + args.tag + ")")
    print(json.dumps({k: agg[k] for k in ACC_MODELS if k in agg}), flush=True)
    return agg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1 only, fewer repeats")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "pruning.json"))
    p.add_argument("--no-speed", action="store_true", help="skip the FFN timings (with --accuracy or --convs)")
    p.add_argument("--convs", action="store_true", help="also ResNet-18's 3x3 convs at batch 1 (pattern, block-punched)")
    a = p.add_argument_group("accuracy (ResNet-20 / Fashion-MNIST, 75 % block-punched + RMSMP 60:35:5)")
    d = ACC_DEFAULTS
    a.add_argument("--accuracy", action="store_true",
                   help="also run it: per seed about 17 CPU-minutes, one thread of the Xeon (docs/pruning.md)")
    a.add_argument("--seeds", default="0", help="comma-separated seeds (fine-tune data order, QAT batches); each "
                   "writes <raw-dir>/acc_<tag>_seed<N>.json after every stage. Default %(default)s")
    a.add_argument("--aggregate-only", action="store_true",
                   help="train nothing: aggregate the finished raw results of --tag (mean, std over seeds) into --out")
    a.add_argument("--tag", default="main", help="name of the raw result files (a recipe's seeds share it)")
    a.add_argument("--raw-dir", default=RAW_DIR)
    a.add_argument("--ft-epochs", type=float, default=d["epochs"],
                   help="fine-tune length, epochs of the 55,000 'fit' images over all rounds. Default %(default)s")
    a.add_argument("--rounds", type=int, default=d["rounds"],
                   help="gradual pruning rounds (cubic schedule; 4: 43, 66, 74, 75 %%). Default %(default)s")
    a.add_argument("--final-frac", type=float, default=d["final_frac"],
                   help="share of the fine-tune steps spent in the last round (at the final rate); the earlier "
                   "rounds share the rest. Default %(default)s")
    a.add_argument("--ft-batch", type=int, default=d["batch"], help="Default %(default)s")
    a.add_argument("--ft-opt", choices=("adamw", "sgd"), default=d["opt"],
                   help="adamw (no weight decay) or sgd (Nesterov momentum 0.9, wd 5e-5); a fresh optimizer per "
                   "round with a 5 %% warm-up. Default %(default)s")
    a.add_argument("--ft-lr", type=float, default=d["lr"], help="peak learning rate. Default %(default)s")
    a.add_argument("--ft-schedule", choices=("cosine", "constant"), default=d["schedule"],
                   help="learning rate over the whole fine-tune (cosine from the peak to 0). Default %(default)s")
    a.add_argument("--kd", type=float, default=d["kd"],
                   help="weight of logit distillation from the dense fp32 model (0: cross-entropy only). "
                   "Default %(default)s")
    a.add_argument("--kd-temp", type=float, default=d["temperature"], help="distillation temperature. "
                   "Default %(default)s")
    a.add_argument("--importance", choices=("magnitude", "activation"), default=d["importance"],
                   help="pruning importance (activation: needs calibration, 512 'fit' images). Default %(default)s")
    a.add_argument("--block", default=f"{d['block'][0]}x{d['block'][1]}", help="block rows x channels. Default %(default)s")
    a.add_argument("--qat-steps", type=int, default=d["qat_steps"],
                   help="QAT steps per epoch (3 epochs, batch 64). Default %(default)s")
    a.add_argument("--qat-teacher", choices=("pruned", "dense"), default=d["qat_teacher"],
                   help="the fp32 model QAT distils from. Default %(default)s")
    a.add_argument("--minilm", action="store_true",
                   help="MiniLM-L6 instead: one-shot pruning at 50/75/90 %% (no fine-tune), embedding cosine to "
                   "fp32; its own entry 'accuracy_minilm' of --out (a few minutes)")
    a.add_argument("--no-quant", action="store_true",
                   help="stop after the pruned fp32 model (recipe sweeps on val); --out is not written")
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
    if args.minilm:  # its own entry; nothing else in --out changes
        from tvm_rmsmp.runtime.fileio import atomic_write

        res = run_minilm_accuracy(hw["cpu"])
        res["command"] = "nice -n 10 python -m bench.pruning --minilm"
        with open(args.out) as f:
            old = json.load(f)
        old["accuracy_minilm"] = res
        atomic_write(args.out, json.dumps(old, indent=1) + "\n")
        print(f"wrote the accuracy_minilm entry of {args.out}")
        return 0
    accuracy = _accuracy_main(args, hw["cpu"], argv) if (args.accuracy or args.aggregate_only) else None
    if args.no_quant:
        return 0
    conv_rows = run_convs(1, 3 if args.quick else 5, args.threads, hw["cpu"], rounds=3 if args.quick else 5) \
        if args.convs else None
    from tvm_rmsmp.runtime.fileio import atomic_write

    command = "nice -n -5 python -m bench.pruning " + " ".join(argv or sys.argv[1:])
    old = {}
    if os.path.exists(args.out):  # a run of one part keeps the other part's last results
        with open(args.out) as f:
            old = json.load(f)
        if not rows:  # no FFN rows measured: only the entries this run measured change
            if accuracy:
                old["accuracy"] = accuracy
            if conv_rows:
                old["conv_rows"], old["conv_command"] = conv_rows, command
                old["conv_seconds"] = round(time.time() - t0, 1)
            atomic_write(args.out, json.dumps(old, indent=1) + "\n")
            print(f"wrote the {' and '.join(k for k, v in (('accuracy', accuracy), ('conv_rows', conv_rows)) if v)} "
                  f"entries of {args.out}")
            return 0
        accuracy = accuracy or old.get("accuracy")
    result = {"hardware": hw, "command": command, "seconds": round(time.time() - t0, 1), "rows": rows,
              "accuracy": accuracy}
    for key in ("accuracy_minilm", "conv_rows", "conv_command", "conv_seconds"):  # kept from the last runs
        if key in old:
            result[key] = old[key]
    if conv_rows:  # the conv rows' own command (the FFN rows' is "command")
        result["conv_rows"], result["conv_command"] = conv_rows, command
        result["conv_seconds"] = result["seconds"]
    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
