"""Time and peak memory of serialization, a SerializedTransformer forward and the densify head vs N.

Every (case, N) runs in a fresh subprocess so its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the growth of the process's peak RSS
(``resource.getrusage``) over the resident size taken once the inputs are built and a small
warm-up run has set up the libraries. Sizes whose time or memory, extrapolated linearly from the
previous size, would exceed ``max_seconds`` or ``max_mib`` are skipped. Prints a table and the
growth ratio per 10x N (10 = linear). ``cpu s`` is process CPU time (all threads), steadier than
wall time on a shared machine.

    python scripts/bench_densify.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import tyro

CASES = ("serialize", "transformer", "head")


@dataclass
class BenchConfig:
    """Benchmark of the generative densification stack."""

    sizes: Tuple[int, ...] = (10_000, 100_000, 1_000_000)
    """Numbers of points / selected Gaussians."""
    cases: Tuple[str, ...] = CASES
    """Which of serialize, transformer, head to run."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    width: int = 64
    """Feature width of the transformer and the head."""
    depth: int = 2
    """Blocks of the standalone SerializedTransformer."""
    patch_size: int = 64
    """Tokens per attention patch."""
    children: int = 4
    """R children per Gaussian in each head layer."""
    head_layers: int = 2
    """Densification layers of the head."""
    curve: str = "hilbert"
    """Curve timed in the serialize case."""
    backward: bool = False
    """Also run a backward pass (training cost) in the transformer and head cases."""
    max_seconds: float = 120.0
    """Skip a size when the previous size's time times the size ratio exceeds this."""
    max_mib: float = 8192.0
    """Skip a size when the previous size's peak memory times the size ratio exceeds this (MiB)."""
    warmup: int = 2
    """Untimed runs at full size before timing (allocator and thread-pool warm-up)."""
    repeats: int = 3
    """Timed repeats after the warm-up runs; the best is reported."""
    case: Optional[str] = None
    """Internal: run one case in this process and print its result as JSON."""
    n: int = 0
    """Internal: N of the single case."""


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``; else the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(cfg: BenchConfig) -> Dict[str, float]:
    """Run ``cfg.case`` at ``cfg.n`` points in this process; return seconds, peak MiB and output size."""
    import torch

    from gvae_ns.gaussians import MEANS, SCALES, PACKED_DIM
    from gvae_ns.densify.head import DensifyHead, DensifyHeadConfig
    from gvae_ns.densify.patch_attention import SerializedTransformer
    from gvae_ns.densify.serialization import serialize

    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(0)
    if cfg.case == "transformer":
        net = SerializedTransformer(cfg.width, cfg.depth, num_heads=4, patch_size=cfg.patch_size).to(device)
    elif cfg.case == "head":
        head_cfg = DensifyHeadConfig(
            num_layers=cfg.head_layers, children=cfg.children, width=cfg.width, patch_size=cfg.patch_size
        )
        head = DensifyHead(head_cfg).to(device)
    elif cfg.case != "serialize":
        raise ValueError(f"bench_densify: unknown case {cfg.case!r}; choose from {CASES}")

    def make_step(n: int) -> Callable[[], int]:
        points = torch.rand(n, 3, device=device)
        if cfg.case == "serialize":
            return lambda: serialize(points, cfg.curve, 10).order.numel()
        if cfg.case == "transformer":
            x = torch.randn(n, cfg.width, device=device, requires_grad=cfg.backward)

            def step() -> int:
                with torch.set_grad_enabled(cfg.backward):
                    out = net(x, points)
                    if cfg.backward:
                        out.square().mean().backward()
                return out.shape[0]

            return step
        state = torch.randn(n, PACKED_DIM, device=device)
        state[:, MEANS] = points
        state[:, SCALES] = -5.0

        def step() -> int:
            with torch.set_grad_enabled(cfg.backward):
                out = head(state)
                if cfg.backward:
                    out.states.square().mean().backward()
            return out.states.shape[0]

        return step

    step = make_step(cfg.n)
    make_step(min(cfg.n, 2048))()  # library and allocator set-up, kept out of the peak
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _current_rss()
    for _ in range(max(cfg.warmup, 1)):
        step()
    _sync(device)
    best, best_cpu, produced = float("inf"), float("inf"), 0
    for _ in range(max(cfg.repeats, 1)):
        start, start_cpu = time.perf_counter(), time.process_time()
        produced = step()
        _sync(device)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": best, "cpu_seconds": best_cpu, "peak_mib": peak / 2**20, "outputs": produced, "device": str(device),
            "threads": torch.get_num_threads()}


def _subprocess(cfg: BenchConfig, case: str, n: int) -> Dict[str, float]:
    args = [sys.executable, os.path.abspath(__file__), "--case", case, "--n", str(n), "--device", cfg.device,
            "--width", str(cfg.width), "--depth", str(cfg.depth), "--patch-size", str(cfg.patch_size),
            "--children", str(cfg.children), "--head-layers", str(cfg.head_layers), "--curve", cfg.curve,
            "--warmup", str(cfg.warmup), "--repeats", str(cfg.repeats)]
    if cfg.backward:
        args.append("--backward")
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench_densify: case {case} N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(cfg: BenchConfig) -> None:
    """Run every case over the sizes and print the table."""
    if cfg.case is not None:
        print(json.dumps(run_case(cfg)))
        return
    sizes = sorted(cfg.sizes)
    rows: List[Tuple[str, int, Dict[str, float]]] = []
    for case in cfg.cases:
        previous: Optional[Tuple[int, Dict[str, float]]] = None
        for n in sizes:
            if previous is not None:
                grow = n / previous[0]
                seconds, mib = previous[1]["seconds"] * grow, previous[1]["peak_mib"] * grow
                if seconds > cfg.max_seconds or mib > cfg.max_mib:
                    print(f"# skip {case} N={n}: ~{seconds:.0f} s, ~{mib:.0f} MiB projected "
                          f"(max_seconds={cfg.max_seconds}, max_mib={cfg.max_mib})", flush=True)
                    continue
            result = _subprocess(cfg, case, n)
            rows.append((case, n, result))
            previous = (n, result)
            print(f"# {case} N={n}: {result['seconds']:.3f} s, {result['peak_mib']:.0f} MiB", flush=True)
    if not rows:
        return
    print(f"\ndevice: {rows[0][2]['device']}, threads: {rows[0][2]['threads']}, width={cfg.width}, "
          f"patch={cfg.patch_size}, depth={cfg.depth}, R={cfg.children}, head layers={cfg.head_layers}, "
          f"backward={cfg.backward}")
    print(f"{'case':<12}{'N':>9}{'outputs':>10}{'wall s':>9}{'cpu s':>9}{'peak MiB':>10}"
          f"{'wall x/10N':>12}{'cpu x/10N':>11}{'mem x/10N':>11}")
    last: Dict[str, Tuple[int, Dict[str, float]]] = {}
    for case, n, r in rows:
        ratios = ["", "", ""]
        if case in last:
            n0, r0 = last[case]
            per10 = 1.0 / math.log10(n / n0)
            for i, key in enumerate(("seconds", "cpu_seconds", "peak_mib")):
                if r0[key] > 0:
                    ratios[i] = f"{(r[key] / r0[key]) ** per10:.1f}"
        print(f"{case:<12}{n:>9}{int(r['outputs']):>10}{r['seconds']:>9.3f}{r['cpu_seconds']:>9.3f}"
              f"{r['peak_mib']:>10.0f}{ratios[0]:>12}{ratios[1]:>11}{ratios[2]:>11}")
        last[case] = (n, r)


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))
