"""Lineage recording cost: refine-step overhead and lineage file size, on CPU.

Per size, one refinement step (gsplat's ``_grow_gs`` + ``_prune_gs``, with Adam state, about 5 %
of the Gaussians cloned, 5 % split and 5 % pruned) is timed with ``DefaultStrategy`` and with
``LineageStrategy``; the recorder's own share is timed directly. Then a lineage file with one
snapshot of ``n`` Gaussians is written in float32 and float16.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_lineage.py --sizes 100000 1000000
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import tyro
from gsplat.strategy import DefaultStrategy

from gvae_ns.lineage import LineageRecorder, LineageStrategy, load_lineage


@dataclass
class BenchConfig:
    """Lineage overhead benchmark."""

    sizes: Tuple[int, ...] = (100_000, 1_000_000)
    """Numbers of Gaussians to test."""
    trials: int = 3
    """Timed refinement steps per size and strategy (the median is printed)."""
    threads: int = 1
    """torch CPU threads."""


class TimedRecorder(LineageRecorder):
    """A recorder that adds up the time spent in its bookkeeping."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def record_growth(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        super().record_growth(*args, **kwargs)
        self.seconds += time.perf_counter() - t

    def record_removal(self, *args, **kwargs) -> int:  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = super().record_removal(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        return out


def make_scene(n: int, seed: int) -> Tuple[torch.nn.ParameterDict, Dict[str, torch.optim.Optimizer], Dict]:
    """Gaussians, Adam optimizers with state, and strategy statistics that clone/split/prune ~5 % each."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    scale = torch.where(u < 0.05, 0.005, 0.05) * torch.ones(n)
    params = torch.nn.ParameterDict(
        {
            "means": torch.randn(n, 3, generator=g),
            "scales": torch.log(scale).unsqueeze(1).repeat(1, 3),
            "quats": torch.randn(n, 4, generator=g),
            "opacities": torch.where((u > 0.10) & (u < 0.15), -6.0, 0.0).unsqueeze(1),
            "features_dc": torch.randn(n, 3, generator=g),
            "features_rest": torch.zeros(n, 15, 3),
        }
    )
    optimizers = {}
    for name, p in params.items():
        opt = torch.optim.Adam([{"params": p, "lr": 1e-3, "name": name}])
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        optimizers[name] = opt
    grad = torch.where(u < 0.10, 1.0, 0.0)
    stats = {"grad2d": grad, "count": torch.ones(n), "scene_scale": 1.0}
    return params, optimizers, stats


def refine_once(strategy: DefaultStrategy, n: int, seed: int) -> Tuple[float, float, List[int]]:
    """Seconds of one ``_grow_gs + _prune_gs``, the recorder's share of them, and the event counts."""
    params, optimizers, stats = make_scene(n, seed=seed)
    state = strategy.initialize_state()
    state.update(stats)
    recorder = None
    if isinstance(strategy, LineageStrategy):
        recorder = strategy.recorder = TimedRecorder()
        recorder.sync_ids(state, n, 0, "cpu")
    torch.manual_seed(seed)
    t = time.perf_counter()
    n_dupli, n_split = strategy._grow_gs(params, optimizers, state, step=1000)
    n_prune = strategy._prune_gs(params, optimizers, state, step=1000)
    total = time.perf_counter() - t
    return total, recorder.seconds if recorder else 0.0, [int(n_dupli), int(n_split), int(n_prune)]


def time_refine(n: int, trials: int) -> Dict[str, float]:
    """Median times over ``trials`` of both strategies, alternating which runs first; one warm-up."""
    runs: Dict[str, List[float]] = {"base": [], "lineage": [], "recorder": []}
    for trial in range(-1, trials):
        order = ["base", "lineage"] if trial % 2 == 0 else ["lineage", "base"]
        counts = {}
        for name in order:
            strategy = DefaultStrategy() if name == "base" else LineageStrategy()
            total, rec, counts[name] = refine_once(strategy, n, seed=max(trial, 0))
            if trial >= 0:
                runs[name].append(total)
                if name == "lineage":
                    runs["recorder"].append(rec)
        assert counts["base"] == counts["lineage"], "both strategies must make the same decisions"
    out = {k: statistics.median(v) for k, v in runs.items()}
    out.update(dupli=counts["base"][0], split=counts["base"][1], prune=counts["base"][2])
    return out


def file_sizes(n: int, tmp: Path) -> Dict[str, float]:
    """MB of a lineage file with one n-Gaussian snapshot (float32 / float16) and of the bare event table."""
    params, _, stats = make_scene(n, seed=0)
    rec = LineageRecorder()
    state = {"grad2d": stats["grad2d"], "count": stats["count"]}
    rec.snapshot(params, state, stage=0, step=0)
    out: Dict[str, float] = {}
    t = time.perf_counter()
    f32 = rec.save(tmp / "f32.npz")
    out["save_f32_s"] = time.perf_counter() - t
    t = time.perf_counter()
    load_lineage(f32)
    out["load_f32_s"] = time.perf_counter() - t
    f16 = rec.save(tmp / "f16.npz", float16=True)
    bare = LineageRecorder()
    bare.register_seeds(n, 0)
    events = bare.save(tmp / "events.npz")
    mb = 1e6
    out["events_mb"] = events.stat().st_size / mb
    out["f32_mb"] = f32.stat().st_size / mb
    out["f16_mb"] = f16.stat().st_size / mb
    return out


def main() -> None:
    """Run the benchmark and print the figures."""
    config = tyro.cli(BenchConfig)
    torch.set_num_threads(config.threads)
    print(f"torch {torch.__version__}, {config.threads} CPU thread(s), median of {config.trials} refine steps")
    for n in config.sizes:
        r = time_refine(n, config.trials)
        base, lin, rec = r["base"], r["lineage"], r["recorder"]
        print(
            f"n={n:>9,}: {r['dupli']} cloned, {r['split']} split, {r['prune']} pruned | "
            f"DefaultStrategy {base * 1e3:8.1f} ms, LineageStrategy {lin * 1e3:8.1f} ms "
            f"({(lin - base) / base * 100:+.1f} %), recorder bookkeeping {rec * 1e3:6.2f} ms ({rec / base * 100:.2f} %)"
        )
    for n in config.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            s = file_sizes(n, Path(tmp))
        per_m = 1e6 / n
        print(
            f"n={n:>9,}: file per 1M Gaussians per snapshot: float32 {(s['f32_mb'] - s['events_mb']) * per_m:7.1f} MB, "
            f"float16 {(s['f16_mb'] - s['events_mb']) * per_m:7.1f} MB; event table {s['events_mb'] * per_m:5.1f} MB per 1M ids; "
            f"save {s['save_f32_s']:.2f} s, load+validate {s['load_f32_s']:.2f} s (float32)"
        )


if __name__ == "__main__":
    main()
