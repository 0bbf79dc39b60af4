"""AMX-INT8 convolutions against the AVX-512 VNNI ones, per ResNet-18 conv shape and for the whole model.

Run from the repository root (an x86 CPU with AMX-INT8; one thread, this process's CPU time,
so a busy neighbour on the machine spoils it less than wall time)::

    python -m bench.amx_conv                      # every ResNet-18 conv shape at batch 8
    python -m bench.amx_conv --batch 1 8          # at batch 1 and 8
    python -m bench.amx_conv --model --batch 8    # and the whole ResNet-18, VNNI convs vs AMX convs

Per shape, the layer's output channels are split SP2-4 : Fixed-4 : Fixed-8 = 60:35:5 (as
``bench.cpu``'s models), each row group built as the compiler builds it for constant weights
(``schedules.cpu.x86_constant_kernel``: the VNNI kernel with ``RMSMP_AMX=0``) and as
``schedules.x86_amx_conv.amx_conv_kernel``; the three groups' times are summed. Last column: one
AMX kernel for all the layer's rows (what the compiler builds on AMX: ``x86-amx-conv-layer``). Inputs are the
zero-padded activations the graph hands the row groups (224 x 224 images: 58 x 58 after
padding at the first stage). Time: the least of 5 runs of a few calls, ``time.process_time``.
``--model``: ResNet-18 built as ``bench.cpu`` does (random weights, RMSMP 60:35:5, 8-bit
activations), compiled for this CPU with ``RMSMP_AMX=0`` (VNNI convs; the dense layers of
AMX_MIN_ROWS rows or more would use AMX either way: ResNet's one fc has ``batch`` rows) and
with AMX (the default), timed the same way.
"""

from __future__ import annotations

import argparse
import os
import time

#: (input channels, output channels, padded input height = width, kernel, stride) of ResNet-18's
#: convolutions at 224 x 224 (the stem first; 3x3 convs get 1 pixel of padding, 7x7 the stem 3)
SHAPES = ((3, 64, 230, 7, 2), (64, 64, 58, 3, 1), (64, 128, 58, 3, 2), (64, 128, 56, 1, 2), (128, 128, 30, 3, 1),
          (128, 256, 30, 3, 2), (128, 256, 28, 1, 2), (256, 256, 16, 3, 1), (256, 512, 16, 3, 2),
          (256, 512, 14, 1, 2), (512, 512, 9, 3, 1))
SHARES = (("sp2_4", 0.6), ("fixed_4", 0.35), ("fixed_8", 0.05))


def _cpu_time(fn, args, budget: float = 0.3) -> float:
    fn(*args)
    start = time.process_time()
    fn(*args)
    once = max(time.process_time() - start, 1e-5)
    calls = max(1, int(budget / once))
    runs = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(calls):
            fn(*args)
        runs.append((time.process_time() - start) / calls)
    return min(runs)


def _groups(c_out: int):
    counts = [int(c_out * s) for _, s in SHARES]
    counts[1] = c_out - counts[0] - counts[2]
    return [(name, n) for (name, _), n in zip(SHARES, counts) if n]


def shape_times(batch: int, c_in: int, c_out: int, hw: int, k: int, stride: int, target):
    """(VNNI, AMX, AMX layer) seconds: the layer's three row groups, each its own kernel (VNNI or
    AMX), and the one AMX kernel for all the layer's rows the compiler builds on AMX."""
    import numpy as np
    import tvm

    from relay_passes.rewrite_row_groups import row_group_func
    from schedules.cpu import x86_constant_kernel
    from schedules.x86_amx_conv import AMX_CONV_MIN_CHANNELS, AmxConvPlan, amx_conv_kernel, amx_conv_weights
    from tvm_rmsmp.quant.schemes import get_scheme

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, c_in, hw, hw)).astype(np.uint8)
    conv = {"strides": [stride, stride], "padding": [0, 0], "dilation": [1, 1]}
    totals = [0.0, 0.0, 0.0]
    fold = c_in < AMX_CONV_MIN_CHANNELS  # as schedules.x86_amx_conv.amx_conv_folds
    layer = AmxConvPlan(batch, c_in, hw, hw, k, k, stride, stride, c_out, fold)
    oh, ow = layer.out_hw
    exe = tvm.compile(tvm.IRModule({"main": amx_conv_kernel(layer, "uint8", "int8", num_cores=1).with_attr(
        "global_symbol", "main")}), target=target)
    w_all = rng.integers(-8, 8, (c_out, c_in, k, k)).astype(np.int8)
    args = [tvm.runtime.tensor(a) for a in (x, amx_conv_weights(w_all, fold), np.zeros(c_out, np.int32),
                                            np.ones(c_out, np.float32), np.zeros((batch, c_out, oh, ow), np.float32))]
    totals[2] = _cpu_time(exe.mod["main"], args)
    for name, n in _groups(c_out):
        packed = get_scheme(name).bits == 4
        levels = rng.choice(get_scheme(name).levels, (n, c_in, k, k)).astype(np.int8)
        w = rng.integers(0, 256, (n, (c_in * k * k + 1) // 2)).astype(np.uint8) if packed else levels
        bias = rng.integers(-1000, 1000, n).astype(np.int32)
        scale = rng.uniform(0.5, 2, n).astype(np.float32)
        func = row_group_func("conv2d", "bench", name, x.shape, "uint8", (n, c_in, k, k), conv, packed=packed)
        os.environ["RMSMP_AMX"] = "0"
        try:
            kernel, layout = x86_constant_kernel(target)(func)
        finally:
            os.environ.pop("RMSMP_AMX")
        plan = AmxConvPlan(batch, c_in, hw, hw, k, k, stride, stride, n, fold)
        amx = amx_conv_kernel(plan, "uint8", "int8", num_cores=1)
        oh, ow = plan.out_hw
        out = np.zeros((batch, n, oh, ow), np.float32)
        for i, (f, wl) in enumerate(((kernel, layout(w) if layout else w), (amx, amx_conv_weights(levels, fold)))):
            exe = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
            args = [tvm.runtime.tensor(a) for a in (x, wl, bias, scale, out)]
            totals[i] += _cpu_time(exe.mod["main"], args)
    return tuple(totals)


def model_times(batch: int):
    """(VNNI convs, AMX convs) seconds of ResNet-18 and the AMX build's kernel counts."""
    import torch

    import tvm_rmsmp as rmsmp
    from bench import cpu

    torch.manual_seed(0)
    model = cpu.resnet18().eval()
    shape = (batch, 3, 224, 224)
    q = cpu.rmsmp_quantized(model, [torch.randn(*shape) for _ in range(2)])
    x = torch.randn(*shape)
    times, kinds = [], None
    for amx in ("0", "1"):
        os.environ["RMSMP_AMX"] = amx
        exe = rmsmp.compile(q, (x,))
        kinds = exe.stats.get("cpu_kernels")
        times.append(_cpu_time(exe, (x,), budget=2.0))
    os.environ.pop("RMSMP_AMX")
    return times, kinds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--model", action="store_true", help="also the whole ResNet-18 (VNNI convs vs AMX convs)")
    ap.add_argument("--no-shapes", action="store_true", help="only the whole model")
    ap.add_argument("--shapes", type=int, nargs="+", help="only these rows of SHAPES (0: the stem)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = "1"
    import tvm

    from tvm_rmsmp.compiler.targets import resolve_target

    host = resolve_target("llvm")
    target = tvm.target.Target({**{k: v for k, v in host.export().items() if k in ("kind", "mcpu", "mattr", "mtriple")},
                                "num-cores": 1})
    print(f"{host.attrs.get('mcpu')}, one thread, CPU time (least of 5 runs); 60:35:5 SP2-4 : Fixed-4 : Fixed-8 rows")
    for batch in args.batch:
        if not args.no_shapes:
            print(f"batch {batch}: conv (in -> out, padded input, kernel, stride)   VNNI ms   AMX ms   speed-up"
                  "   AMX layer ms   speed-up")
            for c_in, c_out, hw, k, s in (SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]):
                vnni, amx, whole = shape_times(batch, c_in, c_out, hw, k, s, target)
                print(f"  {c_in:3d} -> {c_out:3d} @{hw:3d}x{hw:<3d} {k}x{k} s{s}          {vnni * 1e3:8.3f} {amx * 1e3:8.3f}"
                      f"   {vnni / amx:5.2f}x   {whole * 1e3:12.3f}   {vnni / whole:5.2f}x", flush=True)
        if args.model:
            (vnni, amx), kinds = model_times(batch)
            print(f"ResNet-18 batch {batch}, whole model: VNNI convs {vnni * 1e3:.1f} ms, AMX convs {amx * 1e3:.1f} ms "
                  f"({vnni / amx:.2f}x); kernels {kinds}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
