"""How many pixels a world unit spans at a point of the scene, over the training views.

A Gaussian's footprint in pixels is what decides whether a finer resolution can show more of it: one already
smaller than a pixel at the target resolution has nothing to split into. The lineage states are in world
units, so a decoder that should know this needs the cameras' scale at each Gaussian:

``log2_pixels_per_unit(means, cameras, downscale)`` is, for each point, the mean over the views that see it
(in front of the camera, inside the image) of ``log2(sqrt(fx * fy) / depth)``: the pixels one world unit
spans there, at the cameras' resolution divided by ``downscale``. A point no view sees takes the mean over
the views it is in front of, and one behind every camera the median of the others (0 when there are none).
A Gaussian's footprint is then ``log2_pixels_per_unit + max log-scale / ln 2``: the log2 pixel length of
its largest axis. Each resolution doubling adds 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gvae_ns.render.projection import world_to_camera

MIN_DEPTH = 1e-3
"""Points closer to a camera than this (world units) do not count as in front of it."""


def log2_pixels_per_unit(means: Tensor, cameras: Any, downscale: float = 1.0, chunk: int = 8192) -> Tensor:
    """``[N]`` log2 pixels per world unit at ``means [N, 3]`` over ``cameras`` (nerfstudio ``Cameras``, or any
    object with ``camera_to_worlds [V, 3, 4]`` (OpenGL axes, as nerfstudio's) and ``fx, fy, cx, cy, width,
    height`` of ``V`` rows), at their resolution divided by ``downscale``; see the module docstring."""
    if means.dim() != 2 or means.shape[1] != 3:
        raise ValueError(f"log2_pixels_per_unit: means must be [N, 3], got {tuple(means.shape)}")
    if not downscale > 0:
        raise ValueError(f"log2_pixels_per_unit: downscale must be above 0, got {downscale}")
    c2w = cameras.camera_to_worlds.detach().reshape(-1, 3, 4).double().cpu()
    v = c2w.shape[0]

    def column(name: str) -> Tensor:
        return getattr(cameras, name).detach().reshape(v).double().cpu()

    fx, fy, cx, cy = column("fx"), column("fy"), column("cx"), column("cy")
    width, height = column("width"), column("height")
    viewmats = world_to_camera(c2w)  # OpenCV axes: x right, y down, z ahead
    rot, shift = viewmats[:, :3, :3], viewmats[:, :3, 3]
    log2_focal = 0.5 * torch.log2(fx * fy)
    points = means.detach().double().cpu()
    out = torch.zeros(points.shape[0], dtype=torch.float64)
    fallback = torch.zeros(points.shape[0], dtype=torch.bool)
    for lo in range(0, points.shape[0], chunk):
        p = points[lo:lo + chunk]
        local = torch.einsum("vij,nj->nvi", rot, p) + shift[None]
        depth = local[..., 2]
        front = depth > MIN_DEPTH
        safe = torch.where(front, depth, torch.ones_like(depth))
        u = fx * local[..., 0] / safe + cx
        w = fy * local[..., 1] / safe + cy
        seen = front & (u >= 0) & (u < width) & (w >= 0) & (w < height)
        value = log2_focal[None] - torch.log2(safe)
        use = torch.where(seen.any(dim=1, keepdim=True), seen, front)
        count = use.sum(dim=1)
        out[lo:lo + chunk] = torch.where(use, value, torch.zeros_like(value)).sum(dim=1) / count.clamp_min(1)
        fallback[lo:lo + chunk] = count == 0
    if bool(fallback.any()):
        out[fallback] = out[~fallback].median() if bool((~fallback).any()) else 0.0
    return (out - math.log2(downscale)).float()
