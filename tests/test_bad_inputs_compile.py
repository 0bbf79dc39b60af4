"""Bad inputs on the compile and call side: each gives a clear error naming the culprit, or
works as the torch reference does."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.cli.main import main as cli_main


def _quantized_mlp(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rmsmp.RMSMPWarning)
        return rmsmp.quantize(model, rmsmp.RMSMPConfig(), [torch.randn(32, 16)])


@pytest.fixture(scope="module")
def mlp():
    q = _quantized_mlp()
    return q, rmsmp.compile(q, (torch.zeros(2, 16),))


def test_nan_input_is_refused_naming_the_input_and_index(mlp):
    """The integer layers cannot carry NaN (the reference returns NaN): a call with NaN raises."""
    _, exe = mlp
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    x[1, 5] = np.nan
    with pytest.raises(ValueError, match=r"input 0 has NaN at index \(1, 5\)"):
        exe(x)
    x[1, 5] = np.inf  # infinities clamp to the quantizer's range, as in the reference
    assert np.array_equal(exe(x), _reference(mlp[0], x))


def _reference(q, x):
    with torch.no_grad():
        return q(torch.from_numpy(x)).numpy()


def test_wrong_feature_count_names_the_layer():
    q = _quantized_mlp()
    with pytest.raises(ValueError, match=r"layer '0' \(dense\) takes 16 input features .* shape \[2, 12\]"):
        rmsmp.compile(q, (torch.zeros(2, 12),))


def test_zero_batch_is_refused_before_any_kernel_is_built():
    q = _quantized_mlp()
    with pytest.raises(ValueError, match=r"example_inputs\[0\] has shape \[0, 16\]"):
        rmsmp.compile(q, (torch.zeros(0, 16),))


def test_float64_example_input_compiles_for_the_models_float32(mlp):
    q, _ = mlp
    x64 = np.random.default_rng(2).standard_normal((2, 16))
    exe = rmsmp.compile(q, (x64,))
    assert exe.input_specs[0]["dtype"] == "float32"
    assert np.array_equal(exe(x64), _reference(q, x64.astype(np.float32)))


class _Indexing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x)[0] * 2.0


def test_model_that_indexes_a_tensor_compiles_and_matches():
    """``t[0]`` reads a 0-d index buffer (it used to fail in the CPU schedule)."""
    torch.manual_seed(3)
    q = rmsmp.quantize(_Indexing().eval(), rmsmp.RMSMPConfig(assign="variance"), [torch.randn(32, 16)])
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    exe = rmsmp.compile(q, (x,))
    assert np.array_equal(exe(x), _reference(q, x))


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_float_multihead_attention_compiles_and_matches():
    torch.manual_seed(4)
    model = _Attention().eval()
    x = torch.randn(2, 5, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rmsmp.RMSMPWarning)  # no RMSMP layer: compiled in float
        exe = rmsmp.compile(model, (x,))
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(exe(x), ref, rtol=1e-5, atol=1e-5)


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 16)
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, t):
        return self.fc(self.emb(t))


def test_embedding_index_out_of_range_raises_like_torch():
    torch.manual_seed(5)
    model = _Embed().eval()
    tokens = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rmsmp.RMSMPWarning)
        q = rmsmp.quantize(model, rmsmp.RMSMPConfig(assign="variance"), [tokens])
    exe = rmsmp.compile(q, (tokens,))
    assert exe.input_specs[0]["index_bound"] == 10
    assert np.array_equal(exe(tokens), _reference(q, tokens.numpy()))
    for bad in (10, -1):
        wrong = tokens.clone()
        wrong[2, 3] = bad
        with pytest.raises(IndexError):
            q(wrong)  # the reference raises too
        with pytest.raises(IndexError, match=rf"input 0 indexes a table of 10 rows .* with {bad}"):
            exe(wrong)


def test_compile_prints_no_native_gather_warning(capfd):
    """TVM's C++ 'Fast mode segfaults' warning is not printed for this package's own gathers."""
    q = _quantized_mlp(6)
    rmsmp.compile(q, (torch.zeros(3, 16),))
    assert "Fast mode segfaults" not in capfd.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--ratio", "not json"], "--ratio 'not json' is not JSON"),
    (["--ratio", '{"sp2_4": 2.0}'], "--ratio / --act-bits"),
    (["--calib-batch", "0"], "--calib-batch must be at least 1"),
])
def test_cli_bad_flags_name_the_flag(tmp_path, flags, message):
    np.save(tmp_path / "calib.npy", np.zeros((8, 16), np.float32))
    args = ["compile", "--model", "torch.nn:Identity", "--input-shape", "2,16", "--calib", str(tmp_path / "calib.npy"),
            "--out", str(tmp_path / "m.so")] + flags
    with pytest.raises(SystemExit, match=message):
        cli_main(args)
    assert not (tmp_path / "m.so").exists()


def test_cli_model_that_is_not_callable(tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((8, 16), np.float32))
    with pytest.raises(SystemExit, match="names a str: it must be a torch.nn.Module or a function"):
        cli_main(["compile", "--model", "tvm_rmsmp:__version__", "--input-shape", "2,16", "--calib",
                  str(tmp_path / "calib.npy"), "--out", str(tmp_path / "m.so")])


def test_export_and_load_print_no_native_scope_lines(mlp, tmp_path, capfd, monkeypatch):
    """TVM 0.27 logs 'Scope Saving:' / 'Scope Loaded:' from C++ per function; kept off stderr."""
    monkeypatch.setenv("TVM_RMSMP_CACHE_DIR", str(tmp_path / "cache"))
    q, exe = mlp
    path = exe.export_library(str(tmp_path / "m.so"))
    loaded = rmsmp.load(path)
    x = np.random.default_rng(7).standard_normal((2, 16)).astype(np.float32)
    assert np.array_equal(loaded(x), exe(x))
    assert "Scope" not in capfd.readouterr().err


def _workload_json():
    from tvm.s_tir import meta_schedule as ms
    from tvm import te
    import tvm

    a = te.placeholder((4,), "float32", name="a")
    b = te.compute((4,), lambda i: a[i] * 2.0, name="b")
    return ms.database.Workload(tvm.IRModule({"main": te.create_prim_func([a, b])})).as_json()


@pytest.mark.parametrize("workloads, records, message", [
    (['["abc", 5]'], [], r"database_workload.json line 1 is not a MetaSchedule workload"),
    ([None], ['{"x": 1}'], r"database_tuning_record.json line 1 is not \[workload index, record\]"),
    ([None], ['[3, [[], [1.0]]]'], r"line 1 is not \[workload index, record\] with an index below 1"),
    ([None], ['[0, {"x": 1}]'], r"database_tuning_record.json line 1 is not a MetaSchedule tuning record"),
])
def test_tuning_records_of_the_wrong_structure_name_file_and_line(tmp_path, workloads, records, message):
    import json

    from tvm_rmsmp.compiler.records import check_records

    lines = [json.dumps(_workload_json()) if w is None else w for w in workloads]
    (tmp_path / "database_workload.json").write_text("".join(line + "\n" for line in lines))
    (tmp_path / "database_tuning_record.json").write_text("".join(r + "\n" for r in records))
    with pytest.raises(ValueError, match=message):
        check_records(str(tmp_path))


class _DictOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return {"logits": self.head(h), "hidden": h}


def test_dict_outputs_come_back_with_their_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_RMSMP_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(8)
    q = rmsmp.quantize(_DictOut().eval(), rmsmp.RMSMPConfig(assign="variance"), [torch.randn(32, 16)])
    x = np.random.default_rng(8).standard_normal((2, 16)).astype(np.float32)
    exe = rmsmp.compile(q, (x,))
    with torch.no_grad():
        ref = q(torch.from_numpy(x))
    for got in (exe(x), rmsmp.load(exe.export_library(str(tmp_path / "d.so")))(x)):
        assert isinstance(got, dict) and list(got) == ["logits", "hidden"]
        for key in got:
            assert np.array_equal(got[key], ref[key].numpy()), key


def test_transformer_encoder_layer_quantizes_compiles_and_matches():
    """nn.TransformerEncoderLayer: its attention projections and feed-forward become RMSMP layers,
    and the compiled model equals the quantized torch model."""
    torch.manual_seed(9)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True,
                                             dropout=0.0).eval()
    calib = [torch.randn(4, 6, 32) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rmsmp.RMSMPWarning)
        q = rmsmp.quantize(layer, rmsmp.RMSMPConfig(assign="variance"), calib)
    assert len(rmsmp.row_plans(q)) == 6  # q, k, v, out projections; linear1, linear2
    x = np.random.default_rng(9).standard_normal((2, 6, 32)).astype(np.float32)
    exe = rmsmp.compile(q, (x,))
    np.testing.assert_allclose(exe(x), _reference(q, x), rtol=0, atol=2e-5)
