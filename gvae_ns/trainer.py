"""The nerfstudio trainer for gaussianvae: input checks, safe checkpoints, lineage file, refinement phase.

It changes four things in nerfstudio's ``Trainer``, all at its existing seams:

* ``save_config`` (called by ``ns-train`` before anything trains) first checks the data directory, the stage
  schedule and the device, and stops with a one-paragraph message naming the field and the fix;
* checkpoints are written atomically and without numpy objects, so PyTorch >= 2.6 loads them with its
  default ``weights_only=True`` (stock ``ns-viewer`` / ``ns-export`` / ``ns-eval`` need no flags);
* each checkpoint save also writes the run's lineage file (``<run>/lineage.npz``); the checkpoint itself
  carries the recorder's state, so resuming continues the same lineage;
* after the last step, the VAE is trained on the lineage and the scene refined (``refine_after_training``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Type

import torch
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from gvae_ns.atomic import torch_save_atomic
from gvae_ns.offline import to_weights_only_safe
from gvae_ns.stages import StageSchedule, StageScheduleError

LINEAGE_FILE = "lineage.npz"


class RunConfigError(ValueError):
    """A gaussianvae run that cannot start; the message names the field and the fix."""


@dataclass
class GaussianVAETrainerConfig(TrainerConfig):
    """nerfstudio's trainer config, with the checks and phases gaussianvae needs."""

    _target: Type = field(default_factory=lambda: GaussianVAETrainer)

    def save_config(self) -> None:
        """Check the run before anything trains, record the run directory, then save ``config.yml``."""
        try:
            check_run_config(self)
        except (RunConfigError, StageScheduleError) as err:
            raise SystemExit(f"ns-train gaussianvae: {err}") from None
        self.pipeline.model.run_dir = self.get_base_dir()
        super().save_config()


def _data_dir(config: TrainerConfig) -> Optional[Path]:
    dm = config.pipeline.datamanager
    data = getattr(dm, "data", None) or getattr(dm.dataparser, "data", None)
    return None if data is None else Path(data)


def check_run_config(config: TrainerConfig) -> None:
    """Raise :class:`RunConfigError` / ``StageScheduleError`` for a run that cannot train."""
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
    _check_data_files(config, data, schedule)


def _check_data_files(config: TrainerConfig, data: Path, schedule: StageSchedule) -> None:
    parser = type(config.pipeline.datamanager.dataparser).__name__
    if parser == "BlenderDataParserConfig":
        names = ["transforms_train.json", "transforms_val.json", "transforms_test.json"]
    elif parser == "NerfstudioDataParserConfig":
        names = [data.name] if data.suffix == ".json" else ["transforms.json"]
        data = data.parent if data.suffix == ".json" else data
    else:
        return
    for name in names:
        path = data / name
        if not path.is_file():
            hint = " (Blender-format data wants transforms_{train,val,test}.json)" if "train" in name else ""
            raise RunConfigError(f"{path} is missing{hint}. Point --data at a dataset directory, or pick the "
                                 "matching dataparser subcommand (blender-data, nerfstudio-data, colmap).")
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunConfigError(f"{path} is not valid JSON ({err}); regenerate or fix the file.") from None
        frames = meta.get("frames") if isinstance(meta, dict) else None
        if not frames:
            raise RunConfigError(f"{path} has no 'frames' list: it is not a camera transforms file.")
        if parser == "BlenderDataParserConfig" and "train" in name:
            _check_blender_image_size(path, data, frames[0], schedule)


def _check_blender_image_size(path: Path, data: Path, frame: dict, schedule: StageSchedule) -> None:
    from PIL import Image

    image = data / f"{frame.get('file_path', '')}.png"
    if not image.is_file():
        raise RunConfigError(f"{path}: first frame's image {image} does not exist; the dataset is incomplete.")
    with Image.open(image) as im:
        width, height = im.size
    schedule.check_image_size(width, height, str(image))


class GaussianVAETrainer(Trainer):
    """nerfstudio's Trainer with weights-only-safe checkpoints, a lineage file and a refinement phase."""

    config: GaussianVAETrainerConfig

    @property
    def lineage_path(self) -> Path:
        """Where this run's lineage file lives (beside config.yml, not among the checkpoints)."""
        return self.base_dir / LINEAGE_FILE

    def _load_checkpoint(self) -> None:
        """nerfstudio's resume, then point the optimizers at the parameters the checkpoint resized.

        splatfacto replaces its Gaussian parameters when it loads a checkpoint with another count, but the
        optimizers were built for the old ones; gsplat's densification reads the optimizer's parameter, so
        without this a resumed run fails at its first refinement.
        """
        super()._load_checkpoint()
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

    def save_checkpoint(self, step: int) -> None:
        """Write ``step-*.ckpt`` atomically, weights-only loadable, and the lineage file beside the run."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        state = {
            "step": step,
            "pipeline": self.pipeline.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }
        # the temporary file goes beside the run: nerfstudio parses every name in nerfstudio_models as a step
        torch_save_atomic(to_weights_only_safe(state), ckpt_path, tmp_dir=self.base_dir)
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("step-*.ckpt"):
                if old != ckpt_path:
                    old.unlink()
        self.pipeline.model.save_lineage(self.lineage_path)

    def train(self) -> None:
        """Train through the stages, then (by default) train the VAE and refine."""
        super().train()
        model = self.pipeline.model
        if self.stop_training or not model.config.refine_after_training:
            return
        from gvae_ns.refine import RefineConfig, refine_run

        CONSOLE.rule("GaussianVAE refinement")
        refine_run(
            RefineConfig(
                load_config=self.base_dir / "config.yml",
                steps=model.config.refine_steps,
                select=model.config.refine_select,
                fraction=model.config.refine_fraction,
                vae_steps=model.config.refine_vae_steps,
                retrain_vae=True,
            ),
            pipeline=self.pipeline,
        )
