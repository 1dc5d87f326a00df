"""GaussianVAE: a two-stream transformer CVAE that predicts a Gaussian's children one stage ahead.

Per stream (geometry: offset, rotation, log-scale; appearance: SH rest, colour, opacity), see
:mod:`gvae_ns.vae.features` for the feature layout:

- a transformer **encoder** reads the lineage's stage tokens (one per stage, newest last, key-padding
  mask where absent) with a learned embedding of the stage's distance to the newest stage, and summarises
  the history in the newest token's output (the *context*);
- a **posterior** ``q(z | history, children)`` sees the context and the target children (training only);
- a **flow prior** ``p(z | history)`` (:class:`~gvae_ns.vae.flow.FlowPrior` conditioned on the
  context, the CVAE's prior network) supplies ``z`` at inference;
- a **child decoder** maps ``(context, z)`` to ``max_children`` child slots: normalised relative
  features and an exist logit. Decoders are looked up by name
  (:func:`gvae_ns.vae.child_decoders.register_decoder`), so another head can replace the default.

The streams are separate modules with their own latent, flow and normalisation statistics; the only
thing they share is the input lineage. Normalisation statistics are buffers, so a saved model
(:func:`gvae_ns.vae.file.save_vae`) is self-contained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from gvae_ns.vae import features as feats
from gvae_ns.vae.child_decoders import _DECODERS, DecoderSpec
from gvae_ns.vae.config import GaussianVAEConfig, StreamConfig, validate_config
from gvae_ns.vae.flow import FlowPrior
from gvae_ns.vae.layers import Block


class HistoryEncoder(nn.Module):
    """Transformer over right-aligned stage tokens; returns the newest token's output ``[B, width]``."""

    def __init__(self, token_dim: int, width: int, layers: int, heads: int, ff_mult: int, max_history: int,
                 dropout: float) -> None:
        super().__init__()
        self.embed = nn.Linear(token_dim, width)
        self.stage = nn.Embedding(max_history, width)
        self.blocks = nn.ModuleList(Block(width, heads, ff_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """``tokens [B, W, token_dim]`` (newest last), ``mask [B, W]`` -> context ``[B, width]``."""
        w = tokens.shape[1]
        back = torch.arange(w - 1, -1, -1, device=tokens.device)
        x = self.embed(tokens) + self.stage(back)[None]
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only=i == len(self.blocks) - 1)
        return self.norm(x[:, -1])


class Posterior(nn.Module):
    """``q(z | context, children)`` as a diagonal Gaussian: returns ``(mu, log_var)``."""

    def __init__(self, width: int, feature_dim: int, max_children: int, child_embed: int, latent_dim: int) -> None:
        super().__init__()
        self.child = nn.Linear(feature_dim + 1, child_embed)
        self.net = nn.Sequential(
            nn.Linear(width + max_children * child_embed, width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(),
            nn.Linear(width, 2 * latent_dim),
        )

    def forward(self, context: Tensor, children: Tensor, children_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``context [B, D]``, normalised ``children [B, C, F]``, ``children_mask [B, C]``."""
        m = children_mask[..., None].to(children.dtype)
        slots = self.child(torch.cat([children * m, m], dim=-1)).flatten(1)
        mu, log_var = self.net(torch.cat([context, slots], dim=-1)).chunk(2, dim=-1)
        return mu, log_var.clamp(-10.0, 4.0)


class Normalizer(nn.Module):
    """Per-feature mean/std kept as buffers (identity until :meth:`fit`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor, min_std: float = 1e-3) -> None:
        """Set the statistics from rows ``x [M, dim]`` (identity when ``M == 0``)."""
        if x.shape[0] == 0:
            self.mean.zero_()
            self.std.fill_(1.0)
            return
        x = x.double()
        self.mean.copy_(x.mean(dim=0).float())
        self.std.copy_(x.std(dim=0, unbiased=False).clamp_min(min_std).float() if x.shape[0] > 1
                       else torch.ones_like(self.std))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean


@dataclass
class StreamOutput:
    """One stream's prediction for a batch of ``B`` lineages with ``C`` child slots."""

    features: Tensor
    """``[B, C, F]`` predicted relative features, normalised."""
    exist_logits: Tensor
    """``[B, C]`` exist logits."""
    raw_features: Tensor
    """``[B, C, F]`` predicted relative features, denormalised (unclamped)."""
    z: Tensor
    """``[B, latent]`` latent used (posterior sample in training, prior sample at inference)."""
    context: Tensor
    """``[B, width]`` encoded history (never depends on the target)."""
    log_q: Optional[Tensor] = None
    """``[B]`` ``log q(z | x)`` at ``z``; only when a target was given."""
    log_p: Optional[Tensor] = None
    """``[B]`` ``log p_flow(z | context)``; only when a target was given."""
    log_p_fit: Optional[Tensor] = None
    """``[B]`` ``log p_flow`` of the detached ``z`` and context: trains the prior alone (see losses)."""
    target: Optional[Tensor] = None
    """``[B, C, F]`` normalised target features (zero where absent)."""
    raw_target: Optional[Tensor] = None
    """``[B, C, F]`` target relative features, denormalised."""
    target_mask: Optional[Tensor] = None
    """``[B, C]`` bool: target slot exists."""
    prior_features: Optional[Tensor] = None
    """``[B, C, F]`` normalised features decoded from a prior sample (training with ``prior_path``)."""
    prior_exist_logits: Optional[Tensor] = None
    """``[B, C]`` exist logits decoded from that prior sample."""
    prior_raw_features: Optional[Tensor] = None
    """``[B, C, F]`` ``prior_features`` denormalised."""


@dataclass
class VAEOutput:
    """Both streams' predictions."""

    geometry: StreamOutput
    appearance: StreamOutput


@dataclass
class ChildTargets:
    """Target children relative to their parent, per stream, ``C`` slots."""

    geometry: Tensor
    """``[B, C, 10]`` relative geometry features (zero where absent)."""
    appearance: Tensor
    """``[B, C, 49]`` relative appearance features (zero where absent)."""
    mask: Tensor
    """``[B, C]`` bool: slot holds a child."""

    def index(self, idx: Tensor) -> "ChildTargets":
        """The targets of the rows ``idx``."""
        return ChildTargets(self.geometry[idx], self.appearance[idx], self.mask[idx])

    def to(self, device: Union[torch.device, str]) -> "ChildTargets":
        """The same targets on ``device``."""
        return ChildTargets(self.geometry.to(device), self.appearance.to(device), self.mask.to(device))


class StreamVAE(nn.Module):
    """One stream: history encoder, posterior, flow prior, child decoder and normalisers."""

    def __init__(self, token_dim: int, feature_dim: int, cfg: StreamConfig, config: GaussianVAEConfig) -> None:
        super().__init__()
        self.input_clip = config.input_clip
        self.token_norm = Normalizer(token_dim)
        self.target_norm = Normalizer(feature_dim)
        self.encoder = HistoryEncoder(
            token_dim + 1, cfg.width, cfg.encoder_layers, cfg.heads, cfg.ff_mult, config.max_history, config.dropout
        )
        self.posterior = Posterior(cfg.width, feature_dim, config.max_children, cfg.child_embed, cfg.latent_dim)
        self.prior = FlowPrior(cfg.latent_dim, cfg.flow_layers, cfg.flow_hidden, context_dim=cfg.width)
        spec = DecoderSpec(cfg.width, cfg.latent_dim, feature_dim, config.max_children, cfg.decoder_layers,
                           cfg.heads, cfg.ff_mult, config.dropout)
        self.decoder = _DECODERS[config.decoder](spec)

    def encode(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Raw relative tokens ``[B, W, token_dim]`` + mask -> context ``[B, width]``."""
        x = self.token_norm.normalize(tokens).clamp(-self.input_clip, self.input_clip)
        m = mask[..., None].to(x.dtype)
        return self.encoder(torch.cat([x * m, m], dim=-1), mask)

    def forward(
        self,
        tokens: Tensor,
        mask: Tensor,
        target: Optional[Tensor] = None,
        target_mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        temperature: float = 1.0,
        noise: Optional[Tensor] = None,
        prior_path: bool = False,
    ) -> StreamOutput:
        """Training (``target`` given): ``z ~ q(z | history, target)``; with ``prior_path`` the children
        are also decoded from a prior sample (``prior_*`` fields). Inference: ``z = T(noise | history)``
        through the flow prior, with ``noise [B, latent]`` as given or drawn from ``generator`` and
        scaled by ``temperature``."""
        context = self.encode(tokens, mask)
        z = None
        log_q = log_p = log_p_fit = norm_target = None
        if target is not None:
            if target_mask is None:
                raise ValueError("StreamVAE: target_mask is required with target")
            m = target_mask[..., None].to(target.dtype)
            norm_target = self.target_norm.normalize(target) * m
            mu, log_var = self.posterior(context, norm_target, target_mask)
            std = torch.exp(0.5 * log_var)
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + std * eps
            log_q = (-0.5 * eps.pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_p = self.prior.log_prob(z, context)
            log_p_fit = self.prior.log_prob(z.detach(), context.detach())
        else:
            if noise is None:
                noise = torch.randn(context.shape[0], self.prior.dim, generator=generator, device=context.device)
                noise = noise * temperature
            z = self.prior.transform(noise, context)
        features, exist_logits = self.decoder(context, z)
        prior_features = prior_exist = None
        if target is not None and prior_path:
            eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            prior_features, prior_exist = self.decoder(context, self.prior.transform(eps, context))
        return StreamOutput(
            features=features,
            exist_logits=exist_logits,
            raw_features=self.target_norm.denormalize(features),
            z=z,
            context=context,
            log_q=log_q,
            log_p=log_p,
            log_p_fit=log_p_fit,
            target=norm_target,
            raw_target=target,
            target_mask=target_mask,
            prior_features=prior_features,
            prior_exist_logits=prior_exist,
            prior_raw_features=None if prior_features is None else self.target_norm.denormalize(prior_features),
        )


class GaussianVAE(nn.Module):
    """Two-stream lineage VAE; :meth:`predict_children` is the inference entry point."""

    def __init__(self, config: Optional[GaussianVAEConfig] = None) -> None:
        super().__init__()
        config = config or GaussianVAEConfig()
        validate_config(config, tuple(_DECODERS))
        self.config = config
        context = feats.CONTEXT_DIM + (feats.FOOTPRINT_DIM if config.footprint_context else 0)
        self.geometry = StreamVAE(feats.GEOMETRY_DIM + context, feats.GEOMETRY_DIM, config.geometry, config)
        self.appearance = StreamVAE(feats.APPEARANCE_DIM + context, feats.APPEARANCE_DIM, config.appearance, config)
        self.register_buffer("history_window", torch.tensor(config.max_history, dtype=torch.long))

    @property
    def window(self) -> int:
        """Stages of history the encoder reads (newest kept)."""
        return int(self.history_window)

    @property
    def max_children(self) -> int:
        return self.config.max_children

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters per stream (and in total)."""
        geo = sum(p.numel() for p in self.geometry.parameters())
        app = sum(p.numel() for p in self.appearance.parameters())
        return {"geometry": geo, "appearance": app, "total": geo + app}

    def footprints(self, log2_px_per_unit: Optional[Tensor]) -> Optional[Tensor]:
        """What the tokens get of ``log2_px_per_unit`` (``[N]``, see :func:`gvae_ns.vae.features.footprint_column`):
        it when the model reads footprints (``ValueError`` when it is missing), ``None`` when it does not."""
        if not self.config.footprint_context:
            return None
        if log2_px_per_unit is None:
            raise ValueError(
                "this GaussianVAE reads pixel footprints (footprint_context) but got none: build its transitions "
                "with build_transitions(..., cameras=<the training cameras>) and pass log2_px_per_unit at inference"
            )
        return log2_px_per_unit

    def history_tokens(self, history: Tensor, history_mask: Tensor,
                       log2_px_per_unit: Optional[Tensor] = None) -> feats.HistoryTokens:
        """Raw histories ``[N, S, 59]`` + mask -> right-aligned tokens within the model's window (with the
        footprint column from ``log2_px_per_unit [N]`` when the model reads it; ignored otherwise)."""
        return feats.history_tokens(history, history_mask, self.window, self.footprints(log2_px_per_unit))

    def child_targets(self, children: Tensor, children_mask: Tensor, parent: Tensor) -> ChildTargets:
        """Raw children ``[N, C, 59]`` (``C <= max_children``, padded here) relative to ``parent [N, 59]``."""
        n, c = children_mask.shape
        if c > self.max_children:
            raise ValueError(
                f"children: {c} slots but the model predicts max_children={self.max_children}; "
                "truncate the children or raise GaussianVAEConfig.max_children"
            )
        mask = children_mask.bool()
        rel = feats.relative_features(children, parent[:, None, :])
        rel = torch.where(mask[..., None], rel, torch.zeros((), dtype=rel.dtype, device=rel.device))
        if c < self.max_children:
            rel = torch.cat([rel, rel.new_zeros(n, self.max_children - c, feats.REL_DIM)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(n, self.max_children - c)], dim=1)
        geo, app = feats.split_streams(rel)
        return ChildTargets(geometry=geo, appearance=app, mask=mask)

    def forward(
        self,
        tokens: feats.HistoryTokens,
        targets: Optional[ChildTargets] = None,
        generator: Optional[torch.Generator] = None,
        temperature: float = 1.0,
        noise: Optional[tuple[Tensor, Tensor]] = None,
        prior_path: bool = False,
    ) -> VAEOutput:
        """Both streams. With ``targets`` (training) the posterior supplies ``z`` (and with
        ``prior_path`` a prior sample is decoded as well); without, the flow priors do, from ``noise =
        (geometry, appearance)`` base noise (e.g. :meth:`sample_noise`) or from ``generator``."""
        n_geo, n_app = noise if noise is not None else (None, None)
        t_geo = t_app = t_mask = None
        if targets is not None:
            t_geo, t_app, t_mask = targets.geometry, targets.appearance, targets.mask
        geo = self.geometry(tokens.geometry, tokens.mask, t_geo, t_mask, generator, temperature, n_geo, prior_path)
        app = self.appearance(tokens.appearance, tokens.mask, t_app, t_mask, generator, temperature, n_app, prior_path)
        return VAEOutput(geometry=geo, appearance=app)

    def sample_noise(
        self, n: int, generator: Optional[torch.Generator] = None, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Base noise ``temperature * N(0, I)`` for ``n`` lineages per stream (geometry drawn first).
        Drawing it up front makes chunked inference independent of the chunk size."""
        device = self.history_window.device
        geo = torch.randn(n, self.geometry.prior.dim, generator=generator, device=device) * temperature
        app = torch.randn(n, self.appearance.prior.dim, generator=generator, device=device) * temperature
        return geo, app

    def children_from_output(self, output: VAEOutput, parent: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted raw child states ``[B, C, 59]`` (bounded, finite) and exist probabilities ``[B, C]``.

        Offsets and log-scale changes are clamped to the config's bounds; non-finite predictions fall
        back to "no change". The exist probability is the mean of the two streams' probabilities."""
        cfg = self.config
        rel = feats.merge_streams(output.geometry.raw_features, output.appearance.raw_features)
        rel = torch.nan_to_num(rel, nan=0.0, posinf=0.0, neginf=0.0)
        offset = rel[..., feats.REL_OFFSET].clamp(-cfg.max_offset, cfg.max_offset)
        log_scale = rel[..., feats.REL_LOG_SCALE].clamp(cfg.min_log_scale_change, cfg.max_log_scale_change)
        rel = torch.cat([offset, rel[..., feats.REL_ROTATION], log_scale, rel[..., feats.REL_LOG_SCALE.stop:]], -1)
        states = feats.absolute_state(rel, parent[:, None, :])
        prob = 0.5 * (torch.sigmoid(output.geometry.exist_logits) + torch.sigmoid(output.appearance.exist_logits))
        return states, prob

    @torch.no_grad()
    def predict_children(
        self,
        history: Tensor,
        history_mask: Tensor,
        generator: Optional[torch.Generator] = None,
        temperature: float = 1.0,
        log2_px_per_unit: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Children of raw histories ``[N, S, 59]`` one stage ahead: (states ``[N, C, 59]``, exist prob
        ``[N, C]``), with ``z`` drawn from the flow priors."""
        tokens = self.history_tokens(history, history_mask, log2_px_per_unit)
        noise = self.sample_noise(tokens.mask.shape[0], generator, temperature)
        return self.children_from_output(self.forward(tokens, noise=noise), tokens.parent)
