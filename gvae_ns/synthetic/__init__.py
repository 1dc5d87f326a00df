"""A procedural test scene with known geometry and fine detail, written as Blender-format data.

The built-in scene is fixed (so its surface is known exactly); :func:`random_scene` draws other scenes
from a seed, just as exactly known. The seed of :func:`write_scene` picks the cameras and the
ground-truth point sample, its ``scene_seed`` the scene. The package, in the order data flows:

* :mod:`~gvae_ns.synthetic.primitives`: the analytic surfaces (disc, box, sphere, rods) and their detail;
* :mod:`~gvae_ns.synthetic.scene`: the scene built from them, ray casting (:func:`trace`), views,
  depth, camera poses, surface points and distances, each for a given scene (default: the built-in one);
* :mod:`~gvae_ns.synthetic.variety`: :func:`random_scene`, seeded procedural scenes;
* :mod:`~gvae_ns.synthetic.writer`: :func:`write_scene`, the Blender-format dataset;
* :mod:`~gvae_ns.synthetic.cli`: the console tool ``gvae-synthetic``.

The names below are what callers import from ``gvae_ns.synthetic``.
"""

from gvae_ns.synthetic.cli import SyntheticConfig, main
from gvae_ns.synthetic.primitives import Box, Disc, Primitive, Rod, Sphere
from gvae_ns.synthetic.scene import (
    AMBIENT,
    CAMERA_ANGLE_X,
    CAMERA_DISTANCE,
    ELEVATION_RANGE_DEG,
    LIGHT_DIR,
    SCENE,
    camera_poses,
    look_at,
    render_depth,
    render_view,
    surface_distance,
    surface_points,
    trace,
)
from gvae_ns.synthetic.variety import random_scene
from gvae_ns.synthetic.writer import SCENE_SEED_KEY, rgba_to_uint8, save_png, write_scene

__all__ = [
    "AMBIENT",
    "CAMERA_ANGLE_X",
    "CAMERA_DISTANCE",
    "ELEVATION_RANGE_DEG",
    "LIGHT_DIR",
    "SCENE",
    "SCENE_SEED_KEY",
    "Box",
    "Disc",
    "Primitive",
    "Rod",
    "Sphere",
    "SyntheticConfig",
    "camera_poses",
    "look_at",
    "main",
    "random_scene",
    "render_depth",
    "render_view",
    "rgba_to_uint8",
    "save_png",
    "surface_distance",
    "surface_points",
    "trace",
    "write_scene",
]
