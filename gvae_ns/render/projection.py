"""EWA projection of 3D Gaussians into pinhole cameras (PyTorch), and nerfstudio's camera convention.

:func:`project_gaussians` mirrors gsplat 1.4.0's ``fully_fused_projection`` with batched matmuls (the
reference); :func:`project_gaussians_fast` is the same formulas element-wise over ``[C, N]``, which
the compiled path uses: the reference's einsum / bmm over ``N`` tiny matrices costs as much as the
whole compiled compositor on CPU, while a few dozen element-wise ops run in milliseconds, forward and
backward (``scripts/bench_render_cpp.py``). Both cull with ``radii == 0``: near/far planes, a
non-positive 2D determinant, ``radius <= radius_clip``, and radius boxes off the image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gvae_ns.render.contract import Projection


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

    depth_ok, z_safe, (fx, fy, cx, cy), tx, ty = _clamped_camera_point(x, y, z, Ks, width, height, near_plane,
                                                                       far_plane)
    zero = torch.zeros_like(z)
    J = torch.stack(
        [fx / z_safe, zero, -fx * tx / z_safe**2, zero, fy / z_safe, -fy * ty / z_safe**2], dim=-1
    ).reshape(*z.shape, 2, 3)
    cov2d = J @ covars_c @ J.transpose(-1, -2)  # [C, N, 2, 2]
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)

    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    return _blurred_projection(a, b, c, means2d, z, depth_ok, width, height, eps2d, radius_clip, calc_compensations)


def project_gaussians_fast(
    means: Tensor, covars: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int, eps2d: float = 0.3,
    near_plane: float = 0.01, far_plane: float = 1e10, radius_clip: float = 0.0, calc_compensations: bool = False,
) -> Projection:
    """:func:`project_gaussians` (gsplat's EWA projection) written element-wise over ``[C, N]``."""
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    # unbind, not indexing: the backward of each index op would fill a zero tensor of the input's size
    mx, my, mz = (v.unsqueeze(0) for v in means.unbind(-1))  # [1, N]
    r = [[R[:, i, j, None] for j in range(3)] for i in range(3)]  # [C, 1]
    x = r[0][0] * mx + r[0][1] * my + r[0][2] * mz + t[:, 0, None]
    y = r[1][0] * mx + r[1][1] * my + r[1][2] * mz + t[:, 1, None]
    z = r[2][0] * mx + r[2][1] * my + r[2][2] * mz + t[:, 2, None]
    flat = [v.unsqueeze(0) for v in covars.reshape(-1, 9).unbind(-1)]  # [1, N]
    cov = [flat[3 * i : 3 * i + 3] for i in range(3)]
    # A = R Sigma, then Sigma_c = A R^T (symmetric: six entries)
    A = [[r[i][0] * cov[0][k] + r[i][1] * cov[1][k] + r[i][2] * cov[2][k] for k in range(3)] for i in range(3)]

    def cc(i: int, l: int) -> Tensor:
        return A[i][0] * r[l][0] + A[i][1] * r[l][1] + A[i][2] * r[l][2]

    c00, c01, c02, c11, c12, c22 = cc(0, 0), cc(0, 1), cc(0, 2), cc(1, 1), cc(1, 2), cc(2, 2)

    depth_ok, z_safe, (fx, fy, cx, cy), tx, ty = _clamped_camera_point(x, y, z, Ks, width, height, near_plane,
                                                                       far_plane)
    # J = [[j00, 0, j02], [0, j11, j12]]
    j00, j11 = fx / z_safe, fy / z_safe
    j02, j12 = -fx * tx / z_safe**2, -fy * ty / z_safe**2
    a = j00 * j00 * c00 + 2 * j00 * j02 * c02 + j02 * j02 * c22
    b = j00 * j11 * c01 + j00 * j12 * c02 + j02 * j11 * c12 + j02 * j12 * c22
    c = j11 * j11 * c11 + 2 * j11 * j12 * c12 + j12 * j12 * c22
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)

    return _blurred_projection(a, b, c, means2d, z, depth_ok, width, height, eps2d, radius_clip, calc_compensations)


def _clamped_camera_point(x: Tensor, y: Tensor, z: Tensor, Ks: Tensor, width: int, height: int, near_plane: float,
                          far_plane: float):
    """What both projections need of camera-space centres ``x, y, z [C, N]``: the near/far mask, a safe depth,
    the intrinsics ``(fx, fy, cx, cy)`` as ``[C, 1]`` and the centre clamped to 1.3x the field of view (where
    gsplat evaluates the perspective Jacobian)."""
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
    return depth_ok, z_safe, (fx, fy, cx, cy), tx, ty


def _blurred_projection(a: Tensor, b: Tensor, c: Tensor, means2d: Tensor, depths: Tensor, depth_ok: Tensor,
                        width: int, height: int, eps2d: float, radius_clip: float,
                        calc_compensations: bool) -> Projection:
    """From the 2D covariance ``[[a, b], [b, c]]``: the ``eps2d`` blur, conics, anti-aliasing compensation,
    the 3-sigma radius and the culling (both projections end here)."""
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
        compensations = torch.where(pos, torch.sqrt(torch.where(pos, ratio, torch.ones_like(ratio))),
                                    torch.zeros_like(ratio))
    with torch.no_grad():
        half_trace = 0.5 * (a + c)
        v1 = half_trace + torch.sqrt(torch.clamp(half_trace**2 - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(v1))
        px, py = means2d.unbind(-1)
        visible = (
            depth_ok & det_ok & (radius > radius_clip)
            & (px + radius > 0) & (px - radius < width) & (py + radius > 0) & (py - radius < height)
        )
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
    return Projection(radii, means2d, depths, conics, compensations)


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
