"""The refinement controls (gvae_ns.viewer) change the model, without a browser.

Callbacks are called the way the viewer calls them (``element.cb_hook(element)`` after the value changed);
the last test starts nerfstudio's real ``Viewer`` on 127.0.0.1 with a stand-in pipeline to check that the
controls are discovered and that a change from the GUI side reaches the model and asks for a re-render.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List, Tuple

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.viewer.utils import parse_object
from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement

from gvae_ns.model import GaussianVAEModelConfig
from gvae_ns.refine.result import Refinement, RefinementUnavailable

NUM = 64
ADDED = 5
CONTROL_NAMES = {"enabled", "note", "num_added", "num_original", "select", "steps", "tint"}


@pytest.fixture()
def model():
    config = GaussianVAEModelConfig(num_random=NUM, stage_downscales=(2, 1), stage_steps=(5, 5))
    m = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=2,
                     metadata={})
    m.eval()
    return m


def _refined_params(model) -> Tuple[dict, torch.Tensor]:
    params = {k: torch.cat([v.detach(), v.detach()[:ADDED]]) for k, v in model.gauss_params.items()}
    is_new = torch.zeros(NUM + ADDED, dtype=torch.bool)
    is_new[NUM:] = True
    return params, is_new


def _change(element, value) -> None:
    """What the viewer does when a person changes a control: new value, then the element's callback."""
    element.value = value
    element.cb_hook(element)


class _FakeRefiner:
    """Stands in for a Refiner: records its calls; raises RefinementUnavailable(fail) if ``fail``."""

    def __init__(self, model, calls: List[Tuple[int, str]], fail: str = "") -> None:
        self.model, self.calls, self.fail = model, calls, fail

    def refine(self, stages: int, select: str) -> Refinement:
        self.calls.append((stages, select))
        if self.fail:
            raise RefinementUnavailable(self.fail)
        params, is_new = _refined_params(self.model)
        return Refinement(params=params, is_new=is_new, selected=torch.arange(ADDED), removed=torch.zeros(0).long(),
                          scores={}, num_original=NUM, steps=stages, select=select)


def _make_recomputable(model, calls: List[Tuple[int, str]], fail: str = "") -> _FakeRefiner:
    """Give ``model`` what the controls check for (a lineage snapshot) and hand its controls a fake refiner."""
    model.snapshot_stage(0)
    refiner = _FakeRefiner(model, calls, fail)
    model.refinement_controls.use_refiner(refiner)  # type: ignore[arg-type]
    model.refinement_controls.sync()
    return refiner


def test_controls_are_found_by_the_viewer_and_add_nothing_to_checkpoints(model):
    found = {path.split("/")[-1]: path for path, _ in parse_object(model, ViewerElement, "Custom Elements")}
    assert set(found) == CONTROL_NAMES
    assert all(p.startswith("Custom Elements/refinement_controls/") for p in found.values())
    assert [type(c).__name__ for _, c in parse_object(model, ViewerControl, "Custom Elements")] == [
        "_SyncWhenInstalled"]
    state = model.state_dict()
    assert not [k for k in state if "refinement_controls" in k]
    model.load_state_dict(state)


def test_without_refinement_or_vae_the_controls_are_off_and_say_why(model):
    controls = model.refinement_controls
    controls.sync()
    assert controls.enabled.disabled and controls.tint.disabled
    assert controls.steps.disabled and controls.select.disabled
    assert controls.num_original.value == NUM and controls.num_added.value == 0
    note = controls.note.value
    assert "no refinement yet" in note and "lineage" in note, note

    model.snapshot_stage(0)
    controls.sync()
    assert "vae.pt" in controls.note.value and controls.steps.disabled


def test_show_refined_and_tint_change_the_model(model):
    params, is_new = _refined_params(model)
    model.set_refinement(params, is_new, note=f"+2 (hessian): {ADDED} added")
    controls = model.refinement_controls
    controls.sync()
    assert not controls.enabled.disabled and not controls.tint.disabled
    assert controls.num_added.value == ADDED and controls.num_original.value == NUM
    assert model.refinement_active and model.means.shape[0] == NUM + ADDED

    _change(controls.enabled, False)
    assert model.config.show_refined is False and not model.refinement_active
    assert model.means.shape[0] == NUM
    assert controls.note.value.startswith("hidden")

    _change(controls.enabled, True)
    assert model.refinement_active and model.means.shape[0] == NUM + ADDED

    _change(controls.tint, True)
    assert model.tint_new is True
    _change(controls.tint, False)
    assert model.tint_new is False


def test_environment_override_disables_show_refined(model, monkeypatch):
    params, is_new = _refined_params(model)
    model.set_refinement(params, is_new, note="+2")
    monkeypatch.setenv("GVAE_REFINED", "0")
    model.refinement_controls.sync()
    assert model.refinement_controls.enabled.disabled
    assert "GVAE_REFINED=0" in model.refinement_controls.note.value


def test_steps_and_selection_recompute_the_refinement(model, monkeypatch):
    calls: List[Tuple[int, str]] = []
    _make_recomputable(model, calls)
    controls = model.refinement_controls
    assert not controls.steps.disabled and not controls.select.disabled
    assert controls.steps.value == 0

    _change(controls.steps, 3)
    assert calls == [(3, "hessian")]
    assert model.refinement is not None and controls.num_added.value == ADDED
    assert controls.note.value.startswith("+3 (hessian") and f"{ADDED} added" in controls.note.value
    assert not controls.enabled.disabled

    _change(controls.select, "Whole scene")
    assert calls[-1] == (3, "all")

    _change(controls.steps, 3)
    assert len(calls) == 2, "an unchanged value must not recompute"

    _change(controls.steps, 0)
    assert len(calls) == 2, "+0 shows the trained scene without the refiner"
    assert model.refinement is None and controls.num_added.value == 0 and controls.enabled.disabled


def test_unavailable_refinement_disables_steps_and_puts_the_value_back(model, monkeypatch):
    calls: List[Tuple[int, str]] = []
    _make_recomputable(model, calls, fail="the lineage has one stage only")
    controls = model.refinement_controls

    _change(controls.steps, 2)
    assert calls == [(2, "hessian")]
    assert controls.steps.value == 0, "the slider must show the steps actually applied"
    assert controls.steps.disabled and controls.select.disabled
    assert "the lineage has one stage only" in controls.note.value

    _change(controls.steps, 4)
    assert len(calls) == 1, "a disabled control must not recompute"
    assert controls.steps.value == 0

    controls.recheck()
    controls.sync()
    assert not controls.steps.disabled


def test_real_viewer_installs_controls_and_rerenders_on_change(model, tmp_path):
    """nerfstudio's Viewer on 127.0.0.1: discovery, initial sync, a GUI-side change, the re-render."""
    from nerfstudio.configs.base_config import ViewerConfig
    from nerfstudio.viewer.viewer import Viewer

    params, is_new = _refined_params(model)
    model.set_refinement(params, is_new, note="+2 (hessian)")

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.datamanager = SimpleNamespace(includes_time=False)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    viewer = Viewer(ViewerConfig(websocket_host="127.0.0.1", websocket_port=port), log_filename=tmp_path / "v.log",
                    datapath=Path(tmp_path), pipeline=Pipeline())
    try:
        installed = {p.split("/")[-1] for p, _ in viewer.viewer_elements if "refinement_controls" in p}
        assert installed == CONTROL_NAMES
        controls = model.refinement_controls
        assert controls.num_added.gui_handle.value == ADDED
        assert controls.enabled.gui_handle.value is True and not controls.enabled.gui_handle.disabled

        rerenders: List[float] = []
        viewer._trigger_rerender = lambda: rerenders.append(time.monotonic())  # type: ignore[method-assign]
        controls.enabled.gui_handle.value = False  # what a click in the browser does on the server side
        deadline = time.monotonic() + 10
        while (model.config.show_refined or not rerenders) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert model.config.show_refined is False and not model.refinement_active
        assert rerenders, "changing a control must ask the viewer to re-render"
    finally:
        viewer.viser_server.stop()



def test_any_failure_shows_the_error_and_never_leaves_computing(model, monkeypatch):
    calls: List[Tuple[int, str]] = []
    refiner = _make_recomputable(model, calls)
    controls = model.refinement_controls

    def broken(steps: int, select: str) -> str:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(refiner, "refine", broken)
    _change(controls.steps, 2)
    assert "computing" not in controls.note.value
    assert "+2 (hessian) failed: CUDA out of memory (simulated)" in controls.note.value
    assert controls.steps.value == 0 and not controls.steps.disabled, "a one-off failure keeps the controls on"

    def interrupted(steps: int, select: str) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(refiner, "refine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _change(controls.steps, 3)
    assert "computing" not in controls.note.value and "interrupted" in controls.note.value


def _record_with_scores(model):
    params, is_new = _refined_params(model)
    return Refinement(params=params, is_new=is_new, selected=torch.arange(ADDED), removed=torch.zeros(0).long(),
                      scores={"grad2d": torch.rand(NUM), "hessian": torch.rand(NUM)}, num_original=NUM, steps=1,
                      select="hessian")


@pytest.mark.parametrize("damage", ["stale", "malformed"])
def test_stale_or_malformed_vae_beside_the_run_is_refused_in_the_status(model, tmp_path, damage):
    from gvae_ns.tagged_file import Provenance
    from gvae_ns.vae.file import save_vae
    from gvae_ns.vae.model import GaussianVAE, GaussianVAEConfig

    model.config.run_dir = tmp_path
    model.snapshot_stage(0)
    model.show_refinement(_record_with_scores(model))
    foreign = Provenance(step=3, num_gaussians=NUM, gaussians_sha256="0" * 64, config_sha256="1" * 64)
    own = model.provenance()
    path = save_vae(GaussianVAE(GaussianVAEConfig()), tmp_path / "vae.pt", foreign if damage == "stale" else own)
    if damage == "malformed":  # the right tag and run, weights that do not fit the config
        payload = torch.load(path, weights_only=True)
        payload["state_dict"] = {k: v[..., :1] if v.ndim else v for k, v in payload["state_dict"].items()}
        torch.save(payload, path)
    controls = model.refinement_controls
    controls.sync()
    assert not controls.steps.disabled
    _change(controls.steps, 2)
    note = controls.note.value
    assert "computing" not in note and str(path) in note, note
    assert ("another run state" if damage == "stale" else "malformed GaussianVAE file") in note
    assert "--retrain-decoder" in note and controls.steps.value == 1 and controls.steps.disabled


def test_stale_refinement_file_is_refused_when_the_run_loads(model, tmp_path):
    from gvae_ns.refine.result import save_refinement
    from gvae_ns.run_layout import REFINEMENT_FILE
    from gvae_ns.tagged_file import Provenance

    model.config.run_dir = tmp_path
    foreign = Provenance(step=3, num_gaussians=NUM, gaussians_sha256="0" * 64, config_sha256="1" * 64)
    save_refinement(_record_with_scores(model), tmp_path / REFINEMENT_FILE, foreign)
    model.load_refinement_file()
    assert model.refinement is None and model.refinement_record is None
    assert "another run state" in model.refinement_file_error and "gvae-refine --load-config" in model.refinement_file_error
    model.refinement_controls.sync()
    assert "refinement off" in model.refinement_controls.note.value
    assert str(tmp_path / REFINEMENT_FILE) in model.refinement_controls.note.value

    save_refinement(_record_with_scores(model), tmp_path / REFINEMENT_FILE, model.provenance())
    model.load_refinement_file()
    assert model.refinement is not None and model.refinement_file_error is None
