"""Layer-wise 4/8-bit mixing (HAWQ-style): the baseline RMSMP is measured against.

Whole layers go to the wide scheme, chosen by their Hessian-weighted 4-bit quantization error
per weight (HAWQ-V2's criterion: mean Hessian trace times quantization perturbation), until
the wide scheme holds the same share of weights as in the row-wise configuration. The
result is an ordinary :class:`RMSMPConfig` whose layers each use one scheme.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import attrs
import numpy as np
from torch import nn

from ..quant.assign import hessian_row_error
from ..quant.config import RMSMPConfig
from .layers import calibrate

__all__ = ["layerwise_config"]


def layerwise_config(model: nn.Module, base: RMSMPConfig, calib_data: Iterable, wide: str = "fixed_8",
                     narrow: str = "fixed_4", row_hessian: Optional[Dict[str, np.ndarray]] = None, *,
                     input_fn=None) -> Tuple[RMSMPConfig, Dict[str, float]]:
    """``(config, info)``: ``narrow`` everywhere except the most sensitive whole layers at
    ``wide``, whose weights make up ``base.ratio[wide]`` of the layers that follow the ratio
    (layers fixed by ``edge_scheme``/``layer_ratios`` keep their setting). ``info`` gives the
    share reached (whole layers cannot hit it exactly; the greedy choice never exceeds it)."""
    share = base.ratio.get(wide, 0.0)
    cal = calibrate(model, attrs.evolve(base, assign="hessian"), calib_data, row_hessian, input_fn=input_fn)
    pinned = set(cal.config.layer_ratios)
    free = {n: m for n, m in cal.layers.items() if n not in pinned}
    sizes = {n: int(m.weight.numel()) for n, m in free.items()}
    score = {}
    for n, m in free.items():
        w = m.weight.detach().double().numpy()
        score[n] = float(hessian_row_error(w, narrow, cal.row_hessian[n], cal.stats[n].input_sq).sum()) / sizes[n]
    budget = share * sum(sizes.values())
    chosen, used = [], 0
    for n in sorted(free, key=lambda n: -score[n]):
        if used + sizes[n] <= budget + 1e-9:
            chosen.append(n)
            used += sizes[n]
    ratios = dict(cal.config.layer_ratios)
    ratios.update({n: {wide: 1.0} for n in chosen})
    cfg = attrs.evolve(cal.config, ratio={narrow: 1.0}, layer_ratios=ratios, assign="variance")
    total = max(sum(sizes.values()), 1)
    return cfg, {"target_share": share, "share": used / total, "layers": chosen}
