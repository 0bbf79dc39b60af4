"""Quantization-aware training (QAT) for RMSMP, plain PyTorch.

    qat = prepare_qat(model, RMSMPConfig(...), calib_data)      # fake-quantized float model
    train_qat(qat, batches, loss_fn, QATConfig(epochs=1))         # any optimizer loop works too
    q = convert_qat(qat)                                          # integer-exact RMSMP model

Weights keep their float copy; the forward pass uses ``row_scale * Q(w / row_scale)`` with
each row's own scheme (nearest level of SP2-4, Fixed-4 or Fixed-8) and the straight-through
estimator for the rounding. Row scales and the per-tensor activation scales are learned
(LSQ: the gradient flows through ``x / s`` and ``* s``, scaled by ``1/sqrt(n * qmax)``).
Scales are learned as logarithms by default (``QATConfig(scale_param="log")``): Adam's step
then moves a scale by a fraction of itself (about ``scale_lr``) whatever its size, where a
step on the scale itself moved small row scales by several percent. Learning rates follow a
linear warm-up and a cosine decay; the loss can be distilled from the float model
(``QATConfig(distill="kl"|"mse"|"cosine")`` with ``train_qat(..., teacher=...)``); a
``val_fn`` keeps the best epoch (the PTQ start included) by a validation score. BatchNorm is
folded into the convolutions before training. Rows can be re-assigned every N epochs, as in
the paper, with the same rule that assigned them. With ``RMSMPConfig(rounding="gptq")`` the
float weights start at GPTQ's rounded weights, so training starts from the PTQ model.

Under ``torch.distributed`` (DDP, e.g. launched with ``torchrun``) the Hessian estimate and
row assignment run on rank 0 only and are broadcast by :func:`prepare_qat`;
:func:`train_qat` wraps the model in DistributedDataParallel, and re-assignment and the
best-epoch choice are decided on rank 0 and broadcast, so all ranks keep identical row plans
and weights. Each rank feeds its own shard of the data.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import attrs
import numpy as np
import torch
from torch import nn

from ..quant.assign import assign_rows, rule_needs_hessian
from ..quant.config import RMSMPConfig
from ..quant.plan import RowPlan
from ..quant.progress import progress
from ..quant.schemes import get_scheme
from .hessian import row_hessian_traces
from .inputs import ModelInputs, call_model, collect_batches
from .layers import (
    ActQuant,
    RMSMPConv2d,
    RMSMPLinear,
    _InputStats,
    fake_quant_per_token,
    ptq_layers,
    _set_submodule,
    calibrate,
)


def nearest_level(scheme, v: torch.Tensor) -> torch.Tensor:
    """Each value of ``v`` (already divided by its row scale) moved to the nearest level of
    ``scheme`` (torch counterpart of :meth:`Scheme.encode` at scale 1; no gradient)."""
    levels = torch.tensor(np.array(scheme.levels), dtype=v.dtype, device=v.device)
    return levels[torch.bucketize(v, (levels[1:] + levels[:-1]) / 2)]

__all__ = ["QATConfig", "FakeQuantLayer", "prepare_qat", "train_qat", "convert_qat", "reassign_rows", "qat_layers",
           "distill_loss"]


def _non_negative(instance, attribute, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


#: How learned scales are parameterized (``QATConfig.scale_param``).
SCALE_PARAMS = ("log", "linear")
#: Learning-rate schedules (``QATConfig.schedule``).
SCHEDULES = ("cosine", "constant")
#: Distillation losses (``QATConfig.distill``).
DISTILL_LOSSES = ("kl", "mse", "cosine")


@attrs.frozen
class QATConfig:
    """Training settings.

    epochs: passes over the batches given to :func:`train_qat`.
    lr, scale_lr: peak Adam learning rates of the float weights/biases and of the learned scales.
    weight_decay: on weights only.
    reassign_every: re-run row assignment after every this many epochs (None: never).
    edge_scheme: first/last quantized layer policy, used when the RMSMPConfig sets none
        (``None`` here: they follow the ratio like every other layer).
    scale_param: ``"log"`` (scales learned as their logarithm: relative steps) or ``"linear"``
        (the scale itself, as before this option existed).
    schedule: ``"cosine"`` (linear warm-up over ``warmup`` of the steps, then cosine decay to 0)
        or ``"constant"``.
    warmup: fraction of all steps spent warming up (cosine schedule only), in [0, 1).
    steps_per_epoch: the schedule's steps per epoch when the batches have no ``len()`` (None:
        counted during the first epoch, which then runs at the peak rates without warm-up).
    distill: knowledge distillation from a float ``teacher`` given to :func:`train_qat`:
        ``"kl"`` (KL(softmax teacher || softmax student), classifiers), ``"mse"`` or
        ``"cosine"`` (1 - cosine along the last axis, embeddings); None: the task loss only.
    distill_weight: the loss is ``(1 - w) * loss_fn(out, target) + w * distill(out, teacher)``;
        with ``w == 1`` ``loss_fn`` is not called (targets may be None).
    temperature: of the ``"kl"`` distillation (the loss is multiplied by its square).
    """

    epochs: int = attrs.field(default=1, validator=attrs.validators.instance_of(int))
    lr: float = attrs.field(default=1e-4, validator=_non_negative)
    scale_lr: float = attrs.field(default=1e-3, validator=_non_negative)
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    reassign_every: Optional[int] = attrs.field(default=None)
    edge_scheme: Optional[str] = attrs.field(default="fixed_8")
    scale_param: str = attrs.field(default="log", validator=attrs.validators.in_(SCALE_PARAMS))
    schedule: str = attrs.field(default="cosine", validator=attrs.validators.in_(SCHEDULES))
    warmup: float = attrs.field(default=0.05)
    steps_per_epoch: Optional[int] = attrs.field(default=None)
    distill: Optional[str] = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.in_(DISTILL_LOSSES)))
    distill_weight: float = attrs.field(default=1.0)
    temperature: float = attrs.field(default=1.0)

    @warmup.validator
    def _check_warmup(self, attribute, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {value!r}")

    @steps_per_epoch.validator
    def _check_steps(self, attribute, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"steps_per_epoch must be None or a positive integer, got {value!r}")

    @distill_weight.validator
    def _check_distill_weight(self, attribute, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"distill_weight must be in [0, 1], got {value!r}")

    @temperature.validator
    def _check_temperature(self, attribute, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {value!r}")

    @epochs.validator
    def _check_epochs(self, attribute, value):
        if isinstance(value, bool) or value < 1:
            raise ValueError(f"epochs must be >= 1, got {value!r}")

    @reassign_every.validator
    def _check_reassign(self, attribute, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"reassign_every must be None or a positive integer, got {value!r}")

    @edge_scheme.validator
    def _check_edge(self, attribute, value):
        if value is not None:
            get_scheme(value)


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g`` (LSQ's step-size scaling)."""
    return (x - x * g).detach() + x * g


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


class FakeQuantLayer(nn.Module):
    """A Linear or Conv2d (groups=1) trained with RMSMP fake quantization of weights and input."""

    #: marks a layer of an already quantized (or QAT-prepared) model
    rmsmp_quantized_layer = True

    def __init__(self, name: str, layer: nn.Module, plan: RowPlan, act: ActQuant, scale_param: str = "log",
                 weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.layer_name, self.op = name, plan.op
        w0 = layer.weight if weight is None else weight  # e.g. GPTQ's rounded weights: training starts at PTQ
        self.weight = nn.Parameter(w0.detach().clone().float().to(layer.weight.device))
        device = layer.weight.device
        bias = layer.bias.detach().clone().float() if layer.bias is not None else torch.zeros(
            self.weight.shape[0], device=device)
        self.bias = nn.Parameter(bias)
        self.scale_param = scale_param
        row_scale = torch.from_numpy(plan.row_scale.astype(np.float32)).to(device)
        act_scale = torch.tensor(float(act.scale), dtype=torch.float32, device=device)
        self.register_buffer("row_scale_ref", torch.empty_like(row_scale))
        self.register_buffer("act_scale_ref", torch.empty_like(act_scale))
        self._start_scales(row_scale, act_scale)
        self.act_bits, self.act_signed, self.qmin, self.qmax = act.bits, act.signed, act.qmin, act.qmax
        self.act_zero_point, self.act_per_token = act.zero_point, act.per_token
        if self.op == "conv2d":
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.set_schemes(plan.schemes)

    # -- learned scales: ``ref * exp(param)`` ("log": steps relative to the scale) or the scale
    #    itself ("linear") -------------------------------------------------------------------
    def _encode(self, scale: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        scale = scale.detach().abs().clamp_min(1e-12)
        return (scale / ref).log() if self.scale_param == "log" else scale.clone()

    def _decode(self, p: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return ref * p.exp() if self.scale_param == "log" else p.abs().clamp_min(1e-12)

    def _start_scales(self, row: torch.Tensor, act: torch.Tensor) -> None:
        """Learn from these scales on: they become the references ("log": param 0, so the start is exact)."""
        self.row_scale_ref.copy_(row.detach().abs().clamp_min(1e-12))
        self.act_scale_ref.copy_(act.detach().abs().clamp_min(1e-12))
        self.row_scale_param = nn.Parameter(self._encode(row, self.row_scale_ref))
        self.act_scale_param = nn.Parameter(self._encode(act, self.act_scale_ref))

    @property
    def row_scale(self) -> torch.Tensor:
        """The current per-row weight scales (positive)."""
        return self._decode(self.row_scale_param, self.row_scale_ref)

    @property
    def act_scale(self) -> torch.Tensor:
        """The current activation scale (positive, a 0-d tensor)."""
        return self._decode(self.act_scale_param, self.act_scale_ref)

    def set_row_scale(self, rows, values: torch.Tensor) -> None:
        values = values.to(self.row_scale_param)
        with torch.no_grad():
            self.row_scale_ref[rows] = values.abs().clamp_min(1e-12)
            self.row_scale_param[rows] = self._encode(values, self.row_scale_ref[rows])

    def use_scale_param(self, mode: str) -> None:
        """Re-parameterize the learned scales (same values) as ``"log"`` or ``"linear"``."""
        if mode not in SCALE_PARAMS:
            raise ValueError(f"scale_param must be one of {SCALE_PARAMS}, got {mode!r}")
        if mode != self.scale_param:
            row, act = self.row_scale.detach(), self.act_scale.detach()
            self.scale_param = mode
            self._start_scales(row, act)

    def set_schemes(self, schemes: Sequence[str]) -> None:
        self.schemes: Tuple[str, ...] = tuple(schemes)
        groups = RowPlan(self.layer_name, self.op, self.schemes,
                         np.zeros(self.weight.shape, np.int8), np.ones(len(self.schemes), np.float32)).groups()
        self._groups = [(get_scheme(s), torch.from_numpy(idx).to(self.weight.device)) for s, idx in groups]
        order = torch.cat([idx for _, idx in self._groups])
        self._inverse = torch.empty_like(order)
        self._inverse[order] = torch.arange(order.numel(), device=order.device)

    def quantized_weight(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(row_scale * Q(w / row_scale), row_scale)``, rows in the layer's order."""
        fan_in = self.weight[0].numel()
        parts, scales = [], []
        mask = getattr(self, "prune_mask", None)  # pruned weights stay zero; their gradients too
        weight = self.weight if mask is None else self.weight * mask.to(self.weight.dtype)
        for scheme, idx in self._groups:
            g = 1.0 / math.sqrt(fan_in * scheme.max_level)
            scale = self._decode(_grad_scale(self.row_scale_param[idx], g), self.row_scale_ref[idx])
            scales.append(scale)
            scale = scale.reshape((-1,) + (1,) * (self.weight.dim() - 1))
            v = (weight[idx] / scale).clamp(-scheme.max_level, scheme.max_level)
            nearest = nearest_level(scheme, v.detach())
            parts.append(((nearest - v).detach() + v) * scale)
        return torch.cat(parts)[self._inverse], torch.cat(scales)[self._inverse]

    def quantized_input(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(s * (clamp(round(x / s) + zp) - zp), s)`` with the learned activation scale ``s``
        (zp: the calibrated zero point, 0 if none); per-token layers: ``(fake_quant_per_token(x), None)``."""
        if self.act_per_token:
            return fake_quant_per_token(x, self.act_bits), None
        g = 1.0 / math.sqrt(max(x[0].numel(), 1) * self.qmax)
        s = self._decode(_grad_scale(self.act_scale_param, g), self.act_scale_ref)
        zp = self.act_zero_point or 0
        return (_round_ste((x / s).clamp(self.qmin - zp, self.qmax - zp) + zp) - zp) * s, s

    def forward(self, x):
        (x, act_scale), (w, row_scale) = self.quantized_input(x), self.quantized_weight()
        if act_scale is None:  # per-token: the bias is added in float after the per-token scale
            return nn.functional.linear(x, w, self.bias)
        acc_scale = act_scale * row_scale  # the bias is an integer in units of the accumulator
        bias = _round_ste(self.bias / acc_scale) * acc_scale
        if self.op == "dense":
            return nn.functional.linear(x, w, bias)
        return nn.functional.conv2d(x, w, bias, self.stride, self.padding, self.dilation)

    def to_rmsmp(self) -> nn.Module:
        """The integer-exact layer with this layer's current weights, schemes and scales."""
        w = self.weight.detach().double().cpu().numpy()
        mask = getattr(self, "prune_mask", None)
        if mask is not None:
            w = np.where(mask.cpu().numpy(), w, 0.0)
        row_scale = self.row_scale.detach().cpu().numpy().astype(np.float32)
        w_int = np.zeros(w.shape, np.int8)
        for scheme, idx in self._groups:
            i = idx.cpu().numpy()
            w_int[i] = scheme.encode(w[i], row_scale[i]).astype(np.int8)
        plan = RowPlan(self.layer_name, self.op, self.schemes, w_int, row_scale)
        act = ActQuant(float(self.act_scale.detach()), self.act_bits, self.act_signed, self.act_zero_point,
                       self.act_per_token)  # a per-token quantizer ignores the scale
        bias = self.bias.detach().cpu().numpy()
        if self.op == "dense":
            layer = RMSMPLinear(self.layer_name, plan, bias, act)
        else:
            layer = RMSMPConv2d(self.layer_name, plan, bias, act, self.stride, self.padding, self.dilation)
        if mask is not None:
            layer.register_buffer("prune_mask", mask.detach().cpu().bool().clone(), persistent=False)
        return layer

    def extra_repr(self) -> str:
        counts: Dict[str, int] = {}
        for s in self.schemes:
            counts[s] = counts.get(s, 0) + 1
        return f"{self.layer_name}: rows {counts}, act {self.act_bits}b"


def qat_layers(model: nn.Module) -> Dict[str, FakeQuantLayer]:
    return {m.layer_name: m for m in model.modules() if isinstance(m, FakeQuantLayer)}


def prepare_qat(model: nn.Module, config: Optional[RMSMPConfig] = None, calib_data: Iterable = None,
                qat_config: Optional[QATConfig] = None, row_hessian: Optional[Dict[str, np.ndarray]] = None, *,
                input_fn: Optional[Callable] = None) -> nn.Module:
    """A trainable copy of ``model`` with fake-quantized RMSMP layers, initialized by the same
    calibration, row assignment and rounding as :func:`tvm_rmsmp.quantize` (PTQ; ``calib_data``
    and ``input_fn`` as it takes them): with
    ``rounding="gptq"`` the float weights start at GPTQ's rounded weights, so the untrained
    QAT model converts to the PTQ model. Under torch.distributed the Hessian estimate and the
    assignment run on rank 0 only and every rank receives rank 0's plans and parameters."""
    qcfg = qat_config if qat_config is not None else QATConfig()
    cfg = config if config is not None else RMSMPConfig()
    if cfg.requant != "float":
        raise ValueError("prepare_qat: requant='fixed_point' is for post-training quantize() only (QAT trains "
                         "the float epilogue); use RMSMPConfig(requant='float')")
    if cfg.edge_scheme is None and qcfg.edge_scheme is not None:
        cfg = attrs.evolve(cfg, edge_scheme=qcfg.edge_scheme)
    dist = _distributed()
    rank0 = not dist or torch.distributed.get_rank() == 0
    # other ranks skip the Hessian estimate (the cheap variance rule): rank 0's plans replace theirs
    local = cfg if rank0 or not rule_needs_hessian(cfg.assign) else attrs.evolve(cfg, assign="variance")
    cal = calibrate(model, local, calib_data, row_hessian if rank0 else None, input_fn=input_fn)
    for name, ptq in ptq_layers(cal).items():
        mod = cal.layers[name]
        act = ptq.act
        start = ptq.weight if cfg.rounding == "gptq" else None  # GPTQ's integers times the row scales
        fq = FakeQuantLayer(name, mod, ptq.plan, act, qcfg.scale_param, start)
        if isinstance(getattr(ptq, "prune_mask", None), torch.Tensor):  # a pruned layer: its mask stays applied
            fq.register_buffer("prune_mask", ptq.prune_mask.to(fq.weight.device), persistent=False)
        _set_submodule(cal.model, name, fq)
    qat = cal.model.train()
    qat.rmsmp_config = attrs.evolve(cal.config, assign=cfg.assign)
    qat.rmsmp_report = {"assign": cal.rule if rank0 else cfg.assign, "hessian": cal.hessian_report,
                        "reassigned_rows": 0}
    if dist:
        _sync_from_rank0(qat)
    return qat


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _sync_from_rank0(model: nn.Module) -> None:
    """Broadcast rank 0's row schemes and parameters so every rank holds the same model."""
    dist = torch.distributed
    cfg: RMSMPConfig = model.rmsmp_config
    for name, layer in qat_layers(model).items():
        names = sorted(cfg.ratio_for(name))  # the same list on every rank
        codes = torch.tensor([names.index(s) for s in layer.schemes], dtype=torch.int64, device=layer.weight.device)
        dist.broadcast(codes, 0)
        layer.set_schemes([names[int(c)] for c in codes])
    for p in model.parameters():
        dist.broadcast(p.data, 0)
    for b in model.buffers():  # BN statistics, the scales' references
        dist.broadcast(b.data, 0)


def reassign_rows(model: nn.Module, calib_data: Iterable, input_fn: Optional[Callable] = None) -> int:
    """Re-run the model's row assignment on its current float weights; rows that change
    scheme get that scheme's MSE-optimal scale. Returns the number of rows that moved.
    ``calib_data`` and ``input_fn`` as :func:`tvm_rmsmp.quantize` takes them."""
    cfg: RMSMPConfig = model.rmsmp_config
    layers = qat_layers(model)
    batches = collect_batches(calib_data, model, input_fn)
    stats = {n: _InputStats(channel_axis=-1 if m.op == "dense" else 1) for n, m in layers.items()}
    handles = [m.register_forward_pre_hook(stats[n]) for n, m in layers.items()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            for b in batches:
                call_model(model, b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    traces: Dict[str, np.ndarray] = {}
    if rule_needs_hessian(model.rmsmp_report["assign"]):
        traces, _ = row_hessian_traces(model, layers, batches[: cfg.hessian.batches], probes=cfg.hessian.probes,
                                       loss=cfg.hessian.loss, seed=cfg.hessian.seed)
        model.train(was_training)
    moved = 0
    for name, layer in layers.items():
        w = layer.weight.detach().double().cpu().numpy()
        new = assign_rows(w, cfg.ratio_for(name), model.rmsmp_report["assign"], input_sq=stats[name].input_sq,
                          row_hessian=traces.get(name))
        changed = [i for i, (a, b) in enumerate(zip(layer.schemes, new)) if a != b]
        for s in set(new[i] for i in changed):
            rows = [i for i in changed if new[i] == s]
            layer.set_row_scale(rows, torch.from_numpy(get_scheme(s).choose_row_scale(w[rows])))
        layer.set_schemes(new)
        moved += len(changed)
    model.rmsmp_report["reassigned_rows"] += moved
    return moved


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a Tensor of shape {list(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} ({', '.join(type(i).__name__ for i in x[:4])}{', ...' if len(x) > 4 else ''})"
    return f"a {type(x).__name__}"


def _epoch_batches(batches, epoch: int, epochs: int):
    """The iterable of one epoch: ``batches(epoch)``, or ``batches`` itself (a list, a DataLoader)."""
    if callable(batches) and not isinstance(batches, nn.Module):
        return batches(epoch)
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(
            "train_qat: batches must be a callable epoch -> iterable of (inputs, target) pairs, or such an "
            f"iterable (a list, a DataLoader), got {_describe(batches)}"
        ) from None
    if it is batches and epochs > 1:
        raise TypeError(
            f"train_qat: batches is a one-shot iterator ({type(batches).__name__}) but epochs={epochs}: it would "
            "be used up after the first epoch; pass a list, a DataLoader or a callable epoch -> batches"
        )
    return it


def _step_batch(batch, epoch: int, step: int) -> Tuple[tuple, object]:
    """``(inputs tuple, target)`` of one training batch, or a TypeError naming the step."""
    where = f"epoch {epoch + 1}, step {step + 1}"
    if isinstance(batch, torch.Tensor) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"train_qat: the batch at {where} must be an (inputs, target) pair, got {_describe(batch)}; "
            "batches yield (inputs, target) with inputs a tensor or a tuple of the model's inputs"
        )
    inputs, target = batch
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)  # one input: ``net(*tensor)`` would split it along its first axis
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    elif isinstance(inputs, Mapping):  # keyword inputs (a tokenizer's output)
        return ModelInputs((), {k: torch.from_numpy(x) if isinstance(x, np.ndarray) else x
                                for k, x in inputs.items()}), _as_target(target)
    elif not isinstance(inputs, tuple):
        raise TypeError(f"train_qat: the inputs of the batch at {where} must be a tensor, a tuple of tensors or a "
                        f"dict of keyword inputs, got {_describe(inputs)}")
    inputs = tuple(torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in inputs)
    return inputs, _as_target(target)


def _as_target(target):
    return torch.from_numpy(target) if isinstance(target, np.ndarray) else target


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from _tensors(v)


def _all_finite(out) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(out) if t.is_floating_point())


def _first_nonfinite(model: nn.Module, inputs: tuple) -> str:
    """Where a forward pass first produces NaN/Inf: the inputs or the first module (in the order
    modules finish) whose output is not finite."""
    if not _all_finite(list(inputs) + list(getattr(inputs, "kwargs", {}).values())):
        return "the batch's inputs have NaN/Inf values"
    found = []

    def hook(name):
        def check(module, args, out):
            if not found and not _all_finite(out):
                found.append(f"layer {name!r} ({type(module).__name__})")
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            out = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    if found:
        return f"the first non-finite output is that of {found[0]}"
    if not _all_finite(out):
        return "the model's output is not finite"
    return "the model's output is finite: loss_fn made the NaN/Inf (or it came from the target)"


def distill_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The distillation term: ``"kl"`` = T^2 KL(softmax(t/T) || softmax(s/T)) over the last
    axis (batch mean), ``"mse"``, or ``"cosine"`` = mean(1 - cos(s, t)) along the last axis."""
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError(f"distillation needs tensor outputs, got student {_describe(student)} and teacher "
                        f"{_describe(teacher)}")
    if student.shape != teacher.shape:
        raise ValueError(f"distillation: student output {list(student.shape)} and teacher output "
                         f"{list(teacher.shape)} differ in shape")
    s, t = student.float(), teacher.detach().float()
    if kind == "kl":
        ls, lt = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
        return nn.functional.kl_div(ls.reshape(-1, s.shape[-1]), lt.reshape(-1, s.shape[-1]), log_target=True,
                                    reduction="batchmean") * temperature**2
    if kind == "mse":
        return nn.functional.mse_loss(s, t)
    if kind == "cosine":
        return (1 - nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"distill must be one of {DISTILL_LOSSES}, got {kind!r}")


def _lr_factor(cfg: QATConfig, step: int, total: Optional[int]) -> float:
    """Multiplier of the peak learning rates at ``step`` (0-based) of ``total`` (None: unknown yet)."""
    if cfg.schedule == "constant" or not total:  # total unknown: the first epoch runs at the peak
        return 1.0
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1)))


def _rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's value of ``flag`` on every rank (itself when not distributed); ``device``: where
    the process group's tensors live (the model's device: CUDA under nccl)."""
    if not _distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    torch.distributed.broadcast(t, 0)
    return bool(t.item())


def train_qat(
    model: nn.Module,
    batches: Callable[[int], Iterable[Tuple[tuple, torch.Tensor]]],
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    config: Optional[QATConfig] = None,
    calib_data: Optional[Iterable] = None,
    log: Optional[Callable[[str], None]] = None,
    teacher: Optional[nn.Module] = None,
    val_fn: Optional[Callable[[nn.Module], float]] = None,
    *,
    input_fn: Optional[Callable] = None,
) -> nn.Module:
    """Train a :func:`prepare_qat` model in place.

    batches(epoch) yields ``(inputs tuple, target)``; under torch.distributed each rank
    yields its own shard. ``batches`` may also be the iterable itself (a list of pairs, a
    DataLoader), used every epoch; inputs may be one tensor, a tuple of positional inputs or a
    dict of keyword inputs. calib_data: batches for re-assignment (``reassign_every``), as
    :func:`tvm_rmsmp.quantize` takes them (``input_fn`` picks the model inputs from each). teacher: the float model for ``config.distill``
    (run in eval mode on the same inputs). val_fn: ``model -> score`` (higher is better, e.g.
    accuracy on a validation split), called on the model in eval mode before training and
    after every epoch; the best state is kept (ties keep the earlier one) and the scores are
    in ``model.rmsmp_report["qat_val"]``.

    Raises TypeError for a batch that is no (inputs, target) pair, FloatingPointError as soon
    as the loss is NaN/Inf (naming the step and the first layer whose output was not finite)
    and ValueError for an epoch without batches.
    """
    cfg = config if config is not None else QATConfig()
    if not qat_layers(model):
        raise ValueError("model has no FakeQuantLayer: call prepare_qat first")
    if cfg.reassign_every is not None and calib_data is None:
        raise ValueError("reassign_every needs calib_data (input batches for the re-assignment statistics)")
    if cfg.distill is not None and teacher is None:
        raise ValueError(f"QATConfig(distill={cfg.distill!r}) needs the float model: train_qat(..., teacher=model)")
    if loss_fn is None and not (cfg.distill is not None and cfg.distill_weight == 1):
        raise ValueError("loss_fn is required unless the loss is all distillation (distill set, distill_weight=1)")
    for layer in qat_layers(model).values():
        layer.use_scale_param(cfg.scale_param)
    scales = [p for n, p in model.named_parameters() if n.endswith(("row_scale_param", "act_scale_param"))]
    ids = {id(p) for p in scales}
    weights = [p for n, p in model.named_parameters() if id(p) not in ids and n.endswith("weight")]
    others = [p for p in model.parameters() if id(p) not in ids and all(p is not w for w in weights)]
    opt = torch.optim.Adam([
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": others, "lr": cfg.lr},
        {"params": scales, "lr": cfg.scale_lr},
    ])
    peaks = [g["lr"] for g in opt.param_groups]
    dist = _distributed()
    if dist:
        _sync_from_rank0(model)
    if teacher is not None:
        teacher.eval()
    net = nn.parallel.DistributedDataParallel(model) if dist else model
    report = model.rmsmp_report
    def snapshot(score: float, epoch: int):
        return score, epoch, copy.deepcopy(model.state_dict()), [l.schemes for l in qat_layers(model).values()]

    best = None
    if val_fn is not None:
        report["qat_val"] = [float(val_fn(model.eval()))]
        best = snapshot(report["qat_val"][0], 0)
    total, step = None, 0
    for epoch in range(cfg.epochs):
        net.train()
        t0, steps, loss_sum = time.perf_counter(), 0, 0.0
        epoch_batches = _epoch_batches(batches, epoch, cfg.epochs)
        if total is None:
            src = epoch_batches if callable(batches) and not isinstance(batches, nn.Module) else batches
            try:
                total = len(src) * cfg.epochs
            except TypeError:
                total = cfg.steps_per_epoch * cfg.epochs if cfg.steps_per_epoch else None
        bar = progress(desc=f"QAT epoch {epoch + 1}/{cfg.epochs}", total=total // cfg.epochs if total else None,
                       unit="step")
        for batch in epoch_batches:
            inputs, target = _step_batch(batch, epoch, steps)
            for group, peak in zip(opt.param_groups, peaks):
                group["lr"] = peak * _lr_factor(cfg, step, total)
            out = call_model(net, inputs)
            loss = None
            if cfg.distill is None or cfg.distill_weight < 1:
                loss = loss_fn(out, target)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError(f"train_qat: loss_fn must return a scalar tensor, got {_describe(loss)} at "
                                    f"epoch {epoch + 1}, step {steps + 1}")
            if cfg.distill is not None:
                with torch.no_grad():
                    ref = call_model(teacher, inputs)
                kd = distill_loss(cfg.distill, out, ref, cfg.temperature)
                loss = kd if loss is None else (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd
            if not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(
                    f"train_qat: the loss is {float(loss.detach())} at epoch {epoch + 1}, step {steps + 1}: "
                    f"{_first_nonfinite(model, inputs)}; the weights are those before this step "
                    "(try a lower lr or scale_lr, or check the data)"
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            step += 1
            loss_sum += float(loss.detach())
            bar.update()
            bar.set_postfix_str(f"loss {loss_sum / steps:.4f}", refresh=False)
        bar.close()
        if steps == 0:
            raise ValueError(
                f"train_qat: epoch {epoch + 1} has no batches (0 steps trained"
                + (f", {epoch} epoch(s) done" if epoch else "")
                + "); give batches that yield (inputs, target) pairs every epoch"
                + (" (an iterator or generator is used up after one epoch)" if epoch else "")
            )
        if total is None:
            total = steps * cfg.epochs  # counted: the cosine decay starts with the second epoch
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
        if bad:
            raise FloatingPointError(f"train_qat: after epoch {epoch + 1}, parameters {bad[:8]} have NaN/Inf "
                                     "values (a non-finite gradient); try a lower lr or scale_lr")
        msg = (f"QAT epoch {epoch + 1}/{cfg.epochs}: {steps} steps, mean loss {loss_sum / max(steps, 1):.4f}, "
               f"{time.perf_counter() - t0:.0f}s")
        if cfg.reassign_every is not None and (epoch + 1) % cfg.reassign_every == 0 and epoch + 1 < cfg.epochs:
            if not dist or torch.distributed.get_rank() == 0:
                moved = reassign_rows(model, calib_data, input_fn)
                msg += f"; re-assigned {moved} rows"
            if dist:
                _sync_from_rank0(model)
            opt.state.clear()  # moments of scales whose rows changed scheme are stale
        if val_fn is not None:
            score = float(val_fn(model.eval()))
            report["qat_val"].append(score)
            msg += f"; validation {score:.4f}"
            if _rank0_decides(score > best[0], next(model.parameters()).device):
                best = snapshot(score, epoch + 1)
        if log is not None:
            log(msg)
    if best is not None:
        report["qat_best_epoch"] = best[1]
        if best[1] != cfg.epochs:
            for layer, schemes in zip(qat_layers(model).values(), best[3]):
                layer.set_schemes(schemes)
            model.load_state_dict(best[2])
            if log is not None:
                log(f"kept epoch {best[1]} (validation {best[0]:.4f})")
    return model.eval()


def convert_qat(model: nn.Module) -> nn.Module:
    """The integer-exact RMSMP model (as :func:`tvm_rmsmp.quantize` returns) from a QAT model."""
    layers = qat_layers(model)
    if not layers:
        raise ValueError("model has no FakeQuantLayer: nothing to convert")
    q = copy.deepcopy(model).eval()
    for name, layer in qat_layers(q).items():
        _set_submodule(q, name, layer.to_rmsmp())
    for p in q.parameters():
        p.requires_grad_(False)
    q.rmsmp_config = model.rmsmp_config
    q.rmsmp_report = dict(model.rmsmp_report)
    return q

