"""Normalizing-flow prior ``p(z)`` (optionally ``p(z | c)``): affine couplings over a standard normal.

``z = T(eps)`` with ``eps ~ N(0, I)``; ``log p(z) = log N(T^{-1}(z)) + log |det dT^{-1}/dz|`` (the
paper's eq. 3). Each coupling layer keeps half of the dimensions fixed and scales/shifts the other
half by functions of the fixed half (and of a context vector ``c`` when ``context_dim > 0``: the
conditional prior of a CVAE, which the GaussianVAE feeds the encoded history); masks alternate so every
dimension is transformed. Scales are bounded by ``tanh`` so the transform stays well conditioned. The
conditioners' last layers start at zero, so an untrained flow is the identity and ``p`` is ``N(0, I)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


class AffineCoupling(nn.Module):
    """One invertible affine coupling: ``y = m*x + (1-m)*(x*exp(s(m*x)) + t(m*x))``."""

    def __init__(
        self, dim: int, hidden: int, mask: Tensor, context_dim: int = 0, max_log_scale: float = 2.0
    ) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.max_log_scale = max_log_scale
        self.net = nn.Sequential(
            nn.Linear(dim + context_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 2 * dim),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, fixed: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if context is not None:
            fixed = torch.cat([fixed, context], dim=-1)
        raw_s, t = self.net(fixed).chunk(2, dim=-1)
        s = self.max_log_scale * torch.tanh(raw_s / self.max_log_scale)
        free = 1.0 - self.mask
        return s * free, t * free

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``x -> (y, log|det dy/dx|)``."""
        s, t = self._scale_shift(x * self.mask, context)
        return x * torch.exp(s) + t, s.sum(dim=-1)

    def inverse(self, y: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``y -> (x, log|det dx/dy|)``."""
        s, t = self._scale_shift(y * self.mask, context)
        return (y - t) * torch.exp(-s), -s.sum(dim=-1)


class FlowPrior(nn.Module):
    """Learned prior over ``dim``-dimensional latents: ``layers`` affine couplings over ``N(0, I)``,
    conditioned on a ``[B, context_dim]`` context when ``context_dim > 0``."""

    def __init__(self, dim: int, layers: int = 4, hidden: int = 64, context_dim: int = 0) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"FlowPrior: latent dim must be >= 2 for couplings, got {dim}")
        if layers < 1:
            raise ValueError(f"FlowPrior: layers must be >= 1, got {layers}")
        self.dim = dim
        self.context_dim = context_dim
        half = torch.arange(dim) % 2 == 0
        self.layers = nn.ModuleList(
            AffineCoupling(dim, hidden, half if i % 2 == 0 else ~half, context_dim) for i in range(layers)
        )

    def _check_context(self, context: Optional[Tensor], rows: int) -> None:
        if self.context_dim == 0:
            if context is not None:
                raise ValueError("FlowPrior: this flow is unconditional (context_dim=0) but got a context")
        elif context is None or context.shape != (rows, self.context_dim):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"FlowPrior: expected a context of shape ({rows}, {self.context_dim}), got {got}")

    def transform(self, eps: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``T``: base noise ``[B, dim]`` -> latents ``[B, dim]``."""
        self._check_context(context, eps.shape[0])
        z = eps
        for layer in self.layers:
            z, _ = layer(z, context)
        return z

    def inverse(self, z: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``T^{-1}``: latents -> (base noise, ``log|det dT^{-1}/dz|`` per row)."""
        self._check_context(context, z.shape[0])
        eps = z
        logdet = z.new_zeros(z.shape[:-1])
        for layer in reversed(self.layers):
            eps, ld = layer.inverse(eps, context)
            logdet = logdet + ld
        return eps, logdet

    def log_prob(self, z: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``log p(z [| context])`` per row, ``[B]``."""
        eps, logdet = self.inverse(z, context)
        base = -0.5 * (eps.pow(2) + math.log(2 * math.pi)).sum(dim=-1)
        return base + logdet

    def sample(
        self,
        n: int,
        generator: Optional[torch.Generator] = None,
        temperature: float = 1.0,
        device: Optional[torch.device] = None,
        context: Optional[Tensor] = None,
    ) -> Tensor:
        """``n`` latents ``T(temperature * eps)``; ``temperature=0`` gives the deterministic ``T(0)``."""
        if device is None:
            device = context.device if context is not None else next(self.parameters()).device
        eps = torch.randn(n, self.dim, generator=generator, device=device) * temperature
        return self.transform(eps, context)
