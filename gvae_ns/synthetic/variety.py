"""Seeded procedural scenes: :func:`random_scene` draws a different arrangement of primitives per seed.

Each scene is a ground :class:`~gvae_ns.synthetic.primitives.Disc` (random checker or cell noise, ring
spacing and width, two-tone colours) followed by ``MIN_OBJECTS``..``MAX_OBJECTS`` objects resting on it:
boxes (size, yaw, stripes or cell noise, colours), spheres (size, a few floating, glyph rows and columns,
colours) and groups of thin banded posts, some carrying a crossbar. Objects do not overlap one another's
footprints, stand inside the ground disc, and every surface point lies within ``SCENE_RADIUS`` of the
origin with z >= 0: well inside the Blender scene box ``[-1.5, 1.5]^3`` and the cameras' sphere.
The same seed gives the same primitives (plain floats, so scenes compare with ``==``).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from collections.abc import Callable

import numpy as np

from gvae_ns.synthetic.primitives import Box, Disc, Primitive, Rod, Sphere

SCENE_RADIUS = 1.3
"""Every surface point of a random scene lies within this distance of the origin."""
MIN_OBJECTS = 2
"""Fewest objects drawn for a scene (besides the ground)."""
MAX_OBJECTS = 6
"""Most objects drawn for a scene (besides the ground)."""
_GAP = 0.04
"""Clearance between the footprints of two objects, and between a footprint and the ground's rim."""
_TRIES = 60
"""Placements tried per object before it is left out."""

Colour = tuple[float, float, float]
Placed = tuple[tuple[Primitive, ...], float]
"""An object's primitives, placed around the origin of its own frame, and its footprint radius."""


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> Colour:
    h, s, v = rng.random(), rng.uniform(*saturation), rng.uniform(*value)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (float(r), float(g), float(b))


def _two_tones(rng: np.random.Generator) -> tuple[Colour, Colour]:
    """A light and a dark colour, in random order, so every pattern keeps its contrast."""
    light = _colour(rng, (0.0, 0.6), (0.75, 0.97))
    dark = _colour(rng, (0.2, 0.9), (0.1, 0.45))
    return (light, dark) if rng.random() < 0.5 else (dark, light)


def _ground(rng: np.random.Generator) -> Disc:
    light, dark = _two_tones(rng)
    return Disc(
        radius=float(rng.uniform(1.15, SCENE_RADIUS)),
        checker=float(rng.uniform(0.025, 0.08)),
        ring_spacing=float(rng.uniform(0.15, 0.4)),
        ring_width=float(rng.uniform(0.005, 0.016)),
        light=light,
        dark=dark,
        ring_color=_colour(rng, (0.0, 0.8), (0.05, 0.3)),
        pattern="cells" if rng.random() < 0.25 else "checker",
    )


def _box(rng: np.random.Generator) -> Placed:
    half = tuple(float(h) for h in rng.uniform(0.07, 0.28, 3))
    stripe, base = _two_tones(rng)
    box = Box(
        center=(0.0, 0.0, half[2]),
        half=half,
        yaw=float(rng.uniform(0.0, math.pi)),
        stripe_period=float(rng.uniform(0.02, 0.06)),
        stripe_color=stripe,
        base_color=base,
        pattern="cells" if rng.random() < 0.3 else "stripes",
    )
    return (box,), math.hypot(half[0], half[1])


def _sphere(rng: np.random.Generator) -> Placed:
    radius = float(rng.uniform(0.12, 0.38))
    lift = float(rng.uniform(0.05, 0.3)) if rng.random() < 0.25 else 0.0
    lat_range = (float(rng.uniform(-1.1, -0.3)), float(rng.uniform(0.6, 1.2)))
    cell = rng.uniform(0.05, 0.11)  # glyph cell size on the surface
    ink, paper = _two_tones(rng)
    sphere = Sphere(
        center=(0.0, 0.0, radius + lift),
        radius=radius,
        glyph_rows=max(2, round((lat_range[1] - lat_range[0]) * radius / cell)),
        glyph_cols=max(6, round(2 * math.pi * radius / cell)),
        lat_range=lat_range,
        ink=ink,
        paper=paper,
    )
    return (sphere,), radius


def _posts(rng: np.random.Generator) -> Placed:
    """Two to four banded posts in a row; with a crossbar lying on them (equal heights) or without."""
    count = int(rng.integers(2, 5))
    spacing = float(rng.uniform(0.12, 0.3))
    radius = float(rng.uniform(0.008, 0.022))
    band = float(rng.uniform(0.02, 0.08))
    yaw = rng.uniform(0.0, math.pi)
    axis = np.array([math.cos(yaw), math.sin(yaw)])
    offsets = (np.arange(count) - 0.5 * (count - 1)) * spacing
    barred = rng.random() < 0.6
    heights = np.full(count, rng.uniform(0.25, 0.8)) if barred else rng.uniform(0.2, 0.85, count)
    white = _colour(rng, (0.0, 0.15), (0.85, 0.97))
    rods: list[Primitive] = []
    for offset, height in zip(offsets, heights, strict=True):
        x, y = (float(c) for c in offset * axis)
        colour = _colour(rng, (0.6, 1.0), (0.4, 0.9))
        post = Rod(start=(x, y, 0.0), end=(x, y, float(height)), radius=radius, band=band, start_cap=False)
        rods.append(dataclasses.replace(post, color=colour, other_color=white))
    half_length = 0.5 * spacing * (count - 1) + radius
    if barred:
        overhang = float(rng.uniform(0.02, 0.08))
        bar_radius = float(rng.uniform(0.008, 0.02))
        z = float(heights[0]) + bar_radius  # lying on the posts' tops
        (x0, y0), (x1, y1) = ((float(c) for c in sign * (half_length + overhang) * axis) for sign in (-1.0, 1.0))
        bar = Rod(start=(x0, y0, z), end=(x1, y1, z), radius=bar_radius, band=float(rng.uniform(0.02, 0.08)))
        rods.append(dataclasses.replace(bar, color=_colour(rng, (0.0, 0.5), (0.1, 0.4)), other_color=white))
        half_length += overhang
    return tuple(rods), half_length + radius


_KINDS: tuple[tuple[Callable[[np.random.Generator], Placed], float], ...] = (
    (_box, 0.35),
    (_sphere, 0.35),
    (_posts, 0.3),
)


def _moved(prim: Primitive, dx: float, dy: float) -> Primitive:
    """``prim`` translated by ``(dx, dy, 0)``."""
    if isinstance(prim, Rod):
        s, e = prim.start, prim.end
        return dataclasses.replace(prim, start=(s[0] + dx, s[1] + dy, s[2]), end=(e[0] + dx, e[1] + dy, e[2]))
    if isinstance(prim, Box | Sphere):
        c = prim.center
        return dataclasses.replace(prim, center=(c[0] + dx, c[1] + dy, c[2]))
    raise TypeError(f"random_scene: cannot move a {type(prim).__name__}.")


def _reach(prim: Primitive) -> float:
    """Largest distance from the origin to a point of ``prim`` (exact for boxes, spheres and rods)."""
    if isinstance(prim, Box):
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * prim.half
        c, s = math.cos(prim.yaw), math.sin(prim.yaw)
        world = corners @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T + prim.center
        return float(np.linalg.norm(world, axis=1).max())
    if isinstance(prim, Rod):  # the farthest point is on the rim of one end
        return max(float(np.linalg.norm(p)) for p in (prim.start, prim.end)) + prim.radius
    center, radius = prim.bounds()
    return float(np.linalg.norm(center)) + radius


def random_scene(seed: int) -> tuple[Primitive, ...]:
    """A procedural scene drawn from ``seed``: the ground disc first, then ``MIN_OBJECTS``..``MAX_OBJECTS``
    objects (an object that finds no free spot in ``_TRIES`` placements is left out, so a few scenes hold
    fewer). Deterministic: the same seed gives equal primitives."""
    rng = np.random.default_rng(seed)
    ground = _ground(rng)
    scene: list[Primitive] = [ground]
    footprints: list[tuple[float, float, float]] = []  # x, y, radius
    kinds = [make for make, _ in _KINDS]
    weights = np.array([w for _, w in _KINDS])
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        make = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        for _ in range(_TRIES):
            parts, foot = make(rng)
            room = ground.radius - _GAP - foot
            if room <= 0:
                continue
            r, phi = room * math.sqrt(rng.random()), rng.uniform(0.0, 2 * math.pi)
            x, y = r * math.cos(phi), r * math.sin(phi)
            if any(math.hypot(x - fx, y - fy) < foot + fr + _GAP for fx, fy, fr in footprints):
                continue
            moved = [_moved(part, x, y) for part in parts]
            if max(_reach(part) for part in moved) > SCENE_RADIUS:
                continue
            scene.extend(moved)
            footprints.append((x, y, foot))
            break
    return tuple(scene)
