"""The GaussianVAE's file ``vae.pt``: config + weights, tagged and tied to the run it was trained on
(:mod:`gvae_ns.tagged_file`), loadable with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Union

import torch

from gvae_ns.tagged_file import FileFormat, Provenance, load_tagged, save_tagged
from gvae_ns.vae.config import GaussianVAEConfig, StreamConfig
from gvae_ns.vae.model import GaussianVAE

FORMAT_NAME = "gvae_ns.vae"
FORMAT_VERSION = 2
"""Version 2 added the provenance (the run state the VAE was trained on)."""
VAE_FORMAT = FileFormat(tag=FORMAT_NAME, version=FORMAT_VERSION, what="GaussianVAE",
                        keys={"config": dict, "state_dict": dict},
                        rebuild="train it again (gvae-refine --load-config <run>/config.yml --retrain-decoder)")


def config_to_dict(config: GaussianVAEConfig) -> dict:
    """Plain-python (weights_only-safe) form of a config."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict, source: str = "config") -> GaussianVAEConfig:
    """Inverse of :func:`config_to_dict`; unknown or mistyped fields raise ``ValueError`` naming ``source``."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: config must be a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(GaussianVAEConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{source}: unknown GaussianVAEConfig fields {sorted(unknown)}")
    kwargs = dict(data)
    stream_fields = {f.name for f in dataclasses.fields(StreamConfig)}
    for name in ("geometry", "appearance"):
        if name in kwargs:
            sub = kwargs[name]
            if not isinstance(sub, dict) or set(sub) - stream_fields:
                raise ValueError(f"{source}: GaussianVAEConfig.{name} is not a valid StreamConfig: {sub!r}")
            kwargs[name] = StreamConfig(**sub)
    return GaussianVAEConfig(**kwargs)


def save_vae(vae: GaussianVAE, path: Union[str, os.PathLike], provenance: Optional[Provenance] = None) -> Path:
    """Write ``vae`` (config + weights + normalisation buffers) to ``path`` atomically; returns the path.

    ``provenance``: the run state the VAE was trained on (:class:`gvae_ns.tagged_file.Provenance`); a run's
    ``vae.pt`` always has one, so a later load can refuse it for another run. The file holds only tensors
    and plain python types, so :func:`load_vae` reads it with ``torch.load(weights_only=True)``."""
    payload = {
        "config": config_to_dict(vae.config),
        "state_dict": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
    }
    return save_tagged(path, VAE_FORMAT, payload, provenance)


def load_vae(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu",
             expected: Optional[Provenance] = None, rebuild: Optional[str] = None) -> GaussianVAE:
    """Read a model written by :func:`save_vae` (eval mode).

    ``expected``: the run state the file must have been trained on (``None``: not checked); ``rebuild``: the
    fix error messages give. A missing file raises ``FileNotFoundError``; an unreadable, foreign, old,
    malformed (missing keys, weights that do not fit the config, NaN) or stale file raises
    :class:`gvae_ns.tagged_file.TaggedFileError` (a ``ValueError``) naming it."""
    loaded = load_tagged(path, VAE_FORMAT, expected=expected, rebuild=rebuild)
    state = loaded.payload["state_dict"]
    for key in state:
        loaded.tensor(key, source=state, finite=True, label=f"state_dict.{key}")
    try:
        config = config_from_dict(loaded.payload["config"], source="config")
    except (ValueError, TypeError) as exc:
        loaded.fail(str(exc))
    try:
        vae = GaussianVAE(config)
        vae.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        loaded.fail(f"GaussianVAE weights do not match its config ({str(exc).splitlines()[0][:300]})")
    return vae.to(map_location).eval()
