"""The transformer under :class:`kepler.models.CodeTransformer`: pre-norm blocks (causal
self-attention on :func:`torch.nn.functional.scaled_dot_product_attention`, GELU MLPs) and the final
LayerNorm, run over a whole sequence (training, scoring) or one step at a time against a static
key/value cache (:class:`KVCache`: the same shapes at every step, so a step compiles whole)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class KVCache(NamedTuple):
    """Keys and values of every layer of a stack, one ``(B, heads, steps, head_dim)`` tensor each,
    filled one step at a time (:meth:`kepler.models.CodeTransformer.decode_step`)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]


class _CachedStep(NamedTuple):
    """What one layer's attention needs for a cached step: its cache, the step's position (0-d
    int64) and which cache entries it sees (``(1, steps)`` bool, up to ``position``)."""

    keys: torch.Tensor
    values: torch.Tensor
    position: torch.Tensor
    visible: torch.Tensor


class _SelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, step: _CachedStep | None = None) -> torch.Tensor:
        """``x: (B, T, d)`` -> ``(B, T, d)``, causal. With ``step`` (one cached step), ``T`` is 1: its
        key and value are written into the layer's cache at ``step.position`` and the query attends
        to the cache up to there."""
        batch, steps, width = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if step is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            step.keys.index_copy_(2, step.position.view(1), k.to(step.keys.dtype))
            step.values.index_copy_(2, step.position.view(1), v.to(step.values.dtype))
            y = F.scaled_dot_product_attention(q, step.keys, step.values, attn_mask=step.visible)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, steps, width)))


class _Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = round(d_model * mlp_ratio)
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = _SelfAttention(d_model, num_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model), nn.Dropout(dropout)
        )

    def forward(self, x, step: _CachedStep | None = None):
        x = x + self.attn(self.norm1(x), step)
        return x + self.mlp(self.norm2(x))


class TransformerStack(nn.Module):
    """Pre-norm blocks and the final LayerNorm: ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, d_model: int, num_layers: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d_model, num_heads, mlp_ratio, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, cache: KVCache | None = None, position: torch.Tensor | None = None):
        """With ``cache`` and ``position`` (0-d int64): one cached step, ``x: (B, 1, d)``."""
        if cache is not None:
            # The whole cache under a mask rather than a slice up to `position`: one shape at every step.
            visible = (torch.arange(cache.keys[0].shape[2], device=x.device) <= position).view(1, -1)
        for layer, block in enumerate(self.blocks):
            step = None if cache is None else _CachedStep(cache.keys[layer], cache.values[layer], position, visible)
            x = block(x, step)
        return self.norm(x)
