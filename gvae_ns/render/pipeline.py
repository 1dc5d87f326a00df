"""One rasterization, stage by stage: input checks, covariances, projection, colours, compositing, ``info``.

:func:`rasterize_with` has the signature and the semantics of ``gsplat.rendering.rasterization``
(gsplat 1.4.0) and runs a set of :class:`Kernels`: :data:`TORCH_KERNELS` (pure PyTorch, the
reference; :func:`rasterize_torch`) or :data:`CPP_KERNELS` (the compiled compositor of
:mod:`gvae_ns.render.compiled`; :func:`rasterize_cpp`). Both follow gsplat's math step by step:

* projection: EWA with the clamped perspective Jacobian, ``eps2d`` blur, optional
  anti-aliasing compensation, ``radius = ceil(3 sqrt(lambda_max))``, near/far and image culling;
* intersection: a Gaussian touches the pixels of the 16x16 tiles its radius box overlaps (as
  gsplat's ``isect_tiles``), narrowed to the ellipse where its alpha can reach ``1/255``;
* compositing: ``alpha = min(0.999, o exp(-sigma))``, pairs with ``alpha < 1/255`` skipped, front
  to back by depth, a pixel stops before the Gaussian that would take its transmittance to
  ``<= 1e-4``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from gvae_ns.quaternions import covariance
from gvae_ns.render.compiled import composite_cpp, eval_sh_cpp
from gvae_ns.render.composite_torch import composite
from gvae_ns.render.contract import (
    RASTERIZE_MODES,
    RENDER_MODES,
    Projection,
    RasterizeMode,
    RenderMode,
    tiles_per_gauss,
)
from gvae_ns.render.projection import project_gaussians, project_gaussians_fast
from gvae_ns.render.sh import eval_sh


class Kernels(NamedTuple):
    """The stages :func:`rasterize_with` runs, swappable as a set."""

    composite: Callable[..., tuple[Tensor, Tensor]]
    """As :func:`gvae_ns.render.composite_torch.composite`."""
    project: Callable[..., Projection]
    """As :func:`gvae_ns.render.projection.project_gaussians`."""
    sh: Callable[[int, Tensor, Tensor], Tensor]
    """As :func:`gvae_ns.render.sh.eval_sh`."""


def rasterize_with(
    kernels: Kernels,
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Tensor | None = None,
    render_mode: RenderMode = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: RasterizeMode = "classic",
    **unused,
) -> tuple[Tensor, Tensor, dict]:
    """Differentiable equivalent of ``gsplat.rendering.rasterization`` (pinhole) on any device.

    ``kernels`` are the stages: the PyTorch ones (:data:`TORCH_KERNELS`, the reference) or
    :data:`CPP_KERNELS` (the compiled compositor and SH). Covariances come from
    :func:`gvae_ns.quaternions.covariance` on every path.

    Shapes: ``means [N,3]``, ``quats [N,4]`` (wxyz, any norm), ``scales [N,3]`` (not log),
    ``opacities [N]``, ``colors [(C,)N,D]`` or SH coefficients ``[(C,)N,K,3]`` when ``sh_degree``
    is set, ``viewmats [C,4,4]`` (world-to-camera), ``Ks [C,3,3]``, ``backgrounds [C,D]``.

    Returns ``(render_colors [C,H,W,X], render_alphas [C,H,W,1], info)``. ``info`` holds gsplat's
    keys: ``radii`` (int32 ``[C,N]``, or ``[nnz]`` when packed), ``means2d`` (in the autograd
    graph; ``.retain_grad()`` it for the view-space gradient; ``.absgrad`` is set in backward when
    ``absgrad``), ``depths``, ``conics``, ``opacities``, ``camera_ids``, ``gaussian_ids``,
    ``tiles_per_gauss``, ``width``, ``height``, ``tile_size``, ``tile_width``, ``tile_height``,
    ``n_cameras``. ``sparse_grad`` is accepted and ignored (dense gradients).

    Of gsplat's further keywords (``**unused``), ``covars [N,3,3]`` replaces ``quats``/``scales``,
    ``channel_chunk`` is ignored, ``distributed=True`` and a ``camera_model`` other than
    ``"pinhole"`` raise ``NotImplementedError``; anything else is ignored with a warning.
    """
    _check_unused(unused)
    N = means.shape[0]
    C = viewmats.shape[0]
    D_in = colors.shape[-1]
    covars = unused.get("covars")
    _check_inputs(
        means, quats, scales, covars, opacities, colors, viewmats, Ks, width, height, sh_degree,
        tile_size, backgrounds, render_mode, rasterize_mode, D_in,
    )
    if covars is None:
        covars = covariance(quats, scales)

    proj = kernels.project(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane,
        far_plane=far_plane, radius_clip=radius_clip,
        calc_compensations=rasterize_mode == "antialiased",
    )
    radii, means2d, depths, conics = proj.radii, proj.means2d, proj.depths, proj.conics
    opac = opacities.unsqueeze(0).expand(C, N)
    if proj.compensations is not None:
        opac = opac * proj.compensations

    if sh_degree is None:
        feats = colors if colors.dim() == 3 else colors.unsqueeze(0).expand(C, N, D_in)
    else:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
        dirs = means.unsqueeze(0) - campos.unsqueeze(1)  # [C, N, 3]
        coeffs = colors if colors.dim() == 4 else colors.unsqueeze(0).expand(C, *colors.shape)
        feats = torch.clamp_min(kernels.sh(sh_degree, dirs, coeffs) + 0.5, 0.0)

    bgs = backgrounds
    if render_mode in ("RGB+D", "RGB+ED"):
        feats = torch.cat([feats, depths.unsqueeze(-1)], dim=-1)
        if bgs is not None:
            bgs = torch.cat([bgs, bgs.new_zeros(C, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        feats = depths.unsqueeze(-1)
        if bgs is not None:
            bgs = bgs.new_zeros(C, 1)

    tile_width = math.ceil(width / float(tile_size))
    tile_height = math.ceil(height / float(tile_size))
    info: dict = {}
    if packed:
        camera_ids, gaussian_ids = torch.nonzero(radii > 0, as_tuple=True)
        means2d_out = means2d[camera_ids, gaussian_ids]
        # the compositor works on [C, N]; scatter the packed means back so gradients reach them
        means2d_in = means2d.detach().index_put((camera_ids, gaussian_ids), means2d_out)

        def sink(v: Tensor) -> None:
            means2d_out.absgrad = v[camera_ids, gaussian_ids]

        info.update(
            camera_ids=camera_ids,
            gaussian_ids=gaussian_ids,
            radii=radii[camera_ids, gaussian_ids],
            means2d=means2d_out,
            depths=depths[camera_ids, gaussian_ids],
            conics=conics[camera_ids, gaussian_ids],
            opacities=opac[camera_ids, gaussian_ids],
        )
    else:
        means2d_in = means2d

        def sink(v: Tensor) -> None:
            means2d.absgrad = v

        info.update(
            camera_ids=None,
            gaussian_ids=None,
            radii=radii,
            means2d=means2d,
            depths=depths,
            conics=conics,
            opacities=opac,
        )

    render_colors, render_alphas = kernels.composite(
        means2d_in, conics, feats, opac, radii, depths, width, height,
        backgrounds=bgs, tile_size=tile_size, absgrad_sink=sink if absgrad else None,
    )
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)],
            dim=-1,
        )
    gauss_tiles = tiles_per_gauss(means2d.detach(), radii, tile_size, tile_width, tile_height)
    info.update(
        tiles_per_gauss=gauss_tiles[radii > 0] if packed else gauss_tiles,
        width=width,
        height=height,
        tile_size=tile_size,
        tile_width=tile_width,
        tile_height=tile_height,
        n_cameras=C,
    )
    return render_colors, render_alphas, info


def _check_unused(unused: dict) -> None:
    """Refuse gsplat options this path cannot honour; warn about ones it ignores."""
    if unused.get("distributed"):
        raise NotImplementedError("rasterize: distributed=True needs gsplat on CUDA.")
    camera_model = unused.get("camera_model", "pinhole")
    if camera_model != "pinhole":
        raise NotImplementedError(
            f"rasterize: camera_model={camera_model!r} is not implemented; only 'pinhole'."
        )
    ignored = sorted(set(unused) - {"distributed", "camera_model", "covars", "channel_chunk"})
    if ignored:
        warnings.warn(f"rasterize: ignoring unknown arguments {ignored}.", stacklevel=3)


def _check_inputs(
    means, quats, scales, covars, opacities, colors, viewmats, Ks, width, height, sh_degree, tile_size,
    backgrounds, render_mode, rasterize_mode, D_in,
) -> None:
    """Raise ``ValueError`` naming the argument when shapes or options do not match gsplat's."""
    N, C = means.shape[0], viewmats.shape[0]
    expected = {
        "means": (means, (N, 3)),
        "opacities": (opacities, (N,)),
        "viewmats": (viewmats, (C, 4, 4)),
        "Ks": (Ks, (C, 3, 3)),
    }
    if covars is None:
        expected.update(quats=(quats, (N, 4)), scales=(scales, (N, 3)))
    else:
        expected.update(covars=(covars, (N, 3, 3)))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"rasterize: {name} must have shape {shape}, got {tuple(tensor.shape)}.")
    if sh_degree is None:
        ok = (colors.dim() == 2 and colors.shape[0] == N) or (
            colors.dim() == 3 and tuple(colors.shape[:2]) == (C, N)
        )
        if not ok:
            raise ValueError(
                f"rasterize: colors must be [N, D] or [C, N, D] when sh_degree is None, got "
                f"{tuple(colors.shape)} (N={N}, C={C})."
            )
    else:
        ok = (colors.dim() == 3 and colors.shape[0] == N and colors.shape[2] == 3) or (
            colors.dim() == 4 and tuple(colors.shape[:2]) == (C, N) and colors.shape[3] == 3
        )
        if not ok:
            raise ValueError(
                f"rasterize: colors must be SH coefficients [N, K, 3] or [C, N, K, 3] when "
                f"sh_degree is set, got {tuple(colors.shape)}."
            )
        if not 0 <= sh_degree <= 3:
            raise ValueError(f"rasterize: sh_degree must be in 0..3, got {sh_degree}.")
        if (sh_degree + 1) ** 2 > colors.shape[-2]:
            raise ValueError(
                f"rasterize: sh_degree={sh_degree} needs {(sh_degree + 1) ** 2} SH "
                f"coefficients, colors has {colors.shape[-2]}."
            )
    if render_mode not in RENDER_MODES:
        raise ValueError(f"rasterize: render_mode must be one of {RENDER_MODES}, got {render_mode!r}.")
    if rasterize_mode not in RASTERIZE_MODES:
        raise ValueError(
            f"rasterize: rasterize_mode must be one of {RASTERIZE_MODES}, got {rasterize_mode!r}."
        )
    if width <= 0 or height <= 0 or tile_size <= 0:
        raise ValueError(
            f"rasterize: width, height, tile_size must be positive, got {width}, {height}, {tile_size}."
        )
    if backgrounds is not None:
        D = 3 if sh_degree is not None else D_in
        if tuple(backgrounds.shape) != (C, D):
            raise ValueError(
                f"rasterize: backgrounds must be [C, D] = {(C, D)}, got {tuple(backgrounds.shape)}."
            )


TORCH_KERNELS = Kernels(composite, project_gaussians, eval_sh)
"""The pure-PyTorch stages: the reference every other path is tested against."""
CPP_KERNELS = Kernels(composite_cpp, project_gaussians_fast, eval_sh_cpp)
"""The compiled compositor and SH, with the element-wise projection."""


def rasterize_torch(*args, **kwargs) -> tuple[Tensor, Tensor, dict]:
    """The pure-PyTorch rasterizer (the reference): :func:`rasterize_with` with :data:`TORCH_KERNELS`."""
    return rasterize_with(TORCH_KERNELS, *args, **kwargs)


def rasterize_cpp(*args, **kwargs) -> tuple[Tensor, Tensor, dict]:
    """:func:`rasterize_torch` (same arguments, results, ``info``) with :data:`CPP_KERNELS`.

    Needs the compiled library (:func:`gvae_ns.render.extension.load_extension`); it raises
    ``RuntimeError`` when the library cannot be built.
    """
    return rasterize_with(CPP_KERNELS, *args, **kwargs)
