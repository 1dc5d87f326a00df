"""``gvae-refine``: refine a trained gaussianvae run and write ``<run>/refinement.pt``.

:func:`refine_pipeline` is the one path from a loaded run to a refinement, used by ``gvae-refine``, by
``ns-train``'s ``AFTER_TRAIN`` phase and by ``gvae-bench``: it reads the run's :class:`RunState` (trained
Gaussians, lineage, provenance), gets the decoder (the run's file when it was trained on this run state, else
trained on the lineage and saved), scores every Gaussian on the training views at the finest stage's
resolution, extrapolates the selection and writes the file. It returns the refinement and the
:class:`~gvae_ns.refine.refiner.Refiner`; showing them is the caller's business.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple

import torch
from gsplat.strategy import DefaultStrategy
from torch import Tensor

from gvae_ns.console import say
from gvae_ns.progress import phase
from gvae_ns.refine.decoder import decoder_class, decoder_for_run
from gvae_ns.refine.finetune import finetune, finetune_strategy, held_out_loss
from gvae_ns.refine.refiner import MAX_STAGES, Refiner, RunState, check_lineage
from gvae_ns.refine.result import (
    Refinement,
    RefinementUnavailable,
    rebuild_hint,
    save_refinement,
)
from gvae_ns.refine.score import ScoringViews, score_gaussians
from gvae_ns.run_layout import DECODER_FILES, REFINEMENT_FILE, RunLayout
from gvae_ns.tagged_file import TaggedFileError


@dataclass
class RefineConfig:
    """Refine a trained gaussianvae run (``gvae-refine``)."""

    load_config: Path
    """The run's config.yml (as for ns-viewer / ns-export)."""
    stages: int = 1
    """Extrapolation stages past the finest trained stage (1..4); each is one resolution doubling."""
    select: Literal["hessian", "grad", "all"] = "hessian"
    """Which lineages to extrapolate: Hessian-guided score, view-space gradient only, or the whole scene."""
    fraction: float = 0.1
    """Fraction of Gaussians selected by 'hessian' / 'grad'."""
    output: Optional[Path] = None
    """Where to write the refinement (default: <run>/refinement.pt, which ns-viewer and ns-export load)."""
    decoder: Literal["temporal", "generative", "prior", "prior-tuned", "split", "none"] = "temporal"
    """temporal: the lineage VAE's child slots; generative: the serialized-attention densification head
    (Generative Densification); prior: the lineage VAE shipped in the package, trained across procedural scenes
    (gvae-pretrain), used as it is; prior-tuned: that prior fine-tuned on the run's lineage for --decoder-steps
    steps; split: the no-learning control, 3DGS's split of the same selection; none: the
    fine-tune-only control (no proposals)"""
    temperature: float = 0.0
    """Latent noise of the VAE's draws (0: its deterministic prediction, the prior's mean)."""
    finetune_steps: int = 200
    """Steps of the sub-pixel fine-tune after extrapolation (renders at the target resolution, averaged down,
    against the training views); 0: none. The result is kept only if it does not raise the loss on the run's
    held-out (evaluation) views."""
    compare_with_finetune_only: bool = True
    """Also fine-tune the trained scene alone (the no-learning control, --decoder none, the same steps) and keep
    whichever of the two has the lower held-out loss, so the decoder's proposals are kept only where they beat
    the control on the held-out views. It doubles the fine-tune's time. gvae-bench turns it off, so that each of
    its rows measures its own decoder."""
    finetune_densify: bool = False
    """Densify during the fine-tune (the run's thresholds, three rounds). Off by default: on the lego CPU suite
    (2026-12-03) it raised the held-out loss on every refinement, so none was kept."""
    retrain_decoder: bool = False
    """Train the decoder again even if its file (vae.pt / densify_head.pt) exists beside the run."""
    decoder_steps: int = 1500
    """Optimiser steps of the decoder when it is trained."""
    max_new_ratio: float = 1.0
    """Cap on added Gaussians, as a multiple of the selected count."""
    score_views: int = 0
    """Training views used for the selection scores (0 = all)."""
    seed: int = 0
    """Seed for decoder training and the latent draws."""
    steps: Optional[int] = None
    """Deprecated name of --stages (kept for one release)."""
    vae_steps: Optional[int] = None
    """Deprecated name of --decoder-steps (kept for one release)."""
    retrain_vae: bool = False
    """Deprecated name of --retrain-decoder (kept for one release)."""

    def __post_init__(self) -> None:
        for old, new in (("steps", "stages"), ("vae_steps", "decoder_steps"), ("retrain_vae", "retrain_decoder")):
            value = getattr(self, old)
            if value is not None and value is not False:
                say(f"gvae-refine: --{old.replace('_', '-')} is deprecated, use --{new.replace('_', '-')} "
                     "(the old name goes in the next release).", style="yellow")
                setattr(self, new, value)
                setattr(self, old, False if old == "retrain_vae" else None)


def check_refine_config(config: RefineConfig) -> None:
    """Raise ``ValueError`` (one paragraph, naming the option and the fix) for options that cannot work;
    nothing is loaded or trained first."""
    if not 1 <= config.stages <= MAX_STAGES:
        raise ValueError(f"--stages must be in 1..{MAX_STAGES}, got {config.stages} (extrapolation stages past the "
                         "finest trained stage).")
    if not 0.0 < config.fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {config.fraction} (the share of Gaussians selected).")
    if config.decoder_steps < 1:
        raise ValueError(f"--decoder-steps must be at least 1, got {config.decoder_steps}.")
    if not config.max_new_ratio > 0.0:
        raise ValueError(f"--max-new-ratio must be above 0, got {config.max_new_ratio}.")
    if config.finetune_steps < 0:
        raise ValueError(f"--finetune-steps must be 0 (no fine-tune) or more, got {config.finetune_steps}.")
    if not config.temperature >= 0.0:
        raise ValueError(f"--temperature must be 0 or more, got {config.temperature}.")
    if config.score_views < 0:
        raise ValueError(f"--score-views must be 0 (all views) or more, got {config.score_views}.")
    if config.output is not None and Path(config.output).is_dir():
        raise ValueError(f"--output {config.output} is a directory; pass a file name, e.g. "
                         f"{Path(config.output) / REFINEMENT_FILE}.")


def build_refiner(config: RefineConfig, run: RunState, views: ScoringViews, writer_step: int = 0) -> Refiner:
    """Get the decoder for ``run`` (its file, or trained and saved) and score its Gaussians on ``views``.

    An existing decoder file is reused only when it was trained on this run state; a stale, foreign or damaged
    one stops with :class:`~gvae_ns.tagged_file.TaggedFileError` (``--retrain-decoder`` replaces it)."""
    lineage = check_lineage(run.lineage)
    layout = RunLayout(run.run_dir if run.run_dir is not None else Path(config.load_config).parent)
    path = layout.decoder(config.decoder) if config.decoder in DECODER_FILES else layout.root
    decoder = decoder_for_run(config.decoder, path, lineage, run.provenance, config.decoder_steps, run.device,
                              seed=config.seed, retrain=config.retrain_decoder, writer_step=writer_step,
                              rebuild=rebuild_hint(layout.root, path.name, config.decoder), cameras=views.cameras)
    started = time.perf_counter()
    n_views = len(views.images) if config.score_views <= 0 else config.score_views
    with phase("Scoring views", n_views, writer_step) as advance:
        scores = score_gaussians(run.params, views, count=config.score_views, progress=advance)
    say(f"gvae-refine: scored {scores['grad2d'].numel()} Gaussians in {time.perf_counter() - started:.1f} s")
    return Refiner(run, decoder, scores, fraction=config.fraction, max_new_ratio=config.max_new_ratio,
                   seed=config.seed, temperature=config.temperature)


def load_refiner(run: RunState, scores: Optional[Dict[str, Tensor]], decoder: str, fraction: float) -> Refiner:
    """A :class:`~gvae_ns.refine.refiner.Refiner` for a loaded run from its decoder file and stored ``scores``
    (those of its ``refinement.pt``), without training or scoring anything.

    The decoder file must have been trained on this run state; a missing, stale, foreign or damaged one raises
    :class:`~gvae_ns.refine.result.RefinementUnavailable` with the file's own one-paragraph message."""
    if not scores:
        raise RefinementUnavailable(f"no selection scores: run gvae-refine to write {REFINEMENT_FILE}.")
    if not decoder_class(decoder).per_run:
        try:
            net = decoder_class(decoder).load(Path(), run.device, None, None)
        except (OSError, ValueError) as err:
            raise RefinementUnavailable(str(err)) from None
        return Refiner(run, net, scores, fraction=fraction)
    if run.run_dir is None:
        raise RefinementUnavailable("the run folder is not known: run gvae-refine first.")
    path = RunLayout(run.run_dir).decoder(decoder)
    if not path.is_file():
        raise RefinementUnavailable(f"no trained decoder ({path.name}) beside the run: run gvae-refine first.")
    try:
        net = decoder_class(decoder).load(path, run.device, run.provenance, rebuild_hint(run.run_dir, path.name, decoder))
    except (OSError, ValueError) as err:
        raise RefinementUnavailable(str(err)) from None
    return Refiner(run, net, scores, fraction=fraction)


def load_pipeline(config: RefineConfig):
    """The trained run behind ``config.load_config`` (nerfstudio's ``eval_setup``) and its checkpoint step."""
    if not Path(config.load_config).is_file():
        raise RefinementUnavailable(f"{config.load_config} does not exist: pass the run's config.yml "
                                    "(the one ns-train wrote beside nerfstudio_models/).")
    # nerfstudio's method registry imports this plugin's model, which imports this package: import it late
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, step = eval_setup(Path(config.load_config), test_mode="val")
    return pipeline, step


def refine_pipeline(config: RefineConfig, pipeline, step: Optional[int] = None) -> Tuple[Refinement, Refiner]:
    """Refine the loaded run ``pipeline`` (checkpoint ``step``) and write the refinement file.

    Returns the refinement and the refiner that made it (for other stage counts / selections)."""
    check_refine_config(config)
    model = pipeline.model
    if not callable(getattr(model, "run_state", None)):
        raise RefinementUnavailable(
            f"{config.load_config} is a {type(model).__name__} run; refinement needs a run trained with "
            "ns-train gaussianvae (it records the lineage)."
        )
    output = Path(config.output) if config.output is not None else RunLayout.of_config(config.load_config).refinement
    refused = getattr(model, "refinement_file_error", None)
    if refused:
        say(f"gvae-refine: the existing refinement file was refused ({refused}); this run replaces it.")
    was_training = model.training
    model.eval()
    try:
        run = model.run_state(step)
        dm = pipeline.datamanager
        views = model.scoring_views(dm.train_dataset.cameras, [d["image"] for d in dm.cached_train])
        refiner = build_refiner(config, run, views, writer_step=int(step or 0))
        started = time.perf_counter()
        refinement = refiner.refine(config.stages, config.select)
        elapsed = time.perf_counter() - started
        say(f"gvae-refine: {refinement.describe()} in {elapsed * 1000:.0f} ms")
        if config.finetune_steps > 0:
            held_out = model.scoring_views(dm.eval_dataset.cameras, [d["image"] for d in dm.cached_eval])
            strategy = finetune_strategy(model.strategy, config.finetune_steps) if config.finetune_densify else None
            refinement, loss = finetune_checked(config, run, refinement, views, held_out, int(step or 0), strategy)
            if config.compare_with_finetune_only and config.decoder != "none" and loss is not None:
                control = load_refiner(run, refiner.scores, "none", config.fraction).refine(config.stages,
                                                                                           config.select)
                refinement = keep_the_better(refinement, loss, *finetune_checked(config, run, control, views, held_out,
                                                                                 int(step or 0), strategy))
            refiner.remember(refinement)
    finally:
        model.train(was_training)
    save_refinement(refinement, output)
    say(f"gvae-refine: {refinement.describe()} -> {output}")
    return refinement, refiner


def keep_the_better(refinement: Refinement, loss: float, control: Refinement, control_loss: float) -> Refinement:
    """The decoder's fine-tuned ``refinement`` unless the fine-tune-only ``control`` has the strictly lower
    held-out loss; the choice is said with both losses."""
    if control_loss < loss:
        say(f"gvae-refine: the fine-tune alone has the lower held-out loss ({control_loss:.5f} against {loss:.5f} "
            f"for the {refinement.decoder} decoder's proposals): the refinement is the fine-tune alone "
            "(--no-compare-with-finetune-only keeps the decoder's)")
        return control
    say(f"gvae-refine: the {refinement.decoder} decoder's proposals hold against the fine-tune alone on the "
        f"held-out views ({loss:.5f} against {control_loss:.5f}): kept")
    return refinement


def finetune_refinement(config: RefineConfig, run: RunState, refinement: Refinement, views: ScoringViews,
                        held_out: ScoringViews, writer_step: int = 0,
                        strategy: Optional[DefaultStrategy] = None) -> Refinement:
    """``refinement`` after the sub-pixel fine-tune (:mod:`gvae_ns.refine.finetune`; ``strategy``: its
    densification) when that does not raise the loss on the ``held_out`` views against the trained scene; else
    the trained scene itself (nothing added)."""
    return finetune_checked(config, run, refinement, views, held_out, writer_step, strategy)[0]


def finetune_checked(config: RefineConfig, run: RunState, refinement: Refinement, views: ScoringViews,
                     held_out: ScoringViews, writer_step: int = 0,
                     strategy: Optional[DefaultStrategy] = None) -> Tuple[Refinement, Optional[float]]:
    """:func:`finetune_refinement` and the held-out loss of what it returns (``None`` without held-out views)."""
    factor = 2 ** int(refinement.steps)
    with phase("Fine-tune", config.finetune_steps, writer_step) as advance:
        params, is_new, kept = finetune(refinement.params, views, factor, config.finetune_steps, seed=config.seed,
                                        progress=advance, is_new=refinement.is_new, strategy=strategy)
    originals = torch.ones(refinement.num_original, dtype=torch.bool)
    originals[refinement.removed] = False
    survivors = torch.where(originals)[0][kept.cpu()]
    originals[:] = True
    originals[survivors] = False  # now: the originals no longer in the scene as they were
    tuned = dataclasses.replace(refinement, params=params, is_new=is_new.cpu(), removed=torch.where(originals)[0])
    if strategy is not None:
        say(f"gvae-refine: the fine-tune's densification left {tuned.num_added} added Gaussians "
            f"(the proposals had {refinement.num_added}), {len(tuned.removed)} originals replaced or pruned")
    if len(held_out.images) == 0:
        say("gvae-refine: the run has no held-out (evaluation) views to check the fine-tune on; it is kept unchecked.",
            style="yellow")
        return tuned, None
    trained_loss = held_out_loss(run.params, held_out, factor, trained=True)
    tuned_loss = held_out_loss(tuned.params, held_out, factor)
    better = tuned_loss <= trained_loss
    what = "the trained scene alone" if refinement.decoder == "none" else f"the {refinement.decoder} proposals"
    say(f"gvae-refine: {what} fine-tuned {config.finetune_steps} steps; held-out loss over {len(held_out.images)} views "
        f"{tuned_loss:.5f} against {trained_loss:.5f} for the trained scene: "
        + ("kept" if better else "not kept, the trained scene is the refinement"))
    if better:
        return tuned, tuned_loss
    n = run.num_gaussians
    empty = torch.zeros(0, dtype=torch.long)
    return dataclasses.replace(refinement, params={k: v.detach().cpu() for k, v in run.params.items()},
                               is_new=torch.zeros(n, dtype=torch.bool), removed=empty), trained_loss


def refine_run(config: RefineConfig, pipeline=None) -> Refinement:
    """Refine a trained run (``pipeline``, or the run loaded from ``config.load_config``), write the file and
    show the refinement on the run's model; returns the refinement."""
    check_refine_config(config)
    step = getattr(pipeline.model, "step", None) if pipeline is not None else None
    if pipeline is None:
        pipeline, step = load_pipeline(config)
    refinement, refiner = refine_pipeline(config, pipeline, step)
    pipeline.model.show_refinement(refinement, refiner)
    return refinement


def main(argv: Optional[list] = None) -> None:
    """Console entry point ``gvae-refine``: a user error ends with one paragraph on stderr and exit code 2."""
    import tyro  # the command line only: library users of this module need not import tyro

    config = tyro.cli(RefineConfig, args=argv)
    try:
        refine_run(config)
    except (RefinementUnavailable, TaggedFileError, FileNotFoundError, ValueError) as err:
        print(f"gvae-refine: {err}", file=sys.stderr)
        raise SystemExit(2) from None
