"""Tuned vs untuned batch-1 latency of the built-in Fashion-MNIST CNN on this CPU.

Run: python -m bench.tune_demo_model [--trials 96] [--work-dir /tmp/tune_fmnist]
Prints the tuning time, trials, tuned kernels and three medians (50 runs each) per build.
"""

import argparse
import time

import numpy as np
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.models.data import load_fashion_mnist
from tvm_rmsmp.models.fmnist_cnn import load_pretrained


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=96)
    ap.add_argument("--work-dir", default="/tmp/tune_fmnist")
    args = ap.parse_args(argv)
    x_train, _ = load_fashion_mnist("train")
    q = rmsmp.quantize(load_pretrained(), rmsmp.RMSMPConfig(),
                       [torch.from_numpy(x_train[i:i + 128]) for i in range(0, 512, 128)])
    x = torch.from_numpy(x_train[:1])
    t0 = time.time()
    report = rmsmp.tune(q, (x,), "llvm", args.work_dir, trials=args.trials, trials_per_iter=16)
    seconds = time.time() - t0
    untuned = rmsmp.compile(q, (x,))
    tuned = rmsmp.compile(q, (x,), tuning=args.work_dir)
    a = [untuned.benchmark(x, repeat=50) * 1e3 for _ in range(3)]
    b = [tuned.benchmark(x, repeat=50) * 1e3 for _ in range(3)]
    print(f"tuning: {seconds:.0f} s, {report.trials} trials, {tuned.stats.get('tuned', 0)} kernels tuned")
    print(f"batch-1 latency, ms (medians of 50): untuned {[round(v, 3) for v in a]}, tuned {[round(v, 3) for v in b]}")
    print(f"untuned / tuned (median of the three): {np.median(a) / np.median(b):.2f}x;"
          f" outputs equal: {np.array_equal(untuned(x), tuned(x))}")


if __name__ == "__main__":
    main()
