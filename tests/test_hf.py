"""A Hugging Face ``transformers.BertModel`` (MiniLM-L6's config and real weights, offline)
quantizes, compiles and matches the quantized torch model, with no model code of ours.

For speed the encoder is truncated to its first 2 of 6 layers (``num_hidden_layers=2``: the
same layers, fewer of them); docs/models.md lists the architectures tried in full.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import tvm_rmsmp as rmsmp


LAYERS = 2
TEXTS = ["the movie was great", "a terrible, boring film that never ends", "I would watch it again",
         "not my taste at all", "the actors were wonderful", "a waste of two hours"]


def _bert():
    """``BertModel`` from the MiniLM-L6 ``config.json`` and ``model.safetensors`` (HF names already)."""
    transformers = pytest.importorskip("transformers")  # the [hf] extra (in [test]: CI has it)
    from safetensors.torch import load_file

    from tvm_rmsmp.models.minilm import model_dir

    d = model_dir()
    cfg = transformers.BertConfig.from_pretrained(d, num_hidden_layers=LAYERS)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    state = load_file(os.path.join(d, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == []
    # what a 2-layer BertModel without pooler has no place for: the pooler, later layers, a buffer
    assert all(k.startswith(("pooler.", "embeddings.position_ids")) or int(k.split(".")[2]) >= LAYERS
               for k in unexpected)
    return model


def _tokens(texts):
    from tvm_rmsmp.models.minilm import load_tokenizer

    enc = load_tokenizer(32).encode_batch(texts)
    return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.int64),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)}


def test_hf_bert_quantizes_compiles_and_matches_the_quantized_torch_model(tmp_path):
    model = _bert()
    calib = [_tokens(TEXTS[:3]), _tokens(TEXTS[3:])]  # tokenizer outputs: dicts of keyword inputs
    cfg = rmsmp.RMSMPConfig(assign="variance", rounding="nearest")
    with pytest.warns(rmsmp.RMSMPWarning, match="embeddings"):  # embeddings and LayerNorms stay float
        q = rmsmp.quantize(model, cfg, calib_data=calib)
    # every Linear of the encoder: q, k, v, attention output, intermediate, output per layer
    assert len(rmsmp.row_plans(q)) == 6 * LAYERS
    x = _tokens(["one more sentence to embed", "and another, longer one with padding at the end"])
    with torch.no_grad():
        ref = q(**x).last_hidden_state.numpy()
    exe = rmsmp.compile(q, (x["input_ids"], x["attention_mask"]), target="llvm")
    assert exe.input_names == ["input_ids", "attention_mask"]
    out = exe(x)  # the tokenizer's dict, as the torch model takes it
    assert list(out) == ["last_hidden_state"]  # the ModelOutput's keys
    # integer layers exact; float ops between them (softmax, GELU, LayerNorm) to float rounding
    np.testing.assert_allclose(out["last_hidden_state"], ref, rtol=0, atol=1e-5)
    # and the quantized model is close to the float one (8-bit activations, mixed 4/8-bit rows)
    with torch.no_grad():
        fp = model(**x).last_hidden_state.numpy()
    m = x["attention_mask"].numpy().astype(bool)
    cos = (fp * ref).sum(-1) / np.linalg.norm(fp, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos[m].min() > 0.9
    # saved and rebuilt from a freshly built BertModel of the same config: bit-equal
    rmsmp.save_quantized(q, tmp_path / "bert-q")
    fresh = type(model)(model.config, add_pooling_layer=False)
    q2 = rmsmp.load_quantized(tmp_path / "bert-q", model=fresh)
    with torch.no_grad():
        assert torch.equal(q2(**x).last_hidden_state, q(**x).last_hidden_state)


def test_cpu_rules_leave_a_function_without_a_root_block_to_the_default_schedule():
    """RoBERTa's position ids are a cumsum over the mask, which TOPI writes as TIR without
    blocks: the CPU rules must decline it (they raised "Cannot find a block with the name: root")."""
    from tvm.script import tirx as T

    from schedules.cpu import FloatElementwise, FloatMatmul

    @T.prim_func
    def no_blocks(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32")):
        for i in range(8):
            b[i] = a[i] + T.float32(1)

    target = rmsmp.resolve_target("llvm")
    assert FloatElementwise().apply(no_blocks, target, False) is None
    assert FloatMatmul().apply(no_blocks, target, False) is None
