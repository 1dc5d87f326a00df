"""Train the generative densification head on lineage transitions and apply it stage by stage.

The head (:class:`~gvae_ns.densify.head.DensifyHead`) is the "generative" decoder of refinement, the
ablation of the temporal VAE: it sees only the current Gaussians (no ancestor history) and their
neighbours, and proposes finer Gaussians in one feed-forward pass.

Training (:func:`train_densify_head`). A transition's parent is its newest history state (the Gaussian at
stage ``s``); its targets are its descendants at ``s + 1``. One application of the head is one stage.

- **Split decision.** The keep probabilities of the parent's layer-0 children are its *split probability*:
  a binary cross-entropy pushes all of them towards "the parent had more than one child at ``s + 1``".
  A parent counts as densified when any of its layer-0 children is kept; only then do its leaves (the
  head's output) replace it. Parents that continued alone, and parents whose descendants all died,
  have label 0: the head leaves them as they are (we chose the keep mask over pushing their children's
  opacity down, so a dead parent is never replaced by a cloud of transparent Gaussians).
- **Geometry and appearance** are supervised only where the leaves are used, on split parents. Leaves
  are padded per parent (batched, no loop over parents) and compared with the parent's existing
  children: Chamfer distance (eq. 5 of the VAE's losses) between positions in the parent's frame, in
  units of its largest axis (so the loss is scene-scale free); and, for every leaf, the MSE of SH DC,
  opacity logit and log-scale changes against its nearest target child.
- **Batches are spatially coherent:** the head attends over neighbours, so a mini-batch is a run of
  consecutive parents of one stage along a Hilbert curve (chunk borders shift at random every epoch,
  the chunk order is shuffled), never random rows.

Inference is :func:`gvae_ns.densify.apply.densify`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from gvae_ns.densify.head import DensifyHead, DensifyHeadConfig
from gvae_ns.densify.serialization import CURVES, offsets_to_batch, serialize
from gvae_ns.gaussians import MEANS, PACKED_DIM
from gvae_ns.lineage.dataset import check_transitions
from gvae_ns.tagged_file import FileFormat, Provenance, load_tagged, save_tagged
from gvae_ns.vae.features import (
    REL_LOG_SCALE,
    REL_OFFSET,
    REL_OPACITY,
    REL_RGB,
    newest_index,
    relative_features,
)
from gvae_ns.vae.losses import chamfer_distance, masked_mse

"""File name of the trained head beside a run (``<run>/densify_head.pt``)."""
FORMAT_NAME = "gvae_ns.densify_head"
FORMAT_VERSION = 2
"""Version 2 added the provenance (the run state the head was trained on)."""
DENSIFY_HEAD_FORMAT = FileFormat(
    tag=FORMAT_NAME, version=FORMAT_VERSION, what="densification head", keys={"config": dict, "state_dict": dict},
    rebuild="train it again (gvae-refine --load-config <run>/config.yml --decoder generative --retrain-decoder)",
)

_LOGGED = ("step", "total", "chamfer", "appearance", "scale", "keep")


@dataclass
class DensifyLossWeights:
    """Weights of the densification loss terms."""

    chamfer: float = 1.0
    """Chamfer distance between leaf and target positions (parent frame, units of its largest axis)."""
    appearance: float = 1.0
    """MSE of SH DC and opacity logit of every leaf against its nearest target child."""
    scale: float = 1.0
    """MSE of the log-scale of every leaf against its nearest target child."""
    keep: float = 1.0
    """Binary cross-entropy of the layer-0 keep probabilities against 'the parent split'."""


@dataclass
class DensifyTrainConfig:
    """How to train the densification head."""

    head: DensifyHeadConfig = field(default_factory=lambda: DensifyHeadConfig(children=2))
    """Architecture. Two children per layer (a 3D-GS split) over two layers give up to four descendants per
    stage, the transition set's default ``max_children``."""
    steps: int = 1500
    """Optimiser steps."""
    batch_size: int = 256
    """Parents per mini-batch: consecutive parents of one stage along the curve."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    weights: DensifyLossWeights = field(default_factory=DensifyLossWeights)
    """Loss weights."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    curve: str = "hilbert"
    """Space-filling curve that orders the parents into mini-batches (one of serialization.CURVES)."""
    max_children: int = 4
    """Child slots per parent when the transitions are built from a lineage (:func:`gvae_ns.refine.decoder.decoder_for_run`)."""
    log_every: int = 10
    """Record the losses every this many steps (and at the last step)."""
    seed: int = 0
    """Seed of the initial weights and the batch order (``train_densify_head(seed=...)`` overrides it)."""


# ------------------------------------------------------------------------------------------------- loss
def _pad_leaves(states: Tensor, source: Tensor, num_parents: int) -> Tuple[Tensor, Tensor]:
    """Leaves ``[M, 59]`` grouped by ``source`` into ``[B, L, 59]`` slots plus their mask ``[B, L]``."""
    counts = torch.bincount(source, minlength=num_parents)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort(source, stable=True)
    parent = source[order]
    rank = torch.arange(order.numel(), device=source.device) - (counts.cumsum(0) - counts)[parent]
    padded = states.new_zeros(num_parents, width, PACKED_DIM).index_put((parent, rank), states[order])
    mask = torch.zeros(num_parents, width, dtype=torch.bool, device=source.device)
    mask[parent, rank] = True
    return padded, mask


def densify_loss(
    head: DensifyHead, parent: Tensor, children: Tensor, children_mask: Tensor, weights: DensifyLossWeights
) -> Dict[str, Tensor]:
    """Loss terms (``chamfer``, ``appearance``, ``scale``, ``keep``) and their weighted ``total`` for one
    mini-batch of parents ``[B, 59]`` with target children ``[B, C, 59]`` / ``children_mask [B, C]``."""
    out = head(parent)
    b = parent.shape[0]
    leaves, leaf_mask = _pad_leaves(out.states, out.source, b)
    split = children_mask.sum(dim=1) > 1
    anchor = parent[:, None, :]
    pred = relative_features(leaves, anchor)
    target = relative_features(children, anchor)
    pred_mask = leaf_mask & split[:, None]
    target_mask = children_mask & split[:, None]

    chamfer = chamfer_distance(pred[..., REL_OFFSET], target[..., REL_OFFSET], target_mask, pred_mask)
    d = (pred[:, :, None, REL_OFFSET] - target[:, None, :, REL_OFFSET]).pow(2).sum(-1)
    d = torch.where(target_mask[:, None, :], d, torch.full_like(d, torch.finfo(d.dtype).max))
    nearest = torch.gather(target, 1, d.argmin(dim=2)[..., None].expand(-1, -1, target.shape[-1]))
    appearance = masked_mse(pred[..., REL_RGB], nearest[..., REL_RGB], pred_mask) + masked_mse(
        pred[..., REL_OPACITY], nearest[..., REL_OPACITY], pred_mask
    )
    scale = masked_mse(pred[..., REL_LOG_SCALE], nearest[..., REL_LOG_SCALE], pred_mask)
    if out.keep_prob:
        prob = out.keep_prob[0].view(b, -1).clamp(1e-6, 1.0 - 1e-6)
        keep = F.binary_cross_entropy(prob, split[:, None].expand_as(prob).to(prob.dtype))
    else:
        keep = parent.new_zeros(())
    total = weights.chamfer * chamfer + weights.appearance * appearance + weights.scale * scale + weights.keep * keep
    return {"total": total, "chamfer": chamfer, "appearance": appearance, "scale": scale, "keep": keep}


# ---------------------------------------------------------------------------------------------- batches
def spatial_batches(
    means: Tensor, stage: Tensor, batch_size: int, generator: torch.Generator, curve: str = "hilbert", bits: int = 10
) -> List[Tensor]:
    """Mini-batches of row indices: runs of at most ``batch_size`` consecutive parents of one stage along
    ``curve``, with a random shift of the chunk borders per stage, in shuffled order."""
    if batch_size < 1:
        raise ValueError(f"DensifyTrainConfig.batch_size must be >= 1, got {batch_size}")
    n = means.shape[0]
    _, stage_index = torch.unique(stage.cpu(), return_inverse=True)
    by_stage = torch.argsort(stage_index, stable=True)
    counts = torch.bincount(stage_index)
    offsets = counts.cumsum(0)
    ser = serialize(means.detach().cpu()[by_stage], curve, bits, offsets)
    rows = by_stage[ser.order]
    cloud = offsets_to_batch(offsets, n)
    position = torch.arange(n) - (offsets - counts)[cloud]
    shift = torch.randint(0, batch_size, (counts.numel(),), generator=generator)
    shift = torch.where(counts > batch_size, shift, torch.zeros_like(shift))
    chunk = (position + shift[cloud]) // batch_size
    key = cloud * (n + batch_size) + chunk
    _, sizes = torch.unique_consecutive(key, return_counts=True)
    batches = list(torch.split(rows, sizes.tolist()))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _parents(transitions: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(parent [N, 59], children [N, C, 59], children_mask [N, C], stage [N])`` of a transition set."""
    history, history_mask, children, children_mask, stage = check_transitions(transitions)
    present = history_mask & (torch.arange(history_mask.shape[1])[None, :] <= stage[:, None])
    parent = history[torch.arange(history.shape[0]), newest_index(present)]
    return parent, children, children_mask, stage


# ------------------------------------------------------------------------------------------------ train
def train_densify_head(
    transitions: Any,
    config: Optional[DensifyTrainConfig] = None,
    device: Union[str, torch.device] = "cpu",
    seed: Optional[int] = None,
) -> Tuple[DensifyHead, Dict[str, Any]]:
    """Fit a :class:`DensifyHead` to ``transitions``; returns ``(head in eval mode, log)``.

    ``transitions``: a :class:`~gvae_ns.lineage.dataset.TransitionSet` or any object with its ``history``,
    ``history_mask``, ``children``, ``children_mask`` and ``stage`` tensors. ``log`` holds per-logged-step
    lists (``step``, ``total``, ``chamfer``, ``appearance``, ``scale``, ``keep``) and run facts
    (``seconds``, ``parents``, ``split_parents``, ``dead_parents``, ``batches_per_epoch``, ``skipped_steps``,
    ``parameters``). A step whose gradients are not finite is skipped (counted in ``skipped_steps``), as a
    mixed-precision scaler does. Deterministic for a seed on a given device; the caller's global RNG state
    is left untouched."""
    config = config or DensifyTrainConfig()
    seed = config.seed if seed is None else seed
    if config.head.feature_dim:
        raise ValueError(
            f"DensifyTrainConfig.head.feature_dim is {config.head.feature_dim}, but transitions carry no "
            "per-Gaussian features; set it to 0"
        )
    if config.curve not in CURVES:
        raise ValueError(f"DensifyTrainConfig.curve must be one of {CURVES}, got {config.curve!r}")
    if config.steps < 1:
        raise ValueError(f"DensifyTrainConfig.steps must be >= 1, got {config.steps}")
    device = torch.device(device)
    parent, children, children_mask, stage = _parents(transitions)
    count = children_mask.sum(dim=1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DensifyHead(config.head)
    head = head.to(device).train()
    parent, children, children_mask = parent.to(device), children.to(device), children_mask.to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    log: Dict[str, Any] = {k: [] for k in _LOGGED}
    batches: List[Tensor] = []
    cursor = epoch_batches = skipped = 0
    start = time.perf_counter()
    for step in range(config.steps):
        if cursor == len(batches):
            batches = spatial_batches(parent[:, MEANS], stage, config.batch_size, generator, config.curve,
                                      config.head.bits)
            cursor, epoch_batches = 0, len(batches)
        idx = batches[cursor].to(device)
        cursor += 1
        terms = densify_loss(head, parent[idx], children[idx], children_mask[idx], config.weights)
        if not torch.isfinite(terms["total"]):
            raise FloatingPointError(
                f"train_densify_head: loss became non-finite at step {step}; lower DensifyTrainConfig.lr"
            )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        norm = torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip if config.grad_clip > 0 else math.inf)
        if torch.isfinite(norm):
            optimizer.step()
        else:
            skipped += 1
        if step % config.log_every == 0 or step == config.steps - 1:
            log["step"].append(step)
            for key in _LOGGED[1:]:
                log[key].append(float(terms[key].detach()))
    log.update(
        seconds=time.perf_counter() - start,
        parents=int(parent.shape[0]),
        split_parents=int((count > 1).sum()),
        dead_parents=int((count == 0).sum()),
        batches_per_epoch=epoch_batches,
        skipped_steps=skipped,
        parameters=sum(p.numel() for p in head.parameters()),
    )
    if skipped == config.steps:
        raise FloatingPointError("train_densify_head: every step had non-finite gradients; nothing was learnt")
    return head.eval(), log


# ------------------------------------------------------------------------------------------------- file
def save_densify_head(head: DensifyHead, path: Union[str, os.PathLike],
                      provenance: Optional[Provenance] = None) -> Path:
    """Write ``head`` (config + weights) to ``path`` atomically; returns the path.

    ``provenance``: the run state the head was trained on (a run's ``densify_head.pt`` always has one). The
    file holds only tensors and plain python types (readable with ``torch.load(weights_only=True)``)."""
    config = dataclasses.asdict(head.cfg)
    config["orders"] = list(config["orders"])
    payload = {
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
    }
    return save_tagged(path, DENSIFY_HEAD_FORMAT, payload, provenance)


def load_densify_head(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu",
                      expected: Optional[Provenance] = None, rebuild: Optional[str] = None) -> DensifyHead:
    """Read a head written by :func:`save_densify_head` (eval mode).

    ``expected``: the run state the file must have been trained on (``None``: not checked); ``rebuild``: the
    fix error messages give. A missing file raises ``FileNotFoundError``; an unreadable, foreign, old,
    malformed or stale one raises :class:`~gvae_ns.tagged_file.TaggedFileError` (a ``ValueError``) naming it."""
    loaded = load_tagged(path, DENSIFY_HEAD_FORMAT, expected=expected, rebuild=rebuild)
    config, state = loaded.payload["config"], loaded.payload["state_dict"]
    for key in state:
        loaded.tensor(key, source=state, finite=True, label=f"state_dict.{key}")
    known = {f.name for f in dataclasses.fields(DensifyHeadConfig)}
    if set(config) - known:
        loaded.fail(f"unknown DensifyHeadConfig fields {sorted(set(config) - known)}")
    try:
        head = DensifyHead(DensifyHeadConfig(**{**config, "orders": tuple(config.get("orders", ()))}))
        head.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        loaded.fail(f"densification head weights do not match its config ({str(exc).splitlines()[0][:300]})")
    return head.to(map_location).eval()
