"""Nearest vs GPTQ rounding, PTQ on the Fashion-MNIST ResNet-20 (a measurement, writes nothing).

Run:  python -m bench.gptq_rounding [--test-images 2000] [--seeds 0 1 2] [--bert-layer]

For each calibration seed: 512 random training images (4 batches of 128) calibrate the
model; the row Hessian traces (assign='hessian_error', KL loss) are estimated once per seed
and shared, so both roundings get the same row assignment. Config as bench/accuracy.py's
rmsmp_60_35_5 (first and last layer fixed_8). Top-1 on the first --test-images validation images (held-out training images).
This is not the validation-split protocol that will choose the default rounding.
``--bert-layer``: seconds and memory of GPTQ on one 768x3072 Linear with random data.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

import tvm_rmsmp as rmsmp

RATIO = {"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}


def _config(act_bits: int, **kw) -> rmsmp.RMSMPConfig:
    return rmsmp.RMSMPConfig(ratio=RATIO, act_bits=act_bits, edge_scheme="fixed_8",
                             hessian=rmsmp.HessianConfig(probes=8, batches=4, loss="kl"), **kw)


def fmnist(test_images: int, seeds, variants):
    from tvm_rmsmp.models.data import fashion_mnist_split
    from tvm_rmsmp.models.fmnist_resnet import load_pretrained
    from tvm_rmsmp.models.training import evaluate

    # a development tool: calibration from the "fit" images, scores on the validation images
    # (the test set is for bench.accuracy's reported numbers only)
    xtr, _ = fashion_mnist_split("fit")
    xte, yte = fashion_mnist_split("val")
    xte, yte = xte[:test_images], yte[:test_images]
    model = load_pretrained()
    print(f"fp32 top-1 on {test_images} validation images: {evaluate(model, xte, yte):.4f}", flush=True)
    rows = []
    for seed in seeds:
        idx = np.random.default_rng(seed).permutation(len(xtr))[:512]
        calib = [torch.from_numpy(xtr[idx[i:i + 128]]) for i in range(0, 512, 128)]
        traces = rmsmp.quantize(model, _config(8), calib).rmsmp_row_hessian
        for act in (8, 4):
            for name, kw in variants.items():
                t0 = time.perf_counter()
                q = rmsmp.quantize(model, _config(act, **kw), calib, row_hessian=traces)
                sec = time.perf_counter() - t0
                gptq = (q.rmsmp_report["gptq"] or {}).get("seconds", 0.0)
                acc = evaluate(q, xte, yte)
                rows.append((name, act, seed, acc, sec, gptq))
                print(f"seed {seed} A{act} {name:12s} top1 {acc:.4f}  quantize {sec:6.2f}s  (gptq part {gptq:.2f}s)",
                      flush=True)
    print("\nsummary (mean, min..max over seeds):")
    for act in (8, 4):
        for name in variants:
            r = [x for x in rows if x[0] == name and x[1] == act]
            a = np.array([x[3] for x in r])
            print(f"A{act} {name:12s} top1 {a.mean():.4f} ({a.min():.4f}..{a.max():.4f})  "
                  f"quantize {np.mean([x[4] for x in r]):.2f}s, gptq part {np.mean([x[5] for x in r]):.2f}s")


def bert_layer():
    from tvm_rmsmp.quant.gptq import gptq_quantize, row_objective
    from tvm_rmsmp.quant.schemes import get_scheme

    rng = np.random.default_rng(0)
    rows, k, n = 768, 3072, 8192
    w = rng.standard_normal((rows, k)) * 0.02
    x = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.2, 2.0, k).astype(np.float32)
    t0 = time.perf_counter()
    h = (x.T.astype(np.float64) @ x.astype(np.float64)) / n
    t_h = time.perf_counter() - t0
    schemes = [s for s, c in rmsmp.row_counts(rows, RATIO).items() for _ in range(c)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    q, scale = gptq_quantize(w, h, schemes)
    t_g = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    near = np.zeros_like(q)
    for s in set(schemes):
        r = np.array([i for i, t in enumerate(schemes) if t == s])
        near[r] = get_scheme(s).encode(w[r], scale[r])
    ratio = row_objective(w, q, scale, h).sum() / row_objective(w, near, scale, h).sum()
    print(f"768x3072 Linear, {n} random inputs: H (float64 X^T X) {t_h:.2f}s; GPTQ {t_g:.2f}s; "
          f"peak RSS {rss1 / 1024:.0f} MiB (before GPTQ {rss0 / 1024:.0f} MiB); H is {8 * k * k / 2**20:.0f} MiB; "
          f"objective gptq/nearest {ratio:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scale-search", action="store_true", help="also gptq with gptq_scale_search=True")
    p.add_argument("--bert-layer", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    if a.bert_layer:
        bert_layer()
        return
    variants = {"nearest": {"rounding": "nearest"}, "gptq": {"rounding": "gptq"}}
    if a.scale_search:
        variants["gptq+search"] = {"rounding": "gptq", "gptq_scale_search": True}
    fmnist(a.test_images, a.seeds, variants)


if __name__ == "__main__":
    main()
