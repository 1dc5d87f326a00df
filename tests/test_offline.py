"""Offline behaviour: checkpoints that load with weights_only=True, LPIPS without downloads."""

import numpy as np
import pytest
import torch

from gvae_ns import offline
from gvae_ns.atomic import torch_save_atomic


def test_numpy_scalars_become_weights_only_safe(tmp_path):
    state = {"step": 3, "sched": {"last_lr": [np.float64(0.1)], "base": np.float32(2.0)},
             "arr": np.arange(3), "t": torch.ones(2), "nested": (np.int64(4), "x")}
    raw = tmp_path / "raw.ckpt"
    torch.save(state, raw)
    with pytest.raises(Exception):
        torch.load(raw, weights_only=True)  # what stock PyTorch >= 2.6 does to numpy scalars
    path = tmp_path / "safe.ckpt"
    torch_save_atomic(offline.to_weights_only_safe(state), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["sched"]["last_lr"] == [0.1] and loaded["sched"]["base"] == 2.0
    assert torch.equal(loaded["arr"], torch.arange(3))
    assert loaded["nested"] == (4, "x")
    assert not list(tmp_path.glob(".*.tmp"))


def test_torch_save_atomic_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"ok": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        torch_save_atomic({"bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"ok": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def test_lpips_left_out_without_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(offline, "_warned_lpips", False)
    assert not offline.lpips_weights_available()
    assert offline.make_lpips() is None
    assert offline.make_lpips() is None
    assert capsys.readouterr().out.count("LPIPS is left out") == 1


def test_lpips_built_when_weights_present(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / offline.ALEXNET_WEIGHTS).write_bytes(b"x")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    built = []
    import torchmetrics.image.lpip as lpip_module

    monkeypatch.setattr(lpip_module, "LearnedPerceptualImagePatchSimilarity", lambda **kw: built.append(kw) or "m")
    assert offline.make_lpips() == "m" and built == [{"normalize": True}]


class NotAllowed:
    """A class no allow-list names."""


def _stock_nerfstudio_checkpoint(path):
    """A checkpoint shaped as stock nerfstudio's Trainer writes it (numpy scalars in the scheduler state)."""
    from nerfstudio.engine.optimizers import AdamOptimizerConfig, Optimizers
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig

    param = torch.nn.Parameter(torch.zeros(3))
    config = {"means": {"optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15),
                        "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-6, max_steps=100, warmup_steps=10)}}
    optimizers = Optimizers(config, {"means": [param]})
    for step in range(3):
        param.grad = torch.ones(3)
        optimizers.optimizer_step_all()
        optimizers.scheduler_step_all(step)
    torch.save({"step": 3, "pipeline": {"_model.x": param.data},
                "optimizers": {k: v.state_dict() for k, v in optimizers.optimizers.items()},
                "schedulers": {k: v.state_dict() for k, v in optimizers.schedulers.items()}}, path)


def test_stock_checkpoints_load_weights_only_with_the_allow_list_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    path = tmp_path / "step-000000003.ckpt"
    _stock_nerfstudio_checkpoint(path)
    with pytest.raises(Exception, match="numpy"):
        torch.load(path)  # nerfstudio's own load (weights_only by default since torch 2.6)
    with offline.stock_checkpoint_loading():
        state = torch.load(path)
    assert isinstance(state["schedulers"]["means"]["_last_lr"][0], float) and state["step"] == 3
    with pytest.raises(Exception, match="numpy"):
        torch.load(path)  # the allow-list ends with the block: nothing is widened for the process

    torch.save({"x": NotAllowed()}, tmp_path / "other.ckpt")
    with offline.stock_checkpoint_loading(), pytest.raises(Exception, match="NotAllowed"):
        torch.load(tmp_path / "other.ckpt")


def test_nothing_in_the_package_turns_weights_only_off():
    from pathlib import Path

    package = Path(offline.__file__).parent
    offenders = [str(p) for p in package.rglob("*.py")
                 if "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in p.read_text() or "weights_only=False" in p.read_text()]
    assert offenders == []
