"""Structured pruning of a torch model, composed with RMSMP (issue 20).

    pcfg = rmsmp.PruneConfig(scheme="block_punched", sparsity=0.75, block=(16, 4))
    pm = rmsmp.prune(model, pcfg, calib_data=[x0, x1])      # new module, pruned weights exact zeros
    masks = rmsmp.prune_masks(pm)                            # {layer: bool mask}, True = kept
    q = rmsmp.quantize(pm, cfg, calib_data=[x0, x1])         # the zeros and masks carried over
    exe = rmsmp.compile(q, (x,), target="llvm")              # block-sparse kernels: exe.stats["sparse"]

Each pruned ``nn.Linear`` / ``nn.Conv2d`` holds its mask as the buffer :data:`MASK` (bool,
the weight's shape). The mask geometry is in :mod:`tvm_rmsmp.quant.sparsity`. Importance:
``"magnitude"`` (``w^2``) or ``"activation"`` (``(|w| * rms(x_c))^2`` with the input
channel's RMS over ``calib_data``: the weight's share of the layer's output energy, the
diagonal-Hessian (OBS) saliency of a layer-wise squared error). With ``train_fn``, pruning is
gradual: ``steps`` rounds on the cubic schedule of Zhu & Gupta, each pruning to its rate
(masks only grow), calling ``train_fn(pm)`` with the pruned weights' gradients masked, and
zeroing the pruned weights again after it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import attrs
import numpy as np
import torch
from torch import nn

from ..quant.config import RMSMPWarning, skip_matcher
from ..quant.sparsity import SCHEMES, block_punched_mask, block_row_mask, divides, gradual_rates, pattern_mask

__all__ = ["PruneConfig", "prune", "prune_masks", "apply_masks", "MASK", "IMPORTANCES", "prunable_layers"]

#: The buffer holding a pruned layer's mask (True = kept).
MASK = "prune_mask"
IMPORTANCES = ("magnitude", "activation")


def _rate(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{what} = {value!r} is outside [0, 1)")
    return v


def _block(value) -> Tuple[int, int]:
    try:
        b = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"block must be (rows, cols) of positive ints, got {value!r}") from None
    if len(b) != 2 or min(b) < 1 or any(int(v) != v for v in value):
        raise ValueError(f"block must be (rows, cols) of positive ints, got {value!r}")
    return b


@attrs.frozen
class PruneConfig:
    """What to prune and how (validated on construction).

    scheme: ``"block_punched"`` | ``"pattern"`` | ``"block_row"``; sparsity: the share of
    weights removed per layer, in [0, 1); block: ``(rows, cols)`` (rows of the output x input
    channels; ``block_row``: x flattened columns); layer_sparsity: ``{layer: rate}`` overriding
    ``sparsity``; skip: layers (or their parents) left dense; importance: ``"magnitude"`` |
    ``"activation"`` (needs ``calib_data``); patterns: size of the pattern set (``pattern``,
    1..8); steps: rounds of gradual pruning when a ``train_fn`` is given."""

    scheme: str = attrs.field(default="block_punched")
    sparsity: float = attrs.field(default=0.5, converter=lambda v: _rate(v, "sparsity"))
    block: Tuple[int, int] = attrs.field(default=(16, 4), converter=_block)
    layer_sparsity: Dict[str, float] = attrs.field(factory=dict)
    skip: Tuple[str, ...] = attrs.field(default=(), converter=tuple)
    importance: str = attrs.field(default="magnitude")
    patterns: int = attrs.field(default=8)
    steps: int = attrs.field(default=4)

    @scheme.validator
    def _check_scheme(self, attribute, value):
        if value not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {value!r}")

    @layer_sparsity.validator
    def _check_layers(self, attribute, value):
        if not isinstance(value, dict):
            raise ValueError(f"layer_sparsity must be a dict of layer name -> rate, got {value!r}")
        for k, v in value.items():
            _rate(v, f"layer_sparsity[{k!r}]")

    @importance.validator
    def _check_importance(self, attribute, value):
        if value not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {value!r}")

    @patterns.validator
    def _check_patterns(self, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
            raise ValueError(f"patterns must be an int in 1..8, got {value!r}")

    @steps.validator
    def _check_steps(self, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"steps must be a positive int, got {value!r}")

    def rate_for(self, name: str) -> float:
        return float(self.layer_sparsity.get(name, self.sparsity))


def prunable_layers(model: nn.Module, pcfg: Optional[PruneConfig] = None) -> Dict[str, nn.Module]:
    """``{name: module}``: the Linear and (groups=1) Conv2d layers pruning would touch."""
    out = {}
    skipped = skip_matcher(pcfg.skip if pcfg is not None else ())
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            if not skipped(name):
                out[name] = m
    return out


def _input_rms(model: nn.Module, layers: Dict[str, nn.Module], calib_data: Iterable) -> Dict[str, np.ndarray]:
    """Per input channel, the RMS of each layer's input over ``calib_data``."""
    sums: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {}

    def hook(name):
        def fn(module, inputs):
            x = inputs[0].detach().to(torch.float64)
            ax = 1 if isinstance(module, nn.Conv2d) else x.dim() - 1
            xc = x.movedim(ax, -1).reshape(-1, x.shape[ax])
            sums[name] = sums.get(name, 0) + (xc ** 2).sum(0).cpu().numpy()
            counts[name] = counts.get(name, 0) + xc.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in calib_data:
                model(*_as_tuple(b))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in layers if n not in sums]
    if missing:  # e.g. nn.MultiheadAttention's out_proj, whose weight is used without calling it
        warnings.warn(f"importance='activation': calibration never called layers {missing}; their importance is "
                      "the weight magnitude", RMSMPWarning, stacklevel=4)
    return {n: np.sqrt(sums[n] / max(counts[n], 1)) for n in layers if n in sums}


def _as_tuple(batch) -> tuple:
    if isinstance(batch, np.ndarray):
        return (torch.from_numpy(batch),)
    if isinstance(batch, (tuple, list)):
        return tuple(torch.from_numpy(b) if isinstance(b, np.ndarray) else b for b in batch)
    return (batch,)


def _score(mod: nn.Module, rms: Optional[np.ndarray]) -> np.ndarray:
    w = mod.weight.detach().to(torch.float64).cpu().numpy()
    if rms is None:
        return w ** 2
    shape = (1, -1) + (1,) * (w.ndim - 2)
    return (np.abs(w) * rms.reshape(shape)) ** 2


def _layer_mask(name: str, mod: nn.Module, pcfg: PruneConfig, rate: float, rms) -> np.ndarray:
    score = _score(mod, rms)
    scheme, block = pcfg.scheme, pcfg.block
    if scheme == "pattern":
        if isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (3, 3):
            if rate < 5.0 / 9.0:
                warnings.warn(f"layer {name!r}: pattern pruning keeps at most 4 of 9 weights, so its sparsity is "
                              f"5/9 = 0.556, above the {rate:.3g} asked", RMSMPWarning, stacklevel=4)
            return pattern_mask(score, rate, pcfg.patterns)[0]
        warnings.warn(f"layer {name!r} is not a 3x3 convolution: pattern pruning falls back to block_row "
                      f"(blocks of {block[0]} rows x {block[1]} columns)", RMSMPWarning, stacklevel=4)
        scheme = "block_row"
    if not divides(score.shape, block, flat=scheme == "block_row"):
        warnings.warn(f"layer {name!r} (weight {list(score.shape)}): block {block} does not divide it; the edge "
                      "blocks are smaller (padded) and are pruned whole like the others", RMSMPWarning, stacklevel=4)
    if scheme == "block_row":
        return block_row_mask(score, block, rate)
    return block_punched_mask(score, block, rate)


def _check_names(model: nn.Module, pcfg: PruneConfig, layers: Dict[str, nn.Module]) -> None:
    names = {n for n, _ in model.named_modules() if n}
    bad_skip = [n for n in pcfg.skip if n not in names]
    if bad_skip:
        raise ValueError(f"PruneConfig.skip names modules the model does not have: {bad_skip}")
    bad = [n for n in pcfg.layer_sparsity if n not in layers]
    if bad:
        raise ValueError(f"PruneConfig.layer_sparsity names layers that are not prunable (Linear / Conv2d, not "
                         f"skipped): {bad}; prunable: {sorted(layers)[:12]}")


def _set_masks(layers: Dict[str, nn.Module], masks: Dict[str, np.ndarray]) -> None:
    for name, m in layers.items():
        mask = torch.from_numpy(np.ascontiguousarray(masks[name])).to(m.weight.device)
        if hasattr(m, MASK) and getattr(m, MASK) is not None:
            mask = mask & getattr(m, MASK)  # masks only grow
        if MASK in m._buffers:
            m._buffers[MASK] = mask
        else:
            m.register_buffer(MASK, mask)
        with torch.no_grad():
            m.weight.mul_(mask.to(m.weight.dtype))


def _mask_grads(layers: Dict[str, nn.Module]):
    return [m.weight.register_hook(lambda g, mk=getattr(m, MASK): g * mk.to(g.dtype)) for m in layers.values()]


def prune(model: nn.Module, pcfg: Optional[PruneConfig] = None, calib_data: Optional[Iterable] = None,
          train_fn: Optional[Callable[[nn.Module], None]] = None, steps: Optional[int] = None) -> nn.Module:
    """A pruned copy of ``model`` (the input is left as it is): pruned weights exact zeros, each
    pruned layer's mask in buffer :data:`MASK`. One-shot without ``train_fn``; with it, gradual
    over ``steps`` (default ``pcfg.steps``) rounds, ``train_fn(pm)`` training in place between
    them (pruned weights' gradients masked, weights zeroed again after each round)."""
    pcfg = pcfg if pcfg is not None else PruneConfig()
    if not isinstance(pcfg, PruneConfig):
        raise TypeError(f"pcfg must be a PruneConfig, got {type(pcfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "rmsmp_config", None) is not None or any(
            getattr(m, "rmsmp_quantized_layer", False) for m in model.modules()):
        raise ValueError("prune the float model, then quantize it: this model is already quantized")
    if pcfg.importance == "activation" and calib_data is None:
        raise ValueError("importance='activation' needs calib_data (the layers' input RMS weights the importance)")
    if train_fn is not None and not callable(train_fn):
        raise TypeError(f"train_fn must be callable (train_fn(model) trains it in place), got {train_fn!r}")
    calib = None if calib_data is None else list(calib_data)
    pm = copy.deepcopy(model)
    layers = prunable_layers(pm, pcfg)
    _check_names(pm, pcfg, layers)
    n_steps = (pcfg.steps if steps is None else int(steps)) if train_fn is not None else 1
    if n_steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    for t in range(n_steps):
        rms = _input_rms(pm, layers, calib) if pcfg.importance == "activation" else {}
        masks = {}
        for name, mod in layers.items():
            rate = pcfg.rate_for(name)
            rate_t = rate if train_fn is None else float(gradual_rates(rate, n_steps)[t])
            masks[name] = _layer_mask(name, mod, pcfg, rate_t, rms.get(name))
        _set_masks(layers, masks)
        if train_fn is not None:
            handles = _mask_grads(layers)
            try:
                train_fn(pm)
            finally:
                for h in handles:
                    h.remove()
            apply_masks(pm)
    pm.rmsmp_prune_config = pcfg
    return pm


def apply_masks(pm: nn.Module) -> nn.Module:
    """Zero the pruned weights of ``pm`` again (after training that ignored the masks); in place."""
    for m in pm.modules():
        mask = getattr(m, MASK, None)
        if isinstance(mask, torch.Tensor) and hasattr(m, "weight"):
            with torch.no_grad():
                m.weight.mul_(mask.to(m.weight.dtype))
    return pm


def check_layer(name: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise if ``mask`` does not fit ``weight`` or a pruned weight is not zero (naming the layer)."""
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"layer {name!r}: its prune mask has shape {list(mask.shape)}, the weight "
                         f"{list(weight.shape)} (edited after pruning?)")
    bad = int(torch.count_nonzero(weight.detach()[~mask.bool()]))
    if bad:
        raise ValueError(f"layer {name!r}: {bad} pruned weights are no longer zero (trained without the masks, or "
                         "edited); call rmsmp.apply_masks(model) to zero them again, or prune again")


def prune_masks(pm: nn.Module, check: bool = True) -> Dict[str, np.ndarray]:
    """``{layer: bool mask}`` (True = kept) of a pruned model (float, quantized or QAT); with
    ``check``, raises naming the layer where a pruned weight is no longer zero."""
    out = {}
    for name, m in pm.named_modules():
        mask = getattr(m, MASK, None)
        if not isinstance(mask, torch.Tensor):
            continue
        name = getattr(m, "layer_name", name)
        w = m.weight_int if hasattr(m, "weight_int") else getattr(m, "weight", None)
        if check and isinstance(w, torch.Tensor):
            check_layer(name, w, mask)
        out[name] = mask.detach().cpu().numpy().astype(bool)
    return out
