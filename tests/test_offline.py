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


def test_lpips_left_out_without_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(offline, "_warned_lpips", False)
    assert not offline.lpips_weights_available()
    with caplog.at_level("WARNING", logger="gvae_ns"):
        assert offline.make_lpips() is None
        assert offline.make_lpips() is None
    assert len([r for r in caplog.records if "LPIPS is left out" in r.getMessage()]) == 1


def test_lpips_built_when_weights_present(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / offline.ALEXNET_WEIGHTS).write_bytes(b"x")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    built = []
    import torchmetrics.image.lpip as lpip_module

    monkeypatch.setattr(lpip_module, "LearnedPerceptualImagePatchSimilarity", lambda **kw: built.append(kw) or "m")
    assert offline.make_lpips() == "m" and built == [{"normalize": True}]
