"""ResNet-18 (ImageNet shapes) on the FPGA accelerator model: RMSMP vs three 4-bit fixed-point baselines.

For each board (XC7Z020, XC7Z045) the same ResNet-18 (random weights: latency does not depend
on them) is quantized and compiled with ``target="fpga:<board>"``, and each design below is
timed on the same instruction streams' tiles with the same buffers, DRAM bandwidth and
dataflow (``exe.profile(accelerator=...)``):

* ``rmsmp``: rows split by ``rmsmp.fpga.derive_ratio(board)`` (SP2-4 rows on the LUT core,
  Fixed-4/Fixed-8 rows on the DSP core, both at once); two 4-bit products per DSP48;
* ``fixed4_dsp``: every row Fixed-4 on the DSP core, two 4-bit products per DSP48;
* ``fixed4_dsp1``: the same with one product per DSP48 (the papers' baseline, most likely);
* ``fixed4_lut_dsp``: Fixed-4 rows on the DSPs (two per DSP48) and on LUT multipliers (radix-4
  Booth, ``tvm_rmsmp/fpga/rtl/lut_mac.v``) given the LUTs RMSMP's SP2 array uses: as many as
  that budget buys at the synthesized LUTs per Fixed-4 LUT MAC (the board file's
  ``provenance.luts_per_fixed4_lut_mac``), rows split between the cores by the same balance
  rule (``derive_ratio(..., high_precision=0)``). The LUT core's rows are compiled as SP2-4
  rows: same 4-bit codes, bytes and array passes as Fixed-4 rows on LUT multipliers, so the
  cycles are the same (the RTL of both LUT arrays is checked in tests/test_fpga_rtl.py).

Each design is compiled in both epilogue modes (``--requant``, default both):

* ``fixed_point`` (``RMSMPConfig(requant="fixed_point")``, the issue's integer mode): the ALU
  requantizes on chip (the bias starts the accumulation, ``mul_shift``) and every layer stores 8-bit codes;
  variants "int8 on chip" (what the compiled model runs, layer after layer), "int8 on chip,
  weight prefetch" (the same streams chained into one program, each layer's weight loads
  overlapping the previous layer: ``exe.profile(prefetch=True)``), and that with 4x the DRAM
  bandwidth, with the DRAM split into a read and a write channel of half the bus each (the
  model before the boards' bus was derived), with the ALU taking turns with the GEMMs on
  the core's queue as in VTA (``alu_unit="core"``), or without residual buffers (each
  residual add a program of its own instead of fused into a convolution's epilogue,
  ``res_buffer_kib=0``), or with the accumulators in two parts instead of three
  (``acc_slots=2``, the same tiles) (what-ifs);
* ``float``: the float epilogue runs on the host, the accelerator stores int32; variants
  "int32 write-back" (as compiled) and the what-ifs "8-bit write-back" (only the store bytes
  re-timed) and "8-bit write-back, 4x DRAM".

Cycles come from the cycle-level simulator (deterministic; the machine running this does not
matter). ``--check`` also runs each RMSMP model once on the simulator and compares it with the
torch reference, bit for bit.

Run: python -m bench.fpga [--check] [--requant fixed_point|float|both]
(writes bench/results/fpga.json and bench/results/fpga_layers.png)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import attrs
import numpy as np
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.runtime.fileio import atomic_write
from tvm_rmsmp.fpga import derive_ratio, load_board
from tvm_rmsmp.models.resnet import resnet18

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"xc7z020": {"ratio": "60:35:5", "speedup": 3.01}, "xc7z045": {"ratio": "65:30:5", "speedup": 3.65}}
VARIANTS = {
    "float": {
        "int32 write-back": {},
        "8-bit write-back": {"store_bytes_per_output": 1},
        "8-bit write-back, 4x DRAM": {"store_bytes_per_output": 1, "dram_scale": 4},
    },
    "fixed_point": {
        "int8 on chip": {},
        "int8 on chip, weight prefetch": {"prefetch": True},
        "int8 on chip, weight prefetch, 4x DRAM": {"prefetch": True, "dram_scale": 4},
        "int8 on chip, weight prefetch, split DRAM": {"prefetch": True, "dram_split": True},
        "int8 on chip, weight prefetch, ALU on the core's queue": {"prefetch": True, "alu_unit": "core"},
        "int8 on chip, weight prefetch, adds unfused": {"prefetch": True, "res_buffer_kib": 0},
        "int8 on chip, weight prefetch, double-buffered accumulators": {"prefetch": True, "acc_slots": 2},
    },
}


def _ratio_text(ratio):
    return ":".join(f"{round(100 * ratio.get(k, 0.0))}" for k in ("sp2_4", "fixed_4", "fixed_8"))


def designs(board):
    """{design: (ratio, accelerator)} for ``board`` (see the module docstring)."""
    cfg = load_board(board)
    a = cfg.accelerator
    with open(cfg.source) as fh:
        per_l4 = json.load(fh).get("provenance", {}).get("luts_per_fixed4_lut_mac")
    if not per_l4:
        raise ValueError(f"{cfg.source}: no provenance.luts_per_fixed4_lut_mac (python -m bench.fpga_synth --update-boards)")
    budget = a.lut_array.units * a.luts_per_sp2_mac
    l4 = attrs.evolve(a, lut_array={"pixels": a.lut_array.pixels, "reduction": budget // (per_l4 * a.lut_array.pixels)})
    l4_ratio = derive_ratio(attrs.evolve(cfg, accelerator=l4), high_precision=0.0)
    return {
        "fixed4_dsp": ({"fixed_4": 1.0}, a),
        "fixed4_dsp1": ({"fixed_4": 1.0}, attrs.evolve(a, dsp_products_4bit=1)),
        "fixed4_lut_dsp": (l4_ratio, l4),
        "rmsmp": (derive_ratio(cfg), a),
    }


def _variant(accel, spec):
    spec = dict(spec)
    scale = spec.pop("dram_scale", 1)
    spec.pop("prefetch", None)
    if spec.pop("dram_split", False):  # the earlier model: half the bus each way, at once
        return attrs.evolve(accel, dram_bus="split", dram_bytes_per_cycle=accel.dram_bytes_per_cycle // 2, **spec)
    return attrs.evolve(accel, dram_bytes_per_cycle=accel.dram_bytes_per_cycle * scale, **spec)


def _plot(path, per_layer, mode):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    boards = list(per_layer)
    fig, axes = plt.subplots(len(boards), 1, figsize=(15, 5 * len(boards)), squeeze=False)
    for ax, board in zip(axes[:, 0], boards):
        rm, base = per_layer[board]["rmsmp"], per_layer[board]["fixed4_dsp"]
        names = [layer["layer"].replace("layer", "L").replace(".downsample.0", ".ds") for layer in rm]
        x = np.arange(len(names))
        width = 0.2
        units = [("lut", "LUT core (SP2)"), ("dsp", "DSP core (fixed)"), ("dma_read", "DMA read"),
                 ("dma_write", "DMA write")]
        for k, (unit, label) in enumerate(units):
            ax.bar(x + (k - 1.5) * width, [layer["busy"].get(unit, 0) for layer in rm], width, label=f"RMSMP: {label} busy")
        ax.plot(x, [layer["cycles"] for layer in rm], "k_", markersize=18, mew=2.5, label="RMSMP layer cycles")
        base_cycles = {layer["layer"]: layer["cycles"] for layer in base}
        ax.plot(x, [base_cycles.get(layer["layer"], np.nan) for layer in rm], "r_", markersize=18, mew=2.5,
                label="fixed-4 DSP-only layer cycles")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("cycles")
        ax.set_title(f"ResNet-18 on {board}: per-layer cycles by unit (cycle model, {mode})")
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


DOC = os.path.join(ROOT, "docs", "fpga.md")
_NAMES = {"fixed4_dsp": "fixed4_dsp (2 per DSP)", "fixed4_dsp1": "fixed4_dsp1 (1 per DSP)",
          "fixed4_lut_dsp": "fixed4_lut_dsp", "rmsmp": "**rmsmp**"}


def _busy(u, keys):
    return " / ".join("-" if not u.get(k) else f"{100 * u[k]:.0f}%" for k in keys)


def markdown_tables(result) -> str:
    """The tables of docs/fpga.md's ResNet-18 section, from a ``bench.fpga`` result."""
    rows, speed = result["rows"], result["speedup"]
    boards = list(speed)
    clock = {b: result["boards"][b]["clock_mhz"] for b in boards}

    def row(board, design, mode, variant):
        return next(r for r in rows if (r["board"], r["design"], r["requant"], r["variant"]) == (board, design, mode, variant))

    out = []
    if any(r["requant"] == "fixed_point" for r in rows):
        out += ["**The integer-only mode** (`requant=\"fixed_point\"`, every design compiled with it: on-chip",
                "requantization, 8-bit stores; \"as compiled\" runs the layers one after the other, \"weight",
                "prefetch\" chains them, `exe.profile(prefetch=True)`):", "",
                "| board | design | ratio | cycles, as compiled | with weight prefetch | latency (prefetch) | RMSMP speedup "
                "over it (prefetch) | LUT / DSP core busy | LUT / DSP ALU busy | DMA read / write busy |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for b in boards:
            for d in _NAMES:
                a, p = row(b, d, "fixed_point", "int8 on chip"), row(b, d, "fixed_point", "int8 on chip, weight prefetch")
                sp = speed[b]["int8 on chip, weight prefetch"].get(f"rmsmp_over_{d}")
                u = p["utilization"]
                out.append(f"| {b.upper()}, {clock[b]:.0f} MHz | {_NAMES[d]} | {a['ratio']} | {a['cycles']:,} | "
                           f"{p['cycles']:,} | {p['latency_ms']:.2f} ms | {f'{sp:.2f}x' if sp else '-'} | "
                           f"{_busy(u, ('lut', 'dsp'))} | {_busy(u, ('alu_lut', 'alu_dsp'))} | "
                           f"{_busy(u, ('dma_read', 'dma_write'))} |")
        out.append("")
    if any(r["requant"] == "float" for r in rows):
        out += ["**The float epilogue** (`requant=\"float\"`, int32 stores; the 8-bit rows are what-ifs that",
                "only re-time the stores):", "",
                "| board | design | ratio | cycles | latency | RMSMP speedup over it | LUT / DSP core busy | "
                "DMA read / write busy |", "|---|---|---|---|---|---|---|---|"]
        for b in boards:
            for d in _NAMES:
                r = row(b, d, "float", "int32 write-back")
                sp = speed[b]["int32 write-back"].get(f"rmsmp_over_{d}")
                out.append(f"| {b.upper()}, {clock[b]:.0f} MHz | {_NAMES[d]} | {r['ratio']} | {r['cycles']:,} | "
                           f"{r['latency_ms']:.2f} ms | {f'{sp:.2f}x' if sp else '-'} | "
                           f"{_busy(r['utilization'], ('lut', 'dsp'))} | {_busy(r['utilization'], ('dma_read', 'dma_write'))} |")
        out.append("")
    out += ["Speedup of RMSMP over each baseline, every variant (`speedup` in `fpga.json`; \"as compiled\" and",
            "\"weight prefetch\" are what the compiled models run, the others what-ifs):", "",
            "| board | mode, variant | over fixed4_dsp | over fixed4_dsp1 | over fixed4_lut_dsp |", "|---|---|---|---|---|"]
    for b in boards:
        for mode in VARIANTS:
            for k, variant in enumerate(VARIANTS[mode]):
                if variant not in speed[b]:
                    continue
                sp = speed[b][variant]
                name = f"{mode}: {variant}"
                if mode == "fixed_point" and k < 2:
                    name = f"**{name}**"
                out.append(f"| {b} | {name} | " + " | ".join(f"{sp[f'rmsmp_over_{d}']:.2f}x" for d in
                                                         ("fixed4_dsp", "fixed4_dsp1", "fixed4_lut_dsp")) + " |")
    return "\n".join(out) + "\n"


def write_tables(result, doc: str = DOC):
    """Replace docs/fpga.md's generated block (between its BEGIN/END markers) with the tables."""
    begin, end = "<!-- BEGIN generated by python -m bench.fpga -->\n", "<!-- END generated -->\n"
    with open(doc) as fh:
        text = fh.read()
    if begin not in text or end not in text:
        raise ValueError(f"{doc}: no generated block (markers {begin.strip()} ... {end.strip()})")
    head, rest = text.split(begin, 1)
    atomic_write(doc, head + begin + markdown_tables(result) + end + rest.split(end, 1)[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boards", nargs="+", default=["xc7z020", "xc7z045"])
    ap.add_argument("--check", action="store_true", help="run each RMSMP model on the simulator vs the torch reference")
    ap.add_argument("--requant", choices=("both", "fixed_point", "float"), default="both",
                    help="epilogue mode(s) to compile (RMSMPConfig.requant); with --sparsity: fixed_point writes "
                    "fpga_sparse_fixed_point.json, anything else the float epilogue's fpga_sparse.json")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fpga.json"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "bench", "results", "fpga_layers.png"))
    ap.add_argument("--sparsity", nargs="+", type=float, default=None,
                    help="instead: the RMSMP design on pruned ResNet-18s (block-punched, these rates; 0 = dense), "
                         "written to bench/results/fpga_sparse.json")
    ap.add_argument("--block", nargs=2, type=int, default=[16, 4], help="with --sparsity: the pruning block (rows, channels)")
    ap.add_argument("--tables", action="store_true", help="only rewrite docs/fpga.md's tables from --out")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/fpga.md's tables")
    args = ap.parse_args(argv)
    if args.tables:
        with open(args.out) as fh:
            write_tables(json.load(fh))
        return {}
    if args.sparsity is not None:
        return sparse_main(args)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = resnet18(seed=0)
    x = torch.randn(1, 3, 224, 224)
    calib = [torch.randn(2, 3, 224, 224)]
    quantized = {}

    modes = ("fixed_point", "float") if args.requant == "both" else (args.requant,)

    def quantize(ratio, mode):
        key = (_ratio_text(ratio), mode)
        if key not in quantized:
            t0 = time.time()
            # Cycles depend on the row counts, not on which rows get which scheme: the variance
            # rule needs no Hessian statistics (the default rule wants 16+ calibration images).
            # Nor on how rows are rounded onto their grids: nearest rounding (seconds) instead of
            # GPTQ (minutes per model) gives the same streams and cycles.
            cfg = rmsmp.RMSMPConfig(ratio=ratio, assign="variance", rounding="nearest", requant=mode)
            quantized[key] = rmsmp.quantize(model, cfg, calib_data=calib)
            print(f"quantized ResNet-18 at {key[0]} ({mode}) in {time.time() - t0:.0f} s", flush=True)
        return quantized[key]

    rows, per_layer, checks, design_info = [], {}, {}, {}
    for board, mode in [(b, m) for b in args.boards for m in modes]:
        cfg = load_board(board)
        per_layer.setdefault(board, {}).setdefault(mode, {})
        design_info.setdefault(board, {})
        exes = {}
        for design, (ratio, accel) in designs(board).items():
            key = _ratio_text(ratio)
            if key not in exes:
                exes[key] = rmsmp.compile(quantize(ratio, mode), (x,), target=f"fpga:{board}")
                if exes[key].fallbacks:
                    raise RuntimeError(f"{board}: layers fell back to the host: {exes[key].fallbacks}")
            exe = exes[key]
            design_info[board][design] = {
                "ratio": key, "dsp_products_4bit": accel.dsp_products_4bit,
                "lut_array": attrs.asdict(accel.lut_array) if ratio.get("sp2_4") else None,
                "lut_core": {"rmsmp": "SP2-4 shift-add", "fixed4_lut_dsp": "Fixed-4 LUT multipliers (Booth)"}.get(design)}
            for variant, spec in VARIANTS[mode].items():
                retimed = {k: v for k, v in spec.items() if k != "prefetch"}
                prof = exe.profile(_variant(accel, spec) if (retimed or accel != cfg.accelerator) else None,
                                   prefetch=bool(spec.get("prefetch")))
                rows.append({"board": board, "model": "resnet18", "design": design, "ratio": key, "requant": mode,
                             "cycles": int(prof["cycles"]), "latency_ms": round(prof["latency_ms"], 4),
                             "variant": variant, "utilization": {k: round(v, 3) for k, v in prof["utilization"].items()},
                             "mac_utilization": {k: round(v, 3) for k, v in prof["mac_utilization"].items()}})
                if not spec:
                    per_layer[board][mode][design] = prof["layers"]
            if args.check and design == "rmsmp":
                t0 = time.time()
                q = quantize(ratio, mode)
                same = bool(np.array_equal(exe(x), q(x).detach().numpy()))
                checks[f"{board} {mode}"] = same
                print(f"{board} rmsmp ({mode}) on the simulator equals the torch reference: {same} "
                      f"({time.time() - t0:.0f} s)")

    speedups = {}
    for board in args.boards:
        for mode in modes:
            for variant in VARIANTS[mode]:
                c = {r["design"]: r["cycles"] for r in rows
                     if r["board"] == board and r["variant"] == variant and r["requant"] == mode}
                speedups.setdefault(board, {})[variant] = {
                    f"rmsmp_over_{d}": round(c[d] / c["rmsmp"], 3) for d in c if d != "rmsmp"}
    print(f"\n{'board':9} {'design':15} {'ratio':9} {'cycles':>10} {'ms':>8}   variant")
    for r in rows:
        print(f"{r['board']:9} {r['design']:15} {r['ratio']:9} {r['cycles']:>10} {r['latency_ms']:>8.3f}   {r['variant']}")
    print("\nspeedup of RMSMP over each baseline (papers, over their baseline: XC7Z020 3.01x, XC7Z045 3.65x):")
    for board, s in speedups.items():
        for v, d in s.items():
            print(f"  {board} {v}: " + ", ".join(f"{k[11:]} {x:.2f}x" for k, x in d.items()))
    plot_mode = modes[0]
    plot = _plot(args.plot, {b: v[plot_mode] for b, v in per_layer.items()}, plot_mode) if args.plot else None
    result = {
        "command": "python -m bench.fpga" + (" --check" if args.check else "") + (
            f" --requant {args.requant}" if args.requant != "both" else ""),
        "requant": {"fixed_point": "RMSMPConfig(requant='fixed_point'): on-chip requantization, 8-bit stores",
                    "float": "float epilogue on the host, int32 stores (8-bit variants are what-ifs)"},
        "model": "ResNet-18, 1x3x224x224, random weights (tvm_rmsmp.models.resnet.resnet18(seed=0))",
        "timing": "cycle-level simulator of the accelerator model (deterministic); host ops not counted",
        "host": f"{platform.machine()}, Python {platform.python_version()} (irrelevant to cycle counts)",
        "boards": {b: load_board(b).summary() for b in args.boards},
        "designs": design_info,
        "same_for_all_designs": "input/weight/accumulator buffers, DRAM bandwidth, tiles and dataflow",
        "paper": PAPER,
        "rows": rows,
        "speedup": speedups,
        "simulator_equals_reference": checks,
        "per_layer": {b: {m: {d: [{"layer": l["layer"], "cycles": l["cycles"], "busy": l["busy"]} for l in v]
                              for d, v in per_layer[b][m].items()} for m in per_layer[b]} for b in per_layer},
        "plot": os.path.relpath(plot, ROOT) if plot else None,
    }
    atomic_write(args.out, json.dumps(result, indent=1))
    print(f"\nwrote {os.path.relpath(args.out, ROOT)}" + (f" and {os.path.relpath(plot, ROOT)}" if plot else ""))
    if not args.no_doc and modes == ("fixed_point", "float") and args.boards == ["xc7z020", "xc7z045"]:
        write_tables(result)
        print(f"rewrote the tables of {os.path.relpath(DOC, ROOT)}")
    return result


def _weight_bytes(exe) -> int:
    """Bytes the accelerator's weight LOADs move over the whole model."""
    from tvm_rmsmp.fpga.isa import Load

    return sum(i.nbytes for p in exe.layers for i in p.stream if isinstance(i, Load) and i.buffer != "inp")


def sparse_main(args):
    """``--sparsity``: ResNet-18 pruned block-punched (the stem left dense) at each rate, RMSMP at
    each board's ratio, compiled for the board; cycles, weight bytes loaded and MACs issued,
    against the dense model (rate 0) on the same board (bench/results/fpga_sparse.json)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = resnet18(seed=0)
    x = torch.randn(1, 3, 224, 224)
    calib = [torch.randn(2, 3, 224, 224)]
    block = tuple(args.block)
    rates = sorted(set(args.sparsity) | {0.0})
    # --requant fixed_point: the integer-only mode (on-chip requantization, 8-bit stores), nearest
    # rounding (cycles do not depend on it), its own file; otherwise the float epilogue as before
    fixed = args.requant == "fixed_point"
    mode_kw = {"requant": "fixed_point", "rounding": "nearest"} if fixed else {}
    pruned = {}
    for s in rates:
        if s > 0:
            t0 = time.time()
            pcfg = rmsmp.PruneConfig(scheme="block_punched", sparsity=s, block=block, skip=["conv1"])
            pruned[s] = rmsmp.prune(model, pcfg)
            print(f"pruned ResNet-18 to {s:.0%} in {time.time() - t0:.0f} s", flush=True)
    rows, checks = [], {}
    for board in args.boards:
        ratio = derive_ratio(load_board(board))
        for s in rates:
            t0 = time.time()
            cfg = rmsmp.RMSMPConfig(ratio=ratio, assign="variance", **mode_kw)
            q = rmsmp.quantize(pruned.get(s, model), cfg, calib_data=calib)
            exe = rmsmp.compile(q, (x,), target=f"fpga:{board}")
            if exe.fallbacks:
                raise RuntimeError(f"{board}: layers fell back to the host: {exe.fallbacks}")
            sparse_layers = sorted({p.layer for p in exe.layers if p.sparse})
            accel = load_board(board).accelerator
            # as compiled; 8-bit write-back (a what-if of the float mode; the integer mode stores 8 bits already)
            for variant, spec in list(VARIANTS["fixed_point" if fixed else "float"].items())[:1 if fixed else 2]:
                prof = exe.profile(_variant(accel, spec) if spec else None)
                rows.append({"board": board, "model": "resnet18", "design": "rmsmp", "ratio": _ratio_text(ratio),
                             "requant": "fixed_point" if fixed else "float",
                             "prune": "dense" if s == 0 else f"block_punched {block[0]}x{block[1]}",
                             "sparsity": s, "density": round(1 - s, 4), "variant": variant,
                             "cycles": int(prof["cycles"]), "latency_ms": round(prof["latency_ms"], 4),
                             "weight_bytes": _weight_bytes(exe), "macs": {k: int(v) for k, v in prof["macs"].items()},
                             "busy": {k: int(v) for k, v in prof["busy"].items()},
                             "sparse_layers": len(sparse_layers), "layers": len(exe.layers),
                             "utilization": {k: round(v, 3) for k, v in prof["utilization"].items()}})
            if args.check:
                same = bool(np.array_equal(exe(x), q(x).detach().numpy()))
                checks[f"{board} {s}"] = same
                print(f"{board} {s:.0%} on the simulator equals the torch reference: {same}")
            print(f"{board} sparsity {s:.0%}: {rows[-1 if fixed else -2]['cycles']} cycles, "
                  f"{rows[-1 if fixed else -2]['weight_bytes']} weight bytes, "
                  f"{len(sparse_layers)}/{len(exe.layers)} layers sparse ({time.time() - t0:.0f} s)", flush=True)
    for r in rows:
        dense = [d for d in rows if d["board"] == r["board"] and d["variant"] == r["variant"] and d["sparsity"] == 0][0]
        r["speedup_vs_dense"] = round(dense["cycles"] / r["cycles"], 3)
        r["weight_bytes_vs_dense"] = round(r["weight_bytes"] / dense["weight_bytes"], 3)
    print(f"\n{'board':9} {'sparsity':>8} {'cycles':>10} {'speedup':>8} {'weight bytes':>13} {'vs dense':>8}   variant")
    for r in rows:
        print(f"{r['board']:9} {r['sparsity']:>8.0%} {r['cycles']:>10} {r['speedup_vs_dense']:>7.2f}x "
              f"{r['weight_bytes']:>13} {r['weight_bytes_vs_dense']:>8.2f}   {r['variant']}")
    cmd = "python -m bench.fpga --sparsity " + " ".join(f"{s:g}" for s in args.sparsity)
    if list(block) != [16, 4]:
        cmd += f" --block {block[0]} {block[1]}"
    if fixed:
        cmd += " --requant fixed_point"
    result = {
        "command": cmd + (" --check" if args.check else ""),
        "model": "ResNet-18, 1x3x224x224, random weights (tvm_rmsmp.models.resnet.resnet18(seed=0)), pruned by "
                 f"rmsmp.prune(block_punched, block={list(block)}, magnitude, one shot; conv1 left dense)",
        "timing": "cycle-level simulator of the accelerator model (deterministic); host ops not counted",
        "host": f"{platform.machine()}, Python {platform.python_version()} (irrelevant to cycle counts)",
        "storage": "tvm_rmsmp/fpga/sparse.py: a pruned row group's weight tiles as runs of rows sharing a kept-column "
                   "mask; weight LOADs move the runs, GEMMs issue their kept columns only",
        "rows": rows,
        "simulator_equals_reference": checks,
    }
    out = os.path.join(ROOT, "bench", "results", "fpga_sparse_fixed_point.json" if fixed else "fpga_sparse.json")
    atomic_write(out, json.dumps(result, indent=1))
    print(f"\nwrote {os.path.relpath(out, ROOT)}")
    return result


if __name__ == "__main__":
    main()
