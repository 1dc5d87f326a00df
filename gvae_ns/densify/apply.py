"""Apply a trained densification head stage by stage: each application proposes one stage finer Gaussians,
fed back in for the next, under a cap on the number of generated Gaussians."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from gvae_ns.densify.head import DensifyHead
from gvae_ns.gaussians import PACKED_DIM


@torch.no_grad()
def densify(
    head: DensifyHead, states: Tensor, steps: int = 1, max_new: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """Apply ``head`` ``steps`` times to ``states [N, 59]``, each application one more stage.

    Every application runs on all current Gaussians (the inputs and what earlier steps generated). A
    Gaussian is densified when any of its layer-0 children is kept (always, for a one-layer head); it is
    then replaced by its leaves, otherwise it stays as it is. ``max_new`` caps the generated Gaussians
    alive at any time (default ``N``); when densifying every candidate would exceed it, the candidates with
    the highest split probability (then the lower row) win, as whole families.

    Returns ``(generated [M, 59], source [M])``: the generated Gaussians alive after the last step, grouped
    by ``source``, the input row each descends from. Input rows absent from ``source`` were not densified.
    Deterministic for given inputs on a given device."""
    if steps < 1:
        raise ValueError(f"densify: steps must be >= 1, got {steps}")
    if states.dim() != 2 or states.shape[1] != PACKED_DIM:
        raise ValueError(f"densify: states must be [N, {PACKED_DIM}], got {tuple(states.shape)}")
    n = states.shape[0]
    budget = n if max_new is None else int(max_new)
    if budget < 0:
        raise ValueError(f"densify: max_new must be >= 0, got {max_new}")
    device = next(head.parameters()).device
    current = states.to(device=device, dtype=torch.float32)
    source = torch.arange(n, device=device)
    generated = torch.zeros(n, dtype=torch.bool, device=device)
    was_training = head.training
    head.eval()
    try:
        for _ in range(steps):
            m = current.shape[0]
            if m == 0:
                break
            out = head(current)
            leaves = torch.bincount(out.source, minlength=m)
            if out.keep_mask:
                wanted = out.keep_mask[0].view(m, -1).any(dim=1)
                priority = out.keep_prob[0].view(m, -1).amax(dim=1)
            else:
                wanted = torch.ones(m, dtype=torch.bool, device=device)
                priority = torch.ones(m, device=device)
            room = budget - int(generated.sum())
            candidates = wanted.nonzero().flatten()
            candidates = candidates[torch.sort(priority[candidates], descending=True, stable=True).indices]
            cost = (leaves - generated.long())[candidates]
            chosen = torch.zeros(m, dtype=torch.bool, device=device)
            chosen[candidates[cost.cumsum(0) <= room]] = True
            if not bool(chosen.any()):
                break
            new = chosen[out.source]
            current = torch.cat([current[~chosen], out.states[new]])
            source = torch.cat([source[~chosen], source[out.source[new]]])
            generated = torch.cat([generated[~chosen], torch.ones(int(new.sum()), dtype=torch.bool, device=device)])
        order = torch.argsort(source[generated], stable=True)
        return current[generated][order], source[generated][order]
    finally:
        head.train(was_training)
