"""The sub-pixel fine-tune of a refinement, and the held-out check that decides whether it is kept.

A refinement is made for a resolution ``2**k`` times the finest trained one, where no image exists. The
fine-tune supervises it the only way the data allows: each step renders a training view at the target
resolution, averages it down by ``2**k`` (box filter, what a camera of the trained resolution integrates) and
compares it with the training image at the trained resolution, with splatfacto's loss (``0.8 L1 + 0.2
D-SSIM``). The optimiser is Adam with splatfacto's learning rates (positions at the end of its decay), for a
bounded number of steps. With ``gvae-refine --finetune-densify`` densification runs as the run trained (its
thresholds: gsplat's clone, split and prune on the view-space gradients of the fine-resolution renders), three
times, at a quarter, half and three quarters of the steps, without opacity resets; Gaussians it adds are marked
new like the decoder's. It is off by default: on the lego CPU suite it raised the held-out loss every time.

:func:`held_out_loss` is the same loss on views the fine-tune never sees (the run's evaluation split);
:func:`gvae_ns.refine.cli.refine_pipeline` keeps a fine-tuned refinement only when its held-out loss is not
above the trained scene's, and says which it kept.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import pytorch_msssim
import torch
import torch.nn.functional as F
from gsplat.strategy import DefaultStrategy
from torch import Tensor

from gvae_ns.gaussians import PARAM_KEYS
from gvae_ns.refine.score import ScoringViews, render_view, training_image

LEARNING_RATES = {"means": 1.6e-6, "scales": 5e-3, "quats": 1e-3, "features_dc": 2.5e-3,
                  "features_rest": 2.5e-3 / 20, "opacities": 5e-2}
"""splatfacto's Adam learning rates (positions: the end of its exponential decay, the scene being trained)."""
SSIM_LAMBDA = 0.2
"""Weight of D-SSIM in the loss, as splatfacto's ``ssim_lambda``."""


DENSIFY_ROUNDS = 3
"""Densification rounds of a fine-tune (at 1/4, 2/4 and 3/4 of its steps)."""
NEW_KEY = "finetune_new"
"""Strategy-state column: 1 for rows the refinement added (the decoder's or the fine-tune's densification)."""


class _MarkingStrategy(DefaultStrategy):
    """gsplat's densification that marks the rows it appends as new in ``state[NEW_KEY]`` (gsplat appends
    duplicates, then split children, after the rows it keeps, and copies state columns with them)."""

    @torch.no_grad()
    def _grow_gs(self, params, optimizers, state, step) -> Tuple[int, int]:  # type: ignore[override]
        n_dupli, n_split = super()._grow_gs(params, optimizers, state, step)
        added = int(n_dupli) + 2 * int(n_split)
        if added:
            state[NEW_KEY][-added:] = 1.0
        return n_dupli, n_split


def finetune_strategy(trained: Optional[DefaultStrategy], steps: int) -> Optional[DefaultStrategy]:
    """The run's densification policy (``trained``: its thresholds) timed for a fine-tune of ``steps`` steps:
    :data:`DENSIFY_ROUNDS` rounds, no opacity reset, no screen-size rule; ``None`` (no densification) without a
    policy or with too few steps for the statistics of a round."""
    every = steps // (DENSIFY_ROUNDS + 1)
    if trained is None or every < 10:
        return None
    fields = {f.name: getattr(trained, f.name) for f in dataclasses.fields(DefaultStrategy) if f.init}
    fields.update(refine_start_iter=0, refine_stop_iter=DENSIFY_ROUNDS * every + 1, refine_every=every,
                  reset_every=steps + 1, pause_refine_after_reset=0, refine_scale2d_stop_iter=0, verbose=False)
    return _MarkingStrategy(**fields)


def _render_down(params: Dict[str, Tensor], views: ScoringViews, index: int, factor: int,
                 absgrad: bool = False, trained: bool = False) -> Tuple[Tensor, Dict]:
    """View ``index`` rendered at ``factor`` x the trained resolution, box-averaged to it: ``[H, W, 3]``, and
    the render's ``info``. The run's 3D filter (if any) is loosened to the render's sampling rate, except for
    the ``trained`` scene, which is shown with its own."""
    rgb, info = render_view(params, views, index, scale=factor, absgrad=absgrad,
                            filter_scale=1.0 if trained else float(factor))
    if factor == 1:
        return rgb, info
    return F.avg_pool2d(rgb.permute(2, 0, 1)[None], factor)[0].permute(1, 2, 0), info


def _loss(pred: Tensor, gt: Tensor) -> Tensor:
    h, w = min(pred.shape[0], gt.shape[0]), min(pred.shape[1], gt.shape[1])
    pred, gt = pred[:h, :w], gt[:h, :w]
    l1 = torch.abs(pred - gt).mean()
    ssim = pytorch_msssim.ssim(pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=1.0,
                               size_average=True)
    return (1 - SSIM_LAMBDA) * l1 + SSIM_LAMBDA * (1 - ssim)


def finetune(params: Dict[str, Tensor], views: ScoringViews, factor: int, steps: int, seed: int = 0,
             progress: Optional[Callable[[int, Dict[str, float]], None]] = None,
             is_new: Optional[Tensor] = None, strategy: Optional[DefaultStrategy] = None,
             ) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
    """``params`` (splatfacto-shaped, raw) fine-tuned for ``steps`` steps through renders at ``factor`` x the
    trained resolution averaged down to it, densified by ``strategy`` (:func:`finetune_strategy`; ``None``:
    no densification). ``is_new`` marks the input rows the refinement added (default: none).

    Returns new detached tensors ordered as a refinement's (the not-new rows that survive first, in their
    input order, then the new ones), their ``is_new`` mask (rows the densification adds are new), and the
    input index of each surviving not-new row. ``params`` is left as it is."""
    device = params["means"].device
    n = params["means"].shape[0]
    leaves = {k: torch.nn.Parameter(params[k].detach().clone()) for k in PARAM_KEYS}
    optimizers = {k: torch.optim.Adam([leaves[k]], lr=LEARNING_RATES[k], eps=1e-15) for k in PARAM_KEYS}
    state = strategy.initialize_state(scene_scale=1.0) if strategy is not None else {}
    state[NEW_KEY] = (torch.zeros(n, device=device) if is_new is None else is_new.to(device).float())
    state["order"] = torch.arange(n, device=device, dtype=torch.float64)
    order = torch.randperm(len(views.images), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        index = int(order[step % len(order)])
        absgrad = strategy is not None and strategy.absgrad
        pred, info = _render_down(leaves, views, index, factor, absgrad=absgrad)
        loss = _loss(pred, training_image(views, index, device))
        if strategy is not None:
            strategy.step_pre_backward(leaves, optimizers, state, step + 1, info)
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
        with torch.no_grad():
            leaves["quats"].data = F.normalize(leaves["quats"].data, dim=-1)
        if strategy is not None:  # steps count from 1 here: gsplat resets opacities at every multiple, 0 too
            strategy.step_post_backward(leaves, optimizers, state, step + 1, info, packed=False)
        if progress is not None:
            progress(step + 1, {"loss": float(loss.detach())})
    new = state[NEW_KEY] > 0.5
    kept = torch.where(~new)[0][torch.argsort(state["order"][~new])]
    rows = torch.cat([kept, torch.where(new)[0]])
    return {k: v.detach()[rows] for k, v in leaves.items()}, new[rows], state["order"][kept].long()


@torch.no_grad()
def held_out_loss(params: Dict[str, Tensor], views: ScoringViews, factor: int, trained: bool = False) -> float:
    """Mean fine-tune loss of ``params`` on ``views`` (renders at ``factor`` x the trained resolution, averaged
    down), i.e. how well the scene explains images it was not fitted to; ``trained``: the trained scene (its
    3D filter is not loosened)."""
    device = params["means"].device
    losses = [float(_loss(_render_down(params, views, i, factor, trained=trained)[0],
                          training_image(views, i, device)))
              for i in range(len(views.images))]
    return sum(losses) / max(len(losses), 1)
