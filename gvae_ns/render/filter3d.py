"""Mip-Splatting's 3D smoothing filter (Yu et al., CVPR 2024), baked into splatfacto's parameters.

Each Gaussian ``i`` gets the highest sampling rate any training camera ``c`` sees it at,
``nu_i = max_c f_c / z_ic`` (pixels per world unit at the trained resolution), over the cameras that have the
centre in front of them (``z > near``) and inside the image widened by a 15% margin on every side. The filter
is an isotropic 3D Gaussian low-pass of variance ``s^2 / nu_i^2`` (``s^2 = 0.2``: a standard deviation of
``sqrt(0.2)`` pixel footprints) convolved with the Gaussian:

    Sigma' = Sigma + (s^2 / nu^2) I = R diag(scale^2 + s^2 / nu^2) R^T

so it is exact to add the variance to every axis of the scales, and the opacity is multiplied by
``sqrt(det Sigma / det Sigma') = prod_axes scale / scale'`` so that the Gaussian's integral is conserved.
:func:`apply_filter_3d` does this in the spaces splatfacto stores (log scales, opacity logits), differentiably.

Gaussians no camera sees get the widest filter of the seen ones (the smallest ``nu``); with none seen, nothing
is filtered. The rate uses ``max(fx, fy)`` (the finer of the two pixel pitches).

:class:`SmoothingFilter3D` is a model's filter state: the training cameras (full resolution), the trained
stage's downscale and the rates of the trained Gaussians, recomputed when the rows change (densification) or
the downscale does (a stage switch: ``nu`` at downscale ``d`` is ``(f / d) / z``). Its :meth:`state_dict`
holds plain tensors (checkpoint-safe under ``weights_only=True``), so loads without training (``ns-viewer``,
``ns-export``) filter exactly as training ended, and other Gaussian sets (a refinement) get rates from the
stored cameras.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from gvae_ns.render.projection import world_to_camera

try:  # nerfstudio's console, as the rest of the package logs
    from nerfstudio.utils.rich_utils import CONSOLE
except ImportError:  # used without nerfstudio
    CONSOLE = None

FILTER_VARIANCE = 0.2
"""Mip-Splatting's ``s^2``: the filter's variance in squared pixel footprints."""
IMAGE_MARGIN = 0.15
"""A centre counts as seen up to this fraction of the image size beyond each border."""
NEAR_PLANE = 0.01
"""Centres closer than this (camera-space z) are not seen; the renderer's near plane."""
_MAX_ENTRIES = 1 << 22  # camera x Gaussian entries per chunk
_OPACITY_EPS = 1e-6  # filtered opacities are clamped to [.., 1 - eps] before the logit


@torch.no_grad()
def max_sampling_rate(means: Tensor, viewmats: Tensor, Ks: Tensor, widths: Tensor, heights: Tensor,
                      margin: float = IMAGE_MARGIN, near: float = NEAR_PLANE) -> Tensor:
    """``[N]`` highest sampling rate (pixels per world unit) of ``means [N, 3]`` over the cameras
    (``viewmats [C, 4, 4]`` world-to-camera, OpenCV axes as :func:`world_to_camera` makes them; ``Ks [C, 3, 3]``;
    image ``widths, heights [C]`` in pixels): ``max(fx, fy) / z`` where the centre is in front (``z > near``) and
    projects inside the image widened by ``margin`` x its size on each side; ``0`` where no camera sees it.
    Chunked over cameras (about 4M camera-Gaussian entries at a time)."""
    means = means.detach()
    n = int(means.shape[0])
    device, dtype = means.device, means.dtype
    best = torch.zeros(n, device=device, dtype=dtype)
    viewmats, Ks = viewmats.to(device, dtype), Ks.to(device, dtype)
    widths, heights = widths.reshape(-1).to(device, dtype), heights.reshape(-1).to(device, dtype)
    step = max(1, _MAX_ENTRIES // max(n, 1))
    for c0 in range(0, int(viewmats.shape[0]), step):
        vm, K = viewmats[c0 : c0 + step], Ks[c0 : c0 + step]
        w, h = widths[c0 : c0 + step, None], heights[c0 : c0 + step, None]
        cam = torch.einsum("cij,nj->cni", vm[:, :3, :3], means) + vm[:, None, :3, 3]  # [c, N, 3]
        x, y, z = cam.unbind(-1)
        front = z > near
        z_safe = torch.where(front, z, torch.ones_like(z))
        fx, fy, cx, cy = K[:, 0, 0, None], K[:, 1, 1, None], K[:, 0, 2, None], K[:, 1, 2, None]
        u, v = fx * x / z_safe + cx, fy * y / z_safe + cy
        inside = (u >= -margin * w) & (u <= (1 + margin) * w) & (v >= -margin * h) & (v <= (1 + margin) * h)
        rate = torch.where(front & inside, torch.maximum(fx, fy) / z_safe, torch.zeros_like(z))
        best = torch.maximum(best, rate.amax(dim=0))
    return best


def fill_unseen(nu: Tensor) -> Tensor:
    """``nu`` with the unseen (``<= 0``) given the smallest seen rate (the widest filter); ``inf`` (no filter)
    everywhere when none is seen."""
    seen = nu > 0
    if not bool(seen.any()):
        return torch.full_like(nu, math.inf)
    return torch.where(seen, nu, nu[seen].min())


def apply_filter_3d(log_scales: Tensor, opacity_logits: Tensor, nu: Tensor,
                    variance: float = FILTER_VARIANCE) -> Tuple[Tensor, Tensor]:
    """Bake the 3D filter of rates ``nu [N]`` into ``log_scales [N, 3]`` and ``opacity_logits [N, 1]`` (or
    ``[N]``): ``scale'^2 = scale^2 + variance / nu^2`` per axis and ``opacity' = opacity * prod(scale / scale')``,
    returned in the same spaces and shapes. ``nu = inf`` leaves a row as it is (up to the opacity clamp
    ``1 - 1e-6``). Differentiable in ``log_scales`` and ``opacity_logits``; ``nu`` is a constant."""
    nu = nu.detach().to(log_scales.dtype)
    added = torch.log(variance / nu.square())[:, None]  # log of the added variance, -inf for nu = inf
    new_log_scales = 0.5 * torch.logaddexp(2.0 * log_scales, added)
    log_ratio = (log_scales - new_log_scales).sum(dim=-1)  # log prod(scale / scale') <= 0
    log_alpha = torch.nn.functional.logsigmoid(opacity_logits) + log_ratio.reshape(opacity_logits.shape)
    log_alpha = torch.clamp(log_alpha, max=math.log1p(-_OPACITY_EPS))
    new_logits = log_alpha - torch.log(-torch.expm1(log_alpha))  # logit(alpha') = log a' - log(1 - a')
    return new_log_scales, new_logits


Cameras = Any  # nerfstudio Cameras (duck-typed: camera_to_worlds, get_intrinsics_matrices, width, height)
TrainedKey = Tuple[int, int]
"""What identifies the trained rows: (row count, the lineage recorder's next id); any densification that
changes the rows changes it (a growth hands out new ids, a prune lowers the count)."""


class SmoothingFilter3D:
    """One model's 3D filter: training cameras, the trained downscale and the trained Gaussians' rates."""

    def __init__(self, variance: float = FILTER_VARIANCE, margin: float = IMAGE_MARGIN) -> None:
        self.variance = variance
        self.margin = margin
        self.cameras: Optional[Dict[str, Tensor]] = None
        """``viewmats [C,4,4]``, ``Ks [C,3,3]``, ``widths``, ``heights [C]`` of the training views (full res)."""
        self.downscale = 1
        """Image downscale of the stage trained last (evaluation renders use its filter)."""
        self._trained: Optional[Tuple[Tuple[int, int, int], Tensor]] = None  # ((N, next id, downscale), nu)
        self._other: Optional[Tuple[Tensor, int, Tensor]] = None  # (means, downscale, nu) of another set
        self._warned = False

    def use_cameras(self, cameras: Cameras) -> None:
        """Take the training views' poses and intrinsics (nerfstudio ``Cameras [C]`` at full resolution)."""
        self.cameras = {
            "viewmats": world_to_camera(cameras.camera_to_worlds.reshape(-1, 3, 4).float()).cpu(),
            "Ks": cameras.get_intrinsics_matrices().reshape(-1, 3, 3).float().cpu(),
            "widths": cameras.width.reshape(-1).float().cpu(), "heights": cameras.height.reshape(-1).float().cpu()}

    def compute(self, means: Tensor, downscale: float) -> Tensor:
        """Rates of ``means`` at image downscale ``downscale`` from the stored cameras (unseen ones filled)."""
        if self.cameras is None:
            raise RuntimeError("the 3D filter has no training cameras: call use_cameras first")
        c = self.cameras
        nu = max_sampling_rate(means, c["viewmats"], c["Ks"], c["widths"], c["heights"], margin=self.margin)
        return fill_unseen(nu / float(downscale))

    def rates(self, means: Tensor, downscale: Optional[float], trained: Optional[TrainedKey]) -> Optional[Tensor]:
        """Rates of ``means``: the trained rows (``trained`` given) from the stored ones, recomputed when the
        rows or the downscale changed; another set (``None``) from the cameras, kept while it is shown.
        ``downscale`` ``None``: the stage trained last; another set may take a fraction (``1/2**k``: the sampling
        rate of a refinement ``k`` doublings finer, the loosened filter). ``None`` back where there is nothing to
        compute from."""
        d = self.downscale if downscale is None else downscale
        n = int(means.shape[0])
        if trained is None:  # another set may be shown finer than any stage trained (d < 1: a refinement)
            other = self._other
            if other is not None and other[0] is means and other[1] == d:
                return other[2]
            if self.cameras is None:
                return None
            self._other = (means, d, self.compute(means, d))
            return self._other[2]
        d = int(d)
        key = (int(trained[0]), int(trained[1]), d)
        if self._trained is not None and self._trained[0] == key and self._trained[1].shape[0] == n:
            return self._trained[1].to(means.device)
        if self.cameras is None:
            return None
        self._trained = (key, self.compute(means, d))
        self.downscale = d
        return self._trained[1]

    def bake(self, params: Dict[str, Tensor], downscale: Optional[float],
             trained: Optional[TrainedKey]) -> Dict[str, Tensor]:
        """``params`` (splatfacto-shaped) with the filter baked into ``scales`` and ``opacities`` (see
        :meth:`rates`); unchanged, with one warning, where no rates can be had."""
        nu = self.rates(params["means"], downscale, trained)
        if nu is None:
            if not self._warned:
                _log("gvae-ns: --pipeline.model.mip-filter-3d is on but the model has neither training cameras nor "
                     "stored filter rates for these Gaussians; they are rendered without the 3D filter")
                self._warned = True
            return params
        scales, opacities = apply_filter_3d(params["scales"], params["opacities"], nu.to(params["means"].device),
                                            self.variance)
        return {**params, "scales": scales, "opacities": opacities}

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Tensor]:
        """Plain tensors: the cameras, the trained downscale and rates (empty before anything is known)."""
        out: Dict[str, Tensor] = {}
        if self.cameras is not None:
            out.update({f"camera_{k}": v for k, v in self.cameras.items()})
        out["downscale"] = torch.tensor(self.downscale)
        if self._trained is not None:
            out["trained_key"] = torch.tensor(self._trained[0])
            out["nu"] = self._trained[1].detach().cpu()
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict`; an empty mapping (a checkpoint from before the filter) clears it."""
        names = ("viewmats", "Ks", "widths", "heights")
        has_cameras = all(f"camera_{k}" in state for k in names)
        self.cameras = {k: state[f"camera_{k}"].float().cpu() for k in names} if has_cameras else None
        self.downscale = int(state["downscale"]) if "downscale" in state else 1
        self._trained = None
        if "nu" in state and "trained_key" in state:
            key = tuple(int(v) for v in state["trained_key"].tolist())
            self._trained = (key, state["nu"].float())  # type: ignore[assignment]
        self._other = None


def _log(line: str) -> None:
    if CONSOLE is not None:
        CONSOLE.print(line, style="bold yellow", markup=False, highlight=False, soft_wrap=True)
    else:
        print(line)
