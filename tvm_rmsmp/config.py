"""Validated configuration of an RMSMP quantization run."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import attrs

from .schemes import get_scheme

__all__ = ["RMSMPConfig", "DEFAULT_RATIO", "validate_ratio"]

#: The paper's ratio for a Zynq XC7Z020: SP2-4 : Fixed-4 : Fixed-8 = 60:35:5.
DEFAULT_RATIO: Dict[str, float] = {"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}


def validate_ratio(ratio) -> Dict[str, float]:
    """Check a row ratio: known schemes, each share a finite number in [0, 1], sum 1."""
    if not isinstance(ratio, dict) or not ratio:
        raise ValueError(f"ratio must be a non-empty dict of scheme name -> share, got {ratio!r}")
    out: Dict[str, float] = {}
    for name, share in ratio.items():
        get_scheme(name)  # raises KeyError naming the unknown scheme
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share):
            raise ValueError(f"ratio[{name!r}] must be a finite number, got {share!r}")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"ratio[{name!r}] = {share} is outside [0, 1]")
        out[name] = float(share)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"ratio shares must sum to 1, got {total:.6g} for {ratio!r}")
    return out


def _ratio_converter(ratio):
    return validate_ratio(dict(ratio) if hasattr(ratio, "items") else ratio)


def _check_act_bits(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ValueError(f"act_bits must be an integer in [2, 8] (activations are int8), got {value!r}")


@attrs.frozen
class RMSMPConfig:
    """How to quantize a model.

    ratio: share of rows per scheme, the same in every quantized layer.
    act_bits: activation bit-width (static per-tensor scales from calibration; unsigned after ReLU).
    assign: name of the row-assignment rule (see :mod:`tvm_rmsmp.assign`).
    fold_bn: fold Conv2d + BatchNorm2d before quantizing the weights.
    skip: layer names (module paths) to leave in float.
    """

    ratio: Dict[str, float] = attrs.field(factory=lambda: dict(DEFAULT_RATIO), converter=_ratio_converter)
    act_bits: int = attrs.field(default=8, validator=_check_act_bits)
    assign: str = attrs.field(default="variance")
    fold_bn: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    skip: Tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @assign.validator
    def _check_assign(self, attribute, value):
        from .assign import get_assign_rule

        get_assign_rule(value)

    @property
    def schemes(self) -> Tuple[str, ...]:
        """Schemes with a non-zero share, in the ratio's order (this is the row-group order)."""
        return tuple(n for n, s in self.ratio.items() if s > 0)
