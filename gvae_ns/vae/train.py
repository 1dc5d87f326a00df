"""Train a :class:`~gvae_ns.vae.model.GaussianVAE` on lineage transitions (stage ``s`` -> ``s + 1``).

Masked-last-stage training: each transition's children at ``s + 1`` are the masked target, predicted
from the parent's ancestor chain at stages ``0..s`` (history rows after ``s`` are ignored even when a
dataset marks them present, so the target can never leak into the input). Coarse to fine: the first
``coarse_fraction`` of the steps draw only the earlier transitions (every stage but the latest), the rest
draw all of them. Normalisation statistics are fitted once on the whole set and stored in the model.

The pieces are public so that the cross-scene prior (:mod:`gvae_ns.prior.train`) trains the same way:
:func:`clean_transitions` (leakage guard, child cut), :func:`needed_window`, :func:`prepare_training`
(model + tokens/targets, with the normaliser statistics of :func:`normalizer_rows` from a given
function), :class:`BatchSampler` (the coarse-to-fine mini-batches, with a checkpointable state) and
:func:`train_steps` (the loop: :func:`training_step` per step, logging, the NaN stop).

``transitions`` is duck-typed: any object with ``history [N, S, 59]``, ``history_mask [N, S]``,
``children [N, C, 59]``, ``children_mask [N, C]`` and ``stage [N]`` (e.g. the lineage dataset's
``TransitionSet``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from gvae_ns.lineage.dataset import check_footprints, check_transitions
from gvae_ns.vae.features import HistoryTokens, newest_index
from gvae_ns.vae.losses import LossWeights, cyclic_beta, vae_loss
from gvae_ns.vae.model import ChildTargets, GaussianVAE, GaussianVAEConfig, Normalizer

__all__ = ["VAETrainConfig", "train_vae", "CleanTransitions", "clean_transitions", "needed_window", "TrainingData",
           "NORMALIZERS", "normalizer_rows", "fit_statistics", "prepare_training", "BatchSampler", "training_step",
           "train_steps", "new_log", "Progress", "Statistics"]

Progress = Callable[[int, Optional[Dict[str, float]]], None]
"""``progress(done, losses)``, e.g. :func:`gvae_ns.progress.phase`'s."""
Statistics = Callable[[Tensor, float], Tuple[Tensor, Tensor]]
"""``statistics(rows [M, dim], min_std) -> (mean [dim], std [dim])`` of one normaliser."""

NORMALIZERS = ("geometry.token_norm", "appearance.token_norm", "geometry.target_norm", "appearance.target_norm")
"""The model's normalisers (submodule names), in the order they are fitted."""

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


@dataclass
class CleanTransitions:
    """A transition set checked and made safe to train on (:func:`clean_transitions`)."""

    history: Tensor
    """``[N, S, 59]`` float ancestor-chain states."""
    history_mask: Tensor
    """``[N, S]`` bool, cleared after each parent's own stage (the leakage guard)."""
    children: Tensor
    """``[N, C, 59]`` float target children, ``C <= max_children``."""
    children_mask: Tensor
    """``[N, C]`` bool."""
    stage: Tensor
    """``[N]`` long parent stage."""
    dropped: int
    """Children cut because they sat in slots past ``max_children``."""
    log2_px_per_unit: Optional[Tensor] = None
    """``[N]`` pixels per world unit around each parent at its stage's resolution (log2), when the set was built
    with the training cameras; a model with ``footprint_context`` needs it."""


def clean_transitions(transitions: Any, max_children: int) -> CleanTransitions:
    """Check ``transitions`` (``ValueError`` naming the field, see
    :func:`~gvae_ns.lineage.dataset.check_transitions`), hide every history row after the parent's stage
    (the parent is the newest state at its own stage; nothing later is input) and cut the children to
    ``max_children`` slots."""
    history, history_mask, children, children_mask, stage = check_transitions(transitions)
    s = history_mask.shape[1]
    history_mask = history_mask & (torch.arange(s)[None, :] <= stage[:, None])
    dropped = 0
    if children.shape[1] > max_children:
        dropped = int(children_mask[:, max_children:].sum())
        children, children_mask = children[:, :max_children], children_mask[:, :max_children]
    return CleanTransitions(history, history_mask, children, children_mask, stage, dropped,
                            check_footprints(transitions))


def needed_window(transitions: CleanTransitions, max_history: int) -> int:
    """Stages of history the model needs for ``transitions``: the longest one, at most ``max_history``."""
    return min(max_history, int(newest_index(transitions.history_mask).max()) + 1)


@dataclass
class TrainingData:
    """Encoded transitions on the training device (:func:`prepare_training`)."""

    tokens: HistoryTokens
    """Model inputs, ``N`` rows."""
    targets: ChildTargets
    """Target children, ``N`` rows."""
    coarse: Tensor
    """``[N]`` bool (CPU): rows the coarse phase draws (stage below the latest of their set; every row of a
    single-stage set)."""
    multi_stage: bool
    """Some set has more than one stage (otherwise there is no coarse phase)."""

    def __len__(self) -> int:
        return int(self.coarse.shape[0])


def fit_statistics(rows: Tensor, min_std: float) -> Tuple[Tensor, Tensor]:
    """:data:`Statistics` of ``rows`` alone: :meth:`Normalizer.fit <gvae_ns.vae.model.Normalizer.fit>`'s."""
    norm = Normalizer(rows.shape[1])
    norm.fit(rows, min_std)
    return norm.mean, norm.std


def normalizer_rows(tokens: HistoryTokens, targets: ChildTargets) -> Dict[str, Tensor]:
    """The rows each normaliser of :data:`NORMALIZERS` is fitted on: present history tokens, existing target
    children (``[M, dim]`` each)."""
    return {
        "geometry.token_norm": tokens.geometry[tokens.mask],
        "appearance.token_norm": tokens.appearance[tokens.mask],
        "geometry.target_norm": targets.geometry[targets.mask],
        "appearance.target_norm": targets.appearance[targets.mask],
    }


def _cat(parts: List[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def prepare_training(
    sets: Sequence[CleanTransitions],
    config: VAETrainConfig,
    window: int,
    seed: int,
    device: Union[str, torch.device] = "cpu",
    statistics: Statistics = fit_statistics,
) -> Tuple[GaussianVAE, TrainingData]:
    """The freshly initialised model (weights from ``seed``, the global RNG untouched; history window
    ``window``; in train mode on ``device``) and the concatenated ``sets`` encoded for it.

    Each normaliser in :data:`NORMALIZERS` gets ``statistics(rows, config.min_std)`` of its rows (present
    history tokens, existing target children): :func:`fit_statistics` fits them on these sets alone; the
    prior trainer passes statistics over every rank's sets."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = GaussianVAE(config.model)
    vae.history_window.fill_(window)

    tokens_parts, target_parts, coarse_parts = [], [], []
    for part in sets:
        tokens = vae.history_tokens(part.history, part.history_mask, part.log2_px_per_unit)
        tokens_parts.append(tokens)
        target_parts.append(vae.child_targets(part.children, part.children_mask, tokens.parent))
        stages = torch.unique(part.stage)
        coarse_parts.append(part.stage < stages.max() if stages.numel() > 1
                            else torch.ones_like(part.stage, dtype=torch.bool))
    tokens = HistoryTokens(*(_cat([getattr(t, f) for t in tokens_parts])
                             for f in ("geometry", "appearance", "mask", "parent")))
    targets = ChildTargets(*(_cat([getattr(t, f) for t in target_parts]) for f in ("geometry", "appearance", "mask")))
    rows = normalizer_rows(tokens, targets)
    for name in NORMALIZERS:
        mean, std = statistics(rows[name], config.min_std)
        norm = vae.get_submodule(name)
        norm.mean.copy_(mean)
        norm.std.copy_(std)

    multi = any(torch.unique(part.stage).numel() > 1 for part in sets)
    data = TrainingData(tokens.to(device), targets.to(device), _cat(coarse_parts), multi)
    return vae.to(device).train(), data


class BatchSampler:
    """Mini-batch row indices, coarse to fine: for the first ``coarse_steps`` steps from the coarse rows,
    then from all rows. Each phase walks random permutations of its rows, drawing a new one when the phase
    starts or fewer rows than a batch are left; :meth:`state_dict` captures exactly where it is."""

    def __init__(self, coarse: Tensor, coarse_steps: int, batch_size: int, seed: int) -> None:
        self.all_idx = torch.arange(coarse.shape[0])
        self.coarse_idx = self.all_idx[coarse]
        self.coarse_steps = coarse_steps
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: Tensor = torch.empty(0, dtype=torch.long)
        self.cursor = 0
        self.current: Optional[str] = None

    def phase(self, step: int) -> str:
        """``"coarse"`` or ``"fine"``."""
        return "coarse" if step < self.coarse_steps else "fine"

    def draw(self, step: int) -> Tuple[str, Tensor]:
        """The phase and the row indices (CPU) of step ``step``'s batch."""
        phase = self.phase(step)
        pool = self.coarse_idx if phase == "coarse" else self.all_idx
        batch = min(self.batch_size, pool.numel())
        if phase != self.current or self.cursor + batch > self.order.numel():
            self.order = pool[torch.randperm(pool.numel(), generator=self.generator)]
            self.cursor, self.current = 0, phase
        idx = self.order[self.cursor:self.cursor + batch]
        self.cursor += batch
        return phase, idx

    def state_dict(self) -> Dict[str, Any]:
        """Tensors and plain values (``torch.load(weights_only=True)``-safe)."""
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "cursor": self.cursor,
                "current": self.current}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
        self.order, self.cursor, self.current = state["order"].clone(), int(state["cursor"]), state["current"]


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: TrainingData, idx: Tensor, beta: float,
                  config: VAETrainConfig, generator: torch.Generator) -> Dict[str, Tensor]:
    """One optimisation step on rows ``idx`` (on the data's device) with KL weight ``beta``: forward,
    :func:`~gvae_ns.vae.losses.vae_loss`, backward, gradient clip, Adam step. ``model`` is the GaussianVAE
    or a wrapper of it (``DistributedDataParallel``); returns the loss terms."""
    output = model(data.tokens.index(idx), data.targets.index(idx), generator=generator,
                   prior_path=config.weights.prior_path > 0)
    terms = vae_loss(output, config.weights, beta)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return terms


def new_log() -> Dict[str, List[Any]]:
    """An empty loss history for :func:`train_steps`."""
    return {k: [] for k in _LOGGED}


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainingData,
    sampler: BatchSampler,
    generator: torch.Generator,
    config: VAETrainConfig,
    steps: range,
    log: Dict[str, List[Any]],
    progress: Optional[Progress] = None,
    reduce: Optional[Callable[[Dict[str, Tensor]], Dict[str, Tensor]]] = None,
    name: str = "train_vae",
) -> None:
    """Run the steps ``steps`` (of ``config.steps`` in all) of :func:`training_step`, appending every
    ``config.log_every``-th step's and the last step's losses to ``log`` and calling ``progress``.

    ``reduce`` (e.g. a mean over ranks) maps the logged loss terms before they are recorded and checked;
    a non-finite total raises ``FloatingPointError`` (``name`` starts the message)."""
    device = data.tokens.mask.device
    for step in steps:
        phase, idx = sampler.draw(step)
        beta = cyclic_beta(step, config.kl_alpha, config.kl_period)
        terms = training_step(model, optimizer, data, idx.to(device), beta, config, generator)
        if step % config.log_every == 0 or step == config.steps - 1:
            values = {k: terms[k].detach() for k in _LOGGED[3:] if k in terms}
            if reduce is not None:
                values = reduce(values)
            log["step"].append(step)
            log["phase"].append(phase)
            log["beta"].append(beta)
            for key, value in values.items():
                log[key].append(float(value))
            if progress is not None:
                progress(step + 1, {k: log[k][-1] for k in ("total", "mse", "kl") if k in values})
            if not torch.isfinite(values["total"]):
                raise FloatingPointError(f"{name}: loss became non-finite at step {step}; lower VAETrainConfig.lr")


def train_vae(
    transitions: Any,
    config: Optional[VAETrainConfig] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    progress: Optional[Progress] = None,
    start_from: Optional[GaussianVAE] = None,
) -> Tuple[GaussianVAE, Dict[str, Any]]:
    """Fit a GaussianVAE to ``transitions``; returns ``(model in eval mode, history)``.

    ``start_from``: go on training a copy of this model (its architecture, weights, normalisation statistics
    and history window; ``config.model`` is then not used), e.g. the shipped prior fine-tuned on one scene; it is
    left unchanged. Default: a fresh model whose statistics are fitted on ``transitions``.

    ``history`` holds per-logged-step lists (``step``, ``phase``, ``beta`` and the loss terms of
    :func:`~gvae_ns.vae.losses.vae_loss`: ``total``, ``recon``, ``recon_prior`` (when used), ``kl``,
    ``prior``, ``mse``, ``chamfer``, ``shape``, ``exist``) and run facts (``seconds``, ``transitions``,
    ``coarse_transitions``, ``dropped_children``, ``history_window``, ``parameters``). Deterministic for
    a seed on a given device; the caller's global RNG state is left untouched. ``progress(done, losses)`` (e.g.
    :func:`gvae_ns.progress.phase`'s) is called at every logged step."""
    config = config or VAETrainConfig()
    device = torch.device(device)
    c_max = config.model.max_children
    clean = clean_transitions(transitions, c_max)
    if clean.dropped:
        warnings.warn(
            f"train_vae: {clean.dropped} children beyond max_children={c_max} slots were dropped; "
            "raise GaussianVAEConfig.max_children to keep them",
            stacklevel=2,
        )
    if start_from is None:
        window = needed_window(clean, config.model.max_history)
    else:
        window = start_from.window
        config = replace(config, model=start_from.config)
    vae, data = prepare_training([clean], config, window, seed, device)
    if start_from is not None:  # its weights and statistics replace the fresh ones (the encoding does not use them)
        vae.load_state_dict(start_from.state_dict())
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    coarse_steps = int(round(config.coarse_fraction * config.steps)) if data.multi_stage else 0
    sampler = BatchSampler(data.coarse, coarse_steps, config.batch_size, seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    log = new_log()
    start = time.perf_counter()
    train_steps(vae, optimizer, data, sampler, noise_gen, config, range(config.steps), log, progress)
    log.update(
        seconds=time.perf_counter() - start,
        transitions=len(data),
        coarse_transitions=int(sampler.coarse_idx.numel()) if coarse_steps else 0,
        dropped_children=clean.dropped,
        history_window=window,
        parameters=vae.parameter_counts(),
    )
    return vae.eval(), log
