"""The statistics of the accuracy benchmark: seeds, means, spreads and paired bootstrap CIs.

Every task of :mod:`bench.accuracy` returns *raw* results: one entry per (model, dataset,
variant, act_bits, mode, metric, rounding, act_granularity, seed) with the metric's value and,
where the metric is a mean over test examples, the per-example values. :func:`aggregate`
turns them into the published rows: the mean over seeds, its standard deviation (ddof=1), and
a paired bootstrap 95% interval of the variant minus a baseline (Fixed-4 by default) on the
same test examples and seeds.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

#: Fields that name a result (everything but the seed and the value).
KEY = ("model", "dataset", "variant", "act_bits", "mode", "metric", "rounding", "act_granularity")
BOOTSTRAP = 2000
BOOTSTRAP_SEED = 12345


def raw(model, dataset, variant, act_bits, mode, metric, value, *, seed, rounding=None, act_granularity=None,
        per_example=None, share_8bit=None) -> Dict:
    """One raw measurement (``per_example``: values whose mean is ``value``, for the bootstrap)."""
    entry = {"model": model, "dataset": dataset, "variant": variant, "act_bits": act_bits, "mode": mode,
             "metric": metric, "rounding": rounding, "act_granularity": act_granularity, "seed": seed,
             "value": float(value), "share_8bit": share_8bit}
    if per_example is not None:
        per_example = np.asarray(per_example, np.float64)
        if abs(per_example.mean() - value) > 1e-6 * max(1.0, abs(value)):
            raise ValueError(f"{metric}: per-example mean {per_example.mean()} is not the value {value}")
        entry["per_example"] = per_example
    return entry


def _key(e: Dict) -> Tuple:
    return tuple(e[k] for k in KEY)


def paired_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], n: int = BOOTSTRAP,
                     seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> Tuple[float, float]:
    """Percentile interval of ``mean_s(mean(a_s[idx]) - mean(b_s[idx]))``: test examples drawn
    with replacement (the same draw for every seed ``s`` and both sides: the pairing)."""
    a, b = np.stack(a), np.stack(b)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same seeds and examples, got {a.shape} and {b.shape}")
    d = (a - b).mean(0)  # per example, averaged over seeds
    rng = np.random.default_rng(seed)
    stats = np.array([d[rng.integers(0, d.size, d.size)].mean() for _ in range(n)])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def aggregate(entries: Iterable[Dict], baseline: str = "fixed_4") -> List[Dict]:
    """Published rows: ``{model, dataset, variant, act_bits, mode, metric, value (mean), seeds,
    std, ci_low, ci_high (variant - baseline), rounding, act_granularity, share_8bit}``."""
    groups: Dict[Tuple, List[Dict]] = defaultdict(list)
    for e in entries:
        groups[_key(e)].append(e)
    rows = []
    for key, es in groups.items():
        es = sorted(es, key=lambda e: e["seed"])
        vals = np.array([e["value"] for e in es])
        row = dict(zip(KEY, key))
        shares = [e["share_8bit"] for e in es if e.get("share_8bit") is not None]
        row.update({"value": round(float(vals.mean()), 6), "seeds": [e["seed"] for e in es],
                    "std": round(float(vals.std(ddof=1)), 6) if len(vals) > 1 else None,
                    "ci_low": None, "ci_high": None,
                    "share_8bit": round(float(np.mean(shares)), 6) if shares else None})
        base = groups.get(key[:2] + (baseline,) + key[3:])
        if base is not None and row["variant"] != baseline:
            ci = ci_between(es, base)
            if ci is not None:
                row["ci_low"], row["ci_high"] = round(ci[0], 6), round(ci[1], 6)
        rows.append(row)
    return rows


def ci_between(a: List[Dict], b: List[Dict]) -> Optional[Tuple[float, float]]:
    """The paired bootstrap CI of ``a - b`` over the seeds both have, or None without per-example values."""
    sa, sb = {e["seed"]: e for e in a}, {e["seed"]: e for e in b}
    seeds = sorted(set(sa) & set(sb))
    if not seeds or any("per_example" not in sa[s] or "per_example" not in sb[s] for s in seeds):
        return None
    return paired_bootstrap([sa[s]["per_example"] for s in seeds], [sb[s]["per_example"] for s in seeds])


def find(entries: Iterable[Dict], **match) -> List[Dict]:
    return [e for e in entries if all(e.get(k) == v for k, v in match.items())]
