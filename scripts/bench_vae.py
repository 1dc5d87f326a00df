"""GaussianVAE figures: parameters per stream, training time, and time per +1 extrapolation step.

Training runs on synthetic lineage transitions (random Gaussians, continuations and splits drawn
relative to the parent); extrapolation timings use the trained model with the default budget, on CPU
and, when available, CUDA. Prints one line per figure.

    python scripts/bench_vae.py                                   # 10k and 100k lineages
    python scripts/bench_vae.py --sizes 10000 100000 1000000      # 1M too, skipped when memory is short
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Tuple

import torch
import tyro

from gvae_ns.gaussians import MEANS, OPACITY, QUATS, SCALES, SH_DC, PACKED_DIM
from gvae_ns.vae.extrapolate import extrapolate
from gvae_ns.vae.features import REL_DIM, REL_LOG_SCALE, REL_OFFSET, REL_ROTATION, absolute_state
from gvae_ns.vae.model import GaussianVAE, GaussianVAEConfig
from gvae_ns.vae.train import VAETrainConfig, train_vae


@dataclass
class BenchConfig:
    """What to measure."""

    sizes: Tuple[int, ...] = (10_000, 100_000)
    """Lineage counts for the +1-step inference timing."""
    transitions: int = 3000
    """Synthetic transitions to train on."""
    train_steps: int = 300
    """Training steps timed."""
    batch_size: int = 256
    """Training mini-batch."""
    stages: int = 3
    """Snapshots per synthetic lineage."""
    devices: Tuple[str, ...] = ("cpu", "cuda")
    """Devices to time on (cuda is skipped when unavailable)."""
    repeats: int = 3
    """Timed repeats per inference size (the median is printed)."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    model: GaussianVAEConfig = field(default_factory=GaussianVAEConfig)
    """Architecture."""
    seed: int = 0
    """Seed of the data, the model and the latent draws."""


def synthetic_lineages(n: int, stages: int, children: int, gen: torch.Generator):
    """Random ancestor chains and children at the next snapshot, as a TransitionSet-like object."""

    def random_rel(count: int, spread: float, shrink: float) -> torch.Tensor:
        rel = torch.zeros(count, REL_DIM)
        rel[:, REL_OFFSET] = torch.randn(count, 3, generator=gen) * spread
        rel[:, REL_ROTATION] = torch.randn(count, 4, generator=gen) * 0.05 + torch.tensor([1.0, 0, 0, 0])
        rel[:, REL_LOG_SCALE] = shrink + torch.randn(count, 3, generator=gen) * 0.1
        rel[:, REL_LOG_SCALE.stop:] = torch.randn(count, REL_DIM - REL_LOG_SCALE.stop, generator=gen) * 0.05
        return rel

    root = torch.zeros(n, PACKED_DIM)
    root[:, MEANS] = torch.randn(n, 3, generator=gen) * 2
    root[:, QUATS] = torch.randn(n, 4, generator=gen)
    root[:, SCALES] = torch.randn(n, 3, generator=gen) * 0.3 - 2
    root[:, OPACITY] = torch.randn(n, 1, generator=gen)
    root[:, SH_DC] = torch.randn(n, 3, generator=gen) * 0.5
    chain = [root]
    for _ in range(stages - 1):
        chain.append(absolute_state(random_rel(n, 0.2, -0.2), chain[-1]))
    chain_t = torch.stack(chain, 1)
    stage = torch.randint(0, stages - 1, (n,), generator=gen)
    mask = torch.arange(stages)[None] <= stage[:, None]
    parent = chain_t[torch.arange(n), stage]
    kids = torch.zeros(n, children, PACKED_DIM)
    kids_mask = torch.rand(n, children, generator=gen) < torch.tensor([0.95] + [0.4] * (children - 1))
    for c in range(children):
        kids[:, c] = absolute_state(random_rel(n, 0.2 if c == 0 else 1.0, -0.2 if c == 0 else -0.5), parent)
    return type("Transitions", (), dict(history=torch.where(mask[..., None], chain_t, 0.0), history_mask=mask,
                                        children=torch.where(kids_mask[..., None], kids, 0.0),
                                        children_mask=kids_mask, stage=stage))()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"torch {torch.__version__}, cpu threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}, cuda {torch.cuda.is_available()}")
    counts = GaussianVAE(cfg.model).parameter_counts()
    for name in ("geometry", "appearance", "total"):
        print(f"params {name:10s} {counts[name]:>9,d}  = {counts[name] * 4 / 1e6:.3f} MB float32 "
              f"(decoder={cfg.model.decoder})")

    gen = torch.Generator().manual_seed(cfg.seed)
    data = synthetic_lineages(cfg.transitions, cfg.stages, cfg.model.max_children, gen)
    devices = [torch.device(d) for d in cfg.devices if d != "cuda" or torch.cuda.is_available()]
    for device in devices:
        train_cfg = VAETrainConfig(model=cfg.model, steps=cfg.train_steps, batch_size=cfg.batch_size)
        vae, hist = train_vae(data, train_cfg, device=device, seed=cfg.seed)
        print(f"train [{device.type}] {cfg.transitions} transitions, {cfg.train_steps} steps x {cfg.batch_size}: "
              f"{hist['seconds']:.2f} s ({1000 * hist['seconds'] / cfg.train_steps:.1f} ms/step), "
              f"recon {hist['recon'][0]:.3f} -> {hist['recon'][-1]:.3f}")
        for n in cfg.sizes:
            try:
                lineages = synthetic_lineages(n, cfg.stages, cfg.model.max_children, gen)
                history, mask = lineages.history.to(device), lineages.history_mask.to(device)
                extrapolate(vae, history[:1000], mask[:1000], steps=1, seed=cfg.seed)
                times = []
                for r in range(cfg.repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    res = extrapolate(vae, history, mask, steps=1, seed=cfg.seed + r)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
            except (RuntimeError, MemoryError) as exc:
                print(f"infer [{device.type}] {n:>9,d} lineages: skipped ({type(exc).__name__}: {str(exc)[:80]})")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            t = sorted(times)[len(times) // 2]
            c = res.step_counts[0]
            print(f"infer [{device.type}] {n:>9,d} lineages, +1 step: {1000 * t:9.1f} ms "
                  f"({1e6 * t / n:.2f} us/lineage; continued {c['continued']}, spawned {c['spawned']})")
            del history, mask, res, lineages


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))
