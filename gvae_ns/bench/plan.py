"""gvae-bench planning: which runs to train and which rows to score, and the data they need."""

from __future__ import annotations

import dataclasses
import hashlib
import shlex
import shutil
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from gvae_ns.bench.config import BenchConfig, BenchError, RowSpec, RunSpec
from gvae_ns.bench.refine import suite_refine_config
from gvae_ns.bench.scene_copies import COPY_FORMAT, check_downscales, copy_notes, write_copy
from gvae_ns.bench.scenes import detect_layout, read_scene
from gvae_ns.console import say
from gvae_ns.data_checks import DataCheckError
from gvae_ns.datasets import check_blender_dir, downscale_blender, read_json, write_json
from gvae_ns.synthetic import write_scene

_SELECT_LABEL = {"all": "Ours", "hessian": "Ours-nabla2", "grad": "Ours-grad"}
_DECODER_TAG = {"temporal": ("", ""), "generative": ("-gd", " (GD head)"),
                "prior": ("-prior", " (shipped prior)"), "prior-tuned": ("-priorft", " (shipped prior, fine-tuned)"),
                "split": ("-split", " (3DGS split, no learning)"),
                "none": ("-ft", " (fine-tune only)")}
"""Row id suffix and label tag of each refinement decoder (temporal rows keep the ids they had before)."""
_SPLIT_SELECTION = {"all": "the whole scene", "hessian": "the Hessian selection", "grad": "the gradient selection"}


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


def baseline_steps(cfg: BenchConfig) -> int:
    """Training steps of the baselines and the oracle: ``steps`` plus the refinement's fine-tune steps, when the
    suite has refined rows (ours trains ``steps`` through its stages, then fine-tunes): one budget for all."""
    if not (cfg.ours and cfg.refine_decoders and cfg.extrapolate_stages):
        return cfg.steps
    return cfg.steps + int(suite_refine_config(cfg).finetune_steps)


def data_args(data: Path) -> Dict[str, str]:
    """The RunSpec fields that depend on a training dataset: Blender-format data as it is, a capture's
    nerfstudio-data copy with the fingerprint of its transforms.json."""
    if (data / "transforms_train.json").is_file() or not (data / "transforms.json").is_file():
        return {}
    digest = hashlib.sha1((data / "transforms.json").read_bytes()).hexdigest()[:16]
    return {"dataparser": "nerfstudio-data", "data_fingerprint": digest}


def _baseline_spec(cfg: BenchConfig, mode: str, factor: int, data: Path, name: str) -> RunSpec:
    args: Tuple[str, ...] = ("--pipeline.model.rasterize-mode", mode)
    steps = baseline_steps(cfg)
    if use_stock_splatfacto(cfg):
        return RunSpec(name, "splatfacto", factor, data, args + tuple(shlex.split(cfg.baseline_args)), steps,
                       **data_args(data))
    args += (
        "--pipeline.model.stage-downscales", "1",
        "--pipeline.model.stage-steps", str(steps),
        "--pipeline.model.refinement-after-training", "False",
    )
    return RunSpec(name, "gaussianvae", factor, data, args + tuple(shlex.split(cfg.baseline_args)), steps,
                   **data_args(data))


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
                "--pipeline.model.refinement-after-training", "False",
                *shlex.split(cfg.ours_args),
            )
            runs.append(RunSpec(name, "gaussianvae", factor, lowres[factor], args, cfg.steps,
                                **data_args(lowres[factor])))
            stages = ", ".join(f"1/{d}" for d in cfg.ours_downscales)
            rows.append(RowSpec(name, f"gaussianvae stages {stages}, no refinement", "ours", factor, name))
            for decoder in cfg.refine_decoders:
                suffix, tag = _DECODER_TAG[decoder]
                for k in cfg.extrapolate_stages:
                    # the fine-tune-only control proposes nothing: the selection does not matter, one row per k
                    for select in cfg.refine_selects[:1] if decoder == "none" else cfg.refine_selects:
                        label = f"{_SELECT_LABEL[select]}{tag} +{k}"
                        if decoder == "split":  # the no-learning controls are not "ours"
                            label = f"control: 3DGS split of {_SPLIT_SELECTION[select]} +{k}"
                        elif decoder == "none":
                            label = f"control: fine-tune only at +{k}"
                        rows.append(RowSpec(f"ours-{select}-p{k}{suffix}-x{factor}", label, "ours", factor, name,
                                            extrapolate_stages=k, refine_select=select, refine_decoder=decoder))
    if cfg.oracle:
        name = "oracle"
        runs.append(_baseline_spec(cfg, "classic", 1, data, name))
        rows.append(RowSpec(name, f"oracle: {baseline_label(cfg, 'classic')}, full resolution", "oracle", 1, name))
    return runs, rows


# ----------------------------------------------------------------------------------------------- data prep
BLENDER_SPLIT = "the dataset's test split (transforms_test.json)"


def prepare_data(cfg: BenchConfig, log=say) -> Tuple[Path, Dict[int, Path], Dict[str, Any]]:
    """The full-resolution dataset (``--data``, its copy at the scoring resolution for a capture, or the built-in
    scene), its LR training copies, and what the results say about them (``layout``, ``split``, ``notes``)."""
    out = cfg.output.resolve()
    if cfg.data is None:
        data = out / "data" / "scene"
        marker = data / ".bench-scene.json"
        spec = dataclasses.asdict(cfg.scene)
        if read_json(marker) != spec:
            log(f"rendering the built-in scene at {cfg.scene.resolution}px into {data}")
            if data.exists():
                shutil.rmtree(data)
            s = cfg.scene
            write_scene(data, s.resolution, s.n_train, s.n_test, s.seed, s.supersample, s.n_val, s.n_points)
            write_json(marker, spec)
        about: Dict[str, Any] = {"layout": "blender (built-in scene)", "split": BLENDER_SPLIT, "notes": []}
    else:
        data = cfg.data.resolve()
        try:
            layout = detect_layout(data, cfg.capture.layout, cfg.capture.colmap_path)
        except DataCheckError as err:
            raise BenchError(f"--data: {err}") from None
        if layout != "blender":
            return _prepare_capture(cfg, data, log)
        if cfg.capture.score_downscale != 1:
            raise BenchError(f"capture.score_downscale = {cfg.capture.score_downscale} applies to nerfstudio-data / "
                             f"COLMAP captures; {data} is Blender-format data, scored at its test views' size. Leave "
                             "it at 1, or make a downscaled copy first (gvae_ns.datasets.downscale_blender).")
        about = {"layout": "blender", "split": BLENDER_SPLIT, "notes": []}
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
        if read_json(marker) != spec:
            log(f"making the x{factor} training copy of {data} in {dst}")
            if dst.exists():
                shutil.rmtree(dst)
            try:
                downscale_blender(data, dst, factor, splits=("train",))
            except ValueError as err:
                raise BenchError(f"factors: {err}") from None
            write_json(marker, spec)
        lowres[factor] = dst
    return data, lowres, about


def _prepare_capture(cfg: BenchConfig, source: Path, log) -> Tuple[Path, Dict[int, Path], Dict[str, Any]]:
    """A nerfstudio-data / COLMAP capture: checked whole (frames, poses, intrinsics, every downscale) before
    anything is written, then copied as nerfstudio-data at the scoring resolution (``data/scene``, the oracle's
    data) and at each LR factor (``data/x<f>``), every copy with the same held-out views."""
    out = cfg.output.resolve()
    score = cfg.capture.score_downscale
    try:
        scene = read_scene(source, cfg.capture)
        check_downscales(scene, {"capture.score_downscale": score,
                                 **{f"capture.score_downscale x factor {f}": score * f for f in cfg.factors}})
    except DataCheckError as err:
        raise BenchError(f"--data: {err}") from None
    if not (scene.test and scene.val and scene.train):
        raise BenchError(f"--data: {scene.source} has {len(scene.frames)} frame(s): {len(scene.test)} held out, "
                         f"{len(scene.val)} for validation, {len(scene.train)} to train on; the benchmark needs some "
                         "of each. Lower capture.holdout_every or add frames.")
    stamp = {"format": COPY_FORMAT, "source": str(scene.source), "modified_ns": scene.source.stat().st_mtime_ns,
             "layout": scene.layout, "test": list(scene.test), "val": list(scene.val), "test_downscale": score}
    copies = {"scene": score, **{f"x{f}": score * f for f in cfg.factors}}
    records: Dict[str, dict] = {}
    for folder, train_downscale in copies.items():
        dst = out / "data" / folder
        marker = dst / ".bench-copy.json"
        spec = {**stamp, "train_downscale": train_downscale}
        saved = read_json(marker)
        if saved is None or saved.get("spec") != spec:
            log(f"copying {scene.source} ({scene.layout}) into {dst}: training frames at 1/{train_downscale}, "
                f"held-out frames at 1/{score}")
            if dst.exists():
                shutil.rmtree(dst)
            try:
                record = write_copy(scene, dst, train_downscale, score)
            except DataCheckError as err:
                raise BenchError(f"--data: {err}") from None
            saved = {"spec": spec, "record": record}
            write_json(marker, saved)
        records[folder] = saved["record"]
    about = {"path": str(scene.root), "copy": str(out / "data" / "scene"), "layout": scene.layout,
             "source": str(scene.source), "split": scene.split,
             "held_out": list(scene.test), "validation": list(scene.val), "score_downscale": score,
             "train_sizes": {k: v["train_size"] for k, v in records.items()},
             "notes": copy_notes(scene, records["scene"])}
    return out / "data" / "scene", {f: out / "data" / f"x{f}" for f in cfg.factors}, about
