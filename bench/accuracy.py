"""Accuracy of RMSMP against its baselines on real data, PTQ and QAT, in one run.

Run:  python -m bench.accuracy            (full: about an hour on 2 cores)
      python -m bench.accuracy --quick    (CI: a few minutes; fewer variants, models and QAT steps)

Models and data (all offline, see tvm_rmsmp/offline.py):
* ResNet-20 on Fashion-MNIST (checkpoint shipped with the package): top-1 on the test set.
* MiniLM-L6 (all-MiniLM-L6-v2, real weights): cosine of the quantized sentence embeddings to
  fp32 on the UCI sentiment sentences; accuracy of a logistic-regression probe on frozen
  embeddings (trained on amazon + imdb, tested on yelp); Spearman correlation with human
  similarity on WordSim-353 and SimLex-999.
* EfficientNet-Lite0 (real ImageNet weights; full mode): top-1 agreement with fp32 and
  KL(fp32 || quantized) on crops of the only real photographs available offline (a fidelity
  check, not an accuracy claim; depthwise convolutions stay in float).

Variants (same harness, same calibration batches, same QAT budget): fp32; uniform fixed_4,
sp2_4 and fixed_8 (per-row scales); layerwise_4_8 (whole layers at 8 bits by Hessian, same
8-bit weight share as RMSMP); rmsmp_60_35_5 and rmsmp_65_30_5. The first and last quantized
layers are 8-bit fixed point in every quantized variant (common practice). Writes
bench/results/accuracy.json (a list of rows {model, dataset, variant, act_bits, mode, metric,
value}; run facts in accuracy.meta.json),
the table in docs/accuracy.md and a plot of one layer's row assignment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Dict, List, Optional

import attrs
import numpy as np
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.runtime.fileio import atomic_write
from tvm_rmsmp.nn.layerwise import layerwise_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "fixed_4": {"fixed_4": 1.0},
    "sp2_4": {"sp2_4": 1.0},
    "fixed_8": {"fixed_8": 1.0},
    "layerwise_4_8": None,  # built from the Hessian by layerwise_config
    "rmsmp_60_35_5": {"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05},
    "rmsmp_65_30_5": {"sp2_4": 0.65, "fixed_4": 0.30, "fixed_8": 0.05},
}
SEED = 0
PARTS = {"fmnist": "Fashion-MNIST ResNet-20", "minilm": "MiniLM-L6", "efficientnet": "EfficientNet-Lite0"}


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {msg}", flush=True)


class Results:
    def __init__(self):
        self.rows: List[Dict] = []

    def add(self, model, dataset, variant, act_bits, mode, metric, value):
        row = {"model": model, "dataset": dataset, "variant": variant, "act_bits": act_bits, "mode": mode,
               "metric": metric, "value": round(float(value), 6)}
        self.rows.append(row)
        _log(f"  {model:10s} {variant:14s} A{act_bits if act_bits else '-':<2} {mode:4s} {metric:10s} {value:.4f}")


def _config(variant: str, act_bits: int, assign: str, hessian_loss: str) -> rmsmp.RMSMPConfig:
    ratio = VARIANTS[variant] or VARIANTS["rmsmp_60_35_5"]
    return rmsmp.RMSMPConfig(ratio=ratio, act_bits=act_bits, assign=assign, edge_scheme="fixed_8",
                             hessian=rmsmp.HessianConfig(probes=8, batches=4, loss=hessian_loss))


def _variant_config(variant, act_bits, model, calib, traces, assign, hessian_loss):
    cfg = _config(variant, act_bits, assign, hessian_loss)
    if variant == "layerwise_4_8":
        cfg, info = layerwise_config(model, cfg, calib, row_hessian=traces)
        _log(f"  layerwise_4_8: 8-bit layers {info['layers']} hold {info['share']:.3f} of the weights "
             f"(target {info['target_share']:.3f})")
    return cfg


# ------------------------------------------------------------------------------------------
# Fashion-MNIST ResNet-20
# ------------------------------------------------------------------------------------------
def _fmnist_batches(x, y, steps, batch, seed):
    def batches(epoch):
        rng = np.random.default_rng(seed + epoch)
        idx = rng.permutation(len(x))[: steps * batch]
        for i in range(steps):
            j = idx[i * batch:(i + 1) * batch]
            xb = torch.from_numpy(x[j])
            if rng.random() < 0.5:
                xb = xb.flip(-1)
            yield (xb,), torch.from_numpy(y[j])

    return batches


def run_fmnist(res: Results, quick: bool, assign: str, plot_path: Optional[str]) -> Dict:
    from tvm_rmsmp.models.data import load_fashion_mnist
    from tvm_rmsmp.models.fmnist_resnet import load_pretrained
    from tvm_rmsmp.models.training import evaluate

    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    n_test = len(xte)  # all 10000 test images in both modes: the reference model evaluates them in seconds
    model = load_pretrained()
    calib = [torch.from_numpy(xtr[i:i + 128]) for i in range(0, 512, 128)]
    acts = (8, 4)
    qat_steps, qat_batch = (40, 64) if quick else (120, 64)
    core = ("fixed_4", "sp2_4", "rmsmp_60_35_5")
    name, ds = "resnet20", "fashion_mnist"
    res.add(name, ds, "fp32", None, "ptq", "top1", evaluate(model, xte, yte))
    t0 = time.perf_counter()
    ref = rmsmp.quantize(model, _config("rmsmp_60_35_5", 8, assign, "kl"), calib)
    traces, hrep = ref.rmsmp_row_hessian, ref.rmsmp_report["hessian"]
    info = {"hessian": attrs.asdict(hrep) if hrep else None, "test_images": n_test, "calib_images": 512,
            "qat_steps": qat_steps, "qat_batch": qat_batch}
    _log(f"  Hessian estimate: {hrep}")
    if plot_path:
        plot_rows(ref, traces, "layers.4.conv1", plot_path)
    for act in acts:
        for variant in (core if quick else VARIANTS):
            cfg = _variant_config(variant, act, model, calib, traces, assign, "kl")
            q = rmsmp.quantize(model, cfg, calib, row_hessian=traces)
            res.add(name, ds, variant, act, "ptq", "top1", evaluate(q, xte, yte))
            # QAT: every variant at A4 and the core ones at A8 (quick: RMSMP 60:35:5 at A4)
            if (act == 4 and not quick) or (variant in core and not quick) or (quick and act == 4 and variant == core[-1]):
                qat = rmsmp.prepare_qat(model, cfg, calib, row_hessian=traces)
                rmsmp.train_qat(qat, _fmnist_batches(xtr, ytr, qat_steps, qat_batch, SEED),
                                torch.nn.functional.cross_entropy, rmsmp.QATConfig(epochs=1, lr=5e-5, scale_lr=5e-4))
                res.add(name, ds, variant, act, "qat", "top1", evaluate(rmsmp.convert_qat(qat), xte, yte))
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


# ------------------------------------------------------------------------------------------
# MiniLM-L6
# ------------------------------------------------------------------------------------------
def _embed(model, tok, texts, batch=64):
    from tvm_rmsmp.models.minilm import encode_texts

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            out.append(model(*encode_texts(tok, texts[i:i + batch])).float())
    return torch.cat(out).numpy()


def _probe_accuracy(e_train, y_train, e_test, y_test, l2=1e-3) -> float:
    """Logistic regression (L-BFGS, L2) on frozen embeddings; test accuracy."""
    x, y = torch.from_numpy(e_train).double(), torch.from_numpy(y_train).double()
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (torch.from_numpy(e_test).double() @ w[:-1] + w[-1]) > 0
    return float((pred.numpy().astype(np.int64) == y_test).mean())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # average ranks of ties
            m = v == val
            r[m] = r[m].mean()
        return r

    ra, rb = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    return float(np.corrcoef(ra, rb)[0, 1])


def run_minilm(res: Results, quick: bool, assign: str) -> Dict:
    from tvm_rmsmp.models.data import load_uci_sentiment, load_word_similarity
    from tvm_rmsmp.models.minilm import encode_texts, load_minilm, load_tokenizer

    model, tok = load_minilm(), load_tokenizer(max_length=64)
    sets = {s: load_uci_sentiment(s) for s in ("amazon", "imdb", "yelp")}
    train_x = sets["amazon"][0] + sets["imdb"][0]
    train_y = np.concatenate([sets["amazon"][1], sets["imdb"][1]])
    test_x, test_y = sets["yelp"]
    if quick:
        train_x, train_y, test_x, test_y = train_x[:300], train_y[:300], test_x[:200], test_y[:200]
    sims = {n: load_word_similarity(n) for n in (("wordsim353",) if quick else ("wordsim353", "simlex999"))}
    rng = np.random.default_rng(SEED)
    n_calib = 32 if quick else 64
    calib_texts = [train_x[i] for i in rng.permutation(len(train_x))[:n_calib]]
    calib = [encode_texts(tok, calib_texts[i:i + 16]) for i in range(0, n_calib, 16)]
    name, ds = "minilm_l6", "uci_sentiment"

    def evaluate(m, variant, act, fp=None):
        e_tr, e_te = _embed(m, tok, train_x), _embed(m, tok, test_x)
        out = {"train": e_tr, "test": e_te}
        if fp is not None:
            cos = np.concatenate([(e_tr * fp["train"]).sum(1), (e_te * fp["test"]).sum(1)])
            res.add(name, ds, variant, act, "ptq", "cosine", cos.mean())
        res.add(name, ds, variant, act, "ptq", "probe_acc", _probe_accuracy(e_tr, train_y, e_te, test_y))
        for sname, (pairs, human) in sims.items():
            words = sorted({w for p in pairs for w in p})
            emb = dict(zip(words, _embed(m, tok, words)))
            model_sim = np.array([float(emb[a] @ emb[b]) for a, b in pairs])
            res.add(name, sname, variant, act, "ptq", "spearman", _spearman(model_sim, human))
        return out

    fp = evaluate(model, "fp32", None)
    t0 = time.perf_counter()
    ref = rmsmp.quantize(model, _config("rmsmp_60_35_5", 8, assign, "mse"), calib)
    traces, hrep = ref.rmsmp_row_hessian, ref.rmsmp_report["hessian"]
    _log(f"  Hessian estimate: {hrep}")
    variants = ("fixed_4", "sp2_4", "rmsmp_60_35_5") if quick else tuple(VARIANTS)
    for act in (8,):
        for variant in variants:
            cfg = _variant_config(variant, act, model, calib, traces, assign, "mse")
            evaluate(rmsmp.quantize(model, cfg, calib, row_hessian=traces), variant, act, fp)
    return {"hessian": attrs.asdict(hrep) if hrep else None, "probe_train": len(train_x), "probe_test": len(test_x),
            "calib_sentences": n_calib, "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (fidelity to fp32 on real photographs)
# ------------------------------------------------------------------------------------------
def run_efficientnet(res: Results, quick: bool, assign: str) -> Dict:
    from tvm_rmsmp.models.efficientnet_lite import load_efficientnet_lite0, sample_photos

    model = load_efficientnet_lite0()
    calib_x, _ = sample_photos(32, seed=1)
    test_x, _ = sample_photos(32 if quick else 96, seed=2)
    calib = [calib_x[i:i + 16] for i in range(0, 32, 16)]
    with torch.no_grad():
        ref = torch.cat([model(test_x[i:i + 16]) for i in range(0, len(test_x), 16)])
    name, ds = "efficientnet_lite0", "photos"
    t0 = time.perf_counter()
    traces = rmsmp.quantize(model, _config("rmsmp_60_35_5", 8, assign, "kl"), calib).rmsmp_row_hessian
    variants = ("fixed_4", "sp2_4", "rmsmp_60_35_5") if quick else tuple(VARIANTS)
    for variant in variants:
        q = rmsmp.quantize(model, _variant_config(variant, 8, model, calib, traces, assign, "kl"), calib,
                           row_hessian=traces)
        with torch.no_grad():
            out = torch.cat([q(test_x[i:i + 16]) for i in range(0, len(test_x), 16)])
        agree = (out.argmax(1) == ref.argmax(1)).double().mean()
        kl = torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean")
        res.add(name, ds, variant, 8, "ptq", "top1_agree", agree)
        res.add(name, ds, variant, 8, "ptq", "kl", kl)
    return {"photos": "crops of matplotlib's sample photographs", "calib": 32, "test": len(test_x),
            "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------
# Plot and report
# ------------------------------------------------------------------------------------------
def plot_rows(q, traces: Dict[str, np.ndarray], layer: str, path: str) -> None:
    """Scatter of one layer's rows (kurtosis vs Hessian sensitivity, colored by scheme) and the
    per-layer row counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tvm_rmsmp.quant.assign import row_kurtosis

    plans = rmsmp.row_plans(q)
    plan = plans[layer]
    w = plan.dequantized().astype(np.float64)
    kurt = row_kurtosis(w)
    sens = traces[layer] * (w.reshape(len(w), -1) ** 2).mean(1)
    colors = {"sp2_4": "tab:blue", "fixed_4": "tab:orange", "fixed_8": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s, c in colors.items():
        idx = [i for i, x in enumerate(plan.schemes) if x == s]
        if idx:
            ax1.scatter(kurt[idx], sens[idx], c=c, label=f"{s} ({len(idx)})", s=18)
    ax1.set_yscale("log")
    ax1.set_xlabel("row kurtosis (3: Gaussian-like, 1.8: uniform-like)")
    ax1.set_ylabel("row Hessian trace x mean w^2")
    ax1.set_title(f"{layer}: scheme per row")
    ax1.legend()
    names = list(plans)
    bottom = np.zeros(len(names))
    for s, c in colors.items():
        counts = np.array([plans[n].counts().get(s, 0) for n in names])
        ax2.bar(range(len(names)), counts, bottom=bottom, color=c, label=s)
        bottom += counts
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=90, fontsize=6)
    ax2.set_ylabel("rows")
    ax2.set_title("rows per scheme in each layer (first/last: 8-bit)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def markdown_table(rows: List[Dict]) -> str:
    cols = ["fp32"] + list(VARIANTS)
    keys = sorted({(r["model"], r["dataset"], r["metric"], r["act_bits"] or 0, r["mode"]) for r in rows
                   if r["variant"] != "fp32"}, key=lambda k: (k[0], k[1], k[2], -k[3], k[4] == "qat"))
    val = {(r["model"], r["dataset"], r["metric"], r["act_bits"] or 0, r["mode"], r["variant"]): r["value"]
           for r in rows}
    lines = ["| model | data | metric | act | mode | " + " | ".join(cols) + " |",
             "|" + "---|" * (5 + len(cols))]
    for m, d, metric, act, mode in keys:
        cells = []
        for c in cols:
            v = val.get((m, d, metric, 0, "ptq", c)) if c == "fp32" else val.get((m, d, metric, act, mode, c))
            pct = metric in ("top1", "probe_acc", "top1_agree")
            cells.append("" if v is None else (f"{100 * v:.2f}" if pct else f"{v:.4f}"))
        lines.append(f"| {m} | {d} | {metric} | A{act} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(path: str, rows: List[Dict], meta: Dict) -> None:
    with open(path) as f:
        text = f.read()
    begin, end = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{path} lacks the {begin} / {end} markers")
    body = (f"{begin}\n\nMeasured by `{meta['command']}` on {meta['hardware']}, {meta['threads']} threads, "
            f"seed {SEED}, {meta['seconds']:.0f} s in all. Top-1 and probe accuracy in %.\n\n"
            f"{markdown_table(rows)}\n\n{end}")
    atomic_write(path, text[:text.index(begin)] + body + text[text.index(end) + len(end):])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: fewer images, variants and QAT steps")
    ap.add_argument("--assign", default=rmsmp.RMSMPConfig().assign,
                    help="row-assignment rule of the RMSMP variants (default: the library's default)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "accuracy.json"))
    ap.add_argument("--doc", default=None, help="Markdown file whose table to rewrite (default: docs/accuracy.md, "
                    "full mode only)")
    ap.add_argument("--plot", default=None, help="PNG of one layer's rows (default: docs/img/row_assignment.png, "
                    "full mode only)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of other models already in --out (rerun one part, or run parts in parallel)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    doc = args.doc or (None if args.quick else os.path.join(ROOT, "docs", "accuracy.md"))
    plot = args.plot or (None if args.quick else os.path.join(ROOT, "docs", "img", "row_assignment.png"))
    t0 = time.perf_counter()
    res = Results()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    if args.skip_minilm and "minilm" in parts:
        parts.remove("minilm")
    info = {}
    for part in parts:
        if part == "efficientnet" and args.quick:
            continue
        _log(f"{PARTS[part]} ({'quick' if args.quick else 'full'})")
        if part == "fmnist":
            info[part] = run_fmnist(res, args.quick, args.assign, plot)
        elif part == "minilm":
            info[part] = run_minilm(res, args.quick, args.assign)
        else:
            info[part] = run_efficientnet(res, args.quick, args.assign)
    cmd = "python -m bench.accuracy" + (" --quick" if args.quick else "")
    meta = {"command": cmd, "hardware": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
            "threads": args.threads, "seconds": time.perf_counter() - t0, "assign": args.assign, "seed": SEED,
            "details": info}
    try:
        with open("/proc/cpuinfo") as f:
            meta["hardware"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name")) + \
                f", {os.cpu_count()} cores"
    except (OSError, StopIteration):
        pass
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta_path = os.path.splitext(args.out)[0] + ".meta.json"
    rows = res.rows
    if args.merge and os.path.exists(args.out):
        mine = {r["model"] for r in rows}
        with open(args.out) as f:
            rows = [r for r in json.load(f) if r["model"] not in mine] + rows
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            meta["details"] = {**old.get("details", {}), **info}
            meta["seconds"] = sum(d.get("seconds", 0) for d in meta["details"].values() if isinstance(d, dict))
    res.rows = rows
    atomic_write(args.out, json.dumps(rows, indent=1))
    atomic_write(meta_path, json.dumps(meta, indent=1))
    if doc:
        write_doc(doc, res.rows, meta)
    _log(markdown_table(res.rows))
    _log(f"wrote {args.out}; {meta['seconds']:.0f} s")
    return res.rows


if __name__ == "__main__":
    main()
