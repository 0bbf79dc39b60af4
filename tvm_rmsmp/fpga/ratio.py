"""The hardware-informed row ratio: split rows so the LUT and DSP cores finish together.

Every layer's rows are split by the same ratio; SP2 rows run on the LUT core, Fixed-4 and
Fixed-8 rows on the DSP core, both cores reading the same input tile. With ``P_lut`` SP2
products per cycle, ``P_4`` Fixed-4 products per cycle and ``P_8 = P_4 / dsp_products_4bit``
Fixed-8 products per cycle, a layer of ``N`` rows and ``W`` products per row takes

    LUT core: s N W / P_lut        DSP core: (f N W / P_4) + (h N W / P_8)

for shares ``s`` (SP2-4), ``f`` (Fixed-4) and ``h`` (Fixed-8), ``s + f + h = 1``. The
high-precision share ``h`` is chosen for accuracy (the paper keeps 5%); equal times give

    s = P_lut (1 - h + h P_4 / P_8) / (P_lut + P_4)

rounded to ``step``; Fixed-4 takes the rest.
"""

from __future__ import annotations

from typing import Dict, Union

from .config import FPGAConfig, load_board

__all__ = ["derive_ratio", "core_balance"]


def derive_ratio(board: Union[str, FPGAConfig], high_precision: float = 0.05, step: float = 0.05) -> Dict[str, float]:
    """``{"sp2_4": s, "fixed_4": f, "fixed_8": h}`` for ``board`` (a name, a JSON path or a config),
    usable as ``RMSMPConfig(ratio=...)``."""
    cfg = load_board(board)
    if not 0.0 <= high_precision < 1.0:
        raise ValueError(f"high_precision must be in [0, 1), got {high_precision}")
    if not 0.0 < step <= 0.5:
        raise ValueError(f"step must be in (0, 0.5], got {step}")
    acc = cfg.accelerator
    p_lut = acc.macs_per_cycle("lut")
    p4 = acc.macs_per_cycle("dsp", 4)
    p8 = acc.macs_per_cycle("dsp", 8)
    exact = p_lut * (1.0 - high_precision + high_precision * p4 / p8) / (p_lut + p4)
    sp2 = min(max(round(exact / step) * step, 0.0), 1.0 - high_precision)
    sp2 = round(sp2, 6)
    hp = round(high_precision, 6)
    ratio = {"sp2_4": sp2, "fixed_4": round(1.0 - sp2 - hp, 6), "fixed_8": hp}
    return {k: v for k, v in ratio.items() if v > 0} or {"fixed_4": 1.0}


def core_balance(board: Union[str, FPGAConfig], ratio: Dict[str, float]) -> Dict[str, float]:
    """Cycles per row-product of each core under ``ratio`` (relative; equal means balanced)."""
    acc = load_board(board).accelerator
    lut = ratio.get("sp2_4", 0.0) / acc.macs_per_cycle("lut")
    dsp = ratio.get("fixed_4", 0.0) / acc.macs_per_cycle("dsp", 4) + ratio.get("fixed_8", 0.0) / acc.macs_per_cycle("dsp", 8)
    return {"lut": lut, "dsp": dsp}
