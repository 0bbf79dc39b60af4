"""SP2 rows on this CPU: shift-add vs decode-to-int then multiply, and the x86 intrinsic kernel.

Run: python -m bench.sp2_lowering [--rows 3072] [--k 768] [--batch 1]

Times one packed 4-bit SP2 row group (and a Fixed-4 one for reference) built three ways:
the portable schedule with the shift-add product, the portable schedule with the
decode-then-multiply product (``sp2_lowering="decode"``), and, on x86 with AVX2, the
table-decode + MAC intrinsic kernel that ``rmsmp.compile`` uses there. Medians of TVM's time
evaluator, single thread unless TVM_NUM_THREADS says otherwise; every variant is checked
integer-exact against numpy first. Writes ``bench/results/sp2_lowering_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "sp2_lowering_cpu.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    sys.path.insert(0, ROOT)
    import tvm
    from tvm import s_tir

    import schedules
    from relay_passes.rewrite_row_groups import packed_weight, row_group_func
    from schedules.x86_intrin import packed_dense_kernel, x86_isa
    from tvm_rmsmp.runtime.fileio import atomic_write
    from tvm_rmsmp.quant.schemes import get_scheme, nibble_decode
    from tvm_rmsmp.compiler.targets import resolve_target

    target = resolve_target("llvm")
    portable_target = tvm.target.Target({"kind": "llvm", "mcpu": str(target.attrs["mcpu"]), "num-cores": 1})
    isa = x86_isa(target)
    m, k, n = args.batch, args.k, args.rows
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(m, k)).astype("uint8")
    results = {}

    def build_portable(scheme, lowering):
        func = row_group_func("dense", "t", scheme, (m, k), "uint8", (n, k), packed=True, sp2_lowering=lowering)
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the portable schedule: a rule without the x86 replacement
            sch = s_tir.Schedule(mod["main"])
            from schedules.cpu import schedule_dense

            schedule_dense(sch, portable_target)
        return tvm.compile(sch.mod, target=target)

    def build_intrinsic(scheme, which):
        levels = nibble_decode(np.arange(16), get_scheme(scheme))
        func = packed_dense_kernel(m, k, n, "uint8", levels, which, num_cores=os.cpu_count() or 1)
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)

    variants = [("sp2_4", "shift-add (portable)", lambda: build_portable("sp2_4", "shift")),
                ("sp2_4", "decode + multiply (portable)", lambda: build_portable("sp2_4", "decode")),
                ("fixed_4", "multiply (portable)", lambda: build_portable("fixed_4", "shift"))]
    for which in {"avx2": ["avx2"], "avx512vnni": ["avx2", "avx512vnni"]}.get(isa, []):
        variants += [(scheme, f"table decode + MAC ({which} intrinsics)",
                      (lambda s, w: lambda: build_intrinsic(s, w))(scheme, which)) for scheme in ("sp2_4", "fixed_4")]
    print(f"packed 4-bit row group, {m}x{k} activations x {n} rows; target mcpu={target.attrs['mcpu']}, "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    for scheme, label, build in variants:
        w_int = rng.choice(get_scheme(scheme).levels, size=(n, k)).astype(np.int8)
        exe = build()
        arrays = [x, packed_weight(w_int, scheme), np.zeros(n, np.int32), np.ones(n, np.float32),
                  np.zeros((m, n), np.float32)]
        tensors = [tvm.runtime.tensor(a) for a in arrays]
        exe.mod["main"](*tensors)
        exact = bool(np.array_equal(tensors[-1].numpy().astype(np.int64),
                                    x.astype(np.int64) @ w_int.astype(np.int64).T))
        secs = exe.mod.time_evaluator("main", tvm.cpu(), number=10, repeat=15)(*tensors).median
        results[f"{scheme}: {label}"] = {"seconds": secs, "exact": exact}
        print(f"  {scheme:8s} {label:44s} {secs * 1e6:9.1f} us   exact: {exact}", flush=True)
    report = {"shape": [m, k, n], "mcpu": str(target.attrs["mcpu"]), "isa": isa,
              "threads": int(os.environ["TVM_NUM_THREADS"]), "results": results,
              "command": "python -m bench.sp2_lowering " + " ".join(argv or sys.argv[1:])}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    atomic_write(args.json, json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
