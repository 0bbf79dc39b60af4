"""Calibration batches as they come: tensors, tuples, dicts (a tokenizer's output), DataLoaders.

Every batch of ``calib_data`` becomes one :class:`ModelInputs`: the model's positional inputs
(it is a tuple of them) and its keyword inputs (``.kwargs``). ``input_fn`` picks the model
inputs from a batch first (``input_fn=lambda b: b[0]`` for a DataLoader yielding ``(x, y)``).
A batch that is

- a tensor or numpy array: the one positional input;
- a tuple or list: the positional inputs;
- a mapping (``dict``, a Hugging Face ``BatchEncoding``): the keyword inputs.

numpy arrays become tensors. Before the model runs, each batch is bound to the signature of
the model's ``forward``, so a DataLoader's ``(x, y)`` given to a one-input model is an error
that names the batch and what it holds, not labels silently passed as a second input.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["ModelInputs", "call_model", "model_inputs", "collect_batches", "describe"]


class ModelInputs(tuple):
    """One batch's model inputs: the positional ones (this tuple) and the keyword ones (``kwargs``).

    A tuple so that code written for tuples of inputs (``model(*batch)``) keeps working for
    positional batches; :func:`call_model` passes both."""

    kwargs: Dict[str, Any]

    def __new__(cls, args=(), kwargs: Optional[Dict[str, Any]] = None):
        obj = super().__new__(cls, tuple(args))
        obj.kwargs = dict(kwargs or {})
        return obj

    def __getnewargs__(self):
        return (tuple(self), self.kwargs)

    def tensors(self) -> List[torch.Tensor]:
        """The tensor inputs, positional first."""
        return [v for v in list(self) + list(self.kwargs.values()) if isinstance(v, torch.Tensor)]

    def items(self):
        """``(where, value)`` for every input: ``"input 0"``, ``"input 'attention_mask'"``."""
        return [(f"input {i}", v) for i, v in enumerate(self)] + [(f"input {k!r}", v) for k, v in self.kwargs.items()]

    def to(self, device) -> "ModelInputs":
        move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
        return ModelInputs([move(v) for v in self], {k: move(v) for k, v in self.kwargs.items()})


def call_model(model: nn.Module, inputs) -> Any:
    """``model(*inputs, **inputs.kwargs)`` (a plain tuple: no keyword inputs)."""
    return model(*inputs, **getattr(inputs, "kwargs", {}))


def describe(value) -> str:
    """A short description of a batch for error messages: types and shapes."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, np.ndarray):
        return f"ndarray{list(value.shape)} {value.dtype}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in list(value.items())[:6]) + \
            (", ..." if len(value) > 6 else "") + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in list(value)[:6]) + (", ..." if len(value) > 6 else "")
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return type(value).__name__


def _tensor(v):
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


def model_inputs(batch, index: int, input_fn: Optional[Callable] = None, where: str = "calib_data") -> ModelInputs:
    """The :class:`ModelInputs` of one batch (``input_fn`` applied first); TypeError naming the
    batch for anything that is not a tensor, array, tuple, list or mapping."""
    if input_fn is not None:
        try:
            batch = input_fn(batch)
        except Exception as err:
            raise ValueError(f"{where} batch {index}: input_fn failed on {describe(batch)} "
                             f"({type(err).__name__}: {err})") from err
    if isinstance(batch, ModelInputs):
        return batch
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return ModelInputs((_tensor(batch),))
    if isinstance(batch, (tuple, list)):
        return ModelInputs([_tensor(v) for v in batch])
    if isinstance(batch, Mapping):
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where} batch {index}: a dict batch holds keyword inputs, its keys must be strings, "
                            f"got {bad[:4]}")
        return ModelInputs((), {k: _tensor(v) for k, v in batch.items()})
    raise TypeError(f"{where} batch {index} must be a tensor, an array, a tuple/list of inputs or a dict of keyword "
                    f"inputs, got {describe(batch)}" + ("" if input_fn else "; pass input_fn to pick the model inputs "
                                                        "from your batches"))


def _check_signature(model: nn.Module, inputs: ModelInputs, index: int, where: str, input_fn) -> None:
    """A ValueError naming the batch where it cannot bind to ``model.forward``'s parameters."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*inputs, **inputs.kwargs)
    except TypeError as err:
        params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        names = ", ".join(p.name for p in params)
        got = describe(tuple(inputs)) if not inputs.kwargs else describe({**dict(enumerate(inputs)), **inputs.kwargs})
        hint = ""
        if input_fn is None and len(inputs) == 2 and not inputs.kwargs:
            hint = ("; a DataLoader yielding (inputs, labels) needs input_fn to pick the inputs: "
                    "input_fn=lambda b: b[0]")
        elif input_fn is None:
            hint = "; pass input_fn to pick the model inputs from each batch"
        raise ValueError(f"{where} batch {index} does not match {type(model).__name__}.forward({names}): "
                         f"it gives {len(inputs)} positional and {len(inputs.kwargs)} keyword input(s) {got} "
                         f"({err}){hint}") from None


def collect_batches(calib_data: Iterable, model: Optional[nn.Module] = None, input_fn: Optional[Callable] = None,
                    where: str = "calib_data") -> List[ModelInputs]:
    """All batches of ``calib_data`` (any iterable: a list, a generator, a DataLoader) as
    :class:`ModelInputs`, each checked against ``model.forward``'s signature."""
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"input_fn must be a callable batch -> model inputs, got {type(input_fn).__name__}")
    if isinstance(calib_data, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{where} must be an iterable of batches (e.g. [x0, x1] or a DataLoader), got one "
                        f"{type(calib_data).__name__}: wrap a single batch in a list, [x]")
    try:
        it = iter(calib_data)
    except TypeError:
        raise TypeError(f"{where} must be an iterable of batches (a list, a DataLoader), got "
                        f"{type(calib_data).__name__}") from None
    out = []
    for i, batch in enumerate(it):
        inputs = model_inputs(batch, i, input_fn, where)
        if model is not None:
            _check_signature(model, inputs, i, where, input_fn)
        out.append(inputs)
    return out
