"""The procedural scene (gvae_ns.synthetic) and Blender-format dataset tools (gvae_ns.datasets)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gvae_ns import synthetic
from gvae_ns.datasets import box_downscale, check_blender_dir, downscale_blender
from gvae_ns.metrics import nearest_sq_distances
from gvae_ns.synthetic import primitives


def _composite(path: Path) -> np.ndarray:
    """A PNG composited over white, float in [0, 1], as nerfstudio's dataset does with alpha_color white."""
    img = np.asarray(Image.open(path), np.float64) / 255.0
    if img.shape[-1] == 4:
        img = img[..., :3] * img[..., 3:] + (1.0 - img[..., 3:])
    return img


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return synthetic.write_scene(
        tmp_path_factory.mktemp("scene"), resolution=32, n_train=3, n_test=2, seed=5, supersample=2, n_points=3000
    )


def test_write_scene_is_deterministic_for_a_seed(scene, tmp_path):
    again = synthetic.write_scene(
        tmp_path / "a", resolution=32, n_train=3, n_test=2, seed=5, supersample=2, n_points=3000
    )
    files = sorted(p.relative_to(scene) for p in scene.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == 3 + 2 + 2 + 3 + 1  # images, transforms, points
    for rel in files:
        assert (scene / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = synthetic.write_scene(
        tmp_path / "b", resolution=32, n_train=3, n_test=2, seed=6, supersample=2, n_points=3000
    )
    assert (other / "transforms_train.json").read_bytes() != (scene / "transforms_train.json").read_bytes()


def test_loads_through_nerfstudio_blender_dataparser(scene):
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    parser = BlenderDataParserConfig(data=scene).setup()
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        out = parser.get_dataparser_outputs(split=split)
        assert len(out.image_filenames) == count
        assert all(f.is_file() for f in out.image_filenames)
        assert int(out.cameras.width[0]) == 32 and int(out.cameras.height[0]) == 32
    aabb = out.scene_box.aabb.numpy()
    points = np.load(scene / "points_gt.npy")
    assert points.dtype == np.float32 and points.shape == (3000, 3)
    assert (points >= aabb[0]).all() and (points <= aabb[1]).all(), "scene must fit the default scene box"
    positions = out.cameras.camera_to_worlds[:, :3, 3].numpy()
    np.testing.assert_allclose(np.linalg.norm(positions, axis=1), synthetic.CAMERA_DISTANCE, rtol=1e-5)
    from nerfstudio.data.datasets.base_dataset import InputDataset

    image = InputDataset(out).get_image_float32(0)  # RGBA composited over the dataparser's white
    assert image.shape == (32, 32, 3)
    assert torch.allclose(image[0, 0], torch.ones(3)) and (image < 0.5).any()


def test_pixels_match_nerfstudio_camera_rays(tmp_path):
    """With one sample per pixel, each PNG pixel is the colour along nerfstudio's ray for that pixel."""
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    out = synthetic.write_scene(tmp_path, resolution=24, n_train=2, n_test=1, seed=1, supersample=1, n_points=10)
    cameras = BlenderDataParserConfig(data=out).setup().get_dataparser_outputs(split="train").cameras
    for index in range(2):
        rays = cameras.generate_rays(camera_indices=index)
        rgb, hit, _ = synthetic.trace(rays.origins.reshape(-1, 3).numpy(), rays.directions.reshape(-1, 3).numpy())
        expected = np.where(hit[:, None], rgb, 1.0).reshape(24, 24, 3)
        png = _composite(out / "train" / f"r_{index}.png")
        assert hit.mean() > 0.3
        assert np.abs(png - expected).max() <= 1.5 / 255


def _detail_energy(rgba: np.ndarray) -> float:
    """Mean squared difference between an image (over white) and its 4x box down-up sampled version."""
    img = rgba[..., :3] + 1.0 - rgba[..., 3:]
    return float(((img - box_downscale(img, 4).repeat(4, 0).repeat(4, 1)) ** 2).mean())


def test_images_carry_detail_lost_at_low_resolution(monkeypatch):
    c2w = synthetic.camera_poses(1, np.random.default_rng(0))[0]
    focal = 0.5 * 256 / math.tan(0.5 * synthetic.CAMERA_ANGLE_X)
    textured = _detail_energy(synthetic.render_view(c2w, 256, 256, focal, supersample=2))
    monkeypatch.setattr(primitives, "_two_tone", lambda mask, on, off: np.tile(np.float32(off), (len(mask), 1)))
    plain = _detail_energy(synthetic.render_view(c2w, 256, 256, focal, supersample=2))
    assert math.sqrt(textured) > 0.08, f"RMS lost by 4x down-up sampling is only {math.sqrt(textured):.3f}"
    assert textured > 2.0 * plain, "the fine textures should dominate what 4x down-up sampling loses"


def test_surface_points_lie_on_the_rendered_surfaces():
    points = synthetic.surface_points(20000, seed=2)
    assert points.shape == (20000, 3) and points.dtype == np.float32
    assert synthetic.surface_distance(points).max() < 1e-5
    np.testing.assert_array_equal(points, synthetic.surface_points(20000, seed=2))
    # area-uniform: the sphere's share of points is its share of the visible area
    _, box, sphere = synthetic.SCENE[:3]
    rods = synthetic.SCENE[3:]
    on_ground = np.abs(points[:, 2]) < 1e-7
    under_box = box.sdf(points.astype(np.float64) + [0.0, 0.0, 0.01]) < -1e-3
    assert on_ground.mean() > 0.4 and not (on_ground & under_box).any(), "nothing sampled between box and ground"
    footprint = 4 * box.half[0] * box.half[1]  # the box bottom and the ground under it
    hidden = 2 * footprint + sum(math.pi * r.radius**2 for r in rods if not r.start_cap)
    visible = sum(p.area() for p in synthetic.SCENE) - hidden
    share = (sphere.distance(points.astype(np.float64)) < 1e-5).mean()
    assert share == pytest.approx(sphere.area() / visible, abs=0.01)
    # the pixel-centre hits of a view are covered by the point sample, in the cameras' frame
    c2w = synthetic.camera_poses(1, np.random.default_rng(0))[0]
    focal = 0.5 * 48 / math.tan(0.5 * synthetic.CAMERA_ANGLE_X)
    depth = synthetic.render_depth(c2w, 48, 48, focal)
    v, u = np.nonzero(np.isfinite(depth))
    dirs = np.stack([(u + 0.5 - 24) / focal, -(v + 0.5 - 24) / focal, -np.ones_like(u, dtype=float)], 1) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    hits = c2w[:3, 3] + depth[v, u][:, None] * dirs
    assert synthetic.surface_distance(hits).max() < 1e-4
    to_points, _ = nearest_sq_distances(torch.from_numpy(hits), torch.from_numpy(points.astype(np.float64)))
    assert to_points.sqrt().quantile(0.99) < 0.05
    # projecting the points into that view lands them on opaque pixels (they are surface points)
    rgba = synthetic.render_view(c2w, 48, 48, focal, supersample=2)
    cam = (points - c2w[:3, 3]) @ c2w[:3, :3]
    px = np.floor(cam[:, 0] / -cam[:, 2] * focal + 24).astype(int)
    py = np.floor(-cam[:, 1] / -cam[:, 2] * focal + 24).astype(int)
    inside = (px >= 0) & (px < 48) & (py >= 0) & (py < 48)
    assert inside.mean() > 0.5
    assert (rgba[py[inside], px[inside], 3] > 0).mean() > 0.99


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"resolution": 4}, "resolution"),
        ({"supersample": 0}, "supersample"),
        ({"n_train": 0}, "n_train"),
        ({"n_points": 0}, "n_points"),
    ],
)
def test_write_scene_rejects_bad_arguments(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        synthetic.write_scene(tmp_path, **kwargs)
    assert not (tmp_path / "transforms_train.json").exists()


def test_cli_writes_a_scene_and_reports_bad_arguments(tmp_path, monkeypatch, capsys):
    argv = [
        "gvae-synthetic",
        "--out",
        str(tmp_path / "s"),
        "--resolution",
        "16",
        "--n-train",
        "1",
        "--n-val",
        "1",
        "--n-test",
        "1",
        "--supersample",
        "1",
        "--n-points",
        "20",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    synthetic.main()
    assert check_blender_dir(tmp_path / "s") == {"train": (16, 16), "val": (16, 16), "test": (16, 16)}
    assert "ns-train" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", argv[:3] + ["--resolution", "4"])
    with pytest.raises(SystemExit, match="resolution must be >= 8"):
        synthetic.main()


def test_downscale_matches_rendering_at_the_lower_resolution(tmp_path):
    """32px with 2x2 samples, box-downscaled by 2, equals 16px with 4x4 samples (same sample positions)."""
    high = synthetic.write_scene(
        tmp_path / "hi", resolution=32, n_train=2, n_test=1, seed=4, supersample=2, n_points=50
    )
    low = synthetic.write_scene(tmp_path / "lo", resolution=16, n_train=2, n_test=1, seed=4, supersample=4, n_points=50)
    small = downscale_blender(high, tmp_path / "x2", 2)
    assert check_blender_dir(small) == {"train": (16, 16), "val": (32, 32), "test": (32, 32)}
    for index in range(2):
        diff = np.abs(_composite(small / "train" / f"r_{index}.png") - _composite(low / "train" / f"r_{index}.png"))
        assert diff.max() <= 3 / 255 and diff.mean() < 0.5 / 255
    for rel in ("val/r_0.png", "test/r_0.png", "points_gt.npy", "transforms_train.json", "transforms_test.json"):
        assert (small / rel).read_bytes() == (high / rel).read_bytes(), rel
    with pytest.raises(ValueError, match="not divisible by the downscale factor 3"):
        downscale_blender(high, tmp_path / "x3", 3)


def test_box_downscale_averages_colour_premultiplied():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 0, 0, 255)  # one opaque red pixel, three transparent pixels storing green
    rgba[[0, 1, 1], [1, 0, 1]] = (0, 255, 0, 0)
    out = box_downscale(rgba, 2)[0, 0]
    np.testing.assert_allclose(out, [200, 0, 0, 255 / 4])
    np.testing.assert_allclose(box_downscale(np.arange(16.0).reshape(4, 4), 2), [[2.5, 4.5], [10.5, 12.5]])


def test_check_blender_dir_names_the_file_and_the_problem(scene, tmp_path):
    assert check_blender_dir(scene) == {"train": (32, 32), "val": (32, 32), "test": (32, 32)}
    with pytest.raises(ValueError, match="does not exist"):
        check_blender_dir(tmp_path / "nowhere")
    broken = downscale_blender(scene, tmp_path / "copy", 1)
    (broken / "transforms_val.json").unlink()
    with pytest.raises(ValueError, match=r"transforms_val\.json is missing"):
        check_blender_dir(broken)
    (broken / "transforms_val.json").write_text('{"camera_angle_x": 0.7, "frames": [', encoding="utf-8")
    with pytest.raises(ValueError, match=r"transforms_val\.json is not valid JSON \(line 1"):
        check_blender_dir(broken)
    (broken / "transforms_val.json").write_text(json.dumps({"frames": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="camera_angle_x"):
        check_blender_dir(broken)
    (broken / "transforms_val.json").write_bytes((scene / "transforms_val.json").read_bytes())
    (broken / "test" / "r_1.png").unlink()
    with pytest.raises(ValueError, match=r"transforms_test\.json: 1 of 2 frames .*r_1\.png"):
        check_blender_dir(broken)
    assert check_blender_dir(broken, splits=("train", "val")) == {"train": (32, 32), "val": (32, 32)}
