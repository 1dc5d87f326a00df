"""The compiled CPU rasterizer (``rasterize_cpp``) against the pure-PyTorch reference (``rasterize_torch``).

Images and every gradient (means, quats, scales, opacities, colours / SH, backgrounds, means2d grad and
absgrad) must agree to round-off on scenes built to break rasterizers, and gsplat's DefaultStrategy must
make the same densification decisions through either path.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from gsplat.strategy import DefaultStrategy

from gvae_ns import render
from gvae_ns.render import (
    composite,
    composite_cpp,
    extension,
    rasterize,
    rasterize_cpp,
    rasterize_torch,
)

_HAS_COMPILER = bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"))
pytestmark = pytest.mark.skipif(not _HAS_COMPILER, reason="no C++ compiler (g++) to build the CPU rasterizer")


@pytest.fixture(scope="module", autouse=True)
def _built():
    lib = extension.load_extension()
    assert lib is not None, f"a compiler is present but the build failed: {extension.build_error()}"


def _cameras(C: int, W: int, H: int, dtype=torch.float64):
    """C pinhole cameras at z = -4 looking down +z, shifted and (the last) rotated a little."""
    viewmats = torch.eye(4, dtype=dtype).repeat(C, 1, 1)
    viewmats[:, 2, 3] = 4.0
    viewmats[:, 0, 3] = torch.linspace(-0.3, 0.3, C, dtype=dtype)
    if C > 1:
        co, si = math.cos(0.25), math.sin(0.25)
        viewmats[-1, :3, :3] = torch.tensor([[co, 0, si], [0, 1, 0], [-si, 0, co]], dtype=dtype)
    Ks = torch.tensor([[1.2 * W, 0, W / 2], [0, 1.1 * W, H / 2], [0, 0, 1]], dtype=dtype).repeat(C, 1, 1)
    return viewmats, Ks


def _hard_scene(dtype=torch.float64, seed=0, sh_coeffs=0):
    """Random Gaussians plus the cases that break rasterizers, as (means, quats, scales, opacities, colours)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    parts = []

    def add(means, scales, opacities):
        n = means.shape[0]
        parts.append((means, torch.randn(n, 4, generator=g, dtype=dtype), scales, opacities))

    add(torch.randn(80, 3, generator=g, dtype=dtype) * 0.6, rand(80, 3) * 0.12 + 0.01, rand(80) * 0.95 + 0.03)
    t = lambda rows: torch.tensor(rows, dtype=dtype)
    add(t([[0.0, 0.0, -6.0], [0.3, -0.2, -4.5]]), torch.full((2, 3), 0.3, dtype=dtype), t([0.9, 0.9]))  # behind
    # straddling / just beyond the near plane (camera depth 0.005, 0.03, 0.2 with big extent)
    add(t([[0.0, 0.0, -3.995], [0.01, 0.0, -3.97], [-0.05, 0.02, -3.8]]), torch.full((3, 3), 0.4, dtype=dtype),
        t([0.5, 0.4, 0.3]))
    add(t([[40.0, 0.0, 0.0], [0.0, -35.0, 1.0], [3.0, 0.0, 0.0]]), torch.full((3, 3), 0.2, dtype=dtype),
        t([0.9, 0.9, 0.9]))  # off screen (the last only partly)
    add(t([[0.1, 0.0, 2.0]]), torch.full((1, 3), 4.0, dtype=dtype), t([0.35]))  # huge: covers every image
    add(rand(4, 3) - 0.5, torch.full((4, 3), 1e-4, dtype=dtype), t([0.9, 0.8, 0.99, 0.6]))  # sub-pixel
    add(rand(3, 3) - 0.5, torch.full((3, 3), 0.1, dtype=dtype), t([0.0, 0.0, 0.0]))  # zero opacity
    stack = torch.zeros(30, 3, dtype=dtype)
    stack[:, 2] = torch.linspace(-1.5, 1.5, 30, dtype=dtype)  # on one ray: early termination
    add(stack + 0.01 * rand(30, 3), rand(30, 3) * 0.05 + 0.05, rand(30) * 0.1 + 0.88)
    means, quats, scales, opacities = (torch.cat(x) for x in zip(*parts))
    n = means.shape[0]
    colors = torch.randn(n, sh_coeffs, 3, generator=g, dtype=dtype) * 0.4 if sh_coeffs else rand(n, 3)
    return means, quats, scales, opacities, colors


def _run(fn, scene, viewmats, Ks, W, H, weight_seed=1, **kwargs):
    """Render, back-propagate a fixed random weighting of colours and alphas; return outputs and grads."""
    params = [t.clone().requires_grad_(True) for t in scene]
    bgs = kwargs.pop("backgrounds", None)
    if bgs is not None:
        bgs = bgs.clone().requires_grad_(True)
    img, alpha, info = fn(*params, viewmats, Ks, W, H, backgrounds=bgs, absgrad=True, **kwargs)
    info["means2d"].retain_grad()
    g = torch.Generator().manual_seed(weight_seed)
    w_img = torch.randn(img.shape, generator=g, dtype=img.dtype)
    w_alpha = torch.randn(alpha.shape, generator=g, dtype=img.dtype)
    ((img * w_img).sum() + (alpha * w_alpha).sum()).backward()
    grads = {name: p.grad for name, p in zip(("means", "quats", "scales", "opacities", "colors"), params)}
    if bgs is not None:
        grads["backgrounds"] = bgs.grad
    grads["means2d"] = info["means2d"].grad
    grads["absgrad"] = info["means2d"].absgrad
    return img.detach(), alpha.detach(), info, grads


def _assert_same(a, b, rel: float):
    """Closeness relative to each tensor's largest magnitude (round-off of the working precision)."""
    img_a, alpha_a, info_a, grads_a = a
    img_b, alpha_b, info_b, grads_b = b
    torch.testing.assert_close(img_b, img_a, atol=rel * max(1.0, img_a.abs().max().item()), rtol=0)
    torch.testing.assert_close(alpha_b, alpha_a, atol=rel, rtol=0)
    assert torch.equal(info_a["radii"], info_b["radii"])
    assert torch.equal(info_a["tiles_per_gauss"], info_b["tiles_per_gauss"])
    for name, ga in grads_a.items():
        gb = grads_b[name]
        assert (ga is None) == (gb is None), name
        if ga is None:
            continue
        scale = max(ga.abs().max().item(), 1e-12)
        torch.testing.assert_close(gb, ga, atol=rel * scale, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("tile_size", [16, 6])
def test_hard_scene_matches_reference_float64(tile_size):
    W, H = 37, 29  # not multiples of the tile size
    scene = _hard_scene()
    viewmats, Ks = _cameras(3, W, H)
    bgs = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 0.5], [0.3, 0.3, 0.3]], dtype=torch.float64)
    kw = {"backgrounds": bgs, "tile_size": tile_size}
    ref = _run(rasterize_torch, scene, viewmats, Ks, W, H, **kw)
    out = _run(rasterize_cpp, scene, viewmats, Ks, W, H, **kw)
    _assert_same(ref, out, rel=1e-10)
    radii = ref[2]["radii"]
    n_rand = 80
    assert (radii[:, n_rand : n_rand + 2] == 0).all(), "behind the cameras: culled"
    assert (radii[:2, n_rand + 2] == 0).all(), "in front of the near plane of the unrotated cameras: culled"
    assert (radii[:2, n_rand + 3 : n_rand + 5] > 0).all(), "just beyond the near plane: rendered"
    assert (radii[:, n_rand + 5 : n_rand + 7] == 0).all(), "far off screen: culled"
    assert (ref[1] > 0.3).all(), "the huge Gaussian covers every pixel"
    assert ref[1].amax() > 0.999, "the stack on one ray saturates its pixels"
    for name in ("means", "scales", "opacities", "colors"):
        assert ref[3][name].abs().sum() > 0


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
@pytest.mark.parametrize("render_mode", ["RGB", "RGB+ED", "D"])
def test_sh_modes_and_render_modes_match_reference(rasterize_mode, render_mode):
    W, H = 33, 20
    scene = _hard_scene(seed=3, sh_coeffs=16)
    viewmats, Ks = _cameras(2, W, H)
    bgs = torch.tensor([[0.2, 0.4, 0.6], [0.9, 0.9, 0.1]], dtype=torch.float64)
    kw = {"backgrounds": bgs, "sh_degree": 3, "rasterize_mode": rasterize_mode, "render_mode": render_mode}
    ref = _run(rasterize_torch, scene, viewmats, Ks, W, H, **kw)
    out = _run(rasterize_cpp, scene, viewmats, Ks, W, H, **kw)
    if render_mode == "D":  # backgrounds do not enter depth renders
        ref[3].pop("backgrounds")
        out[3].pop("backgrounds")
    _assert_same(ref, out, rel=1e-10)


def test_float32_training_precision_matches_reference():
    W, H = 40, 24
    scene = _hard_scene(dtype=torch.float32, seed=5, sh_coeffs=4)
    viewmats, Ks = _cameras(2, W, H, dtype=torch.float32)
    kw = {"sh_degree": 1, "rasterize_mode": "antialiased", "render_mode": "RGB+ED",
          "backgrounds": torch.full((2, 3), 0.5)}
    ref = _run(rasterize_torch, scene, viewmats, Ks, W, H, **kw)
    out = _run(rasterize_cpp, scene, viewmats, Ks, W, H, **kw)
    _assert_same(ref, out, rel=2e-4)


def test_packed_several_channels_and_empty_camera():
    """Packed info, per-camera colours with 5 channels, and a camera that sees nothing."""
    W, H = 24, 40
    means, quats, scales, opacities, _ = _hard_scene(seed=7)
    viewmats, Ks = _cameras(3, W, H)
    viewmats[1, 0, 3] = 100.0  # looks at empty space: every tile is empty
    feats = torch.rand(3, means.shape[0], 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scene = (means, quats, scales, opacities, feats)
    ref = _run(rasterize_torch, scene, viewmats, Ks, W, H, packed=True)
    out = _run(rasterize_cpp, scene, viewmats, Ks, W, H, packed=True)
    _assert_same(ref, out, rel=1e-10)
    assert out[0].shape == (3, H, W, 5)
    assert (out[1][1] == 0).all() and (out[0][1] == 0).all(), "nothing in front of the second camera"
    assert torch.equal(ref[2]["gaussian_ids"], out[2]["gaussian_ids"])
    assert out[3]["means2d"].shape == (int((ref[2]["radii"] > 0).sum()), 2)


def test_empty_scene_renders_background():
    viewmats, Ks = _cameras(2, 20, 17)
    bgs = torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.0, 1.0]], dtype=torch.float64)
    empty = [torch.zeros(0, k, dtype=torch.float64) for k in (3, 4, 3)] + [
        torch.zeros(0, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)]
    img, alpha, _info = rasterize_cpp(*empty, viewmats, Ks, 20, 17, backgrounds=bgs)
    assert torch.equal(img, bgs[:, None, None, :].expand(2, 17, 20, 3)) and (alpha == 0).all()


def test_composite_cpp_gradcheck_with_clamped_and_saturated_pixels():
    """The C++ backward against central differences, independent of the reference."""
    g = torch.Generator().manual_seed(5)
    C, N = 1, 14
    centres = torch.tensor([[3.2, 3.1], [6.3, 4.4], [4.6, 2.2]], dtype=torch.float64)
    means2d = (centres.repeat_interleave(4, 0) + 0.3 * torch.rand(12, 2, generator=g, dtype=torch.float64))
    means2d = torch.cat([means2d, torch.tensor([[3.5, 2.5], [8.1, 6.2]], dtype=torch.float64)])[None]
    conics = torch.tensor([0.08, 0.01, 0.1], dtype=torch.float64).repeat(C, N, 1)
    conics = conics * (1 + 0.2 * torch.rand(C, N, 1, generator=g, dtype=torch.float64))
    colors = torch.rand(C, N, 3, generator=g, dtype=torch.float64)
    opacities = 0.9 + 0.08 * torch.rand(C, N, generator=g, dtype=torch.float64)
    opacities[0, 12] = 0.9995  # on a pixel centre: alpha clamped at 0.999 there
    depths = torch.rand(C, N, generator=g, dtype=torch.float64)
    radii = torch.full((C, N), 12, dtype=torch.int32)
    bgs = torch.rand(C, 3, generator=g, dtype=torch.float64)

    def f(m, c, col, op, bg):
        return composite_cpp(m, c, col, op, radii, depths, 10, 8, backgrounds=bg, tile_size=4)

    img, _ = f(means2d, conics, colors, opacities, bgs)
    ref, _ = composite(means2d, conics, colors, opacities, radii, depths, 10, 8, backgrounds=bgs, tile_size=4)
    torch.testing.assert_close(img, ref, atol=1e-12, rtol=0)
    inputs = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opacities, bgs)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_results_do_not_depend_on_thread_count():
    W, H = 48, 40
    scene = _hard_scene(dtype=torch.float32, seed=9)
    viewmats, Ks = _cameras(2, W, H, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(rasterize_cpp, scene, viewmats, Ks, W, H)
        torch.set_num_threads(3)
        three = _run(rasterize_cpp, scene, viewmats, Ks, W, H)
    finally:
        torch.set_num_threads(threads)
    _assert_same(one, three, rel=0.0)


def test_no_grad_render_equals_grad_render():
    W, H = 30, 30
    scene = _hard_scene(dtype=torch.float32, seed=2)
    viewmats, Ks = _cameras(1, W, H, dtype=torch.float32)
    img, alpha, _ = _run(rasterize_cpp, scene, viewmats, Ks, W, H)[:3]
    with torch.no_grad():
        img_ng, alpha_ng, _ = rasterize_cpp(*scene, viewmats, Ks, W, H)
    assert torch.equal(img, img_ng) and torch.equal(alpha, alpha_ng)


class _CountingStrategy(DefaultStrategy):
    """DefaultStrategy that records ``[step, clones, splits, prunes]`` of every refinement in ``events``."""

    def _grow_gs(self, params, optimizers, state, step):
        n_dupli, n_split = super()._grow_gs(params, optimizers, state, step)
        self.events.append([step, n_dupli, n_split, 0])
        return n_dupli, n_split

    def _prune_gs(self, params, optimizers, state, step):
        n_prune = super()._prune_gs(params, optimizers, state, step)
        self.events[-1][3] = n_prune
        return n_prune


def _densify_run(fn, steps: int = 16):
    """A short training loop with gsplat's DefaultStrategy: counts after every step, refinement events."""
    torch.manual_seed(0)
    W, H, N = 40, 32, 300
    g = torch.Generator().manual_seed(4)
    params = torch.nn.ParameterDict({
        "means": torch.randn(N, 3, generator=g) * 0.6,
        "quats": torch.randn(N, 4, generator=g),
        "scales": torch.log(torch.rand(N, 3, generator=g) * 0.1 + 0.01),
        "opacities": torch.logit(torch.rand(N, generator=g) * 0.9 + 0.05),
        "colors": torch.rand(N, 3, generator=g),
    })
    params["opacities"].data[:20] = -8.0  # nearly transparent: pruned
    optimizers = {k: torch.optim.Adam([{"params": p, "lr": 5e-3, "name": k}]) for k, p in params.items()}
    strategy = _CountingStrategy(refine_start_iter=3, refine_every=3, reset_every=10_000, grow_grad2d=1e-4,
                               grow_scale3d=0.05, prune_opa=0.005, absgrad=False)
    strategy.events = []
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)
    viewmats, Ks = _cameras(2, W, H, dtype=torch.float32)
    target = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(0))
    counts = []
    for step in range(steps):
        img, _alpha, info = fn(params["means"], params["quats"], torch.exp(params["scales"]),
                              torch.sigmoid(params["opacities"]), params["colors"], viewmats, Ks, W, H)
        strategy.step_pre_backward(params, optimizers, state, step, info)
        ((img - target) ** 2).mean().backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        counts.append(len(params["means"]))
    return counts, strategy.events, params


def test_densification_matches_between_paths():
    counts_ref, events_ref, params_ref = _densify_run(rasterize_torch)
    counts_cpp, events_cpp, params_cpp = _densify_run(rasterize_cpp)
    assert len(events_ref) >= 3, events_ref
    assert all(sum(e[1:]) > 0 for e in events_ref), events_ref
    assert sum(e[1] for e in events_ref) > 0 and sum(e[2] for e in events_ref) > 0, "clones and splits"
    assert sum(e[3] for e in events_ref) >= 20, "the transparent ones are pruned"
    assert events_cpp == events_ref
    assert counts_cpp == counts_ref
    for name in params_ref:
        torch.testing.assert_close(params_cpp[name], params_ref[name], atol=1e-4, rtol=1e-4)


def test_dispatch_env_var_and_one_log_line(monkeypatch, capsys):
    monkeypatch.setattr(render, "_cpu_choice", {})
    scene = _hard_scene(dtype=torch.float32, seed=1)
    viewmats, Ks = _cameras(1, 20, 20, dtype=torch.float32)
    monkeypatch.delenv(render.RASTERIZER_ENV, raising=False)
    assert render.cpu_rasterizer() is rasterize_cpp
    img, _, _ = rasterize(*scene, viewmats, Ks, 20, 20)
    monkeypatch.setenv(render.RASTERIZER_ENV, "torch")
    assert render.cpu_rasterizer() is rasterize_torch
    img_t, _, _ = rasterize(*scene, viewmats, Ks, 20, 20)
    torch.testing.assert_close(img, img_t, atol=1e-5, rtol=0)
    monkeypatch.setenv(render.RASTERIZER_ENV, "cpp")
    assert render.cpu_rasterizer() is rasterize_cpp
    lines = [l for l in capsys.readouterr().out.splitlines() if "CPU rasterizer" in l]
    assert len(lines) == 3 and "compiled C++" in lines[0] and "pure PyTorch" in lines[1], lines
    monkeypatch.setenv(render.RASTERIZER_ENV, "numba")
    with pytest.raises(ValueError, match="GVAE_RASTERIZER"):
        render.cpu_rasterizer()


def test_falls_back_to_torch_when_the_build_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(render, "_cpu_choice", {})
    monkeypatch.setattr(extension, "_lib", None)
    monkeypatch.setattr(extension, "_error", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(render.RASTERIZER_ENV, raising=False)
    assert render.cpu_rasterizer() is rasterize_torch
    assert render.cpu_rasterizer() is rasterize_torch
    out = capsys.readouterr().out
    assert out.count("CPU rasterizer") == 1 and "pure PyTorch" in out and "no-such-compiler" in out
    monkeypatch.setenv(render.RASTERIZER_ENV, "cpp")
    with pytest.raises(RuntimeError, match="cannot be built"):
        render.cpu_rasterizer()
