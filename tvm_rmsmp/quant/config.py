"""Validated configuration of an RMSMP quantization run."""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import attrs

from .schemes import get_scheme

__all__ = ["RMSMPConfig", "HessianConfig", "DEFAULT_RATIO", "validate_ratio", "RMSMPWarning", "ACT_GRANULARITIES",
           "ACT_ZERO_POINTS", "REQUANTS", "ZERO_POINT_GAIN", "TOKEN_EXP_MIN", "TOKEN_EXP_MAX"]


class RMSMPWarning(UserWarning):
    """Something was left in float or fell back; the result is still correct."""

#: Ways of rounding a row onto its grid (``RMSMPConfig.rounding``).
ROUNDINGS = ("nearest", "gptq")
#: Activation scale granularities (``RMSMPConfig.act_granularity``).
ACT_GRANULARITIES = ("per_tensor", "per_token")
#: When signed dense inputs get a zero point (``RMSMPConfig.act_zero_point``).
ACT_ZERO_POINTS = ("never", "auto", "always")
#: Layer epilogues (``RMSMPConfig.requant``): the float multiply, or integer-only (quant/requant.py).
REQUANTS = ("float", "fixed_point")
#: ``act_zero_point="auto"``: a layer's input is quantized asymmetrically when the clip-searched
#: squared error of the asymmetric quantizer on its calibration samples is below this fraction
#: of the symmetric one's.
ZERO_POINT_GAIN = 0.8
#: Bounds of the per-token exponent ``e_t`` (``act_granularity="per_token"``): ``2^e_t`` and
#: ``2^-e_t`` stay normal float32 numbers (the torch reference and every kernel clamp to them).
TOKEN_EXP_MIN = -100
TOKEN_EXP_MAX = 126

#: The paper's ratio for a Zynq XC7Z020: SP2-4 : Fixed-4 : Fixed-8 = 60:35:5.
DEFAULT_RATIO: Dict[str, float] = {"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}


def validate_ratio(ratio) -> Dict[str, float]:
    """Check a row ratio: known schemes, each share a finite number in [0, 1], sum 1."""
    if not isinstance(ratio, dict) or not ratio:
        raise ValueError(f"ratio must be a non-empty dict of scheme name -> share, got {ratio!r}")
    out: Dict[str, float] = {}
    for name, share in ratio.items():
        get_scheme(name)  # raises KeyError naming the unknown scheme
        # any real scalar (Python or numpy: np.float32(0.35) too); bools are not shares
        if isinstance(share, bool) or not isinstance(share, numbers.Real):
            raise ValueError(f"ratio[{name!r}] must be a finite number, got {share!r} ({type(share).__name__})")
        if not math.isfinite(float(share)):
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


def _positive_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class HessianConfig:
    """How row sensitivities are estimated (see :mod:`tvm_rmsmp.nn.hessian`).

    probes: Rademacher probes (Hessian-vector products) per calibration batch.
    batches: calibration batches used (the first ones); cost grows linearly with both.
    loss: ``"mse"`` (any model) or ``"kl"`` (classifiers: softmax over the last axis).
    seed: the probes' random seed.
    """

    probes: int = attrs.field(default=8, validator=_positive_int)
    batches: int = attrs.field(default=4, validator=_positive_int)
    loss: str = attrs.field(default="mse", validator=attrs.validators.in_(("mse", "kl")))
    seed: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))


def _skip_converter(value) -> Tuple[str, ...]:
    """Layer names to skip: one name (a string) or an iterable of names."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)  # one layer name, not its characters
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(f"skip must be a layer name or an iterable of layer names, got {value!r}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"skip must hold layer names (strings), got {bad!r} in {value!r}")
    return names


def _layer_ratios_converter(value):
    if value is None:
        return {}
    if not hasattr(value, "items"):
        raise ValueError(f"layer_ratios must be a dict of layer name -> ratio, got {value!r}")
    out = {}
    for name, ratio in value.items():
        try:
            out[str(name)] = validate_ratio(dict(ratio) if hasattr(ratio, "items") else ratio)
        except (ValueError, KeyError) as err:
            raise ValueError(f"layer_ratios[{name!r}]: {err}") from err
    return out


@attrs.frozen
class RMSMPConfig:
    """How to quantize a model.

    ratio: share of rows per scheme, the same in every quantized layer.
    act_bits: activation bit-width (static per-tensor scales from calibration; unsigned after ReLU).
    assign: name of the row-assignment rule (see :mod:`tvm_rmsmp.quant.assign`); rules that need
        the loss Hessian estimate it from the calibration batches as ``hessian`` says.
    fold_bn: fold Conv2d + BatchNorm2d before quantizing the weights.
    skip: layer names (module paths) to leave in float: one name or several; a name of a
        module that holds layers (e.g. an attention block) leaves all of them in float.
        Names that are no module of the model raise an error in ``quantize``.
    layer_ratios: per-layer ratios replacing ``ratio`` for the named layers, e.g. the first
        and last layer at ``{"fixed_8": 1.0}``, or whole layers at 8 bits (layer-wise mixing).
    edge_scheme: if set, the first and last quantized layers (in execution order) use only
        this scheme (common practice: ``"fixed_8"``), unless ``layer_ratios`` names them.
    rounding: how each row is rounded onto its scheme's grid once rows are assigned:
        ``"nearest"`` (each weight to its nearest level) or ``"gptq"`` (error-compensating,
        column by column against the layer's calibration input Hessian; see
        :mod:`tvm_rmsmp.quant.gptq`). Both give integers on the same grids, so compiled models
        are unaffected. The default, ``"gptq"``, was chosen on validation data (held-out
        Fashion-MNIST training images; docs/accuracy.md). QAT starts from GPTQ's rounded weights.
    gptq_damp: GPTQ's dampening, as a fraction of the mean diagonal of the input Hessian (> 0).
    gptq_scale_search: with ``rounding="gptq"``, also try a few multipliers of each row's scale
        and keep the one with the lowest compensated output error (costs one GPTQ run each).
    gptq_act_order: with ``rounding="gptq"``, round each layer's input columns in order of
        decreasing calibration energy ``E[x_k^2]`` (GPTQ's act-order) instead of their natural order.
    act_granularity: ``"per_tensor"`` (default: one static scale per layer input, from
        calibration) or ``"per_token"``: the inputs of Linear (dense) layers get one dynamic
        power-of-two scale per token (row of the input, leading axes flattened), from that
        row's largest magnitude at run time, symmetric. Conv2d layers stay per-tensor.
    act_zero_point: ``"never"`` (default: symmetric signed inputs), ``"always"`` (every signed
        Linear input of a per-tensor layer is quantized asymmetrically, unsigned with a zero
        point folded into the layer's integer bias) or ``"auto"`` (only where the calibration
        samples are lopsided: the asymmetric quantizer's squared error is below
        :data:`ZERO_POINT_GAIN` times the symmetric one's). Conv2d inputs and per-token layers
        stay symmetric; unsigned inputs (after ReLU) need no zero point.
    requant: the layers' epilogue. ``"float"`` (default): ``float32(acc + bias) * out_scale``
        (the float output the next op quantizes again). ``"fixed_point"``: integer only, each
        layer writes 8-bit codes, ``clamp(((acc + bias) * m + 2^(s-1)) >> s, qmin, qmax)``
        (:mod:`tvm_rmsmp.quant.requant`), at the input scale of the layer(s) it feeds where it
        feeds only quantized layers (through ReLU, max-pooling, flatten: the codes pass
        unchanged), else at a scale calibrated on its output; a ReLU right after the layer
        folds into an unsigned clamp. Its float output is ``float32(q) * out_act_scale``.
        Not with ``act_granularity="per_token"`` (its float bias comes after the scale).
    """

    ratio: Dict[str, float] = attrs.field(factory=lambda: dict(DEFAULT_RATIO), converter=_ratio_converter)
    act_bits: int = attrs.field(default=8, validator=_check_act_bits)
    assign: str = attrs.field(default="hessian")
    fold_bn: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    skip: Tuple[str, ...] = attrs.field(default=(), converter=_skip_converter)
    hessian: HessianConfig = attrs.field(factory=HessianConfig, validator=attrs.validators.instance_of(HessianConfig))
    layer_ratios: Dict[str, Dict[str, float]] = attrs.field(factory=dict, converter=_layer_ratios_converter)
    edge_scheme: Optional[str] = attrs.field(default=None)
    rounding: str = attrs.field(default="gptq")
    gptq_damp: float = attrs.field(default=0.01)
    gptq_scale_search: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    gptq_act_order: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    act_granularity: str = attrs.field(default="per_tensor")
    act_zero_point: str = attrs.field(default="never")
    requant: str = attrs.field(default="float")

    @requant.validator
    def _check_requant(self, attribute, value):
        if not isinstance(value, str) or value not in REQUANTS:
            raise ValueError(f"requant must be one of {REQUANTS}, got {value!r}")
        if value == "fixed_point" and self.act_granularity == "per_token":
            raise ValueError("requant='fixed_point' needs per-tensor activations: act_granularity='per_token' adds "
                             "its float bias after the per-token scale")

    @act_granularity.validator
    def _check_granularity(self, attribute, value):
        if not isinstance(value, str) or value not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity must be one of {ACT_GRANULARITIES}, got {value!r}")

    @act_zero_point.validator
    def _check_zero_point(self, attribute, value):
        if not isinstance(value, str) or value not in ACT_ZERO_POINTS:
            raise ValueError(f"act_zero_point must be one of {ACT_ZERO_POINTS} (bools are not accepted: "
                             f"'never' is False, 'always' is True), got {value!r}")

    @rounding.validator
    def _check_rounding(self, attribute, value):
        if value not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {value!r}")

    @gptq_damp.validator
    def _check_damp(self, attribute, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"gptq_damp must be a finite number > 0, got {value!r}")

    @edge_scheme.validator
    def _check_edge(self, attribute, value):
        if value is not None:
            get_scheme(value)

    @assign.validator
    def _check_assign(self, attribute, value):
        from .assign import get_assign_rule

        get_assign_rule(value)

    @property
    def schemes(self) -> Tuple[str, ...]:
        """Schemes with a non-zero share, in the ratio's order (this is the row-group order)."""
        return tuple(n for n, s in self.ratio.items() if s > 0)

    def ratio_for(self, layer: str) -> Dict[str, float]:
        """The ratio used for ``layer``: its entry in ``layer_ratios`` or the model-wide one."""
        return self.layer_ratios.get(layer, self.ratio)


def skip_matcher(skip: Tuple[str, ...]):
    """``name -> bool`` for a ``skip`` list (``RMSMPConfig.skip``, ``PruneConfig.skip``): the
    module is named in ``skip`` or lies inside one that is."""
    names = set(skip)

    def check(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in names for i in range(1, len(parts) + 1))

    return check
