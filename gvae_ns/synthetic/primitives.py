"""The analytic surfaces of the procedural scene: ray intersection, normals and colours, area sampling.

Each primitive is a frozen dataclass satisfying :class:`Primitive`. The detail they carry is 0.015-0.05
scene units wide (1-5 pixels at 256 px), so it only survives at high resolution:

- :class:`Disc`: the ground (z = 0) with a fine checker and thin rings,
- :class:`Box`: a yawed box with thin diagonal stripes,
- :class:`Sphere`: rows of tiny 3x5 glyphs (text-like marks),
- :class:`Rod`: thin cylinders with coloured bands.

Colours and sizes are fields (their defaults are the built-in scene's); the disc and the box can also
swap their pattern for ``"cells"``, a hashed 3D cell noise (:func:`hashed_cells`) mixing their two colours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Primitive(Protocol):
    """What the renderer and the point sampler need from one analytic surface."""

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Distance to the first hit along each ray ``o + t d`` (``inf`` on a miss)."""

    def normal_albedo(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit normals and colours ``([N, 3], [N, 3])`` at surface points."""

    def bounds(self) -> tuple[np.ndarray, float]:
        """Centre and radius of a bounding sphere."""

    def area(self) -> float:
        """Surface area (of the parts that exist: open ends are not counted)."""

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` points drawn uniformly by area from the surface."""

    def distance(self, p: np.ndarray) -> np.ndarray:
        """Unsigned distance from points to the surface."""


def rowwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products of matching rows of ``[N, 3]`` arrays: ``[N]``."""
    return np.einsum("ij,ij->i", a, b)


def _two_tone(mask: np.ndarray, on: Sequence[float], off: Sequence[float]) -> np.ndarray:
    return np.where(mask[:, None], np.asarray(on, np.float32), np.asarray(off, np.float32))


def hashed_cells(p: np.ndarray, size: float) -> np.ndarray:
    """A value in ``[0, 1)`` per point ``[N]``, constant over each cube of edge ``size`` of the grid
    and pseudo-random (an integer hash of the cell index) from one cell to the next."""
    k = np.floor(np.asarray(p, np.float64) / size).astype(np.int64)
    h = (k[:, 0] * 73856093 + k[:, 1] * 19349663 + k[:, 2] * 83492791) & 0xFFFFFFFF
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return ((h ^ (h >> 16)) / 2.0**32).astype(np.float32)


def _mix(value: np.ndarray, a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a32 + value[:, None] * (b32 - a32)


def _check_pattern(owner: str, pattern: str, allowed: tuple[str, ...]) -> None:
    if pattern not in allowed:
        raise ValueError(f"{owner}: pattern must be one of {allowed}, got {pattern!r}.")


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
    light: tuple[float, float, float] = (0.86, 0.85, 0.8)
    """Colour of the even checker cells (one end of the cell-noise mix)."""
    dark: tuple[float, float, float] = (0.33, 0.38, 0.45)
    """Colour of the odd checker cells (the other end of the cell-noise mix)."""
    ring_color: tuple[float, float, float] = (0.08, 0.08, 0.1)
    """Colour of the rings."""
    pattern: str = "checker"
    """``"checker"`` or ``"cells"`` (hashed cell noise with cells of edge ``checker``)."""

    def __post_init__(self) -> None:
        _check_pattern("Disc", self.pattern, ("checker", "cells"))

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -o[:, 2] / d[:, 2]
        p = o[:, :2] + t[:, None] * d[:, :2]
        ok = (d[:, 2] < 0) & (o[:, 2] > 0) & ((p * p).sum(1) <= self.radius**2)
        return np.where(ok, t, np.inf)

    def normal_albedo(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.pattern == "cells":
            albedo = _mix(hashed_cells(p, self.checker), self.light, self.dark)
        else:
            cells = np.floor(p[:, 0] / self.checker) + np.floor(p[:, 1] / self.checker)
            albedo = _two_tone(cells % 2 == 0, self.light, self.dark)
        r = np.sqrt((p[:, :2] ** 2).sum(1))
        k = np.round(r / self.ring_spacing)
        ring = (k > 0) & (np.abs(r - k * self.ring_spacing) < 0.5 * self.ring_width)
        albedo[ring] = self.ring_color
        normals = np.zeros_like(p)
        normals[:, 2] = 1.0
        return normals, albedo

    def bounds(self) -> tuple[np.ndarray, float]:
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

    center: tuple[float, float, float] = (0.42, -0.36, 0.27)
    """Centre of the box."""
    half: tuple[float, float, float] = (0.26, 0.2, 0.27)
    """Half extents along the box's own axes."""
    yaw: float = 0.5
    """Rotation about the world z axis, radians."""
    stripe_period: float = 0.035
    """Period of the stripes, measured along the (1, 1, 1) diagonal of the box frame (the cell edge for
    ``"cells"``)."""
    stripe_color: tuple[float, float, float] = (0.8, 0.16, 0.1)
    """Colour of every other stripe (one end of the cell-noise mix)."""
    base_color: tuple[float, float, float] = (0.95, 0.9, 0.84)
    """Colour of the stripes between (the other end of the cell-noise mix)."""
    pattern: str = "stripes"
    """``"stripes"`` or ``"cells"`` (hashed cell noise in the box frame)."""

    def __post_init__(self) -> None:
        _check_pattern("Box", self.pattern, ("stripes", "cells"))

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

    def normal_albedo(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = self._local(p)
        rel = np.abs(q) / np.asarray(self.half, p.dtype)
        axis = rel.argmax(1)
        local_n = np.zeros_like(p)
        local_n[np.arange(len(p)), axis] = np.sign(q[np.arange(len(p)), axis])
        if self.pattern == "cells":
            albedo = _mix(hashed_cells(q, self.stripe_period), self.stripe_color, self.base_color)
        else:
            stripes = np.floor(q.sum(1) / self.stripe_period) % 2 == 0
            albedo = _two_tone(stripes, self.stripe_color, self.base_color)
        return local_n @ self._rot().T.astype(p.dtype), albedo

    def bounds(self) -> tuple[np.ndarray, float]:
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

    center: tuple[float, float, float] = (-0.38, 0.34, 0.42)
    """Centre of the sphere."""
    radius: float = 0.42
    """Radius of the sphere."""
    glyph_rows: int = 8
    """Rows of glyphs, spread between ``lat_range``."""
    glyph_cols: int = 28
    """Glyphs per row, around the full circle."""
    lat_range: tuple[float, float] = (-0.7, 1.05)
    """Latitudes (radians) bounding the glyph band."""
    ink: tuple[float, float, float] = (0.08, 0.08, 0.3)
    """Colour of the glyphs."""
    paper: tuple[float, float, float] = (0.93, 0.76, 0.3)
    """Colour of the sphere around the glyphs."""

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        oc = o - np.asarray(self.center, o.dtype)
        b = rowwise_dot(oc, d)
        disc = b * b - (rowwise_dot(oc, oc) - self.radius**2)
        with np.errstate(invalid="ignore"):
            t = -b - np.sqrt(disc)
        return np.where((disc >= 0) & (t > 0), t, np.inf)

    def normal_albedo(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
        return n, _two_tone(ink, self.ink, self.paper)

    def bounds(self) -> tuple[np.ndarray, float]:
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

    start: tuple[float, float, float]
    """Centre of the first end."""
    end: tuple[float, float, float]
    """Centre of the second end."""
    radius: float = 0.012
    """Radius of the rod."""
    band: float = 0.05
    """Length of one coloured band."""
    color: tuple[float, float, float] = (0.1, 0.55, 0.2)
    """Colour of every other band."""
    other_color: tuple[float, float, float] = (0.95, 0.95, 0.95)
    """Colour of the bands between."""
    start_cap: bool = True
    """Whether the end at ``start`` is closed (False for rods standing on the ground)."""

    def _frame(self) -> tuple[np.ndarray, np.ndarray, float]:
        p0, p1 = np.asarray(self.start), np.asarray(self.end)
        length = float(np.linalg.norm(p1 - p0))
        return p0, (p1 - p0) / length, length

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        p0, a, length = self._frame()
        p0, a = p0.astype(o.dtype), a.astype(o.dtype)
        w = o - p0
        wa, da = w @ a, d @ a
        wp, dp = w - wa[:, None] * a, d - da[:, None] * a
        qa, qb, qc = rowwise_dot(dp, dp), rowwise_dot(wp, dp), rowwise_dot(wp, wp) - self.radius**2
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
                r2 = rowwise_dot(rim, rim)
                best = np.minimum(best, np.where((t_cap > 0) & (r2 <= self.radius**2), t_cap, np.inf))
        return best

    def normal_albedo(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p0, a, length = self._frame()
        w = p - p0.astype(p.dtype)
        s = w @ a.astype(p.dtype)
        radial = w - s[:, None] * a.astype(p.dtype)
        rho = np.linalg.norm(radial, axis=1)
        normals = radial / np.maximum(rho, 1e-12)[:, None]
        on_cap = rho < self.radius * (1 - 1e-3)
        normals[on_cap] = np.where((s[on_cap] > 0.5 * length)[:, None], a, -a)
        bands = np.floor(s / self.band) % 2 == 0
        return normals, _two_tone(bands, self.color, self.other_color)

    def bounds(self) -> tuple[np.ndarray, float]:
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
