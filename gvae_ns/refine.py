"""Trained run + GaussianVAE -> refined Gaussians, stored beside the run (``gvae-refine``).

The refinement file ``<run>/refinement.pt`` (``torch.save`` of plain tensors, ints and strings, loadable
with ``weights_only=True``; written atomically):

==================  =============================================================================
key                 value
==================  =============================================================================
``format``          ``"gvae_ns.refinement"``
``version``         :data:`REFINEMENT_VERSION`
``provenance``      the run state it was made from (:class:`~gvae_ns.tagged_file.Provenance`: checkpoint
                    step, Gaussian count, sha256 of the lineage ids and parameters, sha256 of the config)
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

The file is read and written through :mod:`gvae_ns.tagged_file`, as are ``vae.pt`` and ``densify_head.pt``:
a file made from another checkpoint, another config or another run (or a damaged one) is refused with
one paragraph that names it, says what does not match and how to make it again; it is never reused.

The original checkpoint is never modified. :func:`refine_run` makes the file: it takes the run's lineage
(from the checkpoint's recorder state, else ``<run>/lineage.npz``), trains the VAE on its stage transitions
(or reuses ``<run>/vae.pt``), scores every Gaussian on the training views at the finest stage's resolution,
selects, extrapolates and stores the result. :class:`Refiner` holds what a new step count or selection needs,
so the viewer can switch between them in milliseconds.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple, Union

import torch

from gvae_ns.tagged_file import FileFormat, Provenance, TaggedFileError, digest_config, digest_tensors, load_tagged, save_tagged

REFINEMENT_FILE = "refinement.pt"
REFINEMENT_FORMAT = "gvae_ns.refinement"
REFINEMENT_VERSION = 2
"""Version 2 added the provenance (the run state the refinement was made from)."""
PARAM_KEYS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")
REFINEMENT_FILE_FORMAT = FileFormat(
    tag=REFINEMENT_FORMAT, version=REFINEMENT_VERSION, what="refinement",
    keys={"num_original": int, "steps": int, "select": str, "decoder": str, "params": dict,
          "is_new": torch.Tensor, "selected": torch.Tensor, "removed": torch.Tensor, "scores": dict},
    rebuild="make it again with gvae-refine --load-config <run>/config.yml",
)

VAE_FILE = "vae.pt"

RefinementFileError = TaggedFileError
"""A refinement (or decoder) file that cannot be used: the message names the file, the problem and the fix.
The same class as :class:`gvae_ns.tagged_file.TaggedFileError`, kept under this name for callers."""


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
    provenance: Optional[Provenance] = None
    """The run state it was made from (written to the file; checked when the file is loaded)."""

    @property
    def num_added(self) -> int:
        """Gaussians added by the refinement."""
        return int(self.is_new.sum())

    def describe(self) -> str:
        """One line for logs and the viewer."""
        return (f"+{self.steps} ({self.select}, {self.decoder}): {self.num_original} original, {len(self.selected)} refined, "
                f"{len(self.removed)} ended, {self.num_added} added")


def save_refinement(refinement: Refinement, path: Union[str, Path], provenance: Optional[Provenance] = None) -> Path:
    """Write ``refinement`` to ``path`` atomically (see the module docstring for the layout).

    ``provenance``: the run state it was made from (default: ``refinement.provenance``)."""
    payload = {
        "num_original": int(refinement.num_original),
        "steps": int(refinement.steps),
        "select": str(refinement.select),
        "decoder": str(refinement.decoder),
        "params": {k: refinement.params[k].detach().cpu().contiguous() for k in PARAM_KEYS},
        "is_new": refinement.is_new.detach().cpu().bool(),
        "selected": refinement.selected.detach().cpu().long(),
        "removed": refinement.removed.detach().cpu().long(),
        "scores": {k: v.detach().cpu().float() for k, v in refinement.scores.items()},
    }
    return save_tagged(path, REFINEMENT_FILE_FORMAT, payload, provenance or refinement.provenance)


def load_refinement(path: Union[str, Path], num_original: int, expected: Optional[Provenance] = None,
                    rebuild: Optional[str] = None) -> Refinement:
    """Read and check a refinement file made from a scene of ``num_original`` Gaussians.

    ``expected``: the run state it must have been made from (:func:`run_provenance`; ``None``: only the
    count is checked); ``rebuild``: the fix error messages give. Raises :class:`RefinementFileError` for a
    file that is unreadable, foreign, of another version, malformed (missing keys, wrong shapes or dtypes,
    NaN) or made from another run state, and ``FileNotFoundError`` for a missing one."""
    path = Path(path)
    loaded = load_tagged(path, REFINEMENT_FILE_FORMAT, expected=expected, rebuild=rebuild)
    data = loaded.payload
    if data["num_original"] != num_original:
        raise RefinementFileError(
            f"{path}: made from a scene of {data['num_original']} Gaussians, but the checkpoint has "
            f"{num_original}; it belongs to another checkpoint. {loaded.rebuild[0].upper()}{loaded.rebuild[1:]}."
        )
    with loaded.checking():
        params = data["params"]
        missing = [k for k in PARAM_KEYS if k not in params]
        if missing:
            loaded.fail(f"'params' lacks {missing} (it must hold {list(PARAM_KEYS)})")
        means = loaded.tensor("means", source=params, ndim=2, dtype_kind="f", finite=True, label="params.means")
        n = means.shape[0]
        widths = {"means": 3, "scales": 3, "quats": 4, "features_dc": 3, "opacities": 1}
        for k in PARAM_KEYS:
            t = loaded.tensor(k, source=params, dtype_kind="f", rows=n, finite=True, label=f"params.{k}")
            if k in widths and (t.ndim != 2 or t.shape[1] != widths[k]):
                loaded.fail(f"'params.{k}' has shape {tuple(t.shape)}, expected ({n}, {widths[k]})")
            if k == "features_rest" and (t.ndim != 3 or t.shape[2] != 3):
                loaded.fail(f"'params.features_rest' has shape {tuple(t.shape)}, expected ({n}, K, 3)")
        is_new = loaded.tensor("is_new", ndim=1, dtype_kind="b")
        removed = loaded.tensor("removed", ndim=1, dtype_kind="i")
        selected = loaded.tensor("selected", ndim=1, dtype_kind="i")
        if is_new.shape != (n,):
            loaded.fail(f"'is_new' has {is_new.numel()} entries, it does not match the {n} refined Gaussians")
        for name, index in (("removed", removed), ("selected", selected)):
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_original):
                loaded.fail(f"'{name}' holds indices outside the {num_original} original Gaussians")
        if n - int(is_new.sum()) != num_original - removed.numel():
            loaded.fail(f"kept + removed rows do not add up to the {num_original} originals")
        scores = data["scores"]
        for k in scores:
            loaded.tensor(k, source=scores, ndim=1, dtype_kind="f", rows=num_original, finite=True,
                          label=f"scores.{k}")
        if not 1 <= data["steps"] <= 4 or data["select"] not in ("hessian", "grad", "all") or \
                data["decoder"] not in ("temporal", "generative"):
            loaded.fail(f"steps / select / decoder ({data['steps']!r}, {data['select']!r}, {data['decoder']!r}) "
                        "are not values gvae-refine writes")
    return Refinement(params={k: params[k] for k in PARAM_KEYS}, is_new=is_new, selected=selected.long(),
                      removed=removed.long(), scores=dict(scores), num_original=num_original,
                      steps=int(data["steps"]), select=str(data["select"]), decoder=str(data["decoder"]),
                      provenance=loaded.provenance)


# ------------------------------------------------------------------------------------------- provenance
def _config_exclude(config) -> Tuple[str, ...]:
    """Model-config fields that do not change the trained Gaussians: where the run lives, what is shown,
    and gaussianvae's own post-training refinement settings (``refine_*``; splatfacto's ``refine_every``
    and friends are densification settings and stay in)."""
    from nerfstudio.models.splatfacto import SplatfactoModelConfig

    splatfacto = {f.name for f in dataclasses.fields(SplatfactoModelConfig)}
    ours = [f.name for f in dataclasses.fields(config) if f.name not in splatfacto]
    return tuple(n for n in ours if n.startswith("refine_") or n in ("run_dir", "show_refined")) + (
        "eval_num_rays_per_chunk",)


def run_provenance(model, step: Optional[int] = None) -> Provenance:
    """The run state of ``model`` that files beside the run are tied to.

    ``step``: the checkpoint step where the caller knows it (``None``: not recorded / not compared). The
    digest covers the lineage's live ids and every parameter tensor (:data:`PARAM_KEYS`, in order), so two
    checkpoints with the same count but other Gaussians never match; the config digest covers the model
    config minus the fields of :func:`_config_exclude`."""
    params = [model.gauss_params[k] for k in PARAM_KEYS]
    recorder = getattr(getattr(model, "strategy", None), "recorder", None)
    live = getattr(recorder, "live_ids", None)
    ids = live if live is not None else torch.zeros(0, dtype=torch.int64)
    config = model.config
    exclude = _config_exclude(config) if dataclasses.is_dataclass(config) else ()
    return Provenance(step=None if step is None else int(step), num_gaussians=int(params[0].shape[0]),
                      gaussians_sha256=digest_tensors([ids.long(), *params]),
                      config_sha256=digest_config(config, exclude=exclude))


def rebuild_hint(run_dir: Optional[Union[str, Path]], name: str, decoder: str = "temporal") -> str:
    """How to make ``name`` (a file beside the run) again, with the run's own config path."""
    config = f"{Path(run_dir) / 'config.yml'}" if run_dir is not None else "<run>/config.yml"
    if name == REFINEMENT_FILE:
        return f"make it again with gvae-refine --load-config {config} (it replaces the file)"
    generative = " --decoder generative" if decoder == "generative" else ""
    return (f"train it again with gvae-refine --load-config {config}{generative} --retrain-vae (it replaces "
            "the file), or delete it")


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


def score_gaussians(model, datamanager, views: int = 0, progress=None) -> Dict[str, torch.Tensor]:
    """Per-Gaussian selection signals from the training views at the finest stage's resolution.

    ``progress(done, losses)`` (e.g. :func:`gvae_ns.progress.phase`'s) is called after every view.

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
    for done, i in enumerate(indices, start=1):
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
        if progress is not None:
            progress(done, {"l1": float(loss.detach())})
    return {"grad2d": (grad_sum / vis_count.clamp_min(1)).cpu(), "hessian": hessian.cpu()}


class Refiner:
    """What refinement needs once the VAE is trained: +k / selection changes cost one extrapolation."""

    def __init__(self, model, vae, scores: Dict[str, torch.Tensor], lineage=None, fraction: float = 0.1,
                 max_new_ratio: float = 1.0, seed: int = 0, decoder: str = "temporal",
                 provenance: Optional[Provenance] = None) -> None:
        """``vae``: the trained decoder, a GaussianVAE (``decoder="temporal"``) or a DensifyHead ("generative").
        ``provenance``: the run state the refinements are made from (recorded in each :class:`Refinement`)."""
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
        self.provenance = provenance
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
            from gvae_ns.densify.train import densify

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
                                decoder=self.decoder, provenance=self.provenance)
        self._cache[key] = refinement
        return refinement


def _run_dir(config: RefineConfig) -> Path:
    return Path(config.load_config).parent


def build_refiner(config: RefineConfig, pipeline, step: Optional[int] = None) -> Refiner:
    """Train (or load) the decoder for the run behind ``pipeline`` and score its Gaussians.

    An existing ``vae.pt`` / ``densify_head.pt`` is reused only when it was trained on this run state
    (``step``: the checkpoint step, where known); a stale, foreign or damaged one stops with
    :class:`RefinementFileError` (``--retrain-vae`` replaces it)."""
    from gvae_ns.lineage.dataset import build_transitions
    from gvae_ns.vae.model import load_vae, save_vae
    from gvae_ns.vae.train import VAETrainConfig, train_vae

    from gvae_ns.progress import phase

    model = pipeline.model
    provenance = run_provenance(model, step)
    writer_step = int(step or 0)
    lineage = _current_lineage(model)
    run_dir = _run_dir(config)
    vae_path = run_dir / VAE_FILE
    device = model.device
    started = time.perf_counter()
    if config.decoder == "generative":
        from gvae_ns.densify.train import DENSIFY_HEAD_FILE, DensifyTrainConfig, densify_head_for_run

        vae = densify_head_for_run(run_dir, lineage, DensifyTrainConfig(steps=config.vae_steps),
                                   retrain=config.retrain_vae, device=device, seed=config.seed, provenance=provenance,
                                   rebuild=rebuild_hint(run_dir, DENSIFY_HEAD_FILE, "generative"))
    elif vae_path.exists() and not config.retrain_vae:
        vae = load_vae(vae_path, map_location=device, expected=provenance, rebuild=rebuild_hint(run_dir, VAE_FILE))
        print(f"gvae-refine: using the VAE in {vae_path} (trained on this checkpoint)")
    else:
        vae_config = VAETrainConfig(steps=config.vae_steps)
        transitions = build_transitions(lineage, max_children=vae_config.model.max_children)
        with phase("VAE training", vae_config.steps, writer_step) as advance:
            vae, log = train_vae(transitions, vae_config, device=device, seed=config.seed, progress=advance)
        save_vae(vae, vae_path, provenance)
        print(f"gvae-refine: trained the VAE on {log.get('transitions')} transitions in "
              f"{time.perf_counter() - started:.1f} s -> {vae_path}")
    started = time.perf_counter()
    n_views = len(pipeline.datamanager.cached_train) if config.score_views <= 0 else config.score_views
    with phase("Scoring views", n_views, writer_step) as advance:
        scores = score_gaussians(model, pipeline.datamanager, views=config.score_views, progress=advance)
    print(f"gvae-refine: scored {scores['grad2d'].numel()} Gaussians in {time.perf_counter() - started:.1f} s")
    return Refiner(model, vae, scores, lineage=lineage, fraction=config.fraction, max_new_ratio=config.max_new_ratio,
                   seed=config.seed, decoder=config.decoder, provenance=provenance)


def load_refiner(model, scores: Optional[Dict[str, torch.Tensor]], decoder: str = "temporal") -> Refiner:
    """A :class:`Refiner` for a loaded run from its saved decoder (``vae.pt`` / ``densify_head.pt``) and scores.

    The decoder file must have been trained on the model's Gaussians; a missing, stale, foreign or damaged
    one raises :class:`RefinementUnavailable` with the file's own one-paragraph message."""
    from gvae_ns.densify.train import DENSIFY_HEAD_FILE, load_densify_head
    from gvae_ns.vae.model import load_vae

    name, loader = (DENSIFY_HEAD_FILE, load_densify_head) if decoder == "generative" else (VAE_FILE, load_vae)
    run_dir = model.config.run_dir
    if run_dir is None or not (Path(run_dir) / name).is_file():
        raise RefinementUnavailable(f"no trained decoder ({name}) beside the run: run gvae-refine first.")
    if not scores:
        raise RefinementUnavailable(f"no selection scores: run gvae-refine to write {REFINEMENT_FILE}.")
    provenance = run_provenance(model)
    try:
        net = loader(Path(run_dir) / name, map_location=model.device, expected=provenance,
                     rebuild=rebuild_hint(run_dir, name, decoder))
    except (OSError, ValueError) as err:
        raise RefinementUnavailable(str(err)) from None
    return Refiner(model, net, scores, fraction=model.config.refine_fraction, decoder=decoder, provenance=provenance)


def check_refine_config(config: RefineConfig) -> None:
    """Raise ``ValueError`` (one paragraph, naming the option and the fix) for options that cannot work;
    nothing is loaded or trained first."""
    if not 1 <= config.steps <= 4:
        raise ValueError(f"--steps must be in 1..4, got {config.steps} (extrapolation steps past the finest stage).")
    if not 0.0 < config.fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {config.fraction} (the share of Gaussians selected).")
    if config.vae_steps < 1:
        raise ValueError(f"--vae-steps must be at least 1, got {config.vae_steps}.")
    if not config.max_new_ratio > 0.0:
        raise ValueError(f"--max-new-ratio must be above 0, got {config.max_new_ratio}.")
    if config.score_views < 0:
        raise ValueError(f"--score-views must be 0 (all views) or more, got {config.score_views}.")
    if config.output is not None and Path(config.output).is_dir():
        raise ValueError(f"--output {config.output} is a directory; pass a file name, e.g. "
                         f"{Path(config.output) / REFINEMENT_FILE}.")


def refine_run(config: RefineConfig, pipeline=None) -> Refinement:
    """Refine a trained run and write the refinement file; returns the refinement.

    ``pipeline``: an already-loaded pipeline (ns-train's, after training; its model's ``step`` is the
    checkpoint step); else the run is loaded from ``config.load_config``.
    """
    check_refine_config(config)
    if pipeline is None:
        if not Path(config.load_config).is_file():
            raise RefinementUnavailable(f"{config.load_config} does not exist: pass the run's config.yml "
                                        "(the one ns-train wrote beside nerfstudio_models/).")
        from nerfstudio.utils.eval_utils import eval_setup

        _, pipeline, _, step = eval_setup(Path(config.load_config), test_mode="val")
    else:
        step = getattr(pipeline.model, "step", None)
    model = pipeline.model
    if not hasattr(model, "recorder"):
        raise RefinementUnavailable(
            f"{config.load_config} is a {type(model).__name__} run; refinement needs a run trained with "
            "ns-train gaussianvae (it records the lineage)."
        )
    output = Path(config.output) if config.output is not None else _run_dir(config) / REFINEMENT_FILE
    refused = getattr(model, "refinement_file_error", None)
    if refused:
        print(f"gvae-refine: the existing refinement file was refused ({refused}); this run replaces it.")
    was_training = model.training
    model.eval()
    try:
        refiner = build_refiner(config, pipeline, step=step)
        started = time.perf_counter()
        refinement = refiner.refine(config.steps, config.select)
        elapsed = time.perf_counter() - started
    finally:
        model.train(was_training)
    save_refinement(refinement, output)
    model.refiner = refiner
    model.attach_refinement(refinement)
    print(f"gvae-refine: {refinement.describe()} in {elapsed * 1000:.0f} ms -> {output}")
    return refinement


def main(argv: Optional[list] = None) -> None:
    """Console entry point ``gvae-refine``: a user error ends with one paragraph on stderr and exit code 2."""
    import tyro

    config = tyro.cli(RefineConfig, args=argv)
    try:
        refine_run(config)
    except (RefinementUnavailable, TaggedFileError, FileNotFoundError, ValueError) as err:
        print(f"gvae-refine: {err}", file=sys.stderr)
        raise SystemExit(2) from None
