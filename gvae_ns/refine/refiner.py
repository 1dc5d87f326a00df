"""The Refiner: plain data of a trained run + a decoder -> :class:`~gvae_ns.refine.result.Refinement`.

It holds what a new stage count or selection needs (the packed trained Gaussians, their ancestor histories,
the selection signals and the decoder), so the viewer can switch between them in milliseconds; each
(stages, select) result is cached. It never touches a model: the run hands it a :class:`RunState`, and the
caller decides what to show.

The rule, the same for every decoder: a selected Gaussian is replaced by the family its decoder proposes when
that family has two members or more, and kept exactly as trained otherwise (a converged Gaussian is never
overwritten by a prediction). A replacing family keeps its parent's coverage and no more
(:func:`conserve_families`): each member's opacity is ``1 - (1 - a)^(1/m)`` for a parent of opacity ``a`` and
``m`` members, so that ``1 - prod(1 - a_i) = a``, and no member is wider on any axis than its parent divided by
1.6, as a 3DGS split shrinks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from gvae_ns.gaussians import OPACITY, PARAM_KEYS, SCALES, pack_gaussians, unpack_gaussians
from gvae_ns.lineage.dataset import final_histories
from gvae_ns.lineage.format import Lineage
from gvae_ns.refine.decoder import Decoder
from gvae_ns.refine.result import Refinement, RefinementUnavailable
from gvae_ns.refine.score import combine_scores, select_top
from gvae_ns.tagged_file import Provenance

MAX_STAGES = 4
"""Most extrapolation stages past the finest trained one (each one resolution doubling)."""
SPLIT_SHRINK = 1.6
"""No member of a replacing family is wider on any axis than its parent divided by this (3DGS's split)."""


def conserve_families(parents: Tensor, members: Tensor, source: Tensor) -> Tensor:
    """``members [M, 59]`` (packed, raw) of the families replacing ``parents [n, 59]`` (``source [M]``: each
    member's parent row), with opacity conserved per family and scales capped (see the module docstring)."""
    out = members.clone()
    m = torch.bincount(source, minlength=parents.shape[0])[source].to(members.dtype)
    a_parent = torch.sigmoid(parents[source, OPACITY].squeeze(-1).double())
    a_member = -torch.expm1(torch.log1p(-a_parent.clamp(max=1 - 1e-12)) / m.double())  # 1 - (1 - a)^(1/m)
    out[:, OPACITY] = torch.logit(a_member.clamp(1e-12, 1 - 1e-12)).to(members.dtype).unsqueeze(-1)
    out[:, SCALES] = torch.minimum(members[:, SCALES], parents[source, SCALES] - math.log(SPLIT_SHRINK))
    return out


@dataclass
class RunState:
    """A trained run as refinement reads it: plain tensors, no model."""

    params: Dict[str, Tensor]
    """splatfacto-shaped parameters of the trained Gaussians (:data:`~gvae_ns.gaussians.PARAM_KEYS`), detached."""
    lineage: Optional[Lineage]
    """The lineage, its last snapshot being these Gaussians (``None``: the run recorded none)."""
    live_ids: Optional[Tensor]
    """The lineage ids of the rows of ``params``."""
    provenance: Provenance
    """The run state files beside the run are tied to."""
    run_dir: Optional[Path]
    """The run folder (``None``: not known, e.g. a model built in a test)."""
    device: Any
    """Where the decoder runs (the model's device)."""

    @property
    def num_gaussians(self) -> int:
        return int(self.params["means"].shape[0])


def check_lineage(lineage: Optional[Lineage]) -> Lineage:
    """``lineage`` when it can teach a decoder (two stage snapshots or more); else
    :class:`~gvae_ns.refine.result.RefinementUnavailable` saying why."""
    if lineage is None or lineage.num_snapshots == 0:
        raise RefinementUnavailable(
            "the run has no lineage snapshots: it was not trained with ns-train gaussianvae, or it stopped "
            "before the first stage ended."
        )
    if lineage.num_snapshots < 2:
        raise RefinementUnavailable(
            "the lineage has one stage only, so there is no stage-to-stage transition to learn; train with at "
            "least two --pipeline.model.stage-downscales."
        )
    return lineage


class Refiner:
    """Extrapolates the selected Gaussians of one run with one decoder; see the module docstring."""

    def __init__(self, run: RunState, decoder: Decoder, scores: Dict[str, Tensor], fraction: float = 0.1,
                 max_new_ratio: float = 1.0, seed: int = 0, temperature: float = 0.0) -> None:
        """``scores``: the selection signals (:func:`gvae_ns.refine.score.score_gaussians`); ``fraction``: the
        share selected by ``hessian`` / ``grad``; ``max_new_ratio``: cap on added Gaussians per selected one;
        ``temperature``: the decoder's latent noise (0: its deterministic prediction)."""
        history, mask, ids = final_histories(check_lineage(run.lineage))
        live = run.live_ids
        if live is None or live.numel() != ids.numel() or not torch.equal(live.cpu(), ids.cpu()):
            raise RefinementUnavailable(
                "the lineage's final snapshot does not match the checkpoint's Gaussians; re-run gvae-refine "
                "on the checkpoint the lineage was recorded with."
            )
        self.decoder = decoder
        self.history, self.history_mask = history, mask
        self.states = pack_gaussians({k: run.params[k].detach() for k in PARAM_KEYS}).cpu()
        self.sh_rest_coeffs = int(run.params["features_rest"].shape[1])
        self.scores = scores
        self.fraction = fraction
        self.max_new_ratio = max_new_ratio
        self.seed = seed
        self.temperature = temperature
        self.provenance = run.provenance
        self._cache: Dict[Tuple[int, str], Refinement] = {}

    def remember(self, refinement: Refinement) -> None:
        """Keep ``refinement`` (e.g. fine-tuned) as the answer for its (stages, select) from now on."""
        self._cache[(int(refinement.steps), str(refinement.select))] = refinement

    def refine(self, stages: int, select: str) -> Refinement:
        """Extrapolate the lineages ``select`` picks ``stages`` stages; cached per (stages, select)."""
        if not 1 <= stages <= MAX_STAGES:
            raise ValueError(f"refine: stages must be in 1..{MAX_STAGES}, got {stages}")
        key = (int(stages), str(select))
        if key in self._cache:
            return self._cache[key]
        score = combine_scores(self.scores.get("grad2d"), self.scores.get("hessian"), mode=select)
        chosen = select_top(score) if select == "all" else select_top(score, fraction=self.fraction)
        max_new = int(round(self.max_new_ratio * len(chosen)))
        parents = self.states[chosen]
        pixels = self.scores.get("log2_px_per_unit")
        proposal = self.decoder.propose(parents, self.history[chosen], self.history_mask[chosen], stages=int(stages),
                                        max_new=max_new, seed=self.seed, temperature=self.temperature,
                                        log2_px_per_unit=None if pixels is None else pixels[chosen])
        replaced = torch.bincount(proposal.source, minlength=len(chosen)) >= 2
        take = replaced[proposal.source]
        members = conserve_families(parents, proposal.members[take].to(parents.dtype), proposal.source[take])
        keep = torch.ones(self.states.shape[0], dtype=torch.bool)
        keep[chosen[replaced]] = False
        all_states = torch.cat([self.states[keep], members], dim=0)
        is_new = torch.zeros(all_states.shape[0], dtype=torch.bool)
        is_new[int(keep.sum()):] = True
        params = {k: v.contiguous() for k, v in unpack_gaussians(all_states, self.sh_rest_coeffs).items()}
        refinement = Refinement(params=params, is_new=is_new, selected=chosen, removed=(~keep).nonzero().flatten(),
                                scores=self.scores, num_original=self.states.shape[0], steps=int(stages), select=select,
                                decoder=self.decoder.name, provenance=self.provenance)
        self._cache[key] = refinement
        return refinement
