"""Full ns-train gaussianvae training steps on lego at x4 (200 px), PyTorch vs compiled CPU rasterizer, side by side.

    .venv/bin/python scripts/bench_train_step.py --data ../shared/data/lego --gaussians 50000 150000

For each Gaussian count, one trainer is set up exactly as ``ns-train gaussianvae`` sets it up (the registered
method config; one resolution stage at the x4 copy's own 200 px; random initialisation with that many
Gaussians) and timed over ``--steps`` full iterations: the training callbacks before and after each step
(densification statistics; densification itself is pushed past the timed steps so the count stays fixed)
plus ``Trainer.train_iteration`` (forward, loss, backward, optimiser step). The two rasterizers alternate on
the same trainer, step by step, so machine load hits both alike; the first ``--warmup`` steps of each are not
timed. Prints one table row per count (median seconds per step and the speed-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from nerfstudio.configs.method_configs import all_methods
from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig
from nerfstudio.engine.callbacks import TrainingCallbackLocation

from gvae_ns import render
from gvae_ns.datasets import downscale_blender


def lr_copy(data: Path, factor: int) -> Path:
    """The x``factor`` training copy of ``data`` (cached beside the system's temp dir)."""
    out = Path(tempfile.gettempdir()) / f"gvae-bench-{data.name}-x{factor}"
    if not (out / "transforms_train.json").is_file():
        downscale_blender(data, out, factor)
    return out


def make_trainer(data: Path, gaussians: int, steps: int, output: Path):
    config = all_methods["gaussianvae"]
    config.output_dir = output
    config.vis = "tensorboard"
    config.machine.device_type = "cpu"
    config.max_num_iterations = steps + 10
    config.steps_per_save = 10**9
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**9
    model = config.pipeline.model
    model.stage_downscales = (1,)
    model.stage_steps = (steps + 10,)
    model.refinement_after_training = False
    model.random_init = True
    model.num_random = gaussians
    model.background_color = "white"
    model.warmup_length = 10**9  # densification statistics gathered, no clone/split/prune in the timed steps
    config.pipeline.datamanager.data = data
    config.pipeline.datamanager.dataparser = BlenderDataParserConfig(data=data)
    config.set_timestamp()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def step(trainer, i: int) -> float:
    started = time.perf_counter()
    for cb in trainer.callbacks:
        cb.run_callback_at_location(i, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    trainer.pipeline.train()
    trainer.train_iteration(i)
    for cb in trainer.callbacks:
        cb.run_callback_at_location(i, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    return time.perf_counter() - started


def use(choice: str) -> None:
    os.environ[render.RASTERIZER_ENV] = choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/lego"), help="Blender-format lego")
    parser.add_argument("--factor", type=int, default=4, help="training-image downscale (x4: 800 -> 200 px)")
    parser.add_argument("--gaussians", type=int, nargs="+", default=[50_000, 150_000])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per rasterizer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per rasterizer first")
    args = parser.parse_args()
    data = lr_copy(args.data, args.factor)
    print(f"torch threads: {torch.get_num_threads()}; data: {data}")
    print("| Gaussians | PyTorch rasterizer (s/step) | compiled (s/step) | speed-up |\n|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.gaussians:
            trainer = make_trainer(data, n, 2 * (args.steps + args.warmup), Path(tmp))
            times = {"torch": [], "cpp": []}
            i = 0
            for rep in range(args.steps + args.warmup):
                for choice in ("torch", "cpp"):
                    use(choice)
                    seconds = step(trainer, i)
                    i += 1
                    if rep >= args.warmup:
                        times[choice].append(seconds)
            count = trainer.pipeline.model.num_points
            slow, fast = statistics.median(times["torch"]), statistics.median(times["cpp"])
            print(f"| {count} | {slow:.3f} | {fast:.3f} | {slow / fast:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
