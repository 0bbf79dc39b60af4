"""Which row-assignment rule is best: PTQ accuracy of every rule on the same models and data.

Run: python -m bench.assign_rules [--images 10000] [--out bench/results/assign_rules.json]

ResNet-20 on Fashion-MNIST (top-1 on the test images) and MiniLM-L6 (mean embedding cosine to
fp32 on 600 UCI sentences) after PTQ with each rule, both paper ratios, activations at 8 and
4 bits (MiniLM: 8), same calibration batches, first and last layer at 8 bits, one Hessian
estimate shared by the rules that use it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.runtime.fileio import atomic_write

from .accuracy import ROOT, VARIANTS, _embed

RULES = ("variance", "hessian", "hessian_error")
RATIOS = ("rmsmp_60_35_5", "rmsmp_65_30_5")


def _cfg(rule, ratio, act, loss):
    return rmsmp.RMSMPConfig(ratio=VARIANTS[ratio], act_bits=act, assign=rule, edge_scheme="fixed_8",
                             hessian=rmsmp.HessianConfig(probes=8, batches=4, loss=loss))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "assign_rules.json"))
    args = ap.parse_args(argv)
    from tvm_rmsmp.models.data import load_fashion_mnist, load_uci_sentiment
    from tvm_rmsmp.models.fmnist_resnet import load_pretrained
    from tvm_rmsmp.models.minilm import encode_texts, load_minilm, load_tokenizer
    from tvm_rmsmp.models.training import evaluate

    t0 = time.perf_counter()
    rows = []
    xtr, _ = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xte, yte = xte[: args.images], yte[: args.images]
    model = load_pretrained()
    calib = [torch.from_numpy(xtr[i:i + 128]) for i in range(0, 512, 128)]
    traces = rmsmp.quantize(model, _cfg("hessian", RATIOS[0], 8, "kl"), calib).rmsmp_row_hessian
    for ratio in RATIOS:
        for act in (8, 4):
            for rule in RULES:
                q = rmsmp.quantize(model, _cfg(rule, ratio, act, "kl"), calib, row_hessian=traces)
                rows.append({"model": "resnet20", "ratio": ratio, "act_bits": act, "rule": rule, "metric": "top1",
                             "value": evaluate(q, xte, yte)})
                print(rows[-1], flush=True)

    mini, tok = load_minilm(), load_tokenizer(max_length=64)
    texts = load_uci_sentiment("amazon")[0][:300] + load_uci_sentiment("imdb")[0][:300]
    rng = np.random.default_rng(0)
    calib_t = [texts[i] for i in rng.permutation(len(texts))[:64]]
    mcalib = [encode_texts(tok, calib_t[i:i + 16]) for i in range(0, 64, 16)]
    fp = _embed(mini, tok, texts)
    mtraces = rmsmp.quantize(mini, _cfg("hessian", RATIOS[0], 8, "mse"), mcalib).rmsmp_row_hessian
    for ratio in RATIOS:
        for rule in RULES:
            q = rmsmp.quantize(mini, _cfg(rule, ratio, 8, "mse"), mcalib, row_hessian=mtraces)
            cos = float((_embed(q, tok, texts) * fp).sum(1).mean())
            rows.append({"model": "minilm_l6", "ratio": ratio, "act_bits": 8, "rule": rule, "metric": "cosine",
                         "value": cos})
            print(rows[-1], flush=True)
    atomic_write(args.out, json.dumps(rows, indent=1))
    seconds = time.perf_counter() - t0
    print(table(rows))
    print(f"{seconds:.0f} s; wrote {args.out}")


def table(rows) -> str:
    """Markdown: one line per (model, ratio, activation bits), one column per rule."""
    keys = list(dict.fromkeys((r["model"], r["ratio"], r["act_bits"], r["metric"]) for r in rows))
    val = {(r["model"], r["ratio"], r["act_bits"], r["metric"], r["rule"]): r["value"] for r in rows}
    lines = ["| model | ratio | act | metric | " + " | ".join(RULES) + " |", "|" + "---|" * (4 + len(RULES))]
    for m, ratio, act, metric in keys:
        cells = [val.get((m, ratio, act, metric, rule)) for rule in RULES]
        fmt = [("" if v is None else (f"{100 * v:.2f}" if metric == "top1" else f"{v:.4f}")) for v in cells]
        lines.append(f"| {m} | {ratio} | A{act} | {metric} | " + " | ".join(fmt) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
