"""Which Gaussians to refine: per-Gaussian signals from the training views, their scores, top-K selection.

Two per-Gaussian signals (:func:`score_gaussians` measures both on the training views at the finest
stage's resolution):

- ``grad2d``: the mean view-space positional gradient norm (what gsplat's ``DefaultStrategy``
  accumulates to decide densification: ``grad2d / count``), high where the image error pulls a
  Gaussian's projection around;
- ``hessian``: a diagonal Gauss-Newton estimate of the loss curvature in the Gaussian's position,
  the sum over steps of squared position gradients (``[N]``, or ``[N, 3]`` per axis, summed: the
  trace of the 3x3 block), high where a small move changes the loss a lot.

:func:`combine_scores` modes:

- ``"grad"``: ``grad2d`` alone (the 3D-GS / Generative Densification heuristic);
- ``"hessian"``: the Hessian-assisted score, the normalised geometric mean
  ``sqrt((g / mean(g)) * (h / mean(h)))``: each signal divided by its mean so neither's units
  dominate, and the product so a Gaussian must rank high in both. A signal that is zero
  everywhere carries no information and is replaced by ones, leaving the other to decide;
- ``"all"``: ones for every Gaussian, the whole-scene ablation (select with ``k=None`` and
  ``fraction=None`` to take them all).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from nerfstudio.models.splatfacto import resize_image

from gvae_ns.gaussians import PARAM_KEYS
from gvae_ns.footprint import log2_pixels_per_unit
from gvae_ns.render import rasterize, world_to_camera
from gvae_ns.render.filter3d import SmoothingFilter3D

SCORE_MODES = ("hessian", "grad", "all")
"""The selection modes, as ``--select`` takes them."""


def _check_signal(name: str, value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if value.dim() == 2 and value.shape[1] == 3:
        value = value.sum(dim=1)
    if value.dim() != 1:
        raise ValueError(f"combine_scores: {name} must be [N] or [N, 3], got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"selection scores: {name} is NaN or infinite for {bad} of {value.numel()} Gaussians, so the checkpoint's "
            "Gaussians or their renders are not finite (a diverged run). Retrain with lower learning rates; a "
            "Gaussian no training view sees scores 0, not NaN.")
    if bool((value < 0).any()):
        raise ValueError(f"combine_scores: {name} must be non-negative (a norm or a sum of squares)")
    return value.float()


def _mean_normalised(value: torch.Tensor) -> torch.Tensor:
    mean = value.mean() if value.numel() else value.new_zeros(())
    return value / mean if float(mean) > 0 else torch.ones_like(value)


def combine_scores(
    grad2d: Optional[torch.Tensor], hessian: Optional[torch.Tensor] = None, mode: str = "hessian"
) -> torch.Tensor:
    """Per-Gaussian importance ``[N]`` (higher = refine first) from the signals (module docstring)."""
    if mode not in SCORE_MODES:
        raise ValueError(f"combine_scores: mode must be one of {SCORE_MODES}, got {mode!r}")
    g = _check_signal("grad2d", grad2d)
    h = _check_signal("hessian", hessian)
    if g is not None and h is not None and g.shape != h.shape:
        raise ValueError(f"combine_scores: grad2d has {g.shape[0]} Gaussians but hessian has {h.shape[0]}")
    if mode == "all":
        ref = g if g is not None else h
        if ref is None:
            raise ValueError("combine_scores: mode='all' still needs grad2d or hessian to know N")
        return torch.ones_like(ref)
    if g is None:
        raise ValueError(f"combine_scores: mode={mode!r} needs grad2d (mean view-space gradient norm)")
    if mode == "grad":
        return g
    if h is None:
        raise ValueError("combine_scores: mode='hessian' needs hessian (sum of squared position gradients); use mode='grad' without it")
    return torch.sqrt(_mean_normalised(g) * _mean_normalised(h))


def select_top(score: torch.Tensor, k: Optional[int] = None, fraction: Optional[float] = None) -> torch.Tensor:
    """Indices of the ``k`` highest scores (or ``round(fraction * N)``; neither: all), best first.

    Ties go to the lower index, so the selection is deterministic.
    """
    if score.dim() != 1:
        raise ValueError(f"select_top: score must be 1D [N], got {tuple(score.shape)}")
    if bool(torch.isnan(score).any()):
        raise ValueError("select_top: score has NaN entries; they cannot be ranked")
    n = score.shape[0]
    if k is not None and fraction is not None:
        raise ValueError("select_top: give k or fraction, not both")
    if fraction is not None:
        if isinstance(fraction, bool) or not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"select_top: fraction must be in [0, 1], got {fraction!r}")
        k = int(round(float(fraction) * n))
    if k is None:
        k = n
    try:
        valid = not isinstance(k, bool) and 0 <= operator.index(k) <= n
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"select_top: k must be an int in [0, N={n}], got {k!r}")
    k = operator.index(k)
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:k]


# ------------------------------------------------------------------------------------------------ signals
@dataclass
class ScoringViews:
    """The training views the signals are measured on, and how the trained scene is rendered."""

    cameras: object
    """nerfstudio ``Cameras`` of the training views (full resolution; rescaled by ``downscale``)."""
    images: Sequence[torch.Tensor]
    """The training images, ``[H, W, 3 or 4]``, uint8 or float in [0, 1], in camera order."""
    downscale: int
    """The finest stage's image downscale factor: the signals are measured at the trained resolution."""
    background: torch.Tensor
    """``[3]`` background colour the renders and RGBA images are composited on."""
    sh_degree: Optional[int]
    """SH degree of the colours (``None``: colours are RGB logits, as splatfacto's ``sh_degree=0``)."""
    rasterize_mode: str
    """``classic`` or ``antialiased``, as the scene was trained."""
    filter3d: Optional[SmoothingFilter3D] = None
    """The run's Mip-Splatting 3D filter (``--pipeline.model.mip-filter-3d``; ``None``: renders unfiltered):
    renders bake it at the sampling rate of ``filter_scale`` x the trained resolution."""


def on_background(image: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``image [H, W, 3 or 4]`` (float in [0, 1]) composited on ``background [3]`` where it has alpha."""
    if image.shape[-1] == 4:
        alpha = image[..., 3:]
        return image[..., :3] * alpha + background * (1.0 - alpha)
    return image[..., :3]


def render_view(params: Dict[str, torch.Tensor], views: ScoringViews, index: int,
                scale: float = 1.0, absgrad: bool = False, filter_scale: float = 1.0) -> Tuple[torch.Tensor, Dict]:
    """View ``index`` rendered from ``params`` (splatfacto-shaped, raw) at ``scale`` x the trained resolution:
    ``[H, W, 3]`` on the background, and gsplat's ``info`` (``absgrad``: with the absolute 2D gradients).
    With the run's 3D filter, it is baked at the sampling rate of ``filter_scale`` x the trained resolution: 1
    for the trained scene (as the model shows it), ``2**k`` for a refinement made ``k`` doublings finer."""
    device = params["means"].device
    if views.filter3d is not None:
        params = views.filter3d.bake(params, views.downscale / filter_scale, None)
    camera = views.cameras[index : index + 1].to(device)
    camera.rescale_output_resolution(scale / views.downscale)
    W, H = int(camera.width.item()), int(camera.height.item())
    colors = torch.cat([params["features_dc"][:, None], params["features_rest"]], dim=1)
    if views.sh_degree is None:
        colors = torch.sigmoid(colors).squeeze(1)
    render, alpha, info = rasterize(
        means=params["means"], quats=params["quats"], scales=torch.exp(params["scales"]),
        opacities=torch.sigmoid(params["opacities"]).squeeze(-1), colors=colors,
        viewmats=world_to_camera(camera.camera_to_worlds).to(device), Ks=camera.get_intrinsics_matrices().to(device),
        width=W, height=H, packed=False, sh_degree=views.sh_degree, rasterize_mode=views.rasterize_mode,
        absgrad=absgrad,
    )
    return torch.clamp(render[0, ..., :3] + (1 - alpha[0]) * views.background.to(device), 0.0, 1.0), info


def training_image(views: ScoringViews, index: int, device) -> torch.Tensor:
    """Training image ``index`` at the trained resolution (box-downscaled as splatfacto does), on the background."""
    image = views.images[index].to(device)
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    d = int(views.downscale)
    return on_background(resize_image(image, d) if d > 1 else image, views.background.to(device))


def score_gaussians(params: Dict[str, torch.Tensor], views: ScoringViews, count: int = 0,
                    progress: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, torch.Tensor]:
    """Per-Gaussian selection signals of ``params`` (splatfacto-shaped, raw) on ``count`` evenly spaced
    training views (0: all); ``progress(done, losses)`` is called after every view.

    ``grad2d``: mean norm of the view-space (pixel) position gradient over views where the Gaussian is
    visible, as the densification strategy measures it. ``hessian``: diagonal Gauss-Newton estimate of the
    photometric loss w.r.t. the 3D position, ``sum_v (dL_v/dmean)^2``. ``log2_px_per_unit``: not a selection
    signal but the pixel scale at each Gaussian over all the views, at the trained resolution
    (:func:`gvae_ns.footprint.log2_pixels_per_unit`), for decoders that read footprints.
    """
    params = {k: params[k].detach() for k in PARAM_KEYS}
    n = params["means"].shape[0]
    device = params["means"].device
    grad_sum = torch.zeros(n, device=device)
    vis_count = torch.zeros(n, device=device)
    hessian = torch.zeros(n, device=device)
    total = len(views.images)
    indices = range(total) if count <= 0 else torch.linspace(0, total - 1, count).long().tolist()
    for done, i in enumerate(indices, start=1):
        means = params["means"].clone().requires_grad_(True)
        rgb, info = render_view({**params, "means": means}, views, i)
        info["means2d"].retain_grad()
        H, W = rgb.shape[:2]
        gt = training_image(views, i, device)
        loss = torch.abs(gt - rgb).mean()
        loss.backward()
        g2d = info["means2d"].grad[0] * torch.tensor([W / 2.0, H / 2.0], device=device)
        visible = info["radii"][0] > 0
        if visible.dim() > 1:
            visible = visible.all(dim=-1)
        grad_sum += torch.where(visible, g2d.norm(dim=-1), torch.zeros_like(grad_sum))
        vis_count += visible.float()
        hessian += means.grad.pow(2).sum(dim=-1)
        if progress is not None:
            progress(done, {"l1": float(loss.detach())})
    pixels = log2_pixels_per_unit(params["means"], views.cameras, views.downscale)
    return {"grad2d": (grad_sum / vis_count.clamp_min(1)).cpu(), "hessian": hessian.cpu(), "log2_px_per_unit": pixels}
