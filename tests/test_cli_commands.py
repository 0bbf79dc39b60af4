"""Every tvm-rmsmp command on a small model, run in-process through ``main([...])``.

The models and data sets the commands name (``--model test_cli_commands:tiny_cnn``) are
defined here: pytest puts tests/ on ``sys.path``.
"""

import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import tvm_rmsmp as rmsmp
from tvm_rmsmp.cli.main import main
from tvm_rmsmp.quant.progress import progress_enabled, set_progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "test_cli_commands:tiny_cnn"


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def train_batches():
    """(inputs, labels) pairs, as a DataLoader over a labelled set yields them."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]


def calib_batches():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(16, 2, 8, 8, generator=g) for _ in range(2))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    calib = np.random.default_rng(0).standard_normal((32, 2, 8, 8)).astype(np.float32)
    np.save(d / "calib.npy", calib)
    np.save(d / "x.npy", calib[:2])
    return d, calib


@pytest.fixture(scope="module")
def saved(work):
    d, _ = work
    assert main(["quantize", "--model", MODEL, "--calib", str(d / "calib.npy"), "--calib-batch", "16",
                 "--out", str(d / "q"), "--quiet"]) == 0
    return d / "q"


@pytest.fixture(scope="module")
def library(work, saved):
    d, _ = work
    assert main(["compile", "--model", str(saved), "--input-shape", "2,2,8,8", "--out", str(d / "m.so"), "-q"]) == 0
    return d / "m.so"


def _eight_bit_share(rows):
    return rows.get("fixed_8", 0) / sum(rows.values())


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tvm-rmsmp {rmsmp.__version__} (apache-tvm ") and "torch" in out
    proc = subprocess.run([sys.executable, "-m", "tvm_rmsmp", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == out


def test_quantize_writes_a_saved_dir_that_reloads(work, saved):
    d, calib = work
    assert sorted(os.listdir(saved)) == ["config.json", "hessians.safetensors", "weights.safetensors"]
    assert not [f for f in os.listdir(saved) if f.endswith((".pt", ".pkl", ".pth"))]
    q = rmsmp.load_quantized(str(saved))  # the factory the CLI recorded builds the architecture
    # the integer model: every 4-bit/8-bit code on its grid, rows split as the default ratio says
    plans = rmsmp.row_plans(q)
    assert list(plans) == ["0", "3", "6", "8"]
    for plan in plans.values():
        for row, s in zip(plan.weight_int, plan.schemes):
            assert set(np.unique(row)) <= set(rmsmp.get_scheme(s).levels.tolist())
    with torch.no_grad():
        y = q(torch.from_numpy(calib[:4]))
    assert y.shape == (4, 4) and torch.isfinite(y).all()
    assert q.rmsmp_row_hessian and set(q.rmsmp_row_hessian) == set(plans)


def test_requantize_a_saved_dir_reuses_its_hessians(work, saved, capsys):
    d, _ = work
    ratio = '{"sp2_4": 0.5, "fixed_4": 0.25, "fixed_8": 0.25}'
    assert main(["quantize", "--model", str(saved), "--calib", str(d / "calib.npy"), "--ratio", ratio,
                 "--out", str(d / "q2"), "-q"]) == 0
    assert "re-quantizing with the row Hessians saved in" in capsys.readouterr().out
    q2 = rmsmp.load_quantized(str(d / "q2"))
    for plan in rmsmp.row_plans(q2).values():
        n = plan.num_rows
        if plan.layer in ("0", "8"):  # first and last layer: the config's edge scheme
            continue
        assert plan.counts().get("fixed_8", 0) == pytest.approx(0.25 * n, abs=1)


def test_calibration_from_pt_and_from_a_dataset_callable(work, tmp_path):
    d, calib = work
    torch.save(torch.from_numpy(calib), tmp_path / "calib.pt")
    args = ["--assign", "variance", "--rounding", "nearest", "--calib-batch", "16", "-q"]
    assert main(["quantize", "--model", MODEL, "--calib", str(tmp_path / "calib.pt"), "--out",
                 str(tmp_path / "a"), *args]) == 0
    assert main(["quantize", "--model", MODEL, "--calib", str(d / "calib.npy"), "--out", str(tmp_path / "b"),
                 *args]) == 0
    a, b = (rmsmp.row_plans(rmsmp.load_quantized(str(tmp_path / n))) for n in "ab")
    assert all(np.array_equal(a[k].weight_int, b[k].weight_int) for k in a)  # same data, same model
    # a dataset callable of (x, y) pairs, inputs picked with --calib-first; and one of plain batches
    assert main(["quantize", "--model", MODEL, "--calib", "test_cli_commands:train_batches", "--calib-first",
                 "--out", str(tmp_path / "c"), *args]) == 0
    assert main(["quantize", "--model", MODEL, "--calib", "test_cli_commands:calib_batches", "--out",
                 str(tmp_path / "d"), *args]) == 0
    assert set(rmsmp.row_plans(rmsmp.load_quantized(str(tmp_path / "d")))) == set(a)


def test_calibration_files_are_never_unpickled(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "obj.pt")  # a module: weights_only loading refuses it
    base = ["quantize", "--model", MODEL, "--out", str(tmp_path / "q"), "--calib"]
    with pytest.raises(SystemExit, match="not a readable .npy array"):
        main(base + [str(tmp_path / "obj.npy")])
    with pytest.raises(SystemExit, match="not a readable tensor file .*weights_only=True"):
        main(base + [str(tmp_path / "obj.pt")])
    with pytest.raises(SystemExit, match="give a .npy or .pt file"):
        main(base + [str(tmp_path / "calib.csv")])
    with pytest.raises(SystemExit, match="no such directory"):
        main(["compile", "--model", str(tmp_path / "missing" / "q"), "--input-shape", "1,2,8,8", "--out", "x.so"])
    assert not (tmp_path / "q").exists()


def test_compile_from_a_saved_dir_equals_the_torch_reference(work, saved, library):
    _, calib = work
    exe = rmsmp.load(str(library))
    q = rmsmp.load_quantized(str(saved))
    with torch.no_grad():
        ref = q(torch.from_numpy(calib[:2])).numpy()
    np.testing.assert_array_equal(exe(calib[:2]), ref)  # integer layers: bit-equal


def test_qat_writes_a_saved_dir(tmp_path, capsys):
    assert main(["qat", "--model", MODEL, "--data", "test_cli_commands:train_batches", "--epochs", "1",
                 "--max-steps", "2", "--assign", "variance", "--rounding", "nearest", "--out", str(tmp_path / "qat"),
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "QAT epoch 1/1: 2 steps" in out
    q = rmsmp.load_quantized(str(tmp_path / "qat"))
    assert set(rmsmp.row_plans(q)) == {"0", "3", "6", "8"}


def test_tune_rpc_flags_reach_the_tuner(work, saved, tmp_path, capsys, monkeypatch):
    """The RPC flags: parsed, validated, the tracker reached before any work.
    A real tuning run takes a minute or more here even at 2 trials (MetaSchedule's builders and
    cost model), past this file's time budget: the arguments reaching ``rmsmp.tune`` are checked
    with the tuner replaced; tests/test_tuning.py and tests/test_rpc_tuning.py tune for real."""
    target = {"kind": "llvm", "mcpu": "x86-64", "num-cores": 1}
    base = ["tune", "--model", str(saved), "--input-shape", "1,2,8,8", "--target", json.dumps(target), "-q"]
    with pytest.raises(SystemExit, match="--rpc-tracker and --rpc-key go together"):
        main(base + ["--rpc-tracker", "127.0.0.1:9190"])
    with pytest.raises(SystemExit, match="must be HOST:PORT"):
        main(base + ["--rpc-tracker", "127.0.0.1", "--rpc-key", "board"])
    with pytest.raises(SystemExit, match="--trials must be at least 1"):
        main(base + ["--trials", "0"])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit, match=f"RPC tracker 127.0.0.1:{port} is unreachable"):
        main(base + ["--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "board", "--work-dir", str(tmp_path / "r")])

    seen = {}

    def fake_tune(model, example_inputs, target, work_dir, trials, **kw):
        seen.update(model=model, shapes=[tuple(x.shape) for x in example_inputs], target=target, work_dir=work_dir,
                    trials=trials, **kw)
        return rmsmp.TuningReport(work_dir, json.dumps(target), {"rmsmp_dense_6_fixed_8": 2e-6}, trials)

    def fake_runner(rpc_config, max_workers):  # the real one starts a worker process: seconds here
        return types.SimpleNamespace(rpc_config=rpc_config, max_workers=max_workers)

    monkeypatch.setattr(rmsmp, "tune", fake_tune)
    monkeypatch.setattr("tvm_rmsmp.compiler.tuning.check_tracker", lambda runner: seen.update(checked=runner))
    monkeypatch.setattr("tvm.s_tir.meta_schedule.runner.RPCRunner", fake_runner)
    assert main(base + ["--work-dir", str(tmp_path / "t"), "--trials", "7", "--rpc-tracker", "10.0.0.5:9190",
                        "--rpc-key", "rk3399", "--rpc-timeout", "30"]) == 0
    config = seen["runner"].rpc_config
    assert seen["checked"].rpc_config is config and seen["runner"].max_workers == 1  # the tracker checked first
    assert (config.tracker_host, config.tracker_port, config.tracker_key) == ("10.0.0.5", 9190, "rk3399")
    assert config.session_timeout_sec == 30
    assert seen["target"] == target and seen["trials"] == 7 and seen["shapes"] == [(1, 2, 8, 8)]
    assert set(rmsmp.row_plans(seen["model"])) == {"0", "3", "6", "8"}
    assert "rmsmp_dense_6_fixed_8" in capsys.readouterr().out


def test_report_writes_json_and_plots(work, saved, library, tmp_path, capsys):
    d, _ = work
    out = tmp_path / "report"
    assert main(["report", str(saved), "--out", str(out), "--calib", str(d / "calib.npy"), "--calib-batch", "16",
                 "--library", str(library), "--input", str(d / "x.npy"), "--repeat", "2", "-q"]) == 0
    doc = json.loads((out / "report.json").read_text())
    q = rmsmp.load_quantized(str(saved))
    plans = rmsmp.row_plans(q)
    assert list(doc["layers"]) == list(plans)
    for name, entry in doc["layers"].items():
        counts = {s: plans[name].schemes.count(s) for s in set(plans[name].schemes)}
        assert entry["rows_per_scheme"] == counts and entry["rows"] == plans[name].num_rows
        assert entry["share_8bit_weights"] == pytest.approx(_eight_bit_share(counts))
        traces = q.rmsmp_row_hessian[name]
        assert entry["hessian_trace"]["max"] == pytest.approx(float(np.max(traces)))
        # errors of 4/8-bit weights with 8-bit activations: small but not zero
        assert 0 < entry["rel_error"] < 0.5 and 0 < entry["rel_error_accumulated"] < 0.5
    assert doc["latency_ms"]["total"] > 0 and doc["latency_ms"]["per_call_kind"]
    for png in ("rows.png", "layer_error.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    # report.json only, no float model or library
    assert main(["report", str(saved), "--out", str(tmp_path / "r2"), "--no-plots", "-q"]) == 0
    assert os.listdir(tmp_path / "r2") == ["report.json"]
    with pytest.raises(SystemExit, match="--library and --input go together"):
        main(["report", str(saved), "--out", str(tmp_path / "r3"), "--library", str(library)])


def test_profile_prints_the_calls(work, library, tmp_path, capsys):
    d, _ = work
    assert main(["profile", str(library), "--input", str(d / "x.npy"), "--repeat", "2", "--json",
                 str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "all calls" in out and "rmsmp_" in out
    rows = json.loads((tmp_path / "p.json").read_text())["ms"]
    assert rows and all(v >= 0 for v in rows.values())


def test_progress_switch(monkeypatch, capsys):
    """Bars go to stderr when switched on, never when off (--quiet, set_progress(False), the env)."""
    model, calib = tiny_cnn(), list(calib_batches())
    cfg = rmsmp.RMSMPConfig(assign="variance", rounding="nearest")
    try:
        set_progress(True)
        rmsmp.quantize(model, cfg, calib)
        assert "calibration" in capsys.readouterr().err
        set_progress(False)
        rmsmp.quantize(model, cfg, calib)
        assert "calibration" not in capsys.readouterr().err
        set_progress(None)
        monkeypatch.setenv("TVM_RMSMP_QUIET", "1")
        assert not progress_enabled()
        monkeypatch.setenv("TVM_RMSMP_QUIET", "0")
        assert progress_enabled() == sys.stderr.isatty()
    finally:
        set_progress(None)
    with pytest.raises(TypeError, match="True, False or None"):
        set_progress("yes")


def test_extras_match_pyproject_and_are_named_when_missing(monkeypatch, tmp_path):
    import importlib.util
    import tomllib

    from tvm_rmsmp.quant import extras

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    base = " ".join(project["dependencies"])
    optional = project["optional-dependencies"]
    assert set(extras.EXTRAS) <= set(optional)
    for heavy in ("xgboost", "tornado", "tokenizers", "matplotlib", "pyopencl", "psutil", "cloudpickle"):
        assert heavy not in base, heavy  # quantize + compile need none of them
    # scripts/_setup.sh installs .[test,bench]: together they hold every extra
    assert "tvm-rmsmp[tune,models,report,opencl,hf]" in optional["test"]

    real = importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name, *a: None if name == "xgboost" else real(name))
    with pytest.raises(SystemExit, match=r"xgboost \(MetaSchedule's cost model\): pip install 'tvm-rmsmp\[tune\]'"):
        main(["tune", "--model", MODEL, "--input-shape", "1,2,8,8", "--work-dir", str(tmp_path / "t")])
    with pytest.raises(ImportError, match=r"pip install 'tvm-rmsmp\[tune\]'"):
        rmsmp.tune(tiny_cnn(), (torch.zeros(1, 2, 8, 8),), work_dir=str(tmp_path / "t"))


def test_own_model_tutorial_runs(tmp_path, monkeypatch):
    """The README's "Quantize your own model" walkthrough, as tutorials/own_model.py."""
    from conftest import run_tutorial

    monkeypatch.setenv("PYTHONPATH", ROOT)  # this checkout's package, also in a worktree
    out = run_tutorial("own_model.py", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("float: ['norm']", "reloaded model equals the quantized one: True",
                 "TVM equals the torch reference: True", "loaded library equals the torch reference: True",
                 "report: ['report.json']"):
        assert line in out.stdout, out.stdout
    assert sorted(os.listdir(tmp_path / "smallnet-rmsmp")) == ["config.json", "hessians.safetensors",
                                                                 "weights.safetensors"]


def test_compile_dynamic_batch(work, saved, tmp_path):
    """--dynamic-batch: one library for any batch (where compile has dynamic_batch), else a clear error."""
    import inspect

    _, calib = work
    args = ["compile", "--model", str(saved), "--input-shape", "2,2,8,8", "--dynamic-batch", "-q",
            "--out", str(tmp_path / "dyn.so")]
    if "dynamic_batch" not in inspect.signature(rmsmp.compile).parameters:
        with pytest.raises(SystemExit, match="no compile\\(..., dynamic_batch=True\\)"):
            main(args)
        return
    assert main(args) == 0
    exe, q = rmsmp.load(str(tmp_path / "dyn.so")), rmsmp.load_quantized(str(saved))
    for n in (1, 3):
        with torch.no_grad():
            np.testing.assert_array_equal(exe(calib[:n]), q(torch.from_numpy(calib[:n])).numpy())


def test_bad_arguments_name_the_flag(work, tmp_path):
    d, _ = work
    base = ["quantize", "--model", MODEL, "--out", str(tmp_path / "q"), "--calib", str(d / "calib.npy")]
    with pytest.raises(SystemExit, match="--calib-limit must be at least 1"):
        main(base + ["--calib-limit", "0"])
    with pytest.raises(SystemExit, match="--calib-batch must be at least 1"):
        main(base + ["--calib-batch", "0"])
    with pytest.raises(SystemExit, match="--ratio .* is not JSON"):
        main(base + ["--ratio", "{sp2_4: 1}"])
    with pytest.raises(SystemExit, match="--input-dtype 'float99' is not a torch dtype"):
        main(["compile", "--model", MODEL, "--input-shape", "1,2,8,8", "--input-dtype", "float99", "--out", "x.so"])
    with pytest.raises(SystemExit, match="--input-shape must be comma-separated integers"):
        main(["compile", "--model", MODEL, "--input-shape", "1x2", "--out", "x.so"])
    with pytest.raises(SystemExit, match="is a float model: give --calib"):
        main(["compile", "--model", MODEL, "--input-shape", "1,2,8,8", "--out", str(tmp_path / "x.so")])
    assert not (tmp_path / "q").exists() and not (tmp_path / "x.so").exists()
