"""PyTorch side of RMSMP: calibration, BN folding and quantized layers.

:func:`quantize` returns a copy of a model whose Linear/Conv2d layers are
:class:`RMSMPLinear`/:class:`RMSMPConv2d`. In eval mode they compute exactly the integer
pipeline of :mod:`tvm_rmsmp.nn.ops`, so the quantized torch model is the reference that
every compiled target must reproduce.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..quant.assign import assign_rows, rule_needs_hessian
from ..quant.config import ZERO_POINT_GAIN, RMSMPConfig, RMSMPWarning, skip_matcher
from ..quant.gptq import gptq_quantize
from ..quant.plan import RowPlan
from ..quant.progress import progress
from ..quant.requant import multiplier_value, quantize_multipliers
from ..quant.schemes import get_scheme
from . import ops  # noqa: F401  (registers rmsmp:: custom ops)
from .attention import DecomposedMultiheadAttention, decompose_attention
from .hessian import MIN_SAMPLES, HessianReport, row_hessian_traces
from .inputs import ModelInputs, call_model, collect_batches
from .residual import RMSMPAdd, RMSMPAvgPool, RMSMPMaxPool, insert_int_ops, rmsmp_int_ops

_INT_OPS = (RMSMPAdd, RMSMPAvgPool)

__all__ = ["RMSMPLinear", "RMSMPConv2d", "quantize", "calibrate", "Calibration", "row_plans", "ActQuant", "RMSMPWarning",
           "fake_quant_per_token", "attach_requant", "requant_model"]


# --------------------------------------------------------------------------------------------
# Activation quantization
# --------------------------------------------------------------------------------------------
class ActQuant:
    """A layer's activation quantizer.

    Static per-tensor (the default): ``x_q = clamp(round(x / scale), qmin, qmax)``, symmetric
    for signed inputs, ``[0, 2^bits - 1]`` for non-negative ones. ``zero_point`` (an integer in
    ``[0, 2^bits - 1]``; dense layers only): asymmetric per-tensor for signed inputs,
    ``x_q = clamp(round(x / scale) + zero_point, 0, 2^bits - 1)``, unsigned codes (``signed`` is
    then False: it says whether the *codes* are signed). ``per_token`` (dense layers only):
    symmetric, one dynamic power-of-two scale per token (see :mod:`tvm_rmsmp.nn.ops`); ``scale``
    is then unused (1.0).
    """

    def __init__(self, scale: float, bits: int, signed: bool, zero_point: Optional[int] = None,
                 per_token: bool = False):
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"activation scale must be positive and finite, got {scale}")
        if zero_point is not None and per_token:
            raise ValueError("a per-token activation quantizer is symmetric: it takes no zero point")
        if zero_point is not None and (signed or not 0 <= int(zero_point) <= 2**bits - 1
                                       or int(zero_point) != zero_point):
            raise ValueError(f"zero_point must be an integer in [0, {2**bits - 1}] with unsigned codes "
                             f"(signed=False), got {zero_point!r} (signed={signed})")
        if per_token and not signed:
            raise ValueError("a per-token activation quantizer is symmetric: signed must be True")
        self.bits = bits
        self.signed = signed
        self.zero_point = None if zero_point is None else int(zero_point)
        self.per_token = bool(per_token)
        self.qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.qmin = -self.qmax if signed else 0
        # The scale actually used is the one whose float32 reciprocal the kernels multiply by.
        self.inv_scale = float(np.float32(1.0 / scale))
        self.scale = float(np.float64(1.0) / np.float64(self.inv_scale))

    @classmethod
    def dynamic_per_token(cls, bits: int) -> "ActQuant":
        """The per-token quantizer (no calibration: its scales come from each token at run time)."""
        return cls(1.0, bits, True, per_token=True)

    @staticmethod
    def _symmetric_search(samples: np.ndarray, bits: int, signed: bool, grid: int) -> Tuple[float, float]:
        """(clipping threshold, squared error) minimizing the error over ``grid`` thresholds."""
        amax = float(np.abs(samples).max())
        qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        qmin = -qmax if signed else 0
        best, best_err = amax, np.inf
        for f in np.linspace(0.3, 1.0, grid):
            s = f * amax / qmax
            err = float(((np.clip(np.round(samples / s), qmin, qmax) * s - samples) ** 2).sum())
            if err < best_err:
                best, best_err = f * amax, err
        return best, best_err

    @staticmethod
    def _asymmetric_search(samples: np.ndarray, bits: int, grid: int) -> Tuple[float, int, float]:
        """(scale, zero point, squared error): the range ``[f min, f max]`` for ``grid``
        factors ``f``, ``zero_point = round(-f min / scale)``."""
        lo, hi = float(samples.min()), float(samples.max())
        qmax = 2**bits - 1
        best = (1.0, 0, np.inf)
        for f in np.linspace(0.3, 1.0, grid):
            s = f * (max(hi, 0.0) - min(lo, 0.0)) / qmax
            zp = int(np.clip(np.round(-f * min(lo, 0.0) / s), 0, qmax))
            err = float((((np.clip(np.round(samples / s) + zp, 0, qmax) - zp) * s - samples) ** 2).sum())
            if err < best[2]:
                best = (s, zp, err)
        return best

    @classmethod
    def calibrate(cls, samples: np.ndarray, bits: int, grid: int = 40, zero_point: str = "never") -> "ActQuant":
        """Unsigned if no sample is negative (e.g. after ReLU), else symmetric; the clipping
        threshold minimizes the squared error over the samples. ``zero_point``: ``"always"``
        gives signed inputs an asymmetric quantizer, ``"auto"`` where its error is below
        ``ZERO_POINT_GAIN`` times the symmetric one's, ``"never"`` keeps them symmetric."""
        samples = np.asarray(samples, dtype=np.float64).ravel()
        signed = bool(samples.min() < 0)
        amax = float(np.abs(samples).max())
        if amax == 0.0:
            return cls(1.0, bits, signed)
        qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        best, sym_err = cls._symmetric_search(samples, bits, signed, grid)
        if signed and zero_point in ("auto", "always"):
            scale, zp, asym_err = cls._asymmetric_search(samples, bits, grid)
            if zero_point == "always" or asym_err < ZERO_POINT_GAIN * sym_err:
                return cls(scale, bits, False, zero_point=zp)
        return cls(best / qmax, bits, signed)

    def __repr__(self):
        if self.per_token:
            return f"ActQuant(per_token, bits={self.bits})"
        zp = f", zero_point={self.zero_point}" if self.zero_point is not None else ""
        return f"ActQuant(scale={self.scale:.4g}, bits={self.bits}, {'signed' if self.signed else 'unsigned'}{zp})"


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` fake-quantized per token for QAT: ``clamp(round(x * 2^-e_t), -qmax, qmax) * 2^e_t``
    with the exponents of the per-token contract (:func:`tvm_rmsmp.nn.ops.token_exponent`, from
    ``x`` without gradient) and straight-through rounding: differentiable in ``x`` (gradient 1
    inside the clamp, 0 where it clips). Its forward values equal what a converted
    :class:`RMSMPLinear` with a per-token :class:`ActQuant` quantizes."""
    qmax = 2 ** (bits - 1) - 1
    e = ops.token_exponent(x.detach(), bits)
    inv, scale = ops.pow2(-e).unsqueeze(-1), ops.pow2(e).unsqueeze(-1)
    v = x.to(torch.float32) * inv
    v = v + (torch.round(v) - v).detach()
    return v.clamp(-qmax, qmax) * scale


# --------------------------------------------------------------------------------------------
# Quantized layers
# --------------------------------------------------------------------------------------------
class _RMSMPLayer(nn.Module):
    op = ""
    #: marks a layer of an already quantized (or QAT-prepared) model
    rmsmp_quantized_layer = True

    def __init__(self, name: str, plan: RowPlan, bias: Optional[np.ndarray], act: ActQuant):
        super().__init__()
        if (act.zero_point is not None or act.per_token) and self.op != "dense":
            raise ValueError(f"layer {name!r} ({self.op}): zero points and per-token activation scales are for "
                             "dense (Linear) layers only; conv2d inputs are symmetric per-tensor")
        self.layer_name = name
        self.schemes: Tuple[str, ...] = plan.schemes
        self.act_bits, self.act_signed = act.bits, act.signed
        self.act_scale, self.inv_act_scale = act.scale, act.inv_scale
        self.act_zero_point, self.act_per_token = act.zero_point, act.per_token
        self.qmin, self.qmax = act.qmin, act.qmax
        n = plan.num_rows
        bias = np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32)
        fan_in = int(np.prod(plan.weight_int.shape[1:]))
        if act.per_token:
            # The bias is added in float after the per-token scale: no integer bias.
            acc_scale = plan.row_scale.astype(np.float64)
            bias_int = np.zeros(n, np.int64)
        else:
            plan = _fit_bias_range(plan, bias, act.scale)
            acc_scale = np.float64(act.scale) * plan.row_scale.astype(np.float64)
            bias_int = np.round(bias.astype(np.float64) / acc_scale).astype(np.int64)
            if act.zero_point is not None:
                # sum_k (x_q - zp) w = acc - zp * sum_k w: the zero point folds into the bias
                w_sum = plan.weight_int.astype(np.int64).reshape(n, -1).sum(axis=1)
                bias_int = bias_int - act.zero_point * w_sum
        w_max = np.abs(plan.weight_int.astype(np.int64)).reshape(n, -1).max(axis=1)
        bound = fan_in * w_max * max(abs(act.qmin), act.qmax) + np.abs(bias_int)
        if np.any(bound >= 2**31):
            folded = "" if act.zero_point is None else f", zero point {act.zero_point} folded into the bias"
            raise ValueError(
                f"layer {name!r}: the int32 accumulator can overflow (fan-in {fan_in}, bound "
                f"{int(bound.max())}{folded}); use fewer activation bits or split the layer"
            )
        self.register_buffer("weight_int", torch.from_numpy(plan.weight_int.astype(np.int8)))
        self.register_buffer("row_scale", torch.from_numpy(plan.row_scale.astype(np.float32)))
        self.register_buffer("bias", torch.from_numpy(bias))
        self.register_buffer("bias_int", torch.from_numpy(bias_int.astype(np.int32)))
        self.register_buffer("out_scale", torch.from_numpy(acc_scale.astype(np.float32)))

    @property
    def act(self) -> ActQuant:
        """The layer's activation quantizer."""
        return ActQuant(self.act_scale, self.act_bits, self.act_signed, self.act_zero_point, self.act_per_token)

    #: the fixed-point epilogue's output quantizer (None: the float epilogue)
    out_act: Optional[ActQuant] = None

    def set_requant(self, out_act: Optional[ActQuant]) -> None:
        """Switch the layer to the fixed-point epilogue writing ``out_act``'s codes (see
        :mod:`tvm_rmsmp.quant.requant`), or back to the float epilogue (``None``). Buffers
        ``requant_mult`` / ``requant_shift`` (int32 per row) and ``requant_scale`` (their exact
        float32 value ``m * 2^-s``) hold the per-row multiplier of ``out_scale / out_act.scale``."""
        if out_act is None:
            self.out_act = None
            for name in ("requant_mult", "requant_shift", "requant_scale"):
                self._buffers.pop(name, None)
            return
        if out_act.per_token or out_act.zero_point is not None:
            raise ValueError(f"layer {self.layer_name!r}: the fixed-point epilogue writes symmetric or unsigned "
                             f"per-tensor codes, got output quantizer {out_act!r}")
        if self.act_per_token:
            raise ValueError(f"layer {self.layer_name!r}: per-token inputs have no fixed-point epilogue")
        scales = self.out_scale.detach().cpu().numpy().astype(np.float64) / np.float64(out_act.scale)
        try:
            m, s = quantize_multipliers(np.maximum(scales, np.finfo(np.float64).tiny))
        except ValueError as err:
            raise ValueError(f"layer {self.layer_name!r}: {err}") from err
        self.out_act = out_act
        dev = self.out_scale.device
        self.register_buffer("requant_mult", torch.from_numpy(m).to(dev))
        self.register_buffer("requant_shift", torch.from_numpy(s).to(dev))
        self.register_buffer("requant_scale", torch.from_numpy(multiplier_value(m, s)).to(dev))

    @property
    def out_act_scale(self) -> float:
        """The float32 scale of the fixed-point epilogue's output codes."""
        return float(np.float32(self.out_act.scale))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``row_scale * weight_int`` (float32, read-only): for code that
        reads ``.weight`` (e.g. torch's Transformer fast-path checks); ``forward`` never uses it."""
        shape = (-1,) + (1,) * (self.weight_int.dim() - 1)
        return self.weight_int.to(torch.float32) * self.row_scale.reshape(shape)

    @property
    def plan(self) -> RowPlan:
        return RowPlan(
            layer=self.layer_name,
            op=self.op,
            schemes=self.schemes,
            weight_int=self.weight_int.cpu().numpy().copy(),
            row_scale=self.row_scale.cpu().numpy().copy(),
        )

    def extra_repr(self) -> str:
        counts = self.plan.counts()
        if self.act_per_token:
            act = "per-token"
        else:
            act = "s" if self.act_signed else ("u" if self.act_zero_point is None else f"u zp={self.act_zero_point}")
        return f"{self.layer_name}: rows {dict(counts)}, act {self.act_bits}b {act}"


#: Largest |bias_int| kept: far inside int32 next to any accumulator, exact in float32.
BIAS_INT_LIMIT = 2**24


def _fit_bias_range(plan: RowPlan, bias: np.ndarray, act_scale: float) -> RowPlan:
    """Rows whose weights are tiny next to their bias (e.g. a channel BatchNorm nearly
    switched off) would need a bias far beyond int32 in accumulator units. Their scale is
    raised until the bias fits and the row is re-encoded: its weights were below that
    resolution anyway."""
    need = np.abs(bias.astype(np.float64)) / (np.float64(act_scale) * BIAS_INT_LIMIT)
    rows = np.nonzero(plan.row_scale.astype(np.float64) < need)[0]
    if rows.size == 0:
        return plan
    w_int, row_scale = plan.weight_int.copy(), plan.row_scale.copy()
    for r in rows:
        scheme = get_scheme(plan.schemes[r])
        new = np.float32(need[r] * (1 + 1e-6))
        w = plan.weight_int[r].astype(np.float64) * np.float64(plan.row_scale[r])
        w_int[r] = scheme.encode(w[None], np.array([new]))[0]
        row_scale[r] = new
    return RowPlan(plan.layer, plan.op, plan.schemes, w_int, row_scale)


class RMSMPLinear(_RMSMPLayer):
    """A Linear layer whose rows are RMSMP-quantized; eval output is integer-exact.

    ``RMSMPLinear(name, plan, bias, act)``: ``plan`` the layer's :class:`RowPlan` (integers and
    row scales), ``bias`` float32 ``[rows]`` or None, ``act`` its :class:`ActQuant` (static
    per-tensor, with a zero point, or per token: ``ActQuant.dynamic_per_token(bits)``).
    """

    op = "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_act is not None:
            zp = -1 if self.act_zero_point is None else self.act_zero_point
            return torch.ops.rmsmp.qlinear_requant(
                x, self.weight_int, self.bias_int, self.requant_scale, self.inv_act_scale, zp, self.qmin, self.qmax,
                self.out_act_scale, self.out_act.qmin, self.out_act.qmax, self.layer_name)
        if self.act_per_token:
            return torch.ops.rmsmp.qlinear_per_token(x, self.weight_int, self.row_scale, self.bias, self.act_bits,
                                                     self.layer_name)
        if self.act_zero_point is not None:
            return torch.ops.rmsmp.qlinear_asym(x, self.weight_int, self.bias_int, self.out_scale, self.inv_act_scale,
                                                self.act_zero_point, self.qmax, self.layer_name)
        return torch.ops.rmsmp.qlinear(
            x, self.weight_int, self.bias_int, self.out_scale, self.inv_act_scale, self.qmin, self.qmax, self.layer_name
        )


class RMSMPConv2d(_RMSMPLayer):
    """A Conv2d layer (groups=1, NCHW) whose rows are RMSMP-quantized."""

    op = "conv2d"

    def __init__(self, name, plan, bias, act, stride, padding, dilation):
        super().__init__(name, plan, bias, act)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_act is not None:
            return torch.ops.rmsmp.qconv2d_requant(
                x, self.weight_int, self.bias_int, self.requant_scale, self.inv_act_scale, self.qmin, self.qmax,
                self.out_act_scale, self.out_act.qmin, self.out_act.qmax, self.stride, self.padding, self.dilation,
                self.layer_name)
        return torch.ops.rmsmp.qconv2d(
            x, self.weight_int, self.bias_int, self.out_scale, self.inv_act_scale, self.qmin, self.qmax,
            self.stride, self.padding, self.dilation, self.layer_name,
        )


# --------------------------------------------------------------------------------------------
# quantize()
# --------------------------------------------------------------------------------------------
def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold Conv2d -> BatchNorm2d pairs (torch.fx). Models fx cannot trace keep their BN."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=False)
    except Exception as err:  # fx tracing fails on data-dependent control flow
        warnings.warn(
            f"could not trace the model to fold BatchNorm ({type(err).__name__}: {err}); "
            "BatchNorm layers stay in float",
            RMSMPWarning,
            stacklevel=3,
        )
        return model


def _supported(name: str, mod: nn.Module) -> Optional[str]:
    """None if the layer can be quantized, else why not."""
    base = nn.Linear if isinstance(mod, nn.Linear) else nn.Conv2d
    if type(mod).forward is not base.forward:
        # e.g. a "same"-padding Conv2d subclass that pads in forward(): replacing it by the
        # plain layer would silently drop what its forward adds.
        return f"{type(mod).__name__} overrides {base.__name__}.forward"
    if isinstance(mod, nn.Linear):
        return None
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            return f"Conv2d with groups={mod.groups} (only groups=1 is lowered)"
        if mod.padding_mode != "zeros":
            return f"Conv2d with padding_mode={mod.padding_mode!r}"
        if isinstance(mod.padding, str):
            return f"Conv2d with padding={mod.padding!r} (give explicit padding)"
        return None
    return f"{type(mod).__name__} is not a supported quantized layer type"


def _check_finite(name: str, what: str, t: torch.Tensor):
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"layer {name!r}: {what} has {bad} NaN/Inf value(s)")


class _InputStats:
    """Collects a layer's input during calibration: a bounded sample and per-feature mean squares.

    The sample is spread over all calibration batches: each call keeps at most its share
    ``MAX_SAMPLES / batches`` (an even stride through the input), so the activation range is
    seen on every batch, not just the first one."""

    MAX_SAMPLES = 1 << 18

    def __init__(self, channel_axis: int, batches: int = 1):
        self.channel_axis = channel_axis
        self.quota = max(1, self.MAX_SAMPLES // max(int(batches), 1))
        self.samples: List[np.ndarray] = []
        self.sq_sum = None
        self.count = 0
        self.n_seen = 0

    def __call__(self, module, inputs):
        x = inputs[0].detach().to(torch.float32)
        ax = self.channel_axis % x.dim()
        xc = x.movedim(ax, -1).reshape(-1, x.shape[ax])
        sq = (xc.double() ** 2).sum(0).cpu().numpy()
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        self.count += xc.shape[0]
        flat = x.reshape(-1).cpu().numpy()
        budget = min(self.quota, self.MAX_SAMPLES - self.n_seen)
        if budget > 0:
            step = max(1, flat.size // budget)
            take = flat[::step][:budget]
            self.samples.append(take.copy())
            self.n_seen += take.size

    @property
    def input_sq(self) -> np.ndarray:
        return self.sq_sum / max(self.count, 1)


def _quantize_layer(name: str, mod: nn.Module, cfg: RMSMPConfig, stats: _InputStats, rule: str,
                    row_hessian: Optional[np.ndarray], input_hessian: Optional[np.ndarray] = None) -> nn.Module:
    """The PTQ layer: rows assigned to schemes first, then rounded onto their grids (GPTQ when
    ``input_hessian``, the layer's ``E[x x^T]``, is given, else nearest rounding)."""
    weight = mod.weight.detach().to(torch.float32).cpu().numpy().astype(np.float64)
    schemes = assign_rows(weight, cfg.ratio_for(name), rule, input_sq=stats.input_sq, row_hessian=row_hessian)
    if input_hessian is not None:
        wi, row_scale = gptq_quantize(weight.reshape(weight.shape[0], -1), input_hessian, schemes, damp=cfg.gptq_damp,
                                      search_scale=cfg.gptq_scale_search, act_order=cfg.gptq_act_order)
        w_int = wi.reshape(weight.shape)
    else:
        w_int = np.zeros(weight.shape, np.int8)
        row_scale = np.zeros(weight.shape[0], np.float32)
        for s_name in set(schemes):
            rows = np.array([i for i, s in enumerate(schemes) if s == s_name])
            wi, sc = get_scheme(s_name).quantize(weight[rows])
            w_int[rows], row_scale[rows] = wi, sc
    op = "dense" if isinstance(mod, nn.Linear) else "conv2d"
    mask = getattr(mod, "prune_mask", None)  # a pruned layer (nn/prune.py): its zeros stay zeros (GPTQ too)
    if isinstance(mask, torch.Tensor):
        from .prune import check_layer

        check_layer(name, mod.weight, mask)
        w_int = np.where(mask.cpu().numpy(), w_int, 0).astype(np.int8)
    plan = RowPlan(layer=name, op=op, schemes=schemes, weight_int=w_int, row_scale=row_scale)
    act = _calibrate_act(name, stats, cfg.act_bits, op, cfg)
    bias = None if mod.bias is None else mod.bias.detach().to(torch.float32).cpu().numpy()
    if op == "dense":
        layer = RMSMPLinear(name, plan, bias, act)
    else:
        layer = RMSMPConv2d(name, plan, bias, act, mod.stride, mod.padding, mod.dilation)
    if isinstance(mask, torch.Tensor):
        layer.register_buffer("prune_mask", mask.detach().cpu().bool().clone(), persistent=False)
    return layer


def _calibrate_act(name: str, stats: "_InputStats", bits: int, op: str = "conv2d",
                   cfg: Optional[RMSMPConfig] = None) -> ActQuant:
    """The layer's activation quantizer; says so when its calibration inputs cannot set a scale.
    Dense layers follow ``cfg.act_granularity`` and ``cfg.act_zero_point``; conv2d stays
    symmetric per-tensor."""
    samples = np.concatenate(stats.samples) if stats.samples else np.zeros(0, np.float32)
    if samples.size == 0:
        raise ValueError(f"layer {name!r}: its inputs were empty in every calibration batch (0 elements); "
                         "calibration needs batches in which the layer sees data")
    dense = op == "dense" and cfg is not None
    if dense and cfg.act_granularity == "per_token":
        return ActQuant.dynamic_per_token(bits)
    act = ActQuant.calibrate(samples, bits, zero_point=cfg.act_zero_point if dense else "never")
    if not np.any(samples):
        warnings.warn(
            f"layer {name!r}: its calibration inputs were all zero, so they cannot set an activation scale "
            f"(it would be 0); using scale {act.scale:g} ({'signed' if act.signed else 'unsigned'}, {bits} bits). "
            "Calibrate with representative, non-zero data",
            RMSMPWarning,
            stacklevel=4,
        )
    return act


def quantize(model: nn.Module, config: Optional[RMSMPConfig] = None, calib_data: Iterable = None,
             row_hessian: Optional[Dict[str, np.ndarray]] = None, *,
             input_fn: Optional[Callable] = None) -> nn.Module:
    """Post-training RMSMP quantization of ``model``; the input model is left untouched.

    calib_data: any iterable of batches (a list, a generator, a DataLoader), used for static
    activation scales and the row-assignment statistics (and the loss Hessian, for the rules
    that need it). A batch that is a tensor or array is the model's one input; a tuple or list
    holds its positional inputs; a dict (a tokenizer's output) its keyword inputs.
    input_fn: picks the model inputs from each batch first, e.g. ``lambda b: b[0]`` for a
    DataLoader yielding ``(images, labels)``, or ``lambda b: {k: b[k] for k in ("input_ids",
    "attention_mask")}``. A batch that does not fit ``model.forward``'s parameters is an error
    naming the batch (see :mod:`tvm_rmsmp.nn.inputs`).
    row_hessian: per-layer row Hessian traces from an earlier run (``q.rmsmp_row_hessian``)
    for the same float model and calibration data: several configurations can share one
    estimate.
    Returns a new module in eval mode; ``q.rmsmp_report`` says which rule ran and what the
    Hessian estimate cost.
    """
    cal = calibrate(model, config, calib_data, row_hessian, input_fn=input_fn)
    for name, layer in ptq_layers(cal).items():
        _set_submodule(cal.model, name, layer)
    if cal.config.requant == "fixed_point":  # residual adds too: the model may become a GraphModule
        cal.model, _ = requant_model(cal.model, cal.batches, cal.config.act_bits)
    return cal.finish()


# --------------------------------------------------------------------------------------------
# The fixed-point epilogue (RMSMPConfig(requant="fixed_point"))
# --------------------------------------------------------------------------------------------
#: Ops a layer's output codes pass through unchanged on their way to the next layer's
#: quantizer (monotone or value-moving: max-pooling, ReLU and flatten commute with quantizing).
_PASS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, RMSMPMaxPool)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.max_pool2d, torch.flatten, F.dropout}
_PASS_METHODS = {"relu", "flatten", "view", "reshape"}


class _LayerTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (_RMSMPLayer, RMSMPMaxPool) + _INT_OPS) or super().is_leaf_module(m, qualname)


def _is_op(node, model: nn.Module, modules, functions, methods) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _trace(model: nn.Module) -> Optional[torch.fx.Graph]:
    """The fx graph of ``model`` with RMSMP layers, residual adds and poolings as leaves; None
    (with a warning) when it cannot be traced."""
    try:
        return _LayerTracer().trace(model)
    except Exception as err:  # data-dependent control flow
        warnings.warn(f"requant='fixed_point': could not trace the model ({type(err).__name__}: {err}); every layer "
                      "gets its own output scale, no ReLU is folded and residual adds stay in float",
                      RMSMPWarning, stacklevel=5)
        return None


def _requant_plan(model: nn.Module, graph: Optional[torch.fx.Graph] = None) -> Dict[str, Tuple[bool, List[str]]]:
    """``{layer or residual add: (a ReLU follows, the layers its output reaches through pass-through
    ops only (empty if it also reaches anything else but residual adds and global poolings of
    the integer-only mode, which take codes at any scale))}`` from an fx trace; ``{}`` if it
    cannot be traced."""
    graph = graph if graph is not None else _trace(model)
    if graph is None:
        return {}
    plan = {}
    for node in graph.nodes:
        mod = model.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(mod, (_RMSMPLayer,) + _INT_OPS):
            continue
        users = list(node.users)
        relu = len(users) == 1 and _is_op(users[0], model, (nn.ReLU,), {F.relu, torch.relu}, {"relu"})
        consumers, frontier, ok = [], users, bool(users)
        while frontier and ok:
            nxt = []
            for u in frontier:
                user = model.get_submodule(u.target) if u.op == "call_module" else None
                if isinstance(user, _RMSMPLayer):
                    consumers.append(user.layer_name)
                elif isinstance(user, _INT_OPS):  # a residual add or pooling takes codes at any scale
                    pass
                elif _is_op(u, model, _PASS_MODULES, _PASS_FUNCTIONS, _PASS_METHODS):
                    nxt.extend(u.users)
                else:
                    ok = False
            frontier = nxt
        plan[mod.layer_name if isinstance(mod, _RMSMPLayer) else mod.op_name] = (relu, consumers if ok else [])
    return plan


def _output_act(layers, plan, name: str, samples: np.ndarray, bits: int) -> Tuple[ActQuant, str]:
    """The output quantizer of a layer or residual add: its consumers' input quantizer when it
    feeds only RMSMP layers (and residual adds) that all quantize alike, else calibrated."""
    relu, consumers = plan.get(name, (False, []))
    acts = {(a.scale, a.bits, a.signed, a.zero_point, a.per_token): a for a in (layers[c].act for c in consumers)}
    if len(acts) == 1 and next(iter(acts.values())).zero_point is None and not next(iter(acts.values())).per_token:
        return next(iter(acts.values())), "chained"
    return ActQuant.calibrate(np.maximum(samples, 0) if relu else samples, bits), "calibrated"


def attach_requant(model: nn.Module, batches: List[ModelInputs], bits: int,
                   plan: Optional[Dict[str, Tuple[bool, List[str]]]] = None) -> Dict[str, str]:
    """Give every RMSMP layer of ``model`` the fixed-point epilogue (in place): its output
    quantizer is the input quantizer of the layers it feeds when it feeds only RMSMP layers
    (through ReLU / max-pooling / flatten; residual adds and global poolings take any codes) and they all quantize
    alike ("chained"), else one calibrated on its outputs over ``batches`` (after the ReLU that
    follows it, if one does: unsigned codes, the ReLU folded into the clamp). The residual adds
    and global poolings of ``model`` (:class:`~tvm_rmsmp.nn.residual.RMSMPAdd`,
    :class:`~tvm_rmsmp.nn.residual.RMSMPAvgPool`, put in by :func:`requant_model`) then become
    integer ops the same way, in graph order, where their inputs are codes at known scales (of
    one shape, for an add): "integer add, chained", ...; else "float add" / "float average
    pooling". Max-poolings of codes learn their input's scale. ``plan``: :func:`_requant_plan`
    of the model, if already made. Returns ``{layer or op: how}``."""
    layers = rmsmp_layers(model)
    int_ops = rmsmp_int_ops(model)
    plan = _requant_plan(model) if plan is None else plan
    stats = {n: _InputStats(channel_axis=1, batches=len(batches)) for n in layers}
    for op in int_ops.values():
        op.requant, op.recording, op.shapes_differ = None, [], False  # a float op while calibrating
        op.quota = max(1, op.MAX_SAMPLES // max(len(batches), 1))  # the sample spread over every batch
    try:
        forward_with_hooks(model, batches, [m.register_forward_hook(lambda mod, inp, out, st=stats[n]: st(mod, (out,)))
                                            for n, m in layers.items()])
    finally:
        samples = {n: np.concatenate(op.recording) if op.recording else np.zeros(1, np.float32)
                   for n, op in int_ops.items()}
        for op in int_ops.values():
            op.recording = None
    how = {}
    for name, layer in layers.items():
        samples_l = np.concatenate(stats[name].samples) if stats[name].samples else np.zeros(1, np.float32)
        out_act, how[name] = _output_act(layers, plan, name, samples_l, bits)
        layer.set_requant(out_act)
    kind = {RMSMPAdd: "add", RMSMPAvgPool: "average pooling"}
    for name, op in int_ops.items():  # graph order: an op's sources are set before it
        scales = [layers[src].out_act_scale if k == "layer" else int_ops[src].out_act_scale for k, src in op.sources]
        if None in scales or op.shapes_differ or (isinstance(op, RMSMPAvgPool) and not op.hw):
            how[name] = f"float {kind[type(op)]}"
            continue
        out_act, chosen = _output_act(layers, plan, name, samples[name], bits)
        op.set_requant(*scales, out_act)
        how[name] = f"integer {kind[type(op)]}, {chosen}"
    scale_of = {**{n: m.out_act_scale for n, m in layers.items()}, **{n: m.out_act_scale for n, m in int_ops.items()}}
    for m in model.modules():  # max-poolings of codes: their input's scale (for the FPGA executor)
        if isinstance(m, RMSMPMaxPool):
            m.scale_in = scale_of.get(m.sources[0][1]) if m.sources else None
    return how


def requant_model(model: nn.Module, batches: List[ModelInputs], bits: int) -> Tuple[nn.Module, Dict[str, str]]:
    """``(model, how)``: what ``quantize`` does with ``RMSMPConfig(requant="fixed_point")``. Every
    add of two code tensors (outputs of RMSMP layers through ReLU / max-pooling / flatten, or of
    another such add or pooling) becomes an :class:`~tvm_rmsmp.nn.residual.RMSMPAdd`, and every
    global average pooling of one an :class:`~tvm_rmsmp.nn.residual.RMSMPAvgPool`, so ``model`` is
    then a ``torch.fx.GraphModule`` of the same class name, holding the same layer modules at the
    same paths, those ops under ``rmsmp_ops``; a model without such ops (or that fx cannot trace)
    is returned as it is. Then :func:`attach_requant`."""
    graph = _trace(model)
    if graph is None:
        return model, attach_requant(model, batches, bits, plan={})

    def layer_name(node):
        mod = model.get_submodule(node.target) if node.op == "call_module" else None
        return mod.layer_name if isinstance(mod, _RMSMPLayer) else None

    def is_pass(node):
        return _is_op(node, model, _PASS_MODULES, _PASS_FUNCTIONS, _PASS_METHODS)

    gm = insert_int_ops(model, graph, layer_name, is_pass)
    if gm is not None:
        model, graph = gm.eval(), gm.graph
    return model, attach_requant(model, batches, bits, plan=_requant_plan(model, graph))


#: Most bytes of float64 input Hessians held at once with ``rounding="gptq"``: layers are
#: grouped in execution order so that each group's Hessians fit, one calibration pass per group.
GPTQ_HESSIAN_BUDGET = 512 << 20


class _InputHessian:
    """Accumulates ``X^T X`` (float64) of a layer's inputs over all calibration batches: the
    rows of a Linear's input, or the im2col columns of a Conv2d's (in the order of
    ``weight.reshape(rows, -1)``: channel, then kernel row, then kernel column)."""

    CHUNK = 1 << 22  # im2col elements built at once

    def __init__(self, mod: nn.Module):
        self.mod = mod
        self.k = int(np.prod(mod.weight.shape[1:]))
        self.sum = torch.zeros(self.k, self.k, dtype=torch.float64, device=mod.weight.device)
        self.count = 0

    def _add(self, cols: torch.Tensor):
        cols = cols.reshape(-1, self.k).to(torch.float64)
        self.sum += cols.T @ cols
        self.count += cols.shape[0]

    def __call__(self, module, inputs):
        x = inputs[0].detach()
        x = x if x.dtype == torch.float64 else x.to(torch.float32)
        if isinstance(self.mod, nn.Linear):
            self._add(x)
            return
        m = self.mod
        (ph, pw), (sh, sw), (dh, dw), (kh, kw) = m.padding, m.stride, m.dilation, m.kernel_size
        x = F.pad(x, (pw, pw, ph, ph))
        ho, wo = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
        step = max(1, self.CHUNK // max(self.k * ho * wo, 1))
        for i in range(0, x.shape[0], step):
            xb = x[i : i + step]
            # im2col by kh * kw strided slices (much faster than F.unfold on CPU): [n, ho, wo, C, kh * kw]
            taps = [xb[:, :, ky * dh : ky * dh + sh * (ho - 1) + 1 : sh, kx * dw : kx * dw + sw * (wo - 1) + 1 : sw]
                    for ky in range(kh) for kx in range(kw)]
            self._add(torch.stack(taps, dim=-1).permute(0, 2, 3, 1, 4))

    @property
    def hessian(self) -> np.ndarray:
        return (self.sum / max(self.count, 1)).cpu().numpy()


def _hessian_groups(layers: Dict[str, nn.Module], budget: int) -> List[List[str]]:
    groups: List[List[str]] = [[]]
    used = 0
    for name, mod in layers.items():
        size = 8 * int(np.prod(mod.weight.shape[1:])) ** 2
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def input_hessians(model: nn.Module, layers: Dict[str, nn.Module], batches: List[tuple]) -> Dict[str, np.ndarray]:
    """``{layer: E[x x^T]}`` over all calibration batches, one forward pass of ``model``."""
    acc = {n: _InputHessian(m) for n, m in layers.items()}
    forward_with_hooks(model, batches, [m.register_forward_pre_hook(acc[n]) for n, m in layers.items()])
    return {n: a.hessian for n, a in acc.items()}


def forward_with_hooks(model: nn.Module, batches, handles) -> None:
    """Run ``model`` on every batch without gradients, then remove the hooks ``handles`` (also on error)."""
    try:
        with torch.no_grad():
            for b in batches:
                call_model(model, b)
    finally:
        for h in handles:
            h.remove()


def ptq_layers(cal: "Calibration") -> Dict[str, "_RMSMPLayer"]:
    """The quantized layer for every calibrated layer (the model itself is left as it is).

    With ``rounding="gptq"`` the layers' input Hessians come from the float model (BN folded)
    on all calibration batches, in groups of at most :data:`GPTQ_HESSIAN_BUDGET` bytes; the
    time and passes are reported in ``cal.gptq_report``.
    """
    cfg, out = cal.config, {}
    gptq = cfg.rounding == "gptq"
    t0 = time.perf_counter()
    groups = _hessian_groups(cal.layers, GPTQ_HESSIAN_BUDGET) if gptq else [list(cal.layers)]
    bar = progress(desc="GPTQ rounding" if gptq else "rounding", total=len(cal.layers), unit="layer")
    for group in groups:
        hessians = input_hessians(cal.model, {n: cal.layers[n] for n in group}, cal.batches) if gptq else {}
        for name in group:
            out[name] = _quantize_layer(name, cal.layers[name], cfg, cal.stats[name], cal.rule,
                                        cal.row_hessian.get(name), hessians.pop(name, None))
            bar.update()
    bar.close()
    if gptq:
        cal.gptq_report = {"seconds": time.perf_counter() - t0, "passes": len(groups),
                           "peak_hessian_bytes": max(sum(8 * int(np.prod(cal.layers[n].weight.shape[1:])) ** 2
                                                         for n in g) for g in groups)}
    return out


@attrs.define
class Calibration:
    """What calibration learned about a model: the float model (BN folded) and, per
    quantizable layer in execution order, its input statistics and row-Hessian traces."""

    model: nn.Module
    config: RMSMPConfig
    layers: Dict[str, nn.Module]
    stats: Dict[str, "_InputStats"]
    batches: List[ModelInputs]
    rule: str = "variance"
    row_hessian: Dict[str, np.ndarray] = attrs.field(factory=dict)
    hessian_report: Optional[HessianReport] = None
    gptq_report: Optional[dict] = None

    def finish(self) -> nn.Module:
        self.model.rmsmp_config = self.config
        self.model.rmsmp_row_hessian = self.row_hessian
        self.model.rmsmp_report = {"assign": self.rule, "hessian": self.hessian_report, "gptq": self.gptq_report}
        return self.model.eval()


def _names_hint(names: List[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{shown}{more}]" if names else "(none)"


def _quantized_layer_names(model: nn.Module) -> List[str]:
    """Names of the RMSMP (or QAT fake-quantized) layers already in ``model``."""
    return [getattr(m, "layer_name", n) for n, m in model.named_modules() if getattr(m, "rmsmp_quantized_layer", False)]


def _weight_bearing(mod: nn.Module) -> bool:
    """Holds its own matrix (or larger) parameter: a layer with weights, not a norm's scale."""
    return any(p.dim() >= 2 for p in mod.parameters(recurse=False))


def calibrate(model: nn.Module, config: Optional[RMSMPConfig], calib_data: Iterable,
              row_hessian: Optional[Dict[str, np.ndarray]] = None, *,
              input_fn: Optional[Callable] = None) -> Calibration:
    """Copy ``model``, fold BN, decompose attention, run the calibration batches (as
    :func:`quantize` takes them, ``input_fn`` applied) and estimate what the rule needs."""
    cfg = config if config is not None else RMSMPConfig()
    if not isinstance(cfg, RMSMPConfig):
        raise TypeError(f"config must be an RMSMPConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    quantized = _quantized_layer_names(model)
    if quantized:
        raise ValueError(
            f"model is already quantized: it has RMSMP layers {_names_hint(quantized)}; quantize the float model "
            "instead (quantize and prepare_qat leave their input untouched)"
        )
    if calib_data is None:
        raise ValueError("calib_data is required: static activation scales come from calibration batches")
    batches = collect_batches(calib_data, model, input_fn)
    if not batches:
        raise ValueError("calib_data is empty: give at least one input batch")
    for i, b in enumerate(batches):
        for j, t in b.items():
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 0:
                raise ValueError(
                    f"calib_data batch {i}, {j} has no samples (shape {list(t.shape)}): "
                    "every calibration batch needs at least one sample"
                )
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"calib_data batch {i}, {j} has NaN/Inf values")

    skipped = skip_matcher(cfg.skip)
    q = copy.deepcopy(model).eval()
    if cfg.fold_bn:
        q = _fold_batchnorm(q).eval()
    # nn.MultiheadAttention runs its projections from packed weights: as separate Linear
    # layers they are quantized like any other (and the quantized model still exports)
    q, _ = decompose_attention(q, skipped)
    q.eval()

    known = {n for n, _ in q.named_modules() if n} | {n for n, _ in model.named_modules() if n}
    layer_names = [n for n, m in q.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    unknown = [n for n in cfg.skip if n not in known]
    if unknown:
        raise ValueError(
            f"skip names layers that are not modules of the model: {unknown}; "
            f"layers of the model: {_names_hint(layer_names)}"
        )

    targets: Dict[str, nn.Module] = {}
    floats: List[str] = []
    for name, mod in q.named_modules():
        if skipped(name):
            continue
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            why = _supported(name, mod)
            if why is None:
                _check_finite(name, "weight", mod.weight)
                if mod.bias is not None:
                    _check_finite(name, "bias", mod.bias)
                targets[name] = mod
            else:
                warnings.warn(f"layer {name!r} left in float: {why}", RMSMPWarning, stacklevel=3)
        elif _weight_bearing(mod) and not isinstance(mod, DecomposedMultiheadAttention):
            floats.append(f"{name or '<model>'!r} ({type(mod).__name__})")
    if floats:
        warnings.warn(
            f"layers left in float (not a supported quantized layer type; only Linear, Conv2d and "
            f"MultiheadAttention projections are quantized): {', '.join(floats)}",
            RMSMPWarning,
            stacklevel=3,
        )
    unknown = sorted(set(cfg.layer_ratios) - set(targets))
    if unknown:
        raise ValueError(
            f"layer_ratios names layers that are not quantizable layers of the model: {unknown}; "
            f"quantizable layers: {_names_hint(list(targets))}"
        )
    if not targets:
        warnings.warn("model has no quantizable layer (Linear / Conv2d); it stays in float", RMSMPWarning, stacklevel=3)
        return Calibration(q, cfg, {}, {}, batches)

    stats = {n: _InputStats(channel_axis=-1 if isinstance(m, nn.Linear) else 1, batches=len(batches))
             for n, m in targets.items()}
    seen: List[str] = []
    handles = [m.register_forward_pre_hook(_first_call(seen, n, stats[n])) for n, m in targets.items()]
    try:
        with torch.no_grad():
            for i, b in enumerate(progress(batches, "calibration", unit="batch")):
                try:
                    call_model(q, b)
                except Exception as err:
                    raise ValueError(
                        f"calib_data batch {i} does not fit the model ({type(err).__name__}: {err})"
                    ) from err
    finally:
        for h in handles:
            h.remove()
    for name in targets.keys() - set(seen):
        warnings.warn(f"layer {name!r} left in float: calibration never reached it", RMSMPWarning, stacklevel=3)
    layers = {n: targets[n] for n in seen}  # execution order: first and last layer are well defined
    if cfg.edge_scheme is not None and layers:
        edge = {n: {cfg.edge_scheme: 1.0} for n in (seen[0], seen[-1]) if n not in cfg.layer_ratios}
        cfg = attrs.evolve(cfg, layer_ratios={**cfg.layer_ratios, **edge})
    cal = Calibration(q, cfg, layers, {n: stats[n] for n in seen}, batches)
    if row_hessian is not None and rule_needs_hessian(cfg.assign):
        missing = sorted(set(layers) - set(row_hessian))
        if missing:
            raise ValueError(f"row_hessian has no traces for layers {missing}")
        cal.rule, cal.row_hessian = cfg.assign, {n: np.asarray(row_hessian[n], np.float64) for n in layers}
    else:
        cal.rule, cal.row_hessian, cal.hessian_report = _row_hessians(q, layers, batches, cfg)
    return cal


def _first_call(seen: List[str], name: str, stats: "_InputStats"):
    def hook(module, inputs):
        if name not in seen:
            seen.append(name)
        stats(module, inputs)

    return hook


def _row_hessians(model: nn.Module, layers: Dict[str, nn.Module], batches: List[tuple], cfg: RMSMPConfig):
    """``(rule actually used, {layer: row Hessian traces}, HessianReport or None)``.

    Falls back to the ``variance`` rule, with a warning, when the calibration data are too
    few for a meaningful estimate or the model cannot be differentiated twice.
    """
    if not rule_needs_hessian(cfg.assign) or not layers:
        return cfg.assign, {}, None
    use = batches[: cfg.hessian.batches]
    samples = sum(int(b.tensors()[0].shape[0]) if b.tensors() and b.tensors()[0].dim() else 1 for b in use)
    if samples < MIN_SAMPLES:
        warnings.warn(
            f"assign={cfg.assign!r} needs at least {MIN_SAMPLES} calibration samples for the Hessian estimate, "
            f"got {samples}; using the 'variance' rule",
            RMSMPWarning,
            stacklevel=4,
        )
        return "variance", {}, None
    try:
        traces, report = row_hessian_traces(model, layers, use, probes=cfg.hessian.probes, loss=cfg.hessian.loss,
                                            seed=cfg.hessian.seed)
    except RuntimeError as err:  # e.g. an op without a second derivative
        warnings.warn(f"Hessian estimate failed ({err}); using the 'variance' rule", RMSMPWarning, stacklevel=4)
        return "variance", {}, None
    return cfg.assign, traces, report


def _set_submodule(root: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def row_plans(model: nn.Module) -> Dict[str, RowPlan]:
    """``{layer name: RowPlan}`` for every RMSMP layer of a quantized model."""
    return {m.layer_name: m.plan for m in model.modules() if isinstance(m, _RMSMPLayer)}


def rmsmp_layers(model: nn.Module) -> Dict[str, _RMSMPLayer]:
    return {m.layer_name: m for m in model.modules() if isinstance(m, _RMSMPLayer)}
