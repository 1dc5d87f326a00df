"""The console tool ``gvae-synthetic``: :func:`gvae_ns.synthetic.writer.write_scene` from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tyro

from gvae_ns.console import say
from gvae_ns.synthetic.writer import write_scene


@dataclass
class SyntheticConfig:
    """Render a procedural scene (the built-in one or a seeded random one) as a Blender-format dataset (for
    ns-train blender-data)."""

    out: Path = Path("data/gvae-synthetic")
    """Output directory (created if missing; files in it are overwritten)."""
    resolution: int = 256
    """Image width and height in pixels (>= 8)."""
    n_train: int = 60
    """Number of training views."""
    n_val: int = 10
    """Number of validation views (used by ns-train's evaluation)."""
    n_test: int = 10
    """Number of test views (used by ns-eval and the benchmark)."""
    seed: int = 0
    """Seed for the camera poses and the ground-truth point sample (the scene is picked by scene_seed)."""
    supersample: int = 3
    """Samples per pixel side; each pixel is the box-filtered mean of supersample^2 rays."""
    n_points: int = 100_000
    """Number of ground-truth surface points written to points_gt.npy (for Chamfer distance)."""
    scene_seed: int | None = None
    """Seed of a random procedural scene (ground, boxes, spheres, posts; recorded in the transforms files as
    gvae_scene_seed); None renders the built-in scene."""


def main() -> None:
    """Console entry point ``gvae-synthetic``."""
    cfg = tyro.cli(SyntheticConfig)
    try:
        out = write_scene(
            cfg.out,
            cfg.resolution,
            cfg.n_train,
            cfg.n_test,
            cfg.seed,
            cfg.supersample,
            cfg.n_val,
            cfg.n_points,
            scene_seed=cfg.scene_seed,
        )
    except ValueError as err:
        raise SystemExit(f"gvae-synthetic: {err}") from None
    which = "the built-in scene" if cfg.scene_seed is None else f"random scene {cfg.scene_seed}"
    say(
        f"Wrote {which}: {cfg.n_train}/{cfg.n_val}/{cfg.n_test} train/val/test views at {cfg.resolution}px and "
        f"{cfg.n_points} ground-truth points to {out}.\n"
        f"Train with: ns-train gaussianvae --data {out} blender-data"
    )
