"""Time the compiled CPU rasterizer against the pure-PyTorch reference, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_render_cpp.py
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_render_cpp.py --quick     # a minute: fewer rows

The scene is lego-like: Gaussians uniform in a cube of side 2 around the origin (lego's extent), SH
degree 3, seen from lego's camera distance (4.03) with lego's field of view (focal 1111 px at 800 px,
so 278 px at the x4 training resolution of 200 px). Rows:

1. a training step's render, forward + backward (``absgrad=True``), at 200 px with 50k and 150k
   Gaussians: both paths, and the speed-up;
2. evaluation renders (no grad) of 150k Gaussians at 800x800: both paths;
3. the compiled path's forward + backward against N (10k .. 1M at 200 px) and against the image side
   (100 .. 800 px with 150k Gaussians), with time per Gaussian and per pixel to show where it bends.

Each figure is the median over ``--repeats`` runs, as wall-clock and process CPU seconds (CPU time is
the steadier one when other jobs share the machine).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import torch
import tyro

from gvae_ns.render import load_extension, rasterize_cpp, rasterize_torch


@dataclass
class BenchConfig:
    """What to time."""

    step_sizes: List[int] = field(default_factory=lambda: [50_000, 150_000])
    """Gaussians of the side-by-side training-step rows (200 px)."""
    eval_size: int = 150_000
    """Gaussians of the side-by-side 800 px evaluation render."""
    n_sweep: List[int] = field(default_factory=lambda: [10_000, 30_000, 100_000, 300_000, 1_000_000])
    """Gaussians of the compiled path's N sweep (200 px, forward + backward)."""
    side_sweep: List[int] = field(default_factory=lambda: [100, 200, 400, 800])
    """Image sides of the compiled path's resolution sweep (``eval_size`` Gaussians, forward + backward)."""
    repeats: int = 3
    """Timed repetitions per row; medians are reported."""
    torch_repeats: int = 1
    """Timed repetitions of the (slow) PyTorch rows."""
    quick: bool = False
    """Fewer, smaller rows (about a minute)."""
    seed: int = 0


def lego_like_scene(n: int, seed: int = 0) -> List[torch.Tensor]:
    """``n`` random Gaussians in lego's extent with scales typical of a trained lego: leaf tensors with grad."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * 1.0
    quats = torch.randn(n, 4, generator=g)
    scales = 0.02 * torch.exp(torch.randn(n, 3, generator=g) * 0.5)  # ~1.4 px at 200 px, 5.5 px at 800 px
    opacities = torch.sigmoid(torch.randn(n, generator=g) * 2.0)
    shs = torch.randn(n, 16, 3, generator=g) * 0.2
    return [t.requires_grad_(True) for t in (means, quats, scales, opacities, shs)]


def lego_camera(side: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One camera at lego's distance looking at the origin, focal scaled from 1111 px at 800 px."""
    viewmat = torch.eye(4)
    ang = 0.6
    viewmat[:3, :3] = torch.tensor([[math.cos(ang), 0, -math.sin(ang)], [0, 1, 0], [math.sin(ang), 0, math.cos(ang)]])
    viewmat[2, 3] = 4.03
    f = 1111.0 * side / 800.0
    K = torch.tensor([[f, 0, side / 2], [0, f, side / 2], [0, 0, 1]])
    return viewmat[None], K[None]


def _median_time(fn: Callable[[], None], repeats: int) -> Tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def time_render(fn, params, side: int, backward: bool, repeats: int) -> Tuple[float, float]:
    """Median (wall, cpu) seconds of one render (and its backward) after a warm-up."""
    viewmats, Ks = lego_camera(side)

    def run():
        if backward:
            img, alpha, info = fn(*params, viewmats, Ks, side, side, sh_degree=3, absgrad=True)
            info["means2d"].retain_grad()
            ((img - 0.5).square().mean() + alpha.mean()).backward()
            for p in params:
                p.grad = None
        else:
            with torch.no_grad():
                fn(*params, viewmats, Ks, side, side, sh_degree=3)

    run()  # warm-up (and the first call's one-time costs)
    return _median_time(run, repeats)


def main(cfg: BenchConfig) -> None:
    """Print the three tables."""
    if load_extension() is None:
        raise SystemExit("the compiled rasterizer cannot be built here")
    if cfg.quick:
        cfg.step_sizes, cfg.eval_size = [50_000], 150_000
        cfg.n_sweep, cfg.side_sweep, cfg.repeats = [10_000, 100_000, 1_000_000], [100, 400, 800], 2
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; medians of {cfg.repeats} "
          f"(PyTorch rows: {cfg.torch_repeats}); wall / cpu seconds")

    print("\n1. training step, forward + backward, 200 px, SH 3")
    print(f"{'N':>9} {'pytorch wall':>13} {'cpu':>7} {'compiled wall':>14} {'cpu':>7} {'speed-up (cpu)':>15}")
    for n in cfg.step_sizes:
        params = lego_like_scene(n, cfg.seed)
        t_ref = time_render(rasterize_torch, params, 200, True, cfg.torch_repeats)
        t_cpp = time_render(rasterize_cpp, params, 200, True, cfg.repeats)
        print(f"{n:>9} {t_ref[0]:>13.3f} {t_ref[1]:>7.3f} {t_cpp[0]:>14.3f} {t_cpp[1]:>7.3f} "
              f"{t_ref[1] / t_cpp[1]:>14.1f}x", flush=True)

    print(f"\n2. evaluation render (no grad), {cfg.eval_size} Gaussians, 800x800")
    params = lego_like_scene(cfg.eval_size, cfg.seed)
    t_ref = time_render(rasterize_torch, params, 800, False, cfg.torch_repeats)
    t_cpp = time_render(rasterize_cpp, params, 800, False, cfg.repeats)
    print(f"{'pytorch wall':>13} {'cpu':>7} {'compiled wall':>14} {'cpu':>7}")
    print(f"{t_ref[0]:>13.3f} {t_ref[1]:>7.3f} {t_cpp[0]:>14.3f} {t_cpp[1]:>7.3f}", flush=True)

    print("\n3a. compiled, forward + backward against N, 200 px")
    print(f"{'N':>9} {'wall':>8} {'cpu':>8} {'cpu us/Gaussian':>16}")
    for n in cfg.n_sweep:
        t = time_render(rasterize_cpp, lego_like_scene(n, cfg.seed), 200, True, cfg.repeats)
        print(f"{n:>9} {t[0]:>8.3f} {t[1]:>8.3f} {1e6 * t[1] / n:>16.2f}", flush=True)

    print(f"\n3b. compiled, forward + backward against the image side, {cfg.eval_size} Gaussians")
    print(f"{'side':>9} {'wall':>8} {'cpu':>8} {'cpu ns/pixel':>13}")
    params = lego_like_scene(cfg.eval_size, cfg.seed)
    for side in cfg.side_sweep:
        t = time_render(rasterize_cpp, params, side, True, cfg.repeats)
        print(f"{side:>9} {t[0]:>8.3f} {t[1]:>8.3f} {1e9 * t[1] / side**2:>13.0f}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))
