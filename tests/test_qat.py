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
    with torch.no_grad():
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


def test_gptq_qat_starts_at_the_gptq_ptq_model(small_resnet):
    model, calib = small_resnet
    cfg = attrs.evolve(CFG, rounding="gptq")
    qat = prepare_qat(model, cfg, calib, QATConfig(edge_scheme=None))
    ptq = rmsmp.quantize(model, cfg, calib)
    q = convert_qat(qat)
    for name, plan in rmsmp.row_plans(ptq).items():
        np.testing.assert_array_equal(rmsmp.row_plans(q)[name].weight_int, plan.weight_int)
    nearest = rmsmp.quantize(model, attrs.evolve(CFG, rounding="nearest"), calib)
    assert any(not np.array_equal(p.weight_int, rmsmp.row_plans(nearest)[n].weight_int)
               for n, p in rmsmp.row_plans(ptq).items())


def test_log_scales_move_by_a_fraction_of_themselves(small_resnet):
    """One Adam step changes each learned parameter by about lr: in log form a scale moves by
    a factor exp(+-scale_lr) whatever its size; linear scales move by scale_lr in absolute terms."""
    model, calib = small_resnet
    for mode in ("log", "linear"):  # from nearest rounding: gradients well above Adam's eps
        qat = prepare_qat(model, attrs.evolve(CFG, rounding="nearest"), calib, QATConfig(edge_scheme=None))
        before = {n: l.row_scale.detach().clone() for n, l in qat_layers(qat).items()}
        train_qat(qat, _random_batches(1, 0), torch.nn.functional.cross_entropy,
                  QATConfig(epochs=1, lr=0.0, scale_lr=0.01, scale_param=mode, schedule="constant"))
        for n, l in qat_layers(qat).items():
            new, old = l.row_scale.detach().double(), before[n].double()
            moved = new != old
            # |step| <= lr, and close to lr where the gradient is well above Adam's eps (most rows)
            step = ((new / old).log() if mode == "log" else new - old)[moved].abs().numpy()
            assert step.max() <= 0.01 * 1.001 and np.median(step) > 0.009, (n, step)


def test_warmup_then_cosine_schedule(small_resnet):
    """Peak rates times (s + 1) / (w + 1) for the w = warmup * total first steps, then
    0.5 (1 + cos(pi (s - w) / (total - w))): read back from the optimizer at every step."""
    model, calib = small_resnet
    qat = prepare_qat(model, CFG, calib, QATConfig(edge_scheme=None))
    seen = []
    orig = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    batches = [b for b in _random_batches(10, 0)(0)]
    torch.optim.Adam.step = spy
    try:
        train_qat(qat, batches, torch.nn.functional.cross_entropy, QATConfig(epochs=2, lr=1e-3, warmup=0.2))
    finally:
        torch.optim.Adam.step = orig
    total, warm = 20, 4
    want = [1e-3 * (s + 1) / (warm + 1) if s < warm else 1e-3 * 0.5 * (1 + np.cos(np.pi * (s - warm) / (total - warm)))
            for s in range(total)]
    np.testing.assert_allclose(seen, want, rtol=1e-9)


def test_distillation_and_the_best_validation_epoch_is_kept(small_resnet):
    model, calib = small_resnet
    qat = prepare_qat(model, CFG, calib, QATConfig(edge_scheme=None))
    with pytest.raises(ValueError, match="teacher"):
        train_qat(qat, _random_batches(1, 0), None, QATConfig(distill="kl"))
    with pytest.raises(ValueError, match="loss_fn is required"):
        train_qat(qat, _random_batches(1, 0), None, QATConfig(distill="kl", distill_weight=0.5), teacher=model)
    snapshots, scores = [], iter([0.5, 0.9, 0.1, 0.3])

    def val_fn(m):  # the second call (after epoch 1) scores best
        snapshots.append({n: l.weight.detach().clone() for n, l in qat_layers(m).items()})
        return next(scores)

    train_qat(qat, _random_batches(2, 0), None, QATConfig(epochs=3, lr=1e-3, distill="kl"), teacher=model,
              val_fn=val_fn)
    assert qat.rmsmp_report["qat_val"] == [0.5, 0.9, 0.1, 0.3] and qat.rmsmp_report["qat_best_epoch"] == 1
    for n, l in qat_layers(qat).items():
        assert torch.equal(l.weight, snapshots[1][n])
        assert not torch.equal(l.weight, snapshots[0][n])


def test_distillation_losses_against_their_definitions():
    from tvm_rmsmp.nn.qat import distill_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    ps, pt = np.exp(s.numpy()) / np.exp(s.numpy()).sum(1, keepdims=True), np.exp(t.numpy()) / np.exp(t.numpy()).sum(1, keepdims=True)
    kl = float((pt * (np.log(pt) - np.log(ps))).sum(1).mean())
    assert abs(float(distill_loss("kl", s, t)) - kl) < 1e-5
    cos = (s.numpy() * t.numpy()).sum(1) / np.linalg.norm(s.numpy(), axis=1) / np.linalg.norm(t.numpy(), axis=1)
    assert abs(float(distill_loss("cosine", s, t)) - float((1 - cos).mean())) < 1e-5
    assert abs(float(distill_loss("mse", s, t)) - float(((s - t) ** 2).mean())) < 1e-6
    with pytest.raises(ValueError, match="differ in shape"):
        distill_loss("mse", s, t[:2])


def test_calibration_samples_come_from_every_batch():
    from tvm_rmsmp.nn.layers import _InputStats

    st = _InputStats(channel_axis=1, batches=4)
    for i in range(4):  # each batch alone is larger than the whole sample budget
        st(None, (torch.full((64, 16, 32, 32), float(i + 1)),))
    got = np.concatenate(st.samples)
    assert got.size <= _InputStats.MAX_SAMPLES
    assert set(np.unique(got)) == {1.0, 2.0, 3.0, 4.0}


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


@pytest.mark.parametrize("acts", [{"act_granularity": "per_token"}, {"act_zero_point": "always"}])
def test_qat_with_transformer_activations_converts_and_compiles_bit_exact(acts):
    """Per-token and zero-point activations through QAT: the untrained model converts to the PTQ
    model, a trained one keeps its activation form and compiles to the same outputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 48), torch.nn.GELU(),
                                torch.nn.Linear(48, 10)).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 32, generator=g) * 2 + 0.5 for _ in range(3)]
    cfg = rmsmp.RMSMPConfig(assign="variance", **acts)
    qat = prepare_qat(model, cfg, calib, QATConfig(edge_scheme=None))
    ptq = rmsmp.quantize(model, cfg, calib)
    x = torch.randn(5, 32, generator=g) * 2 + 0.5
    with torch.no_grad():
        np.testing.assert_array_equal(convert_qat(qat)(x).numpy(), ptq(x).numpy())
    batches = [((torch.randn(16, 32, generator=g),), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    train_qat(qat, batches, torch.nn.functional.cross_entropy, QATConfig(epochs=1, lr=1e-3))
    q = convert_qat(qat)
    from tvm_rmsmp.nn.layers import rmsmp_layers

    for name, layer in rmsmp_layers(q).items():
        ref = rmsmp_layers(ptq)[name]
        assert (layer.act_per_token, layer.act_zero_point) == (ref.act_per_token, ref.act_zero_point)
    exe = rmsmp.compile(q, (x,), target="llvm")
    with torch.no_grad():
        np.testing.assert_array_equal(exe(x), q(x).numpy())
