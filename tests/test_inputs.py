"""Inputs as they come: DataLoaders, input_fn, dict/keyword inputs, in calibration, QAT and calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tvm_rmsmp as rmsmp

VAR = rmsmp.RMSMPConfig(assign="variance", rounding="nearest")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


class Masked(nn.Module):
    """A tokenizer-style model: ``forward(input_ids, attention_mask)``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.fc = nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        return self.out(torch.relu(self.fc(h))).mean(1)


def _tokens(seed, n=4, t=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.int64)
    mask[:, t - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_a_dataloader_with_input_fn_equals_the_list_of_input_batches():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    q_loader = rmsmp.quantize(_mlp(), VAR, calib_data=loader, input_fn=lambda b: b[0])
    q_list = rmsmp.quantize(_mlp(), VAR, calib_data=[x[i:i + 8] for i in range(0, 32, 8)])
    xt = torch.randn(5, 12)
    assert torch.equal(q_loader(xt), q_list(xt))
    # a generator works too (any iterable), and numpy batches
    q_gen = rmsmp.quantize(_mlp(), VAR, calib_data=(x[i:i + 8].numpy() for i in range(0, 32, 8)))
    assert torch.equal(q_gen(xt), q_list(xt))


def test_a_dataloader_of_pairs_without_input_fn_is_an_error_naming_the_batch():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(ValueError, match=r"calib_data batch 0 does not match Sequential.forward\(input\): it gives "
                                         r"2 positional .*\(Tensor\[8, 12\] float32, Tensor\[8\] int64\).*"
                                         r"input_fn=lambda b: b\[0\]"):
        rmsmp.quantize(_mlp(), VAR, calib_data=loader)
    with pytest.raises(ValueError, match=r"calib_data batch 1: input_fn failed on Tensor\[3, 12\] float32 "
                                         r"\(KeyError"):
        rmsmp.quantize(_mlp(), VAR, calib_data=[x[:4], x[4:7]], input_fn=lambda b: b if len(b) == 4 else {}["x"])
    with pytest.raises(TypeError, match="wrap a single batch in a list"):
        rmsmp.quantize(_mlp(), VAR, calib_data=x)
    with pytest.raises(TypeError, match="calib_data batch 0 must be a tensor.*got str"):
        rmsmp.quantize(_mlp(), VAR, calib_data=["text"])


def test_dict_batches_are_keyword_inputs_and_match_positional_ones():
    model = Masked().eval()
    batches = [_tokens(i) for i in range(2)]
    with pytest.warns(rmsmp.RMSMPWarning):  # the embedding stays in float
        q_dict = rmsmp.quantize(model, VAR, calib_data=batches)
    with pytest.warns(rmsmp.RMSMPWarning):
        q_pos = rmsmp.quantize(model, VAR, calib_data=[(b["input_ids"], b["attention_mask"]) for b in batches])
    t = _tokens(5)
    assert torch.equal(q_dict(**t), q_pos(**t))
    # input_fn picks the model's inputs from a richer batch (a dataset row with labels)
    rich = [{**b, "labels": torch.zeros(4, dtype=torch.int64)} for b in batches]
    with pytest.raises(ValueError, match=r"batch 0 does not match Masked.forward\(input_ids, attention_mask\).*"
                                         r"'labels'"):
        rmsmp.quantize(model, VAR, calib_data=rich)
    with pytest.warns(rmsmp.RMSMPWarning):
        q_fn = rmsmp.quantize(model, VAR, calib_data=rich,
                              input_fn=lambda b: {k: b[k] for k in ("input_ids", "attention_mask")})
    assert torch.equal(q_fn(**t), q_pos(**t))


def test_hessian_rule_and_qat_take_dict_batches():
    model = Masked().eval()
    batches = [_tokens(i, n=8) for i in range(2)]  # 16 samples: the Hessian rule runs
    cfg = rmsmp.RMSMPConfig(rounding="nearest", hessian=rmsmp.HessianConfig(probes=1, batches=2))
    with pytest.warns(rmsmp.RMSMPWarning, match="float"):
        q = rmsmp.quantize(model, cfg, calib_data=batches)
    assert q.rmsmp_report["assign"] == "hessian" and q.rmsmp_row_hessian
    with pytest.warns(rmsmp.RMSMPWarning, match="float"):
        qat = rmsmp.prepare_qat(model, VAR, calib_data=[(b, 0) for b in batches], input_fn=lambda b: b[0])
    train = [(b, torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(i))) for i, b in enumerate(batches)]
    rmsmp.train_qat(qat, train, nn.functional.cross_entropy,
                    rmsmp.QATConfig(epochs=2, lr=1e-3, reassign_every=1),
                    calib_data=[(b, 0) for b in batches], input_fn=lambda b: b[0])
    assert qat.rmsmp_report["reassigned_rows"] >= 0
    q2 = rmsmp.convert_qat(qat)
    assert q2(**_tokens(3)).shape == (4, 3)


# ---------------------------------------------------------------------------- calls
@pytest.fixture(scope="module")
def compiled_masked():
    model = Masked().eval()
    with pytest.warns(rmsmp.RMSMPWarning):
        q = rmsmp.quantize(model, VAR, calib_data=[_tokens(i) for i in range(2)])
    t = _tokens(9)
    exe = rmsmp.compile(q, (t["input_ids"], t["attention_mask"]))
    return q, exe, t


def test_calls_take_positional_dict_and_keyword_inputs(compiled_masked):
    q, exe, t = compiled_masked
    assert exe.input_names == ["input_ids", "attention_mask"]
    with torch.no_grad():
        torch_ref = q(**t).numpy()
    ids, mask = t["input_ids"].numpy(), t["attention_mask"].numpy()
    ref = exe(ids, mask)
    np.testing.assert_allclose(ref, torch_ref, rtol=1e-5, atol=1e-6)  # the float mean's summation order differs
    np.testing.assert_array_equal(exe(t), ref)  # a tokenizer's output: one dict
    np.testing.assert_array_equal(exe(attention_mask=mask, input_ids=ids), ref)
    np.testing.assert_array_equal(exe(ids, attention_mask=mask), ref)
    with pytest.raises(TypeError, match=r"unknown input 'token_type_ids'.*\['input_ids', 'attention_mask'\]"):
        exe({**t, "token_type_ids": mask})
    with pytest.raises(TypeError, match=r"missing input\(s\) \['attention_mask'\]"):
        exe(input_ids=ids)
    with pytest.raises(TypeError, match="'input_ids' given twice"):
        exe(ids, input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"input 1 has shape \[4, 6\]"):  # the existing checks still apply
        exe(input_ids=ids, attention_mask=mask[:, :6])
    with pytest.raises(IndexError, match="indexes a table of 30 rows"):
        exe(input_ids=ids + 100, attention_mask=mask)
    assert exe.benchmark(t, repeat=1) > 0  # a dict for timing too


def test_torch_output_shares_memory_and_numpy_stays_the_default(compiled_masked, monkeypatch):
    q, exe, t = compiled_masked
    y = exe(t, output="torch")
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), exe(t))
    # no copy: the tensor's memory is the TVM output's (DLPack)
    from tvm_rmsmp.runtime import library

    seen = []
    real = torch.from_dlpack
    monkeypatch.setattr(torch, "from_dlpack", lambda x: seen.append(x) or real(x))
    y2 = exe(t, output="torch")
    assert len(seen) == 1 and y2.data_ptr() == real(seen[0]).data_ptr()
    exe.default_output = "torch"
    try:
        assert isinstance(exe(t), torch.Tensor) and isinstance(exe(t, output="numpy"), np.ndarray)
    finally:
        exe.default_output = "numpy"
    with pytest.raises(ValueError, match="output must be one of"):
        exe(t, output="jax")
    assert library.OUTPUT_KINDS == ("numpy", "torch")


def test_compile_takes_keyword_example_inputs_in_the_dicts_order(compiled_masked):
    q, exe, t = compiled_masked
    swapped = {"attention_mask": t["attention_mask"], "input_ids": t["input_ids"]}
    kw = rmsmp.compile(q, swapped)
    assert kw.input_names == ["attention_mask", "input_ids"]
    np.testing.assert_array_equal(kw(swapped), exe(t))
    np.testing.assert_array_equal(kw(t["attention_mask"].numpy(), t["input_ids"].numpy()), exe(t))
    np.testing.assert_array_equal(kw(**t), exe(t))


@pytest.mark.parametrize("dtype", ["float32", "int64", "int8", "bool"])
def test_host_tensors_are_aligned_copies(dtype):
    from tvm_rmsmp.runtime.library import host_tensor, numpy_copy

    base = (np.arange(3 * 7 + 1) % 5).astype(dtype)
    arr = base[1:].reshape(3, 7)  # a view starting one element in: not 64-byte aligned
    t = host_tensor(arr)
    back = np.from_dlpack(t)
    assert back.ctypes.data % 64 == 0 and back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert not np.shares_memory(back, base)  # a copy: the caller may change its array afterwards
    out = numpy_copy(t)
    np.testing.assert_array_equal(out, arr)
    assert not np.shares_memory(out, back)


def test_outputs_are_independent_arrays(compiled_masked):
    _, exe, t = compiled_masked
    first = exe(t)
    keep = first.copy()
    first[...] = 0  # the caller owns its result: writing into it changes neither the model nor later results
    second = exe(t)
    np.testing.assert_array_equal(second, keep)
    assert not np.shares_memory(first, second)
