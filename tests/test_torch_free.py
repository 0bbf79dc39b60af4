"""Deployment without torch: an exported library loads and runs where ``import torch`` fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import tvm_rmsmp as rmsmp
from conftest import run_tutorial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, NoTorch())
""")


def _run_without_torch(code: str):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


class TwoInputs(torch.nn.Module):
    """Two inputs, a dict result: the sidecar carries the output structure."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 16)
        self.b = torch.nn.Linear(16, 6)

    def forward(self, x, y):
        h = torch.relu(self.a(x)) * y
        return {"logits": self.b(h), "hidden": h}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    cfg = rmsmp.RMSMPConfig(assign="variance", rounding="nearest")
    calib = [(torch.randn(4, 12), torch.rand(4, 16)) for _ in range(2)]
    q = rmsmp.quantize(TwoInputs().eval(), cfg, calib)
    x, y = torch.randn(3, 12), torch.rand(3, 16)
    exe = rmsmp.compile(q, (x, y))
    folder = tmp_path_factory.mktemp("deploy")
    path = exe.export_library(str(folder / "m.so"))
    np.save(folder / "x.npy", x.numpy())
    np.save(folder / "y.npy", y.numpy())
    ref = exe(x, y)
    with torch.no_grad():
        torch_ref = q(x, y)
    np.testing.assert_array_equal(ref["logits"], torch_ref["logits"].numpy())
    return folder, path, ref


def test_load_and_run_where_torch_cannot_be_imported(exported):
    folder, path, ref = exported
    out = _run_without_torch(f"""
        import numpy as np
        import tvm_rmsmp
        from tvm_rmsmp.runtime import load
        x, y = np.load({str(folder / 'x.npy')!r}), np.load({str(folder / 'y.npy')!r})
        for loader in (load, tvm_rmsmp.load):   # the package's top-level name too
            exe = loader({path!r})
            res = exe(x, y)
            np.save({str(folder / 'logits.npy')!r}, res["logits"])
            np.save({str(folder / 'hidden.npy')!r}, res["hidden"])
        named = exe({{"x": x, "y": y}})  # inputs by name, as exported
        assert all((named[k] == res[k]).all() for k in res)
        try:
            exe(x[:1], y)
        except ValueError as err:
            print("refused:", err)
        try:
            exe(x, y, output="torch")
        except ImportError as err:
            print("no torch:", err)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
    """)
    assert "ok" in out and "refused: input 0 has shape [1, 12]" in out
    assert "no torch: output='torch' needs torch" in out
    np.testing.assert_array_equal(np.load(folder / "logits.npy"), ref["logits"])
    np.testing.assert_array_equal(np.load(folder / "hidden.npy"), ref["hidden"])


def test_a_damaged_library_is_refused_without_torch_too(exported, tmp_path):
    folder, path, _ = exported
    bad = tmp_path / "m.so"
    data = open(path, "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    (tmp_path / "m.so.json").write_text(json.dumps(json.load(open(path + ".json"))))
    out = _run_without_torch(f"""
        from tvm_rmsmp.runtime import load
        try:
            load({str(bad)!r})
        except ValueError as err:
            print("refused:", err)
    """)
    assert "refused:" in out and "truncated" in out


def test_tutorial_deploy_without_torch():
    out = run_tutorial("deploy_without_torch.py")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "equal to the build machine's result: True" in out.stdout
    assert "plain TVM gives the same: True" in out.stdout
    assert "torch imported: False" in out.stdout
