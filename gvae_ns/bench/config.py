"""gvae-bench suite files: the configuration dataclasses, the YAML loader and its checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple

import yaml

from gvae_ns.console import say
from gvae_ns.prior.shipped import PriorUnavailable, read_manifest

RESULTS_FORMAT = "gvae_ns.bench"
RESULTS_VERSION = 1
EXIT_OK, EXIT_FAILED, EXIT_RESUME = 0, 1, 75
"""Exit codes of ``gvae-bench``: all rows done; some rows failed; stopped by ``--time-budget-s`` (run again)."""


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
class CaptureConfig:
    """How --data is read when it is a capture (nerfstudio-data or COLMAP) rather than Blender-format data."""

    layout: Literal["auto", "blender", "nerfstudio", "colmap"] = "auto"
    """Layout of --data. 'auto': Blender when it has transforms_train.json, nerfstudio-data when it has
    transforms.json (or is a .json file), COLMAP when it has colmap/sparse/0 or sparse/0, in that order."""
    holdout_every: int = 8
    """nerfstudio-data / COLMAP: every N-th frame in file-name order, starting with the first, is held out and
    scored (LLFF's convention, nerfstudio's --eval-mode interval); the others train. Blender data keeps its own
    test split."""
    score_downscale: int = 1
    """nerfstudio-data / COLMAP: the held-out views are scored at the capture's resolution divided by this (the
    benchmark's "full" resolution; fox: 2, i.e. 540x960); the training copies are ``factors`` below that, so they
    are at 1 / (score_downscale x factor). It and each product must divide every image's width and height."""
    colmap_path: Optional[Path] = None
    """COLMAP: the reconstruction folder (cameras / images .bin or .txt) relative to --data; default
    colmap/sparse/0 (ns-process-data's layout), else sparse/0 (COLMAP's)."""
    images_path: Path = Path("images")
    """COLMAP: the image folder relative to --data."""


@dataclass
class BenchConfig:
    """Super-resolution benchmark: LR baselines vs gaussianvae (+ refinement) vs full-resolution oracle."""

    config: Optional[Path] = None
    """Suite file (.yaml / .json) whose keys replace these defaults; flags given on the command line override it."""
    name: str = "gvae-bench"
    """Title of the results table."""
    data: Optional[Path] = None
    """Dataset: Blender-format with full-resolution test views, or a capture in nerfstudio-data (transforms.json)
    or COLMAP layout (see ``capture``); leave unset to render the built-in scene."""
    scene: SceneConfig = field(default_factory=SceneConfig)
    """The built-in scene (only used without --data)."""
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    """Layout, held-out split and scoring resolution of a nerfstudio-data / COLMAP capture given as --data."""
    output: Path = Path("outputs/bench")
    """Output directory: data copies, runs, results.json, results.md, crops.png. Reused to resume."""
    factors: Tuple[int, ...] = (2,)
    """Downscale factors of the low-resolution training copies (each must divide the training image size)."""
    steps: int = 300
    """Training steps of the gaussianvae runs; the baselines and the oracle train this plus the refinement's
    fine-tune steps, so that every row has the same step budget."""
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
    ours_stage_fractions: Tuple[float, ...] = (0.1, 0.2, 0.7)
    """Share of --steps each stage gets (one per stage; the last stage takes the rounding remainder)."""
    extrapolate_stages: Tuple[int, ...] = (2,)
    """Extrapolation stages past the finest trained stage to evaluate (each of 1..4 gives a row per selection)."""
    refine_selects: Tuple[Literal["all", "hessian", "grad"], ...] = ("all", "hessian")
    """Selections to evaluate: 'all' is "Ours", 'hessian' is "Ours-nabla2"."""
    refine_decoders: Tuple[Literal["temporal", "generative", "prior", "prior-tuned", "split", "none"], ...] = ("temporal",)
    """Refinement decoders to evaluate, each with every selection and step count: 'temporal' is the lineage VAE
    (<run>/vae.pt), 'generative' the serialized-attention densification head (<run>/densify_head.pt), rows
    "Ours (GD head) +k"; 'prior' the cross-scene prior shipped in the package (zero-shot), rows "Ours (shipped
    prior) +k"; 'prior-tuned' that prior fine-tuned on the run's lineage (<run>/prior_tuned.pt); 'split' the no-learning control, 3DGS's split of the same selection, rows
    "control: 3DGS split of ... +k"; 'none' the fine-tune-only control (no proposals), rows "control: fine-tune
    only at +k" (one per k, whatever the selections)."""
    refine_fraction: float = 0.1
    """Fraction of Gaussians the hessian / grad selection keeps."""
    refine_args: str = ""
    """Extra gvae-refine flags parsed into its RefineConfig, e.g. --refine-args='--decoder-steps 300' (a list in
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
    score_at_train_resolution: bool = True
    """Also score every low-resolution row at its training copy's resolution (the test views rendered at 1/factor
    against the test images box-averaged down by the factor): what refinement must not trade away."""
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
    steps: int = 300
    """Training steps of the run (``--max-num-iterations``)."""
    dataparser: Literal["blender-data", "nerfstudio-data"] = "blender-data"
    """ns-train dataparser of ``data``: Blender-format data, or a capture's nerfstudio-data copy."""
    data_fingerprint: str = ""
    """Fingerprint of a capture copy's transforms.json (empty for Blender data), so a changed copy retrains."""


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
    extrapolate_stages: Optional[int] = None
    """Extrapolation stages, or None for the run as trained."""
    refine_select: Optional[str] = None
    """Selection mode of the refinement."""
    refine_decoder: Optional[str] = None
    """Decoder of the refinement: 'temporal' (lineage VAE), 'generative' (densification head), 'prior' (the
    shipped cross-scene prior), 'split' or 'none' (the controls)."""


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
            values = yaml.safe_load(text)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError: both name the line
        raise BenchError(f"suite file {path} cannot be parsed: {err}") from None
    if not isinstance(values, dict):
        raise BenchError(f"suite file {path} must hold a mapping of BenchConfig fields, got {type(values).__name__}.")
    values.pop("config", None)
    if "refine_steps" in values:  # the 0.1 name, kept for one release
        say(f"{path}: refine_steps is deprecated, use extrapolate_stages (the old name goes in the next release).",
            style="yellow")
        values.setdefault("extrapolate_stages", values.pop("refine_steps"))
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
    if any(k not in (1, 2, 3, 4) for k in cfg.extrapolate_stages):
        raise BenchError(f"extrapolate_stages must be within 1..4, got {cfg.extrapolate_stages}.")
    if len(set(cfg.refine_decoders)) != len(cfg.refine_decoders):
        raise BenchError(f"refine_decoders must not repeat a decoder, got {cfg.refine_decoders}.")
    if not 0 < cfg.refine_fraction <= 1:
        raise BenchError(f"refine_fraction must be in (0, 1], got {cfg.refine_fraction}.")
    if {"prior", "prior-tuned"} & set(cfg.refine_decoders):
        try:
            read_manifest()
        except PriorUnavailable as err:
            raise BenchError(f"refine_decoders has a shipped-prior row, but {err}") from None
    if cfg.capture.holdout_every < 2:
        raise BenchError(f"capture.holdout_every must be >= 2 (every N-th frame is held out), got "
                         f"{cfg.capture.holdout_every}.")
    if cfg.capture.score_downscale < 1:
        raise BenchError(f"capture.score_downscale must be >= 1, got {cfg.capture.score_downscale}.")
    if cfg.max_test_views is not None and cfg.max_test_views < 1:
        raise BenchError(f"max_test_views must be >= 1, got {cfg.max_test_views}.")


def fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

