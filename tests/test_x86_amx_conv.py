"""AMX-INT8 row-group convolutions (schedules.x86_amx_conv): built for an explicit AMX CPU on every
host and their assembly checked; run integer-exact against an independent numpy convolution
where the host has AMX and the OS grants it; chosen from the target's features."""

import numpy as np
import pytest
import tvm

from conftest import mixed_conv_layer, np_conv_acc, np_epilogue, stable_seed
from relay_passes.contract import packed_weight
from relay_passes.rewrite_row_groups import row_group_func
from test_x86_amx import AMX_TARGET, NO_AMX
from tvm_rmsmp.quant.schemes import get_scheme


def _kernel(scheme, x_shape, act, w_shape, stride, target=AMX_TARGET):
    """The kernel the compiler gives a constant-weight row group, and its weight layout."""
    from schedules.cpu import x86_constant_kernel

    conv = {"strides": [stride, stride], "padding": [0, 0], "dilation": [1, 1]}
    func = row_group_func("conv2d", "t", scheme, x_shape, act, w_shape, conv, packed=scheme != "fixed_8")
    return x86_constant_kernel(tvm.target.Target(target))(func)


def _compile(kernel):
    return tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=tvm.target.Target(AMX_TARGET))


@pytest.mark.parametrize("act,dot", [("uint8", "tdpbsud"), ("int8", "tdpbssd")])
def test_amx_conv_kernel_is_built_with_tile_instructions(act, dot):
    """On every host: the row group's kernel for an AMX CPU configures the tile unit, multiplies
    the int8 weights (A) by the activations (B) with the product matching their sign, stores
    through masks, and releases the tiles."""
    kernel, _ = _kernel("sp2_4", (2, 64, 10, 10), act, (20, 64, 3, 3), 1)
    assert str(kernel.attrs["rmsmp.cpu_kernel"]) == "x86-amx-conv"
    asm = _compile(kernel).mod.inspect_source("asm")
    for insn in ("ldtilecfg", dot, "tileloadd", "tilestored", "tilerelease", "{%k"):
        assert insn in asm, insn
    for other in {"tdpbusd", "tdpbssd", "tdpbsud", "tdpbuud"} - {dot}:
        assert other not in asm


CASES = [
    # (scheme, x shape (zero-padded NCHW), output channels, kernel, stride, activations)
    ("sp2_4", (1, 64, 10, 10), 20, 3, 1, "uint8"),
    ("fixed_4", (2, 64, 9, 9), 33, 3, 2, "int8"),       # odd output and phase plane widths
    ("fixed_8", (3, 128, 8, 8), 17, 1, 2, "uint8"),    # two channel blocks, 1x1 stride 2
    ("sp2_4", (2, 70, 12, 12), 40, 3, 2, "int8"),      # channels not a multiple of 64 (nor 4)
    ("fixed_4", (1, 16, 20, 20), 48, 3, 1, "uint8"),   # 16 channels, plane rows wider than 16
    ("fixed_8", (2, 96, 6, 6), 32, 1, 1, "int8"),
    ("sp2_4", (1, 32, 35, 35), 16, 3, 2, "uint8"),     # input width odd: a phase plane one pixel short
    ("fixed_4", (2, 3, 23, 23), 20, 7, 2, "uint8"),    # a stem: 7 kernel columns folded into 21 channels
    ("fixed_8", (1, 1, 16, 16), 16, 3, 1, "int8"),     # one channel, folded
]


@pytest.mark.parametrize("scheme,xs,n,k,stride,act", CASES)
def test_amx_conv_row_group_is_integer_exact(scheme, xs, n, k, stride, act):
    """SP2-4 / Fixed-4 codes decoded to int8 at compile time and Fixed-8 rows: the outputs equal
    numpy's ``float32(conv(x, w) + bias) * scale`` (NCHW), for random and extreme activations."""
    rng = np.random.default_rng(stable_seed(scheme, xs, n, k, stride, act))
    w_int = rng.choice(get_scheme(scheme).levels, size=(n, xs[1], k, k)).astype(np.int8)
    kernel, layout = _kernel(scheme, xs, act, w_int.shape, stride)
    assert str(kernel.attrs["rmsmp.cpu_kernel"]) == "x86-amx-conv"
    stored = w_int if scheme == "fixed_8" else packed_weight(w_int.reshape(n, -1), scheme)
    exe = _compile(kernel)
    if NO_AMX:
        pytest.skip(f"built for sapphirerapids, not run: {NO_AMX}")
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    for x in (rng.integers(lo, hi + 1, size=xs).astype(act), np.full(xs, lo if act == "int8" else hi, act)):
        expected = np_epilogue(np_conv_acc(x, w_int, (stride, stride), (0, 0), (1, 1)), bias.astype(np.int64), scale, 1)
        args = [tvm.runtime.tensor(a) for a in (x, layout(stored), bias, scale, np.zeros(expected.shape, np.float32))]
        exe.mod["main"](*args)
        np.testing.assert_array_equal(args[-1].numpy(), expected)


def test_amx_conv_is_chosen_from_the_targets_features(monkeypatch):
    """AMX convs only where the target has AMX-INT8 and ``RMSMP_AMX=0`` does not switch it off,
    for layers of 16 input channels or more or few enough to fold the kernel columns into one
    64-channel block (a 3-channel stem); others keep VNNI."""
    kinds = {}
    for label, target, channels, k, env in [("amx", AMX_TARGET, 16, 3, "1"), ("stem", AMX_TARGET, 3, 7, "1"),
                                            ("wide", AMX_TARGET, 10, 7, "1"),
                                            ("no amx", dict(AMX_TARGET, mcpu="icelake-server"), 64, 3, "1"),
                                            ("switched off", AMX_TARGET, 64, 3, "0")]:
        monkeypatch.setenv("RMSMP_AMX", env)
        kernel, _ = _kernel("fixed_8", (1, channels, 10, 10), "uint8", (16, channels, k, k), 1, target)
        kinds[label] = str(kernel.attrs["rmsmp.cpu_kernel"])
    assert kinds == {"amx": "x86-amx-conv", "stem": "x86-amx-conv", "wide": "x86-avx512vnni-int8",
                     "no amx": "x86-avx512vnni-int8", "switched off": "x86-avx512vnni-int8"}


def test_compiled_resnet_runs_its_convolutions_on_amx(small_resnet, host_target):
    """The small ResNet through ``rmsmp.compile``: each convolution (the 1-channel stem's
    folded) becomes one AMX kernel for all its row groups for an AMX target, and on an AMX host
    the result equals the torch quantized model's, bit for bit."""
    import torch

    import tvm_rmsmp as rmsmp

    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_bits=8), calib)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    target = host_target if not NO_AMX else tvm.target.Target(AMX_TARGET)
    exe = rmsmp.compile(q, (x,), target)
    kinds = exe.stats["cpu_kernels"]
    # four conv layers in one kernel each, the two of the residual block sharing theirs
    assert kinds.get("x86-amx-conv-layer") == 3 and not any("conv" in k and k != "x86-amx-conv-layer" or "generic" in k
                                                             for k in kinds), kinds
    if NO_AMX:
        pytest.skip(f"built for sapphirerapids, not run: {NO_AMX}")
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


@pytest.mark.parametrize("xs,n,k,stride,act", [((2, 64, 10, 10), 40, 3, 1, "uint8"), ((1, 3, 19, 19), 21, 7, 2, "int8")])
def test_amx_conv_layer_kernel_is_integer_exact(xs, n, k, stride, act):
    """One kernel for a whole conv layer (``x86_layer_kernels`` on a ``ConvLayer``): rows of
    SP2-4, Fixed-4 and Fixed-8 in a scattered output order equal numpy's convolution in that
    order (a 3-channel stem: folded)."""
    from schedules.x86_layers import x86_layer_kernels

    rng = np.random.default_rng(stable_seed(xs, n, k, stride, act))
    layer, order, w_int, bias, scale = mixed_conv_layer(xs, n, k, stride, act, rng)
    kernels = x86_layer_kernels(tvm.target.Target(AMX_TARGET))
    assert kernels.convs and kernels.accepts(layer)
    _, _, make, consts = kernels.build(layer, order)
    kernel = make()
    assert str(kernel.attrs["rmsmp.cpu_kernel"]) == "x86-amx-conv-layer"
    exe = _compile(kernel)
    if NO_AMX:
        pytest.skip(f"built for sapphirerapids, not run: {NO_AMX}")
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    x = rng.integers(lo, hi + 1, size=xs).astype(act)
    expected = np_epilogue(np_conv_acc(x, w_int, (stride, stride), (0, 0), (1, 1)), bias, scale, 1)
    args = [tvm.runtime.tensor(a) for a in (x, *(c for c, _ in consts), np.zeros(expected.shape, np.float32))]
    exe.mod["main"](*args)
    np.testing.assert_array_equal(args[-1].numpy(), expected)
