"""Trained run + GaussianVAE -> refined Gaussians, stored beside the run (``gvae-refine``).

The refinement file ``<run>/refinement.pt`` (``torch.save`` of plain tensors, ints and strings, loadable
with ``weights_only=True``; written atomically):

==================  =============================================================================
key                 value
==================  =============================================================================
``format``          ``"gvae_ns.refinement"``
``version``         :data:`REFINEMENT_VERSION`
``num_original``    rows of the trained scene the refinement was made from
``steps``           extrapolation steps past the finest stage (1..4)
``select``          ``"hessian"``, ``"grad"`` or ``"all"``
``params``          dict of splatfacto-shaped tensors (means, scales, quats, features_dc,
                    features_rest, opacities): the original rows (selected ones refined) then the
                    added Gaussians
``is_new``          bool [kept + added]: True for added Gaussians
``selected``        int64 indices of the original rows whose lineages were extrapolated
``removed``         int64 indices of original rows whose lineage ended and handed over to added
                    descendants (as a split does in densification); they are absent from ``params``.
                    A lineage that ends without descendants keeps its original Gaussian.
``scores``          dict of per-original-row float tensors (``grad2d``, ``hessian``), so that other
                    step counts / selections can be recomputed without the training images
==================  =============================================================================

The original checkpoint is never modified. :func:`refine_run` makes the file: it takes the run's lineage
(from the checkpoint's recorder state, else ``<run>/lineage.npz``), trains the VAE on its stage transitions
(or reuses ``<run>/vae.pt``), scores every Gaussian on the training views at the finest stage's resolution,
selects, extrapolates and stores the result. :class:`Refiner` holds what a new step count or selection needs,
so the viewer can switch between them in milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple, Union

import torch

REFINEMENT_FILE = "refinement.pt"
REFINEMENT_FORMAT = "gvae_ns.refinement"
REFINEMENT_VERSION = 1
PARAM_KEYS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")


VAE_FILE = "vae.pt"


class RefinementFileError(ValueError):
    """A refinement file that cannot be used; the message names the file and the problem."""


class RefinementUnavailable(ValueError):
    """The run lacks what refinement needs (lineage, stages, VAE); the message says what and why."""


@dataclass
class Refinement:
    """A refined scene: splatfacto-shaped parameters plus which rows are new."""

    params: Dict[str, torch.Tensor]
    """The refined set (originals first, then added Gaussians)."""
    is_new: torch.Tensor
    """[N] bool, True for Gaussians the VAE added."""
    selected: torch.Tensor
    """Indices of the original Gaussians whose lineages were extrapolated."""
    removed: torch.Tensor
    """Indices of original Gaussians whose lineage ended (not in ``params``)."""
    scores: Dict[str, torch.Tensor]
    """Per-original-row selection signals (``grad2d``, ``hessian``)."""
    num_original: int
    """Rows of the trained scene."""
    steps: int
    """Extrapolation steps past the finest stage."""
    select: str
    """Selection mode."""
    decoder: str = "temporal"
    """What produced it: the lineage VAE ("temporal") or the densification head ("generative")."""

    @property
    def num_added(self) -> int:
        """Gaussians added by the refinement."""
        return int(self.is_new.sum())

    def describe(self) -> str:
        """One line for logs and the viewer."""
        return (f"+{self.steps} ({self.select}, {self.decoder}): {self.num_original} original, {len(self.selected)} refined, "
                f"{len(self.removed)} ended, {self.num_added} added")


def save_refinement(refinement: Refinement, path: Union[str, Path]) -> Path:
    """Write ``refinement`` to ``path`` atomically (see the module docstring for the layout)."""
    from gvae_ns.atomic import torch_save_atomic

    path = Path(path)
    torch_save_atomic(
        {
            "format": REFINEMENT_FORMAT,
            "version": REFINEMENT_VERSION,
            "num_original": int(refinement.num_original),
            "steps": int(refinement.steps),
            "select": str(refinement.select),
            "decoder": str(refinement.decoder),
            "params": {k: refinement.params[k].detach().cpu().contiguous() for k in PARAM_KEYS},
            "is_new": refinement.is_new.detach().cpu().bool(),
            "selected": refinement.selected.detach().cpu().long(),
            "removed": refinement.removed.detach().cpu().long(),
            "scores": {k: v.detach().cpu().float() for k, v in refinement.scores.items()},
        },
        path,
    )
    return path


def load_refinement(path: Union[str, Path], num_original: int) -> Refinement:
    """Read and check a refinement file made from a scene of ``num_original`` Gaussians."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, unsafe pickle ...
        raise RefinementFileError(f"{path}: cannot be read ({type(err).__name__}: {err}).") from None
    if not isinstance(data, dict) or data.get("format") != REFINEMENT_FORMAT:
        raise RefinementFileError(f"{path}: not a gvae-ns refinement file.")
    if data.get("version") != REFINEMENT_VERSION:
        raise RefinementFileError(
            f"{path}: refinement format version {data.get('version')}, this gvae-ns reads {REFINEMENT_VERSION}; "
            "re-run gvae-refine."
        )
    if data.get("num_original") != num_original:
        raise RefinementFileError(
            f"{path}: made from a scene of {data.get('num_original')} Gaussians, but the checkpoint has "
            f"{num_original}; it belongs to another checkpoint. Re-run gvae-refine."
        )
    params = data.get("params")
    if not isinstance(params, dict) or any(k not in params for k in PARAM_KEYS):
        raise RefinementFileError(f"{path}: 'params' must hold {PARAM_KEYS}.")
    n = params["means"].shape[0]
    is_new, removed = data.get("is_new"), data.get("removed")
    if not isinstance(removed, torch.Tensor) or removed.ndim != 1:
        raise RefinementFileError(f"{path}: 'removed' must be a 1-D index tensor.")
    if not isinstance(is_new, torch.Tensor) or is_new.shape != (n,):
        raise RefinementFileError(f"{path}: 'is_new' does not match the {n} refined Gaussians.")
    if n - int(is_new.sum()) != num_original - removed.numel():
        raise RefinementFileError(f"{path}: kept + removed rows do not add up to the {num_original} originals.")
    for k in PARAM_KEYS:
        if params[k].shape[0] != n or not torch.isfinite(params[k]).all():
            raise RefinementFileError(f"{path}: '{k}' has the wrong row count or non-finite values.")
    scores = data.get("scores") or {}
    if any(v.shape != (num_original,) for v in scores.values()):
        raise RefinementFileError(f"{path}: 'scores' do not have one value per original Gaussian.")
    return Refinement(params=params, is_new=is_new.bool(), selected=data.get("selected", removed[:0]),
                      removed=removed, scores=scores, num_original=num_original, steps=int(data["steps"]),
                      select=str(data["select"]), decoder=str(data.get("decoder", "temporal")))


# --------------------------------------------------------------------------------------------- refinement
@dataclass
class RefineConfig:
    """Refine a trained gaussianvae run (``gvae-refine``)."""

    load_config: Path
    """The run's config.yml (as for ns-viewer / ns-export)."""
    steps: int = 1
    """Extrapolation steps past the finest trained stage (1..4); each is one resolution doubling."""
    select: Literal["hessian", "grad", "all"] = "hessian"
    """Which lineages to extrapolate: Hessian-guided score, view-space gradient only, or the whole scene."""
    fraction: float = 0.1
    """Fraction of Gaussians selected by 'hessian' / 'grad'."""
    output: Optional[Path] = None
    """Where to write the refinement (default: <run>/refinement.pt, which ns-viewer and ns-export load)."""
    retrain_vae: bool = False
    """Train the VAE again even if <run>/vae.pt exists."""
    vae_steps: int = 1500
    """VAE optimiser steps when it is trained."""
    max_new_ratio: float = 1.0
    """Cap on added Gaussians, as a multiple of the selected count."""
    score_views: int = 0
    """Training views used for the selection scores (0 = all)."""
    seed: int = 0
    """Seed for VAE training and the latent draws."""
    decoder: Literal["temporal", "generative"] = "temporal"
    """temporal: the lineage VAE's child slots; generative: the serialized-attention densification head
    (Generative Densification)"""


def _sh_rest_coeffs(model) -> int:
    return int(model.gauss_params["features_rest"].shape[1])


def _current_lineage(model):
    """The run's lineage with a final snapshot of the model's current Gaussians."""
    recorder = model.recorder
    if recorder.num_snapshots == 0:
        raise RefinementUnavailable(
            "the run has no lineage snapshots: it was not trained with ns-train gaussianvae, or it stopped "
            "before the first stage ended."
        )
    stage = model.schedule.num_stages - 1
    recorder.snapshot(model.gauss_params, model.strategy_state, stage, int(model.step))
    lineage = recorder.to_lineage()
    if lineage.num_snapshots < 2:
        raise RefinementUnavailable(
            "the lineage has one stage only, so there is no stage-to-stage transition to learn; train with at "
            "least two --pipeline.model.stage-downscales."
        )
    return lineage


def score_gaussians(model, datamanager, views: int = 0) -> Dict[str, torch.Tensor]:
    """Per-Gaussian selection signals from the training views at the finest stage's resolution.

    ``grad2d``: mean norm of the view-space (pixel) position gradient over views where the Gaussian is
    visible, as the densification strategy measures it. ``hessian``: diagonal Gauss-Newton estimate of the
    photometric loss w.r.t. the 3D position, ``sum_v (dL_v/dmean)^2``.
    """
    from nerfstudio.models.splatfacto import resize_image

    from gvae_ns.render import rasterize, world_to_camera

    params = {k: model.gauss_params[k].detach() for k in PARAM_KEYS}
    n = params["means"].shape[0]
    device = params["means"].device
    grad_sum = torch.zeros(n, device=device)
    vis_count = torch.zeros(n, device=device)
    hessian = torch.zeros(n, device=device)
    cameras = datamanager.train_dataset.cameras
    images = datamanager.cached_train
    d = int(model.schedule.downscales[-1])
    indices = range(len(images)) if views <= 0 else torch.linspace(0, len(images) - 1, views).long().tolist()
    background = model._get_background_color()
    sh_degree = model.config.sh_degree if model.config.sh_degree > 0 else None
    for i in indices:
        camera = cameras[i : i + 1].to(device)
        camera.rescale_output_resolution(1 / d)
        W, H = int(camera.width.item()), int(camera.height.item())
        means = params["means"].clone().requires_grad_(True)
        colors = torch.cat([params["features_dc"][:, None], params["features_rest"]], dim=1)
        if sh_degree is None:
            colors = torch.sigmoid(colors).squeeze(1)
        render, alpha, info = rasterize(
            means=means, quats=params["quats"], scales=torch.exp(params["scales"]),
            opacities=torch.sigmoid(params["opacities"]).squeeze(-1), colors=colors,
            viewmats=world_to_camera(camera.camera_to_worlds).to(device), Ks=camera.get_intrinsics_matrices().to(device),
            width=W, height=H, packed=False, sh_degree=sh_degree, rasterize_mode=model.config.rasterize_mode,
        )
        info["means2d"].retain_grad()
        rgb = torch.clamp(render[0, ..., :3] + (1 - alpha[0]) * background, 0.0, 1.0)
        image = images[i]["image"].to(device)
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        gt = model.composite_with_background(resize_image(image, d) if d > 1 else image, background)
        loss = torch.abs(gt[..., :3] - rgb).mean()
        loss.backward()
        g2d = info["means2d"].grad[0] * torch.tensor([W / 2.0, H / 2.0], device=device)
        visible = info["radii"][0] > 0
        if visible.dim() > 1:
            visible = visible.all(dim=-1)
        grad_sum += torch.where(visible, g2d.norm(dim=-1), torch.zeros_like(grad_sum))
        vis_count += visible.float()
        hessian += means.grad.pow(2).sum(dim=-1)
    return {"grad2d": (grad_sum / vis_count.clamp_min(1)).cpu(), "hessian": hessian.cpu()}


class Refiner:
    """What refinement needs once the VAE is trained: +k / selection changes cost one extrapolation."""

    def __init__(self, model, vae, scores: Dict[str, torch.Tensor], lineage=None, fraction: float = 0.1,
                 max_new_ratio: float = 1.0, seed: int = 0, decoder: str = "temporal") -> None:
        """``vae``: the trained decoder, a GaussianVAE (``decoder="temporal"``) or a DensifyHead ("generative")."""
        from gvae_ns.gaussians import pack_state
        from gvae_ns.lineage.dataset import final_histories

        history, mask, ids = final_histories(lineage if lineage is not None else _current_lineage(model))
        live = model.recorder.live_ids
        if live is None or live.numel() != ids.numel() or not torch.equal(live.cpu(), ids.cpu()):
            raise RefinementUnavailable(
                "the lineage's final snapshot does not match the checkpoint's Gaussians; re-run gvae-refine "
                "on the checkpoint the lineage was recorded with."
            )
        self.model = model
        self.vae = vae
        self.history, self.history_mask = history, mask
        self.states = pack_state({k: model.gauss_params[k].detach() for k in PARAM_KEYS}).cpu()
        self.scores = scores
        self.fraction = fraction
        self.max_new_ratio = max_new_ratio
        self.seed = seed
        if decoder not in ("temporal", "generative"):
            raise ValueError(f"Refiner: decoder must be 'temporal' or 'generative', got {decoder!r}")
        self.decoder = decoder
        self._cache: Dict[Tuple[int, str], Refinement] = {}

    def refine(self, steps: int, select: str) -> Refinement:
        """Extrapolate the selected lineages ``steps`` stages; cached per (steps, select)."""
        from gvae_ns.gaussians import unpack_state
        from gvae_ns.select import combine_scores, select_top
        from gvae_ns.vae.extrapolate import extrapolate

        if not 1 <= steps <= 4:
            raise ValueError(f"refine: steps must be in 1..4, got {steps}")
        key = (int(steps), str(select))
        if key in self._cache:
            return self._cache[key]
        score = combine_scores(self.scores.get("grad2d"), self.scores.get("hessian"), mode=select)
        chosen = select_top(score) if select == "all" else select_top(score, fraction=self.fraction)
        device = next(self.vae.parameters()).device
        max_new = int(round(self.max_new_ratio * len(chosen)))
        states = self.states.clone()
        keep = torch.ones(states.shape[0], dtype=torch.bool)
        if self.decoder == "generative":
            from gvae_ns.vae.densify_train import densify

            added, source = densify(self.vae, states[chosen].to(device), steps=steps, max_new=max_new)
            keep[chosen[source.unique().cpu()]] = False
        else:
            result = extrapolate(
                self.vae, self.history[chosen].to(device), self.history_mask[chosen].to(device), steps=steps,
                max_new=max_new, seed=self.seed,
            )
            states[chosen] = result.refined.cpu()
            # A lineage that ended hands over to its added descendants (as a split does); one that ended with
            # none keeps its Gaussian: refinement adds detail, it never deletes the trained scene's coverage.
            has_descendants = torch.zeros(len(chosen), dtype=torch.bool)
            has_descendants[result.added_source.cpu()] = True
            keep[chosen[~result.alive.cpu() & has_descendants]] = False
            added = result.added
        all_states = torch.cat([states[keep], added.cpu()], dim=0)
        is_new = torch.zeros(all_states.shape[0], dtype=torch.bool)
        is_new[int(keep.sum()):] = True
        params = unpack_state(all_states, _sh_rest_coeffs(self.model))
        params = {k: v.contiguous() for k, v in params.items()}
        refinement = Refinement(params=params, is_new=is_new, selected=chosen, removed=(~keep).nonzero().flatten(),
                                scores=self.scores, num_original=states.shape[0], steps=int(steps), select=select,
                                decoder=self.decoder)
        self._cache[key] = refinement
        return refinement


def _run_dir(config: RefineConfig) -> Path:
    return Path(config.load_config).parent


def build_refiner(config: RefineConfig, pipeline) -> Refiner:
    """Train (or load) the VAE for the run behind ``pipeline`` and score its Gaussians."""
    from gvae_ns.lineage.dataset import build_transitions
    from gvae_ns.vae.model import load_vae, save_vae
    from gvae_ns.vae.train import VAETrainConfig, train_vae

    model = pipeline.model
    lineage = _current_lineage(model)
    vae_path = _run_dir(config) / VAE_FILE
    device = model.device
    started = time.perf_counter()
    if config.decoder == "generative":
        from gvae_ns.vae.densify_train import DensifyTrainConfig, densify_head_for_run

        vae = densify_head_for_run(_run_dir(config), lineage, DensifyTrainConfig(steps=config.vae_steps),
                                   retrain=config.retrain_vae, device=device, seed=config.seed)
    elif vae_path.exists() and not config.retrain_vae:
        vae = load_vae(vae_path, map_location=device)
        print(f"gvae-refine: using the VAE in {vae_path}")
    else:
        vae_config = VAETrainConfig(steps=config.vae_steps)
        transitions = build_transitions(lineage, max_children=vae_config.model.max_children)
        vae, log = train_vae(transitions, vae_config, device=device, seed=config.seed)
        save_vae(vae, vae_path)
        print(f"gvae-refine: trained the VAE on {log.get('transitions')} transitions in "
              f"{time.perf_counter() - started:.1f} s -> {vae_path}")
    started = time.perf_counter()
    scores = score_gaussians(model, pipeline.datamanager, views=config.score_views)
    print(f"gvae-refine: scored {scores['grad2d'].numel()} Gaussians in {time.perf_counter() - started:.1f} s")
    return Refiner(model, vae, scores, lineage=lineage, fraction=config.fraction, max_new_ratio=config.max_new_ratio,
                   seed=config.seed, decoder=config.decoder)


def load_refiner(model, scores: Optional[Dict[str, torch.Tensor]], decoder: str = "temporal") -> Refiner:
    """A :class:`Refiner` for a loaded run from its saved decoder (``vae.pt`` / ``densify_head.pt``) and scores."""
    from gvae_ns.vae.densify_train import DENSIFY_HEAD_FILE, load_densify_head
    from gvae_ns.vae.model import load_vae

    name, loader = (DENSIFY_HEAD_FILE, load_densify_head) if decoder == "generative" else (VAE_FILE, load_vae)
    run_dir = model.config.run_dir
    if run_dir is None or not (Path(run_dir) / name).is_file():
        raise RefinementUnavailable(f"no trained decoder ({name}) beside the run: run gvae-refine first.")
    if not scores:
        raise RefinementUnavailable(f"no selection scores: run gvae-refine to write {REFINEMENT_FILE}.")
    try:
        net = loader(Path(run_dir) / name, map_location=model.device)
    except (OSError, ValueError) as err:
        raise RefinementUnavailable(str(err)) from None
    return Refiner(model, net, scores, fraction=model.config.refine_fraction, decoder=decoder)


def refine_run(config: RefineConfig, pipeline=None) -> Refinement:
    """Refine a trained run and write the refinement file; returns the refinement.

    ``pipeline``: an already-loaded pipeline (ns-train's, after training); else the run is loaded from
    ``config.load_config``.
    """
    if not 1 <= config.steps <= 4:
        raise ValueError(f"--steps must be in 1..4, got {config.steps}")
    if not 0.0 < config.fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {config.fraction}")
    if pipeline is None:
        from nerfstudio.utils.eval_utils import eval_setup

        if not Path(config.load_config).is_file():
            raise RefinementUnavailable(f"{config.load_config} does not exist: pass the run's config.yml.")
        _, pipeline, _, _ = eval_setup(Path(config.load_config), test_mode="val")
    model = pipeline.model
    if not hasattr(model, "recorder"):
        raise RefinementUnavailable(
            f"{config.load_config} is a {type(model).__name__} run; refinement needs a run trained with "
            "ns-train gaussianvae (it records the lineage)."
        )
    was_training = model.training
    model.eval()
    try:
        refiner = build_refiner(config, pipeline)
        started = time.perf_counter()
        refinement = refiner.refine(config.steps, config.select)
        elapsed = time.perf_counter() - started
    finally:
        model.train(was_training)
    output = Path(config.output) if config.output is not None else _run_dir(config) / REFINEMENT_FILE
    save_refinement(refinement, output)
    model.refiner = refiner
    model.attach_refinement(refinement)
    print(f"gvae-refine: {refinement.describe()} in {elapsed * 1000:.0f} ms -> {output}")
    return refinement


def main() -> None:
    """Console entry point ``gvae-refine``."""
    import tyro

    config = tyro.cli(RefineConfig)
    try:
        refine_run(config)
    except (RefinementUnavailable, RefinementFileError, ValueError) as err:
        raise SystemExit(f"gvae-refine: {err}") from None
