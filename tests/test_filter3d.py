"""Mip-Splatting's 3D smoothing filter (gvae_ns/render/filter3d.py) and ``--pipeline.model.mip-filter-3d``.

The sampling rate against hand-computed cases, the baking against the explicit covariance ``Sigma + 0.2/nu^2 I``
(3D, and projected to 2D by the renderer's own projection), the opacity mass, the model's renders and properties
(filtered once), its checkpoint state, and a tiny ``ns-train`` run whose exported PLY holds the baked values.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess

import numpy as np
import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import SceneBox
from tiny_runs import BIN, run_env, tiny_flags

from gvae_ns.model import GaussianVAEModelConfig
from gvae_ns.quaternions import covariance
from gvae_ns.refine.finetune import held_out_loss
from gvae_ns.refine.result import Refinement
from gvae_ns.refine.score import render_view
from gvae_ns.render import filter3d, project_gaussians, rasterize, world_to_camera
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


# ------------------------------------------------------------------------------------ the model
NUM = 40


def _cameras(n=3, size=32):
    """``n`` nerfstudio cameras on a circle of radius 3 around the origin, looking at it (OpenGL axes)."""
    c2w = []
    for i in range(n):
        a = 2 * math.pi * i / n
        eye = torch.tensor([3 * math.cos(a), 3 * math.sin(a), 0.5])
        back = eye / eye.norm()  # camera +z points away from the scene
        right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), back)
        right = right / right.norm()
        up = torch.linalg.cross(back, right)
        c2w.append(torch.stack([right, up, back, eye], dim=1))
    return Cameras(camera_to_worlds=torch.stack(c2w), fx=40.0, fy=40.0, cx=size / 2, cy=size / 2, width=size,
                   height=size)


def _model(**kwargs):
    config = GaussianVAEModelConfig(num_random=NUM, random_scale=1.0, stage_downscales=(2, 1), stage_steps=(5, 5),
                                    mip_filter_3d=True, **kwargs)
    return config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=3,
                        metadata={})


def _render(params, camera, mode="antialiased"):
    colors = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
    render, _, _ = rasterize(means=params["means"], quats=params["quats"], scales=torch.exp(params["scales"]),
                             opacities=torch.sigmoid(params["opacities"]).squeeze(-1), colors=colors,
                             viewmats=world_to_camera(camera.camera_to_worlds), Ks=camera.get_intrinsics_matrices(),
                             width=int(camera.width.item()), height=int(camera.height.item()), packed=False,
                             near_plane=0.01, far_plane=1e10, render_mode="RGB", sh_degree=3, rasterize_mode=mode)
    return render[0]


def test_model_renders_and_exports_the_filter_once():
    cams = _cameras()
    model = _model(background_color="black")
    model.filter3d.use_cameras(cams)
    model.eval()
    raw = {k: v.detach() for k, v in model.gauss_params.items()}
    nu = fill_unseen(max_sampling_rate(raw["means"], world_to_camera(cams.camera_to_worlds),
                                       cams.get_intrinsics_matrices(), cams.width[:, 0], cams.height[:, 0]))
    scales, logits = apply_filter_3d(raw["scales"], raw["opacities"], nu)
    # the properties ns-export reads are the baked values; the others are the parameters
    assert torch.allclose(model.scales, scales) and torch.allclose(model.opacities, logits)
    assert torch.equal(model.means, raw["means"]) and torch.equal(model.quats, raw["quats"])
    assert not torch.allclose(model.scales, raw["scales"], atol=1e-3)
    # the model's render is the baked Gaussians rendered as they are (a PLY viewer's render), not filtered twice
    with torch.no_grad():
        out = model.get_outputs(cams[0:1])["rgb"]
        baked = _render({**raw, "scales": model.scales, "opacities": model.opacities}, cams[0:1])
        twice_s, twice_o = apply_filter_3d(model.scales, model.opacities, nu)
        twice = _render({**raw, "scales": twice_s, "opacities": twice_o}, cams[0:1])
    assert torch.allclose(out, baked.clamp(0, 1), atol=1e-5)
    assert not torch.allclose(out, twice.clamp(0, 1), atol=1e-3)
    # turned off: the raw parameters again
    model.config.mip_filter_3d = False
    assert torch.equal(model.scales, model.gauss_params["scales"])


def test_training_renders_use_the_current_stage_and_backpropagate():
    cams = _cameras()
    model = _model()
    model.filter3d.use_cameras(cams)
    model.train()
    model.step = 0  # stage 0: downscale 2
    params = model.shown_params()
    full = model.filter3d.compute(model.gauss_params["means"].detach(), downscale=1)
    expected, _ = apply_filter_3d(model.gauss_params["scales"], model.gauss_params["opacities"], full / 2)
    assert torch.allclose(params["scales"], expected)
    params["scales"].sum().backward()
    assert model.gauss_params["scales"].grad is not None and torch.isfinite(model.gauss_params["scales"].grad).all()
    model.step = 5  # stage 1: the data's resolution; the rates follow the stage switch
    expected, _ = apply_filter_3d(model.gauss_params["scales"], model.gauss_params["opacities"], full)
    assert torch.allclose(model.shown_params()["scales"], expected)
    # evaluation renders use the stage trained last
    model.eval()
    assert torch.allclose(model.scales, expected)


def test_checkpoint_state_round_trip_and_old_checkpoints(tmp_path):
    cams = _cameras()
    model = _model()
    model.filter3d.use_cameras(cams)
    model.eval()
    baked = model.scales.detach().clone()
    state = model.state_dict()
    torch.save(state, tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)  # as stock ns-viewer / ns-export load
    fresh = _model()
    fresh.load_state_dict(state)
    fresh.eval()
    assert fresh.filter3d.cameras is not None
    assert torch.equal(fresh.scales, baked)
    fresh.filter3d.cameras = None  # no cameras at all: the stored rates alone suffice
    assert torch.equal(fresh.scales, baked)
    # a checkpoint from before the filter: loads, and renders unfiltered (with a warning) when there is nothing
    state["_extra_state"] = {"lineage": state["_extra_state"]["lineage"]}
    old = _model()
    old.load_state_dict(state)
    old.eval()
    assert torch.equal(old.scales, old.gauss_params["scales"])


def test_refined_gaussians_get_rates_from_the_stored_cameras():
    cams = _cameras()
    model = _model()
    model.filter3d.use_cameras(cams)
    model.eval()
    trained = model.scales.detach().clone()
    raw = {k: v.detach() for k, v in model.gauss_params.items()}
    moved = raw["means"][:5] * 0.3  # "children" nearer the centre: other rates
    refined = {k: torch.cat([v, v[:5]]) for k, v in raw.items()}
    refined["means"] = torch.cat([raw["means"], moved])
    model.set_refinement(refined, torch.cat([torch.zeros(NUM, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]))
    assert model.refinement_active
    nu = model.filter3d.compute(refined["means"], downscale=1)
    expected, _ = apply_filter_3d(refined["scales"], refined["opacities"], nu)
    assert torch.allclose(model.scales, expected)
    assert torch.allclose(model.scales[:NUM], trained)  # the kept rows: as trained


def _refinement(model, steps):
    raw = {k: v.detach() for k, v in model.gauss_params.items()}
    refined = {k: torch.cat([v, v[:5]]) for k, v in raw.items()}
    refined["scales"] = torch.cat([raw["scales"], raw["scales"][:5] - 3.0])  # small children: the filter binds
    is_new = torch.cat([torch.zeros(NUM, dtype=torch.bool), torch.ones(5, dtype=torch.bool)])
    return Refinement(params=refined, is_new=is_new,
                      selected=torch.arange(5), removed=torch.zeros(0, dtype=torch.long), scores={}, num_original=NUM,
                      steps=steps, select="hessian", decoder="split")


def test_a_refinement_k_stages_finer_is_shown_with_the_filter_loosened_to_that_rate():
    cams = _cameras()
    model = _model()
    model.filter3d.use_cameras(cams)
    model.eval()
    one = _refinement(model, steps=1)
    model.show_refinement(one)
    nu = model.filter3d.compute(one.params["means"], downscale=1)
    loosened, _ = apply_filter_3d(one.params["scales"], one.params["opacities"], 2 * nu)
    assert torch.allclose(model.scales, loosened)
    trained_rate, _ = apply_filter_3d(one.params["scales"], one.params["opacities"], nu)
    assert (model.scales < trained_rate - 1e-4).all(), "every row is filtered less than at the trained rate"
    two = _refinement(model, steps=2)
    model.show_refinement(two)
    assert torch.allclose(model.scales, apply_filter_3d(two.params["scales"], two.params["opacities"], 4 * nu)[0])
    model.set_refinement(two.params, two.is_new)  # no record of how it was made: the trained rate
    assert torch.allclose(model.scales, trained_rate)


def test_refinement_renders_bake_the_run_filter_trained_or_loosened():
    cams = _cameras()
    model = _model()
    model.filter3d.use_cameras(cams)
    model.eval()
    raw = {k: v.detach() for k, v in model.gauss_params.items()}
    images = [torch.full((32, 32, 3), 0.5) for _ in range(3)]
    views = model.scoring_views(cams, images)
    assert views.filter3d is model.filter3d
    plain = dataclasses.replace(views, filter3d=None)
    nu = model.filter3d.compute(raw["means"], downscale=1)
    for filter_scale in (1.0, 2.0):
        scales, logits = apply_filter_3d(raw["scales"], raw["opacities"], filter_scale * nu)
        got, _ = render_view(raw, views, 0, scale=2, filter_scale=filter_scale)
        expected, _ = render_view({**raw, "scales": scales, "opacities": logits}, plain, 0, scale=2)
        assert torch.allclose(got, expected, atol=1e-6)
    # the held-out check compares the trained scene as shown (its rate) with a refinement (loosened)
    trained = held_out_loss(raw, views, 2, trained=True)
    assert trained == pytest.approx(held_out_loss({**raw, **dict(zip(("scales", "opacities"), apply_filter_3d(
        raw["scales"], raw["opacities"], nu)))}, plain, 2), abs=1e-6)
    assert abs(held_out_loss(raw, views, 2) - trained) > 1e-6
    model.config.mip_filter_3d = False
    assert model.scoring_views(cams, images).filter3d is None


# ------------------------------------------------------------------------------------ a real run
def _ns(cmd, *args):
    proc = subprocess.run([str(BIN / cmd), *map(str, args)], capture_output=True, text=True, env=run_env(),
                          timeout=600)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_tiny_run_with_the_filter_exports_the_baked_gaussians(tmp_path):
    from nerfstudio.utils.eval_utils import eval_setup
    from test_splat_transform import assert_ply_matches, expected_columns

    from gvae_ns.gaussians import PARAM_KEYS
    from gvae_ns.synthetic import write_scene

    scene = write_scene(tmp_path / "scene", resolution=32, n_train=6, n_test=1, n_val=1, supersample=2,
                        n_points=2000)
    flags = tiny_flags(num_random=300, stage_steps=(10, 10, 20))
    _ns("ns-train", "gaussianvae", "--output-dir", tmp_path / "out", "--experiment-name", "f", *flags,
        "--pipeline.model.mip-filter-3d", "True", "--pipeline.model.refinement-after-training", "False",
        "blender-data", "--data", scene)
    run = next((tmp_path / "out" / "f" / "gaussianvae").iterdir())
    ckpt = torch.load(next((run / "nerfstudio_models").glob("*.ckpt")), map_location="cpu", weights_only=True)
    raw = {k: ckpt["pipeline"][f"_model.gauss_params.{k}"] for k in PARAM_KEYS}
    saved = ckpt["pipeline"]["_model._extra_state"]["filter3d"]
    n = raw["means"].shape[0]
    assert n != 300  # densification changed the rows ...
    assert saved["nu"].shape == (n,) and int(saved["downscale"]) == 1  # ... and the rates followed, at the finest

    # the saved rates are those of the training cameras at the finest stage, for the current rows (they are
    # recomputed when the rows change, not as the Gaussians move between densifications: close, not equal)
    _, pipeline, _, _ = eval_setup(run / "config.yml", test_mode="inference")
    cams = pipeline.datamanager.train_dataset.cameras
    nu = fill_unseen(max_sampling_rate(raw["means"], world_to_camera(cams.camera_to_worlds),
                                       cams.get_intrinsics_matrices(), cams.width[:, 0], cams.height[:, 0]))
    assert torch.allclose(saved["nu"], nu, rtol=0.02)

    _ns("ns-export", "gaussian-splat", "--load-config", run / "config.yml", "--output-dir", tmp_path / "ply")
    scales, logits = apply_filter_3d(raw["scales"], raw["opacities"], saved["nu"])
    baked = expected_columns({**raw, "scales": scales, "opacities": logits}, sh_degree=3)
    plain = expected_columns(raw, sh_degree=3)
    assert not np.allclose(baked["scale_0"], plain["scale_0"], atol=1e-3)  # the filter changed them
    assert_ply_matches(tmp_path / "ply" / "splat.ply", baked)  # bit for bit
