"""Whole models through the pipeline: TVM output equals the torch reference bit for bit."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import tvm_rmsmp as rmsmp
from tvm_rmsmp.quant.schemes import Scheme, register_scheme


@pytest.fixture(scope="module")
def compiled_resnet(small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(100))  # module scope: before the per-test seed
    return q, rmsmp.compile(q, (x,), target="llvm"), x


def test_model_output_equals_torch_reference(compiled_resnet):
    q, exe, _ = compiled_resnet
    for seed in range(3):
        x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
        np.testing.assert_array_equal(exe(x.numpy()), q(x).detach().numpy())


def test_row_groups_and_folded_gathers_in_the_ir(compiled_resnet):
    q, exe, _ = compiled_resnet
    text = exe.ir.script()
    plans = rmsmp.row_plans(q)
    # on x86 (AVX2, AVX-512 VNNI) each dense layer's row groups become one layer kernel at
    # batch 1 (test_cpu_kernels.py)
    layer_kernels = sum(exe.stats["cpu_kernels"].get(f"x86-{isa}-gemv", 0) for isa in ("avx2", "avx512vnni"))
    # with AMX-INT8 each conv layer's row groups are one kernel too (test_x86_amx_conv.py)
    conv_layers = exe.stats["cpu_kernels"].get("x86-amx-conv-layer", 0)
    for name, plan in plans.items():
        if plan.op == "dense" and layer_kernels or plan.op == "conv2d" and conv_layers:
            continue
        for scheme in set(plan.schemes):
            safe = name.replace(".", "_")
            assert f"rmsmp_{plan.op}_{safe}_{scheme}" in text
    if layer_kernels:
        dense = sum(plan.op == "dense" for plan in plans.values())
        assert text.count("rmsmp_dense_layer_") - layer_kernels == dense  # one call per layer
    # gathers left: the residual add (one, on the skip path) and the model output, which a
    # dense layer kernel takes into its output order
    assert exe.stats["kept"] == 2 and text.count("R.take(") == (1 if layer_kernels else 2)
    assert exe.stats["folded"] > 0


def test_benchmark_and_export_roundtrip(compiled_resnet, tmp_path):
    q, exe, x = compiled_resnet
    seconds = exe.benchmark(x, repeat=3)
    assert 0 < seconds < 1
    path = exe.export_library(str(tmp_path / "model.so"))
    loaded = rmsmp.load(path)
    np.testing.assert_array_equal(loaded(x), exe(x))
    meta = json.loads(open(path + ".json").read())
    assert meta["inputs"] == [{"shape": [4, 1, 16, 16], "dtype": "float32", "name": "x"}]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_corrupt_artifacts_get_clear_errors(compiled_resnet, tmp_path):
    _, exe, _ = compiled_resnet
    path = exe.export_library(str(tmp_path / "m.so"))
    with open(path + ".json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="m.so.json' is corrupt"):
        rmsmp.load(path)
    (tmp_path / "junk.so").write_bytes(b"\x7fELF junk")
    import hashlib

    from tvm_rmsmp.runtime.host import host_triple, triple_arch

    junk = {"format": "tvm-rmsmp", "version": 2, "inputs": [], "target": json.loads(str(exe.target)),
            "size": 9, "sha256": hashlib.sha256(b"\x7fELF junk").hexdigest(), "arch": triple_arch(host_triple()),
            "triple": host_triple(), "cpu_features": []}
    (tmp_path / "junk.so.json").write_text(json.dumps(junk))  # a sidecar that checks out, for a library that does not
    with pytest.raises(ValueError, match="junk.so' is not a loadable TVM library"):
        rmsmp.load(str(tmp_path / "junk.so"))
    with pytest.raises(FileNotFoundError):
        rmsmp.load(str(tmp_path / "nothing.so"))


def test_input_checks(compiled_resnet):
    _, exe, _ = compiled_resnet
    with pytest.raises(ValueError, match="input 0 has shape \\[2, 1, 16, 16\\], the model was compiled for \\[4, 1, 16, 16\\]"):
        exe(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="compiled for 1 input"):
        exe(torch.randn(4, 1, 16, 16), torch.randn(1))
    with pytest.raises(ValueError, match="dtype int64"):
        exe(np.zeros((4, 1, 16, 16), np.int64))
    np.testing.assert_array_equal(exe(np.zeros((4, 1, 16, 16), np.float64)), exe(np.zeros((4, 1, 16, 16), np.float32)))


def test_unknown_target(compiled_resnet):
    q, _, x = compiled_resnet
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        rmsmp.compile(q, (x,), target="tpu")
    with pytest.raises(ValueError, match="no row-group schedules for target kind 'c'"):
        rmsmp.compile(q, (x,), target={"kind": "c"})


def test_float_model_compiles_with_a_warning():
    model = nn.Sequential(nn.ReLU(), nn.Flatten()).eval()
    x = torch.randn(2, 3, 4)
    with pytest.warns(rmsmp.RMSMPWarning, match="no RMSMP layer"):
        exe = rmsmp.compile(model, (x,))
    np.testing.assert_array_equal(exe(x), model(x).numpy())


def test_sequence_model_dense_on_3d_inputs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), [torch.randn(2, 7, 24) for _ in range(2)])
    x = torch.randn(2, 7, 24)
    exe = rmsmp.compile(q, (x,))
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
    assert exe.stats["kept"] == 1  # only the output keeps a gather


def test_gelu_model_with_and_without_fast_math():
    """fast_math (the default) swaps libm's erf for TVM's vectorizable one between the layers;
    the quantized layers stay exact, so both builds agree with the reference up to the rare
    activation that GELU's last bit moves across a rounding boundary."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 16)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), [torch.randn(4, 32) for _ in range(4)])
    x = torch.randn(64, 32)
    ref = q(x).detach().numpy()
    step = float(np.abs(ref).max()) / 127 * 4  # a few output quantization steps
    for fast in (True, False):
        exe = rmsmp.compile(q, (x,), fast_math=fast)
        assert exe.stats["fast_math"] is fast
        out = exe(x)
        assert np.mean(out == ref) > 0.99
        np.testing.assert_allclose(out, ref, atol=step)


def test_a_new_scheme_is_one_registration():
    """Register a scheme and use it: row plans, passes and CPU kernels pick it up by kind."""
    register_scheme(Scheme("test_sp2_5", kind="sp2", bits=5, m1=2, m2=2), override=True)
    register_scheme(Scheme("test_fixed_6", kind="fixed", bits=6), override=True)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 36, 10)).eval()
    cfg = rmsmp.RMSMPConfig(ratio={"test_sp2_5": 0.5, "test_fixed_6": 0.3, "fixed_8": 0.2})
    q = rmsmp.quantize(model, cfg, [torch.randn(3, 2, 6, 6)])
    assert set(rmsmp.row_plans(q)["0"].schemes) == {"test_sp2_5", "test_fixed_6", "fixed_8"}
    x = torch.randn(3, 2, 6, 6)
    exe = rmsmp.compile(q, (x,))
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
    assert "rmsmp_conv2d_0_test_sp2_5" in exe.ir.script()


@pytest.mark.parametrize("ratio", [{"sp2_4": 1.0}, {"fixed_4": 1.0}, {"fixed_8": 1.0}, {"sp2_4": 0.65, "fixed_4": 0.30, "fixed_8": 0.05}])
def test_single_scheme_and_other_ratios(small_resnet, ratio):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio=ratio, act_bits=4), calib)
    x = torch.randn(4, 1, 16, 16)
    exe = rmsmp.compile(q, (x,))
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
