"""What the tests that run ``ns-train gaussianvae`` share: tiny-run flags, the environment, stopping a process.

A tiny run trains a few hundred random Gaussians through three stages (4, 2, 1) on a 32-48 px scene in a
minute or less on two cores; the flags below are the one definition every such test builds on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

BIN = Path(sys.executable).parent
"""Where this interpreter's console scripts (ns-train, gvae-refine, ...) are."""


def tiny_flags(num_random: int = 600, stage_steps: Sequence[int] = (20, 20, 30), every: int = 10,
               decoder_steps: int = 30, save_every: Optional[int] = None, vis: Optional[str] = "tensorboard") -> List[str]:
    """``ns-train gaussianvae`` flags (before the dataparser) of a tiny CPU run: ``num_random`` random
    Gaussians, stages 4, 2, 1 of ``stage_steps`` steps, densification every ``every`` steps, a decoder fitted
    for ``decoder_steps`` steps, a checkpoint every ``save_every`` steps (default: at the end only) and
    ``vis`` (``None``: leave ``--vis`` to the caller)."""
    total = sum(stage_steps)
    flags = [] if vis is None else ["--vis", vis]
    flags += [
        "--machine.device-type", "cpu",
        "--pipeline.model.background-color", "white",
        "--pipeline.model.num-random", str(num_random),
        "--pipeline.model.random-scale", "3.0",
        "--pipeline.model.stage-downscales", "4", "2", "1",
        "--pipeline.model.stage-steps", *map(str, stage_steps),
        "--max-num-iterations", str(total),
        "--pipeline.model.warmup-length", str(every),
        "--pipeline.model.refine-every", str(every),
        "--pipeline.model.decoder-steps", str(decoder_steps),
        "--pipeline.model.extrapolate-fraction", "0.2",
        "--pipeline.model.finetune-steps", "0",  # the fine-tune has its own tests (test_refine_cli, test_refiner)
        "--steps-per-eval-image", "1000",
        "--steps-per-eval-all-images", "100000",
    ]
    if save_every is not None:
        flags += ["--steps-per-save", str(save_every)]
    return flags


def run_env(**extra: str) -> Dict[str, str]:
    """The environment of a command a test runs: two threads, no warnings noise, unbuffered output, and no
    ``GVAE_REFINED`` from the caller's shell."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", **extra)
    env.pop("GVAE_REFINED", None)
    return env


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End a process a test started in its own process group (``start_new_session=True``): SIGTERM, then
    SIGKILL after ``grace_s`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace_s)
