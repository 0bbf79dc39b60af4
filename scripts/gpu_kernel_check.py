"""Run every row-group kernel variant on a CUDA GPU (when one is present) against numpy.

Usage: python scripts/gpu_kernel_check.py   (prints one line per case and a summary)
"""

import sys

import numpy as np
import tvm

sys.path.insert(0, "tests")
from conftest import np_conv_acc, np_dense_acc, np_epilogue  # noqa: E402

import schedules  # noqa: E402
from relay_passes.rewrite_row_groups import group_weight, row_group_func  # noqa: E402
from tvm_rmsmp.quant.schemes import get_scheme  # noqa: E402

CASES = [
    ("dense", (1, 768), (64, 768), None),
    ("dense", (5, 40), (20, 40), None),
    ("dense", (128, 256), (77, 256), None),
    ("dense", (3, 4096), (96, 4096), None),
    ("conv2d", (1, 16, 18, 18), (12, 16, 3, 3), {"strides": [1, 1], "padding": [0, 0], "dilation": [1, 1]}),
    ("conv2d", (2, 16, 18, 18), (10, 16, 3, 3), {"strides": [1, 1], "padding": [0, 0], "dilation": [1, 1]}),
    ("conv2d", (1, 32, 30, 30), (39, 32, 3, 3), {"strides": [2, 2], "padding": [0, 0], "dilation": [1, 1]}),
]


def main():
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    dev = tvm.cuda(0)
    print("cuda device:", dev.exist, getattr(dev, "device_name", ""))
    rng = np.random.default_rng(0)
    ok = 0
    total = 0
    for op, xs, ws, conv in CASES:
        for scheme in ("sp2_4", "fixed_4", "fixed_8"):
            for act in ("uint8", "int8"):
                lo, hi = (0, 255) if act == "uint8" else (-127, 127)
                x = rng.integers(lo, hi + 1, xs).astype(act)
                w = rng.choice(get_scheme(scheme).levels, ws).astype(np.int8)
                f = row_group_func(op, "t", scheme, xs, act, ws, conv)
                mod = schedules.apply_rules(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target)
                exe = tvm.compile(mod, target=target)
                src = exe.mod.imports[0].inspect_source()
                uses_dp4a = "__dp4a(" in src.split("extern \"C\" __global__")[-1]
                acc = np_dense_acc(x, w) if op == "dense" else np_conv_acc(x, w, conv["strides"], (0, 0), (1, 1))
                bias = rng.integers(-1000, 1000, ws[0]).astype(np.int32)
                scale = rng.uniform(0.5, 2, ws[0]).astype(np.float32)
                args = [tvm.runtime.tensor(a, dev) for a in (x, group_weight(w, scheme), bias, scale, np.zeros(acc.shape, np.float32))]
                exe.mod["main"](*args)
                got = args[-1].numpy()
                good = np.array_equal(got, np_epilogue(acc, bias.astype(np.int64), scale, acc.ndim - 1 if op == "dense" else 1))
                ok += good
                total += 1
                print(f"{op:7s} x{list(xs)} w{list(ws)} {scheme:8s} {act:6s} {'OK' if good else 'MISMATCH'}"
                      f"{'  (dp4a)' if uses_dp4a else ''}", flush=True)
    print(f"{ok} passed, {total - ok} failed")
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
