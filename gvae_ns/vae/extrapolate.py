"""Extrapolate Gaussian lineages ``k`` stages past the last trained one with a trained GaussianVAE.

One step predicts every live lineage's children with ``z`` from the flow priors (seeded):

- slot 0 is the lineage's own continuation: when its exist probability reaches the threshold it
  replaces the lineage's newest state, otherwise the lineage dies;
- every other slot over the threshold is a new Gaussian, whose lineage is its parent's history with the
  child appended (so it continues in later steps like any other lineage);
- the history window slides: each step's output is fed back as the newest stage.

A budget (``max_new``) caps how many added Gaussians may be alive; when candidates exceed it, the
most probable ones win. Outputs are valid Gaussians by construction: finite, unit quaternions, offsets
and log-scale changes clamped per step to the model config's bounds relative to the parent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor

from gvae_ns.gaussians import PACKED_DIM
from gvae_ns.vae.features import right_align, tokens_from_aligned
from gvae_ns.vae.model import GaussianVAE


@dataclass
class ExtrapolationResult:
    """What ``k`` extrapolation steps made of ``N`` input lineages."""

    refined: Tensor
    """``[N, 59]`` each input Gaussian's state after its slot-0 continuations (its last state if it died)."""
    alive: Tensor
    """``[N]`` bool: the input Gaussian survived every step (False = flagged dead, drop or hide it)."""
    added: Tensor
    """``[M, 59]`` added Gaussians alive after the last step."""
    added_source: Tensor
    """``[M]`` long: index of the input lineage each added Gaussian descends from."""
    added_step: Tensor
    """``[M]`` long: the step (1..k) at which each added Gaussian was born."""
    step_counts: List[Dict[str, int]]
    """Per step: ``lineages`` in, ``continued``, ``died``, ``inputs_died``, ``candidates`` (new slots
    over the threshold), ``spawned``, ``capped`` (dropped by the budget), ``added_alive`` after it."""


def _empty_result(history: Tensor, steps: int) -> ExtrapolationResult:
    dev = history.device
    return ExtrapolationResult(
        refined=history.new_zeros(0, PACKED_DIM),
        alive=torch.zeros(0, dtype=torch.bool, device=dev),
        added=history.new_zeros(0, PACKED_DIM),
        added_source=torch.zeros(0, dtype=torch.long, device=dev),
        added_step=torch.zeros(0, dtype=torch.long, device=dev),
        step_counts=[
            dict(step=i + 1, lineages=0, continued=0, died=0, inputs_died=0, candidates=0, spawned=0, capped=0,
                 added_alive=0)
            for i in range(steps)
        ],
    )


@torch.no_grad()
def extrapolate(
    vae: GaussianVAE,
    history: Tensor,
    history_mask: Tensor,
    steps: int = 1,
    exist_threshold: float = 0.5,
    max_new: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
    temperature: float = 1.0,
    chunk_size: int = 65536,
    log2_px_per_unit: Optional[Tensor] = None,
) -> ExtrapolationResult:
    """Run ``steps`` (1..4 is the intended range) extrapolation steps on raw lineage histories.

    ``history [N, S, 59]`` / ``history_mask [N, S]`` as in the lineage dataset (the newest present row
    is the Gaussian to refine). ``max_new`` caps the added Gaussians alive at any time (default ``N``:
    at most doubling the count; 0 refines without adding). ``generator`` (on the model's device) or
    ``seed`` fixes the latent draws: same inputs and seed give the same result on a given device.
    ``temperature`` scales the prior's base noise (0: deterministic ``z = T(0)``). Lineages are decoded
    in chunks of ``chunk_size`` to bound memory; the result does not depend on it. ``log2_px_per_unit [N]``
    (pixels per world unit around each lineage at the trained resolution, log2) is what a model that reads
    footprints needs (``ValueError`` without it); each step is one resolution doubling, so it gains 1 per step
    and an added Gaussian inherits its parent's."""
    if steps < 1:
        raise ValueError(f"extrapolate: steps must be >= 1, got {steps}")
    if not 0.0 < exist_threshold < 1.0:
        raise ValueError(f"extrapolate: exist_threshold must be in (0, 1), got {exist_threshold}")
    if chunk_size < 1:
        raise ValueError(f"extrapolate: chunk_size must be >= 1, got {chunk_size}")
    device = vae.history_window.device
    history = history.to(device=device, dtype=torch.float32)
    history_mask = history_mask.to(device=device, dtype=torch.bool)
    n = history.shape[0]
    if n == 0:
        return _empty_result(history, steps)
    if not bool(torch.isfinite(history[history_mask]).all()):
        raise ValueError("extrapolate: history has non-finite values in present entries")
    budget = n if max_new is None else int(max_new)
    if budget < 0:
        raise ValueError(f"extrapolate: max_new must be >= 0, got {max_new}")
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)

    pixels = vae.footprints(log2_px_per_unit)
    if pixels is not None:
        pixels = pixels.to(device=device, dtype=torch.float32)
        if pixels.shape != (n,):
            raise ValueError(f"extrapolate: log2_px_per_unit must be [{n}], got {tuple(pixels.shape)}")
    was_training = vae.training
    vae.eval()
    try:
        states, mask = right_align(history, history_mask, vae.window)
        refined = states[:, -1].clone()
        alive = torch.ones(n, dtype=torch.bool, device=device)
        source = torch.arange(n, device=device)
        is_input = torch.ones(n, dtype=torch.bool, device=device)
        born = torch.zeros(n, dtype=torch.long, device=device)
        counts: List[Dict[str, int]] = []
        for step in range(1, steps + 1):
            lineages = states.shape[0]
            noise_geo, noise_app = vae.sample_noise(lineages, generator, temperature)
            cont = states.new_empty(lineages, PACKED_DIM)
            prob0 = states.new_empty(lineages)
            cand_rows, cand_states, cand_prob = [], [], []
            for lo in range(0, lineages, chunk_size):
                hi = min(lo + chunk_size, lineages)
                tokens = tokens_from_aligned(states[lo:hi], mask[lo:hi], None if pixels is None else pixels[lo:hi])
                out = vae(tokens, noise=(noise_geo[lo:hi], noise_app[lo:hi]))
                children, prob = vae.children_from_output(out, tokens.parent)
                cont[lo:hi] = children[:, 0]
                prob0[lo:hi] = prob[:, 0]
                rows, slots = (prob[:, 1:] >= exist_threshold).nonzero(as_tuple=True)
                cand_rows.append(rows + lo)
                cand_states.append(children[rows, slots + 1])
                cand_prob.append(prob[rows, slots + 1])
            if not cand_rows:  # every lineage ended in an earlier step
                cand_rows, cand_states, cand_prob = [prob0.new_zeros(0).long()], [cont], [prob0]
            rows = torch.cat(cand_rows)
            child_states = torch.cat(cand_states)
            child_prob = torch.cat(cand_prob)

            keep = prob0 >= exist_threshold
            cont_input = is_input & keep
            refined[source[cont_input]] = cont[cont_input]
            dead_input = is_input & ~keep
            alive[source[dead_input]] = False

            room = max(budget - int((keep & ~is_input).sum()), 0)
            candidates = rows.numel()
            if candidates > room:
                order = torch.sort(child_prob, descending=True, stable=True).indices[:room]
                order = torch.sort(order).values
                rows, child_states = rows[order], child_states[order]

            new_states = torch.cat([states[keep], states[rows]])
            new_last = torch.cat([cont[keep], child_states])
            states = torch.cat([new_states, new_last[:, None]], dim=1)[:, 1:]
            new_mask = torch.cat([mask[keep], mask[rows]])
            mask = torch.cat([new_mask, new_mask.new_ones(new_mask.shape[0], 1)], dim=1)[:, 1:]
            source = torch.cat([source[keep], source[rows]])
            born = torch.cat([born[keep], torch.full_like(rows, step)])
            is_input = torch.cat([is_input[keep], torch.zeros_like(rows, dtype=torch.bool)])
            if pixels is not None:  # the new newest stage is one doubling finer
                pixels = torch.cat([pixels[keep], pixels[rows]]) + 1.0
            counts.append(
                dict(
                    step=step,
                    lineages=lineages,
                    continued=int(keep.sum()),
                    died=int((~keep).sum()),
                    inputs_died=int(dead_input.sum()),
                    candidates=candidates,
                    spawned=int(rows.numel()),
                    capped=candidates - int(rows.numel()),
                    added_alive=int((~is_input).sum()),
                )
            )
        extra = ~is_input
        return ExtrapolationResult(
            refined=refined,
            alive=alive,
            added=states[extra, -1].clone(),
            added_source=source[extra],
            added_step=born[extra],
            step_counts=counts,
        )
    finally:
        vae.train(was_training)
