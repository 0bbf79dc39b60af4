"""Row sensitivities from the loss Hessian (Hutchinson's estimator), plain PyTorch.

For every quantized layer and every output row ``r`` we estimate ``Tr(H_r)``, the trace of
the diagonal block of the Hessian of a calibration loss with respect to that row's weights.
Hutchinson's estimator does it for all rows of all layers at once: for a Rademacher probe
``v`` over all quantized weights, ``E[v * (H v)]`` is the Hessian's diagonal, so summing
``v * Hv`` over a row's weights is an unbiased estimate of the row's block trace. Each probe
costs one Hessian-vector product (a double backward pass). A power iteration would give a
top eigenvalue per block instead, but one per row would need thousands of separate
iterations; the trace is what HAWQ-V2 showed ranks sensitivity well.

The loss needs no labels: it compares the model's output with its own detached output
(``mse``: ``0.5 * ||f(x) - f0||^2``; ``kl``: ``KL(softmax f0 || softmax f)`` for classifiers).
Its gradient is zero at the float weights and its Hessian is the Gauss-Newton matrix
``J^T J`` (``J^T diag(p) - pp^T J`` for ``kl``), positive semi-definite, so the estimates are
meaningful without training labels.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Sequence, Tuple

import attrs
import numpy as np
import torch
from torch import nn

from ..quant.progress import progress
from .inputs import call_model

__all__ = ["HessianReport", "row_hessian_traces", "output_loss", "MIN_SAMPLES"]

#: Fewer calibration samples than this give too noisy a Hessian estimate to rank rows.
MIN_SAMPLES = 16


@attrs.frozen
class HessianReport:
    """What the estimate cost: probes, batches, samples and seconds."""

    probes: int
    batches: int
    samples: int
    seconds: float


def output_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A label-free loss of output ``y`` against the float model's detached output ``y0``."""
    if kind == "mse":
        return lambda y, y0: 0.5 * ((y - y0) ** 2).sum() / y.shape[0]
    if kind == "kl":
        def kl(y, y0):
            p0 = y0.softmax(-1)
            return (p0 * (y0.log_softmax(-1) - y.log_softmax(-1))).sum() / y.shape[0]

        return kl
    raise ValueError(f"unknown Hessian loss {kind!r}; use 'mse' or 'kl'")


def _output_tensor(out) -> torch.Tensor:
    """The output the loss compares: the tensor itself, or the first tensor of a tuple/list,
    or of a dict's values in key order (e.g. ``{"logits": ..., "hidden": ...}``), nested ones
    included."""
    found = _first_tensor(out)
    if found is None:
        raise TypeError(
            "the Hessian estimate (assign rules 'hessian*') needs the model's output to be a tensor, or a "
            f"tuple/list/dict of tensors (its first tensor is used), got {_describe(out)}; return tensors "
            "from forward or use assign='variance'"
        )
    if not found.is_floating_point():
        raise TypeError(f"the Hessian estimate needs a floating-point output tensor, got dtype {found.dtype}")
    return found


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _describe(out) -> str:
    if isinstance(out, dict):
        return f"a {type(out).__name__} with keys {list(out)[:8]} and no tensor value"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {[type(o).__name__ for o in out][:8]}"
    return f"a {type(out).__name__}"


def row_hessian_traces(
    model: nn.Module,
    layers: Dict[str, nn.Module],
    batches: Sequence[Tuple[torch.Tensor, ...]],
    probes: int = 8,
    loss: str = "mse",
    seed: int = 0,
) -> Tuple[Dict[str, np.ndarray], HessianReport]:
    """``{layer: per-row Hessian block trace estimate}`` (float64, >= 0) and the cost report.

    ``layers`` are modules of ``model`` with a ``weight`` whose axis 0 is the output row.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    names = list(layers)
    params = [layers[n].weight for n in names]
    loss_fn = output_loss(loss)
    gen = torch.Generator().manual_seed(seed)
    sums = [torch.zeros(p.shape[0], dtype=torch.float64, device=p.device) for p in params]
    t0 = time.perf_counter()
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    samples = 0
    try:
        with torch.enable_grad():
            for batch in progress(batches, f"Hessian ({probes} probes)", unit="batch"):
                with torch.no_grad():
                    y0 = _output_tensor(call_model(model, batch)).detach()
                samples += y0.shape[0]
                y = _output_tensor(call_model(model, batch))
                grads = torch.autograd.grad(loss_fn(y, y0), params, create_graph=True)
                for i in range(probes):
                    # probes drawn on the CPU (the same for every device), used on the weight's device
                    vs = [torch.randint(0, 2, p.shape, generator=gen).to(device=p.device, dtype=p.dtype) * 2 - 1
                          for p in params]
                    hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=i < probes - 1)
                    for s, v, h in zip(sums, vs, hv):
                        s += (v * h).reshape(v.shape[0], -1).sum(1).double()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    scale = 1.0 / (probes * max(len(batches), 1))
    traces = {n: np.maximum(s.numpy() * scale, 0.0) for n, s in zip(names, sums)}
    return traces, HessianReport(probes=probes, batches=len(batches), samples=samples,
                                 seconds=time.perf_counter() - t0)

