"""The decoders refinement can use, behind one protocol: fit on a lineage, save, load, extrapolate.

A :class:`Decoder` turns the selected Gaussians (their packed states and ancestor histories) into a
:class:`Proposal`: for each selected Gaussian, the family of Gaussians that would replace it ``k`` stages
finer (possibly none). What is done with a family (it replaces its parent only when it has two members or
more, with the parent's opacity conserved) is the Refiner's rule, the same for every decoder. Six
implementations, picked by name from :data:`DECODERS`:

* ``temporal``, :class:`LineageVAEDecoder`: the lineage VAE (:mod:`gvae_ns.vae`), which reads each
  Gaussian's ancestry through the stages and predicts its children one stage further, ``k`` times; its family
  is the lineage's own continuation (when it survives) and the Gaussians added beside it;
* ``generative``, :class:`DensifyHeadDecoder`: the generative-densification head (:mod:`gvae_ns.densify`),
  which sees only the current Gaussians and their neighbours and proposes finer ones in one pass per stage;
* ``prior``, :class:`PriorDecoder`: the lineage VAE shipped in the package, trained across procedural scenes
  by ``gvae-pretrain`` (:mod:`gvae_ns.prior`), used zero-shot; ``prior-tuned``, :class:`TunedPriorDecoder`: the
  same, fine-tuned on the run's lineage;
* ``split``, :class:`SplitDecoder`: the no-learning control, 3DGS's split (two children drawn from the
  parent's own Gaussian, scales divided by 1.6), ``k`` times;
* ``none``, :class:`NoProposalDecoder`: the fine-tune-only control, which proposes nothing.

:func:`decoder_for_run` loads the run's decoder file (:mod:`gvae_ns.run_layout`) when it was trained on
this run state, or fits one on the lineage and saves it; the split control has nothing to fit or store.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Protocol, Type, Union

import torch
import torch.nn.functional as F
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
from gvae_ns.gaussians import MEANS, PACKED_DIM, QUATS, SCALES
from gvae_ns.lineage.dataset import build_transitions
from gvae_ns.lineage.format import Lineage
from gvae_ns.prior.shipped import load_shipped, read_manifest
from gvae_ns.progress import phase
from gvae_ns.quaternions import rotate
from gvae_ns.refine.result import RefinementUnavailable
from gvae_ns.run_layout import DECODER_FILES
from gvae_ns.tagged_file import Provenance
from gvae_ns.vae.extrapolate import extrapolate
from gvae_ns.vae.file import load_vae, save_vae
from gvae_ns.vae.model import GaussianVAE
from gvae_ns.vae.train import VAETrainConfig, train_vae

Device = Union[str, torch.device]


class Proposal(NamedTuple):
    """What a decoder proposes for ``n`` selected Gaussians: families of packed Gaussians."""

    members: Tensor
    """``[M, 59]`` the proposed Gaussians, grouped by family."""
    source: Tensor
    """``[M]`` long: the selected row (``0..n-1``) each member would replace."""


class Decoder(Protocol):
    """What refinement needs from a decoder (see the module docstring)."""

    name: ClassVar[str]
    """``temporal``, ``generative`` or ``split``: the name files and flags use."""
    label: ClassVar[str]
    """What to call it in messages."""
    per_run: ClassVar[bool]
    """Whether it is fitted on the run's lineage and kept in a file beside the run (the lineage VAE, the
    densification head); the shipped prior and the controls are not."""

    @classmethod
    def fit(cls, lineage: Lineage, steps: int, device: Device, seed: int, writer_step: int = 0,
            cameras: Any = None) -> "Decoder":
        """Train on ``lineage``'s stage transitions for ``steps`` optimiser steps (progress shown); ``cameras``: the
        training cameras (nerfstudio ``Cameras`` at the data's resolution), for a decoder that reads pixel
        footprints."""

    @classmethod
    def load(cls, path: Path, device: Device, expected: Optional[Provenance], rebuild: Optional[str]) -> "Decoder":
        """Read a decoder file made for the run state ``expected`` (refused otherwise, with ``rebuild``)."""

    def save(self, path: Path, provenance: Optional[Provenance]) -> Path:
        """Write the decoder file atomically, tied to ``provenance``."""

    def propose(self, states: Tensor, history: Tensor, history_mask: Tensor, stages: int, max_new: int,
                seed: int, temperature: float = 0.0, log2_px_per_unit: Optional[Tensor] = None) -> Proposal:
        """Families for the selected Gaussians ``stages`` stages finer (``states [n, 59]``, ``history [n, S, 59]``);
        at most ``n + max_new`` members; ``temperature`` scales the latent noise of a generative decoder (0:
        its deterministic prediction); ``log2_px_per_unit [n]``: pixels per world unit around each at the trained
        resolution (log2; the scores' ``log2_px_per_unit``), which a decoder that reads footprints needs."""


class LineageVAEDecoder:
    """The lineage VAE as a :class:`Decoder`."""

    name: ClassVar[str] = "temporal"
    label: ClassVar[str] = "VAE"
    per_run: ClassVar[bool] = True

    def __init__(self, net: GaussianVAE) -> None:
        self.net = net

    @classmethod
    def fit(cls, lineage: Lineage, steps: int, device: Device, seed: int, writer_step: int = 0,
            cameras: Any = None) -> "LineageVAEDecoder":
        config = VAETrainConfig(steps=steps)
        transitions = build_transitions(lineage, max_children=config.model.max_children,
                                        cameras=cameras if config.model.footprint_context else None)
        with phase("VAE training", config.steps, writer_step) as advance:
            net, _ = train_vae(transitions, config, device=device, seed=seed, progress=advance)
        return cls(net)

    @classmethod
    def load(cls, path: Path, device: Device, expected: Optional[Provenance], rebuild: Optional[str]) -> "LineageVAEDecoder":
        return cls(load_vae(path, map_location=device, expected=expected, rebuild=rebuild))

    def save(self, path: Path, provenance: Optional[Provenance]) -> Path:
        return save_vae(self.net, path, provenance)

    def propose(self, states: Tensor, history: Tensor, history_mask: Tensor, stages: int, max_new: int,
                seed: int, temperature: float = 0.0, log2_px_per_unit: Optional[Tensor] = None) -> Proposal:
        device = next(self.net.parameters()).device
        if self.net.config.footprint_context and log2_px_per_unit is None:
            raise RefinementUnavailable(
                f"the {self.label} reads pixel footprints, and the selection scores hold none (they were measured "
                "before footprints were): run gvae-refine again to score the run's views."
            )
        result = extrapolate(self.net, history.to(device), history_mask.to(device), steps=stages, max_new=max_new,
                             seed=seed, temperature=temperature, log2_px_per_unit=log2_px_per_unit)
        # the family: the lineage's own continuation when it survives, and its added descendants
        alive = result.alive.cpu().nonzero().flatten()
        members = torch.cat([result.refined.cpu()[alive], result.added.cpu()])
        source = torch.cat([alive, result.added_source.cpu()])
        order = torch.argsort(source, stable=True)
        return Proposal(members=members[order], source=source[order])


class PriorDecoder(LineageVAEDecoder):
    """The cross-scene prior shipped in the package (:mod:`gvae_ns.prior.shipped`): a lineage VAE trained by
    ``gvae-pretrain`` on many procedural scenes, used as it is (zero-shot); nothing is fitted on the run or kept
    beside it. Proposals are the lineage VAE's."""

    name: ClassVar[str] = "prior"
    label: ClassVar[str] = "shipped prior"
    per_run: ClassVar[bool] = False

    @classmethod
    def fit(cls, lineage: Lineage, steps: int, device: Device, seed: int, writer_step: int = 0,
            cameras: Any = None) -> "PriorDecoder":
        return cls(load_shipped(device))

    @classmethod
    def load(cls, path: Path, device: Device, expected: Optional[Provenance], rebuild: Optional[str]) -> "PriorDecoder":
        return cls(load_shipped(device))

    def save(self, path: Path, provenance: Optional[Provenance]) -> Path:
        return path


class TunedPriorDecoder(LineageVAEDecoder):
    """The shipped prior fine-tuned on the run's own lineage for ``steps`` steps (its weights, statistics and
    history window as the start), kept beside the run like the lineage VAE. Its file also records the sha256 of
    the prior it started from, so after another prior is installed it is refused as stale, like a lineage VAE
    of another checkpoint."""

    name: ClassVar[str] = "prior-tuned"
    label: ClassVar[str] = "shipped prior, fine-tuned on the run"
    per_run: ClassVar[bool] = True

    @classmethod
    def load(cls, path: Path, device: Device, expected: Optional[Provenance], rebuild: Optional[str]) -> "TunedPriorDecoder":
        return cls(load_vae(path, map_location=device, expected=_from_shipped(expected), rebuild=rebuild))

    def save(self, path: Path, provenance: Optional[Provenance]) -> Path:
        return save_vae(self.net, path, _from_shipped(provenance))

    @classmethod
    def fit(cls, lineage: Lineage, steps: int, device: Device, seed: int, writer_step: int = 0,
            cameras: Any = None) -> "TunedPriorDecoder":
        prior = load_shipped(device)
        config = VAETrainConfig(steps=steps)
        if prior.config.footprint_context and cameras is None:
            raise RefinementUnavailable(f"the {cls.label} reads pixel footprints: fine-tuning it needs the training "
                                        "cameras.")
        transitions = build_transitions(lineage, max_children=prior.config.max_children,
                                        cameras=cameras if prior.config.footprint_context else None)
        with phase("Prior fine-tune", config.steps, writer_step) as advance:
            net, _ = train_vae(transitions, config, device=device, seed=seed, progress=advance, start_from=prior)
        return cls(net)


def _from_shipped(provenance: Optional[Provenance]) -> Optional[Provenance]:
    """``provenance`` with the installed prior's sha256 as its base weights (:class:`PriorUnavailable` when none)."""
    return None if provenance is None else replace(provenance, base_sha256=str(read_manifest()["sha256"]))


class DensifyHeadDecoder:
    """The generative-densification head as a :class:`Decoder` (it reads no history)."""

    name: ClassVar[str] = "generative"
    label: ClassVar[str] = "densification head"
    per_run: ClassVar[bool] = True

    def __init__(self, net: DensifyHead) -> None:
        self.net = net

    @classmethod
    def fit(cls, lineage: Lineage, steps: int, device: Device, seed: int, writer_step: int = 0,
            cameras: Any = None) -> "DensifyHeadDecoder":
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
                seed: int, temperature: float = 0.0, log2_px_per_unit: Optional[Tensor] = None) -> Proposal:
        device = next(self.net.parameters()).device
        members, source = densify(self.net, states.to(device), steps=stages, max_new=max_new)
        return Proposal(members=members.cpu(), source=source.cpu())


class _Unlearned:
    """A control decoder: nothing to fit, nothing to keep in a file."""

    per_run: ClassVar[bool] = False

    @classmethod
    def fit(cls, lineage: Lineage, steps: int, device: Device, seed: int, writer_step: int = 0,
            cameras: Any = None):
        return cls()

    @classmethod
    def load(cls, path: Path, device: Device, expected: Optional[Provenance], rebuild: Optional[str]):
        return cls()

    def save(self, path: Path, provenance: Optional[Provenance]) -> Path:
        return path


class SplitDecoder(_Unlearned):
    """The no-learning control: 3DGS's split, ``k`` times (nothing is fitted, nothing is stored).

    Each split replaces a Gaussian by two children whose centres are drawn from the Gaussian itself
    (``N(mean, Sigma)``), with its rotation, colour and opacity and its scales divided by 1.6, as 3DGS and
    gsplat's ``DefaultStrategy`` split. ``k`` stages split each child again, so a family has ``2**k`` members
    (within the ``max_new`` budget, first come first served in row order); deterministic for a ``seed``."""

    name: ClassVar[str] = "split"
    label: ClassVar[str] = "3DGS split"
    SCALE_DIVISOR: ClassVar[float] = 1.6
    """What a split divides the scales by (3DGS, gsplat)."""

    def propose(self, states: Tensor, history: Tensor, history_mask: Tensor, stages: int, max_new: int,
                seed: int, temperature: float = 0.0, log2_px_per_unit: Optional[Tensor] = None) -> Proposal:
        generator = torch.Generator().manual_seed(seed)
        members, source = states.float().cpu(), torch.arange(states.shape[0])
        budget = states.shape[0] + max_new
        for _ in range(stages):
            splittable = max(0, min(members.shape[0], budget - members.shape[0]))
            if splittable == 0:
                break
            parents, kept = members[:splittable], members[splittable:]
            children = split_gaussians(parents, generator, self.SCALE_DIVISOR)
            members = torch.cat([children, kept])
            source = torch.cat([source[:splittable].repeat_interleave(2), source[splittable:]])
        order = torch.argsort(source, stable=True)
        return Proposal(members=members[order], source=source[order])


class NoProposalDecoder(_Unlearned):
    """The fine-tune-only control: proposes nothing, so the refinement is the trained scene fine-tuned."""

    name: ClassVar[str] = "none"
    label: ClassVar[str] = "no proposals"

    def propose(self, states: Tensor, history: Tensor, history_mask: Tensor, stages: int, max_new: int,
                seed: int, temperature: float = 0.0, log2_px_per_unit: Optional[Tensor] = None) -> Proposal:
        return Proposal(members=states.new_zeros(0, PACKED_DIM), source=torch.zeros(0, dtype=torch.long))


def split_gaussians(parents: Tensor, generator: torch.Generator, scale_divisor: float = 1.6) -> Tensor:
    """Two children per packed parent ``[n, 59]`` (rows ``2i, 2i+1`` from parent ``i``): centres drawn from
    ``N(mean, R S^2 R^T)``, log scales minus ``log(scale_divisor)``, everything else the parent's."""
    if parents.dim() != 2 or parents.shape[1] != PACKED_DIM:
        raise ValueError(f"split_gaussians: parents must be packed Gaussians [n, {PACKED_DIM}], got {tuple(parents.shape)}")
    n = parents.shape[0]
    children = parents.repeat_interleave(2, dim=0).clone()
    scales = torch.exp(parents[:, SCALES]).repeat_interleave(2, dim=0)
    quats = parents[:, QUATS].repeat_interleave(2, dim=0)
    offsets = rotate(F.normalize(quats, dim=-1), torch.randn(2 * n, 3, generator=generator) * scales)
    children[:, MEANS] = children[:, MEANS] + offsets
    children[:, SCALES] = children[:, SCALES] - math.log(scale_divisor)
    return children


DECODERS: Dict[str, Type[Decoder]] = {LineageVAEDecoder.name: LineageVAEDecoder,
                                      DensifyHeadDecoder.name: DensifyHeadDecoder, PriorDecoder.name: PriorDecoder,
                                      TunedPriorDecoder.name: TunedPriorDecoder,
                                      SplitDecoder.name: SplitDecoder, NoProposalDecoder.name: NoProposalDecoder}
"""Decoder name -> implementation; the learned ones are kept in the files of
:data:`gvae_ns.run_layout.DECODER_FILES`."""
assert {n for n, d in DECODERS.items() if d.per_run} == set(DECODER_FILES)


def decoder_class(name: str) -> Type[Decoder]:
    """The decoder called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}: use one of {sorted(DECODERS)}")
    return DECODERS[name]


def decoder_for_run(name: str, path: Path, lineage: Lineage, provenance: Provenance, steps: int, device: Device,
                    seed: int = 0, retrain: bool = False, rebuild: Optional[str] = None, writer_step: int = 0,
                    log: Optional[Callable[[str], None]] = None, cameras: Any = None) -> Decoder:
    """The decoder in ``path`` when it was trained on this run state (``provenance``), else one fitted on
    ``lineage`` for ``steps`` steps and saved to ``path`` (also when ``retrain``); ``cameras``: the training
    cameras, for a decoder that reads pixel footprints.

    A stale, foreign or damaged file raises :class:`~gvae_ns.tagged_file.TaggedFileError` (a ``ValueError``)
    with ``rebuild`` as the fix; it is never replaced without ``retrain``."""
    cls = decoder_class(name)
    log = log or say
    if not cls.per_run:
        return cls.fit(lineage, steps, device, seed, writer_step, cameras)
    if path.exists() and not retrain:
        decoder = cls.load(path, device, provenance, rebuild)
        log(f"gvae-refine: using the {cls.label} in {path} (trained on this checkpoint)")
        return decoder
    started = time.perf_counter()
    decoder = cls.fit(lineage, steps, device, seed, writer_step, cameras)
    decoder.save(path, provenance)
    log(f"gvae-refine: trained the {cls.label} in {time.perf_counter() - started:.1f} s -> {path}")
    return decoder
