"""A scene (built-in or seeded random) written as a Blender-format dataset: ``transforms_*.json``, RGBA PNGs,
ground-truth points.

The PNGs have a transparent background (nerfstudio composites them over ``alpha_color``, white by
default); transparent pixels store white so readers that drop alpha also see a white background.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from gvae_ns.datasets import SPLITS, atomic_write, write_json
from gvae_ns.synthetic.scene import (
    CAMERA_ANGLE_X,
    SCENE,
    camera_poses,
    render_view,
    surface_points,
)
from gvae_ns.synthetic.variety import random_scene

SCENE_SEED_KEY = "gvae_scene_seed"
"""Top-level key of ``transforms_*.json`` holding the scene seed (absent for the built-in scene)."""


def save_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W, C]`` image as PNG, atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def rgba_to_uint8(premultiplied: np.ndarray) -> np.ndarray:
    """Premultiplied float RGBA -> straight-alpha uint8 RGBA; fully transparent pixels store white."""
    alpha = premultiplied[..., 3:4]
    with np.errstate(divide="ignore", invalid="ignore"):
        straight = np.where(alpha > 0, premultiplied[..., :3] / alpha, 1.0)
    out = np.concatenate([np.clip(straight, 0, 1), np.clip(alpha, 0, 1)], -1)
    return np.round(out * 255).astype(np.uint8)


def _check_args(resolution: int, counts: dict[str, int], supersample: int, n_points: int) -> None:
    if resolution < 8:
        raise ValueError(f"write_scene: resolution must be >= 8 pixels, got {resolution}.")
    for name, count in counts.items():
        if count < 1:
            raise ValueError(f"write_scene: {name} must be >= 1 view, got {count}.")
    if not 1 <= supersample <= 16:
        raise ValueError(f"write_scene: supersample must be in 1..16 samples per pixel side, got {supersample}.")
    if n_points < 1:
        raise ValueError(f"write_scene: n_points must be >= 1, got {n_points}.")


def write_scene(
    out_dir: Path | str,
    resolution: int = 256,
    n_train: int = 60,
    n_test: int = 10,
    seed: int = 0,
    supersample: int = 3,
    n_val: int | None = None,
    n_points: int = 100_000,
    scene_seed: int | None = None,
) -> Path:
    """Render a scene into ``out_dir`` as a Blender-format dataset and return ``out_dir``.

    Writes ``transforms_{train,val,test}.json``, RGBA PNGs ``{split}/r_{i}.png`` of
    ``resolution x resolution`` pixels and ``points_gt.npy`` (``n_points`` surface points, float32, in the
    frame of the cameras). ``n_val`` defaults to ``n_test``. Cameras depend only on ``seed`` and the view
    counts, never on the resolution, so renders at two resolutions show the same views.

    ``scene_seed`` None renders the built-in :data:`~gvae_ns.synthetic.scene.SCENE`; an int renders
    :func:`~gvae_ns.synthetic.variety.random_scene` of it and records it in each transforms file under
    :data:`SCENE_SEED_KEY` (the built-in scene's files carry no such key).
    """
    n_val = n_test if n_val is None else n_val
    counts = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    _check_args(resolution, counts, supersample, n_points)
    scene = SCENE if scene_seed is None else random_scene(scene_seed)
    header: dict[str, object] = {"camera_angle_x": CAMERA_ANGLE_X}
    if scene_seed is not None:
        header[SCENE_SEED_KEY] = scene_seed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    focal = 0.5 * resolution / math.tan(0.5 * CAMERA_ANGLE_X)
    for index, (split, count) in enumerate(zip(SPLITS, counts.values(), strict=True)):
        (out / split).mkdir(exist_ok=True)
        poses = camera_poses(count, np.random.default_rng([seed, index]))
        frames = []
        for i, c2w in enumerate(poses):
            rgba = render_view(c2w, resolution, resolution, focal, supersample, scene=scene)
            save_png(out / split / f"r_{i}.png", rgba_to_uint8(rgba))
            frames.append({"file_path": f"./{split}/r_{i}", "rotation": 0.0, "transform_matrix": c2w.tolist()})
        write_json(out / f"transforms_{split}.json", {**header, "frames": frames})
    points = surface_points(n_points, seed, scene=scene)

    def write_points(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, points)

    atomic_write(out / "points_gt.npy", write_points)
    return out
