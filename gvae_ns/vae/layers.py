"""The transformer block the VAE's encoder and its slot decoder are built from."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm transformer block (SDPA self-attention + GELU MLP) with an optional key mask."""

    def __init__(self, width: int, heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, ff_mult * width), nn.GELU(), nn.Linear(ff_mult * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None, last_only: bool = False) -> Tensor:
        """``x [B, T, D]``; ``key_mask [B, T]`` True where a token may be attended to. With
        ``last_only`` only the last token is updated and returned (``[B, 1, D]``), which is all the
        final encoder block needs."""
        b, t, d = x.shape
        hd = d // self.heads
        h = self.norm1(x)
        if last_only:
            q = F.linear(h[:, -1:], self.qkv.weight[:d], self.qkv.bias[:d])
            k, v = F.linear(h, self.qkv.weight[d:], self.qkv.bias[d:]).view(b, t, 2, self.heads, hd).unbind(2)
            q = q.view(b, 1, self.heads, hd).transpose(1, 2)
            k, v, x = k.transpose(1, 2), v.transpose(1, 2), x[:, -1:]
        else:
            q, k, v = self.qkv(h).view(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        drop = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        x = x + self.proj(h.transpose(1, 2).reshape(b, q.shape[2], d))
        return x + self.mlp(self.norm2(x))
