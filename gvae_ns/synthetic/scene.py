"""The built-in scene (:data:`SCENE`, fixed) and everything computed from a scene: ray casting, views,
cameras, points. Each function that reads a scene takes it as the keyword ``scene`` (a sequence of
primitives, the ground disc first, as :func:`gvae_ns.synthetic.variety.random_scene` builds), defaulting
to :data:`SCENE`.

World frame: z up, everything inside the Blender dataparser's default scene box ``[-1.5, 1.5]^3``.
Cameras sit on the upper hemisphere of radius ``CAMERA_DISTANCE`` and look at the origin. Images are
ray cast analytically in numpy and box filtered from ``supersample x supersample`` samples per pixel,
so a lower resolution is the area-filtered version of a higher one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gvae_ns.synthetic.primitives import Box, Disc, Primitive, Rod, Sphere, rowwise_dot

CAMERA_DISTANCE = 3.6
"""Distance of every camera from the origin."""
CAMERA_ANGLE_X = 0.6911112070083618
"""Horizontal field of view in radians (the value of the NeRF-synthetic scenes)."""
ELEVATION_RANGE_DEG = (12.0, 70.0)
"""Camera elevations above the ground plane, sampled uniformly in area on the sphere band."""
LIGHT_DIR = np.array([0.4, 0.3, 0.85]) / np.linalg.norm([0.4, 0.3, 0.85])
"""Direction towards the (distant) light, used for view-independent Lambertian shading."""
AMBIENT = 0.45
"""Shade of a surface facing away from the light; a surface facing it gets 1."""
_RAYS_PER_CHUNK = 1 << 18


def _shade(normals: np.ndarray) -> np.ndarray:
    lambert = np.clip(normals @ LIGHT_DIR.astype(normals.dtype), 0.0, 1.0)
    return (AMBIENT + (1.0 - AMBIENT) * lambert)[:, None]


def _build_scene() -> tuple[Primitive, ...]:
    posts = [
        ((0.2, 0.8, 0.7), (0.1, 0.55, 0.2)),
        ((0.8, 0.35, 0.7), (0.15, 0.3, 0.8)),
        ((-0.85, -0.3, 0.85), (0.75, 0.2, 0.6)),
        ((-0.15, -0.82, 0.6), (0.9, 0.55, 0.1)),
        ((0.8, -0.78, 0.5), (0.1, 0.5, 0.55)),
    ]
    rods = [Rod(start=(x, y, 0.0), end=(x, y, h), start_cap=False, color=color) for (x, y, h), color in posts]
    # a crossbar lying on the first two posts, overhanging each by 0.05
    a, b = np.array(posts[0][0][:2]), np.array(posts[1][0][:2])
    step = 0.05 * (b - a) / np.linalg.norm(b - a)
    bar_z = 0.7 + 0.012
    bar = Rod(
        start=(float(a[0] - step[0]), float(a[1] - step[1]), bar_z),
        end=(float(b[0] + step[0]), float(b[1] + step[1]), bar_z),
        color=(0.2, 0.2, 0.2),
    )
    return (Disc(), Box(), Sphere(), *rods, bar)


SCENE = _build_scene()
"""The primitives of the built-in scene; the ground disc comes first."""


def trace(
    origins: np.ndarray, directions: np.ndarray, *, scene: Sequence[Primitive] = SCENE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cast rays into ``scene``. ``origins`` is ``[N, 3]`` or one shared ``[3]`` origin, ``directions``
    ``[N, 3]`` unit vectors. Returns the shaded colour ``[N, 3]`` (0 on a miss), the hit mask ``[N]``
    and the distance ``[N]`` (``inf`` on a miss)."""
    d = np.ascontiguousarray(directions, np.float32).reshape(-1, 3)
    o = np.asarray(origins, np.float32)
    shared = o.ndim == 1
    o_rays = np.broadcast_to(o, d.shape) if shared else np.ascontiguousarray(o).reshape(-1, 3)
    if not shared:
        o_d, o_o = rowwise_dot(o_rays, d), rowwise_dot(o_rays, o_rays)
    t = np.full(len(d), np.inf, np.float32)
    owner = np.full(len(d), -1, np.int16)
    for k, prim in enumerate(scene):
        center, radius = prim.bounds()
        c = center.astype(np.float32)
        if shared:  # distance from the bounding sphere's centre to each ray
            along = d @ (c - o)
            dist2 = float((c - o) @ (c - o)) - along * along
        else:
            along = d @ c - o_d
            dist2 = o_o - 2 * (o_rays @ c) + float(c @ c) - along * along
        near = np.flatnonzero((dist2 <= (1.001 * radius) ** 2) & (along > -radius))
        if near.size:
            t_prim = prim.intersect(o_rays[near], d[near])
            closer = t_prim < t[near]
            t[near[closer]] = t_prim[closer]
            owner[near[closer]] = k
    rgb = np.zeros((len(d), 3), np.float32)
    for k, prim in enumerate(scene):
        idx = np.flatnonzero(owner == k)
        if idx.size:
            normals, albedo = prim.normal_albedo(o_rays[idx] + t[idx, None] * d[idx])
            rgb[idx] = albedo * _shade(normals)
    return rgb, owner >= 0, t


def _rays(
    c2w: np.ndarray, width: int, height: int, focal: float, v: np.ndarray, u: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The camera centre and unit rays through image points (``u`` right, ``v`` down, in pixels from the
    top-left corner)."""
    cam = np.stack([(u - 0.5 * width) / focal, -(v - 0.5 * height) / focal, -np.ones_like(u)], -1)
    dirs = cam.reshape(-1, 3) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return c2w[:3, 3], dirs


def render_view(
    c2w: np.ndarray,
    width: int,
    height: int,
    focal: float,
    supersample: int = 1,
    *,
    scene: Sequence[Primitive] = SCENE,
) -> np.ndarray:
    """Render one pinhole view of ``scene`` (Blender / OpenGL camera-to-world ``c2w``, principal point at the image
    centre) as premultiplied RGBA ``[H, W, 4]`` float32, the box-filtered mean of
    ``supersample x supersample`` evenly spaced samples in each pixel."""
    c2w = np.asarray(c2w, np.float64)
    ss = supersample
    offsets = (np.arange(ss) + 0.5) / ss
    cols = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    rows_per_chunk = max(1, _RAYS_PER_CHUNK // (width * ss * ss))
    rgba = np.zeros((height, width, 4), np.float32)
    for r0 in range(0, height, rows_per_chunk):
        r1 = min(height, r0 + rows_per_chunk)
        rows = (np.arange(r0, r1)[:, None] + offsets[None, :]).reshape(-1)
        rays = _rays(c2w, width, height, focal, *np.meshgrid(rows, cols, indexing="ij"))
        rgb, hit, _ = trace(*rays, scene=scene)
        samples = np.concatenate([rgb, hit[:, None].astype(np.float32)], 1)
        rgba[r0:r1] = samples.reshape(r1 - r0, ss, width, ss, 4).mean((1, 3))
    return rgba


def render_depth(
    c2w: np.ndarray, width: int, height: int, focal: float, *, scene: Sequence[Primitive] = SCENE
) -> np.ndarray:
    """Distance along the ray through each pixel centre to ``scene`` ``[H, W]`` (``inf`` where nothing is
    hit)."""
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    _, _, depth = trace(*_rays(np.asarray(c2w, np.float64), width, height, focal, v, u), scene=scene)
    return depth.reshape(height, width)


def look_at(position: np.ndarray, target: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Blender / OpenGL camera-to-world 4x4 (x right, y up, looking down -z) at ``position``, z up."""
    position = np.asarray(position, np.float64)
    forward = np.asarray(target, np.float64) - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, position
    return c2w


def camera_poses(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` camera-to-world matrices ``[n, 4, 4]`` on the upper hemisphere band, looking at the origin."""
    lo, hi = (math.sin(math.radians(e)) for e in ELEVATION_RANGE_DEG)
    z = rng.uniform(lo, hi, n)
    azimuth = rng.uniform(0.0, 2 * math.pi, n)
    ring = np.sqrt(1 - z * z)
    positions = CAMERA_DISTANCE * np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), z], 1)
    return np.stack([look_at(p) for p in positions]) if n else np.zeros((0, 4, 4))


def _solids(scene: Sequence[Primitive]) -> list[Primitive]:
    return [prim for prim in scene if hasattr(prim, "sdf")]


def surface_points(n: int, seed: int = 0, *, scene: Sequence[Primitive] = SCENE) -> np.ndarray:
    """``n`` points ``[n, 3]`` float32 drawn uniformly by area from the visible surface of ``scene``:
    the union of the primitives, without the parts buried in another object or in the ground
    (box bottom, rod feet, ground under objects)."""
    if n < 1:
        raise ValueError(f"surface_points: n must be >= 1, got {n}.")
    rng = np.random.default_rng(seed)
    areas = np.array([prim.area() for prim in scene])
    solids = _solids(scene)
    kept: list[np.ndarray] = []
    total = 0
    while total < n:
        counts = rng.multinomial(int(1.2 * (n - total)) + 16, areas / areas.sum())
        for prim, count in zip(scene, counts, strict=True):
            if count == 0:
                continue
            p = prim.sample(int(count), rng)
            buried = np.zeros(len(p), dtype=bool) if isinstance(prim, Disc) else p[:, 2] <= 1e-6
            for other in solids:
                if other is not prim:
                    buried |= other.sdf(p) <= 1e-6
            kept.append(p[~buried])
            total += int((~buried).sum())
    points = np.concatenate(kept)
    return points[rng.permutation(len(points))[:n]].astype(np.float32)


def surface_distance(points: np.ndarray, *, scene: Sequence[Primitive] = SCENE) -> np.ndarray:
    """Unsigned distance ``[M]`` from each point to the nearest primitive surface of ``scene``."""
    p = np.asarray(points, np.float64).reshape(-1, 3)
    return np.min(np.stack([prim.distance(p) for prim in scene]), 0)
