"""Render 3D Gaussians: gsplat's CUDA rasterizer on CUDA tensors, a CPU one elsewhere.

:func:`rasterize` is the one call the rest of the package uses. It has the signature and the
semantics of ``gsplat.rendering.rasterization`` (gsplat 1.4.0) and dispatches on the device of
``means``. On CPU, :func:`rasterize_with` does the projection in PyTorch and hands the tiles to a
compositor: the compiled one of :mod:`gvae_ns.render_cpp` (the default, see :func:`cpu_rasterizer`)
or this module's pure-PyTorch :func:`composite` (:func:`rasterize_torch`, the reference and the
fallback). Both follow gsplat's math step by step:

* projection: EWA with the clamped perspective Jacobian, ``eps2d`` blur, optional
  anti-aliasing compensation, ``radius = ceil(3 sqrt(lambda_max))``, near/far and image culling;
* intersection: a Gaussian touches the pixels of the 16x16 tiles its radius box overlaps (as
  gsplat's ``isect_tiles``), narrowed to the ellipse where its alpha can reach ``1/255``;
* compositing: ``alpha = min(0.999, o exp(-sigma))``, pairs with ``alpha < 1/255`` skipped, front
  to back by depth, a pixel stops before the Gaussian that would take its transmittance to
  ``<= 1e-4``.

Nothing is dense in ``N x H*W``. The image is cut into 4x4-pixel blocks; each block gets the
depth-sorted list of the Gaussians whose ``alpha >= 1/255`` ellipse reaches one of its pixels
(exact ellipse/box test). In the PyTorch compositor, blocks with lists of similar length are
padded into ``[B, 16, K]`` batches in which every step is a dense tensor op: ``log(opacity) - sigma`` is a quadratic in the
pixel offset, so all exponents come from one matmul; transmittance is a ``cumsum`` of
``log(1 - alpha)`` along ``K``. Compositing is a ``torch.autograd.Function`` with a hand-written
backward that keeps only the block lists (cut after each block's last contributing Gaussian) and
recomputes the rest, so memory stays bounded (``MAX_ENTRIES_PER_CHUNK``) and the view-space
gradient ``info["means2d"].grad`` (and ``.absgrad``) is what gsplat's ``DefaultStrategy`` expects.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Literal

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
RasterizeMode = Literal["classic", "antialiased"]

ALPHA_MIN = 1.0 / 255.0
"""Pairs whose alpha is below this are skipped (as in gsplat)."""
ALPHA_MAX = 0.999
"""Alpha is clamped to this."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel stops before the Gaussian that would bring its transmittance to or below this."""
BLOCK = 4
"""Side in pixels of the blocks composited densely against their depth-sorted Gaussian lists."""
MAX_ENTRIES_PER_CHUNK = 1 << 20
"""(pixel, Gaussian) entries evaluated at once; bounds the temporary memory of a render."""
_PAD_SIZES = sorted({math.ceil(1.2**k) for k in range(120)})

_RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
_RASTERIZE_MODES = ("classic", "antialiased")


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
    compensations: Optional[Tensor]
    """``[C, N]`` anti-aliasing opacity factor, or None when not requested."""


def rasterize(means: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor, Dict]:
    """Render with ``gsplat.rasterization`` when ``means`` is on CUDA, else with the CPU rasterizer.

    Arguments and return values are those of ``gsplat.rendering.rasterization`` (every path has its
    defaults); keyword arguments only gsplat knows go to gsplat unchanged on CUDA. On CPU the
    compiled rasterizer (:func:`gvae_ns.render_cpp.rasterize_cpp`) runs unless it cannot be built
    or ``GVAE_RASTERIZER=torch`` asks for :func:`rasterize_torch`; one log line says which runs.
    """
    if means.is_cuda:
        from gsplat import rasterization

        return rasterization(means, *args, **kwargs)
    return cpu_rasterizer()(means, *args, **kwargs)


RASTERIZER_ENV = "GVAE_RASTERIZER"
"""Environment variable choosing the CPU path: ``cpp`` (compiled; fails if it cannot be built),
``torch`` (the pure-PyTorch reference), or unset / ``auto`` (compiled, else PyTorch)."""
_cpu_choice: Dict[str, Callable[..., Tuple[Tensor, Tensor, Dict]]] = {}


def cpu_rasterizer() -> Callable[..., Tuple[Tensor, Tensor, Dict]]:
    """The CPU rasterizer ``$GVAE_RASTERIZER`` selects (see :data:`RASTERIZER_ENV`).

    Decided once per value of the variable; the decision is logged in one line, so a fallback to
    the slower PyTorch path is never silent.
    """
    choice = os.environ.get(RASTERIZER_ENV, "auto").strip().lower() or "auto"
    if choice in _cpu_choice:
        return _cpu_choice[choice]
    if choice not in ("auto", "cpp", "torch"):
        raise ValueError(f"{RASTERIZER_ENV} must be 'cpp', 'torch' or 'auto', got {choice!r}.")
    if choice == "torch":
        fn, line = rasterize_torch, f"pure PyTorch ({RASTERIZER_ENV}=torch)"
    else:
        from gvae_ns import render_cpp

        t0 = time.perf_counter()
        ext = render_cpp.load_extension()
        seconds = time.perf_counter() - t0
        if ext is not None:
            fn = render_cpp.rasterize_cpp
            n = torch.get_num_threads()
            line = f"compiled C++ ({n} thread{'s' if n != 1 else ''}"
            line += f", built/loaded in {seconds:.0f} s)" if seconds > 2 else ")"
        elif choice == "cpp":
            raise RuntimeError(
                f"{RASTERIZER_ENV}=cpp but the compiled CPU rasterizer cannot be built: {render_cpp.build_error()}"
            )
        else:
            fn = rasterize_torch
            line = (f"pure PyTorch, several times slower: the C++ one cannot be built "
                    f"({render_cpp.build_error()}); set {RASTERIZER_ENV}=torch to silence this")
    _log(f"gvae-ns CPU rasterizer: {line}")
    _cpu_choice[choice] = fn
    return fn


def _log(line: str) -> None:
    try:
        from nerfstudio.utils.rich_utils import CONSOLE

        CONSOLE.print(line, highlight=False)
    except ImportError:
        print(line, file=sys.stderr)


def rasterize_torch(*args, **kwargs) -> Tuple[Tensor, Tensor, Dict]:
    """The pure-PyTorch rasterizer (the reference): :func:`rasterize_with` with :data:`TORCH_KERNELS`."""
    return rasterize_with(TORCH_KERNELS, *args, **kwargs)


class Kernels(NamedTuple):
    """The stages :func:`rasterize_with` runs; each has the signature of this module's function."""

    composite: Callable[..., Tuple[Tensor, Tensor]]
    """As :func:`composite`."""
    covariance: Callable[[Tensor, Tensor], Tensor]
    """As :func:`quat_scale_to_covar`."""
    project: Callable[..., "Projection"]
    """As :func:`project_gaussians`."""
    sh: Callable[[int, Tensor, Tensor], Tensor]
    """As :func:`eval_sh`."""


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
    sh_degree: Optional[int] = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: RenderMode = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: RasterizeMode = "classic",
    **unused,
) -> Tuple[Tensor, Tensor, Dict]:
    """Differentiable equivalent of ``gsplat.rendering.rasterization`` (pinhole) on any device.

    ``kernels`` are the stages: this module's PyTorch functions (:data:`TORCH_KERNELS`, the
    reference) or :data:`gvae_ns.render_cpp.CPP_KERNELS` (the compiled compositor).

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
        covars = kernels.covariance(quats, scales)

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
    info: Dict = {}
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
    tiles_per_gauss = _tiles_per_gauss(means2d.detach(), radii, tile_size, tile_width, tile_height)
    info.update(
        tiles_per_gauss=tiles_per_gauss[radii > 0] if packed else tiles_per_gauss,
        width=width,
        height=height,
        tile_size=tile_size,
        tile_width=tile_width,
        tile_height=tile_height,
        n_cameras=C,
    )
    return render_colors, render_alphas, info


def _check_unused(unused: Dict) -> None:
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
    if render_mode not in _RENDER_MODES:
        raise ValueError(f"rasterize: render_mode must be one of {_RENDER_MODES}, got {render_mode!r}.")
    if rasterize_mode not in _RASTERIZE_MODES:
        raise ValueError(
            f"rasterize: rasterize_mode must be one of {_RASTERIZE_MODES}, got {rasterize_mode!r}."
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


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances ``R S S R^T`` from (unnormalised, wxyz) quaternions and scales: ``[N,3,3]``."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quats.shape[:-1], 3, 3)
    M = R * scales.unsqueeze(-2)
    return M @ M.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    covars: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
) -> Projection:
    """EWA-project ``N`` Gaussians (``means [N,3]``, ``covars [N,3,3]``) into ``C`` pinhole cameras.

    Mirrors gsplat 1.4.0's ``fully_fused_projection`` (packed=False). Culled entries get
    ``radii == 0``; their other outputs are finite but meaningless, and receive no gradient.
    """
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t.unsqueeze(1)  # [C, N, 3]
    covars_c = torch.einsum("cij,njk,clk->cnil", R, covars, R)  # [C, N, 3, 3]
    x, y, z = means_c.unbind(-1)

    depth_ok = (z >= near_plane) & (z <= far_plane) & (z != 0)
    z_safe = torch.where(depth_ok, z, torch.ones_like(z))
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = z_safe * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / z_safe))
    ty = z_safe * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / z_safe))
    zero = torch.zeros_like(z)
    J = torch.stack(
        [fx / z_safe, zero, -fx * tx / z_safe**2, zero, fy / z_safe, -fy * ty / z_safe**2], dim=-1
    ).reshape(*z.shape, 2, 3)
    cov2d = J @ covars_c @ J.transpose(-1, -2)  # [C, N, 2, 2]
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)

    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    det_ok = det > 0
    det_safe = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)
    compensations = None
    if calc_compensations:
        ratio = det_orig / det_safe
        pos = ratio > 0
        compensations = torch.where(pos, torch.sqrt(torch.where(pos, ratio, torch.ones_like(ratio))), zero)

    with torch.no_grad():
        half_trace = 0.5 * (a + c)
        v1 = half_trace + torch.sqrt(torch.clamp(half_trace**2 - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(v1))
        mx, my = means2d.unbind(-1)
        visible = (
            depth_ok
            & det_ok
            & (radius > radius_clip)
            & (mx + radius > 0)
            & (mx - radius < width)
            & (my + radius > 0)
            & (my - radius < height)
        )
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
    return Projection(radii, means2d, z, conics, compensations)


_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (
    1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396,
)
_SH_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis (gsplat/3DGS sign convention) of unit directions ``[..., 3]`` -> ``[..., (d+1)^2]``."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, _SH_C0)]
    if degree >= 1:
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _SH_C2[0] * x * y,
            _SH_C2[1] * y * z,
            _SH_C2[2] * (2 * zz - xx - yy),
            _SH_C2[3] * x * z,
            _SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            _SH_C3[0] * y * (3 * xx - yy),
            _SH_C3[1] * x * y * z,
            _SH_C3[2] * y * (4 * zz - xx - yy),
            _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _SH_C3[4] * x * (4 * zz - xx - yy),
            _SH_C3[5] * z * (xx - yy),
            _SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Colour ``[..., 3]`` of SH ``coeffs [..., K, 3]`` (first ``(degree+1)^2`` used) along ``dirs [..., 3]``."""
    n_bases = (degree + 1) ** 2
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))
    return torch.matmul(basis.unsqueeze(-2), coeffs[..., :n_bases, :]).squeeze(-2)


def _tiles_per_gauss(
    means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int
) -> Tensor:
    """Number of tiles each projected Gaussian touches (gsplat's ``tiles_per_gauss``): ``[C, N]`` int32."""
    x0, x1, y0, y1 = _tile_box(means2d, radii, tile_size, tile_width, tile_height)
    return ((x1 - x0) * (y1 - y0) * (radii > 0)).to(torch.int32)


def _tile_box(means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int):
    """Tile index ranges ``[x0, x1) x [y0, y1)`` of each Gaussian's radius box, as ``isect_tiles``."""
    r = radii.to(means2d.dtype) / tile_size
    tx, ty = (means2d / tile_size).unbind(-1)
    x0 = torch.floor(tx - r).clamp(0, tile_width).long()
    x1 = torch.ceil(tx + r).clamp(0, tile_width).long()
    y0 = torch.floor(ty - r).clamp(0, tile_height).long()
    y1 = torch.ceil(ty + r).clamp(0, tile_height).long()
    return x0, x1, y0, y1


def composite(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    backgrounds: Optional[Tensor] = None,
    tile_size: int = 16,
    absgrad_sink: Optional[Callable[[Tensor], None]] = None,
) -> Tuple[Tensor, Tensor]:
    """Alpha-composite projected Gaussians front to back: ``[C,H,W,D]`` colours, ``[C,H,W,1]`` alphas.

    Inputs are per camera: ``means2d [C,N,2]``, ``conics [C,N,3]``, ``colors [C,N,D]``,
    ``opacities [C,N]``, ``radii [C,N]`` (0 = skip), ``depths [C,N]`` (sort key only),
    ``backgrounds [C,D]``. ``absgrad_sink`` receives the ``[C,N,2]`` sum over pixels of absolute
    per-pixel gradients of ``means2d`` during backward.
    """
    tensors = (means2d, conics, colors, opacities, backgrounds)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _Composite.apply(
        means2d, conics, colors, opacities, backgrounds, radii, depths.detach(),
        width, height, tile_size, absgrad_sink, differentiable,
    )


def _block_lists(
    means2d: Tensor, conics: Tensor, opacities: Tensor, radii: Tensor, depths: Tensor,
    width: int, height: int, tile_size: int,
) -> Tuple[Tensor, Tensor]:
    """(Gaussian, block) pairs in (camera, block, depth) order, as flat ``C*N`` and ``C*n_blocks`` ids.

    A Gaussian is listed in a block when some pixel centre of the block lies both in the tiles its
    radius box touches (gsplat's ``isect_tiles``) and in the ellipse where ``alpha >= 1/255``.
    """
    C, N = radii.shape
    device = means2d.device
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    blocks_x, blocks_y = math.ceil(width / BLOCK), math.ceil(height / BLOCK)
    gauss, block = [], []
    for cam in range(C):
        live = (radii[cam] > 0) & (opacities[cam] >= ALPHA_MIN)
        idx = torch.nonzero(live).squeeze(1)
        idx = idx[torch.argsort(depths[cam, idx], stable=True)]  # front to back, ties by index
        m2, con, op = means2d[cam, idx], conics[cam, idx], opacities[cam, idx]
        tx0, tx1, ty0, ty1 = _tile_box(m2, radii[cam, idx], tile_size, tile_width, tile_height)
        det_conic = (con[:, 0] * con[:, 2] - con[:, 1] ** 2).clamp_min(1e-30)
        level = torch.log(op / ALPHA_MIN).clamp_min(0)  # alpha >= 1/255  <=>  sigma <= level
        ex = torch.sqrt(2.0 * level * con[:, 2] / det_conic)
        ey = torch.sqrt(2.0 * level * con[:, 0] / det_conic)
        # pixel ranges [x0, x1) x [y0, y1), one pixel of margin around the ellipse's box
        x0 = torch.maximum(tx0 * tile_size, torch.floor(m2[:, 0] - ex - 0.5).long())
        x1 = torch.minimum((tx1 * tile_size).clamp_max(width), torch.floor(m2[:, 0] + ex - 0.5).long() + 2)
        y0 = torch.maximum(ty0 * tile_size, torch.floor(m2[:, 1] - ey - 0.5).long())
        y1 = torch.minimum((ty1 * tile_size).clamp_max(height), torch.floor(m2[:, 1] + ey - 0.5).long() + 2)
        bx0, by0 = torch.div(x0, BLOCK, rounding_mode="floor"), torch.div(y0, BLOCK, rounding_mode="floor")
        nx = ((torch.div(x1 + BLOCK - 1, BLOCK, rounding_mode="floor") - bx0) * (x1 > x0)).clamp_min(0)
        ny = ((torch.div(y1 + BLOCK - 1, BLOCK, rounding_mode="floor") - by0) * (y1 > y0)).clamp_min(0)
        counts = nx * ny
        g = torch.repeat_interleave(torch.arange(idx.numel(), device=device), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        local = torch.arange(g.numel(), device=device) - first  # index inside the Gaussian's block box
        ints = _take(torch.stack([bx0, by0, nx, x0, x1, y0, y1], dim=1), g)
        floats = _take(torch.cat([m2, con, level[:, None]], dim=1), g)
        bx0_g, by0_g, nx_g, x0_g, x1_g, y0_g, y1_g = ints.unbind(1)
        mx, my, con_g, level_g = floats[:, 0], floats[:, 1], floats[:, 2:5], floats[:, 5]
        bx = bx0_g + local % nx_g
        by = by0_g + torch.div(local, nx_g, rounding_mode="floor")
        # pixel centres of the block that are in the Gaussian's pixel range, then the exact test
        lo_x = torch.maximum(bx * BLOCK, x0_g).to(m2.dtype) + 0.5
        hi_x = torch.minimum(bx * BLOCK + BLOCK, x1_g).to(m2.dtype) - 0.5
        lo_y = torch.maximum(by * BLOCK, y0_g).to(m2.dtype) + 0.5
        hi_y = torch.minimum(by * BLOCK + BLOCK, y1_g).to(m2.dtype) - 0.5
        min_sigma = _min_sigma_in_box(con_g, mx - hi_x, mx - lo_x, my - hi_y, my - lo_y)
        reach = torch.nonzero(min_sigma <= level_g * (1 + 1e-5) + 1e-6).squeeze(1)
        gauss.append(_take(idx, _take(g, reach)) + cam * N)
        block.append(_take(by * blocks_x + bx, reach) + cam * blocks_x * blocks_y)
    gauss, block = torch.cat(gauss), torch.cat(block)
    order = torch.argsort(block, stable=True)  # pairs were listed depth-major within a camera
    return _take(gauss, order), _take(block, order)


def _min_sigma_in_box(conics: Tensor, lx: Tensor, hx: Tensor, ly: Tensor, hy: Tensor) -> Tensor:
    """Minimum of ``0.5 d^T [[a, b], [b, c]] d`` over boxes ``d in [lx, hx] x [ly, hy]`` (per row)."""
    a, b, c = conics.unbind(-1)

    def sigma(dx: Tensor, dy: Tensor) -> Tensor:
        return 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy

    def along_y(dx: Tensor) -> Tensor:  # edge dx = const, best dy on it
        return sigma(dx, torch.minimum(torch.maximum(-b * dx / c, ly), hy))

    def along_x(dy: Tensor) -> Tensor:
        return sigma(torch.minimum(torch.maximum(-b * dy / a, lx), hx), dy)

    edges = torch.minimum(torch.minimum(along_y(lx), along_y(hx)), torch.minimum(along_x(ly), along_x(hy)))
    inside = (lx <= 0) & (hx >= 0) & (ly <= 0) & (hy >= 0)
    return torch.where(inside, torch.zeros_like(edges), edges)


def _chunks(gauss: Tensor, block: Tensor, null: int):
    """Group blocks by their padded list length into ``(block ids [B], Gaussian ids [B, K])`` chunks.

    ``gauss`` / ``block`` list each block's Gaussians contiguously, front to back. Lists are padded
    with ``null`` (an index whose opacity is zero) up to sizes growing by ~1.2x, and each chunk
    holds at most ``MAX_ENTRIES_PER_CHUNK`` pixel-Gaussian entries.
    """
    device = gauss.device
    if block.numel() == 0:
        return []
    starts = torch.ones_like(block, dtype=torch.bool)
    starts[1:] = block[1:] != block[:-1]
    run = torch.cumsum(starts, 0) - 1  # run (= block list) of each pair
    run_start = torch.nonzero(starts).squeeze(1)
    run_len = torch.diff(run_start, append=torch.tensor([block.numel()], device=device))
    slot = torch.arange(block.numel(), device=device) - _take(run_start, run)
    sizes = torch.tensor(_PAD_SIZES, device=device)
    run_size = _take(sizes, torch.searchsorted(sizes, run_len))
    # runs ordered by padded size; the pairs of run r go to row rank[r] of its size's matrix
    run_order = torch.argsort(run_size, stable=True)
    ordered_size = _take(run_size, run_order)
    size_values, size_counts = torch.unique_consecutive(ordered_size, return_counts=True)
    first_of_size = torch.cumsum(size_counts, 0) - size_counts
    rank = torch.empty_like(run_order)
    rank[run_order] = torch.arange(run_order.numel(), device=device)
    size_id = torch.searchsorted(size_values, run_size)
    row = rank - _take(first_of_size, size_id)
    pair_size_id = _take(size_id, run)
    pair_order = torch.argsort(pair_size_id, stable=True)
    pair_counts = torch.bincount(pair_size_id, minlength=size_values.numel()).tolist()
    out = []
    for sid, (size, n_runs, pairs) in enumerate(
        zip(size_values.tolist(), size_counts.tolist(), torch.split(pair_order, pair_counts))
    ):
        runs = run_order[first_of_size[sid] : first_of_size[sid] + n_runs]
        lists = torch.full((n_runs, size), null, dtype=torch.long, device=device)
        lists.index_put_((_take(row, _take(run, pairs)), _take(slot, pairs)), _take(gauss, pairs))
        blocks = _take(block, _take(run_start, runs))
        step = max(1, MAX_ENTRIES_PER_CHUNK // (BLOCK * BLOCK * size))
        for start in range(0, n_runs, step):
            out.append((blocks[start : start + step], lists[start : start + step]))
    return out


class _Entries(NamedTuple):
    """Per-chunk quantities shared by forward and backward; ``[B, P, K]`` unless noted."""

    pixel: Tensor
    """``[B, P]`` flat pixel id (``null_pixel`` for pixels outside the image)."""
    u: Tensor
    """``[B, K]`` Gaussian centre x relative to the block's first pixel centre."""
    v: Tensor
    """``[B, K]`` same for y."""
    params: Tensor
    """``[B, K, 6]`` mean x, mean y, conic a, b, c, opacity."""
    raw: Tensor
    """``opacity * exp(-sigma)`` before clamping."""
    alpha: Tensor
    """Clamped alpha, 0 where skipped."""
    trans: Tensor
    """Transmittance in front of the entry."""
    weight: Tensor
    """``alpha * trans`` where the entry contributes, else 0."""
    contributes: Tensor
    """Bool: the pixel had not stopped before this entry."""


def _take(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a table indexed along dim 0 (``index_select`` is faster on CPU)."""
    return torch.index_select(table, 0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def _block_basis(device, dtype) -> Tensor:
    """``[P, 6]`` monomials ``(1, qx, qy, qx^2, qx qy, qy^2)`` of the pixel offsets inside a block."""
    q = torch.arange(BLOCK, device=device, dtype=dtype)
    qy, qx = torch.meshgrid(q, q, indexing="ij")
    qx, qy = qx.reshape(-1), qy.reshape(-1)
    return torch.stack([torch.ones_like(qx), qx, qy, qx * qx, qx * qy, qy * qy], dim=-1)


def _entries(tab: Tensor, blocks: Tensor, lists: Tensor, width: int, height: int, n_cam_blocks: int,
             null_pixel: int, box: Optional[Tensor]) -> _Entries:
    """Evaluate every (pixel of a block, Gaussian of its list) entry of one chunk.

    With pixel offsets ``q`` inside a block and ``(u, v)`` the centre relative to the block,
    ``log(opacity) - sigma`` is a quadratic in ``q``; all ``[B, P, K]`` exponents come out of one
    matmul of the monomials of ``q`` with six per-(block, Gaussian) coefficients.
    """
    device, dtype = tab.device, tab.dtype
    blocks_x = math.ceil(width / BLOCK)
    cam = torch.div(blocks, n_cam_blocks, rounding_mode="floor")
    local = blocks - cam * n_cam_blocks
    bx = (local % blocks_x) * BLOCK
    by = torch.div(local, blocks_x, rounding_mode="floor") * BLOCK
    basis = _block_basis(device, torch.long)
    px = bx[:, None] + basis[:, 1]
    py = by[:, None] + basis[:, 2]
    inside = (px < width) & (py < height)
    pixel = torch.where(inside, cam[:, None] * (width * height) + py * width + px, null_pixel)

    params = _take(tab, lists)  # [B, K, 6]
    mx, my, a, b, c, op = params.unbind(-1)
    u = mx - (bx.to(dtype) + 0.5)[:, None]
    v = my - (by.to(dtype) + 0.5)[:, None]
    log_op = torch.where(op > 0, torch.log(op.clamp_min(1e-30)), torch.full_like(op, -1e4))
    au_bv, cv_bu = a * u + b * v, c * v + b * u
    coef = torch.stack(
        [log_op - 0.5 * (u * au_bv + v * cv_bu), au_bv, cv_bu, -0.5 * a, -b, -0.5 * c], dim=1
    )  # [B, 6, K]: log(opacity) - sigma in the monomials of q
    raw = torch.exp(torch.matmul(basis.to(dtype), coef))  # [B, P, K]
    hit = raw >= ALPHA_MIN
    if box is not None:  # blocks straddle gsplat tiles: apply each Gaussian's tile box per pixel
        x0, x1, y0, y1 = _take(box, lists).unsqueeze(1).unbind(-1)
        hit &= (px[:, :, None] >= x0) & (px[:, :, None] < x1) & (py[:, :, None] >= y0) & (py[:, :, None] < y1)
    # (multiplying by boolean masks is much faster than masked_fill_ / where on CPU)
    alpha = raw.clamp_max(ALPHA_MAX).mul_(hit)
    log_t = torch.log1p(-alpha)
    cum = torch.cumsum(log_t, dim=-1)
    trans = torch.exp(cum - log_t)
    contributes = cum > math.log(TRANSMITTANCE_MIN)
    weight = (alpha * trans).mul_(contributes)
    return _Entries(pixel, u, v, params, raw, alpha, trans, weight, contributes)


class _Composite(torch.autograd.Function):
    """Blockwise front-to-back compositing with an analytic, recomputing backward."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, radii, depths, width, height,
                tile_size, absgrad_sink, differentiable):
        C, N, D = colors.shape
        HW = height * width
        n_cam_blocks = math.ceil(width / BLOCK) * math.ceil(height / BLOCK)
        gauss, block = _block_lists(means2d, conics, opacities, radii, depths, width, height, tile_size)
        chunks = _chunks(gauss, block, null=C * N)
        tab, box = _gauss_table(means2d, conics, opacities, radii, tile_size, width, height)
        flat_colors = torch.cat([colors.reshape(C * N, D), colors.new_zeros(1, D)])

        out = colors.new_zeros(C * HW + 1, D)
        acc = colors.new_zeros(C * HW + 1)
        kept_gauss, kept_block = [], []
        for blocks, lists in chunks:
            e = _entries(tab, blocks, lists, width, height, n_cam_blocks, C * HW, box)
            pix = e.pixel.reshape(-1)
            out.index_copy_(0, pix, torch.bmm(e.weight, _take(flat_colors, lists)).reshape(-1, D))
            acc.index_copy_(0, pix, e.weight.sum(-1).reshape(-1))
            if differentiable:  # backward only needs each list up to its last contributing Gaussian
                k = torch.arange(1, lists.shape[1] + 1, device=lists.device)
                length = ((e.weight.amax(1) > 0) * k).amax(1, keepdim=True)
                keep = k <= length
                kept_gauss.append(lists[keep])
                kept_block.append(blocks.unsqueeze(1).expand_as(lists)[keep])
        out, acc = out[:-1], acc[:-1]
        if differentiable and kept_gauss:
            chunks = _chunks(torch.cat(kept_gauss), torch.cat(kept_block), null=C * N)
        t_final = 1.0 - acc
        if backgrounds is not None:
            out = out + (t_final.view(C, HW, 1) * backgrounds.view(C, 1, D)).view(C * HW, D)

        ctx.save_for_backward(means2d, conics, colors, opacities, backgrounds, radii, t_final)
        ctx.chunks = chunks
        ctx.shape = (C, N, D, width, height, tile_size)
        ctx.absgrad_sink = absgrad_sink
        return out.view(C, height, width, D), acc.view(C, height, width, 1)

    @staticmethod
    def backward(ctx, v_render, v_alphas):
        means2d, conics, colors, opacities, backgrounds, radii, t_final = ctx.saved_tensors
        C, N, D, width, height, tile_size = ctx.shape
        HW = height * width
        n_cam_blocks = math.ceil(width / BLOCK) * math.ceil(height / BLOCK)
        tab, box = _gauss_table(means2d, conics, opacities, radii, tile_size, width, height)
        flat_colors = torch.cat([colors.reshape(C * N, D), colors.new_zeros(1, D)])
        basis_t = _block_basis(tab.device, tab.dtype).t()  # [6, P]

        # per pixel, with a zero row for pixels outside the image
        v_px = torch.cat([v_render.reshape(C * HW, D), v_render.new_zeros(1, D)])
        # d render_alpha / d t_final = -1; d colour / d t_final = background
        v_t_final = -v_alphas.reshape(C * HW)
        if backgrounds is not None:
            v_t_final = v_t_final + (v_render.reshape(C, HW, D) * backgrounds.view(C, 1, D)).sum(-1).view(-1)
        tv = torch.cat([t_final * v_t_final, t_final.new_zeros(1)])

        v_tab = tab.new_zeros(C * N + 1, 6)  # means x/y, conic a/b/c, opacity
        v_abs = tab.new_zeros(C * N + 1, 2)
        v_colors = colors.new_zeros(C * N + 1, D)
        for blocks, lists in ctx.chunks:
            e = _entries(tab, blocks, lists, width, height, n_cam_blocks, C * HW, box)
            g = _take(v_px, e.pixel)  # [B, P, D]
            v_colors.index_add_(0, lists.reshape(-1), torch.bmm(e.weight.transpose(1, 2), g).reshape(-1, D))
            dot = torch.bmm(g, _take(flat_colors, lists).transpose(1, 2))  # [B, P, K]
            wd = e.weight * dot
            later = wd.sum(-1, keepdim=True) - torch.cumsum(wd, dim=-1)
            v_alpha = e.trans * dot - (later + _take(tv, e.pixel).unsqueeze(-1)) / (1.0 - e.alpha)
            free = e.contributes & (e.alpha > 0) & (e.raw <= ALPHA_MAX)  # clamped alpha: no gradient
            h = v_alpha.mul_(free).mul_(e.raw)  # = -d loss / d sigma
            S = -torch.matmul(basis_t, h)  # [B, 6, K]: sums over pixels of dL/dsigma * monomials
            S0, Sx, Sy, Sxx, Sxy, Syy = S.unbind(1)
            mx, my, a, b, c, op = e.params.unbind(-1)
            u, v = e.u, e.v
            dx_sum, dy_sum = u * S0 - Sx, v * S0 - Sy  # sums of dL/dsigma * dx, * dy
            grads = torch.stack(
                [
                    a * dx_sum + b * dy_sum,
                    c * dy_sum + b * dx_sum,
                    0.5 * (u * u * S0 - 2 * u * Sx + Sxx),
                    u * v * S0 - u * Sy - v * Sx + Sxy,
                    0.5 * (v * v * S0 - 2 * v * Sy + Syy),
                    torch.where(op > 0, -S0 / op.clamp_min(1e-30), torch.zeros_like(op)),
                ],
                dim=-1,
            )
            v_tab.index_add_(0, lists.reshape(-1), grads.reshape(-1, 6))
            if ctx.absgrad_sink is not None:
                h_abs = h.abs_()
                lin_x = torch.matmul(basis_t[:3].t(), torch.stack([a * u + b * v, -a, -b], dim=1))
                lin_y = torch.matmul(basis_t[:3].t(), torch.stack([c * v + b * u, -b, -c], dim=1))
                absg = torch.stack([(h_abs * lin_x.abs_()).sum(1), (h_abs * lin_y.abs_()).sum(1)], dim=-1)
                v_abs.index_add_(0, lists.reshape(-1), absg.reshape(-1, 2))
        if ctx.absgrad_sink is not None:
            ctx.absgrad_sink(v_abs[:-1].view(C, N, 2))
        v_tab = v_tab[:-1]
        v_bg = None
        if backgrounds is not None and ctx.needs_input_grad[4]:
            v_bg = (v_render.reshape(C, HW, D) * t_final.view(C, HW, 1)).sum(1)
        return (
            v_tab[:, 0:2].reshape(C, N, 2), v_tab[:, 2:5].reshape(C, N, 3), v_colors[:-1].view(C, N, D),
            v_tab[:, 5].reshape(C, N), v_bg, None, None, None, None, None, None, None,
        )


def _gauss_table(
    means2d: Tensor, conics: Tensor, opacities: Tensor, radii: Tensor, tile_size: int, width: int, height: int
) -> Tuple[Tensor, Optional[Tensor]]:
    """``[C*N+1, 6]`` (mean x, mean y, conic a, b, c, opacity) with a last all-zero, invisible row.

    The second value holds each Gaussian's gsplat tile box in pixels (``[C*N+1, 4]``), needed only
    when ``BLOCK`` does not divide ``tile_size``; None otherwise.
    """
    C, N = radii.shape
    tab = torch.cat(
        [means2d.reshape(C * N, 2), conics.reshape(C * N, 3), opacities.reshape(C * N, 1)], dim=1
    )
    tab = torch.cat([tab, tab.new_zeros(1, 6)])
    box = None
    if tile_size % BLOCK:
        tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
        x0, x1, y0, y1 = _tile_box(
            means2d.reshape(C * N, 2), radii.reshape(C * N), tile_size, tile_width, tile_height
        )
        box = torch.stack([x0, x1, y0, y1], dim=-1) * tile_size
        box = torch.cat([box, box.new_zeros(1, 4)])
    return tab, box


def world_to_camera(camera_to_worlds: Tensor) -> Tensor:
    """nerfstudio camera-to-world ``[C,3,4]`` (OpenGL axes) -> gsplat world-to-camera ``[C,4,4]`` (OpenCV axes).

    The same matrix as splatfacto's ``get_viewmat``, without its ``torch.compile`` (which costs a C++ build
    on CPU and breaks when the viewer interrupts the first render).
    """
    R = camera_to_worlds[:, :3, :3] * camera_to_worlds.new_tensor([1.0, -1.0, -1.0])
    T = camera_to_worlds[:, :3, 3:4]
    R_inv = R.transpose(1, 2)
    viewmat = camera_to_worlds.new_zeros(camera_to_worlds.shape[0], 4, 4)
    viewmat[:, :3, :3] = R_inv
    viewmat[:, :3, 3:4] = -torch.bmm(R_inv, T)
    viewmat[:, 3, 3] = 1.0
    return viewmat


TORCH_KERNELS = Kernels(composite, quat_scale_to_covar, project_gaussians, eval_sh)
"""The pure-PyTorch stages: the reference every other path is tested against."""
