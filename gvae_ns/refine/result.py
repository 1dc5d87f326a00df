"""The refinement record and its file ``<run>/refinement.pt``; the run state files beside a run are tied to.

The file (``torch.save`` of plain tensors, ints and strings, loadable with ``weights_only=True``; written
atomically):

==================  =============================================================================
key                 value
==================  =============================================================================
``format``          ``"gvae_ns.refinement"``
``version``         :data:`REFINEMENT_VERSION`
``provenance``      the run state it was made from (:class:`~gvae_ns.tagged_file.Provenance`: checkpoint
                    step, Gaussian count, sha256 of the lineage ids and parameters, sha256 of the config)
``num_original``    rows of the trained scene the refinement was made from
``steps``           extrapolation stages past the finest trained stage (1..4)
``select``          ``"hessian"``, ``"grad"`` or ``"all"``
``decoder``         ``"temporal"`` (the lineage VAE) or ``"generative"`` (the densification head)
``params``          dict of splatfacto-shaped tensors (:data:`~gvae_ns.gaussians.PARAM_KEYS`): the original
                    rows (selected ones refined) then the added Gaussians
``is_new``          bool [kept + added]: True for added Gaussians
``selected``        int64 indices of the original rows whose lineages were extrapolated
``removed``         int64 indices of original rows replaced by the family their decoder proposed (two
                    Gaussians or more, opacity conserved: see :mod:`gvae_ns.refine.refiner`); they are
                    absent from ``params``. Every other original row is kept exactly as trained.
``scores``          dict of per-original-row float tensors (``grad2d``, ``hessian``), so that other
                    stage counts / selections can be recomputed without the training images
==================  =============================================================================

The file is read and written through :mod:`gvae_ns.tagged_file`, as are ``vae.pt`` and ``densify_head.pt``:
a file made from another checkpoint, another config or another run (or a damaged one) is refused with
one paragraph that names it, says what does not match and how to make it again; it is never reused.
The original checkpoint is never modified.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from gvae_ns.gaussians import PARAM_KEYS
from gvae_ns.run_layout import CONFIG_FILE, DECODER_FILES, REFINEMENT_FILE
from gvae_ns.tagged_file import (
    FileFormat,
    Provenance,
    TaggedFileError,
    digest_config,
    digest_tensors,
    load_tagged,
    save_tagged,
)

REFINEMENT_FORMAT = "gvae_ns.refinement"
REFINEMENT_VERSION = 2
"""Version 2 added the provenance (the run state the refinement was made from)."""
REFINEMENT_FILE_FORMAT = FileFormat(
    tag=REFINEMENT_FORMAT, version=REFINEMENT_VERSION, what="refinement",
    keys={"num_original": int, "steps": int, "select": str, "decoder": str, "params": dict,
          "is_new": torch.Tensor, "selected": torch.Tensor, "removed": torch.Tensor, "scores": dict},
    rebuild="make it again with gvae-refine --load-config <run>/config.yml",
)

DECODERS = (*DECODER_FILES, "prior", "split", "none")
"""The decoder names a refinement records: ``temporal`` (lineage VAE), ``generative`` (densification head),
``prior`` (the shipped cross-scene prior),
``split`` (the no-learning 3DGS-split control) and ``none`` (the fine-tune-only control)."""
SELECTIONS = ("hessian", "grad", "all")
"""The selection modes (see :mod:`gvae_ns.refine.score`)."""

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
    """Extrapolation stages past the finest trained stage."""
    select: str
    """Selection mode."""
    decoder: str = "temporal"
    """What produced it: the lineage VAE ("temporal"), the densification head ("generative") or the
    no-learning 3DGS split ("split")."""
    provenance: Optional[Provenance] = None
    """The run state it was made from (written to the file; checked when the file is loaded)."""

    @property
    def num_added(self) -> int:
        """Gaussians added by the refinement."""
        return int(self.is_new.sum())

    def describe(self) -> str:
        """One line for logs and the viewer."""
        return (f"+{self.steps} ({self.select}, {self.decoder}): {self.num_original} original, {len(self.selected)} "
                f"selected, {len(self.removed)} replaced by {self.num_added} added")


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
        if not 1 <= data["steps"] <= 4 or data["select"] not in SELECTIONS or data["decoder"] not in DECODERS:
            loaded.fail(f"steps / select / decoder ({data['steps']!r}, {data['select']!r}, {data['decoder']!r}) "
                        "are not values gvae-refine writes")
    return Refinement(params={k: params[k] for k in PARAM_KEYS}, is_new=is_new, selected=selected.long(),
                      removed=removed.long(), scores=dict(scores), num_original=num_original,
                      steps=int(data["steps"]), select=str(data["select"]), decoder=str(data["decoder"]),
                      provenance=loaded.provenance)


# ------------------------------------------------------------------------------------------- provenance
SCENE_NEUTRAL_FIELDS = ("run_dir", "show_refined", "eval_num_rays_per_chunk")
"""Model-config fields that do not change the trained Gaussians (where the run lives, what is shown)."""


def _config_exclude(config: Any) -> Tuple[str, ...]:
    """Fields left out of the config digest: :data:`SCENE_NEUTRAL_FIELDS` and gaussianvae's own
    post-training settings (every field splatfacto lacks, except the stage schedule and the lineage
    format, which shape the trained scene; splatfacto's ``refine_every`` and friends are densification
    settings and stay in)."""
    from nerfstudio.models.splatfacto import (
        SplatfactoModelConfig,  # nerfstudio's model module is slow to import
    )

    splatfacto = {f.name for f in dataclasses.fields(SplatfactoModelConfig)}
    shaping = ("stage_downscales", "stage_steps", "lineage_float16")
    ours = [f.name for f in dataclasses.fields(config) if f.name not in splatfacto and f.name not in shaping]
    return tuple(ours) + tuple(n for n in SCENE_NEUTRAL_FIELDS if n not in ours)


def provenance_of(params: Dict[str, torch.Tensor], live_ids: Optional[torch.Tensor], config: Any,
                  step: Optional[int] = None) -> Provenance:
    """The run state that files beside a run are tied to: ``params`` (splatfacto's ``gauss_params``),
    the lineage's ``live_ids`` (``None``: none recorded) and the model ``config``.

    ``step``: the checkpoint step where the caller knows it (``None``: not recorded / not compared). The
    digest covers the live ids and every parameter tensor (:data:`~gvae_ns.gaussians.PARAM_KEYS`, in order),
    so two checkpoints with the same count but other Gaussians never match; the config digest covers the
    model config minus the fields of :func:`_config_exclude`."""
    tensors = [params[k] for k in PARAM_KEYS]
    ids = live_ids if live_ids is not None else torch.zeros(0, dtype=torch.int64)
    exclude = _config_exclude(config) if dataclasses.is_dataclass(config) else ()
    return Provenance(step=None if step is None else int(step), num_gaussians=int(tensors[0].shape[0]),
                      gaussians_sha256=digest_tensors([ids.long(), *tensors]),
                      config_sha256=digest_config(config, exclude=exclude))


def rebuild_hint(run_dir: Optional[Union[str, Path]], name: str, decoder: str = "temporal") -> str:
    """How to make ``name`` (a file beside the run) again, with the run's own config path."""
    config = f"{Path(run_dir) / CONFIG_FILE}" if run_dir is not None else f"<run>/{CONFIG_FILE}"
    if name == REFINEMENT_FILE:
        return f"make it again with gvae-refine --load-config {config} (it replaces the file)"
    which = "" if decoder == "temporal" else f" --decoder {decoder}"
    return (f"train it again with gvae-refine --load-config {config}{which} --retrain-decoder (it replaces "
            "the file), or delete it")
