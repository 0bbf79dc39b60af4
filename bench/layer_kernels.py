"""The two whole-layer x86 kernels against each other, by activation rows.

Run from the repository root::

    python -m bench.layer_kernels                 # 1 .. 32 rows, both BERT FFN layers, one thread
    python -m bench.layer_kernels --rows 1 8 24
    python -m bench.layer_kernels --passes        # one pass of each tiling in this CPU's pass_us
    python -m bench.layer_kernels --amx           # and the AMX layer kernel (where the host has AMX-INT8)
    python -m bench.layer_kernels --amx --cpu-time --rows 8 10 12 16   # CPU time: steadier on a shared machine
    python -m bench.layer_kernels --int8 --cpu-time --rows 32 128      # and the compile-time int8 layer kernel
    python -m bench.layer_kernels --avx2-tiles 2x2 4x2 4x1 --rows 128 --cpu-time   # AVX2: LAYER_AVX2_TILES
    python -m bench.layer_kernels --peak --threads 2   # the peak MAC rate on this CPU (VNNI: vpdpbusd; AVX2: vpmaddubsw + vpaddw)

For each row count, both FFN layers (768 -> 3072 and 3072 -> 768) with rows at SP2-4 :
Fixed-4 : Fixed-8 = 60:35:5 in a shuffled order are built as
``x86_gemv.gemv_layer_kernel`` (two rows' codes per byte, decoded in registers) and as what
runs instead from more rows on: on AVX-512 VNNI ``x86_intrin.layer_dense_kernel`` (decoded per
call into one int8 matrix, then an outer-product GEMM), on AVX2 ``x86_intrin.layer_avx2_kernel``
(rows decoded at compile time, outer products too), and timed with TVM's ``time_evaluator`` (medians; weights in
cache). The sum over both layers, and which is faster, is what a CPU's ``gemv_max_rows`` in
``schedules/x86_tuning_table.py`` (``x86_gemv.GEMV_MAX_ROWS`` and ``GEMV_MAX_ROWS_AVX2`` by
default) is chosen from. ``--passes`` times one pass of the first kernel for each (byte rows
per block, activation rows per pass) of this CPU's row of that table (``pass_us``; the row of
its ISA class where the table has none for the CPU), next to the table's value.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ((768, 3072), (3072, 768))
SHARES = (0.6, 0.35, 0.05)


def _layer(k: int, n: int, rng):
    """(groups, order, per-group kinds) of one random layer in a shuffled row order."""
    import numpy as np

    counts = [int(n * SHARES[0]), 0, int(n * SHARES[2])]
    counts[1] = n - counts[0] - counts[2]
    groups = [rng.integers(0, 256, (counts[0], (k + 1) // 2)).astype(np.uint8),
              rng.integers(0, 256, (counts[1], (k + 1) // 2)).astype(np.uint8),
              rng.integers(-127, 128, (counts[2], k)).astype(np.int8)]
    order = [(g, r) for g in range(3) for r in range(counts[g])]
    rng.shuffle(order)
    return groups, [tuple(o) for o in order]


def vnni_peak(target, threads: int, chains: int = 24, iters: int = 200000) -> float:
    """MACs per second of 512-bit ``vpdpbusd`` alone on ``threads`` threads: each thread
    updates ``chains`` independent register accumulators (enough to hide the latency on two
    ports) ``iters`` times; the fastest of 7 calls. What a GEMM kernel's MAC rate is measured
    against: the clock /proc/cpuinfo states need not be the one the cores run at."""
    import numpy as np
    from tvm.script import tirx as T

    lanes = chains * 16

    @T.prim_func(private=True)
    def peak(a: T.Buffer((64,), "int8"), out: T.Buffer((threads, lanes), "int32"), n: T.int32):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((lanes,), "int32", scope="local")
            for i in T.unroll(lanes):
                acc[i] = 0
            for _ in range(n):
                for j in T.unroll(chains):
                    acc[T.ramp(j * 16, 1, 16)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), acc[T.ramp(j * 16, 1, 16)],
                        a[T.ramp(0, 1, 64)], a[T.ramp(0, 1, 64)], dtype="int32x16")
            for i in T.unroll(lanes):
                out[t, i] = acc[i]

    return _fastest(peak, target, np.arange(64, dtype=np.int8), np.zeros((threads, lanes), np.int32), iters,
                    threads * iters * chains * 64)


def _fastest(peak, target, a, out, iters: int, macs: int) -> float:
    """MACs per second of ``peak(a, out, iters)`` built for ``target``: the fastest of 7 calls."""
    import time

    import tvm

    fn = tvm.compile(tvm.IRModule({"main": peak.with_attr("global_symbol", "main")}), target=target).mod["main"]
    a, out = tvm.runtime.tensor(a), tvm.runtime.tensor(out)
    fn(a, out, iters)
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        fn(a, out, iters)
        best = min(best, time.perf_counter() - start)
    return macs / best


def avx2_peak(target, threads: int, chains: int = 12, iters: int = 200000) -> float:
    """MACs per second of the AVX2 byte MAC the kernels use, ``vpmaddubsw`` and a 16-bit add
    per 32 products (``x86_intrin.layer_avx2_kernel``'s inner loop), on ``threads`` threads:
    each thread updates ``chains`` independent int16 accumulators ``iters`` times, each step
    multiplying the accumulator's own bytes (so the multiply cannot be hoisted out of the loop;
    12 chains of 6 cycles' latency keep two multiplies a cycle in flight); the fastest of 7 calls."""
    import numpy as np
    from tvm.script import tirx as T

    lanes = chains * 16

    @T.prim_func(private=True)
    def peak(a: T.Buffer((32,), "int8"), out: T.Buffer((threads, lanes), "int16"), n: T.int32):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((lanes,), "int16", scope="local")
            for i in T.unroll(lanes):
                acc[i] = T.int16(i)
            for _ in range(n):
                for j in T.unroll(chains):
                    acc[T.ramp(j * 16, 1, 16)] = acc[T.ramp(j * 16, 1, 16)] + T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                        T.reinterpret(acc[T.ramp(j * 16, 1, 16)], dtype="int8x32"), a[T.ramp(0, 1, 32)],
                        dtype="int16x16")
            for i in T.unroll(lanes):
                out[t, i] = acc[i]

    return _fastest(peak, target, np.ones(32, dtype=np.int8), np.zeros((threads, lanes), np.int16), iters,
                    threads * iters * chains * 32)


def _cpuinfo_mhz() -> float:
    try:
        with open("/proc/cpuinfo") as fh:
            return float(next(line for line in fh if line.startswith("cpu MHz")).split(":")[1])
    except (OSError, StopIteration, ValueError):
        return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 20, 24, 32])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--narrow", action="store_true", help="AVX-512 VNNI: also time the layer kernel's 256-bit "
                    "MAC form (layer_dense_kernel(wide=False))")
    ap.add_argument("--passes", action="store_true", help="time one pass of each tiling in PASS_US")
    ap.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time (least of 7 runs; "
                    "one thread only): steadier than wall-clock medians on a machine shared with other jobs")
    ap.add_argument("--peak", action="store_true", help="measure the byte MAC's peak rate on --threads threads: "
                    "AVX-512 VNNI vpdpbusd, next to the formula cores x clock (/proc/cpuinfo) x 2 ports x 64; "
                    "AVX2 vpmaddubsw + a 16-bit add")
    ap.add_argument("--int8", action="store_true", help="AVX-512 VNNI: also time x86_intrin.layer_int8_kernel (rows "
                    "decoded to int8 at compile time; what static batches past the batch-1 kernel run)")
    ap.add_argument("--amx", action="store_true", help="also time the AMX layer kernel (schedules.x86_amx), where "
                    "the host has AMX-INT8: AMX_MIN_ROWS is chosen from it")
    ap.add_argument("--avx2-tiles", type=lambda v: tuple(int(x) for x in v.split("x")), nargs="+", metavar="RxV",
                    help="AVX2: time x86_intrin.layer_avx2_kernel with these register tiles (activation rows x 8-row "
                    "weight vectors, e.g. 2x2 4x2): what LAYER_AVX2_TILES is chosen from")
    args = ap.parse_args(argv)
    if args.avx2_tiles and any(len(t) != 2 or min(t) < 1 for t in args.avx2_tiles):
        ap.error(f"--avx2-tiles: tiles as RxV with positive R and V, got {args.avx2_tiles}")
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time measures one thread")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, ROOT)
    import numpy as np
    import tvm
    from tvm.target.codegen import target_has_features

    from schedules.x86_gemv import INT8, LINEAR, block_pairs, gemv_layer_kernel, gemv_layer_weights
    from schedules.x86_intrin import (
        layer_avx2_kernel,
        layer_avx2_weights,
        layer_dense_kernel,
        layer_int8_kernel,
        layer_int8_weights,
        layer_weights,
        x86_isa,
    )
    from schedules.x86_tuning_table import X86_CONSTANTS, x86_constants
    from tvm_rmsmp.quant.schemes import get_scheme, nibble_decode

    from schedules.x86_amx import amx_dense_kernel, amx_enabled, amx_weights
    from tvm_rmsmp.compiler.targets import resolve_target
    from tvm_rmsmp.quant.schemes import unpack_nibbles

    host = resolve_target("llvm")  # the host's features (AMX) with its CPU name
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "mattr": list(host.attrs.get("mattr", [])), "num-cores": args.threads})
    amx = args.amx and amx_enabled(target)
    if args.amx and not amx:
        print("--amx: this host's target has no AMX-INT8 (or RMSMP_AMX=0); the AMX column is left out")
    isa = x86_isa(target)
    if isa is None:
        print(f"needs AVX2; this CPU ({target.attrs.get('mcpu')}) has no x86 kernel")
        return 1
    vbmi = target_has_features("avx512vbmi", target)
    cpu = str(target.attrs.get("mcpu"))
    constants = x86_constants(target)
    row = cpu if X86_CONSTANTS.get(cpu) is constants else f"default-{isa}"
    sp2, fixed4 = (nibble_decode(np.arange(16), get_scheme(s)) for s in ("sp2_4", "fixed_4"))
    rng = np.random.default_rng(0)
    layers = [(k, n, *_layer(k, n, rng)) for k, n in LAYERS]

    def timed(func, arrays):
        exe = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        tensors = [tvm.runtime.tensor(a) for a in arrays]
        if args.cpu_time:  # one thread: this process's CPU time, the least of 7 runs of 20 calls
            import time

            main_fn = exe.mod["main"]
            main_fn(*tensors)
            runs = []
            for _ in range(7):
                start = time.process_time()
                for _ in range(20):
                    main_fn(*tensors)
                runs.append((time.process_time() - start) / 20)
            return min(runs)
        return float(np.median(exe.mod.time_evaluator("main", tvm.cpu(), number=20, repeat=7)(*tensors).results))

    print(f"{target.attrs.get('mcpu')} ({isa}), {args.threads} thread(s), VBMI {vbmi}; microseconds, both FFN layers")

    def gemv(m, pairs, rows_per_pass=None):
        total = 0.0
        for k, n, groups, order in layers:
            x = rng.integers(-128, 128, (m, k)).astype(np.int8)
            bias, scale = np.zeros(n, np.int64), np.ones(n, np.float32)
            layout, *consts = gemv_layer_weights(order, groups, [0, LINEAR, INT8], [sp2, fixed4, None], bias, scale,
                                                 k, "int8", pairs=pairs, isa=isa)
            func = gemv_layer_kernel(layout, "int8", [sp2], vbmi=vbmi, num_cores=args.threads, m=m,
                                     rows_per_pass=rows_per_pass, cpu=cpu)
            total += timed(func, [x, *consts, np.zeros((m, n), np.float32)])
        return total

    if args.peak:
        if isa != "avx512vnni":  # AVX2: the byte MAC of the AVX2 layer kernel
            measured = avx2_peak(target, args.threads)
            print(f"vpmaddubsw + vpaddw (256-bit) measured: {measured / 1e9:.0f} GMAC/s on {args.threads} thread(s) "
                  f"({measured / 32 / args.threads / 1e9:.2f} G pairs/s a thread)")
            return 0
        mhz = _cpuinfo_mhz()
        measured = vnni_peak(target, args.threads)
        print(f"/proc/cpuinfo clock {mhz:.0f} MHz: {args.threads} x {mhz / 1e3:.2f} GHz x 2 ports x 64 = "
              f"{args.threads * mhz * 1e6 * 128 / 1e9:.0f} GMAC/s; vpdpbusd (512-bit) measured: {measured / 1e9:.0f} GMAC/s "
              f"({measured / 128 / args.threads / 1e9:.2f} GHz if two per cycle)")
        return 0
    if args.passes:
        print(f"constants row: {row}")
        print(f"{'byte rows/block':>15} {'rows/pass':>9} {'us/pass':>9} {'pass_us':>9}")
        for (pairs, rows), us in sorted(constants["pass_us"].items()):
            print(f"{pairs:>15} {rows:>9} {gemv(rows, pairs, rows) * 1e6:>9.1f} {us:>9.1f}", flush=True)
        return 0
    def avx2_layer(m, k, n, groups, order, tiles=None):
        """The AVX2 alternative: the static-batch layer kernel, rows decoded at compile time
        (register tile ``tiles``, default ``LAYER_AVX2_TILES``)."""
        decoded = [nibble_decode(unpack_nibbles(groups[0], k), get_scheme("sp2_4")),
                   nibble_decode(unpack_nibbles(groups[1], k), get_scheme("fixed_4")), groups[2]]
        w = np.stack([decoded[g][r] for g, r in order]).astype(np.int8)
        is8 = np.array([g == 2 for g, _ in order])
        levels = sorted({int(v) for v in np.concatenate([sp2, fixed4])})
        func = layer_avx2_kernel(m, k, n, "int8", levels, int(is8.sum()), num_cores=args.threads, cpu=cpu, tiles=tiles)
        bias, scale = np.zeros(n, np.int32), np.ones(n, np.float32)
        return timed(func, [rng.integers(-128, 128, (m, k)).astype(np.int8), *layer_avx2_weights(w, is8, "int8", tiles),
                            bias, scale, bias[is8], scale[is8], np.zeros((m, n), np.float32)])

    def amx_layers(m):
        """The AMX kernel (schedules.x86_amx) over both layers, rows decoded at compile time."""
        total = 0.0
        for k, n, groups, order in layers:
            decoded = [nibble_decode(unpack_nibbles(groups[0], k), get_scheme("sp2_4")),
                       nibble_decode(unpack_nibbles(groups[1], k), get_scheme("fixed_4")), groups[2]]
            w = np.stack([decoded[g][r] for g, r in order]).astype(np.int8)
            func = amx_dense_kernel(m, k, n, "int8", num_cores=args.threads)
            total += timed(func, [rng.integers(-128, 128, (m, k)).astype(np.int8), amx_weights(w),
                                  np.zeros(n, np.int32), np.ones(n, np.float32), np.zeros((m, n), np.float32)])
        return total

    if args.avx2_tiles:
        if isa != "avx2":
            print(f"--avx2-tiles: times the AVX2 layer kernel; this CPU's x86 kernels are {isa} (hide AVX-512 with "
                  "bench/cpuid_mask.py, or run on an AVX2 CPU)")
            return 1
        print(f"{'rows':>5} " + " ".join(f"{f'{r}x{v}':>8}" for r, v in args.avx2_tiles))
        for m in args.rows:
            line = [sum(avx2_layer(m, k, n, groups, order, tile) for k, n, groups, order in layers)
                    for tile in args.avx2_tiles]
            print(f"{m:>5} " + " ".join(f"{t * 1e6:>8.1f}" for t in line), flush=True)
        return 0
    other = "layer"
    narrow = args.narrow and isa == "avx512vnni"
    int8 = args.int8 and isa == "avx512vnni"
    print(f"{'rows':>5} {'gemv':>9} {other:>9} {other + '/gemv':>11}" + (f" {'layer256':>9}" if narrow else "")
          + (f" {'int8':>9} {'int8/layer':>10}" if int8 else "")
          + (f" {'amx':>9} {'amx/best':>9}" if amx else ""))
    for m in args.rows:
        total = {"gemv": gemv(m, block_pairs(m, isa, cpu)), other: 0.0, "layer256": 0.0, "int8": 0.0}
        for k, n, groups, order in layers:
            if isa != "avx512vnni":
                total[other] += avx2_layer(m, k, n, groups, order)
                continue
            x = rng.integers(-128, 128, (m, k)).astype(np.int8)
            bias, scale = np.zeros(n, np.int64), np.ones(n, np.float32)
            n8 = groups[2].shape[0]
            func = layer_dense_kernel(m, k, n, "int8", [sp2, fixed4], n8, num_cores=args.threads, vbmi=vbmi, cpu=cpu)
            args_ = [x, *layer_weights(order, groups, [0, 1, -1], k), bias.astype(np.int32), scale,
                     np.zeros((m, n), np.float32)]
            total[other] += timed(func, args_)
            if int8:  # every row decoded at compile time, as x86_layers builds static batches
                decoded = [nibble_decode(unpack_nibbles(groups[0], k), get_scheme("sp2_4")),
                           nibble_decode(unpack_nibbles(groups[1], k), get_scheme("fixed_4")), groups[2]]
                w = np.stack([decoded[g][r] for g, r in order]).astype(np.int8)
                total["int8"] += timed(layer_int8_kernel(m, k, n, "int8", num_cores=args.threads, cpu=cpu),
                                       [x, layer_int8_weights(w, "int8"), bias.astype(np.int32), scale,
                                        np.zeros((m, n), np.float32)])
            if narrow:  # the 256-bit MAC form of the same kernel
                total["layer256"] += timed(layer_dense_kernel(m, k, n, "int8", [sp2, fixed4], n8, num_cores=args.threads,
                                                              vbmi=vbmi, cpu=cpu, wide=False), args_)
        line = f"{m:>5} {total['gemv'] * 1e6:>9.1f} {total[other] * 1e6:>9.1f} {total[other] / total['gemv']:>10.2f}x"
        if narrow:
            line += f" {total['layer256'] * 1e6:>9.1f}"
        if int8:
            line += f" {total['int8'] * 1e6:>9.1f} {total['int8'] / total[other]:>9.2f}x"
        if amx:
            t_amx = amx_layers(m)
            line += f" {t_amx * 1e6:>9.1f} {t_amx / min(total['gemv'], total[other]):>8.2f}x"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
