"""Time gvae_ns.render.rasterize_torch (CPU) forward and forward+backward on random scenes.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_render.py
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_render.py --sizes 20000 --resolutions 200 400

On a machine shared with other jobs, OpenMP threads spin while waiting for each other and inflate
both wall-clock and CPU time; OMP_NUM_THREADS=1 then gives the steadiest CPU-time figures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import tyro

from gvae_ns.render import rasterize_torch


@dataclass
class BenchConfig:
    """What to time."""

    sizes: List[int] = field(default_factory=lambda: [5_000, 20_000, 80_000])
    """Numbers of Gaussians."""
    resolutions: List[int] = field(default_factory=lambda: [100, 200, 400])
    """Square image sides in pixels."""
    cameras: int = 1
    """Cameras rendered per call."""
    sh_degree: int = 3
    """SH degree of the colours (-1: plain RGB colours, no SH)."""
    repeats: int = 3
    """Timed repetitions per setting; the median is reported."""
    scale_range: Tuple[float, float] = (0.01, 0.06)
    """Log-uniform range of the Gaussians' world scales (camera distance 4, focal = image side)."""
    seed: int = 0
    """Random seed of the scene."""


def _scene(n: int, cfg: BenchConfig):
    g = torch.Generator().manual_seed(cfg.seed)
    # a slab filling the camera's view: |x|, |y| < 1.8 at depth 3..5 (the image spans +-2 at z=4)
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([1.8, 1.8, 1.0])
    quats = torch.randn(n, 4, generator=g)
    lo, hi = (math.log(s) for s in cfg.scale_range)
    scales = torch.exp(torch.rand(n, 3, generator=g) * (hi - lo) + lo)
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    if cfg.sh_degree >= 0:
        colors = torch.randn(n, (cfg.sh_degree + 1) ** 2, 3, generator=g) * 0.3
    else:
        colors = torch.rand(n, 3, generator=g)
    return [t.requires_grad_(True) for t in (means, quats, scales, opacities, colors)]


def _cameras(c: int, side: int):
    viewmats = torch.eye(4).repeat(c, 1, 1)
    viewmats[:, 2, 3] = 4.0
    viewmats[:, 0, 3] = torch.linspace(-0.2, 0.2, c)
    f = float(side)  # ~53 degree field of view
    Ks = torch.tensor([[f, 0, side / 2], [0, f, side / 2], [0, 0, 1]]).repeat(c, 1, 1)
    return viewmats, Ks


def _median_time(fn, repeats: int) -> Tuple[float, float]:
    """Median wall-clock and process CPU seconds of ``fn()``; CPU time is robust to other load."""
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def main(cfg: BenchConfig) -> None:
    """Print one line per (N, resolution): forward and forward+backward times, mean coverage."""
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cameras {cfg.cameras}, "
        f"sh_degree {cfg.sh_degree}"
    )
    print("wall = wall-clock seconds, cpu = process CPU seconds (all threads), medians")
    header = ("N", "res", "fwd_wall", "fwd_cpu", "f+b_wall", "f+b_cpu", "alpha_mean")
    print(" ".join(f"{h:>10}" for h in header))
    sh = cfg.sh_degree if cfg.sh_degree >= 0 else None
    for n in cfg.sizes:
        params = _scene(n, cfg)
        for side in cfg.resolutions:
            viewmats, Ks = _cameras(cfg.cameras, side)

            def forward():
                return rasterize_torch(*params, viewmats, Ks, side, side, sh_degree=sh, absgrad=True)

            def forward_backward():
                img, alpha, info = forward()
                info["means2d"].retain_grad()
                (img.square().mean() + alpha.mean()).backward()
                for p in params:
                    p.grad = None

            forward_backward()  # warm-up
            with torch.no_grad():
                t_fwd = _median_time(forward, cfg.repeats)
                _, alpha, _ = forward()
            t_all = _median_time(forward_backward, cfg.repeats)
            row = (t_fwd[0], t_fwd[1], t_all[0], t_all[1], alpha.mean().item())
            print(f"{n:>10} {side:>10} " + " ".join(f"{x:>10.3f}" for x in row))


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))
