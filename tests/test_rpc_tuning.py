"""Tuning through TVM RPC on loopback: a tracker and two servers started here."""

import os

import numpy as np
import pytest
import torch
from torch import nn

import tvm_rmsmp as rmsmp
from conftest import tunable_cpu_target
from tvm_rmsmp.runtime.rpc import LoopbackRPC, free_port

TARGET = tunable_cpu_target()


def _small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio={"sp2_4": 0.5, "fixed_8": 0.5}), [torch.randn(2, 3, 6, 6)])
    return q, torch.randn(1, 3, 6, 6)


@pytest.mark.slow
def test_tune_over_rpc_with_a_tracker_and_two_servers(tmp_path):
    q, x = _small_model()
    work_dir = str(tmp_path / "rpc_tuning")
    with LoopbackRPC(servers=2, key="rmsmp-test") as rpc:
        assert rpc.free_servers() == 2
        report = rmsmp.tune(q, (x,), TARGET, work_dir, trials=4, trials_per_iter=2, runner=rpc.runner(),
                            progress=False)
    assert report.trials == 4
    measured = [v for v in report.tasks.values() if v is not None]
    assert measured and all(v > 0 for v in measured), report.tasks
    records = open(os.path.join(work_dir, "database_tuning_record.json")).read().splitlines()
    assert len(records) >= 1
    # the servers are gone; the records stay and a build uses them
    exe = rmsmp.compile(q, (x,), target=TARGET, tuning=work_dir)
    assert exe.stats["tuned"] >= 1
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


def test_unreachable_tracker_is_a_clear_error(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    q, x = _small_model()
    port = free_port()  # nothing listens there
    runner = ms.runner.RPCRunner(rpc_config=ms.runner.RPCConfig(
        tracker_host="127.0.0.1", tracker_port=port, tracker_key="nobody", session_timeout_sec=5))
    with pytest.raises(ConnectionError, match=f"RPC tracker 127.0.0.1:{port} is unreachable"):
        rmsmp.tune(q, (x,), TARGET, str(tmp_path / "t"), trials=2, runner=runner, progress=False)
    assert not os.path.exists(tmp_path / "t" / "database_tuning_record.json")


@pytest.mark.slow
def test_tracker_without_a_server_of_the_key_is_a_clear_error(tmp_path):
    q, x = _small_model()
    with LoopbackRPC(servers=1, key="some-board") as rpc:
        from tvm.s_tir import meta_schedule as ms

        runner = ms.runner.RPCRunner(rpc_config=ms.runner.RPCConfig(
            tracker_host=rpc.host, tracker_port=rpc.port, tracker_key="another-board", session_timeout_sec=5))
        with pytest.raises(ConnectionError, match="no server with key 'another-board'"):
            rmsmp.tune(q, (x,), TARGET, str(tmp_path / "t"), trials=2, runner=runner, progress=False)


@pytest.mark.slow
def test_a_server_dying_mid_tuning_loses_no_record(tmp_path):
    """One of two servers is killed once the first records are written: the run finishes on
    the other, every record written before stays, and a build uses them."""
    import threading
    import time

    q, x = _small_model()
    work_dir = str(tmp_path / "rpc_tuning")
    path = os.path.join(work_dir, "database_tuning_record.json")
    with LoopbackRPC(servers=2, key="rmsmp-dying") as rpc:
        result = {}

        def tune():
            try:
                result["report"] = rmsmp.tune(q, (x,), TARGET, work_dir, trials=12, trials_per_iter=2,
                                              runner=rpc.runner(session_timeout_sec=20), progress=False)
            except BaseException as err:  # noqa: BLE001 - reported by the assertion below
                result["error"] = err

        worker = threading.Thread(target=tune)
        worker.start()
        deadline = time.time() + 600
        while time.time() < deadline and worker.is_alive() and not (os.path.exists(path) and open(path).read()):
            time.sleep(0.2)
        before = open(path).read().splitlines() if os.path.exists(path) else []
        victim = rpc.procs[1]  # procs[0] is the tracker
        victim.kill()
        victim.wait(timeout=10)
        worker.join(timeout=900)
    assert not worker.is_alive(), "tuning hung after a server died"
    assert "error" not in result, result.get("error")
    assert before, "the server was killed before any record was written"
    after = open(path).read().splitlines()
    assert after[:len(before)] == before
    exe = rmsmp.compile(q, (x,), target=TARGET, tuning=work_dir)
    assert exe.stats["tuned"] >= 1
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())
