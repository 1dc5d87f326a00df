"""The prior's training data: procedural scenes trained through the stages, each one's lineage turned into a shard.

For every scene seed: render ``gvae-synthetic --scene-seed N`` at ``resolution`` (the scene's own high
resolution), train ``ns-train gaussianvae`` on it through ``stage_downscales`` (by default 1/8, 1/4, 1/2, 1/1,
so the last transition is a true "low-resolution final stage -> twice the resolution" one, seen in the images),
and write the lineage's stage transitions (:func:`gvae_ns.lineage.dataset.build_transitions`, with the scene's
training cameras, so each parent's pixel scale comes along) as one shard (:func:`gvae_ns.prior.train.save_shard`).
The benchmark scenes (the built-in scene, lego, fox) never enter: only
:func:`gvae_ns.synthetic.variety.random_scene` scenes do.

Scenes render in parallel worker processes and the trainings run ``jobs`` at a time as ``ns-train``
subprocesses (each with ``OMP_NUM_THREADS = cores / jobs`` on a CPU). Everything is resumable: a scene, a run
or a shard that is complete (its marker holds the settings it was made with) is not made again.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

from gvae_ns.datasets import read_json, write_json
from gvae_ns.jobs import LoggedCommand, run_logged
from gvae_ns.lineage.dataset import build_transitions
from gvae_ns.lineage.format import load_lineage
from gvae_ns.prior.train import load_shard, save_shard
from gvae_ns.run_layout import RunLayout
from gvae_ns.synthetic import write_scene
from gvae_ns.vae.config import GaussianVAEConfig


@dataclass(frozen=True)
class CorpusConfig:
    """What the prior is trained on (the defaults fit a 2-core CPU: about 2-3 min of training per scene)."""

    scene_seeds: Tuple[int, ...] = tuple(range(1, 11))
    """Seeds of the procedural scenes (``gvae-synthetic --scene-seed``)."""
    resolution: int = 128
    """Each scene's image size in pixels: the finest stage trains at it."""
    stage_downscales: Tuple[int, ...] = (8, 4, 2, 1)
    """Training stages, as downscales of ``resolution`` (coarse to fine, ending at 1)."""
    stage_fractions: Tuple[float, ...] = (0.1, 0.15, 0.25, 0.5)
    """Share of ``steps`` each stage gets (the last takes the rounding remainder)."""
    steps: int = 1500
    """Training steps per scene."""
    n_train: int = 40
    """Training views per scene."""
    n_val: int = 4
    """Validation views per scene (ns-train's evaluation split)."""
    supersample: int = 2
    """Rays per pixel side when rendering a scene."""
    jobs: int = 2
    """Scenes rendered and trained at once."""
    train_args: str = ("--pipeline.model.num-random 5000 --pipeline.model.random-scale 3.0 "
                       "--pipeline.model.warmup-length 100 --pipeline.model.refine-every 50 "
                       "--pipeline.model.sh-degree-interval 250")
    """Extra ns-train flags of every scene's run, one string (short-run densification and SH schedule), e.g.
    --corpus.train-args='--pipeline.model.num-random 2000'."""


def check_corpus(cfg: CorpusConfig) -> None:
    """``ValueError`` naming the flag for settings no scene can be made or trained with (before any work)."""
    if not cfg.scene_seeds:
        raise ValueError("--corpus.scene-seeds is empty: give at least one scene seed.")
    if any(seed < 0 for seed in cfg.scene_seeds) or len(set(cfg.scene_seeds)) != len(cfg.scene_seeds):
        raise ValueError(f"--corpus.scene-seeds must be distinct and >= 0, got {list(cfg.scene_seeds)}.")
    if not cfg.stage_downscales or cfg.stage_downscales[-1] != 1 or any(d < 1 for d in cfg.stage_downscales):
        raise ValueError(f"--corpus.stage-downscales must be >= 1 and end at 1 (the scene's own resolution), got "
                         f"{list(cfg.stage_downscales)}.")
    if len(cfg.stage_fractions) != len(cfg.stage_downscales) or any(f <= 0 for f in cfg.stage_fractions):
        raise ValueError(f"--corpus.stage-fractions needs one positive share per stage ({len(cfg.stage_downscales)}), "
                         f"got {list(cfg.stage_fractions)}.")
    if cfg.resolution < 8 or any(cfg.resolution % d for d in cfg.stage_downscales):
        raise ValueError(f"--corpus.resolution must be >= 8 and divisible by every stage downscale "
                         f"{list(cfg.stage_downscales)}, got {cfg.resolution}.")
    if cfg.steps < len(cfg.stage_downscales):
        raise ValueError(f"--corpus.steps must give every stage a step, got {cfg.steps}.")
    for name in ("n_train", "n_val", "jobs", "supersample"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--corpus.{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")


def stage_steps(total: int, fractions: Sequence[float]) -> Tuple[int, ...]:
    """``total`` steps split over stages in proportion to ``fractions`` (each >= 1, the last takes the rest)."""
    steps = [max(1, int(round(total * f))) for f in fractions[:-1]]
    return (*steps, max(1, total - sum(steps)))


def _scene_dir(out: Path, seed: int) -> Path:
    return out / "scenes" / f"seed-{seed}"


def _run_dir(out: Path, seed: int) -> Path:
    return out / "runs" / f"seed-{seed}" / "gaussianvae" / "run"


def shard_path(out: Path, seed: int) -> Path:
    """Where scene ``seed``'s shard is written."""
    return out / "shards" / f"seed-{seed}.pt"


def train_command(cfg: CorpusConfig, out: Path, seed: int) -> List[str]:
    """The ns-train command line of scene ``seed``."""
    return [
        sys.executable, "-m", "nerfstudio.scripts.train", "gaussianvae",
        "--output-dir", str(out / "runs"), "--experiment-name", f"seed-{seed}", "--timestamp", "run",
        "--vis", "tensorboard", "--max-num-iterations", str(cfg.steps), "--steps-per-save", str(cfg.steps),
        "--steps-per-eval-batch", "0", "--steps-per-eval-image", "0", "--steps-per-eval-all-images", "0",
        "--pipeline.model.background-color", "white",
        "--pipeline.model.stage-downscales", *map(str, cfg.stage_downscales),
        "--pipeline.model.stage-steps", *map(str, stage_steps(cfg.steps, cfg.stage_fractions)),
        "--pipeline.model.refinement-after-training", "False",
        *shlex.split(cfg.train_args),
        "blender-data", "--data", str(_scene_dir(out, seed)),
    ]


def _render(args: Tuple[CorpusConfig, str, int]) -> int:
    cfg, out, seed = args
    directory = _scene_dir(Path(out), seed)
    spec = {"resolution": cfg.resolution, "n_train": cfg.n_train, "n_val": cfg.n_val,
            "supersample": cfg.supersample, "scene_seed": seed}
    if read_json(directory / "corpus-scene.json") == spec:
        return seed
    shutil.rmtree(directory, ignore_errors=True)
    write_scene(directory, cfg.resolution, cfg.n_train, n_test=1, seed=seed, supersample=cfg.supersample,
                n_val=cfg.n_val, n_points=1000, scene_seed=seed)
    write_json(directory / "corpus-scene.json", spec)
    return seed


def _shard(cfg: CorpusConfig, out: Path, seed: int) -> Path:
    """Scene ``seed``'s shard from its run's lineage, and its marker (the settings, and the transition count)."""
    lineage = load_lineage(RunLayout(_run_dir(out, seed)).lineage)
    cameras = BlenderDataParserConfig(data=_scene_dir(out, seed)).setup().get_dataparser_outputs("train").cameras
    transitions = build_transitions(lineage, max_children=GaussianVAEConfig().max_children, cameras=cameras)
    path = save_shard(shard_path(out, seed), transitions, scene=f"gvae-synthetic --scene-seed {seed}")
    write_json(path.with_suffix(".json"), {**_shard_spec(cfg, seed), "transitions": len(transitions)})
    return path


def _marker_matches(cfg: CorpusConfig, out: Path, seed: int) -> bool:
    marker = read_json(shard_path(out, seed).with_suffix(".json")) or {}
    return {k: v for k, v in marker.items() if k != "transitions"} == _shard_spec(cfg, seed)


def shard_sizes(cfg: CorpusConfig, out: Path) -> List[int]:
    """Transitions in each shard of ``cfg`` under ``out``, from the markers :func:`build_corpus` wrote (a marker
    from before they held the count gets it, from the shard itself)."""
    sizes = []
    for seed in cfg.scene_seeds:
        path = shard_path(Path(out).resolve(), seed)
        marker = read_json(path.with_suffix(".json")) or {}
        if "transitions" not in marker:
            marker["transitions"] = len(load_shard(path))
            write_json(path.with_suffix(".json"), marker)
        sizes.append(int(marker["transitions"]))
    return sizes


def build_corpus(cfg: CorpusConfig, out: Path, log: Callable[[str], None]) -> List[Path]:
    """Render, train and shard every scene of ``cfg`` under ``out`` (resuming what is done); the shards, in
    seed order. A failed training stops with ``RuntimeError`` naming its log."""
    check_corpus(cfg)
    out = Path(out).resolve()
    todo = [s for s in cfg.scene_seeds if not _marker_matches(cfg, out, s)]
    if todo:
        log(f"gvae-pretrain: rendering {len(todo)} scene(s) at {cfg.resolution} px ({cfg.jobs} at a time)")
        with ProcessPoolExecutor(max_workers=cfg.jobs) as pool:
            for seed in pool.map(_render, [(cfg, str(out), s) for s in todo]):
                log(f"gvae-pretrain: scene {seed} rendered -> {_scene_dir(out, seed)}")

        def shard(seed: int) -> None:  # as soon as a scene is trained, so a stopped run loses no finished one
            log(f"gvae-pretrain: scene {seed} -> {_shard(cfg, out, seed)}")

        _train_all(cfg, out, todo, log, shard)
    return [shard_path(out, s) for s in cfg.scene_seeds]


def _shard_spec(cfg: CorpusConfig, seed: int) -> Dict[str, object]:
    spec = asdict(cfg)
    spec.pop("jobs")
    spec.pop("scene_seeds")
    # "footprints": shards since they hold log2_px_per_unit (older ones are made again)
    return json.loads(json.dumps({**spec, "seed": seed, "footprints": True}))  # as read back (tuples become lists)


def _train_all(cfg: CorpusConfig, out: Path, seeds: Sequence[int], log: Callable[[str], None],
               done: Callable[[int], None]) -> None:
    (out / "logs").mkdir(parents=True, exist_ok=True)

    def started(command: LoggedCommand) -> None:
        shutil.rmtree(out / "runs" / f"seed-{command.key}", ignore_errors=True)
        log(f"gvae-pretrain: training scene {command.key} for {cfg.steps} steps (log: {command.log})")

    def finished(command: LoggedCommand, returncode: int, wall_s: float) -> None:
        seed = command.key
        if returncode != 0 or not RunLayout(_run_dir(out, seed)).lineage.is_file():
            raise RuntimeError(f"training scene {seed} failed (exit {returncode}); see {command.log}")
        log(f"gvae-pretrain: scene {seed} trained in {wall_s:.0f} s")
        done(seed)

    commands = [LoggedCommand(seed, train_command(cfg, out, seed), out / "logs" / f"train-seed-{seed}.log")
                for seed in seeds]
    run_logged(commands, cfg.jobs, out, finished, started)
