"""A procedural test scene with known geometry and fine detail, written as Blender-format data.

The scene is fixed (so its surface is known exactly); the seed picks the cameras and the ground-truth
point sample. World frame: z up, everything inside the Blender dataparser's default scene box
``[-1.5, 1.5]^3``. Cameras sit on the upper hemisphere of radius ``CAMERA_DISTANCE`` and look at the
origin. The objects carry detail 0.015-0.05 scene units wide (1-5 pixels at 256 px) that only survives
at high resolution:

- a ground disc (z = 0) with a fine checker and thin rings,
- a yawed box resting on the ground with thin diagonal stripes,
- a sphere resting on the ground covered in rows of tiny 3x5 glyphs (text-like marks),
- thin vertical rods and a crossbar with coloured bands.

Images are ray cast analytically in numpy and box filtered from ``supersample x supersample`` samples
per pixel, so a lower resolution is the area-filtered version of a higher one. They are RGBA PNGs with
a transparent background (nerfstudio composites them over ``alpha_color``, white by default);
transparent pixels store white so readers that drop alpha also see a white background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
from PIL import Image

from gvae_ns.datasets import SPLITS, atomic_write, write_json

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


class Primitive(Protocol):
    """What the renderer and the point sampler need from one analytic surface."""

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Distance to the first hit along each ray ``o + t d`` (``inf`` on a miss)."""

    def normal_albedo(self, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Unit normals and colours ``([N, 3], [N, 3])`` at surface points."""

    def bounds(self) -> Tuple[np.ndarray, float]:
        """Centre and radius of a bounding sphere."""

    def area(self) -> float:
        """Surface area (of the parts that exist: open ends are not counted)."""

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` points drawn uniformly by area from the surface."""

    def distance(self, p: np.ndarray) -> np.ndarray:
        """Unsigned distance from points to the surface."""


def _shade(normals: np.ndarray) -> np.ndarray:
    lambert = np.clip(normals @ LIGHT_DIR.astype(normals.dtype), 0.0, 1.0)
    return (AMBIENT + (1.0 - AMBIENT) * lambert)[:, None]


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _two_tone(mask: np.ndarray, on: Sequence[float], off: Sequence[float]) -> np.ndarray:
    return np.where(mask[:, None], np.asarray(on, np.float32), np.asarray(off, np.float32))


@dataclass(frozen=True)
class Disc:
    """The ground: a disc in the plane z = 0, seen from above, with a checker and thin rings."""

    radius: float = 1.2
    """Disc radius."""
    checker: float = 0.045
    """Edge length of one checker cell."""
    ring_spacing: float = 0.3
    """Distance between the thin dark rings."""
    ring_width: float = 0.008
    """Width of a ring."""

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -o[:, 2] / d[:, 2]
        p = o[:, :2] + t[:, None] * d[:, :2]
        ok = (d[:, 2] < 0) & (o[:, 2] > 0) & ((p * p).sum(1) <= self.radius**2)
        return np.where(ok, t, np.inf)

    def normal_albedo(self, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        cells = np.floor(p[:, 0] / self.checker) + np.floor(p[:, 1] / self.checker)
        albedo = _two_tone(cells % 2 == 0, (0.86, 0.85, 0.8), (0.33, 0.38, 0.45))
        r = np.sqrt((p[:, :2] ** 2).sum(1))
        k = np.round(r / self.ring_spacing)
        ring = (k > 0) & (np.abs(r - k * self.ring_spacing) < 0.5 * self.ring_width)
        albedo[ring] = (0.08, 0.08, 0.1)
        normals = np.zeros_like(p)
        normals[:, 2] = 1.0
        return normals, albedo

    def bounds(self) -> Tuple[np.ndarray, float]:
        return np.zeros(3), self.radius

    def area(self) -> float:
        return math.pi * self.radius**2

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        r = self.radius * np.sqrt(rng.random(n))
        phi = rng.random(n) * 2 * math.pi
        return np.stack([r * np.cos(phi), r * np.sin(phi), np.zeros(n)], 1)

    def distance(self, p: np.ndarray) -> np.ndarray:
        outside = np.maximum(np.sqrt((p[:, :2] ** 2).sum(1)) - self.radius, 0.0)
        return np.sqrt(outside**2 + p[:, 2] ** 2)


@dataclass(frozen=True)
class Box:
    """A box turned by ``yaw`` about z, with diagonal stripes running over all faces."""

    center: Tuple[float, float, float] = (0.42, -0.36, 0.27)
    """Centre of the box."""
    half: Tuple[float, float, float] = (0.26, 0.2, 0.27)
    """Half extents along the box's own axes."""
    yaw: float = 0.5
    """Rotation about the world z axis, radians."""
    stripe_period: float = 0.035
    """Period of the stripes, measured along the (1, 1, 1) diagonal of the box frame."""

    def _rot(self) -> np.ndarray:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def _local(self, p: np.ndarray) -> np.ndarray:
        return (p - np.asarray(self.center, p.dtype)) @ self._rot().astype(p.dtype)

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        lo, ld = self._local(o), d @ self._rot().astype(d.dtype)
        h = np.asarray(self.half, o.dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-h - lo) / ld, (h - lo) / ld
        t_near = np.nanmax(np.minimum(t1, t2), 1)
        t_far = np.nanmin(np.maximum(t1, t2), 1)
        ok = (t_far >= np.maximum(t_near, 0)) & (t_near > 0)
        return np.where(ok, t_near, np.inf)

    def normal_albedo(self, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        q = self._local(p)
        rel = np.abs(q) / np.asarray(self.half, p.dtype)
        axis = rel.argmax(1)
        local_n = np.zeros_like(p)
        local_n[np.arange(len(p)), axis] = np.sign(q[np.arange(len(p)), axis])
        stripes = np.floor(q.sum(1) / self.stripe_period) % 2 == 0
        albedo = _two_tone(stripes, (0.8, 0.16, 0.1), (0.95, 0.9, 0.84))
        return local_n @ self._rot().T.astype(p.dtype), albedo

    def bounds(self) -> Tuple[np.ndarray, float]:
        return np.asarray(self.center), float(np.linalg.norm(self.half))

    def area(self) -> float:
        hx, hy, hz = self.half
        return 8.0 * (hx * hy + hy * hz + hx * hz)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        h = np.asarray(self.half)
        face_areas = np.array([h[1] * h[2], h[0] * h[2], h[0] * h[1]])
        axis = rng.choice(3, size=n, p=face_areas / face_areas.sum())
        q = (rng.random((n, 3)) * 2 - 1) * h
        q[np.arange(n), axis] = np.where(rng.random(n) < 0.5, -1.0, 1.0) * h[axis]
        return q @ self._rot().T + np.asarray(self.center)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        q = np.abs(self._local(p)) - np.asarray(self.half)
        return np.sqrt((np.maximum(q, 0) ** 2).sum(1)) + np.minimum(q.max(1), 0)

    def distance(self, p: np.ndarray) -> np.ndarray:
        return np.abs(self.sdf(p))


_GLYPH_ROWS = (  # a 3x5 pixel font (digits), one string of 15 bits per glyph, top row first
    "111101101101111",
    "010110010010111",
    "111001111100111",
    "111001111001111",
    "101101111001001",
    "111100111001111",
    "111100111101111",
    "111001010010010",
    "111101111101111",
    "111101111001111",
)
_GLYPHS = np.array([[c == "1" for c in g] for g in _GLYPH_ROWS] + [[False] * 15]).reshape(-1, 5, 3)


@dataclass(frozen=True)
class Sphere:
    """A sphere with rows of tiny dark 3x5 glyphs laid out on a latitude-longitude grid."""

    center: Tuple[float, float, float] = (-0.38, 0.34, 0.42)
    """Centre of the sphere."""
    radius: float = 0.42
    """Radius of the sphere."""
    glyph_rows: int = 8
    """Rows of glyphs, spread between ``lat_range``."""
    glyph_cols: int = 28
    """Glyphs per row, around the full circle."""
    lat_range: Tuple[float, float] = (-0.7, 1.05)
    """Latitudes (radians) bounding the glyph band."""

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        oc = o - np.asarray(self.center, o.dtype)
        b = _dot(oc, d)
        disc = b * b - (_dot(oc, oc) - self.radius**2)
        with np.errstate(invalid="ignore"):
            t = -b - np.sqrt(disc)
        return np.where((disc >= 0) & (t > 0), t, np.inf)

    def normal_albedo(self, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        n = p - np.asarray(self.center, p.dtype)
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        lat = np.arcsin(np.clip(n[:, 2], -1, 1))
        lon = np.arctan2(n[:, 1], n[:, 0]) + math.pi
        lat0, lat1 = self.lat_range
        v = (lat1 - lat) / (lat1 - lat0) * self.glyph_rows
        u = lon / (2 * math.pi) * self.glyph_cols
        row, col = np.floor(v).astype(np.int64), np.floor(u).astype(np.int64) % self.glyph_cols
        fu, fv = u - np.floor(u), v - np.floor(v)
        gx = np.floor((fu - 0.2) / 0.6 * 3).astype(np.int64)
        gy = np.floor((fv - 0.12) / 0.76 * 5).astype(np.int64)
        inside = (row >= 0) & (row < self.glyph_rows) & (gx >= 0) & (gx < 3) & (gy >= 0) & (gy < 5)
        glyph = (row * 7 + col * 13 + row * col * 3) % len(_GLYPHS)
        ink = np.zeros(len(p), dtype=bool)
        ink[inside] = _GLYPHS[glyph[inside], gy[inside], gx[inside]]
        return n, _two_tone(ink, (0.08, 0.08, 0.3), (0.93, 0.76, 0.3))

    def bounds(self) -> Tuple[np.ndarray, float]:
        return np.asarray(self.center), self.radius

    def area(self) -> float:
        return 4 * math.pi * self.radius**2

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        v = rng.normal(size=(n, 3))
        return v / np.linalg.norm(v, axis=1, keepdims=True) * self.radius + np.asarray(self.center)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        return np.linalg.norm(p - np.asarray(self.center), axis=1) - self.radius

    def distance(self, p: np.ndarray) -> np.ndarray:
        return np.abs(self.sdf(p))


@dataclass(frozen=True)
class Rod:
    """A thin cylinder from ``start`` to ``end`` with coloured bands along its axis."""

    start: Tuple[float, float, float]
    """Centre of the first end."""
    end: Tuple[float, float, float]
    """Centre of the second end."""
    radius: float = 0.012
    """Radius of the rod."""
    band: float = 0.05
    """Length of one coloured band."""
    color: Tuple[float, float, float] = (0.1, 0.55, 0.2)
    """Colour of every other band (the rest are white)."""
    start_cap: bool = True
    """Whether the end at ``start`` is closed (False for rods standing on the ground)."""

    def _frame(self) -> Tuple[np.ndarray, np.ndarray, float]:
        p0, p1 = np.asarray(self.start), np.asarray(self.end)
        length = float(np.linalg.norm(p1 - p0))
        return p0, (p1 - p0) / length, length

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        p0, a, length = self._frame()
        p0, a = p0.astype(o.dtype), a.astype(o.dtype)
        w = o - p0
        wa, da = w @ a, d @ a
        wp, dp = w - wa[:, None] * a, d - da[:, None] * a
        qa, qb, qc = _dot(dp, dp), _dot(wp, dp), _dot(wp, wp) - self.radius**2
        disc = qb * qb - qa * qc
        with np.errstate(divide="ignore", invalid="ignore"):
            t_side = (-qb - np.sqrt(disc)) / qa
            s = wa + t_side * da
            t_side = np.where((disc >= 0) & (t_side > 0) & (s >= 0) & (s <= length), t_side, np.inf)
            best = t_side
            for offset, closed in ((0.0, self.start_cap), (length, True)):
                if not closed:
                    continue
                t_cap = (offset - wa) / da
                rim = wp + t_cap[:, None] * dp
                r2 = _dot(rim, rim)
                best = np.minimum(best, np.where((t_cap > 0) & (r2 <= self.radius**2), t_cap, np.inf))
        return best

    def normal_albedo(self, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        p0, a, length = self._frame()
        w = p - p0.astype(p.dtype)
        s = w @ a.astype(p.dtype)
        radial = w - s[:, None] * a.astype(p.dtype)
        rho = np.linalg.norm(radial, axis=1)
        normals = radial / np.maximum(rho, 1e-12)[:, None]
        on_cap = rho < self.radius * (1 - 1e-3)
        normals[on_cap] = np.where((s[on_cap] > 0.5 * length)[:, None], a, -a)
        bands = np.floor(s / self.band) % 2 == 0
        return normals, _two_tone(bands, self.color, (0.95, 0.95, 0.95))

    def bounds(self) -> Tuple[np.ndarray, float]:
        p0, a, length = self._frame()
        return p0 + 0.5 * length * a, math.hypot(0.5 * length, self.radius)

    def area(self) -> float:
        _, _, length = self._frame()
        caps = 2 if self.start_cap else 1
        return 2 * math.pi * self.radius * length + caps * math.pi * self.radius**2

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        p0, a, length = self._frame()
        u = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        u /= np.linalg.norm(u)
        v = np.cross(a, u)
        side = 2 * math.pi * self.radius * length
        on_side = rng.random(n) * self.area() < side
        phi = rng.random(n) * 2 * math.pi
        rho = np.where(on_side, self.radius, self.radius * np.sqrt(rng.random(n)))
        s = np.where(on_side, rng.random(n) * length, length)
        if self.start_cap:
            s = np.where(~on_side & (rng.random(n) < 0.5), 0.0, s)
        radial = rho[:, None] * (np.cos(phi)[:, None] * u + np.sin(phi)[:, None] * v)
        return p0 + s[:, None] * a + radial

    def sdf(self, p: np.ndarray) -> np.ndarray:
        p0, a, length = self._frame()
        w = p - p0
        s = w @ a
        rho = np.linalg.norm(w - s[:, None] * a, axis=1)
        dx, dy = rho - self.radius, np.abs(s - 0.5 * length) - 0.5 * length
        outside = np.sqrt(np.maximum(dx, 0) ** 2 + np.maximum(dy, 0) ** 2)
        return outside + np.minimum(np.maximum(dx, dy), 0)

    def distance(self, p: np.ndarray) -> np.ndarray:
        return np.abs(self.sdf(p))


def _build_scene() -> Tuple[Primitive, ...]:
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
"""The primitives of the scene; the ground disc comes first."""


def trace(origins: np.ndarray, directions: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cast rays into the scene. ``origins`` is ``[N, 3]`` or one shared ``[3]`` origin, ``directions``
    ``[N, 3]`` unit vectors. Returns the shaded colour ``[N, 3]`` (0 on a miss), the hit mask ``[N]``
    and the distance ``[N]`` (``inf`` on a miss)."""
    d = np.ascontiguousarray(directions, np.float32).reshape(-1, 3)
    o = np.asarray(origins, np.float32)
    shared = o.ndim == 1
    o_rays = np.broadcast_to(o, d.shape) if shared else np.ascontiguousarray(o).reshape(-1, 3)
    if not shared:
        o_d, o_o = _dot(o_rays, d), _dot(o_rays, o_rays)
    t = np.full(len(d), np.inf, np.float32)
    owner = np.full(len(d), -1, np.int16)
    for k, prim in enumerate(SCENE):
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
    for k, prim in enumerate(SCENE):
        idx = np.flatnonzero(owner == k)
        if idx.size:
            normals, albedo = prim.normal_albedo(o_rays[idx] + t[idx, None] * d[idx])
            rgb[idx] = albedo * _shade(normals)
    return rgb, owner >= 0, t


def _rays(
    c2w: np.ndarray, width: int, height: int, focal: float, v: np.ndarray, u: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """The camera centre and unit rays through image points (``u`` right, ``v`` down, in pixels from the
    top-left corner)."""
    cam = np.stack([(u - 0.5 * width) / focal, -(v - 0.5 * height) / focal, -np.ones_like(u)], -1)
    dirs = cam.reshape(-1, 3) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return c2w[:3, 3], dirs


def render_view(c2w: np.ndarray, width: int, height: int, focal: float, supersample: int = 1) -> np.ndarray:
    """Render one pinhole view (Blender / OpenGL camera-to-world ``c2w``, principal point at the image
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
        rgb, hit, _ = trace(*_rays(c2w, width, height, focal, *np.meshgrid(rows, cols, indexing="ij")))
        samples = np.concatenate([rgb, hit[:, None].astype(np.float32)], 1)
        rgba[r0:r1] = samples.reshape(r1 - r0, ss, width, ss, 4).mean((1, 3))
    return rgba


def render_depth(c2w: np.ndarray, width: int, height: int, focal: float) -> np.ndarray:
    """Distance along the ray through each pixel centre ``[H, W]`` (``inf`` where nothing is hit)."""
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    _, _, depth = trace(*_rays(np.asarray(c2w, np.float64), width, height, focal, v, u))
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


def _solids() -> List[Primitive]:
    return [prim for prim in SCENE if hasattr(prim, "sdf")]


def surface_points(n: int, seed: int = 0) -> np.ndarray:
    """``n`` points ``[n, 3]`` float32 drawn uniformly by area from the visible surface of the scene:
    the union of the primitives, without the parts buried in another object or in the ground
    (box bottom, rod feet, ground under objects)."""
    if n < 1:
        raise ValueError(f"surface_points: n must be >= 1, got {n}.")
    rng = np.random.default_rng(seed)
    areas = np.array([prim.area() for prim in SCENE])
    solids = _solids()
    kept: List[np.ndarray] = []
    total = 0
    while total < n:
        counts = rng.multinomial(int(1.2 * (n - total)) + 16, areas / areas.sum())
        for prim, count in zip(SCENE, counts, strict=True):
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


def surface_distance(points: np.ndarray) -> np.ndarray:
    """Unsigned distance ``[M]`` from each point to the nearest primitive surface of the scene."""
    p = np.asarray(points, np.float64).reshape(-1, 3)
    return np.min(np.stack([prim.distance(p) for prim in SCENE]), 0)


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


def _check_args(resolution: int, counts: Dict[str, int], supersample: int, n_points: int) -> None:
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
    n_val: Optional[int] = None,
    n_points: int = 100_000,
) -> Path:
    """Render the scene into ``out_dir`` as a Blender-format dataset and return ``out_dir``.

    Writes ``transforms_{train,val,test}.json``, RGBA PNGs ``{split}/r_{i}.png`` of
    ``resolution x resolution`` pixels and ``points_gt.npy`` (``n_points`` surface points, float32, in the
    frame of the cameras). ``n_val`` defaults to ``n_test``. Cameras depend only on ``seed`` and the view
    counts, never on the resolution, so renders at two resolutions show the same views.
    """
    n_val = n_test if n_val is None else n_val
    counts = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    _check_args(resolution, counts, supersample, n_points)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    focal = 0.5 * resolution / math.tan(0.5 * CAMERA_ANGLE_X)
    for index, (split, count) in enumerate(zip(SPLITS, counts.values(), strict=True)):
        (out / split).mkdir(exist_ok=True)
        poses = camera_poses(count, np.random.default_rng([seed, index]))
        frames = []
        for i, c2w in enumerate(poses):
            rgba = render_view(c2w, resolution, resolution, focal, supersample)
            save_png(out / split / f"r_{i}.png", rgba_to_uint8(rgba))
            frames.append({"file_path": f"./{split}/r_{i}", "rotation": 0.0, "transform_matrix": c2w.tolist()})
        write_json(out / f"transforms_{split}.json", {"camera_angle_x": CAMERA_ANGLE_X, "frames": frames})
    points = surface_points(n_points, seed)

    def write_points(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, points)

    atomic_write(out / "points_gt.npy", write_points)
    return out


@dataclass
class SyntheticConfig:
    """Render the built-in procedural scene as a Blender-format dataset (for ns-train blender-data)."""

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
    """Seed for the camera poses and the ground-truth point sample (the scene itself is fixed)."""
    supersample: int = 3
    """Samples per pixel side; each pixel is the box-filtered mean of supersample^2 rays."""
    n_points: int = 100_000
    """Number of ground-truth surface points written to points_gt.npy (for Chamfer distance)."""


def main() -> None:
    """Console entry point ``gvae-synthetic``."""
    import tyro

    cfg = tyro.cli(SyntheticConfig)
    try:
        out = write_scene(
            cfg.out, cfg.resolution, cfg.n_train, cfg.n_test, cfg.seed, cfg.supersample, cfg.n_val, cfg.n_points
        )
    except ValueError as err:
        raise SystemExit(f"gvae-synthetic: {err}") from None
    print(
        f"Wrote {cfg.n_train}/{cfg.n_val}/{cfg.n_test} train/val/test views at {cfg.resolution}px and "
        f"{cfg.n_points} ground-truth points to {out}.\n"
        f"Train with: ns-train gaussianvae --data {out} blender-data"
    )


if __name__ == "__main__":
    main()
