"""Row-group kernels on an OpenCL device: tvm-rmsmp's GPU schedules vs TVM's dlight GPU rules.

Both sides run the same target-neutral PrimFunc (same integer products, same epilogue) for
the Mali target; only the schedule differs. Each kernel is checked against numpy, then timed
(median wall time of ``--repeat`` launches, queue drained each time).

Here the device is PoCL on the CPU: a relative proxy for schedule quality, NOT a phone.

Run: python -m bench.mobile_gpu_pocl [--repeat 20]   (writes bench/results/mobile_gpu_pocl.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import tvm
from tvm.s_tir import dlight as dl

import schedules
from relay_passes.rewrite_row_groups import group_weight, row_group_func
from tvm_rmsmp.runtime.fileio import atomic_write
from tvm_rmsmp.runtime.opencl import OpenCLPrimFunc, opencl_context
from tvm_rmsmp.quant.schemes import get_scheme
from tvm_rmsmp.compiler.targets import resolve_target

CONV = {"strides": [1, 1], "padding": [0, 0], "dilation": [1, 1]}
# (name, op, x shape (padded for conv), w shape, activation dtype)
SHAPES = [
    ("fmnist conv2 (32->39 rows, 14x14)", "conv2d", (1, 32, 16, 16), (39, 32, 3, 3), "uint8"),
    ("fmnist conv3 (64->39 rows, 7x7)", "conv2d", (1, 64, 9, 9), (39, 64, 3, 3), "uint8"),
    ("fmnist fc1 (3136->77 rows), batch 1", "dense", (1, 3136), (77, 3136), "uint8"),
    ("dense 768->384 rows, batch 1", "dense", (1, 768), (384, 768), "uint8"),
    ("dense 768->384 rows, batch 16", "dense", (16, 768), (384, 768), "uint8"),
    # signed activations (transformers): fixed rows go through rmsmp_dot_acc (plain branch on PoCL)
    ("dense 768->384 rows, batch 16, int8 act.", "dense", (16, 768), (384, 768), "int8"),
]


def _numpy_ref(op, x, w):
    x64, w64 = x.astype(np.int64), w.astype(np.int64)
    if op == "dense":
        return x64 @ w64.T
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    oh, ow = h - kh + 1, wd - kw + 1
    out = np.zeros((n, f, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,fc->nfhw", x64[:, :, i:i + oh, j:j + ow], w64[:, :, i, j])
    return out


def _time(kernel, queue, bufs, repeat):
    kernel.enqueue(queue, bufs)
    queue.finish()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        kernel.enqueue(queue, bufs)
        queue.finish()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    import pyopencl as cl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mobile_gpu_pocl.json"))
    args = ap.parse_args(argv)
    ctx, queue, device = opencl_context()
    target = resolve_target("mali")
    rng = np.random.default_rng(0)
    rows = []
    print(f"device: {device.name} ({device.platform.name}); target mali; {args.repeat} launches, medians")
    print(f"{'kernel':40s}{'scheme':>9s}{'tvm-rmsmp':>12s}{'dlight':>12s}{'speed-up':>10s}")
    for name, op, xs, ws, act in SHAPES:
        for scheme in ("sp2_4", "fixed_8"):
            x = (rng.integers(0, 256, xs) if act == "uint8" else rng.integers(-128, 128, xs)).astype(act)
            w = rng.choice(get_scheme(scheme).levels, ws).astype(np.int8)
            func = row_group_func(op, "bench", scheme, xs, act, ws, CONV if op == "conv2d" else None)
            mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            ours = schedules.apply_rules(mod, target)["main"]
            with target:
                theirs_mod = dl.ApplyDefaultSchedule(
                    dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
                )(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
            acc = _numpy_ref(op, x, w)
            mf = cl.mem_flags
            ins = [x, group_weight(w, scheme), np.zeros(ws[0], np.int32), np.ones(ws[0], np.float32)]
            bufs = [cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(a)) for a in ins]
            out = np.zeros(acc.shape, np.float32)
            bufs.append(cl.Buffer(ctx, mf.READ_WRITE, out.nbytes))
            result = {"kernel": name, "scheme": scheme, "device": device.name}
            for label, f in (("rmsmp", ours), ("dlight", theirs_mod["main"])):
                try:
                    kernel = OpenCLPrimFunc(f, target, label)
                except Exception as err:  # noqa: BLE001  (a rule set that cannot schedule it)
                    result[label + "_s"] = None
                    result[label + "_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    continue
                kernel.enqueue(queue, bufs)
                cl.enqueue_copy(queue, out, bufs[-1])
                queue.finish()
                if not np.array_equal(out.astype(np.int64), acc):
                    raise SystemExit(f"{label} kernel for {name} / {scheme} is wrong")
                result[label + "_s"] = _time(kernel, queue, bufs, args.repeat)
            ours_s, theirs_s = result.get("rmsmp_s"), result.get("dlight_s")
            ratio = theirs_s / ours_s if ours_s and theirs_s else None
            result["speedup_vs_dlight"] = ratio
            rows.append(result)
            fmt = lambda s: f"{s * 1e3:9.3f} ms" if s else "     n/a  "  # noqa: E731
            print(f"{name:40s}{scheme:>9s}{fmt(ours_s):>12s}{fmt(theirs_s):>12s}"
                  f"{(f'{ratio:8.2f}x' if ratio else '     -'):>10s}", flush=True)
    meta = {"host": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "note": "PoCL on a CPU: relative proxy, not a phone", "rows": rows}
    atomic_write(args.out, json.dumps(meta, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
