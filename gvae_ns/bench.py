"""``gvae-bench``: super-resolution quality and speed of gaussianvae against splatfacto, side by side.

For a Blender-format dataset whose test views are at the full (target) resolution the benchmark

1. makes box-filtered low-resolution (LR) training copies, x2, x4 ... (:func:`gvae_ns.datasets.downscale_blender`;
   test views stay at full resolution);
2. trains every row with ``ns-train`` in subprocesses, with the same step budget for all: splatfacto classic
   and antialiased on each LR copy, gaussianvae through resolution stages on each LR copy (its finest stage
   is the LR copy itself), and the full-resolution oracle;
3. refines the gaussianvae runs (``gvae_ns.refine.refine_run``): "Ours" extrapolates every lineage, "Ours-nabla2"
   the Hessian-selected ones, +1..+4 steps past the finest stage, with the lineage VAE and / or the generative
   densification head ("(GD head)" rows);
4. renders every model at full resolution on the same held-out test cameras with its own code (no ns-eval) and
   scores PSNR, SSIM, LPIPS / BRISQUE where available, the Chamfer distance from Gaussian centres to the
   dataset's ``points_gt.npy`` (when it has one), Gaussian count, training / refinement time and render speed;
5. writes ``results.json``, ``results.md`` and ``crops.png`` (the same crop from the LR baseline, ours, the
   oracle and the ground truth) into the output directory.

Stock splatfacto needs CUDA (gsplat's rasterizer). Without CUDA the baselines are ``gaussianvae`` with one
stage at the training data's resolution and no refinement, i.e. splatfacto's densification and losses with the
pure-PyTorch renderer; they are labelled "splatfacto ... (CPU renderer)".

Every finished piece is recorded on disk (``runs/<run>/train.json``, ``refinements/<row>.json``,
``rows/<row>.json``) with a fingerprint of what made it, so running the same command again skips the work
that is done and redoes what changed or failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from gvae_ns.datasets import atomic_write, check_blender_dir, downscale_blender, write_json

RESULTS_FORMAT = "gvae_ns.bench"
RESULTS_VERSION = 1
EXIT_OK, EXIT_FAILED, EXIT_RESUME = 0, 1, 75
"""Exit codes of ``gvae-bench``: all rows done; some rows failed; stopped by ``--time-budget-s`` (run again)."""
TILE_PAD = 6
"""Pixels between the tiles of the crop figure (and around it)."""
TILE_CAPTION = 16
"""Height in pixels of the caption strip above each tile of the crop figure."""
BLIND_SPOT = (128, 128, 128)
"""Colour of a crop-figure tile whose model has no render (failed or not run yet)."""
_SELECT_LABEL = {"all": "Ours", "hessian": "Ours-nabla2", "grad": "Ours-grad"}
_DECODER_TAG = {"temporal": ("", ""), "generative": ("-gd", " (GD head)")}
"""Row id suffix and label tag of each refinement decoder (temporal rows keep the ids they had before)."""


# --------------------------------------------------------------------------------------------- configuration
@dataclass
class SceneConfig:
    """The built-in procedural scene (gvae_ns.synthetic), used when no --data is given."""

    resolution: int = 64
    """Full (test) resolution in pixels, width = height."""
    n_train: int = 12
    """Training views."""
    n_val: int = 2
    """Validation views (nerfstudio's loader needs the split; the benchmark does not use it)."""
    n_test: int = 2
    """Held-out test views the benchmark scores."""
    n_points: int = 20000
    """Ground-truth surface points (points_gt.npy) for the Chamfer distance."""
    seed: int = 0
    """Seed for the cameras and the point sample."""
    supersample: int = 3
    """Ray samples per pixel side (anti-aliased ground truth)."""


@dataclass
class BenchConfig:
    """Super-resolution benchmark: LR baselines vs gaussianvae (+ refinement) vs full-resolution oracle."""

    config: Optional[Path] = None
    """Suite file (.yaml / .json) whose keys replace these defaults; flags given on the command line override it."""
    name: str = "gvae-bench"
    """Title of the results table."""
    data: Optional[Path] = None
    """Blender-format dataset with full-resolution test views; leave unset to render the built-in scene."""
    scene: SceneConfig = field(default_factory=SceneConfig)
    """The built-in scene (only used without --data)."""
    output: Path = Path("outputs/bench")
    """Output directory: data copies, runs, results.json, results.md, crops.png. Reused to resume."""
    factors: Tuple[int, ...] = (2,)
    """Downscale factors of the low-resolution training copies (each must divide the training image size)."""
    steps: int = 300
    """Training steps of every row (the same budget for all)."""
    baselines: Tuple[Literal["classic", "antialiased"], ...] = ("classic", "antialiased")
    """splatfacto rasterize modes trained on each LR copy."""
    baseline_impl: Literal["auto", "splatfacto", "cpu"] = "auto"
    """'splatfacto': stock ns-train splatfacto (needs CUDA); 'cpu': gaussianvae with one stage at the data's
    resolution and no refinement (the CPU renderer); 'auto': splatfacto when CUDA is available, else cpu."""
    oracle: bool = True
    """Also train the baseline (classic) on the full-resolution training images."""
    ours: bool = True
    """Train gaussianvae through stages on each LR copy (and refine it)."""
    ours_downscales: Tuple[int, ...] = (4, 2, 1)
    """gaussianvae stage downscales relative to the LR copy (finest 1 = the LR resolution the baselines see)."""
    ours_stage_fractions: Tuple[float, ...] = (0.25, 0.25, 0.5)
    """Share of --steps each stage gets (one per stage; the last stage takes the rounding remainder)."""
    refine_steps: Tuple[int, ...] = (2,)
    """Extrapolation steps past the finest stage to evaluate (each of 1..4 gives a row per selection)."""
    refine_selects: Tuple[Literal["all", "hessian", "grad"], ...] = ("all", "hessian")
    """Selections to evaluate: 'all' is "Ours", 'hessian' is "Ours-nabla2"."""
    refine_decoders: Tuple[Literal["temporal", "generative"], ...] = ("temporal",)
    """Refinement decoders to evaluate, each with every selection and step count: 'temporal' is the lineage VAE
    (<run>/vae.pt), 'generative' the serialized-attention densification head (<run>/densify_head.pt), rows
    "Ours (GD head) +k"."""
    refine_fraction: float = 0.1
    """Fraction of Gaussians the hessian / grad selection keeps."""
    refine_args: str = ""
    """Extra gvae-refine flags parsed into its RefineConfig, e.g. --refine-args='--vae-steps 300' (a list in
    a suite file)."""
    train_args: str = ""
    """Extra ns-train flags for every run, e.g. --train-args='--pipeline.model.num-random 2000' (a list in a
    suite file)."""
    ours_args: str = ""
    """Extra ns-train flags for the gaussianvae runs only (as --train-args)."""
    baseline_args: str = ""
    """Extra ns-train flags for the baseline and oracle runs only (as --train-args)."""
    background: Literal["white", "black"] = "white"
    """Background colour every model trains and renders with (and that test images with alpha are put on)."""
    jobs: int = 1
    """Trainings run at once (their times are then measured while sharing the machine)."""
    max_test_views: Optional[int] = None
    """Score only the first N test views (all by default)."""
    chamfer_opacity: float = 0.5
    """Gaussians with opacity above this count as 'opaque' for the first Chamfer column."""
    figure_view: int = 0
    """Test view the crop figure shows."""
    crop_px: Optional[int] = None
    """Side of the crop in full-resolution pixels (default: a quarter of the shorter side, at least 16)."""
    tile_px: int = 192
    """Approximate tile size in the crop figure; crops are enlarged by an integer factor towards it."""
    lpips: bool = True
    """Score LPIPS where its weights are already on disk (never downloads)."""
    brisque: bool = True
    """Score BRISQUE where the optional brisque package is installed."""
    time_budget_s: Optional[float] = None
    """Stop starting new work once it would not finish within this many seconds (exit code 75; run again)."""
    train_estimate_s: float = 120.0
    """Expected seconds of one training (for --time-budget-s)."""
    refine_estimate_s: float = 60.0
    """Expected seconds of one refinement (for --time-budget-s)."""
    eval_estimate_s: float = 30.0
    """Expected seconds to evaluate one run's rows (for --time-budget-s)."""


@dataclass(frozen=True)
class RunSpec:
    """One ns-train run."""

    name: str
    """Directory name under <output>/runs."""
    method: str
    """ns-train method: 'splatfacto' or 'gaussianvae'."""
    factor: int
    """Downscale of the training images (1 = full resolution)."""
    data: Path
    """Training dataset directory."""
    args: Tuple[str, ...]
    """Method flags (before the dataparser subcommand)."""


@dataclass(frozen=True)
class RowSpec:
    """One evaluated model: a run, optionally with a refinement."""

    name: str
    """Key in results.json and file name under <output>/rows."""
    label: str
    """Method column of the table."""
    kind: Literal["baseline", "ours", "oracle"]
    """Row role (the crop figure and the table use it)."""
    factor: int
    """Downscale of the training images (1 = oracle)."""
    run: str
    """RunSpec.name this row evaluates."""
    refine_steps: Optional[int] = None
    """Extrapolation steps, or None for the run as trained."""
    refine_select: Optional[str] = None
    """Selection mode of the refinement."""
    refine_decoder: Optional[str] = None
    """Decoder of the refinement: 'temporal' (lineage VAE) or 'generative' (densification head)."""


class BenchError(ValueError):
    """A benchmark that cannot run; the message names the file or field and the fix."""


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise BenchError(f"{where} must be a mapping of {hint.__name__} fields, got {value!r}.")
        return _dataclass_from(hint, value, where)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise BenchError(f"{where} must be a list, got {value!r}.")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in args:
            raise BenchError(f"{where} must be one of {list(args)}, got {value!r}.")
        return value
    if hint is Path:
        return Path(str(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise BenchError(f"{where} must be true or false, got {value!r}.")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and int(value) != value):
            raise BenchError(f"{where} must be {'an integer' if hint is int else 'a number'}, got {value!r}.")
        return hint(value)
    if hint is str:
        if isinstance(value, (list, tuple)):  # a list of command-line words
            return shlex.join(str(v) for v in value)
        return str(value)
    return value


def _dataclass_from(cls: type, values: Dict[str, Any], where: str) -> Any:
    hints = _hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(hints)}.")
    return cls(**{k: _coerce(v, hints[k], f"{where}: {k}") for k, v in values.items()})


def load_suite(path: Path | str) -> BenchConfig:
    """Read a suite file (YAML or JSON mapping of :class:`BenchConfig` fields) into a config."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"suite file {path} does not exist; see configs/bench-*.yaml for examples.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError: both name the line
        raise BenchError(f"suite file {path} cannot be parsed: {err}") from None
    if not isinstance(values, dict):
        raise BenchError(f"suite file {path} must hold a mapping of BenchConfig fields, got {type(values).__name__}.")
    values.pop("config", None)
    cfg = _dataclass_from(BenchConfig, values, str(path))
    cfg.config = path
    return cfg


def check_config(cfg: BenchConfig) -> None:
    """Raise :class:`BenchError` for settings that cannot make a benchmark."""
    if cfg.steps < 1:
        raise BenchError(f"steps must be >= 1, got {cfg.steps}.")
    if cfg.jobs < 1:
        raise BenchError(f"jobs must be >= 1, got {cfg.jobs}.")
    if any(f < 2 for f in cfg.factors) or len(set(cfg.factors)) != len(cfg.factors):
        raise BenchError(f"factors must be distinct integers >= 2 (the LR copies), got {cfg.factors}.")
    if not cfg.factors and not cfg.oracle:
        raise BenchError("nothing to train: give at least one factor or keep oracle on.")
    if len(cfg.ours_downscales) != len(cfg.ours_stage_fractions):
        raise BenchError(
            f"ours_downscales {cfg.ours_downscales} and ours_stage_fractions {cfg.ours_stage_fractions} need one "
            "entry per stage each."
        )
    if cfg.ours_downscales and cfg.ours_downscales[-1] != 1:
        raise BenchError(
            f"ours_downscales {cfg.ours_downscales} must end at 1, so the finest stage trains at the LR copy's "
            "resolution like the baselines."
        )
    if any(f <= 0 for f in cfg.ours_stage_fractions):
        raise BenchError(f"ours_stage_fractions must be positive, got {cfg.ours_stage_fractions}.")
    if any(k not in (1, 2, 3, 4) for k in cfg.refine_steps):
        raise BenchError(f"refine_steps must be within 1..4, got {cfg.refine_steps}.")
    if len(set(cfg.refine_decoders)) != len(cfg.refine_decoders):
        raise BenchError(f"refine_decoders must not repeat a decoder, got {cfg.refine_decoders}.")
    if not 0 < cfg.refine_fraction <= 1:
        raise BenchError(f"refine_fraction must be in (0, 1], got {cfg.refine_fraction}.")
    if cfg.max_test_views is not None and cfg.max_test_views < 1:
        raise BenchError(f"max_test_views must be >= 1, got {cfg.max_test_views}.")


# ------------------------------------------------------------------------------------------------- planning
def use_stock_splatfacto(cfg: BenchConfig) -> bool:
    """Whether the baselines are stock ``ns-train splatfacto`` (CUDA) or the CPU-renderer stand-in."""
    if cfg.baseline_impl == "auto":
        return torch.cuda.is_available()
    return cfg.baseline_impl == "splatfacto"


def stage_steps(total: int, fractions: Sequence[float]) -> Tuple[int, ...]:
    """Split ``total`` steps over stages in proportion to ``fractions`` (each >= 1; the last takes the rest)."""
    if total < len(fractions):
        raise BenchError(f"steps={total} is too few for {len(fractions)} stages; give at least one step a stage.")
    weights = np.asarray(fractions, np.float64) / float(np.sum(fractions))
    steps = [max(1, int(round(total * w))) for w in weights[:-1]]
    while sum(steps) > total - 1:
        steps[int(np.argmax(steps))] -= 1
    return (*steps, total - sum(steps))


def _baseline_spec(cfg: BenchConfig, mode: str, factor: int, data: Path, name: str) -> RunSpec:
    args: Tuple[str, ...] = ("--pipeline.model.rasterize-mode", mode)
    if use_stock_splatfacto(cfg):
        return RunSpec(name, "splatfacto", factor, data, args + tuple(shlex.split(cfg.baseline_args)))
    args += (
        "--pipeline.model.stage-downscales", "1",
        "--pipeline.model.stage-steps", str(cfg.steps),
        "--pipeline.model.refine-after-training", "False",
    )
    return RunSpec(name, "gaussianvae", factor, data, args + tuple(shlex.split(cfg.baseline_args)))


def baseline_label(cfg: BenchConfig, mode: str) -> str:
    """Table label of a baseline row."""
    if use_stock_splatfacto(cfg):
        return f"splatfacto {mode}"
    return f"splatfacto {mode} " + ("(gaussianvae, one stage)" if torch.cuda.is_available() else "(CPU renderer)")


def plan(cfg: BenchConfig, data: Path, lowres: Dict[int, Path]) -> Tuple[List[RunSpec], List[RowSpec]]:
    """The runs to train and the rows to evaluate, in table order (per factor, then the oracle)."""
    runs: List[RunSpec] = []
    rows: List[RowSpec] = []
    for factor in cfg.factors:
        for mode in cfg.baselines:
            name = f"splatfacto-{mode}-x{factor}"
            runs.append(_baseline_spec(cfg, mode, factor, lowres[factor], name))
            rows.append(RowSpec(name, baseline_label(cfg, mode), "baseline", factor, name))
        if cfg.ours:
            name = f"ours-x{factor}"
            args = (
                "--pipeline.model.stage-downscales", *map(str, cfg.ours_downscales),
                "--pipeline.model.stage-steps", *map(str, stage_steps(cfg.steps, cfg.ours_stage_fractions)),
                "--pipeline.model.refine-after-training", "False",
                *shlex.split(cfg.ours_args),
            )
            runs.append(RunSpec(name, "gaussianvae", factor, lowres[factor], args))
            stages = "/".join(str(d) for d in cfg.ours_downscales)
            rows.append(RowSpec(name, f"gaussianvae stages 1/{stages}, no refinement", "ours", factor, name))
            for decoder in cfg.refine_decoders:
                suffix, tag = _DECODER_TAG[decoder]
                for k in cfg.refine_steps:
                    for select in cfg.refine_selects:
                        label = f"{_SELECT_LABEL[select]}{tag} +{k}"
                        rows.append(RowSpec(f"ours-{select}-p{k}{suffix}-x{factor}", label, "ours", factor, name,
                                            refine_steps=k, refine_select=select, refine_decoder=decoder))
    if cfg.oracle:
        name = "oracle"
        runs.append(_baseline_spec(cfg, "classic", 1, data, name))
        rows.append(RowSpec(name, f"oracle: {baseline_label(cfg, 'classic')}, full resolution", "oracle", 1, name))
    return runs, rows


# ----------------------------------------------------------------------------------------------- data prep
def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def prepare_data(cfg: BenchConfig, log=print) -> Tuple[Path, Dict[int, Path]]:
    """The full-resolution dataset (``--data`` or the built-in scene) and its LR training copies."""
    out = cfg.output.resolve()
    if cfg.data is None:
        from gvae_ns.synthetic import write_scene

        data = out / "data" / "scene"
        marker = data / ".bench-scene.json"
        spec = dataclasses.asdict(cfg.scene)
        if _read_json(marker) != spec:
            log(f"rendering the built-in scene at {cfg.scene.resolution}px into {data}")
            if data.exists():
                shutil.rmtree(data)
            s = cfg.scene
            write_scene(data, s.resolution, s.n_train, s.n_test, s.seed, s.supersample, s.n_val, s.n_points)
            write_json(marker, spec)
    else:
        data = cfg.data.resolve()
    try:
        sizes = check_blender_dir(data)
    except ValueError as err:
        raise BenchError(f"--data: {err}") from None
    if sizes["test"] != sizes["train"]:
        log(f"note: test views are {sizes['test'][1]}x{sizes['test'][0]}, training views "
            f"{sizes['train'][1]}x{sizes['train'][0]}; every model is scored at the test views' size.")
    lowres: Dict[int, Path] = {}
    for factor in cfg.factors:
        dst = out / "data" / f"x{factor}"
        marker = dst / ".bench-lowres.json"
        spec = {"source": str(data), "factor": factor}
        if _read_json(marker) != spec:
            log(f"making the x{factor} training copy of {data} in {dst}")
            if dst.exists():
                shutil.rmtree(dst)
            try:
                downscale_blender(data, dst, factor, splits=("train",))
            except ValueError as err:
                raise BenchError(f"factors: {err}") from None
            write_json(marker, spec)
        lowres[factor] = dst
    return data, lowres


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
        "--max-num-iterations", str(cfg.steps),
        "--steps-per-save", str(cfg.steps),
        "--steps-per-eval-batch", "0",
        "--steps-per-eval-image", "0",
        "--steps-per-eval-all-images", "0",
        "--pipeline.model.background-color", cfg.background,
        *spec.args,
        *shlex.split(cfg.train_args),
        "blender-data", "--data", str(spec.data),
    ]


def _run_fingerprint(cfg: BenchConfig, spec: RunSpec) -> str:
    return _fingerprint({"cmd": train_command(cfg, spec)[1:]})


def _checkpoint(directory: Path) -> Optional[Path]:
    ckpts = sorted((directory / "nerfstudio_models").glob("step-*.ckpt"))
    return ckpts[-1] if ckpts else None


def trained(cfg: BenchConfig, spec: RunSpec) -> Optional[dict]:
    """The run's ``train.json`` record when it finished with the current settings, else None."""
    record = _read_json(cfg.output.resolve() / "runs" / spec.name / "train.json")
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
                      train_s=round(train_s, 2), steps=cfg.steps, finished_at=time.time())
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
    env = dict(os.environ)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))
    logs = cfg.output.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: List[Tuple[RunSpec, subprocess.Popen, float, Path, Any]] = []
    try:
        while pending or running:
            while pending and len(running) < cfg.jobs and budget.allows(cfg.train_estimate_s):
                spec = pending.pop(0)
                shutil.rmtree(cfg.output.resolve() / "runs" / spec.name, ignore_errors=True)
                (cfg.output.resolve() / "runs" / spec.name).mkdir(parents=True)
                log_path = logs / f"train-{spec.name}.log"
                handle = open(log_path, "w", encoding="utf-8")
                log(f"[train] {spec.name}: {spec.method} on {spec.data.name} for {cfg.steps} steps (log: {log_path})")
                proc = subprocess.Popen(train_command(cfg, spec), stdout=handle, stderr=subprocess.STDOUT, env=env,
                                        cwd=str(cfg.output.resolve()))
                running.append((spec, proc, time.monotonic(), log_path, handle))
            if not running:
                break  # the budget stopped the rest
            time.sleep(0.5)
            for item in list(running):
                spec, proc, started, log_path, handle = item
                if proc.poll() is None:
                    continue
                handle.close()
                running.remove(item)
                record = _finish_training(cfg, spec, proc.returncode, time.monotonic() - started, log_path)
                records[spec.name] = record
                status = f"{record['train_s']:.1f} s" if record["status"] == "ok" else "FAILED"
                log(f"[train] {spec.name}: {status}")
    finally:
        for spec, proc, _, _, handle in running:
            proc.terminate()
            proc.wait()
            handle.close()
    return records


# ---------------------------------------------------------------------------------------------- refinement
def refinement_path(output: Path, row: RowSpec) -> Path:
    """Where the benchmark keeps ``row``'s refinement file."""
    return output.resolve() / "refinements" / f"{row.name}.pt"


def _refine_fingerprint(cfg: BenchConfig, row: RowSpec, run_record: dict) -> str:
    spec = {"run": [run_record.get("fingerprint"), run_record.get("finished_at")], "steps": row.refine_steps,
            "select": row.refine_select, "fraction": cfg.refine_fraction, "args": shlex.split(cfg.refine_args)}
    if row.refine_decoder not in (None, "temporal"):  # temporal refinements made before the field stay valid
        spec["decoder"] = row.refine_decoder
    return _fingerprint(spec)


def refined(cfg: BenchConfig, row: RowSpec, run_record: dict) -> Optional[dict]:
    """The refinement record of ``row`` when it is done with the current settings, else None."""
    path = refinement_path(cfg.output, row)
    record = _read_json(path.with_suffix(".json"))
    if record and record.get("fingerprint") == _refine_fingerprint(cfg, row, run_record) and path.is_file():
        return record
    return None


def refine_config(cfg: BenchConfig, row: RowSpec, config_path: Path):
    """The ``gvae_ns.refine.RefineConfig`` that refines ``row`` of the run at ``config_path`` (its config.yml)."""
    from gvae_ns.refine import RefineConfig

    decoder = row.refine_decoder or "temporal"
    refine_cfg = RefineConfig(load_config=config_path, steps=row.refine_steps, select=row.refine_select,
                              fraction=cfg.refine_fraction, output=refinement_path(cfg.output, row), decoder=decoder)
    if cfg.refine_args:
        import tyro

        try:
            refine_cfg = tyro.cli(RefineConfig, default=refine_cfg, args=shlex.split(cfg.refine_args))
        except SystemExit:
            raise BenchError(f"refine_args {cfg.refine_args!r} are not valid gvae-refine flags (see gvae-refine "
                             "--help).") from None
    if refine_cfg.decoder != decoder:
        raise BenchError(f"refine_args {cfg.refine_args!r} set --decoder; list decoders in refine_decoders instead.")
    return refine_cfg


def refine_row(cfg: BenchConfig, row: RowSpec, run_record: dict) -> dict:
    """Refine the run of ``row`` (in this process, timed) and return the refinement record."""
    try:
        from gvae_ns.refine import VAE_FILE, refine_run
        from gvae_ns.vae.densify_train import DENSIFY_HEAD_FILE
    except ImportError as err:
        raise BenchError(f"gvae_ns.refine has no refine_run / RefineConfig yet ({err}); refinement rows need it.")
    out = refinement_path(cfg.output, row)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path = Path(run_record["config"])
    refine_cfg = refine_config(cfg, row, config_path)
    vae_file = config_path.parent / (DENSIFY_HEAD_FILE if refine_cfg.decoder == "generative" else VAE_FILE)
    vae_marker = config_path.parent / f".bench-{vae_file.stem}.json"
    vae_spec = {"refine_args": shlex.split(cfg.refine_args)}
    if vae_file.is_file() and _read_json(vae_marker) != vae_spec:
        vae_file.unlink()  # made with other VAE settings (refine_args): train it again
    vae_before = vae_file.is_file()
    _sync()
    start = time.perf_counter()
    refine_run(refine_cfg, pipeline=None)
    _sync()
    refine_s = time.perf_counter() - start
    if not out.is_file():
        raise BenchError(f"refine_run finished but wrote no refinement file at {out}.")
    write_json(vae_marker, vae_spec)
    record = {"fingerprint": _refine_fingerprint(cfg, row, run_record), "refine_s": round(refine_s, 2),
              "includes_vae_training": not vae_before, "file": str(out), "made_at": time.time()}
    write_json(out.with_suffix(".json"), record)
    return record


# ---------------------------------------------------------------------------------------------- evaluation
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _legacy_checkpoints() -> Iterator[None]:
    """Let torch.load read the stock splatfacto checkpoints this benchmark trained (numpy scalars inside)."""
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def load_pipeline(config_path: Path | str):
    """Load a trained run for evaluation on its test split (nerfstudio's ``eval_setup``)."""
    from nerfstudio.utils.eval_utils import eval_setup

    config_path = Path(config_path)
    if not config_path.is_file():
        raise BenchError(f"{config_path} does not exist: point at the config.yml of a finished ns-train run.")
    # gaussianvae checkpoints load as they are; stock splatfacto's (numpy scalars inside) need the legacy loader
    ours = "method_name: gaussianvae" in config_path.read_text()
    with (contextlib.nullcontext() if ours else _legacy_checkpoints()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _, pipeline, _, _ = eval_setup(config_path, test_mode="test")
    pipeline.eval()
    return pipeline


def attach_refinement(model: torch.nn.Module, refinement: Optional[Path]) -> Dict[str, Any]:
    """Attach the refinement file (or detach any, with None) to a gaussianvae model; returns its counts."""
    if not hasattr(model, "set_refinement"):
        if refinement is not None:
            raise BenchError(f"{type(model).__name__} cannot take a refinement; only gaussianvae runs can.")
        return {}
    if refinement is None:
        model.set_refinement(None, note="benchmark: the run as trained")
        return {}
    from gvae_ns.refine import load_refinement

    refined_set = load_refinement(refinement, num_original=model.gauss_params["means"].shape[0])
    model.set_refinement(refined_set.params, refined_set.is_new, note=refined_set.describe())
    if not model.refinement_active:
        raise BenchError(f"{refinement}: attached but not active (show_refined off or GVAE_REFINED=0?).")
    counts = {"num_original": refined_set.num_original, "num_added": refined_set.num_added,
              "num_refined": int(len(refined_set.selected))}
    removed = getattr(refined_set, "removed", None)
    if removed is not None:
        counts["num_removed"] = int(len(removed))
    return counts


def _test_dataset(pipeline):
    dm = pipeline.datamanager
    dataset = getattr(dm, "test_dataset", None)
    return dataset if dataset is not None else dm.eval_dataset


def _gt_on_background(dataset, index: int, background: torch.Tensor) -> torch.Tensor:
    image = torch.from_numpy(dataset.get_numpy_image(index).astype(np.float32) / 255.0)
    if image.shape[-1] == 4:
        alpha = image[..., 3:]
        image = image[..., :3] * alpha + background.to(image) * (1.0 - alpha)
    return image


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def save_png(path: Path, image: torch.Tensor | np.ndarray) -> None:
    """Write an ``[H, W, 3]`` float image in [0, 1] (or uint8) as PNG, atomically."""
    from PIL import Image

    pixels = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 else _to_uint8(torch.as_tensor(image))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept and len(kept) == len(values) else None


def evaluate_pipeline(
    pipeline,
    points_gt: Optional[np.ndarray] = None,
    max_views: Optional[int] = None,
    chamfer_opacity: float = 0.5,
    save_view: Optional[int] = None,
    save_to: Optional[Path] = None,
    gt_to: Optional[Path] = None,
    lpips: bool = True,
    brisque: bool = True,
) -> Dict[str, Any]:
    """Render the pipeline's test cameras at their full resolution and score them against the test images.

    Returns means over the views (``psnr``, ``ssim``, ``lpips``, ``brisque``: None where unavailable), the
    per-view lists, ``ms_per_view`` (render only, after one untimed warm-up), ``num_gaussians`` (the refined
    set when one is attached), ``chamfer_opaque`` / ``chamfer_all`` (to ``points_gt``; None without it), and
    the resolution. ``save_view`` is written to ``save_to`` (and its ground truth to ``gt_to``) as PNG.
    """
    from gvae_ns import metrics

    model = pipeline.model
    model.eval()
    dataset = _test_dataset(pipeline)
    cameras = dataset.cameras
    n = len(dataset) if max_views is None else min(len(dataset), max_views)
    if n == 0:
        raise BenchError("the test split has no views to evaluate.")
    per_view: Dict[str, List[Optional[float]]] = {k: [] for k in ("psnr", "ssim", "lpips", "brisque")}
    times: List[float] = []
    size: Tuple[int, int] = (0, 0)
    with torch.no_grad():
        model.get_outputs_for_camera(cameras[0:1].to(model.device))  # warm-up (kernels, caches)
        for i in range(n):
            camera = cameras[i : i + 1].to(model.device)
            _sync()
            start = time.perf_counter()
            out = model.get_outputs_for_camera(camera)
            _sync()
            times.append(time.perf_counter() - start)
            rgb = out["rgb"].float().clamp(0, 1).cpu()
            background = out.get("background")
            background = torch.ones(3) if background is None else background.float().cpu()
            gt = _gt_on_background(dataset, i, background)
            if gt.shape != rgb.shape:
                raise BenchError(f"test view {i}: rendered {tuple(rgb.shape)} but the image is {tuple(gt.shape)}.")
            size = (int(gt.shape[0]), int(gt.shape[1]))
            per_view["psnr"].append(float(metrics.psnr(rgb, gt)))
            per_view["ssim"].append(float(metrics.ssim(rgb, gt)))
            score = metrics.lpips_or_none(rgb, gt) if lpips else None
            per_view["lpips"].append(None if score is None else float(score))
            per_view["brisque"].append(_brisque(rgb) if brisque else None)
            if save_view == i and save_to is not None:
                save_png(save_to, rgb)
                if gt_to is not None:
                    save_png(gt_to, gt)
        means = model.means.detach()
        opacity = torch.sigmoid(model.opacities.detach()).reshape(-1)
    result: Dict[str, Any] = {k: _mean(v) for k, v in per_view.items()}
    result["per_view"] = per_view
    result["views"] = n
    result["height"], result["width"] = size
    result["ms_per_view"] = 1000.0 * float(np.mean(times))
    result["num_gaussians"] = int(means.shape[0])
    result["chamfer_opaque"] = result["chamfer_all"] = None
    result["num_opaque"] = int((opacity > chamfer_opacity).sum())
    if points_gt is not None:
        points = torch.as_tensor(np.asarray(points_gt, np.float32))
        centres = means.float().cpu()
        opaque = centres[(opacity > chamfer_opacity).cpu()]
        result["chamfer_all"] = metrics.chamfer_distance(centres, points) if len(centres) else None
        result["chamfer_opaque"] = metrics.chamfer_distance(opaque, points) if len(opaque) else None
    return result


def _brisque(image: torch.Tensor) -> Optional[float]:
    from gvae_ns import metrics

    try:
        return metrics.brisque_or_none(image)
    except Exception as err:  # the optional package fails on some images (e.g. tiny or flat ones)
        warnings.warn(f"BRISQUE failed on a test view ({type(err).__name__}: {err}); left out.", RuntimeWarning)
        return None


def evaluate_run(
    config_path: Path | str,
    refinement: Optional[Path] = None,
    points_gt: Optional[np.ndarray] = None,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Load a trained run, attach ``refinement`` (gaussianvae only; None = the run as trained) and score it with
    :func:`evaluate_pipeline` (``kwargs`` go there)."""
    pipeline = load_pipeline(config_path)
    try:
        counts = attach_refinement(pipeline.model, refinement)
        result = evaluate_pipeline(pipeline, points_gt=points_gt, **kwargs)
        result.update(counts)
        return result
    finally:
        del pipeline
        _free()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ reporting
def _slug_path(output: Path, row_name: str) -> Path:
    path = output.resolve() / "rows" / f"{row_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def render_path(output: Path, row_name: str) -> Path:
    """PNG of ``row_name``'s render of the figure view."""
    return output.resolve() / "renders" / f"{row_name}.png"


def _fmt(value: Optional[float], digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _scale(factor: int) -> str:
    return "full" if factor == 1 else f"x{factor}"


_COLUMNS = (
    ("PSNR ↑", "psnr", 2), ("SSIM ↑", "ssim", 4), ("LPIPS ↓", "lpips", 4), ("BRISQUE ↓", "brisque", 1),
    ("CD opaque ↓", "chamfer_opaque", 5), ("CD all ↓", "chamfer_all", 5), ("Gaussians", "num_gaussians", 0),
    ("train s", "train_s", 1), ("refine s", "refine_s", 1), ("ms/view", "ms_per_view", 1),
)
_BEST = {"psnr": max, "ssim": max, "lpips": min}


def format_table(results: Dict[str, Any]) -> str:
    """The markdown report of a results dict (``results.json``): a header, one table row per model (best PSNR /
    SSIM / LPIPS of each scale in bold, the oracle aside), then notes and the rows that have no result."""
    rows: List[dict] = results.get("rows", [])
    env = results.get("environment", {})
    data = results.get("dataset", {})
    suite = results.get("suite", {})
    lines = [f"# {suite.get('name', 'gvae-bench')}", ""]
    if data:
        lines.append(f"Dataset `{data.get('path')}`: {data.get('test_views')} test view(s) scored at "
                     f"{data.get('width')}x{data.get('height')} px; training copies {data.get('factors')}.")
    if suite:
        lines.append(f"Every row trained for {suite.get('steps')} steps ({suite.get('jobs')} training(s) at once) "
                     f"on {env.get('device', 'unknown device')}.")
    lines.append("")
    lines.append("| scale | method | " + " | ".join(c[0] for c in _COLUMNS) + " |")
    lines.append("|---|---|" + "---:|" * len(_COLUMNS))
    ok = [r for r in rows if r.get("status") == "ok"]
    best: Dict[Tuple[int, str], float] = {}
    for factor in {r["factor"] for r in ok if r["factor"] != 1}:
        for key, pick in _BEST.items():
            vals = [r["metrics"].get(key) for r in ok if r["factor"] == factor]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            if vals:
                best[(factor, key)] = pick(vals)
    for r in ok:
        cells = []
        for _, key, digits in _COLUMNS:
            value = r.get(key) if key in ("train_s", "refine_s") else r["metrics"].get(key)
            text = _fmt(value, digits)
            if key == "refine_s" and value is not None and r.get("refine_includes_vae"):
                text += "*"
            if value is not None and best.get((r["factor"], key)) == value:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {_scale(r['factor'])} | {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Notes:"]
    lines.append("- PSNR / SSIM / LPIPS against the test images at full resolution (alpha put on the "
                 f"{suite.get('background', 'white')} background); bold: best of the scale (oracle excluded).")
    lines.append(f"- CD: Chamfer distance (mean squared nearest-neighbour distance, both ways) between Gaussian "
                 f"centres and the dataset's points_gt.npy; 'opaque' keeps opacity > {suite.get('chamfer_opacity')}.")
    lines.append("- train s: from config.yml to the last checkpoint (trainer set-up + steps; process start-up "
                 "excluded); trainings that ran at once shared the device. ms/view: render only, after a warm-up.")
    lines.append("- refine s: refine_run wall time (loads the run, then extrapolates); * includes training the "
                 "decoder (the lineage VAE; for GD head rows the densification head).")
    if env.get("baselines"):
        lines.append(f"- Baselines: {env['baselines']}")
    if any(r["metrics"].get("lpips") is None for r in ok):
        lines.append("- LPIPS n/a: AlexNet weights not on disk (never downloaded).")
    if any(r["metrics"].get("brisque") is None for r in ok):
        lines.append("- BRISQUE n/a: the optional brisque package is not installed (or failed).")
    missing = [r for r in rows if r.get("status") != "ok"]
    if missing:
        lines += ["", "Rows without a result:"]
        for r in missing:
            reason = str(r.get("error") or r.get("status", "pending")).strip().splitlines()
            lines.append(f"- {_scale(r['factor'])} {r['label']} ({r.get('status', 'pending')}): "
                         f"{reason[0] if reason else ''}")
    return "\n".join(lines) + "\n"


def pick_crop(reference: np.ndarray, crop: int) -> Tuple[int, int]:
    """Top-left ``(y, x)`` of the ``crop x crop`` window with the most image detail (gradient energy)."""
    img = np.asarray(reference, np.float64)
    if img.ndim == 3:
        img = img.mean(-1)
    h, w = img.shape
    crop = min(crop, h, w)
    energy = np.zeros_like(img)
    energy[:, 1:] += np.abs(np.diff(img, axis=1))
    energy[1:, :] += np.abs(np.diff(img, axis=0))
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[crop:, crop:] - integral[:-crop, crop:] - integral[crop:, :-crop] + integral[:-crop, :-crop]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x)


def figure_size(rows: int, cols: int, tile: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of a crop figure with ``rows x cols`` tiles of ``tile`` pixels."""
    return cols * tile + (cols + 1) * TILE_PAD, rows * (tile + TILE_CAPTION) + (rows + 1) * TILE_PAD


def crop_figure(
    grid: Sequence[Sequence[Tuple[str, Optional[Path]]]],
    reference: Path,
    output: Path,
    crop_px: Optional[int] = None,
    tile_px: int = 192,
) -> Path:
    """Draw the same crop of every image side by side: ``grid[r][c] = (caption, png or None)``.

    The crop is the most detailed ``crop_px`` square of ``reference`` (default a quarter of its shorter side,
    at least 16 px), enlarged by the integer factor that brings it closest to ``tile_px`` without exceeding it
    (at least 1). A missing image is a grey tile. The figure is :func:`figure_size` pixels; written atomically."""
    from PIL import Image, ImageDraw

    ref = np.asarray(Image.open(reference).convert("RGB"))
    h, w = ref.shape[:2]
    crop = min(h, w, crop_px if crop_px else max(16, min(h, w) // 4))
    y, x = pick_crop(ref, crop)
    zoom = max(1, tile_px // crop)
    tile = crop * zoom
    cols = max(len(r) for r in grid)
    width, height = figure_size(len(grid), cols, tile)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    max_chars = max(4, tile // 6)
    for r, line in enumerate(grid):
        top = TILE_PAD + r * (tile + TILE_CAPTION + TILE_PAD)
        for c, (caption, path) in enumerate(line):
            left = TILE_PAD + c * (tile + TILE_PAD)
            draw.text((left, top + 2), caption[:max_chars], fill=(0, 0, 0))
            patch = None
            if path is not None and Path(path).is_file():
                image = Image.open(path).convert("RGB")
                if image.size == (w, h):
                    patch = image.crop((x, y, x + crop, y + crop)).resize((tile, tile), Image.NEAREST)
            if patch is None:
                patch = Image.new("RGB", (tile, tile), BLIND_SPOT)
            canvas.paste(patch, (left, top + TILE_CAPTION))
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda tmp: canvas.save(tmp, format="PNG"))
    return output


def figure_grid(output: Path, rows: Sequence[dict]) -> List[List[Tuple[str, Optional[Path]]]]:
    """One figure row per LR factor: LR baseline (antialiased preferred), best-PSNR ours, oracle, ground truth."""
    ok = {r["name"]: r for r in rows if r.get("status") == "ok"}
    oracle = next((r for r in rows if r["kind"] == "oracle"), None)
    gt = output.resolve() / "renders" / "gt.png"
    grid = []
    for factor in sorted({r["factor"] for r in rows if r["factor"] != 1}):
        same = [r for r in rows if r["factor"] == factor]
        bases = sorted((r for r in same if r["kind"] == "baseline"), key=lambda r: "antialiased" not in r["name"])
        base = next((r for r in bases if r["name"] in ok), bases[0] if bases else None)
        ours = [r for r in same if r["kind"] == "ours"]
        scored = [r for r in ours if r["name"] in ok]
        best = max(scored, key=lambda r: (r.get("refine_steps") is not None, r["metrics"]["psnr"] or -1.0),
                   default=ours[0] if ours else None)
        line = []
        for role, row in (("LR", base), ("ours", best), ("oracle", oracle)):
            if row is None:
                line.append((f"{role}: none", None))
            else:
                path = render_path(output, row["name"]) if row["name"] in ok else None
                label = row["label"].rsplit(" (", 1)[0] if row["label"].endswith(")") else row["label"]
                line.append((f"x{factor} {label}" if role != "oracle" else "oracle (full res)", path))
        line.append(("ground truth", gt))
        grid.append(line)
    if not grid and oracle is not None:
        ok_oracle = oracle["name"] in ok
        grid.append([("oracle (full res)", render_path(output, oracle["name"]) if ok_oracle else None),
                     ("ground truth", gt)])
    return grid


def environment(cfg: BenchConfig) -> Dict[str, Any]:
    """Device and software versions, and what the baselines are."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    if torch.cuda.is_available():
        device = f"CUDA: {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({os.cpu_count()} cores, pure-PyTorch renderer)"
    stock = use_stock_splatfacto(cfg)
    return {
        "device": device,
        "torch": torch.__version__,
        "nerfstudio": installed("nerfstudio"),
        "gsplat": installed("gsplat"),
        "baselines": "stock ns-train splatfacto (gsplat)" if stock else (
            "splatfacto (CPU renderer): gaussianvae with one stage at the training resolution and no refinement, "
            "i.e. splatfacto's densification and losses rendered by the pure-PyTorch rasterizer"),
    }


def write_reports(cfg: BenchConfig, results: Dict[str, Any]) -> None:
    """Write results.json, results.md and crops.png into the output directory."""
    out = cfg.output.resolve()
    write_json(out / "results.json", results)
    text = format_table(results)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    gt = out / "renders" / "gt.png"
    if gt.is_file():
        crop_figure(figure_grid(out, results["rows"]), gt, out / "crops.png", cfg.crop_px, cfg.tile_px)


# ------------------------------------------------------------------------------------------------- the loop
def _row_fingerprint(cfg: BenchConfig, row: RowSpec, run_record: dict, refine_record: Optional[dict]) -> str:
    """What a row's result depends on: the run (and when it finished), the refinement (and when it was made)
    and the evaluation settings; a run or refinement made again invalidates the row."""
    return _fingerprint({"run": [run_record.get("fingerprint"), run_record.get("finished_at")],
                         "refine": [row.refine_steps, row.refine_select],
                         "refine_fp": [refine_record.get("fingerprint"), refine_record.get("made_at")]
                         if refine_record else None,
                         "eval": [cfg.max_test_views, cfg.chamfer_opacity, cfg.figure_view, cfg.lpips, cfg.brisque]})


def _row_entry(row: RowSpec, status: str, **extra: Any) -> Dict[str, Any]:
    entry = {"name": row.name, "label": row.label, "kind": row.kind, "factor": row.factor, "run": row.run,
             "refine_steps": row.refine_steps, "refine_select": row.refine_select,
             "refine_decoder": row.refine_decoder, "status": status, "metrics": {}}
    entry.update(extra)
    return entry


def run_bench(cfg: BenchConfig, log=print) -> Dict[str, Any]:
    """Run (or resume) the whole benchmark and write its reports; returns the results dict."""
    check_config(cfg)
    out = cfg.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(cfg.time_budget_s)
    data, lowres = prepare_data(cfg, log)
    runs, rows = plan(cfg, data, lowres)
    points_file = data / "points_gt.npy"
    points = np.load(points_file) if points_file.is_file() else None

    train_records = train_all(cfg, runs, budget, log)
    refine_records: Dict[str, dict] = {}
    refine_errors: Dict[str, str] = {}
    for row in rows:
        run_record = train_records.get(row.run)
        if row.refine_steps is None or not run_record or run_record.get("status") != "ok":
            continue
        done = refined(cfg, row, run_record)
        if done is not None:
            refine_records[row.name] = done
            continue
        if not budget.allows(cfg.refine_estimate_s):
            continue
        log(f"[refine] {row.name}: +{row.refine_steps} ({row.refine_select})")
        try:
            refine_records[row.name] = refine_row(cfg, row, run_record)
            log(f"[refine] {row.name}: {refine_records[row.name]['refine_s']:.1f} s")
        except Exception as err:  # one failed refinement must not stop the other rows
            refine_errors[row.name] = f"refinement failed: {type(err).__name__}: {err}"
            log(f"[refine] {row.name}: FAILED ({refine_errors[row.name]})")
        _free()

    entries: Dict[str, Dict[str, Any]] = {}
    to_eval: Dict[str, List[RowSpec]] = {}
    for row in rows:
        run_record = train_records.get(row.run)
        if run_record is None:
            entries[row.name] = _row_entry(row, "pending", error="not trained yet (time budget)")
            continue
        if run_record.get("status") != "ok":
            entries[row.name] = _row_entry(row, "failed", error=f"training failed: {run_record.get('error')}")
            continue
        if row.name in refine_errors:
            entries[row.name] = _row_entry(row, "failed", error=refine_errors[row.name])
            continue
        if row.refine_steps is not None and row.name not in refine_records:
            entries[row.name] = _row_entry(row, "pending", error="not refined yet (time budget)")
            continue
        saved = _read_json(_slug_path(out, row.name))
        row_fp = _row_fingerprint(cfg, row, run_record, refine_records.get(row.name))
        if saved and saved.get("status") == "ok" and saved.get("fingerprint") == row_fp:
            log(f"[skip] {row.name}: evaluated already")
            entries[row.name] = saved
            continue
        to_eval.setdefault(row.run, []).append(row)

    for run_name, group in to_eval.items():
        if not budget.allows(cfg.eval_estimate_s):
            for row in group:
                entries[row.name] = _row_entry(row, "pending", error="not evaluated yet (time budget)")
            continue
        run_record = train_records[run_name]
        try:
            pipeline = load_pipeline(Path(run_record["config"]))
        except Exception as err:
            for row in group:
                entries[row.name] = _row_entry(row, "failed", error=f"loading the run failed: {err}")
            continue
        for row in group:
            log(f"[eval] {row.name}")
            refine_record = refine_records.get(row.name)
            try:
                counts = attach_refinement(pipeline.model,
                                           refinement_path(out, row) if row.refine_steps is not None else None)
                metrics = evaluate_pipeline(
                    pipeline, points_gt=points, max_views=cfg.max_test_views, chamfer_opacity=cfg.chamfer_opacity,
                    save_view=cfg.figure_view, save_to=render_path(out, row.name),
                    gt_to=out / "renders" / "gt.png", lpips=cfg.lpips, brisque=cfg.brisque,
                )
                metrics.update(counts)
            except Exception as err:  # keep going: the table lists the failure
                entries[row.name] = _row_entry(row, "failed", error=f"evaluation failed: {type(err).__name__}: {err}")
                log(f"[eval] {row.name}: FAILED ({err})")
                continue
            entry = _row_entry(
                row, "ok", metrics=metrics, fingerprint=_row_fingerprint(cfg, row, run_record, refine_record),
                train_s=run_record["train_s"], train_wall_s=run_record["wall_s"],
                refine_s=refine_record["refine_s"] if refine_record else None,
                refine_includes_vae=bool(refine_record and refine_record.get("includes_vae_training")),
                config=run_record["config"],
            )
            write_json(_slug_path(out, row.name), entry)
            entries[row.name] = entry
            log(f"[eval] {row.name}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                f"{metrics['num_gaussians']} Gaussians, {metrics['ms_per_view']:.1f} ms/view")
        del pipeline
        _free()

    first = next((e for e in entries.values() if e.get("status") == "ok"), None)
    results = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "suite": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "environment": environment(cfg),
        "dataset": {
            "path": str(data), "factors": [f"x{f}" for f in cfg.factors], "has_points": points is not None,
            "test_views": first["metrics"]["views"] if first else None,
            "height": first["metrics"]["height"] if first else None,
            "width": first["metrics"]["width"] if first else None,
        },
        "complete": all(e.get("status") == "ok" for e in entries.values()),
        "rows": [entries[row.name] for row in rows],
    }
    write_reports(cfg, results)
    return results


def parse_args(argv: Optional[Sequence[str]] = None) -> BenchConfig:
    """Command line -> config: ``--config FILE`` supplies the defaults, the other flags override them."""
    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    base = BenchConfig()
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            base = load_suite(args[i + 1])
        elif arg.startswith("--config="):
            base = load_suite(arg.split("=", 1)[1])
    return tyro.cli(BenchConfig, default=base, args=args, description=__doc__.split("\n\n")[0])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``gvae-bench``; returns the exit code (see :data:`EXIT_OK` and friends)."""
    try:
        cfg = parse_args(argv)
        results = run_bench(cfg)
    except BenchError as err:
        print(f"gvae-bench: {err}", file=sys.stderr)
        return 2
    out = cfg.output.resolve()
    print()
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"Wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'crops.png'}.")
    statuses = [r["status"] for r in results["rows"]]
    if "pending" in statuses:
        print("Not finished within --time-budget-s: run the same command again to resume.")
        return EXIT_RESUME
    return EXIT_FAILED if "failed" in statuses else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
