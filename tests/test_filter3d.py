"""Mip-Splatting's 3D smoothing filter (gvae_ns/render/filter3d.py).

The sampling rate against hand-computed cases, the baking against the explicit covariance ``Sigma + 0.2/nu^2 I``
(3D, and projected to 2D by the renderer's own projection), the opacity mass.
"""

from __future__ import annotations

import math

import torch
from nerfstudio.cameras.cameras import Cameras

from gvae_ns.quaternions import covariance
from gvae_ns.render import filter3d, project_gaussians
from gvae_ns.render.filter3d import SmoothingFilter3D, apply_filter_3d, fill_unseen, max_sampling_rate


def _one_camera(fx=100.0, fy=80.0, cx=50.0, cy=40.0, W=100, H=80):
    """An OpenCV camera at the origin looking down +z (identity world-to-camera)."""
    K = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])[None]
    return torch.eye(4)[None], K, torch.tensor([W]), torch.tensor([H])


# ------------------------------------------------------------------------------------ sampling rate
def test_sampling_rate_hand_computed():
    viewmats, Ks, widths, heights = _one_camera()
    means = torch.tensor([
        [0.0, 0.0, 2.0],    # centre of the image, depth 2: max(100, 80) / 2 = 50
        [0.0, 0.0, 4.0],    # depth 4: 25
        [0.0, 0.0, -2.0],   # behind the camera
        [0.0, 0.0, 0.005],  # in front, but nearer than the near plane
        [1.2, 0.0, 2.0],    # u = 100 * 0.6 + 50 = 110: beyond the right border, inside the 15% margin (115)
        [1.4, 0.0, 2.0],    # u = 120: beyond the margin
        [0.0, -1.5, 2.0],   # v = 80 * -0.75 + 40 = -20: beyond the top margin (-12)
    ])
    nu = max_sampling_rate(means, viewmats, Ks, widths, heights)
    assert torch.allclose(nu, torch.tensor([50.0, 25.0, 0.0, 0.0, 50.0, 0.0, 0.0]))
    # without the margin the Gaussian just beyond the border is unseen
    assert max_sampling_rate(means, viewmats, Ks, widths, heights, margin=0.0)[4] == 0.0


def test_sampling_rate_is_the_max_over_cameras_and_chunking_does_not_change_it(monkeypatch):
    viewmats, Ks, widths, heights = _one_camera()
    closer = viewmats.clone()
    closer[0, 2, 3] = -1.0  # the second camera is one unit nearer the scene (depth 1 instead of 2)
    viewmats, Ks = torch.cat([viewmats, closer]), Ks.repeat(2, 1, 1)
    widths, heights = widths.repeat(2), heights.repeat(2)
    nu = max_sampling_rate(torch.tensor([[0.0, 0.0, 2.0]]), viewmats, Ks, widths, heights)
    assert torch.allclose(nu, torch.tensor([100.0]))

    g = torch.Generator().manual_seed(0)
    means = torch.randn(500, 3, generator=g) + torch.tensor([0.0, 0.0, 3.0])
    whole = max_sampling_rate(means, viewmats, Ks, widths, heights)
    monkeypatch.setattr(filter3d, "_MAX_ENTRIES", 500)  # one camera per chunk
    assert torch.equal(max_sampling_rate(means, viewmats, Ks, widths, heights), whole)
    assert (whole > 0).any() and (whole == 0).any()


def test_unseen_gaussians_get_the_widest_filter():
    assert torch.equal(fill_unseen(torch.tensor([3.0, 0.0, 5.0])), torch.tensor([3.0, 3.0, 5.0]))
    assert torch.isinf(fill_unseen(torch.zeros(2))).all()  # nothing seen: nothing filtered


def test_nerfstudio_cameras_look_down_minus_z():
    """``use_cameras`` takes nerfstudio's OpenGL camera-to-world poses: with the identity pose the camera looks
    down world -z, so a point at z = -2 is seen at depth 2 and one at z = +2 is behind it."""
    cams = Cameras(camera_to_worlds=torch.eye(4)[None, :3], fx=100.0, fy=80.0, cx=50.0, cy=40.0, width=100,
                   height=80)
    f = SmoothingFilter3D()
    f.use_cameras(cams)
    means = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.0, -4.0], [0.0, 0.0, 2.0]])
    assert torch.allclose(f.compute(means, downscale=1), torch.tensor([50.0, 25.0, 25.0]))  # last: unseen, filled
    assert torch.allclose(f.compute(means, downscale=2), torch.tensor([25.0, 12.5, 12.5]))  # (f / 2) / z


# ------------------------------------------------------------------------------------ baking
def _gaussians(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.4 + torch.tensor([0.0, 0.0, 4.0],
                                                                                     dtype=torch.float64)
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    log_scales = torch.rand(n, 3, generator=g, dtype=torch.float64) * 3.0 - 5.0  # 0.007 .. 0.14
    logits = torch.randn(n, 1, generator=g, dtype=torch.float64) * 2.0
    nu = torch.rand(n, generator=g, dtype=torch.float64) * 20.0 + 5.0
    return means, quats, log_scales, logits, nu


def test_baked_scales_are_the_explicit_filtered_covariance():
    means, quats, log_scales, logits, nu = _gaussians()
    new_log_scales, _ = apply_filter_3d(log_scales, logits, nu)
    explicit = covariance(quats, log_scales.exp()) + (0.2 / nu**2)[:, None, None] * torch.eye(3, dtype=nu.dtype)
    baked = covariance(quats, new_log_scales.exp())
    assert torch.allclose(baked, explicit, rtol=1e-10, atol=1e-14)
    # ... and the renderer's projection of both gives the same 2D conics
    viewmats, Ks, _, _ = _one_camera()
    W, H = 100, 80
    p_baked = project_gaussians(means, baked, viewmats.double(), Ks.double(), W, H)
    p_explicit = project_gaussians(means, explicit, viewmats.double(), Ks.double(), W, H)
    assert (p_baked.radii > 0).all()
    assert torch.allclose(p_baked.conics, p_explicit.conics, rtol=1e-9)
    # the filter did something: the unfiltered conics differ
    p_raw = project_gaussians(means, covariance(quats, log_scales.exp()), viewmats.double(), Ks.double(), W, H)
    assert not torch.allclose(p_raw.conics, p_baked.conics, rtol=1e-3)


def test_baked_opacity_conserves_the_integral():
    means, quats, log_scales, logits, nu = _gaussians()
    _, new_logits = apply_filter_3d(log_scales, logits, nu)
    cov = covariance(quats, log_scales.exp())
    cov_f = cov + (0.2 / nu**2)[:, None, None] * torch.eye(3, dtype=nu.dtype)
    factor = torch.sqrt(torch.linalg.det(cov) / torch.linalg.det(cov_f))
    assert torch.allclose(torch.sigmoid(new_logits)[:, 0], torch.sigmoid(logits)[:, 0] * factor, rtol=1e-9)
    # opacity x sqrt(det Sigma) (the integral of the 3D Gaussian up to a constant) is conserved
    assert torch.allclose(torch.sigmoid(new_logits)[:, 0] * torch.linalg.det(cov_f).sqrt(),
                          torch.sigmoid(logits)[:, 0] * torch.linalg.det(cov).sqrt(), rtol=1e-9)


def test_filter_is_differentiable_and_safe_at_the_extremes():
    _, _, log_scales, logits, nu = _gaussians(n=4)
    log_scales.requires_grad_(True)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, o: apply_filter_3d(s, o, nu), (log_scales, logits))
    # tiny scales, saturated opacities, no filter (nu = inf): finite values and gradients
    s = torch.tensor([[-60.0, -3.0, 0.0], [1.0, 1.0, 1.0]], requires_grad=True)
    o = torch.tensor([[80.0], [-40.0]], requires_grad=True)
    new_s, new_o = apply_filter_3d(s, o, torch.tensor([10.0, math.inf]))
    (new_s.sum() + new_o.sum()).backward()
    for t in (new_s, new_o, s.grad, o.grad):
        assert torch.isfinite(t).all()
    assert torch.allclose(new_s[1], s[1])  # nu = inf: unchanged scales
    assert torch.sigmoid(new_o[0]) <= 1 - 1e-7  # clamped below 1 before the logit
