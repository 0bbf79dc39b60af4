"""Quantization-aware training: fake-quant forward, conversion, re-assignment, DDP."""

import os
import socket

import attrs
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import tvm_rmsmp as rmsmp
from tvm_rmsmp.nn.qat import QATConfig, convert_qat, prepare_qat, qat_layers, reassign_rows, train_qat

CFG = rmsmp.RMSMPConfig(assign="hessian", hessian=rmsmp.HessianConfig(probes=2, batches=2))


def _random_batches(steps, seed, shape=(8, 1, 16, 16), shard=0, shards=1):
    def batches(epoch):
        g = torch.Generator().manual_seed(seed + 1000 * epoch)
        for i in range(steps * shards):
            x, y = torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)
            if i % shards == shard:
                yield (x,), y

    return batches


def test_untrained_qat_model_converts_to_the_ptq_model(small_resnet):
    model, calib = small_resnet
    qat = prepare_qat(model, CFG, calib, QATConfig(edge_scheme=None))
    ptq = rmsmp.quantize(model, CFG, calib)
    q = convert_qat(qat)
    for name, plan in rmsmp.row_plans(ptq).items():
        got = rmsmp.row_plans(q)[name]
        assert got.schemes == plan.schemes
        np.testing.assert_array_equal(got.weight_int, plan.weight_int)
        np.testing.assert_array_equal(got.row_scale, plan.row_scale)
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = ptq(x).numpy()
    np.testing.assert_array_equal(q(x).numpy(), ref)
    # the fake-quantized forward is the integer model up to float rounding (x / s vs x * (1/s)
    # can put an activation on the other side of a rounding boundary now and then)
    with torch.no_grad():
        fake = qat.eval()(x).numpy()
    close = np.isclose(fake, ref, rtol=1e-3, atol=1e-3)
    assert close.mean() > 0.95 and np.abs(fake - ref).max() < 0.1 * np.abs(ref).max()


def test_qat_trains_scales_and_weights_and_the_tvm_build_still_equals_the_reference(small_resnet):
    model, calib = small_resnet
    qat = prepare_qat(model, CFG, calib)  # default policy: first and last layer 8-bit fixed
    layers = qat_layers(qat)
    assert set(layers["stem.0"].schemes) == {"fixed_8"} and set(layers["fc2"].schemes) == {"fixed_8"}
    before = {n: (l.weight.detach().clone(), l.row_scale.detach().clone(), l.act_scale.item()) for n, l in layers.items()}
    losses = []
    train_qat(qat, _random_batches(6, 0), torch.nn.functional.cross_entropy, QATConfig(epochs=2, lr=1e-3),
              log=losses.append)
    assert len(losses) == 2
    for n, l in qat_layers(qat).items():
        w, s, a = before[n]
        assert not torch.equal(l.weight, w) and not torch.equal(l.row_scale, s) and l.act_scale.item() != a
    q = convert_qat(qat)
    x = torch.randn(3, 1, 16, 16)
    exe = rmsmp.compile(q, (x,), target="llvm")
    np.testing.assert_array_equal(exe(x), q(x).numpy())


def test_reassignment_follows_the_weights(small_resnet):
    model, calib = small_resnet
    cfg = rmsmp.RMSMPConfig(assign="variance")
    qat = prepare_qat(model, cfg, calib, QATConfig(edge_scheme=None))
    layer = qat_layers(qat)["fc1"]
    old = layer.schemes
    with torch.no_grad():  # make every SP2 row uniform-like and every fixed row Gaussian-like
        g = torch.Generator().manual_seed(0)
        for i, s in enumerate(old):
            k = layer.weight.shape[1]
            layer.weight[i] = torch.rand(k, generator=g) - 0.5 if s == "sp2_4" else torch.randn(k, generator=g) * 0.2
    moved = reassign_rows(qat, calib)
    assert moved > 0 and qat.rmsmp_report["reassigned_rows"] == moved
    assert layer.schemes != old and sorted(layer.schemes) == sorted(old)
    q = convert_qat(qat)
    assert rmsmp.row_plans(q)["fc1"].schemes == layer.schemes


def test_qat_rounds_to_nearest_whatever_the_ptq_rounding(small_resnet):
    model, calib = small_resnet
    with pytest.warns(rmsmp.RMSMPWarning, match="rounding='gptq' does not apply to QAT"):
        qat = prepare_qat(model, attrs.evolve(CFG, rounding="gptq"), calib, QATConfig(edge_scheme=None))
    assert qat.rmsmp_config.rounding == "nearest"


def test_qat_bad_input(small_resnet):
    model, calib = small_resnet
    with pytest.raises(ValueError, match="reassign_every"):
        QATConfig(reassign_every=0)
    with pytest.raises(ValueError, match="no FakeQuantLayer"):
        train_qat(model, _random_batches(1, 0), torch.nn.functional.cross_entropy)
    qat = prepare_qat(model, CFG, calib)
    with pytest.raises(ValueError, match="calib_data"):
        train_qat(qat, _random_batches(1, 0), torch.nn.functional.cross_entropy, QATConfig(epochs=2, reassign_every=1))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import SmallResNet, randomize_bn

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = randomize_bn(SmallResNet()).eval()
        calib = [torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        if rank == 1:  # a different start on purpose: rank 0's state must win everywhere
            calib = [c * 1.5 for c in calib]
        qat = prepare_qat(model, CFG, calib)
        train_qat(qat, _random_batches(4, 7, shard=rank, shards=world), torch.nn.functional.cross_entropy,
                  QATConfig(epochs=3, lr=1e-3, reassign_every=1), calib_data=calib)
        q = convert_qat(qat)
        arrays = {f"{n}.{k}": v.detach().numpy() for n, l in qat_layers(qat).items()
                  for k, v in (("weight", l.weight), ("row_scale", l.row_scale), ("act_scale", l.act_scale))}
        for n, p in rmsmp.row_plans(q).items():
            arrays[f"{n}.schemes"] = np.array(p.schemes)
            arrays[f"{n}.weight_int"] = p.weight_int
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **arrays)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_end_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert sorted(r0.files) == sorted(r1.files)
    for k in r0.files:
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
