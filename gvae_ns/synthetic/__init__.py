"""A procedural test scene with known geometry and fine detail, written as Blender-format data.

The scene is fixed (so its surface is known exactly); the seed picks the cameras and the ground-truth
point sample. The package, in the order data flows:

* :mod:`~gvae_ns.synthetic.primitives`: the analytic surfaces (disc, box, sphere, rods) and their detail;
* :mod:`~gvae_ns.synthetic.scene`: the scene built from them, ray casting (:func:`trace`), views,
  depth, camera poses, surface points and distances;
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
from gvae_ns.synthetic.writer import rgba_to_uint8, save_png, write_scene

__all__ = [
    "AMBIENT",
    "CAMERA_ANGLE_X",
    "CAMERA_DISTANCE",
    "ELEVATION_RANGE_DEG",
    "LIGHT_DIR",
    "SCENE",
    "Box",
    "Disc",
    "Primitive",
    "Rod",
    "Sphere",
    "SyntheticConfig",
    "camera_poses",
    "look_at",
    "main",
    "render_depth",
    "render_view",
    "rgba_to_uint8",
    "save_png",
    "surface_distance",
    "surface_points",
    "trace",
    "write_scene",
]
