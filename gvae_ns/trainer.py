"""The nerfstudio trainer for gaussianvae: input checks, safe checkpoints, lineage file, refinement phase.

It changes five things in nerfstudio's ``Trainer``, all at its existing seams:

* ``save_config`` (called by ``ns-train`` before anything trains) checks the device, the stage schedule,
  the refinement options and every frame of the dataset (:mod:`gvae_ns.data_checks`), and stops with a
  one-paragraph message and exit status 2 naming the field or file and the fix;
* checkpoints are written atomically (fsynced) and without numpy objects, so PyTorch >= 2.6 loads them with
  its default ``weights_only=True`` (stock ``ns-viewer`` / ``ns-export`` / ``ns-eval`` need no flags);
* each checkpoint save also writes the run's lineage file (``<run>/lineage.npz``); the checkpoint itself
  carries the recorder's state, so resuming continues the same lineage;
* a loss or parameter group that turns NaN / infinite stops training at that step, before anything is saved;
* refinement (decoder training, selection, extrapolation) is an ``AFTER_TRAIN`` training callback, which
  nerfstudio runs before the viewer's endless completion loop: with ``--vis viewer`` the refined scene is on
  screen when training ends; with ``--vis tensorboard`` the run exits afterwards.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Literal, NoReturn, Optional, Type

import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from gvae_ns.atomic import torch_save_atomic
from gvae_ns.data_checks import DataCheckError, check_dataset
from gvae_ns.offline import to_weights_only_safe
from gvae_ns.prior.shipped import PriorUnavailable, read_manifest
from gvae_ns.refine.cli import RefineConfig, refine_pipeline
from gvae_ns.run_layout import CONFIG_FILE, RunLayout
from gvae_ns.stages import DEFAULT_STAGE_STEPS, StageSchedule, StageScheduleError
from gvae_ns.step_budget import follow_schedule


class RunConfigError(ValueError):
    """A gaussianvae run that cannot start; the message names the field and the fix."""


USAGE_ERROR = 2
"""Exit status of a run refused before training (bad option or bad input), as argparse / tyro use."""


def exit_with_message(message: str, code: int = USAGE_ERROR) -> NoReturn:
    """Print ``message`` as one paragraph on stderr (no traceback) and exit with ``code``."""
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


@dataclass
class GaussianVAETrainerConfig(TrainerConfig):
    """nerfstudio's trainer config, with the checks and phases gaussianvae needs."""

    _target: Type = field(default_factory=lambda: GaussianVAETrainer)

    def save_config(self) -> None:
        """Check the run before anything trains, record the run directory, then save ``config.yml``."""
        try:
            changes = follow_schedule(self, sum(DEFAULT_STAGE_STEPS))  # checks the schedule first
            check_run_config(self)
        except (RunConfigError, StageScheduleError, DataCheckError) as err:
            exit_with_message(f"ns-train gaussianvae: {err}")
        if changes:
            CONSOLE.print("gvae-ns: step settings follow the stage schedule: " + "; ".join(changes)
                          + ".", markup=False, highlight=False, soft_wrap=True)
        self.pipeline.model.run_dir = self.get_base_dir()
        super().save_config()


def _data_dir(config: TrainerConfig) -> Optional[Path]:
    dm = config.pipeline.datamanager
    data = getattr(dm, "data", None) or getattr(dm.dataparser, "data", None)
    return None if data is None else Path(data)


def check_run_config(config: TrainerConfig) -> None:
    """Raise :class:`RunConfigError` / ``StageScheduleError`` / ``DataCheckError`` for a run that cannot train."""
    model = config.pipeline.model
    schedule = StageSchedule(tuple(model.stage_downscales), tuple(model.stage_steps))
    bounds = schedule.boundaries
    resuming = config.load_dir is not None or config.load_checkpoint is not None
    if not resuming and config.max_num_iterations < bounds[-2] + 1:
        raise RunConfigError(
            f"max_num_iterations={config.max_num_iterations} ends before the last stage starts (step "
            f"{bounds[-2]}). Set --max-num-iterations {schedule.total_steps} or shorten "
            "--pipeline.model.stage-steps."
        )
    if config.machine.device_type == "cuda" and not torch.cuda.is_available():
        raise RunConfigError(
            "machine.device_type is 'cuda' but no CUDA device is visible. Use --machine.device-type cpu "
            "(the CPU rasterizer) or run on a GPU machine."
        )
    if config.machine.device_type != "cuda" and config.mixed_precision:
        raise RunConfigError("mixed_precision needs CUDA; drop --mixed-precision for a CPU run.")
    if config.machine.device_type != "cuda" and config.machine.num_devices > 1:
        raise RunConfigError("machine.num_devices > 1 needs CUDA; use --machine.num-devices 1 on CPU.")
    data = _data_dir(config)
    if data is None:
        raise RunConfigError("no data directory given: pass --data <dir> (or blender-data --data <dir>).")
    if not data.exists():
        raise RunConfigError(f"data directory {data} does not exist: check --data (or the dataparser's --data).")
    dataparser = config.pipeline.datamanager.dataparser
    size = check_dataset(type(dataparser).__name__, data, dataparser)
    if size is not None:
        warning = schedule.check_image_size(size[0], size[1], str(data))
        if warning:
            CONSOLE.print(f"ns-train gaussianvae: {warning}", style="yellow", markup=False, highlight=False,
                          soft_wrap=True)
    check_refine_options(model, schedule, _expected_gaussians(model, data))


def check_refine_options(model, schedule: StageSchedule, expected_gaussians: int) -> None:
    """Raise :class:`RunConfigError` for refinement options that would fail (or do nothing) after training."""
    if not model.refinement_after_training:
        return
    fix_off = " (or turn refinement off with --pipeline.model.refinement-after-training False)"
    if isinstance(model.extrapolate_stages, bool) or not 1 <= int(model.extrapolate_stages) <= 4:
        raise RunConfigError(f"--pipeline.model.extrapolate-stages is {model.extrapolate_stages}: extrapolation "
                             f"takes 1..4 stages (one resolution doubling each){fix_off}.")
    if not 0.0 < float(model.extrapolate_fraction) <= 1.0:
        raise RunConfigError(f"--pipeline.model.extrapolate-fraction is {model.extrapolate_fraction}: it is the "
                             f"share of Gaussians refined and must be in (0, 1]{fix_off}.")
    if int(model.finetune_steps) < 0:
        raise RunConfigError(f"--pipeline.model.finetune-steps is {model.finetune_steps}: 0 (no fine-tune) or more"
                             f"{fix_off}.")
    if int(model.decoder_steps) < 1:
        raise RunConfigError(f"--pipeline.model.decoder-steps is {model.decoder_steps}: the decoder needs at "
                             f"least one optimiser step{fix_off}.")
    if model.decoder in ("prior", "prior-tuned"):
        try:
            read_manifest()
        except PriorUnavailable as err:
            raise RunConfigError(f"--pipeline.model.decoder {model.decoder}: {err}{fix_off}") from None
    if schedule.num_stages < 2:
        raise RunConfigError(
            f"--pipeline.model.stage-downscales {' '.join(map(str, schedule.downscales))} is one stage, but "
            "refinement learns from how Gaussians change between stages: give at least two (e.g. 4 2 1)"
            f"{fix_off}.")
    if model.extrapolate_select != "all" and round(float(model.extrapolate_fraction) * expected_gaussians) == 0:
        raise RunConfigError(
            f"--pipeline.model.extrapolate-fraction {model.extrapolate_fraction} of the about {expected_gaussians} "
            f"Gaussians this scene starts with selects none: raise it to at least "
            f"{1.0 / max(expected_gaussians, 1):.2g}, or use --pipeline.model.extrapolate-select all{fix_off}.")


def _expected_gaussians(model, data: Path) -> int:
    """Gaussians the scene starts with: the seed point cloud's size, else splatfacto's random count."""
    if model.random_init:
        return int(model.num_random)
    transforms = data if data.suffix == ".json" else data / "transforms.json"
    try:
        ply_name = json.loads(transforms.read_text()).get("ply_file_path") if transforms.is_file() else None
        ply = transforms.parent / ply_name if ply_name else None
        if ply is not None and ply.is_file():
            with open(ply, "rb") as f:
                for line in f:
                    if line.startswith(b"element vertex"):
                        return int(line.split()[-1])
                    if line.startswith(b"end_header"):
                        break
    except (OSError, ValueError):
        pass
    return int(model.num_random)


class GaussianVAETrainer(Trainer):
    """nerfstudio's Trainer with weights-only-safe checkpoints, a lineage file and a refinement phase."""

    config: GaussianVAETrainerConfig

    @property
    def lineage_path(self) -> Path:
        """Where this run's lineage file lives (beside config.yml, not among the checkpoints)."""
        return RunLayout(self.base_dir).lineage

    def _load_checkpoint(self) -> None:
        """nerfstudio's resume, then point the optimizers at the parameters the checkpoint resized.

        splatfacto replaces its Gaussian parameters when it loads a checkpoint with another count, but the
        optimizers were built for the old ones; gsplat's densification reads the optimizer's parameter, so
        without this a resumed run fails at its first refinement.
        """
        super()._load_checkpoint()
        if self.config.load_checkpoint is not None:
            self.last_checkpoint = Path(self.config.load_checkpoint)
        elif self.config.load_dir is not None:
            loaded = sorted(Path(self.config.load_dir).glob("step-*.ckpt"))
            self.last_checkpoint = loaded[-1] if loaded else None
        groups = self.pipeline.get_param_groups()
        for name, optimizer in self.optimizers.optimizers.items():
            new_params = groups.get(name)
            if not new_params:
                continue
            for group in optimizer.param_groups:
                old_params = group["params"]
                for old, new in zip(old_params, new_params):
                    if old is not new and old in optimizer.state:
                        optimizer.state[new] = optimizer.state.pop(old)
                group["params"] = list(new_params[: len(old_params)])
            self.optimizers.parameters[name] = list(new_params)

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """Write ``step-*.ckpt`` atomically, weights-only loadable, and the lineage file beside the run.

        One writer under DDP (nerfstudio's ``check_main_thread``); the lineage file is written after the
        checkpoint, so a crash between the two leaves an older lineage that the checkpoint's own copy of the
        recorder state supersedes on resume.
        """
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.checkpoint_dir / RunLayout(self.base_dir).checkpoint(step).name
        state = {
            "step": step,
            "pipeline": self.pipeline.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }
        # the temporary file goes beside the run: nerfstudio parses every name in nerfstudio_models as a step
        torch_save_atomic(to_weights_only_safe(state), ckpt_path, tmp_dir=self.base_dir)
        self.last_checkpoint = ckpt_path
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("step-*.ckpt"):
                if old != ckpt_path:
                    old.unlink()
        self.pipeline.model.save_lineage(self.lineage_path)

    # ------------------------------------------------------------------ training
    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        """nerfstudio's set-up, plus the refinement as an ``AFTER_TRAIN`` callback.

        nerfstudio runs ``AFTER_TRAIN`` callbacks right after the final checkpoint and before the viewer's
        completion loop (which never returns), so the refinement runs with ``--vis viewer`` too and the
        viewer shows the refined scene as soon as training ends.
        """
        self.last_checkpoint: Optional[Path] = None
        super().setup(test_mode=test_mode)
        self.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN], self.refine_after_training))

    def train_iteration(self, step: int):  # type: ignore[override]
        """One nerfstudio iteration, then stop at once if the loss or a parameter group is not finite."""
        loss, loss_dict, metrics_dict = super().train_iteration(step)
        self._check_finite(step, loss, loss_dict)
        return loss, loss_dict, metrics_dict

    def _check_finite(self, step: int, loss: torch.Tensor, loss_dict: Dict[str, torch.Tensor]) -> None:
        groups = self.pipeline.get_param_groups()
        names = [f"loss {k}" for k in loss_dict] + list(groups)
        flags = [torch.isfinite(v.detach()).all() for v in loss_dict.values()]
        flags += [torch.stack([torch.isfinite(p.detach()).all() for p in params]).all() if params
                  else torch.ones((), dtype=torch.bool, device=loss.device) for params in groups.values()]
        ok = torch.stack([f.to(loss.device) for f in flags]).cpu()
        if bool(ok.all()):
            return
        bad = [name for name, good in zip(names, ok.tolist()) if not good]
        groups_bad = [name for name in bad if not name.startswith("loss ")]
        lr_flag = f"--optimizers.{groups_bad[0]}.optimizer.lr" if groups_bad else "--optimizers.<group>.optimizer.lr"
        last = self.last_checkpoint
        kept = (f"The last good checkpoint is {last}; resume from it with --load-dir {last.parent}"
                if last is not None else "No checkpoint was written before it")
        exit_with_message(
            f"ns-train gaussianvae: training diverged at step {step}: {', '.join(bad)} became NaN or infinite. "
            f"Nothing was saved after it. {kept}, and lower that group's learning rate ({lr_flag}) or check the "
            "input images for broken pixels.",
            code=1,
        )

    def refine_after_training(self, step: int) -> None:
        """The ``AFTER_TRAIN`` phase: train the decoder on the lineage, select, extrapolate, write
        ``refinement.pt`` and show it (viewer and exporter)."""
        model = self.pipeline.model
        if self.stop_training or not model.config.refinement_after_training:
            return
        CONSOLE.rule("GaussianVAE refinement")
        config = RefineConfig(
            load_config=self.base_dir / CONFIG_FILE,
            stages=model.config.extrapolate_stages,
            select=model.config.extrapolate_select,
            fraction=model.config.extrapolate_fraction,
            decoder=model.config.decoder,
            decoder_steps=model.config.decoder_steps,
            finetune_steps=model.config.finetune_steps,
            compare_with_finetune_only=model.config.compare_with_finetune_only,
            retrain_decoder=True,
        )
        with self.train_lock:
            try:
                refinement, refiner = refine_pipeline(config, self.pipeline, step=getattr(model, "step", None))
            except ValueError as err:  # a refusal (RefinementUnavailable, a file error): training is kept
                CONSOLE.print(f"ns-train gaussianvae: refinement not made: {err} The trained scene is saved; refine "
                              f"it with gvae-refine --load-config {config.load_config}", style="bold yellow",
                              markup=False, highlight=False)
                return
            model.show_refinement(refinement, refiner)
            model.refinement_controls.sync()
        if self.viewer_state is not None and hasattr(self.viewer_state, "_trigger_rerender"):
            self.viewer_state._trigger_rerender()  # nerfstudio's own re-render of every client
        CONSOLE.print(f"[bold green]Refined scene: {refinement.describe()}")
