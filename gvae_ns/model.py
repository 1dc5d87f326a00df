"""GaussianVAEModel: splatfacto trained through resolution stages, with lineage and refinement.

What it changes in ``SplatfactoModel``:

* the training resolution follows :class:`~gvae_ns.stages.StageSchedule` (by default 1/4, 1/2, then the
  images' own resolution), and the view-space gradient statistics restart at each stage switch;
* rendering goes through :func:`gvae_ns.render.rasterize` (gsplat on CUDA, the compiled CPU rasterizer or its
  PyTorch reference on CPU) and every tensor follows the model's device, so the whole method runs on CPU;
* LPIPS is built only where its weights are already on disk (no downloads);
* densification runs through :class:`~gvae_ns.lineage.recorder.LineageStrategy`, which records every
  Gaussian's ancestry and snapshots all Gaussians at each stage end;
* when it is given a refinement (:meth:`show_refinement`, or ``<run>/refinement.pt`` when a checkpoint is
  loaded) and showing it is on, the parameter properties (``means``, ``scales``, ``quats``, ``opacities``,
  ``features_dc``, ``features_rest`` and the derived ``colors``, ``shs_0``, ``shs_rest``) return the refined
  set, so nerfstudio's viewer and exporter see it. The model never makes a refinement: it hands its trained
  state out as plain data (:meth:`run_state`, :meth:`scoring_views`) to :mod:`gvae_ns.refine`;
* with ``mip_filter_3d``, renders and those properties carry Mip-Splatting's 3D filter (:meth:`shown_params`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type, Union

import torch
import tyro
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import (
    TrainingCallback,
    TrainingCallbackAttributes,
    TrainingCallbackLocation,
)
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig
from nerfstudio.utils.rich_utils import CONSOLE

from gvae_ns.gaussians import PARAM_KEYS
from gvae_ns.lineage.recorder import LineageStrategy
from gvae_ns.offline import lpips_only_offline
from gvae_ns.ply import use_fast_ply_writer
from gvae_ns.refine.refiner import Refiner, RunState
from gvae_ns.refine.result import (
    Refinement,
    RefinementFileError,
    load_refinement,
    provenance_of,
    rebuild_hint,
)
from gvae_ns.refine.score import ScoringViews
from gvae_ns.render import SmoothingFilter3D, rasterize, world_to_camera
from gvae_ns.run_layout import REFINEMENT_FILE, RunLayout
from gvae_ns.stages import DEFAULT_STAGE_STEPS, StageSchedule
from gvae_ns.tagged_file import Provenance
from gvae_ns.viewer import RefinementControls, refined_env_off, tint_new


@dataclass
class GaussianVAEModelConfig(SplatfactoModelConfig):
    """Splatfacto trained through resolution stages, with lineage logging and GaussianVAE refinement."""

    _target: Type = field(default_factory=lambda: GaussianVAEModel)
    stage_downscales: Tuple[int, ...] = (4, 2, 1)
    """Image downscale factor of each stage, coarse to fine, ending at the data's own resolution (1); refinement
    extrapolates past it. Keep the coarsest stage at 32 px or more on the short side."""
    stage_steps: Tuple[int, ...] = DEFAULT_STAGE_STEPS
    """Training steps of each resolution stage (one entry per stage; the finest should get most of them).
    Densification, the learning-rate decay and opacity resets follow their total (gvae_ns/step_budget.py)."""
    rasterize_mode: Literal["classic", "antialiased"] = "antialiased"
    """Antialiased by default: classic rendering erodes thin structure rendered finer than it was trained."""
    lineage_float16: bool = False
    """Store the per-stage snapshots in the lineage file as float16 (half the size)."""
    refinement_after_training: bool = True
    """Fit the decoder on the lineage and refine the scene as the last phase of ns-train."""
    extrapolate_stages: int = 1
    """Extrapolation stages past the finest trained stage (1..4) after training, one resolution doubling each."""
    extrapolate_select: Literal["hessian", "grad", "all"] = "hessian"
    """Which lineages to extrapolate: top Hessian / view-space-gradient score, gradient only, or all."""
    extrapolate_fraction: float = 0.1
    """Fraction of Gaussians the selection keeps (ignored for 'all')."""
    decoder: Literal["temporal", "generative", "prior", "prior-tuned", "split", "none"] = "temporal"
    """Decoder of the refinement after training, as gvae-refine --decoder (prior: the shipped cross-scene prior)."""
    decoder_steps: int = 1500
    """Optimiser steps of the decoder fitted on the lineage after training (lineage VAE, GD head, tuned prior)."""
    finetune_steps: int = 200
    """Steps of the sub-pixel fine-tune after training (0: none), kept only if the held-out loss does not rise."""
    compare_with_finetune_only: bool = True
    """Keep the fine-tune alone instead where its held-out loss is lower (as gvae-refine; doubles the fine-tune)."""
    show_refined: bool = True
    """Whether the viewer and exporter see the refined Gaussians (GVAE_REFINED=0 overrides it, e.g. for ns-export)."""
    mip_filter_3d: bool = False
    """Mip-Splatting's 3D smoothing filter: each Gaussian gets at least the footprint the training views sample
    (gvae_ns/render/filter3d.py); renders, ns-export and the viewer see the filtered scales and opacities."""
    run_dir: tyro.conf.Suppress[Optional[Path]] = None
    """Set by ns-train (not a flag): the run directory that holds lineage.npz, vae.pt and refinement.pt."""
    refine_after_training: Optional[bool] = None
    """Deprecated name of --pipeline.model.refinement-after-training (kept for one release)."""
    refine_steps: Optional[int] = None
    """Deprecated name of --pipeline.model.extrapolate-stages (kept for one release)."""
    refine_select: Optional[Literal["hessian", "grad", "all"]] = None
    """Deprecated name of --pipeline.model.extrapolate-select (kept for one release)."""
    refine_fraction: Optional[float] = None
    """Deprecated name of --pipeline.model.extrapolate-fraction (kept for one release)."""
    refine_vae_steps: Optional[int] = None
    """Deprecated name of --pipeline.model.decoder-steps (kept for one release)."""

    def __post_init__(self) -> None:
        for old, new in DEPRECATED_FIELDS.items():
            value = getattr(self, old)
            if value is not None:
                CONSOLE.print(f"--pipeline.model.{old.replace('_', '-')} is deprecated, use "
                              f"--pipeline.model.{new.replace('_', '-')} (the old name goes in the next release).",
                              style="yellow", markup=False, soft_wrap=True, highlight=False)
                setattr(self, new, value)
                setattr(self, old, None)


DEPRECATED_FIELDS = {"refine_after_training": "refinement_after_training", "refine_steps": "extrapolate_stages",
                     "refine_select": "extrapolate_select", "refine_fraction": "extrapolate_fraction",
                     "refine_vae_steps": "decoder_steps"}
"""Old config field -> new name: old flags are mapped; an old config.yml keeps fields nothing reads."""


class GaussianVAEModel(SplatfactoModel):
    """Splatfacto through resolution stages; see the module docstring."""

    config: GaussianVAEModelConfig

    # ------------------------------------------------------------------ set-up
    def populate_modules(self) -> None:
        self.schedule = StageSchedule(tuple(self.config.stage_downscales), tuple(self.config.stage_steps))
        seed = self.seed_points
        seed_colors = None
        if seed is not None and not self.config.random_init and seed[1].shape[0] > 0:
            # splatfacto moves seed colours to CUDA; take the colour-less path and fill them in here.
            seed_colors = seed[1]
            self.seed_points = (seed[0], seed[1][:0])
        with lpips_only_offline():
            super().populate_modules()
        self.seed_points = seed
        if seed_colors is not None:
            with torch.no_grad():
                rgb = seed_colors.float() / 255.0
                if self.config.sh_degree > 0:
                    self.gauss_params["features_dc"].data = RGB2SH(rgb)
                else:
                    self.gauss_params["features_dc"].data = torch.logit(rgb, eps=1e-10)
        self.strategy = LineageStrategy.from_default(self.strategy)
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)
        self.recorder.stage_downscales = tuple(int(d) for d in self.schedule.downscales)
        self.recorder.stage_boundaries = tuple(self.schedule.boundaries[1:-1])
        if self.config.lineage_float16:
            self.recorder.snapshot_dtype = torch.float16
        use_fast_ply_writer()
        self.refinement: Optional[Dict[str, torch.Tensor]] = None
        self.refined_is_new: Optional[torch.Tensor] = None
        self.refinement_note = "no refinement yet: it is made after training, or by gvae-refine"
        self.refinement_record: Optional[Refinement] = None  # the Refinement shown (how it was made)
        self.refinement_file_error: Optional[str] = None
        self.tint_new = False
        self.refinement_controls = RefinementControls(self)
        self.filter3d = SmoothingFilter3D()

    @property
    def recorder(self):
        """The lineage recorder owned by the densification strategy."""
        return self.strategy.recorder

    # ------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> Dict[str, Any]:
        """Checkpointed with the parameters: the lineage so far, the 3D filter's state (tensors and ints only)."""
        return {"lineage": self.recorder.state_dict(), "filter3d": self.filter3d.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and "lineage" in state:
            self.recorder.load_state_dict(state["lineage"])
        self.filter3d.load_state_dict(state.get("filter3d", {}) if isinstance(state, dict) else {})  # {}: no filter

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        result = super().load_state_dict(state_dict, **kwargs)
        self.load_refinement_file()
        return result

    def save_lineage(self, path: Path) -> None:
        """Write the run's lineage file (atomically)."""
        self.recorder.save(path, float16=self.config.lineage_float16)

    def load_refinement_file(self) -> None:
        """Show ``<run_dir>/refinement.pt`` if it exists and was made from this checkpoint.

        A file made from another checkpoint, config or run, or a damaged one (unreadable, foreign, of another
        version, malformed), is refused: the one-paragraph reason is printed, kept in
        ``refinement_file_error`` and shown as the viewer's status, and the original scene is shown."""
        self.refinement_file_error = None
        if self.config.run_dir is None:
            return
        path = RunLayout(Path(self.config.run_dir)).refinement
        if not path.exists():
            return
        try:
            refined = load_refinement(path, num_original=self.gauss_params["means"].shape[0],
                                      expected=self.provenance(),
                                      rebuild=rebuild_hint(self.config.run_dir, REFINEMENT_FILE))
        except (RefinementFileError, OSError) as err:
            self.refinement_file_error = str(err)
            self.show_refinement(None, note=f"refinement off: {err}")
            CONSOLE.print(f"{err} The original scene is shown.", style="bold yellow", soft_wrap=True, markup=False,
                          highlight=False)
            return
        self.show_refinement(refined)

    def show_refinement(self, refined: Optional[Refinement], refiner: Optional[Refiner] = None,
                        note: Optional[str] = None) -> None:
        """Show a :class:`~gvae_ns.refine.result.Refinement` (``None``: the trained scene) and keep it as the
        record of how it was made; ``refiner`` (the one that made it) goes to the viewer's controls, so they can
        recompute other stage counts / selections at once."""
        if refined is None:
            self.set_refinement(None, note=note or "showing the trained scene")
            self.refinement_record = None
        else:
            self.set_refinement(refined.params, refined.is_new, note=note or refined.describe())
            self.refinement_record = refined
            self.refinement_file_error = None
        if refiner is not None:
            self.refinement_controls.use_refiner(refiner)

    # ------------------------------------------------------------ plain data for gvae_ns.refine
    def provenance(self, step: Optional[int] = None) -> Provenance:
        """The run state of the trained Gaussians that files beside the run are tied to."""
        return provenance_of(self.gauss_params, self.recorder.live_ids, self.config, step)

    def run_state(self, step: Optional[int] = None) -> RunState:
        """The trained run as plain data for :mod:`gvae_ns.refine` (``step``: the checkpoint step, where known).

        Its lineage ends with a snapshot of the current Gaussians as the finest stage (the recorder keeps its
        own snapshots as they are)."""
        lineage = None
        if self.recorder.num_snapshots:
            lineage = self.recorder.lineage_with_snapshot(self.gauss_params, self.strategy_state,
                                                          self.schedule.num_stages - 1, int(self.step))
        params = {k: self.gauss_params[k].detach() for k in PARAM_KEYS}
        run_dir = None if self.config.run_dir is None else Path(self.config.run_dir)
        return RunState(params=params, lineage=lineage, live_ids=self.recorder.live_ids,
                        provenance=self.provenance(step), run_dir=run_dir, device=self.device)

    def scoring_views(self, cameras: Cameras, images: List[torch.Tensor]) -> ScoringViews:
        """The training views (``cameras``, ``images``) as selection scoring renders them: at the finest
        stage's resolution, on the evaluation background, with the trained SH degree and rasterize mode."""
        if self.config.background_color == "white":
            background = torch.ones(3, device=self.device)
        elif self.config.background_color == "black":
            background = torch.zeros(3, device=self.device)
        else:  # "random" trains on random backgrounds and evaluates on the configured colour
            background = self.background_color.to(self.device)
        sh_degree = self.config.sh_degree if self.config.sh_degree > 0 else None
        return ScoringViews(cameras=cameras, images=images, downscale=int(self.schedule.downscales[-1]),
                            background=background, sh_degree=sh_degree, rasterize_mode=self.config.rasterize_mode,
                            filter3d=self.filter3d if self.config.mip_filter_3d else None)

    # ------------------------------------------------------------ stage schedule
    @property
    def stage(self) -> int:
        """Resolution stage of the current training step."""
        return self.schedule.stage_at(self.step)

    def _get_downscale_factor(self) -> int:
        if self.training:
            return self.schedule.downscale_at(self.step)
        return 1

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        cbs = super().get_training_callbacks(training_callback_attributes)
        cbs.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.after_step))
        if self.config.mip_filter_3d:  # the filter's rates follow each densification at once (checkpoints hold them)
            self.filter3d.use_cameras(training_callback_attributes.pipeline.datamanager.train_dataset.cameras)
            cbs.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
                                        lambda step: self.shown_params()))
        return cbs

    def step_cb(self, optimizers, step):  # type: ignore[override]
        super().step_cb(optimizers, step)
        self.recorder.stage = self.schedule.stage_at(step)

    def after_step(self, step: int) -> None:
        """Snapshot every Gaussian at the last step of each stage, then restart the view-space gradient
        statistics (the next stage's gradients, at another resolution, are not comparable)."""
        if self.schedule.is_stage_end(step):
            self.snapshot_stage(step)
            for key in ("grad2d", "count", "radii"):
                if self.strategy_state.get(key) is not None:
                    self.strategy_state[key].zero_()

    @torch.no_grad()
    def snapshot_stage(self, step: int) -> None:
        """Record all live Gaussians and their gradient statistics as the snapshot of the current stage."""
        self.recorder.snapshot(self.gauss_params, self.strategy_state, self.schedule.stage_at(step), step)

    # ------------------------------------------------------------- refinement
    def set_refinement(self, params: Optional[Dict[str, torch.Tensor]], is_new: Optional[torch.Tensor] = None,
                       note: str = "") -> None:
        """Attach a refined Gaussian set (full scene, splatfacto parameter names), or detach with ``None``."""
        if params is None:
            self.refinement, self.refined_is_new = None, None
            self.refinement_note = note or "refinement detached"
            return
        missing = [k for k in PARAM_KEYS if k not in params]
        if missing:
            raise ValueError(f"refined Gaussians lack {missing}; expected all of {PARAM_KEYS}")
        n = params["means"].shape[0]
        for k in PARAM_KEYS:
            if params[k].shape[0] != n:
                raise ValueError(f"refined '{k}' has {params[k].shape[0]} rows, 'means' has {n}")
        self.refinement = {k: params[k].detach().to(self.device) for k in PARAM_KEYS}
        self.refined_is_new = None if is_new is None else is_new.to(self.device)
        self.refinement_note, self.refinement_record = note, None  # show_refinement records how it was made

    @property
    def refinement_active(self) -> bool:
        """Whether the properties currently return the refined set."""
        wanted = self.config.show_refined and not refined_env_off()
        return self.refinement is not None and wanted and not self.training

    def _param(self, name: str) -> torch.Tensor:
        if self.refinement_active:
            return self.refinement[name]  # type: ignore[index]
        return self.gauss_params[name]

    def shown_params(self) -> Dict[str, torch.Tensor]:
        """What the model renders and its properties return: the refined or trained set, with the 3D filter baked
        into scales and opacities when ``mip_filter_3d`` is on (of the current stage in training, else the last;
        a refinement ``k`` stages past it gets the filter loosened to ``2**k`` x that sampling rate)."""
        params = {k: self._param(k) for k in PARAM_KEYS}
        if not self.config.mip_filter_3d:
            return params
        if self.refinement_active:
            k = self.refinement_record.steps if self.refinement_record is not None else 0
            return self.filter3d.bake(params, self.filter3d.downscale / 2 ** k, None)
        trained = (params["means"].shape[0], self.recorder.next_id)
        return self.filter3d.bake(params, self._get_downscale_factor() if self.training else None, trained)

    @property
    def means(self):
        return self._param("means")

    @property
    def scales(self):
        return self.shown_params()["scales"]

    @property
    def quats(self):
        return self._param("quats")

    @property
    def features_dc(self):
        return self._param("features_dc")

    @property
    def features_rest(self):
        return self._param("features_rest")

    @property
    def opacities(self):
        return self.shown_params()["opacities"]

    # --------------------------------------------------------------- rendering
    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, List]]:
        """Render one camera (splatfacto's outputs: rgb, depth, accumulation, background)."""
        if not isinstance(camera, Cameras):
            raise TypeError(f"get_outputs expects a Cameras object, got {type(camera).__name__}")
        if self.training:
            if camera.shape[0] != 1:
                raise ValueError("training renders one camera at a time")
            cam_to_world = self.camera_optimizer.apply_to_camera(camera)
        else:
            cam_to_world = camera.camera_to_worlds

        params = self.shown_params()
        if self.tint_new and self.refined_is_new is not None and self.refinement_active:
            params = tint_new(params, self.refined_is_new, self.config.sh_degree > 0)
        if self.crop_box is not None and not self.training:
            keep = self.crop_box.within(params["means"]).squeeze()
            if keep.sum() == 0:
                return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()),
                                              self.background_color)
            params = {k: v[keep] for k, v in params.items()}

        d = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / d)
        viewmat = world_to_camera(cam_to_world).to(self.device)
        K = camera.get_intrinsics_matrices().to(self.device)
        W, H = int(camera.width.item()), int(camera.height.item())
        self.last_size = (H, W)
        camera.rescale_output_resolution(d)

        if self.config.rasterize_mode not in ("antialiased", "classic"):
            raise ValueError(f"unknown rasterize_mode {self.config.rasterize_mode!r}: use classic or antialiased")
        render_mode = "RGB+ED" if (self.config.output_depth_during_training or not self.training) else "RGB"
        colors = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
        if self.config.sh_degree > 0:
            sh_degree: Optional[int] = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colors = torch.sigmoid(colors).squeeze(1)
            sh_degree = None

        render, alpha, self.info = rasterize(
            means=params["means"],
            quats=params["quats"],
            scales=torch.exp(params["scales"]),
            opacities=torch.sigmoid(params["opacities"]).squeeze(-1),
            colors=colors,
            viewmats=viewmat,
            Ks=K,
            width=W,
            height=H,
            packed=False,
            near_plane=0.01,
            far_plane=1e10,
            render_mode=render_mode,
            sh_degree=sh_degree,
            sparse_grad=False,
            absgrad=self.strategy.absgrad,
            rasterize_mode=self.config.rasterize_mode,
        )
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step,
                                            self.info)
        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        depth = None
        if render_mode == "RGB+ED":
            depth = torch.where(alpha > 0, render[..., 3:4], render[..., 3:4].detach().max()).squeeze(0)
        if not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    # ----------------------------------------------------------------- metrics
    def get_image_metrics_and_images(self, outputs, batch):
        """splatfacto's eval metrics; LPIPS only where its weights exist offline."""
        gt = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        pred = outputs["rgb"]
        gt_b = torch.moveaxis(gt, -1, 0)[None]
        pred_b = torch.moveaxis(pred, -1, 0)[None]
        metrics = {"psnr": float(self.psnr(gt_b, pred_b).item()), "ssim": float(self.ssim(gt_b, pred_b))}
        if self.lpips is not None:
            metrics["lpips"] = float(self.lpips(gt_b, pred_b))
        metrics["gaussian_count"] = float(self.num_points)
        return metrics, {"img": torch.cat([gt, pred], dim=1)}
