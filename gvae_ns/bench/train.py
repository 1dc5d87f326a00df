"""gvae-bench training: every run with ns-train in a subprocess, resumable, within a time budget."""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from gvae_ns.bench.config import BenchConfig, RunSpec, fingerprint
from gvae_ns.datasets import read_json, write_json
from gvae_ns.jobs import LoggedCommand, run_logged


# ------------------------------------------------------------------------------------------------ training
def run_dir(output: Path, spec: RunSpec) -> Path:
    """Where ns-train writes ``spec``'s run (config.yml, nerfstudio_models/)."""
    return output.resolve() / "runs" / spec.name / spec.method / "run"


def train_command(cfg: BenchConfig, spec: RunSpec) -> List[str]:
    """The ns-train command line of ``spec`` (run with this interpreter)."""
    return [
        sys.executable, "-m", "nerfstudio.scripts.train", spec.method,
        "--output-dir", str(cfg.output.resolve() / "runs"),
        "--experiment-name", spec.name,
        "--timestamp", "run",
        "--vis", "tensorboard",
        "--max-num-iterations", str(spec.steps),
        "--steps-per-save", str(spec.steps),
        "--steps-per-eval-batch", "0",
        "--steps-per-eval-image", "0",
        "--steps-per-eval-all-images", "0",
        "--pipeline.model.background-color", cfg.background,
        *spec.args,
        *shlex.split(cfg.train_args),
        spec.dataparser, "--data", str(spec.data),
        # a capture copy is at the resolution it should train at: no automatic downscale (nor its prompt)
        *(("--downscale-factor", "1") if spec.dataparser == "nerfstudio-data" else ()),
    ]


def _run_fingerprint(cfg: BenchConfig, spec: RunSpec) -> str:
    if spec.data_fingerprint:
        return fingerprint({"cmd": train_command(cfg, spec)[1:], "data": spec.data_fingerprint})
    return fingerprint({"cmd": train_command(cfg, spec)[1:]})


def _checkpoint(directory: Path) -> Optional[Path]:
    ckpts = sorted((directory / "nerfstudio_models").glob("step-*.ckpt"))
    return ckpts[-1] if ckpts else None


def trained(cfg: BenchConfig, spec: RunSpec) -> Optional[dict]:
    """The run's ``train.json`` record when it finished with the current settings, else None."""
    record = read_json(cfg.output.resolve() / "runs" / spec.name / "train.json")
    if not record or record.get("status") != "ok" or record.get("fingerprint") != _run_fingerprint(cfg, spec):
        return None
    directory = run_dir(cfg.output, spec)
    if not (directory / "config.yml").is_file() or _checkpoint(directory) is None:
        return None
    return record


class Budget:
    """Wall-clock budget: whether a piece of work expected to take ``estimate_s`` still fits."""

    def __init__(self, total_s: Optional[float]):
        self.start = time.monotonic()
        self.total_s = total_s

    def allows(self, estimate_s: float) -> bool:
        """True when there is no budget or the work fits in what is left of it."""
        return self.total_s is None or time.monotonic() - self.start + estimate_s <= self.total_s


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _finish_training(cfg: BenchConfig, spec: RunSpec, rc: int, wall_s: float, log_path: Path) -> dict:
    directory = run_dir(cfg.output, spec)
    ckpt = _checkpoint(directory)
    record: Dict[str, Any] = {"fingerprint": _run_fingerprint(cfg, spec), "method": spec.method,
                              "factor": spec.factor, "log": str(log_path), "wall_s": round(wall_s, 2),
                              "concurrent_jobs": cfg.jobs}
    if rc != 0 or ckpt is None or not (directory / "config.yml").is_file():
        record.update(status="failed", error=f"ns-train exited with code {rc}; last lines of {log_path}:\n"
                                            f"{_tail(log_path)}")
    else:
        # config.yml is written just before the trainer sets up; the last checkpoint right after the last step.
        train_s = ckpt.stat().st_mtime - (directory / "config.yml").stat().st_mtime
        record.update(status="ok", config=str(directory / "config.yml"), checkpoint=str(ckpt),
                      train_s=round(train_s, 2), steps=spec.steps, finished_at=time.time())
    write_json(cfg.output.resolve() / "runs" / spec.name / "train.json", record)
    return record


def train_all(cfg: BenchConfig, runs: Sequence[RunSpec], budget: Budget, log=print) -> Dict[str, dict]:
    """Train the runs that are not done yet, ``cfg.jobs`` at a time; return ``{run: train record}``."""
    records: Dict[str, dict] = {}
    pending: List[RunSpec] = []
    for spec in runs:
        done = trained(cfg, spec)
        if done is not None:
            log(f"[skip] {spec.name}: trained already ({done['train_s']:.1f} s)")
            records[spec.name] = done
        else:
            pending.append(spec)
    logs = cfg.output.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def started(command: LoggedCommand) -> None:
        spec = command.key
        shutil.rmtree(cfg.output.resolve() / "runs" / spec.name, ignore_errors=True)
        (cfg.output.resolve() / "runs" / spec.name).mkdir(parents=True)
        log(f"[train] {spec.name}: {spec.method} on {spec.data.name} for {spec.steps} steps (log: {command.log})")

    def finished(command: LoggedCommand, returncode: int, wall_s: float) -> None:
        spec = command.key
        record = _finish_training(cfg, spec, returncode, wall_s, command.log)
        records[spec.name] = record
        status = f"{record['train_s']:.1f} s" if record["status"] == "ok" else "FAILED"
        log(f"[train] {spec.name}: {status}")

    commands = [LoggedCommand(spec, train_command(cfg, spec), logs / f"train-{spec.name}.log") for spec in pending]
    run_logged(commands, cfg.jobs, cfg.output.resolve(), finished, started,
               allows=lambda: budget.allows(cfg.train_estimate_s))
    return records


