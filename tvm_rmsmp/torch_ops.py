"""The integer reference computation of RMSMP layers, as PyTorch custom ops.

``rmsmp::qlinear`` and ``rmsmp::qconv2d`` are what a quantized model's layers call in eval
mode. Their arithmetic is the contract every target must meet bit for bit:

1. ``x_q = clamp(round_half_even(x * inv_act_scale), qmin, qmax)``  (float32 multiply)
2. ``acc = sum_k x_q * w_int``                                      (exact integers, int32 range)
3. ``y = float32(acc + bias_int) * out_scale``                      (one int->float rounding, one multiply)

Step 2 runs in float32 when no partial sum can reach 2^24 (``fan_in * max|x_q| * max|w_int|``
below it: every partial sum is then an exactly representable integer, in any order) and in
float64 otherwise (exact below 2^53), so the result never depends on summation order. Step 3 has no add after the multiply, so no target can contract it
into a fused multiply-add and round differently. ``torch.export`` keeps each call as one node,
which the TVM importer turns into a quantized op (see :mod:`tvm_rmsmp.frontend`).
"""

from __future__ import annotations

from typing import List

import torch

__all__ = ["quantize_activation", "qlinear", "qconv2d"]


def quantize_activation(x: torch.Tensor, inv_scale: float, qmin: int, qmax: int) -> torch.Tensor:
    """Integer-valued float32 tensor ``clamp(round(x * inv_scale), qmin, qmax)``."""
    inv = torch.tensor(inv_scale, dtype=torch.float32)
    return torch.clamp(torch.round(x.to(torch.float32) * inv), qmin, qmax)


def _exact_dtype(weight_int: torch.Tensor, qmin: int, qmax: int) -> torch.dtype:
    """The cheapest float type in which the integer dot products are exact."""
    fan_in = weight_int[0].numel() if weight_int.shape[0] else 0
    w_max = int(weight_int.abs().max()) if weight_int.numel() else 0
    return torch.float32 if fan_in * w_max * max(abs(qmin), abs(qmax)) < 2**24 else torch.float64


def _epilogue(acc: torch.Tensor, bias_int: torch.Tensor, out_scale: torch.Tensor, channel_axis: int) -> torch.Tensor:
    shape = [1] * acc.dim()
    shape[channel_axis] = -1
    total = acc + bias_int.to(torch.float64).reshape(shape)
    return total.to(torch.float32) * out_scale.reshape(shape)


@torch.library.custom_op("rmsmp::qlinear", mutates_args=())
def qlinear(
    x: torch.Tensor,
    weight_int: torch.Tensor,
    bias_int: torch.Tensor,
    out_scale: torch.Tensor,
    inv_act_scale: float,
    qmin: int,
    qmax: int,
    layer: str,
) -> torch.Tensor:
    dtype = _exact_dtype(weight_int, qmin, qmax)
    xq = quantize_activation(x, inv_act_scale, qmin, qmax).to(dtype)
    acc = torch.matmul(xq, weight_int.to(dtype).t()).to(torch.float64)
    return _epilogue(acc, bias_int, out_scale, acc.dim() - 1)


@qlinear.register_fake
def _(x, weight_int, bias_int, out_scale, inv_act_scale, qmin, qmax, layer):
    return x.new_empty(tuple(x.shape[:-1]) + (weight_int.shape[0],), dtype=torch.float32)


@torch.library.custom_op("rmsmp::qconv2d", mutates_args=())
def qconv2d(
    x: torch.Tensor,
    weight_int: torch.Tensor,
    bias_int: torch.Tensor,
    out_scale: torch.Tensor,
    inv_act_scale: float,
    qmin: int,
    qmax: int,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    layer: str,
) -> torch.Tensor:
    dtype = _exact_dtype(weight_int, qmin, qmax)
    xq = quantize_activation(x, inv_act_scale, qmin, qmax).to(dtype)
    acc = torch.nn.functional.conv2d(xq, weight_int.to(dtype), None, stride, padding, dilation).to(torch.float64)
    return _epilogue(acc, bias_int, out_scale, 1)


def conv2d_output_hw(h: int, w: int, kernel, stride, padding, dilation):
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return oh, ow


@qconv2d.register_fake
def _(x, weight_int, bias_int, out_scale, inv_act_scale, qmin, qmax, stride, padding, dilation, layer):
    oh, ow = conv2d_output_hw(x.shape[2], x.shape[3], weight_int.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight_int.shape[0], oh, ow), dtype=torch.float32)
