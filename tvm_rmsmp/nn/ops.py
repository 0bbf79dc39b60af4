"""The integer reference computation of RMSMP layers, as PyTorch custom ops.

``rmsmp::qlinear`` and ``rmsmp::qconv2d`` are what a quantized model's layers call in eval
mode. Their arithmetic is the contract every target must meet bit for bit:

1. ``x_q = clamp(round_half_even(x * inv_act_scale), qmin, qmax)``  (float32 multiply)
2. ``acc = sum_k x_q * w_int``                                      (exact integers, int32 range)
3. ``y = float32(acc + bias_int) * out_scale``                      (one int->float rounding, one multiply)

Step 2 runs in float32 when no partial sum can reach 2^24 (``fan_in * max|x_q| * max|w_int|``
below it: every partial sum is then an exactly representable integer, in any order). Wider
weights (8-bit rows) are split into balanced base-16 digits ``w = sum_d 16^d w_d`` with
``|w_d| <= 8``, each digit's product computed in float32 (one call, digits stacked as extra
output rows) and the digits combined in float64: exact, and several times faster on CPUs than
a float64 convolution (small inputs, where it is not, run in float64). Only when even a digit
could overflow does it always run in float64 (exact below 2^53). The result never depends on
summation order. Step 3 has no add after the multiply, so no target can contract it into a
fused multiply-add and round differently. ``torch.export`` keeps each call as one node,
which the TVM importer turns into a quantized op (see :mod:`tvm_rmsmp.compiler.frontend`).

Two activation forms for dense layers change step 1 (and, per token, step 3); the integer
product and every kernel stay as they are:

* ``rmsmp::qlinear_asym``, asymmetric per-tensor:
  ``x_q = clamp(round_half_even(x * inv_act_scale) + zp, 0, 2^bits - 1)`` (float32 multiply,
  the integer ``zp`` added as float32, then the clamp), unsigned. The layer folds the zero
  point into its integer bias, ``bias_int = round(b / acc_scale) - zp * sum_k w_int[n, k]``,
  so step 2 and 3 read exactly as above.
* ``rmsmp::qlinear_per_token``, symmetric with one power-of-two scale per token ``t`` (a row
  of ``x``, leading axes flattened): ``amax_t = max_k |x[t, k]|`` (float32), ``E_t`` its
  unbiased binary exponent from the float32 bits (``((bits >> 23) & 0xff) - 127``; zero and
  subnormals give -127), ``e_t = clamp(E_t - (act_bits - 2), -100, 126)``,
  ``x_q = clamp(round_half_even(x * 2^-e_t), -qmax, qmax)`` (the power of two built from its
  bits; the multiply is exact); ``y0 = float32(acc) * row_scale`` (step 3 with no bias); then
  ``y = y0 * 2^e_t + bias`` in float32. ``y0 * 2^e_t`` is exact, so a fused multiply-add
  (which LLVM, OpenCL and CUDA compilers may form) rounds exactly as the separate multiply and
  add: that is why the scale is a power of two. (The upper bound 126 only matters at 2 bits for
  rows reaching 2^127: it keeps ``2^-e_t`` a normal float32.)
"""

from __future__ import annotations

import weakref
from typing import List

import torch

from ..quant.config import TOKEN_EXP_MAX, TOKEN_EXP_MIN

__all__ = ["quantize_activation", "quantize_activation_asym", "token_exponent", "pow2", "qlinear", "qlinear_asym",
           "qlinear_per_token", "qconv2d", "qlinear_requant", "qconv2d_requant", "requant_epilogue", "qadd_requant",
           "qavgpool_requant", "qmaxpool2d", "codes_of", "TOKEN_EXP_MIN", "TOKEN_EXP_MAX"]


def quantize_activation(x: torch.Tensor, inv_scale: float, qmin: int, qmax: int) -> torch.Tensor:
    """Integer-valued float32 tensor ``clamp(round(x * inv_scale), qmin, qmax)``."""
    inv = torch.tensor(inv_scale, dtype=torch.float32, device=x.device)
    return (x.to(torch.float32) * inv).round_().clamp_(qmin, qmax)  # in place after the multiply


def quantize_activation_asym(x: torch.Tensor, inv_scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """Integer-valued float32 tensor ``clamp(round(x * inv_scale) + zero_point, 0, qmax)``."""
    inv = torch.tensor(inv_scale, dtype=torch.float32, device=x.device)
    zp = torch.tensor(float(zero_point), dtype=torch.float32, device=x.device)
    return (x.to(torch.float32) * inv).round_().add_(zp).clamp_(0, qmax)




def token_exponent(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``e_t`` (int32, one per row of the last axis) of the per-token contract."""
    amax = x.to(torch.float32).abs().amax(dim=-1)
    raw = amax.view(torch.int32)
    e = ((raw >> 23) & 0xFF) - 127 - (bits - 2)
    return e.clamp_(TOKEN_EXP_MIN, TOKEN_EXP_MAX)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """``2^e`` as float32, built from its bits (``e`` int32 in [-126, 127])."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def quantize_per_token(x: torch.Tensor, bits: int):
    """``(x_q, e)``: integer-valued float32 ``x_q`` and the per-token exponents ``e`` (int32)."""
    qmax = 2 ** (bits - 1) - 1
    e = token_exponent(x, bits)
    return (x.to(torch.float32) * pow2(-e).unsqueeze(-1)).round_().clamp_(-qmax, qmax), e


_F32_EXACT = 2**24


def _digits(weight_int: torch.Tensor) -> List[torch.Tensor]:
    """Balanced base-16 digits of an integer tensor: ``w = sum_d 16^d * digits[d]``, ``|digit| <= 8``."""
    rest, digits = weight_int.to(torch.int64), []
    while True:
        high = torch.round(rest.to(torch.float64) / 16).to(torch.int64)  # |rest - 16 * high| <= 8
        digits.append(rest - 16 * high)
        rest = high
        if not bool(rest.any()):
            return digits


# Per weight tensor, by identity (a weak reference checks it; the entry goes with the
# tensor): the float copies and digit stacks of the integer weights, rebuilt when the tensor
# is modified in place.
_PREPARED: dict = {}
# Below this many activation elements a float64 product is as cheap as the digit split.
_DIGITS_MIN_INPUT = 65536


def _weight_facts(weight_int: torch.Tensor, version) -> dict:
    return {"version": version, "w_max": int(weight_int.abs().max()) if weight_int.numel() else 0,
            "fan_in": weight_int[0].numel() if weight_int.shape[0] else 0}


def _prepared(weight_int: torch.Tensor) -> dict:
    if weight_int.is_inference():  # no version counter to tell an in-place change: no cache
        return _weight_facts(weight_int, None)
    key = id(weight_int)
    ref, entry = _PREPARED.get(key, (None, None))
    if ref is None or ref() is not weight_int:
        entry = None
        weakref.finalize(weight_int, _PREPARED.pop, key, None)
    if entry is None or entry["version"] != weight_int._version:
        entry = _weight_facts(weight_int, weight_int._version)
        _PREPARED[key] = (weakref.ref(weight_int), entry)
    return entry


def _cached(entry: dict, key: str, make):
    if key not in entry:
        entry[key] = make()
    return entry[key]


def _exact_product(xq: torch.Tensor, weight_int: torch.Tensor, qmin: int, qmax: int, product,
                   out_axis: int) -> torch.Tensor:
    """``product(xq, weight)`` (linear in the weight, its rows landing on ``out_axis`` of the
    result) as exact integers, in float32 wherever that is exact (see module docstring)."""
    entry = _prepared(weight_int)
    bound = entry["fan_in"] * max(abs(qmin), abs(qmax))
    if bound * entry["w_max"] < _F32_EXACT:  # float32 result: exact, and _epilogue may stay in float32
        return product(xq.to(torch.float32), _cached(entry, "f32", lambda: weight_int.to(torch.float32)))
    if bound * 8 >= _F32_EXACT or xq.numel() < _DIGITS_MIN_INPUT:
        return product(xq.to(torch.float64), _cached(entry, "f64", lambda: weight_int.to(torch.float64)))
    rows = weight_int.shape[0]
    stacked = product(xq.to(torch.float32),
                      _cached(entry, "digits", lambda: torch.cat(_digits(weight_int)).to(torch.float32)))
    parts = stacked.to(torch.float64).split(rows, dim=out_axis)
    acc = parts[-1]
    for part in reversed(parts[:-1]):
        acc = acc * 16 + part
    return acc


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, w.t())


def _epilogue(acc: torch.Tensor, bias_int: torch.Tensor, out_scale: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """``float32(acc + bias) * scale``; the add in float32 when ``acc`` is float32 (then
    ``|acc| < 2^24``) and ``|acc| + |bias|`` stays below 2^24, so it is exact either way."""
    shape = [1] * acc.dim()
    shape[channel_axis] = -1
    bias_max = int(bias_int.abs().max()) if bias_int.numel() else 0
    if acc.dtype == torch.float32 and bias_max < _F32_EXACT and acc.numel():
        lo, hi = torch.aminmax(acc)
        if max(-float(lo), float(hi)) < _F32_EXACT - bias_max:  # acc is a fresh tensor: update in place
            return acc.add_(bias_int.to(torch.float32).reshape(shape)).mul_(out_scale.reshape(shape))
    total = (acc.to(torch.float64) + bias_int.to(torch.float64).reshape(shape)).to(torch.float32)
    return total.mul_(out_scale.reshape(shape))


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
    xq = quantize_activation(x, inv_act_scale, qmin, qmax)
    acc = _exact_product(xq, weight_int, qmin, qmax, _linear, -1)
    return _epilogue(acc, bias_int, out_scale, acc.dim() - 1)


@qlinear.register_fake
def _(x, weight_int, bias_int, out_scale, inv_act_scale, qmin, qmax, layer):
    return x.new_empty(tuple(x.shape[:-1]) + (weight_int.shape[0],), dtype=torch.float32)


@torch.library.custom_op("rmsmp::qlinear_asym", mutates_args=())
def qlinear_asym(
    x: torch.Tensor,
    weight_int: torch.Tensor,
    bias_int: torch.Tensor,
    out_scale: torch.Tensor,
    inv_act_scale: float,
    zero_point: int,
    qmax: int,
    layer: str,
) -> torch.Tensor:
    """Asymmetric per-tensor activations; ``bias_int`` already holds ``-zero_point * sum_k w_int``."""
    xq = quantize_activation_asym(x, inv_act_scale, zero_point, qmax)
    acc = _exact_product(xq, weight_int, 0, qmax, _linear, -1)
    return _epilogue(acc, bias_int, out_scale, acc.dim() - 1)


@qlinear_asym.register_fake
def _(x, weight_int, bias_int, out_scale, inv_act_scale, zero_point, qmax, layer):
    return x.new_empty(tuple(x.shape[:-1]) + (weight_int.shape[0],), dtype=torch.float32)


@torch.library.custom_op("rmsmp::qlinear_per_token", mutates_args=())
def qlinear_per_token(
    x: torch.Tensor,
    weight_int: torch.Tensor,
    row_scale: torch.Tensor,
    bias: torch.Tensor,
    act_bits: int,
    layer: str,
) -> torch.Tensor:
    """Per-token power-of-two activation scales (see the module docstring); ``bias`` is float32."""
    qmax = 2 ** (act_bits - 1) - 1
    xq, e = quantize_per_token(x, act_bits)
    acc = _exact_product(xq, weight_int, -qmax, qmax, _linear, -1)
    y0 = _epilogue(acc, torch.zeros_like(bias, dtype=torch.int32), row_scale, acc.dim() - 1)
    return y0.mul_(pow2(e).unsqueeze(-1)).add_(bias.to(torch.float32))


@qlinear_per_token.register_fake
def _(x, weight_int, row_scale, bias, act_bits, layer):
    return x.new_empty(tuple(x.shape[:-1]) + (weight_int.shape[0],), dtype=torch.float32)


def _conv2d_acc(x, weight_int, inv_act_scale, qmin, qmax, stride, padding, dilation) -> torch.Tensor:
    """Steps 1-2 of a conv2d layer (module docstring): quantize the input, exact integer conv."""
    xq = quantize_activation(x, inv_act_scale, qmin, qmax)
    return _exact_product(xq, weight_int, qmin, qmax,
                          lambda xs, ws: torch.nn.functional.conv2d(xs, ws, None, stride, padding, dilation), 1)


def _conv2d_empty(x, weight_int, stride, padding, dilation) -> torch.Tensor:
    """The (fake) float32 output of a conv2d layer op."""
    oh, ow = conv2d_output_hw(x.shape[2], x.shape[3], weight_int.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight_int.shape[0], oh, ow), dtype=torch.float32)


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
    acc = _conv2d_acc(x, weight_int, inv_act_scale, qmin, qmax, stride, padding, dilation)
    return _epilogue(acc, bias_int, out_scale, 1)


def conv2d_output_hw(h: int, w: int, kernel, stride, padding, dilation):
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return oh, ow


@qconv2d.register_fake
def _(x, weight_int, bias_int, out_scale, inv_act_scale, qmin, qmax, stride, padding, dilation, layer):
    return _conv2d_empty(x, weight_int, stride, padding, dilation)


def requant_epilogue(acc: torch.Tensor, bias_int: torch.Tensor, requant_scale: torch.Tensor, out_act_scale: float,
                     out_qmin: int, out_qmax: int, channel_axis: int) -> torch.Tensor:
    """Step 3' (module docstring): integer codes ``q`` of the output, returned as ``float32(q) * out_act_scale``."""
    shape = [1] * acc.dim()
    shape[channel_axis] = -1
    total = acc.to(torch.float64) + bias_int.to(torch.float64).reshape(shape)
    q = torch.floor(total.mul_(requant_scale.to(torch.float64).reshape(shape)).add_(0.5)).clamp_(out_qmin, out_qmax)
    out = torch.tensor(out_act_scale, dtype=torch.float32, device=acc.device)
    return q.to(torch.float32).mul_(out)


def _quantize_input(x, inv_act_scale, in_zero_point, qmin, qmax):
    if in_zero_point >= 0:
        return quantize_activation_asym(x, inv_act_scale, in_zero_point, qmax)
    return quantize_activation(x, inv_act_scale, qmin, qmax)


@torch.library.custom_op("rmsmp::qlinear_requant", mutates_args=())
def qlinear_requant(
    x: torch.Tensor,
    weight_int: torch.Tensor,
    bias_int: torch.Tensor,
    requant_scale: torch.Tensor,
    inv_act_scale: float,
    in_zero_point: int,
    qmin: int,
    qmax: int,
    out_act_scale: float,
    out_qmin: int,
    out_qmax: int,
    layer: str,
) -> torch.Tensor:
    """A dense layer with the fixed-point epilogue; ``in_zero_point`` -1: symmetric input."""
    xq = _quantize_input(x, inv_act_scale, in_zero_point, qmin, qmax)
    acc = _exact_product(xq, weight_int, qmin, qmax, _linear, -1)
    return requant_epilogue(acc, bias_int, requant_scale, out_act_scale, out_qmin, out_qmax, acc.dim() - 1)


@qlinear_requant.register_fake
def _(x, weight_int, bias_int, requant_scale, inv_act_scale, in_zero_point, qmin, qmax, out_act_scale, out_qmin,
      out_qmax, layer):
    return x.new_empty(tuple(x.shape[:-1]) + (weight_int.shape[0],), dtype=torch.float32)


@torch.library.custom_op("rmsmp::qconv2d_requant", mutates_args=())
def qconv2d_requant(
    x: torch.Tensor,
    weight_int: torch.Tensor,
    bias_int: torch.Tensor,
    requant_scale: torch.Tensor,
    inv_act_scale: float,
    qmin: int,
    qmax: int,
    out_act_scale: float,
    out_qmin: int,
    out_qmax: int,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    layer: str,
) -> torch.Tensor:
    """A conv2d layer with the fixed-point epilogue."""
    acc = _conv2d_acc(x, weight_int, inv_act_scale, qmin, qmax, stride, padding, dilation)
    return requant_epilogue(acc, bias_int, requant_scale, out_act_scale, out_qmin, out_qmax, 1)


@qconv2d_requant.register_fake
def _(x, weight_int, bias_int, requant_scale, inv_act_scale, qmin, qmax, out_act_scale, out_qmin, out_qmax, stride,
      padding, dilation, layer):
    return _conv2d_empty(x, weight_int, stride, padding, dilation)


def codes_of(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The integer codes (int64) of a float view ``float32(q) * scale`` of 8-bit codes:
    ``round(float64(x) / float64(scale))``, exact (the float32 product is within a relative
    2^-24 of ``q * scale``, far from a rounding tie for ``|q| <= 255``)."""
    return torch.round(x.to(torch.float64) / float(scale)).to(torch.int64)


@torch.library.custom_op("rmsmp::qadd_requant", mutates_args=())
def qadd_requant(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: float,
    scale_b: float,
    mult_a: int,
    mult_b: int,
    shift: int,
    out_act_scale: float,
    out_qmin: int,
    out_qmax: int,
    name: str,
) -> torch.Tensor:
    """A residual add in the integer-only mode: ``a`` and ``b`` are float views of codes at
    ``scale_a`` / ``scale_b`` (outputs of fixed-point layers or adds); the result, the float
    view of ``clamp((qa * mult_a + qb * mult_b + 2^(shift-1)) >> shift, out_qmin, out_qmax)``
    times ``out_act_scale`` (float32), see :func:`tvm_rmsmp.quant.requant.requantize_add`."""
    if a.shape != b.shape:
        raise ValueError(f"residual add {name!r}: the inputs' shapes differ ({list(a.shape)} and {list(b.shape)})")
    acc = codes_of(a, scale_a) * mult_a + codes_of(b, scale_b) * mult_b + (1 << (shift - 1))
    q = (acc >> shift).clamp_(out_qmin, out_qmax)  # arithmetic shift: floor
    return q.to(torch.float32).mul_(torch.tensor(out_act_scale, dtype=torch.float32, device=a.device))


@qadd_requant.register_fake
def _(a, b, scale_a, scale_b, mult_a, mult_b, shift, out_act_scale, out_qmin, out_qmax, name):
    return torch.empty_like(a, dtype=torch.float32)


@torch.library.custom_op("rmsmp::qavgpool_requant", mutates_args=())
def qavgpool_requant(
    x: torch.Tensor,
    scale_in: float,
    mult: int,
    shift: int,
    out_act_scale: float,
    out_qmin: int,
    out_qmax: int,
    name: str,
) -> torch.Tensor:
    """Global average pooling in the integer-only mode: ``x [N, C, H, W]`` a float view of codes
    at ``scale_in``; the result ``[N, C, 1, 1]`` the float view of
    ``clamp((sum_hw q * mult + 2^(shift-1)) >> shift, out_qmin, out_qmax)`` times ``out_act_scale``
    (``mult * 2^-shift ~= scale_in / (H W out_act_scale)``; tvm_rmsmp.quant.requant.requantize)."""
    if x.dim() != 4:
        raise ValueError(f"average pooling {name!r}: expects an NCHW input, got shape {list(x.shape)}")
    total = codes_of(x, scale_in).sum(dim=(2, 3), keepdim=True)
    q = ((total * mult + (1 << (shift - 1))) >> shift).clamp_(out_qmin, out_qmax)
    return q.to(torch.float32).mul_(torch.tensor(out_act_scale, dtype=torch.float32, device=x.device))


@qavgpool_requant.register_fake
def _(x, scale_in, mult, shift, out_act_scale, out_qmin, out_qmax, name):
    return x.new_empty((x.shape[0], x.shape[1], 1, 1), dtype=torch.float32)


@torch.library.custom_op("rmsmp::qmaxpool2d", mutates_args=())
def qmaxpool2d(x: torch.Tensor, kernel: List[int], stride: List[int], padding: List[int], name: str) -> torch.Tensor:
    """Max-pooling of a float view of codes (dilation 1, floor mode): ``F.max_pool2d``, exact (the
    max of ``float32(q) * scale`` is the view of the max code). An op of its own only so that the
    importer keeps it as one node the FPGA executor can run on the accelerator."""
    return torch.nn.functional.max_pool2d(x, kernel, stride, padding)


@qmaxpool2d.register_fake
def _(x, kernel, stride, padding, name):
    oh, ow = conv2d_output_hw(x.shape[2], x.shape[3], kernel, stride, padding, (1, 1))
    return x.new_empty((x.shape[0], x.shape[1], oh, ow), dtype=torch.float32)
