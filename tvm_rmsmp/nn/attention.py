"""Multi-head attention decomposed into ordinary layers, so RMSMP can quantize its projections.

``nn.MultiheadAttention`` keeps its q/k/v projections as one packed ``in_proj_weight`` and
calls ``F.multi_head_attention_forward`` with ``out_proj.weight`` directly: none of its
projections is a Linear layer that runs, so none could be replaced by an RMSMP layer.
:class:`DecomposedMultiheadAttention` computes the same function with three ``nn.Linear``
projections (``q_proj``, ``k_proj``, ``v_proj``), a scaled dot product and ``out_proj``, in
plain tensor ops that ``torch.export`` traces. :func:`decompose_attention` swaps it in for
every ``nn.MultiheadAttention`` of a model (before calibration), and keeps torch's fused
Transformer fast paths (which read the packed weights) from running on the result.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["DecomposedMultiheadAttention", "decompose_attention"]


def _float_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True: not allowed) as an additive float mask; float masks unchanged."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _pad_last(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """One more key column (``bias_k`` / ``add_zero_attn``), attended to."""
    return None if mask is None else nn.functional.pad(mask, (0, 1))


class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as separate Linear projections; same arguments, same outputs.

    Supports batch_first or not, unbatched inputs, ``kdim``/``vdim``, bias or not,
    ``add_bias_kv``, ``add_zero_attn``, boolean or float ``attn_mask`` (``(L, S)`` or
    ``(N * num_heads, L, S)``) and ``key_padding_mask``, ``is_causal`` (a causal mask is built
    when ``attn_mask`` is None), ``need_weights`` and ``average_attn_weights``; dropout on the
    attention weights in training mode only.
    """

    # torch's Transformer fast paths read these: None and False make them take the slow path,
    # which calls this module (their fused kernels would read packed float weights).
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "DecomposedMultiheadAttention":
        """The same attention as ``mha`` (weights copied; training mode kept)."""
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=bias, add_bias_kv=mha.bias_k is not None,
                  add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.chunk(3) if bias else (None, None, None)
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if isinstance(getattr(mha.out_proj, "prune_mask", None), torch.Tensor):  # a pruned out_proj keeps its mask
                new.out_proj.register_buffer("prune_mask", mha.out_proj.prune_mask.clone())
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
            if mha.bias_k is not None:
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
        ref = next(iter(mha.parameters()))
        return new.to(device=ref.device, dtype=ref.dtype).train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt_len, _ = query.shape
        heads, hd = self.num_heads, self.head_dim
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        src_len = k.shape[1]
        dtype = q.dtype

        attn_mask = _float_mask(attn_mask, dtype)
        if attn_mask is None and is_causal:
            attn_mask = torch.full((tgt_len, src_len), float("-inf"), dtype=dtype, device=q.device).triu(1)
        if attn_mask is not None:
            attn_mask = attn_mask.reshape(1, 1, tgt_len, src_len) if attn_mask.dim() == 2 else \
                attn_mask.reshape(n, heads, tgt_len, src_len)
        kpm = _float_mask(key_padding_mask, dtype)
        if kpm is not None:
            kpm = kpm.reshape(n, 1, 1, src_len)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, self.embed_dim)], dim=1)
            attn_mask, kpm = _pad_last(attn_mask), _pad_last(kpm)

        q = q.reshape(n, tgt_len, heads, hd).transpose(1, 2)  # (N, H, L, hd)
        k = k.reshape(n, k.shape[1], heads, hd).transpose(1, 2)
        v = v.reshape(n, v.shape[1], heads, hd).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, heads, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(n, heads, 1, hd)], dim=2)
            attn_mask, kpm = _pad_last(attn_mask), _pad_last(kpm)

        scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)  # (N, H, L, S)
        if attn_mask is not None:
            scores = scores + attn_mask
        if kpm is not None:
            scores = scores + kpm
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = nn.functional.dropout(weights, p=self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(n, tgt_len, self.embed_dim)
        out = self.out_proj(out)

        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights.squeeze(0) if not batched else weights)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def decompose_attention(model: nn.Module, skipped: Callable[[str], bool] = lambda name: False
                        ) -> Tuple[nn.Module, List[str]]:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``model`` (except those whose
    name ``skipped`` accepts) by a :class:`DecomposedMultiheadAttention`; returns the model
    (a new one if ``model`` itself was the attention) and the names replaced.

    Transformer encoder layers and encoders are set to never take torch's fused fast path:
    it reads the packed float weights of their attention and Linear layers instead of calling
    them, so it would bypass any layer replaced by a quantized one.
    """
    done: List[str] = []
    for name, mod in list(model.named_modules()):
        if type(mod).forward is nn.MultiheadAttention.forward and not skipped(name):
            new = DecomposedMultiheadAttention.from_mha(mod)
            if not name:
                model = new
            else:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            done.append(name)
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer):
            mod.activation_relu_or_gelu = 0  # fast path: "activation_relu_or_gelu was not True"
        elif isinstance(mod, nn.TransformerEncoder):
            mod.use_nested_tensor = False
    return model, done
