"""Train a :class:`~gvae_ns.vae.model.GaussianVAE` on lineage transitions (stage ``s`` -> ``s + 1``).

Masked-last-stage training: each transition's children at ``s + 1`` are the masked target, predicted
from the parent's ancestor chain at stages ``0..s`` (history rows after ``s`` are ignored even when a
dataset marks them present, so the target can never leak into the input). Coarse to fine: the first
``coarse_fraction`` of the steps draw only the earlier transitions (every stage but the latest), the rest
draw all of them. Normalisation statistics are fitted once on the whole set and stored in the model.

``transitions`` is duck-typed: any object with ``history [N, S, 59]``, ``history_mask [N, S]``,
``children [N, C, 59]``, ``children_mask [N, C]`` and ``stage [N]`` (e.g. the lineage dataset's
``TransitionSet``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from gvae_ns.lineage.dataset import check_transitions
from gvae_ns.vae.features import newest_index
from gvae_ns.vae.losses import LossWeights, cyclic_beta, vae_loss
from gvae_ns.vae.model import GaussianVAE, GaussianVAEConfig

__all__ = ["VAETrainConfig", "train_vae"]

_LOGGED = ("step", "phase", "beta", "total", "recon", "recon_prior", "kl", "prior", "mse", "chamfer", "shape",
           "exist")


@dataclass
class VAETrainConfig:
    """How to train the GaussianVAE."""

    model: GaussianVAEConfig = field(default_factory=GaussianVAEConfig)
    """Architecture."""
    steps: int = 3000
    """Optimiser steps in total (coarse + fine)."""
    batch_size: int = 256
    """Transitions per mini-batch (capped at the number available)."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    coarse_fraction: float = 0.3
    """Share of the steps spent on the earlier transitions only (0 disables the coarse phase); skipped
    when the set has a single stage."""
    weights: LossWeights = field(default_factory=LossWeights)
    """Loss weights."""
    kl_alpha: float = 0.002
    """Cyclic KL annealing slope ``alpha``: ``beta = min(alpha * (step mod kl_period), 1)``."""
    kl_period: int = 1000
    """Cyclic KL annealing period ``R`` in steps."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    log_every: int = 10
    """Record the losses every this many steps (and at the last step)."""
    min_std: float = 1e-3
    """Floor of the fitted feature standard deviations."""


def train_vae(
    transitions: Any,
    config: Optional[VAETrainConfig] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    progress: Optional[Callable[[int, Optional[Dict[str, float]]], None]] = None,
) -> Tuple[GaussianVAE, Dict[str, Any]]:
    """Fit a GaussianVAE to ``transitions``; returns ``(model in eval mode, history)``.

    ``history`` holds per-logged-step lists (``step``, ``phase``, ``beta`` and the loss terms of
    :func:`~gvae_ns.vae.losses.vae_loss`: ``total``, ``recon``, ``recon_prior`` (when used), ``kl``,
    ``prior``, ``mse``, ``chamfer``, ``shape``, ``exist``) and run facts (``seconds``, ``transitions``,
    ``coarse_transitions``, ``dropped_children``, ``history_window``, ``parameters``). Deterministic for
    a seed on a given device; the caller's global RNG state is left untouched. ``progress(done, losses)`` (e.g.
    :func:`gvae_ns.progress.phase`'s) is called at every logged step."""
    config = config or VAETrainConfig()
    device = torch.device(device)
    history, history_mask, children, children_mask, stage = check_transitions(transitions)
    n, s = history_mask.shape

    # Leakage guard: the parent is the newest state at its own stage; nothing later is input.
    history_mask = history_mask & (torch.arange(s)[None, :] <= stage[:, None])

    c_max = config.model.max_children
    dropped = 0
    if children.shape[1] > c_max:
        dropped = int(children_mask[:, c_max:].sum())
        children, children_mask = children[:, :c_max], children_mask[:, :c_max]
        if dropped:
            warnings.warn(
                f"train_vae: {dropped} children beyond max_children={c_max} slots were dropped; "
                "raise GaussianVAEConfig.max_children to keep them",
                stacklevel=2,
            )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = GaussianVAE(config.model)
    window = min(config.model.max_history, int(newest_index(history_mask).max()) + 1)
    vae.history_window.fill_(window)

    tokens = vae.history_tokens(history, history_mask)
    targets = vae.child_targets(children, children_mask, tokens.parent)
    vae.geometry.token_norm.fit(tokens.geometry[tokens.mask], config.min_std)
    vae.appearance.token_norm.fit(tokens.appearance[tokens.mask], config.min_std)
    vae.geometry.target_norm.fit(targets.geometry[targets.mask], config.min_std)
    vae.appearance.target_norm.fit(targets.appearance[targets.mask], config.min_std)

    vae = vae.to(device).train()
    tokens, targets = tokens.to(device), targets.to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    all_idx = torch.arange(n)
    stages = torch.unique(stage)
    coarse_idx = all_idx[stage < stages.max()] if stages.numel() > 1 else all_idx
    coarse_steps = int(round(config.coarse_fraction * config.steps)) if stages.numel() > 1 else 0

    index_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    log: Dict[str, Any] = {k: [] for k in _LOGGED}
    order: Tensor = torch.empty(0, dtype=torch.long)
    cursor = 0
    current = None
    start = time.perf_counter()
    for step in range(config.steps):
        phase = "coarse" if step < coarse_steps else "fine"
        pool = coarse_idx if phase == "coarse" else all_idx
        batch = min(config.batch_size, pool.numel())
        if phase != current or cursor + batch > order.numel():
            order = pool[torch.randperm(pool.numel(), generator=index_gen)]
            cursor, current = 0, phase
        idx = order[cursor:cursor + batch].to(device)
        cursor += batch

        beta = cyclic_beta(step, config.kl_alpha, config.kl_period)
        output = vae(tokens.index(idx), targets.index(idx), generator=noise_gen,
                     prior_path=config.weights.prior_path > 0)
        terms = vae_loss(output, config.weights, beta)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        optimizer.step()

        if step % config.log_every == 0 or step == config.steps - 1:
            log["step"].append(step)
            log["phase"].append(phase)
            log["beta"].append(beta)
            for key in _LOGGED[3:]:
                if key in terms:
                    log[key].append(float(terms[key].detach()))
            if progress is not None:
                progress(step + 1, {k: log[k][-1] for k in ("total", "mse", "kl") if k in terms})
            if not torch.isfinite(terms["total"]):
                raise FloatingPointError(f"train_vae: loss became non-finite at step {step}; lower VAETrainConfig.lr")
    log.update(
        seconds=time.perf_counter() - start,
        transitions=n,
        coarse_transitions=int(coarse_idx.numel()) if coarse_steps else 0,
        dropped_children=dropped,
        history_window=window,
        parameters=vae.parameter_counts(),
    )
    return vae.eval(), log
