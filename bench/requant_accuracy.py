"""Accuracy of the fixed-point epilogue next to the float one: ResNet-20 on Fashion-MNIST, PTQ.

For each seed the shipped ResNet-20 is quantized once (RMSMP 60:35:5, 8-bit activations,
first and last layer Fixed-8, the accuracy benchmark's defaults otherwise: Hessian row
assignment, GPTQ rounding), calibrated on 512 "fit" images drawn with the seed (as
``bench/accuracy.py`` draws them); the fixed-point model is the same quantized layers with
:func:`tvm_rmsmp.nn.layers.requant_model` applied (what ``RMSMPConfig(requant="fixed_point")``
does after the same PTQ: the layers' fixed-point epilogue, and the residual adds and the global
average pooling as integer ops), so the two differ only there. Top-1 on the 5,000
validation images (``tvm_rmsmp.models.data.fashion_mnist_split("val")``) and on the 10,000
test images, plus top-1 agreement between the two modes.

Run: python -m bench.requant_accuracy [--seeds 0 1 2]  (writes bench/results/requant_accuracy.json)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import attrs
import numpy as np
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.models.data import fashion_mnist_split
from tvm_rmsmp.models.fmnist_resnet import load_pretrained
from tvm_rmsmp.nn.inputs import collect_batches
from tvm_rmsmp.nn.layers import requant_model
from tvm_rmsmp.runtime.fileio import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logits(model, x, batch=1000):
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + batch])) for i in range(0, len(x), batch)]).numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "requant_accuracy.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    fit_x, _ = fashion_mnist_split("fit")
    data = {"val": fashion_mnist_split("val"), "test": fashion_mnist_split("test")}
    model = load_pretrained().eval()
    rows = []
    fp = {s: (_logits(model, x).argmax(1) == y).mean() for s, (x, y) in data.items()}
    for seed in args.seeds:
        t0 = time.time()
        torch.manual_seed(seed)
        idx = np.sort(np.random.default_rng(1000 + seed).permutation(len(fit_x))[:512])
        calib = [torch.from_numpy(fit_x[idx[i:i + 128]]) for i in range(0, 512, 128)]
        cfg = rmsmp.RMSMPConfig(ratio={"sp2_4": 0.6, "fixed_4": 0.35, "fixed_8": 0.05}, edge_scheme="fixed_8",
                                hessian=rmsmp.HessianConfig(seed=seed))
        q_float = rmsmp.quantize(model, cfg, calib_data=calib)
        q_fixed = copy.deepcopy(q_float)
        q_fixed, how = requant_model(q_fixed, collect_batches(calib, q_fixed, None), cfg.act_bits)
        q_fixed.rmsmp_config = attrs.evolve(q_float.rmsmp_config, requant="fixed_point")
        for split, (x, y) in data.items():
            pf, px = _logits(q_float, x).argmax(1), _logits(q_fixed, x).argmax(1)
            rows.append({"seed": seed, "split": split, "top1_float": round(float((pf == y).mean()), 5),
                         "top1_fixed_point": round(float((px == y).mean()), 5),
                         "agreement": round(float((pf == px).mean()), 5)})
            print(rows[-1], flush=True)
        chained = sum(v.endswith("chained") for v in how.values())
        print(f"seed {seed}: {chained} of {len(how)} layers and integer ops chained, {time.time() - t0:.0f} s",
              flush=True)
    mean = {split: {k: round(float(np.mean([r[k] for r in rows if r["split"] == split])), 5)
                    for k in ("top1_float", "top1_fixed_point", "agreement")} for split in data}
    result = {"command": "python -m bench.requant_accuracy" + (" --seeds " + " ".join(map(str, args.seeds))),
              "model": "ResNet-20, Fashion-MNIST (shipped checkpoint), PTQ RMSMP 60:35:5, edge layers Fixed-8",
              "host": f"{platform.machine()}, Python {platform.python_version()}",
              "fp32_top1": {k: round(float(v), 5) for k, v in fp.items()},
              "layers": how, "rows": rows, "mean": mean}
    atomic_write(args.out, json.dumps(result, indent=1))
    print(json.dumps(mean))
    return result


if __name__ == "__main__":
    main()
