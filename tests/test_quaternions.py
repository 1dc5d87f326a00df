"""gvae_ns.quaternions: the algebra agrees with rotation matrices, and covariances with gsplat's."""

from __future__ import annotations

import math

import torch
from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

from gvae_ns import quaternions as quat


def _quats(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rotmat_is_orthonormal_and_matches_gsplat():
    q = quat.normalize(_quats(50))
    rot = quat.to_rotmat(q)
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), torch.eye(3, dtype=q.dtype).expand(50, 3, 3))
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(50, dtype=q.dtype))
    # a rotation of pi/2 about z takes x to y
    qz = torch.tensor([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)], dtype=torch.float64)
    torch.testing.assert_close(quat.rotate(qz, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)),
                               torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_rotate_multiply_conjugate_agree_with_matrices():
    a, b = quat.normalize(_quats(40, 1)), quat.normalize(_quats(40, 2))
    v = torch.randn(40, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(quat.rotate(a, v), (quat.to_rotmat(a) @ v[:, :, None])[..., 0])
    torch.testing.assert_close(quat.to_rotmat(quat.multiply(a, b)), quat.to_rotmat(a) @ quat.to_rotmat(b))
    torch.testing.assert_close(quat.rotate(quat.conjugate(a), quat.rotate(a, v)), v)


def test_normalize_is_canonical():
    q = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    out = quat.normalize(q)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]],
                                                 dtype=torch.float64))


def test_covariance_matches_gsplat_values_and_gradients():
    g = torch.Generator().manual_seed(4)
    quats = (_quats(64, 5) * 3).requires_grad_(True)  # any norm
    scales = (torch.rand(64, 3, generator=g, dtype=torch.float64) + 0.01).requires_grad_(True)
    ours = quat.covariance(quats, scales)
    ref, _ = _quat_scale_to_covar_preci(quats, scales, True, False)
    torch.testing.assert_close(ours, ref, atol=1e-14, rtol=1e-12)
    w = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((ours * w).sum(), (quats, scales))
    grads_ref = torch.autograd.grad((ref * w).sum(), (quats, scales))
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(quat.covariance, (quats[:8], scales[:8]))
