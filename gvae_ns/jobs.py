"""Command lines run a few at a time, each logging to its own file: gvae-bench's trainings and gvae-pretrain's
scene trainings both go through :func:`run_logged`."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch


@dataclass(frozen=True)
class LoggedCommand:
    """One command line and where its output goes."""

    key: Any
    """What the caller knows the command by (handed back to its callbacks)."""
    argv: List[str]
    """The command line."""
    log: Path
    """File that receives its stdout and stderr (overwritten)."""


def job_env(at_once: int) -> Dict[str, str]:
    """This process's environment for ``at_once`` commands sharing the CPU: ``OMP_NUM_THREADS`` = cores / ``at_once``
    unless it is set already or the work runs on CUDA."""
    env = dict(os.environ)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // at_once))
    return env


def run_logged(commands: Sequence[LoggedCommand], at_once: int, cwd: Path,
               finished: Callable[[LoggedCommand, int, float], None],
               started: Callable[[LoggedCommand], None] = lambda command: None,
               allows: Callable[[], bool] = lambda: True) -> None:
    """Run ``commands`` in order, at most ``at_once`` at a time, in ``cwd`` with :func:`job_env`.

    ``started(command)`` is called just before a command starts, and only while ``allows()`` (e.g. a time budget);
    once it refuses, the commands not started are left out. ``finished(command, exit status, wall seconds)`` is
    called as each one ends; if a callback raises, the running commands are terminated and the error goes on."""
    env = job_env(at_once)
    pending = list(commands)
    running: List[Tuple[LoggedCommand, subprocess.Popen, float, Any]] = []
    try:
        while pending or running:
            while pending and len(running) < at_once and allows():
                command = pending.pop(0)
                started(command)
                handle = open(command.log, "w", encoding="utf-8")
                proc = subprocess.Popen(command.argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(cwd))
                running.append((command, proc, time.monotonic(), handle))
            if not running:
                return  # allows() stopped the rest
            time.sleep(0.5)
            for item in list(running):
                command, proc, begun, handle = item
                if proc.poll() is None:
                    continue
                handle.close()
                running.remove(item)
                finished(command, proc.returncode, time.monotonic() - begun)
    finally:
        for _, proc, _, handle in running:
            proc.terminate()
            proc.wait()
            handle.close()
