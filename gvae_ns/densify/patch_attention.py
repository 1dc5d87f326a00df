"""Serialized patch attention: attention within fixed-size patches of a space-filling-curve order.

Tokens (one per point) are sorted along a curve (:mod:`gvae_ns.densify.serialization`), each point
cloud is padded to a multiple of ``patch_size`` (padding is masked out of the keys), and
``torch.nn.functional.scaled_dot_product_attention`` runs over ``[num_patches, heads, P, P]``. The
number of patches grows with N and each costs ``P**2``, so time and memory grow linearly with N
(plus the O(N log N) sort). Patches never mix clouds of a batch. Layers alternate curves so that
points cut apart by one order's patch boundary share a patch in the next. Each block first adds a
linear encoding of the point's position relative to its patch centroid (in units of the patch's
RMS radius): a cheap, scale-free stand-in for Point Transformer V3's sparse-conv position encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gvae_ns.densify.serialization import (
    CURVES,
    Serialization,
    offsets_to_batch,
    serialize,
)


@dataclass
class PatchLayout:
    """Where every token goes in the padded, patch-major layout of one curve order."""

    serialization: Serialization
    """Codes and (inverse) sorting permutation of the tokens."""
    source: torch.Tensor
    """``[N]`` token index for each sorted position (``serialization.order``)."""
    slot: torch.Tensor
    """``[N]`` padded slot of each sorted position."""
    valid: torch.Tensor
    """``[num_patches, patch_size]`` bool, False on padding."""
    patch_size: int
    """Tokens per patch."""

    @property
    def num_patches(self) -> int:
        """Number of patches (all clouds together)."""
        return self.valid.shape[0]

    @property
    def has_padding(self) -> bool:
        """Whether any patch holds padding."""
        return not bool(self.valid.all())

    def to_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` tokens -> ``[num_patches, patch_size, C]`` (zeros on padding)."""
        out = x.new_zeros(self.valid.numel(), x.shape[1])
        out = out.index_copy(0, self.slot, x[self.source])
        return out.view(self.num_patches, self.patch_size, x.shape[1])

    def from_patches(self, y: torch.Tensor) -> torch.Tensor:
        """``[num_patches, patch_size, C]`` -> ``[N, C]`` in the original token order."""
        flat = y.reshape(-1, y.shape[-1])[self.slot]
        return flat.index_select(0, self.serialization.inverse)

    def patch_relative(self, points: torch.Tensor) -> torch.Tensor:
        """``[N, 3]`` point positions relative to their patch's centroid, in units of its RMS radius."""
        p = self.to_patches(points)
        w = self.valid.unsqueeze(-1).to(points.dtype)
        count = w.sum(dim=1, keepdim=True).clamp_min(1.0)
        centre = (p * w).sum(dim=1, keepdim=True) / count
        rel = (p - centre) * w
        mean_sq = (rel**2).sum(dim=(1, 2), keepdim=True) / count
        # sqrt(0) has an infinite derivative: a one-token patch must not send NaN gradients back
        radius = torch.where(mean_sq > 0, mean_sq, torch.ones_like(mean_sq)).sqrt()
        rel = rel / radius
        return self.from_patches(rel)


def build_layout(
    points: torch.Tensor,
    curve: str,
    patch_size: int,
    offsets: Optional[torch.Tensor] = None,
    bits: int = 10,
) -> PatchLayout:
    """Serialize ``points`` ``[N, 3]`` along ``curve`` and pad every cloud to a multiple of ``patch_size``."""
    if patch_size < 1:
        raise ValueError(f"patch_attention: patch_size must be >= 1, got {patch_size}")
    n = points.shape[0]
    ser = serialize(points, curve, bits, offsets)
    batch = offsets_to_batch(offsets, n, points.device)
    num_clouds = 1 if offsets is None else len(offsets)
    counts = torch.bincount(batch, minlength=num_clouds)
    padded = (counts + patch_size - 1) // patch_size * patch_size
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded
    sorted_batch = batch[ser.order]
    rank = torch.arange(n, device=points.device) - start[sorted_batch]
    slot = padded_start[sorted_batch] + rank
    total = int(padded.sum())
    valid = torch.zeros(total, dtype=torch.bool, device=points.device)
    valid[slot] = True
    return PatchLayout(ser, ser.order, slot, valid.view(-1, patch_size), patch_size)


class SerializedAttention(nn.Module):
    """Multi-head self-attention restricted to the patches of a :class:`PatchLayout`."""

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SerializedAttention: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """``[N, C]`` tokens -> ``[N, C]``, each token attending to the valid tokens of its patch."""
        if x.shape[0] == 0:
            return self.proj(x)
        patches = layout.to_patches(x)
        b, p, c = patches.shape
        qkv = self.qkv(patches).view(b, p, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = layout.valid[:, None, None, :] if layout.has_padding else None
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(b, p, c)
        return self.proj_drop(self.proj(layout.from_patches(out)))


class SerializedBlock(nn.Module):
    """Pre-norm transformer block: patch position encoding, serialized attention, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, patch_position: bool = True):
        super().__init__()
        self.pos = nn.Linear(3, dim) if patch_position else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SerializedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, layout: PatchLayout, relative: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One block over ``[N, C]`` tokens; ``relative`` is ``layout.patch_relative(points)``."""
        if self.pos is not None and relative is not None:
            x = x + self.pos(relative)
        x = x + self.attn(self.norm1(x), layout)
        return x + self.mlp(self.norm2(x))


class SerializedTransformer(nn.Module):
    """A stack of :class:`SerializedBlock` whose curve order cycles through ``orders`` layer by layer."""

    def __init__(
        self,
        dim: int,
        depth: int = 2,
        num_heads: int = 4,
        patch_size: int = 64,
        orders: Sequence[str] = ("hilbert", "hilbert-trans", "z", "z-trans"),
        mlp_ratio: float = 4.0,
        bits: int = 10,
        patch_position: bool = True,
    ):
        super().__init__()
        if not orders or any(o not in CURVES for o in orders):
            raise ValueError(f"SerializedTransformer: orders must be a non-empty subset of {CURVES}, got {tuple(orders)}")
        self.orders = tuple(orders)
        self.patch_size = patch_size
        self.bits = bits
        self.patch_position = patch_position
        self.blocks = nn.ModuleList(SerializedBlock(dim, num_heads, mlp_ratio, patch_position) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, points: torch.Tensor, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N, C]`` features of points ``[N, 3]`` (clouds split by ``offsets``) -> ``[N, C]``."""
        if x.shape[0] != points.shape[0]:
            raise ValueError(f"SerializedTransformer: {x.shape[0]} features for {points.shape[0]} points")
        cache: Dict[str, tuple] = {}
        for curve in dict.fromkeys(self.orders[i % len(self.orders)] for i in range(len(self.blocks))):
            layout = build_layout(points.detach(), curve, self.patch_size, offsets, self.bits)
            relative = layout.patch_relative(points) if self.patch_position else None
            cache[curve] = (layout, relative)
        for i, block in enumerate(self.blocks):
            x = block(x, *cache[self.orders[i % len(self.orders)]])
        return self.norm(x)
