"""The tvm-rmsmp command line."""

import numpy as np
import pytest

import tvm_rmsmp as rmsmp
from tvm_rmsmp.cli.main import main


def test_schemes(capsys):
    assert main(["schemes"]) == 0
    out = capsys.readouterr().out
    assert "sp2_4" in out and "[-8, -6, -5, -4, -2, -1, 0, 1, 2, 4, 5, 6, 8]" in out


@pytest.mark.parametrize("flags", [[], ["--no-fast-math"]])
def test_compile_writes_a_loadable_library(tmp_path, capsys, flags):
    calib = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "calib.npy", calib)
    out = tmp_path / "m.so"
    assert main(["compile", "--model", "tvm_rmsmp.models.fmnist_cnn:load_pretrained", "--input-shape", "2,1,28,28",
                 "--calib", str(tmp_path / "calib.npy"), "--out", str(out)] + flags) == 0
    assert "features.4" in capsys.readouterr().out
    exe = rmsmp.load(str(out))
    assert exe(calib[:2]).shape == (2, 10)


def test_compile_rejects_pickles_and_bad_shapes(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    args = ["compile", "--model", "tvm_rmsmp.models.fmnist_cnn:FashionCNN", "--input-shape", "1,1,28,28", "--out",
            str(tmp_path / "x.so"), "--calib"]
    with pytest.raises(SystemExit, match="not a readable .npy array"):
        main(args + [str(tmp_path / "obj.npy")])
    np.save(tmp_path / "small.npy", np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(SystemExit, match="has shape \\(4, 1, 8, 8\\), the model input is \\(1, 1, 28, 28\\)"):
        main(args + [str(tmp_path / "small.npy")])
    with pytest.raises(SystemExit, match="no_such_module"):
        main(["compile", "--model", "no_such_module:f", "--input-shape", "1", "--calib", "x", "--out", "y"])
