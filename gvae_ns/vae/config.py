"""Configuration of the GaussianVAE: the sizes of its two streams and the bounds on what it predicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class StreamConfig:
    """Sizes of one stream (geometry or appearance)."""

    width: int = 64
    """Transformer width (token embedding size)."""
    encoder_layers: int = 2
    """Transformer blocks over the history tokens."""
    decoder_layers: int = 2
    """Depth of the child decoder (hidden layers for ``mlp``, attention blocks for ``slots``)."""
    heads: int = 4
    """Attention heads; must divide ``width``."""
    ff_mult: int = 2
    """Feed-forward hidden size as a multiple of ``width``."""
    latent_dim: int = 8
    """Size of the latent ``z`` (>= 2, the flow couples halves)."""
    flow_layers: int = 4
    """Affine-coupling layers of the flow prior."""
    flow_hidden: int = 64
    """Hidden size of each coupling's conditioner."""
    child_embed: int = 16
    """Per-slot embedding size of the target children inside the posterior."""


def _geometry_default() -> StreamConfig:
    return StreamConfig(width=64, encoder_layers=2, decoder_layers=2, heads=4, latent_dim=8, flow_hidden=48)


def _appearance_default() -> StreamConfig:
    return StreamConfig(width=80, encoder_layers=2, decoder_layers=2, heads=4, latent_dim=16, flow_hidden=64)


@dataclass
class GaussianVAEConfig:
    """Architecture of :class:`GaussianVAE`; stored in every saved model."""

    geometry: StreamConfig = field(default_factory=_geometry_default)
    """Geometry stream (position 3, rotation 4, log-scale 3, exist 1)."""
    appearance: StreamConfig = field(default_factory=_appearance_default)
    """Appearance stream (SH rest 45, colour 3, opacity 1, exist 1)."""
    max_children: int = 4
    """Child slots ``C`` predicted per parent; slot 0 is the parent's own continuation (match the
    lineage dataset's ``build_transitions(max_children=...)``)."""
    max_history: int = 8
    """Most stages a lineage token sequence holds (newest kept); training narrows the window used to
    the longest history it saw, so inference never meets an untrained stage position."""
    decoder: str = "mlp"
    """Child decoder by registered name: ``mlp`` (all slots jointly from one MLP; cheap at 1e5-1e6
    lineages) or ``slots`` (learned slot tokens with self-attention, mirroring the encoder; ~5x the
    inference cost); see :func:`gvae_ns.vae.child_decoders.register_decoder` for others."""
    footprint_context: bool = False
    """Give every history token its log2 pixel length at its stage's resolution as one more context column
    (:func:`gvae_ns.vae.features.footprint_column`), so the model can tell a Gaussian that a finer resolution
    can resolve from one already below a pixel. Its inputs then need the training cameras: transitions built
    with ``build_transitions(..., cameras=...)`` and ``log2_px_per_unit`` at inference."""
    dropout: float = 0.0
    """Dropout inside the transformer blocks."""
    input_clip: float = 10.0
    """Normalised token features are clipped to ``[-input_clip, input_clip]`` (outlier safety)."""
    max_offset: float = 8.0
    """Predicted child offsets are clamped to this many parent units (largest parent axis) per axis."""
    min_log_scale_change: float = -4.0
    """Lower bound on a child's log-scale minus its parent's."""
    max_log_scale_change: float = 1.0
    """Upper bound on a child's log-scale minus its parent's."""


def validate_config(config: GaussianVAEConfig, decoders: Sequence[str]) -> None:
    """``ValueError`` naming the field for a config no :class:`~gvae_ns.vae.model.GaussianVAE` can be built from
    (``decoders``: the registered child-decoder names)."""
    for name in ("geometry", "appearance"):
        s: StreamConfig = getattr(config, name)
        if s.width % s.heads != 0:
            raise ValueError(f"GaussianVAEConfig.{name}: width {s.width} is not divisible by heads {s.heads}")
        if s.latent_dim < 2:
            raise ValueError(f"GaussianVAEConfig.{name}.latent_dim: must be >= 2, got {s.latent_dim}")
    if config.max_children < 1:
        raise ValueError(f"GaussianVAEConfig.max_children: must be >= 1, got {config.max_children}")
    if config.max_history < 1:
        raise ValueError(f"GaussianVAEConfig.max_history: must be >= 1, got {config.max_history}")
    if config.decoder not in decoders:
        raise ValueError(
            f"GaussianVAEConfig.decoder: unknown decoder {config.decoder!r}; registered: {tuple(decoders)}"
        )
    if config.min_log_scale_change >= config.max_log_scale_change:
        raise ValueError("GaussianVAEConfig: min_log_scale_change must be below max_log_scale_change")
