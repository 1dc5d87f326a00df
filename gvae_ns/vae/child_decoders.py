"""The VAE's child decoders: ``(context, z)`` -> child slots, looked up by name (:func:`register_decoder`), so
another head can replace the default without touching the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Protocol

import torch
from torch import Tensor, nn

from gvae_ns.vae.layers import Block


@dataclass(frozen=True)
class DecoderSpec:
    """What a child decoder is built from (see :func:`register_decoder`)."""

    width: int
    latent_dim: int
    feature_dim: int
    max_children: int
    layers: int
    heads: int
    ff_mult: int
    dropout: float


class ChildDecoder(Protocol):
    """A child decoder: ``forward(context [B, width], z [B, latent_dim])`` returns
    ``(features [B, max_children, feature_dim], exist_logits [B, max_children])``, where features are
    the stream's relative child features in normalised units (slot 0 = the parent's continuation)."""

    def __call__(self, context: Tensor, z: Tensor) -> tuple[Tensor, Tensor]: ...


class SlotDecoder(nn.Module):
    """Learned slot queries conditioned on ``(context, z)``, refined by self-attention among slots."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.cond = nn.Linear(spec.width + spec.latent_dim, spec.width)
        self.slots = nn.Parameter(torch.randn(spec.max_children, spec.width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(spec.width, spec.heads, spec.ff_mult, spec.dropout) for _ in range(spec.layers)
        )
        self.norm = nn.LayerNorm(spec.width)
        self.head = nn.Linear(spec.width, spec.feature_dim + 1)

    def forward(self, context: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        x = self.cond(torch.cat([context, z], dim=-1))[:, None, :] + self.slots[None]
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm(x))
        return out[..., :-1], out[..., -1]


class MLPDecoder(nn.Module):
    """All child slots at once from an MLP over ``(context, z)``; cheaper than :class:`SlotDecoder`."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        hidden = spec.ff_mult * spec.width
        layers: list[nn.Module] = [nn.Linear(spec.width + spec.latent_dim, hidden), nn.GELU()]
        for _ in range(max(spec.layers - 1, 0)):
            layers += [nn.Linear(hidden, hidden), nn.GELU()]
        layers.append(nn.Linear(hidden, spec.max_children * (spec.feature_dim + 1)))
        self.net = nn.Sequential(*layers)
        self.max_children = spec.max_children
        self.feature_dim = spec.feature_dim

    def forward(self, context: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(torch.cat([context, z], dim=-1)).view(-1, self.max_children, self.feature_dim + 1)
        return out[..., :-1], out[..., -1]


DecoderFactory = Callable[[DecoderSpec], nn.Module]
_DECODERS: Dict[str, DecoderFactory] = {"slots": SlotDecoder, "mlp": MLPDecoder}


def register_decoder(name: str, factory: DecoderFactory) -> None:
    """Make ``GaussianVAEConfig(decoder=name)`` build its child decoders with ``factory(spec)``.

    The module it returns must follow :class:`ChildDecoder`. Register before building or loading a
    model that names it."""
    _DECODERS[name] = factory


def available_decoders() -> tuple[str, ...]:
    """Registered child-decoder names."""
    return tuple(sorted(_DECODERS))
