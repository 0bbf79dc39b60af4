"""What a quantized model is made of, as JSON and plots (``tvm-rmsmp report``).

    tvm-rmsmp report SAVED_DIR --out DIR [--model pkg.mod:factory --calib x.npy]
                     [--library model.so --input x.npy]

``report.json`` holds, per quantized layer: rows per scheme, the share of the layer's weights
held by 8-bit rows, a summary of the row Hessian traces where the saved model has them, and,
given calibration data and the float model, the layer's quantization error on those data.
With a compiled library and an input it also holds the latency per kind of VM call
(:mod:`tvm_rmsmp.cli.profile`). Plots (PNG, matplotlib: the ``[report]`` extra):
``rows.png`` (one layer's rows, row statistic against sensitivity, colored by scheme, and
the rows per scheme of every layer), ``layer_error.png`` and ``latency.png``.

The quantization error of a layer is measured two ways on the calibration batches, against
the float model with BatchNorm folded (the model the quantized layers were made from):

- ``rel_error``: the layer's own error, ``||q(x) - f(x)|| / ||f(x)||`` on the float model's
  input ``x`` to that layer (its weights and its activation quantizer together);
- ``rel_error_accumulated``: the quantized model's output of that layer against the float
  model's, both run from the same model input (the errors of every layer before it included).
"""

from __future__ import annotations

import math
import os
from typing import Dict, Iterable, List, Optional

import numpy as np

__all__ = ["layer_summary", "layer_errors", "build_report", "write_plots", "plot_rows", "plot_layer_errors",
           "plot_latency", "require_matplotlib", "most_sensitive_layer", "SCHEME_COLORS"]

#: Plot colors of the built-in schemes (others get matplotlib's cycle).
SCHEME_COLORS = {"sp2_4": "tab:blue", "fixed_4": "tab:orange", "fixed_8": "tab:red"}


def require_matplotlib():
    """``matplotlib.pyplot`` with the Agg backend, or an ImportError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the report's plots need matplotlib: pip install 'tvm-rmsmp[report]' "
                          "(or pass --no-plots for report.json only)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    plt = require_matplotlib()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp.png"  # never a half-written plot under the final name
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _eight_bit(scheme: str) -> bool:
    from ..quant.schemes import get_scheme

    return get_scheme(scheme).bits >= 8


def layer_summary(q, row_hessian: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, dict]:
    """Per RMSMP layer of ``q``: op, rows, fan-in, rows per scheme, share of 8-bit weights and,
    with ``row_hessian`` (``{layer: per-row traces}``), their summary overall and per scheme."""
    from ..nn.layers import row_plans

    out: Dict[str, dict] = {}
    for name, plan in row_plans(q).items():
        fan_in = int(np.prod(plan.weight_int.shape[1:]))
        counts = {s: int(c) for s, c in plan.counts().items()}
        eight = sum(c for s, c in counts.items() if _eight_bit(s))
        entry = {"op": plan.op, "rows": int(plan.num_rows), "fan_in": fan_in, "rows_per_scheme": counts,
                 "share_8bit_weights": eight / max(plan.num_rows, 1)}
        traces = None if row_hessian is None else row_hessian.get(name)
        if traces is not None:
            t = np.asarray(traces, np.float64)
            schemes = np.array(plan.schemes)
            entry["hessian_trace"] = {
                "min": float(t.min()), "median": float(np.median(t)), "mean": float(t.mean()), "max": float(t.max()),
                "mean_per_scheme": {s: float(t[schemes == s].mean()) for s in counts},
            }
        out[name] = entry
    return out


def layer_errors(q, float_model, calib_data: Iterable, config=None) -> Dict[str, dict]:
    """``{layer: {"rel_error", "rel_error_accumulated"}}`` of every RMSMP layer of ``q`` on
    ``calib_data`` (input batches), against ``float_model`` with BN folded as
    :func:`tvm_rmsmp.quantize` folds it (see the module's docstring)."""
    import attrs
    import torch

    from ..nn.inputs import call_model, collect_batches
    from ..nn.layers import calibrate, rmsmp_layers
    from ..quant.config import RMSMPConfig

    qlayers = rmsmp_layers(q)
    calib_data = list(calib_data)
    batches = collect_batches(calib_data, float_model)
    cfg = config if config is not None else getattr(q, "rmsmp_config", None) or RMSMPConfig()
    # the float model as quantize saw it (BN folded, attention decomposed); "variance": no Hessian
    ref = calibrate(float_model, attrs.evolve(cfg, assign="variance", layer_ratios={}), calib_data).model
    ref_layers = dict(ref.named_modules())
    q_by_name = {getattr(m, "layer_name", n): m for n, m in q.named_modules() if m in qlayers.values()}
    missing = [n for n in qlayers if n not in ref_layers]
    if missing:
        raise ValueError(f"the float model has no layers named {missing[:8]}: is it the model {q.__class__.__name__} "
                         "was quantized from?")
    sums = {n: [0.0, 0.0, 0.0] for n in qlayers}  # own error^2, accumulated error^2, reference^2
    float_out: Dict[str, torch.Tensor] = {}

    def float_hook(name):
        def hook(module, inputs, output):
            y = output.detach().to(torch.float64)
            float_out[name] = y
            own = q_by_name[name](inputs[0].detach()).to(torch.float64)
            sums[name][0] += float(((own - y) ** 2).sum())
            sums[name][2] += float((y ** 2).sum())
        return hook

    def quant_hook(name):
        def hook(module, inputs, output):
            if name in float_out:
                sums[name][1] += float(((output.detach().to(torch.float64) - float_out[name]) ** 2).sum())
        return hook

    handles = [ref_layers[n].register_forward_hook(float_hook(n)) for n in qlayers]
    handles += [q_by_name[n].register_forward_hook(quant_hook(n)) for n in qlayers]
    try:
        with torch.no_grad():
            for b in batches:
                float_out.clear()
                call_model(ref, b)
                call_model(q, b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (own, acc, norm) in sums.items():
        den = math.sqrt(norm) if norm > 0 else float("nan")
        out[n] = {"rel_error": math.sqrt(own) / den, "rel_error_accumulated": math.sqrt(acc) / den}
    return out


def build_report(q, *, row_hessian=None, float_model=None, calib_data=None, latency_ms=None,
                 source: Optional[str] = None) -> dict:
    """The report's JSON document (see the module's docstring)."""
    import tvm_rmsmp

    layers = layer_summary(q, row_hessian)
    if float_model is not None and calib_data is not None:
        for name, err in layer_errors(q, float_model, calib_data).items():
            layers[name].update(err)
    total = sum(e["rows"] * e["fan_in"] for e in layers.values())
    eight = sum(e["share_8bit_weights"] * e["rows"] * e["fan_in"] for e in layers.values())
    rows: Dict[str, int] = {}
    for e in layers.values():
        for s, c in e["rows_per_scheme"].items():
            rows[s] = rows.get(s, 0) + c
    cfg = getattr(q, "rmsmp_config", None)
    doc = {
        "format": "tvm-rmsmp-report", "version": 1, "tvm_rmsmp": tvm_rmsmp.__version__, "source": source,
        "config": None if cfg is None else _plain(cfg),
        "totals": {"layers": len(layers), "rows_per_scheme": rows, "share_8bit_weights": eight / max(total, 1)},
        "layers": layers,
    }
    if latency_ms is not None:
        doc["latency_ms"] = {"per_call_kind": dict(sorted(latency_ms.items(), key=lambda kv: -kv[1])),
                             "total": float(sum(latency_ms.values()))}
    return doc


def _plain(cfg) -> dict:
    import attrs

    def conv(v):
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if attrs.has(type(v)):
            return conv(attrs.asdict(v, recurse=False))
        return repr(v)

    return conv(attrs.asdict(cfg, recurse=False)) if attrs.has(type(cfg)) else {"repr": repr(cfg)}


def _row_statistic(plan) -> np.ndarray:
    from ..quant.assign import row_kurtosis

    return row_kurtosis(plan.dequantized().astype(np.float64))


def plot_rows(q, traces: Optional[Dict[str, np.ndarray]], layer: str, path: str) -> str:
    """Scatter of one layer's rows (kurtosis against sensitivity: the row Hessian trace times
    mean w^2 where ``traces`` has the layer, else mean w^2; colored by scheme) and the rows per
    scheme of every layer."""
    from ..nn.layers import row_plans

    plt = require_matplotlib()
    plans = row_plans(q)
    if layer not in plans:
        raise ValueError(f"no RMSMP layer {layer!r}; layers: {list(plans)[:12]}")
    plan = plans[layer]
    w = plan.dequantized().astype(np.float64)
    kurt = _row_statistic(plan)
    energy = (w.reshape(len(w), -1) ** 2).mean(1)
    have = traces is not None and layer in traces
    sens = np.asarray(traces[layer], np.float64) * energy if have else energy
    schemes = list(dict.fromkeys([*SCHEME_COLORS, *(s for p in plans.values() for s in p.schemes)]))
    schemes = [s for s in schemes if any(s in p.schemes for p in plans.values())]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in schemes:
        idx = [i for i, x in enumerate(plan.schemes) if x == s]
        if idx:
            ax1.scatter(kurt[idx], np.maximum(sens[idx], 1e-30), c=SCHEME_COLORS.get(s), label=f"{s} ({len(idx)})",
                        s=18)
    ax1.set_yscale("log")
    ax1.set_xlabel("row kurtosis (3: Gaussian-like, 1.8: uniform-like)")
    ax1.set_ylabel("row Hessian trace x mean w^2" if have else "row mean w^2 (no Hessian saved)")
    ax1.set_title(f"{layer}: scheme per row")
    ax1.legend()
    names = list(plans)
    bottom = np.zeros(len(names))
    for s in schemes:
        counts = np.array([plans[n].counts().get(s, 0) for n in names])
        ax2.bar(range(len(names)), counts, bottom=bottom, color=SCHEME_COLORS.get(s), label=s)
        bottom += counts
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=90, fontsize=6)
    ax2.set_ylabel("rows")
    ax2.set_title("rows per scheme in each layer")
    ax2.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_errors(layers: Dict[str, dict], path: str) -> str:
    """Bars of each layer's own and accumulated relative error (``layer_errors``)."""
    plt = require_matplotlib()
    names = [n for n, e in layers.items() if "rel_error" in e]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4.5))
    ax.bar(x - 0.2, [layers[n]["rel_error"] for n in names], 0.4, label="the layer's own error")
    ax.bar(x + 0.2, [layers[n]["rel_error_accumulated"] for n in names], 0.4, label="accumulated from the input")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("||quantized - float|| / ||float||")
    ax.set_title("quantization error per layer (calibration data)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_latency(latency_ms: Dict[str, float], path: str, top: int = 15) -> str:
    """Horizontal bars of the most expensive kinds of VM call (``tvm_rmsmp.cli.profile``)."""
    from .profile import top_calls

    plt = require_matplotlib()
    rows = top_calls(latency_ms, top)[::-1]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [ms for _, ms in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n[:60] for n, _ in rows], fontsize=7)
    ax.set_xlabel("ms per run")
    ax.set_title(f"latency per kind of call (top {len(rows)} of {len(latency_ms)}; "
                 f"all: {sum(latency_ms.values()):.3f} ms)")
    fig.tight_layout()
    return _save(fig, path)


def most_sensitive_layer(summary: Dict[str, dict]) -> str:
    """The layer the row plot shows: the one with the largest mean Hessian trace where the
    report has traces, else the one with the most rows."""
    with_traces = [(e["hessian_trace"]["mean"], n) for n, e in summary.items() if "hessian_trace" in e]
    if with_traces:
        return max(with_traces)[1]
    return max(summary.items(), key=lambda kv: kv[1]["rows"])[0]


def write_plots(q, doc: dict, out_dir: str, row_hessian=None, layer: Optional[str] = None) -> List[str]:
    """The report's PNG files in ``out_dir``: rows.png, and layer_error.png / latency.png
    where the report has those data."""
    paths = [plot_rows(q, row_hessian, layer or most_sensitive_layer(doc["layers"]), os.path.join(out_dir, "rows.png"))]
    if any("rel_error" in e for e in doc["layers"].values()):
        paths.append(plot_layer_errors(doc["layers"], os.path.join(out_dir, "layer_error.png")))
    if "latency_ms" in doc:
        paths.append(plot_latency(doc["latency_ms"]["per_call_kind"], os.path.join(out_dir, "latency.png")))
    return paths
