"""Saving and loading quantized models (tvm_rmsmp.save_quantized / load_quantized)."""

from __future__ import annotations

import functools
import json
import os
import pickle

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import tvm_rmsmp as rmsmp
from tvm_rmsmp.models.fmnist_resnet import ResNet20
from tvm_rmsmp.nn.saved import FORMAT, FORMAT_VERSION

FAST = rmsmp.RMSMPConfig(assign="variance", rounding="nearest")


def _resnet(seed=0):
    torch.manual_seed(seed)
    model = ResNet20(blocks=1)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # BN statistics that are not the identity: folding has work to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


class TinyTransformer(nn.Module):
    """Embedding -> encoder layer (attention + FFN) -> head; the head stays in float (skipped)."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 5)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)))


def _no_pickle_files(path):
    for f in os.listdir(path):
        with open(os.path.join(path, f), "rb") as fh:
            head = fh.read(4)
        assert not head.startswith(b"\x80"), f"{f} is a pickle"
        assert not head.startswith(b"PK"), f"{f} is a zip (torch.save) archive"
    assert sorted(os.listdir(path)) in (["config.json", "weights.safetensors"],
                                        ["config.json", "hessians.safetensors", "weights.safetensors"])


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("load_quantized must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)

    class Refused(pickle.Unpickler):
        def __init__(self, *a, **k):
            refuse()

    monkeypatch.setattr(pickle, "Unpickler", Refused)


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory):
    calib = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = rmsmp.RMSMPConfig(assign="hessian", hessian=rmsmp.HessianConfig(probes=1, batches=2))
    q = rmsmp.quantize(_resnet(), cfg, calib)
    path = str(tmp_path_factory.mktemp("saved") / "resnet-q")
    rmsmp.save_quantized(q, path, hessians=True, factory=functools.partial(ResNet20, blocks=1))
    return q, path


def test_cnn_round_trip_is_bit_equal_with_the_factory_and_with_a_fresh_model(saved_cnn, no_unpickling):
    q, path = saved_cnn
    _no_pickle_files(path)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    ref = q(x)
    for model in (None, ResNet20(blocks=1), lambda: ResNet20(blocks=1)):
        q2 = rmsmp.load_quantized(path, model=model)
        assert not q2.training
        assert torch.equal(q2(x), ref)
        for name, plan in rmsmp.row_plans(q).items():
            got = rmsmp.row_plans(q2)[name]
            assert got.schemes == plan.schemes
            np.testing.assert_array_equal(got.weight_int, plan.weight_int)
            np.testing.assert_array_equal(got.row_scale, plan.row_scale)
    assert q2.rmsmp_config == q.rmsmp_config
    assert q2.rmsmp_report["assign"] == "hessian"
    assert set(q2.rmsmp_row_hessian) == set(q.rmsmp_row_hessian)
    for name, traces in q.rmsmp_row_hessian.items():
        np.testing.assert_array_equal(q2.rmsmp_row_hessian[name], traces)
    meta = json.load(open(os.path.join(path, "config.json")))
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
    assert meta["factory"] == {"callable": "tvm_rmsmp.models.fmnist_resnet:ResNet20", "args": [],
                               "kwargs": {"blocks": 1}}
    assert meta["layers"]["stem.0"]["stride"] == [1, 1] and meta["layers"]["stem.0"]["padding"] == [1, 1]


def test_the_saved_traces_reproduce_the_quantization(saved_cnn):
    q, path = saved_cnn
    q2 = rmsmp.load_quantized(path)
    calib = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    again = rmsmp.quantize(_resnet(), q.rmsmp_config, calib, row_hessian=q2.rmsmp_row_hessian)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again(x), q(x))


def test_the_loaded_model_lowers_to_the_same_module(saved_cnn):
    q, path = saved_cnn
    q2 = rmsmp.load_quantized(path)
    x = torch.randn(1, 1, 28, 28)
    a, _ = rmsmp.lower(q, (x,), "llvm", schedule=False)
    b, _ = rmsmp.lower(q2, (x,), "llvm", schedule=False)
    tvm.ir.assert_structural_equal(a, b, map_free_vars=True)


@pytest.mark.parametrize("act", [dict(act_zero_point="always"), dict(act_granularity="per_token")])
def test_transformer_round_trip(tmp_path, act, no_unpickling):
    model = TinyTransformer().eval()
    calib = [torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = rmsmp.RMSMPConfig(assign="variance", rounding="nearest", skip="head", **act)
    with pytest.warns(rmsmp.RMSMPWarning):  # the embedding stays in float
        q = rmsmp.quantize(model, cfg, calib)
    layers = rmsmp.nn.rmsmp_layers(q)
    assert "enc.self_attn.q_proj" in layers and "head" not in layers
    rmsmp.save_quantized(q, tmp_path / "t")
    _no_pickle_files(tmp_path / "t")
    q2 = rmsmp.load_quantized(tmp_path / "t", model=TinyTransformer())
    x = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(9))
    assert torch.equal(q2(x), q(x))
    lay = rmsmp.nn.rmsmp_layers(q2)["enc.linear1"]
    if "act_zero_point" in act:
        assert lay.act_zero_point is not None and lay.act_zero_point == layers["enc.linear1"].act_zero_point
    else:
        assert lay.act_per_token
    assert isinstance(q2.head, nn.Linear)  # skipped: float, its trained weights restored
    assert torch.equal(q2.head.weight, model.head.weight) and torch.equal(q2.emb.weight, model.emb.weight)


def test_qat_converted_round_trip(tmp_path, small_resnet, no_unpickling):
    from conftest import SmallResNet

    model, calib = small_resnet
    qat = rmsmp.prepare_qat(model, FAST, calib)

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(2):
            yield (torch.randn(8, 1, 16, 16, generator=g),), torch.randint(0, 10, (8,), generator=g)

    rmsmp.train_qat(qat, batches, nn.functional.cross_entropy, rmsmp.QATConfig(epochs=1, lr=1e-3))
    with pytest.raises(ValueError, match="convert_qat"):
        rmsmp.save_quantized(qat, tmp_path / "qat")
    q = rmsmp.convert_qat(qat)
    rmsmp.save_quantized(q, tmp_path / "q")
    q2 = rmsmp.load_quantized(tmp_path / "q", model=SmallResNet())
    x = torch.randn(5, 1, 16, 16)
    assert torch.equal(q2(x), q(x))


# ---------------------------------------------------------------------------- errors
def test_clear_errors(saved_cnn, tmp_path):
    q, path = saved_cnn
    with pytest.raises(FileNotFoundError, match="no saved quantized model"):
        rmsmp.load_quantized(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        rmsmp.load_quantized(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        rmsmp.load_quantized(tmp_path / "empty")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="format None, expected 'tvm-rmsmp-quantized'"):
        rmsmp.load_quantized(tmp_path / "hf")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        rmsmp.load_quantized(tmp_path / "bad")

    def copy(name):
        import shutil

        shutil.copytree(path, tmp_path / name)
        return tmp_path / name

    newer = copy("newer")
    meta = json.loads((newer / "config.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (newer / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer tvm-rmsmp"):
        rmsmp.load_quantized(newer)

    short = copy("truncated")
    data = (short / "weights.safetensors").read_bytes()
    (short / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="weights.safetensors.*corrupt or truncated"):
        rmsmp.load_quantized(short)

    # a damaged file whose checksum was rewritten too: safetensors itself refuses it
    garbage = copy("garbage")
    (garbage / "weights.safetensors").write_bytes(b"\xff" * 64)
    meta = json.loads((garbage / "config.json").read_text())
    from tvm_rmsmp.nn.saved import _digest

    size, sha = _digest(str(garbage / "weights.safetensors"))
    meta["files"]["weights.safetensors"] = {"size": size, "sha256": sha}
    (garbage / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        rmsmp.load_quantized(garbage)

    (copy("missing") / "hessians.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="hessians.safetensors"):
        rmsmp.load_quantized(tmp_path / "missing")

    with pytest.raises(ValueError, match=r"layer 'fc'.*weight shape \[7, 64\].*\[10, 64\]"):
        rmsmp.load_quantized(path, model=ResNet20(num_classes=7, blocks=1))
    with pytest.raises(ValueError, match="no module 'stem.0'"):
        rmsmp.load_quantized(path, model=nn.Sequential())

    nofactory = tmp_path / "nofactory"
    rmsmp.save_quantized(q, nofactory)
    with pytest.raises(ValueError, match="records no factory"):
        rmsmp.load_quantized(nofactory)


def test_factory_must_be_importable(saved_cnn, tmp_path):
    q, _ = saved_cnn
    with pytest.raises(ValueError, match="lambda"):
        rmsmp.save_quantized(q, tmp_path / "a", factory=lambda: ResNet20(blocks=1))
    with pytest.raises(ValueError, match="does not resolve"):
        rmsmp.save_quantized(q, tmp_path / "a", factory="no_such_module_xyz:build")
    with pytest.raises(ValueError, match="module:callable"):
        rmsmp.save_quantized(q, tmp_path / "a", factory="not a spec")
    assert not os.path.exists(tmp_path / "a")
    rmsmp.save_quantized(q, tmp_path / "a", factory=ResNet20)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["factory"]["callable"] == \
        "tvm_rmsmp.models.fmnist_resnet:ResNet20"


def test_writes_are_atomic_and_never_clobber_other_directories(saved_cnn, tmp_path, monkeypatch):
    q, _ = saved_cnn
    target = tmp_path / "m"
    rmsmp.save_quantized(q, target)
    rmsmp.save_quantized(q, target)  # replaces a saved model
    assert sorted(os.listdir(tmp_path)) == ["m"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved quantized model"):
        rmsmp.save_quantized(q, other)
    assert os.listdir(other) == ["notes.txt"]

    import safetensors.torch

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        rmsmp.save_quantized(q, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        rmsmp.save_quantized(q, target)
    assert sorted(os.listdir(tmp_path)) == ["m", "mine"]  # no half-written or temporary directory
    assert rmsmp.load_quantized(target, model=ResNet20(blocks=1)) is not None


def test_save_refuses_what_is_not_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="no RMSMP layer"):
        rmsmp.save_quantized(ResNet20(blocks=1), tmp_path / "f")
    with pytest.raises(TypeError):
        rmsmp.save_quantized("model", tmp_path / "f")


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so its BatchNorm stays float."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if float(y.detach().mean()) > 1e9:
            y = y * 2
        return self.fc(torch.relu(y).flatten(1))


def test_a_model_whose_batchnorm_could_not_be_folded(tmp_path):
    model = Untraceable().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    with pytest.warns(rmsmp.RMSMPWarning, match="BatchNorm layers stay in float"):
        q = rmsmp.quantize(model, FAST, [torch.randn(4, 1, 8, 8)])
    rmsmp.save_quantized(q, tmp_path / "u")
    q2 = rmsmp.load_quantized(tmp_path / "u", model=Untraceable())
    assert isinstance(q2.bn, nn.BatchNorm2d) and torch.equal(q2.bn.running_var, model.bn.running_var)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(q2(x), q(x))


def test_a_pruned_model_keeps_its_masks(tmp_path, no_unpickling):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    calib = [torch.randn(32, 64) for _ in range(2)]
    pm = rmsmp.prune(model, rmsmp.PruneConfig(scheme="block_punched", sparsity=0.75, block=(8, 4)), calib_data=calib)
    q = rmsmp.quantize(pm, rmsmp.RMSMPConfig(act_bits=8), calib_data=calib)
    rmsmp.save_quantized(q, tmp_path / "q")
    q2 = rmsmp.load_quantized(tmp_path / "q", model=model)
    x = torch.randn(5, 64)
    assert torch.equal(q(x), q2(x))
    before, after = rmsmp.prune_masks(q), rmsmp.prune_masks(q2)
    assert sorted(before) == sorted(after) == ["0", "2"]
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
        # 75 % of the 8x4 blocks removed: the kept share, counted here, not taken from the pruner
        assert abs(after[name].mean() - 0.25) < 0.02
