"""``gvae-pretrain``: make the cross-scene prior (scenes -> trainings -> shards -> data-parallel VAE -> weights).

Three steps, each resumable in ``--out``: :func:`gvae_ns.prior.corpus.build_corpus` renders and trains the
procedural scenes and writes their shards; :func:`gvae_ns.prior.train.train_prior` trains one lineage VAE on
all of them in ``--world-size`` processes (``torch.distributed``: gloo on CPU, NCCL on GPUs; a checkpoint in
``--out`` lets a stopped run resume); ``--ship`` then writes the weights and their manifest into the package
(:mod:`gvae_ns.prior.shipped`), where ``gvae-refine --decoder prior`` and gvae-bench's ``prior`` rows find them.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import tyro
from torch.multiprocessing import ProcessRaisedException

from gvae_ns.console import say
from gvae_ns.datasets import read_json, write_json
from gvae_ns.prior.corpus import CorpusConfig, build_corpus, check_corpus, shard_path, shard_sizes
from gvae_ns.prior.shipped import SHIPPED_DIR, write_shipped
from gvae_ns.prior.train import PriorTrainConfig, default_backend, process_group, run_distributed, train_prior
from gvae_ns.progress import phase
from gvae_ns.vae.file import load_vae


WALL_FILE = "wall.json"
"""In ``--out``: the wall time of every finished gvae-pretrain run there, summed (what the manifest reports)."""


@dataclass
class PretrainConfig:
    """Train the cross-scene prior (``gvae-pretrain``)."""

    out: Path = Path("outputs/prior")
    """Working folder: scenes, runs, shards, the training checkpoint and the trained prior (reused to resume)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The procedural scenes and how each is trained."""
    train: PriorTrainConfig = field(default_factory=lambda: PriorTrainConfig(steps=4000))
    """How the prior VAE is trained on their transitions (4000 steps by default, what the shipped prior got on a
    2-core CPU; more where there is more compute)."""
    world_size: int = 2
    """Training processes started here (torch.distributed; one per GPU on a GPU machine). Under torchrun
    (WORLD_SIZE set) each process it starts is one rank instead, and this is not used."""
    ship: bool = False
    """Write the weights and their manifest into the package (gvae_ns/prior/weights/), replacing the shipped prior."""
    ship_dir: Optional[Path] = None
    """Where --ship writes (default: the package's own gvae_ns/prior/weights/)."""


def pretrain(config: PretrainConfig, argv: Optional[list] = None) -> Path:
    """Run the three steps of :mod:`gvae_ns.prior.cli`; returns the trained prior's file."""
    if config.world_size < 1:
        raise ValueError(f"--world-size must be at least 1, got {config.world_size}.")
    check_corpus(config.corpus)
    config.train.check()
    started = time.perf_counter()
    out = config.out.resolve()
    backend = default_backend()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by torchrun: this process is one rank of the group
    with process_group(backend) if launched else contextlib.nullcontext():
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if launched else (0, config.world_size)
        if rank == 0:  # the scenes are made once (on a file system every machine shares)
            build_corpus(config.corpus, out, log=say)
        if launched:
            dist.barrier()
        shards = [shard_path(out, seed) for seed in config.corpus.scene_seeds]
        transitions = sum(shard_sizes(config.corpus, out))
        if rank == 0:
            say(f"gvae-pretrain: training the prior on {transitions} transitions from {len(shards)} scenes "
                f"({world_size} {backend} process(es))")
        if launched:
            _train_worker(shards, config.train, out / "train")
        else:
            run_distributed(_train_worker, world_size, backend, args=(shards, config.train, out / "train"))
    prior = out / "train" / "prior.pt"
    if rank != 0:
        return prior
    spent = read_json(out / WALL_FILE) or {}
    wall_s = float(spent.get("wall_s", 0.0)) + time.perf_counter() - started
    write_json(out / WALL_FILE, {"wall_s": wall_s})
    say(f"gvae-pretrain: prior -> {prior} ({wall_s / 60:.1f} min in all, this run and the ones it resumed)")
    if config.ship:
        facts = {"command": shlex.join(["gvae-pretrain", *(argv or [])]), "scene_seeds": list(config.corpus.scene_seeds),
                 "transitions": transitions, "steps": config.train.steps, "world_size": world_size,
                 "backend": backend, "wall_s": round(wall_s, 1),
                 "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                 + (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
                    else "CPU only")}
        manifest = write_shipped(load_vae(prior), config.ship_dir or SHIPPED_DIR, facts)
        say(f"gvae-pretrain: shipped {manifest['bytes']} bytes (sha256 {manifest['sha256'][:12]}...) -> "
            f"{config.ship_dir or SHIPPED_DIR}")
    return prior


def _train_worker(shards: list, config: PriorTrainConfig, out: Path) -> None:
    """One training process (rank 0 shows the progress bar)."""
    if int(os.environ.get("RANK", "0")) != 0:
        train_prior(shards, config, out)
        return
    with phase("Prior training", config.steps) as advance:
        train_prior(shards, config, out, progress=advance)


def main() -> None:
    """Console entry point ``gvae-pretrain``."""
    config = tyro.cli(PretrainConfig)
    try:
        pretrain(config, sys.argv[1:])
    except ProcessRaisedException as err:  # a training process failed: its own error is the last line
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise SystemExit(f"gvae-pretrain: a training process failed: {lines[-1] if lines else err}") from None
    except (ValueError, RuntimeError, OSError) as err:
        raise SystemExit(f"gvae-pretrain: {err}") from None


if __name__ == "__main__":
    main()
