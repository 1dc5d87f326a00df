"""The decoders refinement can use, behind one protocol: fit on a lineage, save, load, extrapolate.

A :class:`Decoder` turns the selected Gaussians (their packed states and ancestor histories) into a
:class:`Proposal`: what each selected Gaussian becomes, which of them hand over to added Gaussians, and the
added Gaussians. Two implementations, picked by name from :data:`DECODERS`:

* ``temporal``, :class:`LineageVAEDecoder`: the lineage VAE (:mod:`gvae_ns.vae`), which reads each
  Gaussian's ancestry through the stages and predicts its children one stage further, ``k`` times;
* ``generative``, :class:`DensifyHeadDecoder`: the generative-densification head (:mod:`gvae_ns.densify`),
  which sees only the current Gaussians and their neighbours and proposes finer ones in one pass per stage.

:func:`decoder_for_run` loads the run's decoder file (:mod:`gvae_ns.run_layout`) when it was trained on
this run state, or fits one on the lineage and saves it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, ClassVar, Dict, NamedTuple, Optional, Protocol, Type, Union

import torch
from torch import Tensor

from gvae_ns.console import say
from gvae_ns.densify.apply import densify
from gvae_ns.densify.head import DensifyHead
from gvae_ns.densify.train import (
    DensifyTrainConfig,
    load_densify_head,
    save_densify_head,
    train_densify_head,
)
from gvae_ns.lineage.dataset import build_transitions
from gvae_ns.lineage.format import Lineage
from gvae_ns.progress import phase
from gvae_ns.run_layout import DECODER_FILES
from gvae_ns.tagged_file import Provenance
from gvae_ns.vae.extrapolate import extrapolate
from gvae_ns.vae.file import load_vae, save_vae
from gvae_ns.vae.model import GaussianVAE
from gvae_ns.vae.train import VAETrainConfig, train_vae

Device = Union[str, torch.device]


class Proposal(NamedTuple):
    """What a decoder proposes for ``n`` selected Gaussians."""

    states: Tensor
    """``[n, 59]`` the selected Gaussians' new states (unchanged where the decoder leaves them)."""
    handed_over: Tensor
    """``[n]`` bool: the selected Gaussian is removed, its added descendants replace it."""
    added: Tensor
    """``[M, 59]`` added Gaussians."""


class Decoder(Protocol):
    """What refinement needs from a decoder (see the module docstring)."""

    name: ClassVar[str]
    """``temporal`` or ``generative``: the name files and flags use."""
    label: ClassVar[str]
    """What to call it in messages."""

    @classmethod
    def fit(cls, lineage: Lineage, steps: int, device: Device, seed: int, writer_step: int = 0) -> "Decoder":
        """Train on ``lineage``'s stage transitions for ``steps`` optimiser steps (progress shown)."""

    @classmethod
    def load(cls, path: Path, device: Device, expected: Optional[Provenance], rebuild: Optional[str]) -> "Decoder":
        """Read a decoder file made for the run state ``expected`` (refused otherwise, with ``rebuild``)."""

    def save(self, path: Path, provenance: Optional[Provenance]) -> Path:
        """Write the decoder file atomically, tied to ``provenance``."""

    def propose(self, states: Tensor, history: Tensor, history_mask: Tensor, stages: int, max_new: int,
                seed: int) -> Proposal:
        """Extrapolate the selected Gaussians ``stages`` stages (``states [n, 59]``, ``history [n, S, 59]``)."""


class LineageVAEDecoder:
    """The lineage VAE as a :class:`Decoder`."""

    name: ClassVar[str] = "temporal"
    label: ClassVar[str] = "VAE"

    def __init__(self, net: GaussianVAE) -> None:
        self.net = net

    @classmethod
    def fit(cls, lineage: Lineage, steps: int, device: Device, seed: int, writer_step: int = 0) -> "LineageVAEDecoder":
        config = VAETrainConfig(steps=steps)
        transitions = build_transitions(lineage, max_children=config.model.max_children)
        with phase("VAE training", config.steps, writer_step) as advance:
            net, _ = train_vae(transitions, config, device=device, seed=seed, progress=advance)
        return cls(net)

    @classmethod
    def load(cls, path: Path, device: Device, expected: Optional[Provenance], rebuild: Optional[str]) -> "LineageVAEDecoder":
        return cls(load_vae(path, map_location=device, expected=expected, rebuild=rebuild))

    def save(self, path: Path, provenance: Optional[Provenance]) -> Path:
        return save_vae(self.net, path, provenance)

    def propose(self, states: Tensor, history: Tensor, history_mask: Tensor, stages: int, max_new: int,
                seed: int) -> Proposal:
        device = next(self.net.parameters()).device
        result = extrapolate(self.net, history.to(device), history_mask.to(device), steps=stages, max_new=max_new,
                             seed=seed)
        # A lineage that ended hands over to its added descendants (as a split does); one that ended with none
        # keeps its Gaussian: refinement adds detail, it never deletes the trained scene's coverage.
        has_descendants = torch.zeros(states.shape[0], dtype=torch.bool)
        has_descendants[result.added_source.cpu()] = True
        return Proposal(states=result.refined.cpu(), handed_over=~result.alive.cpu() & has_descendants,
                        added=result.added.cpu())


class DensifyHeadDecoder:
    """The generative-densification head as a :class:`Decoder` (it reads no history)."""

    name: ClassVar[str] = "generative"
    label: ClassVar[str] = "densification head"

    def __init__(self, net: DensifyHead) -> None:
        self.net = net

    @classmethod
    def fit(cls, lineage: Lineage, steps: int, device: Device, seed: int, writer_step: int = 0) -> "DensifyHeadDecoder":
        config = DensifyTrainConfig(steps=steps)
        transitions = build_transitions(lineage, max_children=config.max_children)
        net, _ = train_densify_head(transitions, config, device=device, seed=seed)
        return cls(net)

    @classmethod
    def load(cls, path: Path, device: Device, expected: Optional[Provenance], rebuild: Optional[str]) -> "DensifyHeadDecoder":
        return cls(load_densify_head(path, map_location=device, expected=expected, rebuild=rebuild))

    def save(self, path: Path, provenance: Optional[Provenance]) -> Path:
        return save_densify_head(self.net, path, provenance)

    def propose(self, states: Tensor, history: Tensor, history_mask: Tensor, stages: int, max_new: int,
                seed: int) -> Proposal:
        device = next(self.net.parameters()).device
        added, source = densify(self.net, states.to(device), steps=stages, max_new=max_new)
        handed_over = torch.zeros(states.shape[0], dtype=torch.bool)
        handed_over[source.unique().cpu()] = True
        return Proposal(states=states.clone(), handed_over=handed_over, added=added.cpu())


DECODERS: Dict[str, Type[Decoder]] = {LineageVAEDecoder.name: LineageVAEDecoder,
                                      DensifyHeadDecoder.name: DensifyHeadDecoder}
"""Decoder name -> implementation (the names of :data:`gvae_ns.run_layout.DECODER_FILES`)."""
assert set(DECODERS) == set(DECODER_FILES)


def decoder_class(name: str) -> Type[Decoder]:
    """The decoder called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}: use one of {sorted(DECODERS)}")
    return DECODERS[name]


def decoder_for_run(name: str, path: Path, lineage: Lineage, provenance: Provenance, steps: int, device: Device,
                    seed: int = 0, retrain: bool = False, rebuild: Optional[str] = None, writer_step: int = 0,
                    log: Optional[Callable[[str], None]] = None) -> Decoder:
    """The decoder in ``path`` when it was trained on this run state (``provenance``), else one fitted on
    ``lineage`` for ``steps`` steps and saved to ``path`` (also when ``retrain``).

    A stale, foreign or damaged file raises :class:`~gvae_ns.tagged_file.TaggedFileError` (a ``ValueError``)
    with ``rebuild`` as the fix; it is never replaced without ``retrain``."""
    cls = decoder_class(name)
    log = log or say
    if path.exists() and not retrain:
        decoder = cls.load(path, device, provenance, rebuild)
        log(f"gvae-refine: using the {cls.label} in {path} (trained on this checkpoint)")
        return decoder
    started = time.perf_counter()
    decoder = cls.fit(lineage, steps, device, seed, writer_step)
    decoder.save(path, provenance)
    log(f"gvae-refine: trained the {cls.label} in {time.perf_counter() - started:.1f} s -> {path}")
    return decoder
