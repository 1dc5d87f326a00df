"""What every rasterizer path shares with gsplat: modes, compositing constants, the projection record, tiles.

The PyTorch compositor (:mod:`gvae_ns.render.composite_torch`) and the compiled one
(:mod:`gvae_ns.render.compiled`, which passes them to ``csrc/rasterize_cpu.cpp`` as arguments) both
read the constants from here, so the two paths cannot disagree about them.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
RasterizeMode = Literal["classic", "antialiased"]

ALPHA_MIN = 1.0 / 255.0
"""Pairs whose alpha is below this are skipped (as in gsplat)."""
ALPHA_MAX = 0.999
"""Alpha is clamped to this."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel stops before the Gaussian that would bring its transmittance to or below this."""

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")


class Projection(NamedTuple):
    """Gaussians projected into each camera; entries with ``radii == 0`` are culled."""

    radii: Tensor
    """``[C, N]`` int32 screen radius in pixels (0: not rendered)."""
    means2d: Tensor
    """``[C, N, 2]`` pixel coordinates of the centres."""
    depths: Tensor
    """``[C, N]`` camera-space z."""
    conics: Tensor
    """``[C, N, 3]`` upper triangle (a, b, c) of the inverse blurred 2D covariance."""
    compensations: Tensor | None
    """``[C, N]`` anti-aliasing opacity factor, or None when not requested."""


def tiles_per_gauss(
    means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int
) -> Tensor:
    """Number of tiles each projected Gaussian touches (gsplat's ``tiles_per_gauss``): ``[C, N]`` int32."""
    x0, x1, y0, y1 = tile_box(means2d, radii, tile_size, tile_width, tile_height)
    return ((x1 - x0) * (y1 - y0) * (radii > 0)).to(torch.int32)


def tile_box(means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int):
    """Tile index ranges ``[x0, x1) x [y0, y1)`` of each Gaussian's radius box, as ``isect_tiles``."""
    r = radii.to(means2d.dtype) / tile_size
    tx, ty = (means2d / tile_size).unbind(-1)
    x0 = torch.floor(tx - r).clamp(0, tile_width).long()
    x1 = torch.ceil(tx + r).clamp(0, tile_width).long()
    y0 = torch.floor(ty - r).clamp(0, tile_height).long()
    y1 = torch.ceil(ty + r).clamp(0, tile_height).long()
    return x0, x1, y0, y1
