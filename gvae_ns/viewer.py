"""Refinement controls for ``ns-viewer`` (and ``ns-train``'s viewer): show, +k steps, selection, tint.

nerfstudio's viewer finds GUI elements by walking the pipeline's attributes (``parse_object``): it collects
every :class:`~nerfstudio.viewer.viewer_elements.ViewerElement` and ``ViewerControl`` it meets and descends
only into ``nn.Module`` attributes. :class:`RefinementControls` is therefore a parameter-less ``nn.Module``
stored on the model (``model.refinement_controls``): it adds nothing to the checkpoint, keeps the model only
through a weak reference (no module cycle), and its elements appear in the viewer's Control tab under
"Custom Elements / model / refinement_controls".

The viewer installs the elements in the alphabetical order of their attribute names, which is the panel
order here: ``enabled``, ``note``, ``num_added``, ``num_original``, ``select``, ``steps``, ``tint``. Each
callback runs under the viewer's lock, changes the model, and the viewer then re-renders every client (it
wraps the elements' callbacks with ``_trigger_rerender``); no restart is needed.

What each control does to the model:

==================  ==========================================================================
control             model
==================  ==========================================================================
Show refined        ``model.config.show_refined`` (off: the original Gaussians are rendered)
Extrapolation       the refiner's ``refine(stages, select)``, shown with ``model.show_refinement``; 0 shows the
                    original scene
Selection           the same call, with ``"hessian"`` (Hessian-guided) or ``"all"`` (whole scene)
Tint generated      ``model.tint_new`` (generated Gaussians drawn magenta)
counts              read-only: Gaussians of the checkpoint, Gaussians the refinement added
Refinement          read-only status line: the model's note, or why a control is off
==================  ==========================================================================

A control that cannot act is disabled and the status line says why: no refinement attached, the
``GVAE_REFINED=0`` environment override, a model that cannot hand out its run state, or a run whose lineage
or decoder is missing (:class:`~gvae_ns.refine.result.RefinementUnavailable`).

The controls are handed what they need: ``ns-train`` passes the :class:`~gvae_ns.refine.refiner.Refiner` that
made the refinement (:meth:`RefinementControls.use_refiner`); after ``ns-viewer`` loads a run, the first
change builds one from the run's decoder file and the scores stored in ``refinement.pt``. Stage counts and
selections made in the viewer are the decoder's proposals under the refiner's rule, without the sub-pixel
fine-tune (``gvae-refine`` makes and checks that one).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from nerfstudio.models.splatfacto import RGB2SH
from nerfstudio.viewer.viewer_elements import (
    ViewerCheckbox,
    ViewerControl,
    ViewerDropdown,
    ViewerElement,
    ViewerNumber,
    ViewerSlider,
    ViewerText,
)
from torch import nn

from gvae_ns.refine.cli import load_refiner
from gvae_ns.refine.refiner import MAX_STAGES, Refiner
from gvae_ns.refine.result import RefinementUnavailable
from gvae_ns.run_layout import DECODER_FILES, REFINEMENT_FILE, RunLayout

if TYPE_CHECKING:
    from nerfstudio.viewer.viewer import Viewer

SELECTIONS: Dict[str, str] = {"Hessian-guided": "hessian", "Whole scene": "all"}
"""Dropdown label -> ``select`` argument of :meth:`gvae_ns.refine.refiner.Refiner.refine`."""
MAX_STEPS = MAX_STAGES
"""Largest extrapolation stage count the slider offers."""
PUT_BACK_DELAY_S = 0.2
"""Delay before a refused steps / selection change is sent to the browsers again (see ``_put_back``)."""
REFINED_ENV = "GVAE_REFINED"
"""Environment variable: ``0`` shows (and exports) the original scene whatever ``show_refined`` says."""


def refined_env_off() -> bool:
    """Whether ``$GVAE_REFINED`` turns the refined scene off (the one place that reads it)."""
    return os.environ.get(REFINED_ENV, "1") == "0"


def tint_new(params: Dict[str, torch.Tensor], is_new: torch.Tensor, is_sh: bool) -> Dict[str, torch.Tensor]:
    """Paint generated Gaussians magenta (view-independent) so they stand out in the viewer."""
    magenta = torch.tensor([1.0, 0.0, 1.0], device=is_new.device)
    dc = params["features_dc"].clone()
    rest = params["features_rest"].clone()
    dc[is_new] = RGB2SH(magenta) if is_sh else torch.logit(magenta.clamp(1e-4, 1 - 1e-4))
    rest[is_new] = 0.0
    return {**params, "features_dc": dc, "features_rest": rest}


class RefinementControls(nn.Module):
    """Viewer GUI for a :class:`~gvae_ns.model.GaussianVAEModel`'s refinement; see the module docstring."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self._model_ref = weakref.ref(model)
        self._refiner: Optional[Refiner] = None
        self._applied: Optional[Tuple[int, str]] = None
        self._status: Optional[str] = None
        self._failure: Optional[str] = None
        self.enabled = ViewerCheckbox(
            "Show refined", True, cb_hook=self._on_enabled,
            hint="Render the refined Gaussians (off: the trained scene as it is in the checkpoint).",
        )
        self.note = ViewerText("Refinement", "", disabled=True, hint="Status of the refinement.")
        self.num_added = ViewerNumber("Added Gaussians", 0, disabled=True, hint="Gaussians the VAE generated.")
        self.num_original = ViewerNumber("Original Gaussians", 0, disabled=True,
                                         hint="Gaussians in the checkpoint.")
        self.select = ViewerDropdown(
            "Selection", "Hessian-guided", list(SELECTIONS), cb_hook=self._on_recompute,
            hint="Which lineages are extrapolated: the top Hessian-guided scores, or the whole scene.",
        )
        self.steps = ViewerSlider(
            "Extrapolation steps", 0, 0, MAX_STEPS, step=1, cb_hook=self._on_recompute,
            hint="Resolution stages extrapolated past the finest trained one (0: the original scene).",
        )
        self.tint = ViewerCheckbox("Tint generated", False, cb_hook=self._on_tint,
                                   hint="Draw the Gaussians the VAE generated in magenta.")
        self.viewer_hook = _SyncWhenInstalled(self)
        self.sync()

    @property
    def _model(self) -> Any:
        # Private on purpose: the viewer's parse_object descends into every public nn.Module attribute,
        # and a public path back to the model would make that walk endless.
        model = self._model_ref()
        if model is None:
            raise RuntimeError("RefinementControls: its model was garbage-collected")
        return model

    # ------------------------------------------------------------------ state
    @property
    def unavailable(self) -> Optional[str]:
        """Why steps / selection cannot be recomputed (``None`` while they can): the model lacks what it
        needs, or the last attempt raised :class:`~gvae_ns.refine.result.RefinementUnavailable`."""
        return self._failure or _unavailable_reason(self._model, self._refiner)

    def use_refiner(self, refiner: Refiner) -> None:
        """Recompute stage counts / selections with ``refiner`` (the one that made the shown refinement)."""
        self._refiner = refiner
        self._failure = None
        self._applied = None

    def recheck(self) -> None:
        """Forget the last RefinementUnavailable (the run may have gained its lineage / VAE since)."""
        self._failure = None

    def applied(self) -> Tuple[int, str]:
        """The (steps, select) the model's refinement was made with, as far as the model tells."""
        if self._applied is not None:
            return self._applied
        model = self._model
        record = getattr(model, "refinement_record", None)
        select = record.select if record is not None else model.config.extrapolate_select
        if model.refinement is None:
            return 0, _select_key(select)
        steps = record.steps if record is not None else model.config.extrapolate_stages
        return int(min(max(int(steps), 0), MAX_STEPS)), _select_key(select)

    def sync(self, status: Optional[str] = None) -> None:
        """Make every control show the model's current state (values, counts, disabled flags, status)."""
        model = self._model
        has_refinement = model.refinement is not None
        env_off = refined_env_off()
        fixed = self.unavailable is not None
        steps, select = self.applied()

        _set(self.enabled, value=bool(model.config.show_refined), disabled=not has_refinement or env_off)
        _set(self.tint, value=bool(model.tint_new), disabled=not has_refinement or env_off)
        _set(self.steps, value=steps, disabled=fixed)
        _set(self.select, value=_select_label(select), disabled=fixed)
        _set(self.num_original, value=int(model.gauss_params["means"].shape[0]))
        added = 0
        if has_refinement and model.refined_is_new is not None:
            added = int(model.refined_is_new.sum())
        _set(self.num_added, value=added)
        _set(self.note, value=self.status_line(status))

    def status_line(self, status: Optional[str] = None) -> str:
        """The one-line status: what is shown, and why any control is off."""
        if status is not None:
            self._status = status
        model = self._model
        parts = []
        if refined_env_off():
            parts.append("off: GVAE_REFINED=0 in the environment, the original scene is shown")
        elif model.refinement is not None and not model.config.show_refined:
            parts.append("hidden: the original scene is shown")
        parts.append(self._status if self._status is not None else model.refinement_note)
        reason = self.unavailable
        if reason is not None:
            parts.append(f"steps/selection off: {reason}")
        return " | ".join(p for p in parts if p)

    # -------------------------------------------------------------- callbacks
    def _on_enabled(self, element: ViewerCheckbox) -> None:
        self._model.config.show_refined = bool(element.value)
        self.sync()

    def _on_tint(self, element: ViewerCheckbox) -> None:
        self._model.tint_new = bool(element.value)
        self.sync()

    def _on_recompute(self, _element: Any) -> None:
        wanted = (int(round(float(self.steps.value))), SELECTIONS.get(str(self.select.value), "hessian"))
        if wanted == self.applied():
            self.sync()
            return
        if self.unavailable is not None:
            self._put_back()
            return
        _set(self.note, value=f"computing +{wanted[0]} ({wanted[1]}) ...")
        done = False
        try:
            status = self._show(*wanted)
            self._applied = wanted
            self.sync(status=str(status))
            done = True
        except RefinementUnavailable as err:
            self._failure = str(err)
            self._put_back()
            done = True
        except Exception as err:  # a damaged decoder file, a shape that does not fit, out of memory ...
            self._put_back(status=f"+{wanted[0]} ({wanted[1]}) failed: {_one_line(err)}")
            done = True
        finally:
            if not done:  # KeyboardInterrupt / SystemExit: never leave "computing" on the screen
                self.sync(status=f"+{wanted[0]} ({wanted[1]}) interrupted")

    def _show(self, stages: int, select: str) -> str:
        """Show the scene extrapolated ``stages`` (0..4) stages with ``select``; returns the status line."""
        model = self._model
        if stages == 0:
            model.set_refinement(None, note="showing the trained scene (+0)")
            return model.refinement_note
        if self._refiner is None:
            record = model.refinement_record
            self._refiner = load_refiner(model.run_state(), record and record.scores,
                                         record.decoder if record else "temporal", model.config.extrapolate_fraction)
        model.show_refinement(self._refiner.refine(stages, select))
        return model.refinement_note

    def _put_back(self, status: Optional[str] = None) -> None:
        """Show the applied steps / selection again after a change that could not be made.

        viser forwards a browser's edit to the other browsers after the callbacks ran, and that message
        replaces, in its send buffer, a value set inside the callback; so the value is sent once more a
        moment later.
        """
        self.sync(status=status)
        timer = threading.Timer(PUT_BACK_DELAY_S, self._resend_applied)
        timer.daemon = True
        timer.start()

    def _resend_applied(self) -> None:
        if self._model_ref() is None:  # the viewer (and its model) closed before the timer fired
            return
        steps, select = self.applied()
        for element, value in ((self.steps, steps), (self.select, _select_label(select))):
            if element.gui_handle is not None:
                element.gui_handle.value = value


class _SyncWhenInstalled(ViewerControl):
    """Hook the viewer calls once all elements are installed: show the loaded model's state then, and
    again whenever a browser connects (a refinement may have been attached since, e.g. after ns-train)."""

    def __init__(self, controls: RefinementControls) -> None:
        self._controls_ref = weakref.ref(controls)

    def _setup(self, viewer: "Viewer") -> None:
        super()._setup(viewer)
        self._sync_under_lock(recheck=False)
        viewer.viser_server.on_client_connect(lambda _client: self._sync_under_lock(recheck=True))

    def _sync_under_lock(self, recheck: bool) -> None:
        controls = self._controls_ref()
        if controls is None:
            return
        lock = getattr(self.viewer, "train_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            if recheck:
                controls.recheck()
            controls.sync()


def _one_line(err: BaseException) -> str:
    """An exception as one status line: its message (or its type, when it has none)."""
    text = " ".join(str(err).split())
    return text if text else type(err).__name__


def _unavailable_reason(model: Any, refiner: Optional[Refiner]) -> Optional[str]:
    """Why stage counts / selections cannot be recomputed for ``model`` (``None`` when they can)."""
    if not callable(getattr(model, "run_state", None)):
        return ("this gvae-ns model cannot hand out its run state; run gvae-refine --stages K --select MODE and "
                "reopen the viewer")
    recorder = getattr(getattr(model, "strategy", None), "recorder", None)
    if recorder is None or getattr(recorder, "num_snapshots", 0) == 0:
        return ("the checkpoint has no lineage snapshots (train with ns-train gaussianvae through at least "
                "two resolution stages)")
    if refiner is None:
        run_dir = model.config.run_dir
        record = getattr(model, "refinement_record", None)
        decoder = record.decoder if record is not None else "temporal"
        learned = decoder in DECODER_FILES  # the 3DGS-split control has no file
        if learned and (run_dir is None or not RunLayout(Path(run_dir)).decoder(decoder).is_file()):
            return f"no trained decoder ({DECODER_FILES[decoder]}) beside the run: run gvae-refine first"
        if record is None or not record.scores:
            return f"no selection scores in {REFINEMENT_FILE}: run gvae-refine first"
    return None


def _select_key(select: str) -> str:
    return select if select in SELECTIONS.values() else "hessian"


def _select_label(select: str) -> str:
    return next(label for label, key in SELECTIONS.items() if key == _select_key(select))


def _set(element: ViewerElement, value: Any = None, disabled: Optional[bool] = None) -> None:
    """Set an element's value / disabled flag, before or after the viewer installed it.

    Unchanged values are not re-sent: setting a viser value fires the element's callbacks again.
    """
    if disabled is not None:
        element.disabled = disabled
        if element.gui_handle is not None and element.gui_handle.disabled != disabled:
            element.gui_handle.disabled = disabled
    if value is not None and getattr(element, "value", None) != value:
        element.value = value  # type: ignore[attr-defined]
