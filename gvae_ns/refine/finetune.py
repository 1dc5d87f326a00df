"""The sub-pixel fine-tune of a refinement, and the held-out check that decides whether it is kept.

A refinement is made for a resolution ``2**k`` times the finest trained one, where no image exists. The
fine-tune supervises it the only way the data allows: each step renders a training view at the target
resolution, averages it down by ``2**k`` (box filter, what a camera of the trained resolution integrates) and
compares it with the training image at the trained resolution, with splatfacto's loss (``0.8 L1 + 0.2
D-SSIM``). The optimiser is Adam with splatfacto's learning rates (positions at the end of its decay), for a
bounded number of steps; densification does not run.

:func:`held_out_loss` is the same loss on views the fine-tune never sees (the run's evaluation split);
:func:`gvae_ns.refine.cli.refine_pipeline` keeps a fine-tuned refinement only when its held-out loss is not
above the trained scene's, and says which it kept.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import pytorch_msssim
import torch
import torch.nn.functional as F
from torch import Tensor

from gvae_ns.gaussians import PARAM_KEYS
from gvae_ns.refine.score import ScoringViews, render_view, training_image

LEARNING_RATES = {"means": 1.6e-6, "scales": 5e-3, "quats": 1e-3, "features_dc": 2.5e-3,
                  "features_rest": 2.5e-3 / 20, "opacities": 5e-2}
"""splatfacto's Adam learning rates (positions: the end of its exponential decay, the scene being trained)."""
SSIM_LAMBDA = 0.2
"""Weight of D-SSIM in the loss, as splatfacto's ``ssim_lambda``."""


def _render_down(params: Dict[str, Tensor], views: ScoringViews, index: int, factor: int) -> Tensor:
    """View ``index`` rendered at ``factor`` x the trained resolution, box-averaged to it: ``[H, W, 3]``."""
    rgb, _ = render_view(params, views, index, scale=factor)
    if factor == 1:
        return rgb
    return F.avg_pool2d(rgb.permute(2, 0, 1)[None], factor)[0].permute(1, 2, 0)


def _loss(pred: Tensor, gt: Tensor) -> Tensor:
    h, w = min(pred.shape[0], gt.shape[0]), min(pred.shape[1], gt.shape[1])
    pred, gt = pred[:h, :w], gt[:h, :w]
    l1 = torch.abs(pred - gt).mean()
    ssim = pytorch_msssim.ssim(pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=1.0,
                               size_average=True)
    return (1 - SSIM_LAMBDA) * l1 + SSIM_LAMBDA * (1 - ssim)


def finetune(params: Dict[str, Tensor], views: ScoringViews, factor: int, steps: int, seed: int = 0,
             progress: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, Tensor]:
    """``params`` (splatfacto-shaped, raw) fine-tuned for ``steps`` steps through renders at ``factor`` x the
    trained resolution averaged down to it; returns new detached tensors (``params`` is left as it is)."""
    leaves = {k: params[k].detach().clone().requires_grad_(True) for k in PARAM_KEYS}
    optimizer = torch.optim.Adam([{"params": [leaves[k]], "lr": LEARNING_RATES[k]} for k in PARAM_KEYS], eps=1e-15)
    order = torch.randperm(len(views.images), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        index = int(order[step % len(order)])
        loss = _loss(_render_down(leaves, views, index, factor), training_image(views, index, leaves["means"].device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            leaves["quats"].data = F.normalize(leaves["quats"].data, dim=-1)
        if progress is not None:
            progress(step + 1, {"loss": float(loss.detach())})
    return {k: v.detach() for k, v in leaves.items()}


@torch.no_grad()
def held_out_loss(params: Dict[str, Tensor], views: ScoringViews, factor: int) -> float:
    """Mean fine-tune loss of ``params`` on ``views`` (renders at ``factor`` x the trained resolution, averaged
    down), i.e. how well the scene explains images it was not fitted to."""
    device = params["means"].device
    losses = [float(_loss(_render_down(params, views, i, factor), training_image(views, i, device)))
              for i in range(len(views.images))]
    return sum(losses) / max(len(losses), 1)
