"""Seeded procedural scenes (gvae_ns.synthetic.variety) and the scene threaded through rendering and writing."""

from __future__ import annotations

import itertools
import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from gvae_ns import synthetic
from gvae_ns.datasets import check_blender_dir
from gvae_ns.synthetic import Box, Disc, Rod, Sphere, random_scene
from gvae_ns.synthetic.primitives import hashed_cells
from gvae_ns.synthetic.variety import MAX_OBJECTS, MIN_OBJECTS, SCENE_RADIUS

SEEDS = range(24)
GEOMETRY_SEEDS = range(48)
"""Enough seeds that, without the reach check, a few scenes would stick out of SCENE_RADIUS."""


def _view(res: int, index: int = 0) -> tuple[np.ndarray, float]:
    c2w = synthetic.camera_poses(index + 1, np.random.default_rng(7))[index]
    return c2w, 0.5 * res / math.tan(0.5 * synthetic.CAMERA_ANGLE_X)


def _unique_albedo(prim, n: int = 4000) -> set[tuple[float, ...]]:
    points = prim.sample(n, np.random.default_rng(0))
    return {tuple(row) for row in prim.normal_albedo(points)[1].tolist()}


def _as_float32(*colours: tuple[float, float, float]) -> set[tuple[float, ...]]:
    return {tuple(np.float32(c).tolist()) for c in colours}


def _objects(scene) -> int:
    """Boxes, spheres and groups of posts (the posts of one group share radius and band length)."""
    groups = {(p.radius, p.band) for p in scene if isinstance(p, Rod) and not p.start_cap}
    return sum(isinstance(p, Box | Sphere) for p in scene) + len(groups)


def test_same_seed_same_scene_and_render():
    a, b = random_scene(3), random_scene(3)
    assert a == b and a is not b
    c2w, focal = _view(24)
    first = synthetic.render_view(c2w, 24, 24, focal, scene=a)
    np.testing.assert_array_equal(first, synthetic.render_view(c2w, 24, 24, focal, scene=b))
    assert first[..., 3].mean() > 0.3, "the scene should fill a good part of the view"


def test_seeds_give_different_scenes_and_images():
    scenes = [random_scene(seed) for seed in SEEDS]
    for a, b in itertools.combinations(scenes, 2):
        assert a != b
    counts = [_objects(s) for s in scenes]
    assert all(MIN_OBJECTS <= c <= MAX_OBJECTS for c in counts), counts
    assert len(set(counts)) >= 4 and len({len(s) for s in scenes}) >= 6, "the number of objects should vary"
    assert len({s[0].checker for s in scenes}) == len(scenes) and len({s[0].light for s in scenes}) == len(scenes)
    kinds = {type(p) for s in scenes for p in s[1:]}
    assert kinds == {Box, Sphere, Rod}
    assert {s[0].pattern for s in scenes} == {"checker", "cells"}
    assert {p.pattern for s in scenes for p in s if isinstance(p, Box)} == {"stripes", "cells"}
    assert any(isinstance(p, Rod) and p.start_cap for s in scenes for p in s), "some posts carry a crossbar"
    assert len({p.radius for s in scenes for p in s if isinstance(p, Sphere)}) > 5
    c2w, focal = _view(24)
    images = [synthetic.render_view(c2w, 24, 24, focal, scene=s) for s in scenes[:5]]
    for a, b in itertools.combinations(images, 2):
        assert np.abs(a - b).mean() > 0.03


@pytest.mark.parametrize("seed", GEOMETRY_SEEDS)
def test_random_scene_stays_in_the_box_above_ground_and_off_the_cameras(seed):
    scene = random_scene(seed)
    ground, objects = scene[0], scene[1:]
    assert isinstance(ground, Disc) and ground.radius <= SCENE_RADIUS
    assert not any(isinstance(p, Disc) for p in objects)
    rng = np.random.default_rng(seed)
    solids = [p for p in objects if isinstance(p, Box | Sphere)]
    for prim in objects:
        points = prim.sample(3000, rng)
        assert np.linalg.norm(points, axis=1).max() <= SCENE_RADIUS + 1e-9
        assert points[:, 2].min() >= -1e-9, f"{prim} reaches below the ground"
        assert (np.abs(points) <= 1.5).all()
        feet = points[points[:, 2] < 1e-3]
        assert (np.linalg.norm(feet[:, :2], axis=1) < ground.radius).all(), "objects stand on the ground disc"
        if isinstance(prim, Box):
            assert prim.center[2] == prim.half[2], "boxes rest on the ground"
        if isinstance(prim, Sphere):
            assert prim.center[2] >= prim.radius
        if isinstance(prim, Rod) and not prim.start_cap:
            assert prim.start[2] == 0.0 and prim.end[2] > 0.1, "posts stand on the ground"
        for other in solids:
            if other is not prim:
                assert other.sdf(points).min() > 0, f"{prim} intersects {other}"
    assert SCENE_RADIUS < synthetic.CAMERA_DISTANCE - 2


def test_rendered_hits_and_surface_points_lie_on_the_random_scene():
    scene = random_scene(5)
    points = synthetic.surface_points(4000, seed=1, scene=scene)
    assert points.shape == (4000, 3) and points.dtype == np.float32
    assert synthetic.surface_distance(points, scene=scene).max() < 1e-5
    assert (synthetic.surface_distance(points) > 1e-3).mean() > 0.1, "the objects are not the built-in scene's"
    for other in (p for p in scene if hasattr(p, "sdf")):
        assert other.sdf(points.astype(np.float64)).min() > -1e-5, "no point buried inside an object"
    c2w, focal = _view(32)
    depth = synthetic.render_depth(c2w, 32, 32, focal, scene=scene)
    v, u = np.nonzero(np.isfinite(depth))
    assert len(v) > 300
    dirs = np.stack([(u + 0.5 - 16) / focal, -(v + 0.5 - 16) / focal, -np.ones(len(u))], 1) @ c2w[:3, :3].T
    hits = c2w[:3, 3] + depth[v, u][:, None] * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    assert synthetic.surface_distance(hits, scene=scene).max() < 1e-4


def test_built_in_scene_is_unchanged():
    c2w, focal = _view(24)
    default = synthetic.render_view(c2w, 24, 24, focal, supersample=2)
    explicit = synthetic.render_view(c2w, 24, 24, focal, supersample=2, scene=synthetic.SCENE)
    np.testing.assert_array_equal(default, explicit)
    other = synthetic.render_view(c2w, 24, 24, focal, supersample=2, scene=random_scene(0))
    assert np.abs(default - other).mean() > 0.03
    np.testing.assert_array_equal(
        synthetic.render_depth(c2w, 24, 24, focal), synthetic.render_depth(c2w, 24, 24, focal, scene=synthetic.SCENE)
    )
    # the colour fields default to the colours the built-in scene always had
    disc, box, sphere, *rods = synthetic.SCENE
    assert _unique_albedo(disc) == _as_float32((0.86, 0.85, 0.8), (0.33, 0.38, 0.45), (0.08, 0.08, 0.1))
    assert _unique_albedo(box) == _as_float32((0.8, 0.16, 0.1), (0.95, 0.9, 0.84))
    assert _unique_albedo(sphere) == _as_float32((0.08, 0.08, 0.3), (0.93, 0.76, 0.3))
    assert _unique_albedo(rods[0]) == _as_float32((0.1, 0.55, 0.2), (0.95, 0.95, 0.95))
    assert _unique_albedo(rods[-1]) == _as_float32((0.2, 0.2, 0.2), (0.95, 0.95, 0.95))
    assert (disc.pattern, box.pattern, box.stripe_period, disc.checker) == ("checker", "stripes", 0.035, 0.045)


def test_cell_noise_pattern():
    p = np.random.default_rng(0).uniform(-1, 1, (5000, 3))
    values = hashed_cells(p, 0.1)
    assert values.min() >= 0 and values.max() < 1 and values.std() > 0.2
    np.testing.assert_array_equal(values, hashed_cells(np.floor(p / 0.1) * 0.1 + 0.05, 0.1))  # constant per cell
    noisy = Disc(pattern="cells", light=(1.0, 1.0, 1.0), dark=(0.0, 0.0, 0.0), ring_color=(0.5, 0.5, 0.5))
    colours = _unique_albedo(noisy)
    assert len(colours) > 100 and all(r == g == b for r, g, b in colours)
    assert len(_unique_albedo(Box(pattern="cells"))) > 50
    with pytest.raises(ValueError, match="pattern"):
        Box(pattern="checker")


def test_write_scene_with_a_scene_seed(tmp_path):
    kwargs = {"n_train": 2, "n_test": 1, "seed": 0, "supersample": 1}
    out = synthetic.write_scene(tmp_path / "s", 16, n_points=2000, scene_seed=3, **kwargs)
    assert check_blender_dir(out) == {"train": (16, 16), "val": (16, 16), "test": (16, 16)}
    scene = random_scene(3)
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        meta = json.loads((out / f"transforms_{split}.json").read_text(encoding="utf-8"))
        assert meta[synthetic.SCENE_SEED_KEY] == 3 and len(meta["frames"]) == count
        for i, frame in enumerate(meta["frames"]):
            focal = 0.5 * 16 / math.tan(0.5 * meta["camera_angle_x"])
            rgba = synthetic.render_view(np.array(frame["transform_matrix"]), 16, 16, focal, scene=scene)
            png = np.asarray(Image.open(out / split / f"r_{i}.png"))
            np.testing.assert_array_equal(png, synthetic.rgba_to_uint8(rgba))
    points = np.load(out / "points_gt.npy")
    assert points.shape == (2000, 3) and synthetic.surface_distance(points, scene=scene).max() < 1e-5
    plain = synthetic.write_scene(tmp_path / "p", 16, n_points=20, **kwargs)
    meta = json.loads((plain / "transforms_train.json").read_text(encoding="utf-8"))
    assert set(meta) == {"camera_angle_x", "frames"}, "the built-in scene's files carry no scene seed"
    assert (plain / "train" / "r_0.png").read_bytes() != (out / "train" / "r_0.png").read_bytes()


def test_cli_scene_seed(tmp_path, monkeypatch, capsys):
    argv = ["gvae-synthetic", "--resolution", "16", "--n-train", "1", "--n-val", "1", "--n-test", "1"]
    argv += ["--supersample", "1", "--n-points", "20"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path / "r"), "--scene-seed", "11"])
    synthetic.main()
    assert "random scene 11" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "transforms_test.json").read_text(encoding="utf-8"))["gvae_scene_seed"] == 11
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path / "b")])
    synthetic.main()
    assert "built-in scene" in capsys.readouterr().out
    assert "gvae_scene_seed" not in json.loads((tmp_path / "b" / "transforms_test.json").read_text(encoding="utf-8"))
