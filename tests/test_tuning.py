"""MetaSchedule tuning of the row-group kernels: records, resume, corrupt files, wrong targets."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import tvm_rmsmp as rmsmp
from conftest import tunable_cpu_target


TARGET = tunable_cpu_target()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio={"sp2_4": 0.5, "fixed_8": 0.5}), [torch.randn(2, 3, 8, 8)])
    x = torch.randn(2, 3, 8, 8)
    work_dir = str(tmp_path_factory.mktemp("tuning"))
    report = rmsmp.tune(q, (x,), TARGET, work_dir, trials=16, trials_per_iter=8, progress=False)
    return q, x, work_dir, report


@pytest.mark.slow
def test_tune_writes_records_and_compile_uses_them(tuned):
    q, x, work_dir, report = tuned
    # the target has no fixed kernel (an x86 host is tuned as plain x86-64): every group a task
    assert report.trials == 16 and len(report.tasks) == 4, report.tasks
    assert any(v is not None and v > 0 for v in report.tasks.values())
    records = open(os.path.join(work_dir, "database_tuning_record.json")).read().splitlines()
    assert len(records) >= 1
    exe = rmsmp.compile(q, (x,), target=TARGET, tuning=work_dir)
    assert exe.stats["tuned"] >= 1
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


@pytest.mark.slow
def test_second_tune_resumes_and_keeps_records(tuned):
    q, x, work_dir, _ = tuned
    path = os.path.join(work_dir, "database_tuning_record.json")
    before = open(path).read().splitlines()
    rmsmp.tune(q, (x,), TARGET, work_dir, trials=8, trials_per_iter=8, progress=False)
    after = open(path).read().splitlines()
    assert after[: len(before)] == before and len(after) >= len(before)


def test_nothing_to_tune_where_every_group_has_a_fixed_kernel(tmp_path):
    """With AVX2 every row group (packed 4-bit and int8, dense and conv) runs a hand-written
    kernel: tuning says so and measures nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio={"sp2_4": 0.5, "fixed_8": 0.5}), [torch.randn(2, 3, 8, 8)])
    target = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
    with pytest.warns(rmsmp.RMSMPWarning, match="no row-group kernel to tune"):
        report = rmsmp.tune(q, (torch.randn(2, 3, 8, 8),), target, str(tmp_path / "t"), trials=4, progress=False)
    assert report.tasks == {} and report.trials == 0


def test_corrupt_and_torn_records(tmp_path):
    from tvm_rmsmp.compiler.records import check_records as _check_records

    good = json.dumps([0, [[], []]])
    (tmp_path / "database_tuning_record.json").write_text(good + "\n{broken\n" + good + "\n")
    with pytest.raises(ValueError, match="database_tuning_record.json is corrupt at line 2"):
        _check_records(str(tmp_path))
    (tmp_path / "database_tuning_record.json").write_text(good + "\n" + good[:7])  # killed mid-write
    with pytest.warns(rmsmp.RMSMPWarning, match="dropping a torn last record"):
        _check_records(str(tmp_path))
    assert (tmp_path / "database_tuning_record.json").read_text() == good + "\n"


def test_directory_of_another_target_is_refused(tmp_path, small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    x = torch.randn(4, 1, 16, 16)
    (tmp_path / "rmsmp_tuning.json").write_text(json.dumps(
        {"format": "tvm-rmsmp-tuning", "version": 1, "target": json.dumps({"kind": "llvm", "mcpu": "cortex-a76"}),
         "kernels": []}))
    with pytest.raises(ValueError, match="was tuned for .*cortex-a76"):
        rmsmp.compile(q, (x,), tuning=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rmsmp.compile(q, (x,), tuning=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="trials must be >= 1"):
        rmsmp.tune(q, (x,), "llvm", str(tmp_path / "t2"), trials=0)


@pytest.mark.slow
def test_directory_of_another_model_is_detected(tuned):
    """Records are keyed by kernel: another model's directory applies nothing, and says so."""
    _, _, work_dir, _ = tuned
    torch.manual_seed(1)
    other = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6)).eval()
    q = rmsmp.quantize(other, rmsmp.RMSMPConfig(ratio={"sp2_4": 0.5, "fixed_8": 0.5}), [torch.randn(2, 1, 8, 8)])
    x = torch.randn(1, 1, 8, 8)
    with pytest.warns(rmsmp.RMSMPWarning, match="has no record for any kernel of this model"):
        exe = rmsmp.compile(q, (x,), target=TARGET, tuning=work_dir)
    assert exe.stats["tuned"] == 0
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
