"""Quaternions ``(w, x, y, z)`` (gsplat's order) as tensors ``[..., 4]``, and Gaussian covariances.

Every function broadcasts over leading dims and is differentiable. :func:`normalize` gives the
canonical form (unit, ``w >= 0``) the VAE's features use; :func:`covariance` takes the renderer's
raw, any-norm quaternions and normalises them itself, as gsplat does.

The rotation matrix is written out entry by entry (:func:`_rotation_entries`) and :func:`covariance`
builds ``R S S R^T`` from those entries with element-wise products: on CPU a batched ``3 x 3`` matmul
over ``N`` tiny matrices costs about twice as much, forward and backward, for the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12

_Row = tuple[Tensor, Tensor, Tensor]


def normalize(q: Tensor) -> Tensor:
    """Unit quaternion with ``w >= 0``; a (near-)zero quaternion becomes the identity."""
    norm = q.norm(dim=-1, keepdim=True)
    identity = torch.zeros_like(q)
    identity[..., 0] = 1.0
    unit = torch.where(norm > 1e-8, q / norm.clamp_min(_EPS), identity)
    sign = torch.where(unit[..., :1] < 0, -1.0, 1.0).to(q.dtype)
    return unit * sign


def multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a * b``."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        dim=-1,
    )


def conjugate(q: Tensor) -> Tensor:
    """``(w, -x, -y, -z)``: the inverse of a unit quaternion."""
    return torch.cat([q[..., :1], -q[..., 1:]], dim=-1)


def _rotation_entries(q: Tensor) -> tuple[_Row, _Row, _Row]:
    """The nine entries of the rotation matrix of unit ``q``, as rows of ``[...]`` tensors."""
    w, x, y, z = q.unbind(-1)
    return (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )


def to_rotmat(q: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` of unit quaternions (columns = local axes)."""
    rows = _rotation_entries(q)
    return torch.stack([e for row in rows for e in row], dim=-1).reshape(*q.shape[:-1], 3, 3)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    return torch.stack((ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx), dim=-1)


def rotate(q: Tensor, v: Tensor) -> Tensor:
    """Rotate vectors ``v [..., 3]`` by unit quaternions ``q [..., 4]`` (``R(q) v``)."""
    w, u = q[..., :1], q[..., 1:]
    t = 2.0 * _cross(u, v)
    return v + w * t + _cross(u, t)


def covariance(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances ``R S S R^T`` ``[..., 3, 3]`` of raw (any-norm) quaternions and scales (not log).

    The quaternions are normalised with ``F.normalize`` (sign and norm do not change ``R``), as in
    gsplat's ``quat_scale_to_covar``.
    """
    rows = _rotation_entries(F.normalize(quats, dim=-1))
    sx, sy, sz = scales.unbind(-1)
    m = tuple((r0 * sx, r1 * sy, r2 * sz) for r0, r1, r2 in rows)  # rows of M = R diag(s)

    def dot(i: int, j: int) -> Tensor:
        return m[i][0] * m[j][0] + m[i][1] * m[j][1] + m[i][2] * m[j][2]

    c00, c01, c02, c11, c12, c22 = dot(0, 0), dot(0, 1), dot(0, 2), dot(1, 1), dot(1, 2), dot(2, 2)
    return torch.stack([c00, c01, c02, c01, c11, c12, c02, c12, c22], dim=-1).view(*quats.shape[:-1], 3, 3)
