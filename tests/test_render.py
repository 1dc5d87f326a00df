"""The pure-PyTorch rasterizer (the reference) against a brute-force per-pixel compositor and gsplat's conventions.

These tests call ``rasterize_torch`` / ``composite`` explicitly; tests/test_render_cpp.py holds the
compiled path to this reference. ``rasterize`` (the dispatcher) is used where the path does not matter.
"""

from __future__ import annotations

import math

import pytest
import torch
from gsplat.cuda._torch_impl import (
    _fully_fused_projection,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
)
from gsplat.strategy import DefaultStrategy

from gvae_ns import render
from gvae_ns.render import composite, composite_torch, rasterize, rasterize_torch

W, H = 24, 18


def _cameras(C: int, dtype=torch.float64):
    """C pinhole cameras looking down +z at the origin from z = -4, shifted sideways a little."""
    viewmats = torch.eye(4, dtype=dtype).repeat(C, 1, 1)
    viewmats[:, 2, 3] = 4.0
    viewmats[:, 0, 3] = torch.linspace(-0.3, 0.3, C, dtype=dtype)
    viewmats[:, 1, 3] = torch.linspace(0.2, -0.2, C, dtype=dtype)
    if C > 1:  # rotate the last camera a little about y
        ang = 0.2
        co, si = math.cos(ang), math.sin(ang)
        viewmats[-1, :3, :3] = torch.tensor([[co, 0, si], [0, 1, 0], [-si, 0, co]], dtype=dtype)
    Ks = torch.tensor([[30.0, 0, W / 2], [0, 28.0, H / 2], [0, 0, 1]], dtype=dtype).repeat(C, 1, 1)
    return viewmats, Ks


def _scene(N: int, seed: int = 0, dtype=torch.float64, sh_coeffs: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(N, 3, generator=g, dtype=dtype) * 0.7
    quats = torch.randn(N, 4, generator=g, dtype=dtype)
    scales = torch.rand(N, 3, generator=g, dtype=dtype) * 0.15 + 0.02
    opacities = torch.rand(N, generator=g, dtype=dtype) * 0.97 + 0.02
    if sh_coeffs:
        colors = torch.randn(N, sh_coeffs, 3, generator=g, dtype=dtype) * 0.4
    else:
        colors = torch.rand(N, 3, generator=g, dtype=dtype)
    return means, quats, scales, opacities, colors


def _reference(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, sh_degree=None,
               backgrounds=None, render_mode="RGB", rasterize_mode="classic", tile_size=16):
    """Brute force: gsplat's torch projection, then every pixel composites its Gaussians one by one."""
    C, N = viewmats.shape[0], means.shape[0]
    covars, _ = _quat_scale_to_covar_preci(quats, scales, True, False)
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, calc_compensations=rasterize_mode == "antialiased"
    )
    opac = opacities.expand(C, N) * (comp if comp is not None else 1.0)
    if sh_degree is not None:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]
        sh = _spherical_harmonics(sh_degree, means[None] - campos[:, None], colors.expand(C, *colors.shape))
        feats = torch.clamp_min(sh + 0.5, 0)
    else:
        feats = colors.expand(C, *colors.shape) if colors.dim() == 2 else colors
    if render_mode in ("D", "ED"):
        feats = depths[..., None]
    elif render_mode in ("RGB+D", "RGB+ED"):
        feats = torch.cat([feats, depths[..., None]], -1)
    D = feats.shape[-1]
    out = torch.zeros(C, height, width, D, dtype=means.dtype)
    alphas = torch.zeros(C, height, width, 1, dtype=means.dtype)
    r = radii.to(means.dtype)
    tx0 = torch.floor((means2d[..., 0] - r) / tile_size)
    tx1 = torch.ceil((means2d[..., 0] + r) / tile_size)
    ty0 = torch.floor((means2d[..., 1] - r) / tile_size)
    ty1 = torch.ceil((means2d[..., 1] + r) / tile_size)
    px = (torch.arange(width, dtype=means.dtype) + 0.5).repeat(height)  # [P] row-major pixels
    py = (torch.arange(height, dtype=means.dtype) + 0.5).repeat_interleave(width)
    ptx, pty = (px // tile_size)[:, None], (py // tile_size)[:, None]
    for c in range(C):
        order = torch.argsort(depths[c], stable=True)
        m, con, op, f = means2d[c, order], conics[c, order], opac[c, order], feats[c, order]
        dx, dy = m[:, 0] - px[:, None], m[:, 1] - py[:, None]  # [P, N]
        sigma = 0.5 * (con[:, 0] * dx * dx + con[:, 2] * dy * dy) + con[:, 1] * dx * dy
        alpha = torch.clamp_max(op * torch.exp(-sigma), 0.999)
        in_tiles = (radii[c, order] > 0) & (tx0[c, order] <= ptx) & (ptx < tx1[c, order])
        in_tiles &= (ty0[c, order] <= pty) & (pty < ty1[c, order])
        use = in_tiles & (sigma >= 0) & (alpha >= 1 / 255)
        bg = torch.zeros(D, dtype=means.dtype)
        if backgrounds is not None and render_mode not in ("D", "ED"):
            bg[: backgrounds.shape[1]] = backgrounds[c]
        for p in range(px.numel()):
            T, acc = 1.0, torch.zeros(D, dtype=means.dtype)
            for n, a in zip(torch.nonzero(use[p]).squeeze(1).tolist(), alpha[p][use[p]].tolist()):
                if T * (1 - a) <= 1e-4:
                    break
                acc += f[n] * (a * T)
                T *= 1 - a
            out[c, p // width, p % width] = acc + T * bg
            alphas[c, p // width, p % width, 0] = 1 - T
    if render_mode in ("ED", "RGB+ED"):
        out[..., -1:] = out[..., -1:] / alphas.clamp(min=1e-10)
    return out, alphas, radii


@pytest.mark.parametrize("tile_size", [8, 6])
def test_rgb_matches_reference_several_cameras_with_background(tile_size):
    scene = _scene(40)
    viewmats, Ks = _cameras(3)
    bgs = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    kwargs = {"backgrounds": bgs, "tile_size": tile_size}
    img, alphas, info = rasterize_torch(*scene, viewmats, Ks, W, H, **kwargs)
    ref, ref_alphas, ref_radii = _reference(*scene, viewmats, Ks, W, H, **kwargs)
    assert img.shape == (3, H, W, 3) and alphas.shape == (3, H, W, 1)
    assert alphas.max() > 0.5, "scene should cover part of the image"
    torch.testing.assert_close(img, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-9, rtol=0)
    assert info["radii"].dtype == torch.int32 and info["radii"].shape == (3, 40)
    assert torch.equal(info["radii"], ref_radii)
    assert info["means2d"].shape == (3, 40, 2)
    assert (info["width"], info["height"], info["n_cameras"]) == (W, H, 3)


def test_opaque_stack_stops_at_transmittance_cutoff():
    """Many opaque Gaussians on the same ray: later ones must be cut off exactly like gsplat."""
    N = 12
    means = torch.zeros(N, 3, dtype=torch.float64)
    means[:, 2] = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    quats = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64).repeat(N, 1)
    scales = torch.full((N, 3), 0.3, dtype=torch.float64)
    opacities = torch.full((N,), 0.8, dtype=torch.float64)
    colors = torch.rand(N, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    viewmats, Ks = _cameras(1)
    img, alphas, _ = rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    ref, ref_alphas, _ = _reference(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    torch.testing.assert_close(img, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-9, rtol=0)
    assert alphas.max() > 0.999


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_sh_and_modes_match_reference(sh_degree, rasterize_mode):
    means, quats, scales, opacities, colors = _scene(25, seed=sh_degree + 7, sh_coeffs=16)
    viewmats, Ks = _cameras(2)
    kwargs = {"sh_degree": sh_degree, "rasterize_mode": rasterize_mode}
    img, alphas, _ = rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, W, H, **kwargs)
    ref, ref_alphas, _ = _reference(means, quats, scales, opacities, colors, viewmats, Ks, W, H, **kwargs)
    torch.testing.assert_close(img, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-9, rtol=0)


@pytest.mark.parametrize("render_mode", ["D", "ED", "RGB+D", "RGB+ED"])
def test_depth_render_modes_match_reference(render_mode):
    means, quats, scales, opacities, colors = _scene(30, seed=3)
    viewmats, Ks = _cameras(2)
    bgs = torch.full((2, 3), 0.7, dtype=torch.float64)
    img, alphas, _ = rasterize_torch(
        means, quats, scales, opacities, colors, viewmats, Ks, W, H, backgrounds=bgs, render_mode=render_mode
    )
    ref, ref_alphas, _ = _reference(
        means, quats, scales, opacities, colors, viewmats, Ks, W, H, backgrounds=bgs, render_mode=render_mode
    )
    assert img.shape[-1] == (1 if render_mode in ("D", "ED") else 4)
    torch.testing.assert_close(img, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-9, rtol=0)
    if render_mode.endswith("ED"):
        covered = alphas[..., 0] > 0.5
        assert (img[..., -1][covered] > 2.0).all(), "expected depth should sit near the scene (z ~ 4)"


def test_per_camera_features_with_many_channels():
    means, quats, scales, opacities, _ = _scene(20, seed=5)
    viewmats, Ks = _cameras(2)
    feats = torch.rand(2, 20, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    img, _alphas, _ = rasterize_torch(means, quats, scales, opacities, feats, viewmats, Ks, W, H)
    ref, _ref_alphas, _ = _reference(means, quats, scales, opacities, feats, viewmats, Ks, W, H)
    assert img.shape == (2, H, W, 5)
    torch.testing.assert_close(img, ref, atol=1e-9, rtol=0)


def test_culled_gaussians_contribute_nothing():
    means, quats, scales, opacities, colors = _scene(20, seed=11)
    viewmats, Ks = _cameras(2)
    base_img, base_alpha, _ = rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    # behind both cameras, and far off to the side of the image
    behind = [[0.0, 0.0, -6.0], [0.2, 0.1, -4.5]]
    aside = [[40.0, 0.0, 0.0], [0.0, -35.0, 1.0]]
    extra = [
        torch.tensor(behind + aside, dtype=torch.float64),
        torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64).repeat(4, 1),
        torch.full((4, 3), 0.3, dtype=torch.float64),
        torch.full((4,), 0.99, dtype=torch.float64),
        torch.ones(4, 3, dtype=torch.float64),
    ]
    base = (means, quats, scales, opacities, colors)
    params = [torch.cat([a, b]).requires_grad_(True) for a, b in zip(base, extra)]
    img, alpha, info = rasterize_torch(*params, viewmats, Ks, W, H, absgrad=True)
    torch.testing.assert_close(img, base_img, atol=1e-12, rtol=0)
    torch.testing.assert_close(alpha, base_alpha, atol=1e-12, rtol=0)
    assert (info["radii"][:, 20:] == 0).all() and (info["radii"][:, :20] > 0).any()
    info["means2d"].retain_grad()
    (img.sum() + alpha.sum()).backward()
    for p in params:
        assert torch.isfinite(p.grad).all()
        assert (p.grad[20:] == 0).all()
        assert p.grad[:20].abs().sum() > 0
    assert (info["means2d"].grad[:, 20:] == 0).all()


def test_gradients_are_finite_and_absgrad_bounds_grad():
    means, quats, scales, opacities, colors = _scene(30, seed=4, dtype=torch.float32)
    params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors)]
    viewmats, Ks = _cameras(2, dtype=torch.float32)
    target = torch.rand(2, H, W, 3)
    for mode in ("classic", "antialiased"):
        for p in params:
            p.grad = None
        img, _alpha, info = rasterize_torch(*params, viewmats, Ks, W, H, absgrad=True, rasterize_mode=mode)
        info["means2d"].retain_grad()
        ((img - target) ** 2).mean().backward()
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        grad, absgrad = info["means2d"].grad, info["means2d"].absgrad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert absgrad.shape == grad.shape
        assert (absgrad + 1e-6 >= grad.abs()).all()
        assert ((grad != 0) <= (info["radii"] > 0)[..., None]).all()


def test_gradients_match_finite_differences():
    """Whole pipeline (projection, SH, compositing, background) against central differences."""
    N = 4
    g = torch.Generator().manual_seed(9)
    means = torch.randn(N, 3, generator=g, dtype=torch.float64) * 0.3
    quats = torch.randn(N, 4, generator=g, dtype=torch.float64)
    scales = torch.rand(N, 3, generator=g, dtype=torch.float64) * 0.1 + 0.15
    opacities = torch.rand(N, generator=g, dtype=torch.float64) * 0.5 + 0.3
    shs = torch.randn(N, 4, 3, generator=g, dtype=torch.float64) * 0.3
    bgs = torch.rand(2, 3, generator=g, dtype=torch.float64)
    viewmats, Ks = _cameras(2)
    w, h = 12, 10  # one 16x16 tile: radius changes cannot change the set of visited pixels

    def f(means, quats, scales, opacities, shs, bgs):
        img, alpha, _ = rasterize_torch(
            means, quats, scales, opacities, shs, viewmats, Ks, w, h, sh_degree=1, backgrounds=bgs,
            render_mode="RGB+ED", rasterize_mode="antialiased",
        )
        return img, alpha

    inputs = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, shs, bgs)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_composite_gradients_match_finite_differences():
    """The hand-written compositing backward, with respect to the 2D means directly."""
    g = torch.Generator().manual_seed(2)
    C, N = 2, 5
    means2d = torch.rand(C, N, 2, generator=g, dtype=torch.float64) * torch.tensor([10.0, 8.0]).double()
    L = torch.rand(C, N, 2, 2, generator=g, dtype=torch.float64)
    cov = L @ L.transpose(-1, -2) * 6 + torch.eye(2, dtype=torch.float64)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[..., 0, 0], inv[..., 0, 1], inv[..., 1, 1]], -1)
    colors = torch.rand(C, N, 3, generator=g, dtype=torch.float64)
    opacities = torch.rand(C, N, generator=g, dtype=torch.float64) * 0.8 + 0.1
    depths = torch.rand(C, N, generator=g, dtype=torch.float64)
    radii = torch.full((C, N), 8, dtype=torch.int32)
    bgs = torch.rand(C, 3, generator=g, dtype=torch.float64)
    # one Gaussian sits on a pixel centre with alpha clamped at 0.999 there
    means2d[0, 0] = torch.tensor([3.5, 2.5], dtype=torch.float64)
    opacities[0, 0] = 0.9995

    def f(m, c, col, op, bg):
        return composite(m, c, col, op, radii, depths, 10, 8, backgrounds=bg)

    inputs = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opacities, bgs)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("radius,ts", [(3, 4), (40, 4), (5, 6), (4, 16)])
def test_single_gaussian_covers_exactly_its_tiles_and_alpha_support(radius, ts):
    """One rotated, elongated Gaussian: alpha is the closed form inside its tiles, 0 elsewhere."""
    w, h = 40, 36
    cov = torch.tensor([[14.0, 6.0], [6.0, 5.0]], dtype=torch.float64)
    inv = torch.linalg.inv(cov)
    means2d = torch.tensor([[[19.3, 17.8]]], dtype=torch.float64)
    conics = torch.stack([inv[0, 0], inv[0, 1], inv[1, 1]]).view(1, 1, 3)
    opacity = torch.tensor([[0.99]], dtype=torch.float64)
    radii = torch.tensor([[radius]], dtype=torch.int32)
    _, alpha = composite(means2d, conics, torch.ones(1, 1, 1, dtype=torch.float64), opacity, radii,
                         torch.ones(1, 1, dtype=torch.float64), w, h, tile_size=ts)
    ys, xs = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    d = torch.stack([19.3 - (xs + 0.5), 17.8 - (ys + 0.5)], -1)
    expected = 0.99 * torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", d, inv, d))
    tiles_x = (xs // ts >= math.floor((19.3 - radius) / ts)) & (xs // ts < math.ceil((19.3 + radius) / ts))
    tiles_y = (ys // ts >= math.floor((17.8 - radius) / ts)) & (ys // ts < math.ceil((17.8 + radius) / ts))
    expected = torch.where(tiles_x & tiles_y & (expected >= 1 / 255), expected, torch.zeros_like(expected))
    torch.testing.assert_close(alpha[0, ..., 0], expected, atol=1e-12, rtol=0)
    assert (expected > 0).sum() > 20


def test_composite_gradients_with_saturated_pixels(monkeypatch):
    """Stacks of opaque Gaussians stop pixels early; gradients still match central differences."""
    g = torch.Generator().manual_seed(5)
    C, N = 1, 12
    centres = torch.tensor([[3.2, 3.1], [6.3, 4.4], [4.6, 2.2]], dtype=torch.float64)
    means2d = (centres.repeat_interleave(4, 0) + 0.3 * torch.rand(N, 2, generator=g, dtype=torch.float64))[None]
    conics = torch.tensor([0.08, 0.01, 0.1], dtype=torch.float64).repeat(C, N, 1)
    conics = conics * (1 + 0.2 * torch.rand(C, N, 1, generator=g, dtype=torch.float64))
    colors = torch.rand(C, N, 3, generator=g, dtype=torch.float64)
    opacities = 0.9 + 0.08 * torch.rand(C, N, generator=g, dtype=torch.float64)
    depths = torch.rand(C, N, generator=g, dtype=torch.float64)
    radii = torch.full((C, N), 12, dtype=torch.int32)

    def f(m, c, col, op):
        return composite(m, c, col, op, radii, depths, 10, 8)

    img, _ = f(means2d, conics, colors, opacities)
    with monkeypatch.context() as m:
        m.setattr(composite_torch, "TRANSMITTANCE_MIN", 1e-300)
        img_uncut, _ = f(means2d, conics, colors, opacities)
    assert (img - img_uncut).abs().amax(-1).gt(1e-6).sum() > 5, "some pixels must hit the transmittance cut-off"
    inputs = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opacities)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_absgrad_is_sum_of_absolute_per_pixel_gradients():
    g = torch.Generator().manual_seed(8)
    C, N, w, h = 1, 6, 7, 5
    means2d = torch.rand(C, N, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64)
    conics = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64).repeat(C, N, 1)
    colors = torch.rand(C, N, 3, generator=g, dtype=torch.float64)
    opacities = torch.rand(C, N, generator=g, dtype=torch.float64) * 0.8 + 0.1
    depths = torch.rand(C, N, generator=g, dtype=torch.float64)
    radii = torch.full((C, N), 6, dtype=torch.int32)
    weights = torch.randn(C, h, w, 3, generator=g, dtype=torch.float64)
    sink = {}

    m = means2d.clone().requires_grad_(True)
    img, _alpha = composite(
        m, conics, colors, opacities, radii, depths, w, h, absgrad_sink=lambda v: sink.update(v=v)
    )
    (img * weights).sum().backward()
    expected = torch.zeros_like(means2d)
    for y in range(h):
        for x in range(w):
            m_p = means2d.clone().requires_grad_(True)
            img_p, _ = composite(m_p, conics, colors, opacities, radii, depths, w, h)
            (img_p[:, y, x] * weights[:, y, x]).sum().backward()
            expected += m_p.grad.abs()
    torch.testing.assert_close(sink["v"], expected, atol=1e-10, rtol=1e-8)
    assert (sink["v"] > m.grad.abs() + 1e-6).any(), "pixels pulling in opposite directions must not cancel"


def test_empty_and_fully_culled_scenes_render_background():
    viewmats, Ks = _cameras(2)
    bgs = torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.0, 1.0]], dtype=torch.float64)
    empty = [torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64),
             torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.float64),
             torch.zeros(0, 3, dtype=torch.float64)]
    img, alpha, info = rasterize_torch(*empty, viewmats, Ks, W, H, backgrounds=bgs)
    assert torch.equal(img, bgs[:, None, None, :].expand(2, H, W, 3)) and (alpha == 0).all()
    assert info["radii"].shape == (2, 0)
    means = torch.tensor([[0.0, 0.0, -8.0]], dtype=torch.float64, requires_grad=True)  # behind
    params = [
        means,
        torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
        torch.full((1, 3), 0.2, dtype=torch.float64),
        torch.tensor([0.9], dtype=torch.float64),
        torch.ones(1, 3, dtype=torch.float64),
    ]
    img, alpha, info = rasterize_torch(*params, viewmats, Ks, W, H, backgrounds=bgs)
    assert torch.equal(img, bgs[:, None, None, :].expand(2, H, W, 3)) and (alpha == 0).all()
    img.sum().backward()
    assert torch.equal(means.grad, torch.zeros_like(means))


def test_no_grad_render_equals_grad_render():
    means, quats, scales, opacities, colors = _scene(20, seed=14)
    viewmats, Ks = _cameras(2)
    means.requires_grad_(True)
    img, alpha, _ = rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    with torch.no_grad():
        img_ng, alpha_ng, _ = rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    assert not img_ng.requires_grad
    assert torch.equal(img_ng, img.detach()) and torch.equal(alpha_ng, alpha.detach())


def test_packed_matches_unpacked():
    means, quats, scales, opacities, colors = _scene(30, seed=6)
    viewmats, Ks = _cameras(2)
    img, alpha, info = rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    means_p = means.clone().requires_grad_(True)
    img_p, alpha_p, info_p = rasterize_torch(
        means_p, quats, scales, opacities, colors, viewmats, Ks, W, H, packed=True, absgrad=True
    )
    torch.testing.assert_close(img_p, img, atol=1e-12, rtol=0)
    torch.testing.assert_close(alpha_p, alpha, atol=1e-12, rtol=0)
    sel = info["radii"] > 0
    nnz = int(sel.sum())
    assert info_p["camera_ids"].shape == info_p["gaussian_ids"].shape == (nnz,)
    assert torch.equal(info_p["radii"], info["radii"][sel])
    torch.testing.assert_close(info_p["means2d"], info["means2d"][sel])
    info_p["means2d"].retain_grad()
    img_p.sum().backward()
    assert info_p["means2d"].grad.shape == (nnz, 2) and info_p["means2d"].grad.abs().sum() > 0
    assert info_p["means2d"].absgrad.shape == (nnz, 2)


def test_dispatcher_uses_cpu_path_on_cpu(monkeypatch):
    """CPU tensors never reach gsplat; GVAE_RASTERIZER=torch selects this file's reference exactly."""
    import gsplat

    def fail(*args, **kwargs):
        raise AssertionError("gsplat.rasterization must not be called for CPU tensors")

    monkeypatch.setattr(gsplat, "rasterization", fail)
    monkeypatch.setattr(render, "_cpu_choice", {})
    means, quats, scales, opacities, colors = _scene(10, seed=8)
    viewmats, Ks = _cameras(1)
    ref, ref_alpha, _ = rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    monkeypatch.setenv(render.RASTERIZER_ENV, "torch")
    img, alpha, _ = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    assert torch.equal(img, ref) and torch.equal(alpha, ref_alpha)
    monkeypatch.delenv(render.RASTERIZER_ENV)
    img, alpha, _info = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H)  # default path
    torch.testing.assert_close(img, ref, atol=1e-9, rtol=0)


def test_chunking_does_not_change_the_render(monkeypatch):
    means, quats, scales, opacities, colors = _scene(30, seed=12)
    viewmats, Ks = _cameras(2)
    params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors)]
    img, alpha, _ = rasterize_torch(*params, viewmats, Ks, W, H)
    img.sum().backward()
    grads = [p.grad.clone() for p in params]
    monkeypatch.setattr(composite_torch, "MAX_ENTRIES_PER_CHUNK", 40)
    params_b = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors)]
    img_b, alpha_b, _ = rasterize_torch(*params_b, viewmats, Ks, W, H)
    img_b.sum().backward()
    torch.testing.assert_close(img_b, img, atol=1e-12, rtol=0)
    torch.testing.assert_close(alpha_b, alpha, atol=1e-12, rtol=0)
    for a, b in zip(params_b, grads):
        torch.testing.assert_close(a.grad, b, atol=1e-12, rtol=1e-10)


def test_bad_inputs_raise_clear_errors():
    means, quats, scales, opacities, colors = _scene(5)
    viewmats, Ks = _cameras(1)
    with pytest.raises(ValueError, match="scales"):
        rasterize_torch(means, quats, scales[:, :2], opacities, colors, viewmats, Ks, W, H)
    with pytest.raises(ValueError, match="render_mode"):
        rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, W, H, render_mode="X")
    with pytest.raises(ValueError, match="sh_degree"):
        shs = colors[:, None].expand(5, 4, 3)  # degree 1 only
        rasterize_torch(means, quats, scales, opacities, shs, viewmats, Ks, W, H, sh_degree=2)
    with pytest.raises(NotImplementedError, match="camera_model"):
        rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, W, H, camera_model="fisheye")


@pytest.mark.parametrize("absgrad", [False, True])
def test_default_strategy_grows_and_prunes(absgrad):
    torch.manual_seed(0)
    N = 40
    means, quats, scales, opacities, colors = _scene(N, seed=13, dtype=torch.float32)
    logit = torch.logit(opacities.clamp(0.1, 0.9))
    logit[:5] = -9.0  # opacity ~1e-4: below prune_opa
    log_scales = torch.log(scales)
    log_scales[5:20] = math.log(0.005)  # small: duplicated; the rest is split
    params = torch.nn.ParameterDict(
        {
            "means": means,
            "quats": quats,
            "scales": log_scales,
            "opacities": logit,
            "colors": colors,
        }
    )
    optimizers = {k: torch.optim.Adam([{"params": p, "lr": 1e-3, "name": k}]) for k, p in params.items()}
    strategy = DefaultStrategy(
        refine_start_iter=0, refine_every=2, reset_every=10_000, grow_grad2d=1e-7, absgrad=absgrad,
        grow_scale3d=0.01, prune_opa=0.005,
    )
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)
    viewmats, Ks = _cameras(2, dtype=torch.float32)
    target = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(0))
    counts = [len(params["means"])]
    for step in range(1, 3):
        img, _alpha, info = rasterize(
            params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
            params["colors"], viewmats, Ks, W, H, absgrad=absgrad,
        )
        strategy.step_pre_backward(params, optimizers, state, step, info)
        loss = ((img - target) ** 2).mean()
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        counts.append(len(params["means"]))
        if step == 1:
            touched = (info["means2d"].grad != 0).any(-1).any(0)  # has a view-space gradient
    assert counts[1] == N, "no refinement before refine_every"
    # every Gaussian with a view-space gradient passes the tiny threshold and grows by one
    # (duplicate: +1, split: 2 for 1); the 5 transparent ones get no gradient and are pruned
    assert not touched[:5].any()
    grown = int(touched.sum())
    assert grown > 20
    assert counts[2] == N + grown - 5
    n_after = counts[2]
    assert (torch.sigmoid(params["opacities"]) >= 0.005).all()
    assert all(len(p) == n_after for p in params.values())
    for opt in optimizers.values():
        assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].shape[0] == n_after


def test_world_to_camera_matches_splatfacto_viewmat():
    from nerfstudio.models.splatfacto import get_viewmat

    from gvae_ns.render import world_to_camera

    c2w = torch.randn(3, 3, 4)
    reference = getattr(get_viewmat, "__wrapped__", get_viewmat)(c2w)
    assert torch.allclose(world_to_camera(c2w), reference, atol=1e-6)
