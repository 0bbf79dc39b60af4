"""The main job on real data: the shipped Fashion-MNIST CNN, quantized and compiled."""

import os

import pytest

from conftest import needs_opencl, run_tutorial
from tvm_rmsmp.models.data import FASHION_MNIST_DIR

needs_data = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist (scripts/_setup.sh does)",
)


@needs_data
@pytest.mark.slow
def test_demo_tvm_equals_reference_and_keeps_accuracy():
    from tvm_rmsmp.cli.demo import run

    r = run(limit=2000, batch=100, repeat=5, quiet=True)
    acc = r["accuracy"]
    assert r["tvm_equals_reference_bitwise"]
    assert acc["RMSMP (TVM)"] == acc["RMSMP reference (torch)"]
    assert acc["fp32 (torch)"] > 0.90  # the shipped checkpoint
    assert acc["fp32 (torch)"] - acc["RMSMP (TVM)"] < 0.02
    assert r["rows"]["features.4"] == {"sp2_4": 39, "fixed_4": 22, "fixed_8": 3}
    assert r["gathers"]["kept"] == 1


@needs_data
@pytest.mark.slow
def test_quickstart_tutorial_runs(tmp_path):
    out = run_tutorial("quickstart.py", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded library matches: True" in out.stdout


@needs_data
@pytest.mark.slow
@needs_opencl()
def test_mobile_gpu_tutorial_runs(tmp_path):
    out = run_tutorial("deploy_mobile_gpu.py", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OpenCL (PoCL) equals the torch reference: True" in out.stdout
    assert "OpenCL (PoCL) equals the CPU build: True" in out.stdout
    assert os.path.exists(tmp_path / "fmnist_mali.so")


@pytest.mark.slow
def test_deploy_cpu_tutorial_runs(tmp_path):
    out = run_tutorial("deploy_cpu.py", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TVM equals the torch reference: True" in out.stdout
    assert "loaded library matches: True" in out.stdout
    assert os.path.exists(tmp_path / "ffn_rmsmp.so")


@pytest.mark.slow
def test_tune_cpu_tutorial_runs(tmp_path):
    out = run_tutorial("tune_cpu.py", str(tmp_path), "--trials", "4")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RPC tuning: 4 trials" in out.stdout
    assert "tuned build equals the torch reference: True" in out.stdout
    assert os.path.exists(tmp_path / "tuning_rpc" / "database_tuning_record.json")


@needs_data
@pytest.mark.slow
def test_fpga_tutorial_runs():
    out = run_tutorial("deploy_fpga.py", "xc7z020")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "derived ratio: {'sp2_4': 0.6, 'fixed_4': 0.35, 'fixed_8': 0.05}" in out.stdout
    assert "simulator equals the torch reference: True" in out.stdout
