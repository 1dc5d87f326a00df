"""lineage.npz: round trips (float32 / float16) and rejection of damaged files."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from gvae_ns.lineage.format import EVENT_DTYPES, FORMAT_VERSION, Lineage, LineageFormatError, load_lineage, save_lineage
from gvae_ns.lineage.recorder import ID_KEY, LineageRecorder


def fake_params(n: int, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(n, 3, generator=g),
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.randn(n, 3, generator=g) - 4,
        "opacities": torch.randn(n, 1, generator=g),
        "features_dc": torch.randn(n, 3, generator=g),
        "features_rest": torch.randn(n, 15, 3, generator=g) * 0.1,
    }


def recorded_lineage() -> Lineage:
    """Seeds 0-3; step 5: clone 0 -> 4, split 1 -> 5, 6; step 7: prune 3; snapshots at 2 and 9."""
    rec = LineageRecorder()
    rec.stage_downscales = [4, 2]
    rec.stage_boundaries = [8]
    state: Dict = {"grad2d": torch.tensor([0.5, 1.0, 0.0, 2.0]), "count": torch.tensor([2.0, 1.0, 0.0, 4.0])}
    rec.snapshot(fake_params(4, 0), state, stage=0, step=2)
    # the id column as gsplat leaves it after duplicate(row 0) then split(row 1)
    state[ID_KEY] = torch.tensor([0, 2, 3, 0, 1, 1])
    rec.record_growth(state, n_before=4, n_dupli=1, n_split=1, step=5)
    assert state[ID_KEY].tolist() == [0, 2, 3, 4, 5, 6]
    before = state[ID_KEY]
    state[ID_KEY] = before[torch.tensor([0, 1, 3, 4, 5])]
    rec.record_removal(before, state, step=7)
    rec.stage = 1
    state["grad2d"], state["count"] = None, None
    rec.snapshot(fake_params(5, 1), state, stage=1, step=9)
    return rec.to_lineage()


def rewrite(path: Path, **changes: np.ndarray) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_recorded_lineage_is_what_happened():
    lin = recorded_lineage()
    assert lin.ids.tolist() == list(range(7))
    assert lin.parent.tolist() == [-1, -1, -1, -1, 0, 1, 1]
    assert lin.death_step.tolist() == [-1, 5, -1, 7, -1, -1, -1]
    assert lin.snapshot(0).grad2d.tolist() == [0.25, 1.0, 0.0, 0.5]
    assert lin.snapshot(1).ids.tolist() == [0, 2, 4, 5, 6]


def test_round_trip_float32(tmp_path):
    lin = recorded_lineage()
    path = save_lineage(lin, tmp_path / "run" / "lineage.npz")
    assert [p.name for p in path.parent.iterdir()] == ["lineage.npz"]  # no temp file left behind
    back = load_lineage(path)
    assert back.source == path and back.version == FORMAT_VERSION
    for name in ["ids", *EVENT_DTYPES, "snapshot_stage", "snapshot_step", "snapshot_offsets", "snapshot_ids",
                 "snapshot_state", "snapshot_grad2d", "snapshot_count", "stage_downscales", "stage_boundaries"]:
        a, b = getattr(lin, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with np.load(path, allow_pickle=False) as z:
        assert z["event_birth"].dtype == np.int8 and z["snapshot_state"].dtype == np.float32


def test_round_trip_float16_is_smaller_and_close(tmp_path):
    lin = recorded_lineage()
    full = save_lineage(lin, tmp_path / "f32.npz")
    half = save_lineage(lin, tmp_path / "f16.npz", float16=True)
    with np.load(half, allow_pickle=False) as z:
        assert z["snapshot_state"].dtype == np.float16
    back = load_lineage(half)
    assert back.snapshot_state.dtype == torch.float32
    assert torch.allclose(back.snapshot_state, lin.snapshot_state, rtol=1e-3, atol=1e-4)
    assert not torch.equal(back.snapshot_state, lin.snapshot_state)
    assert torch.equal(back.parent, lin.parent)
    assert half.stat().st_size < full.stat().st_size


def test_float16_overflow_is_refused(tmp_path):
    lin = recorded_lineage()
    lin.snapshot_state[0, 0] = 1e6
    with pytest.raises(ValueError, match="'means' exceeds the float16 range"):
        save_lineage(lin, tmp_path / "x.npz", float16=True)
    assert not list(tmp_path.iterdir())


def test_truncated_file_rejected(tmp_path):
    path = save_lineage(recorded_lineage(), tmp_path / "lineage.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LineageFormatError, match=r"lineage\.npz: not a readable lineage file \(truncated or corrupt"):
        load_lineage(path)
    path.write_bytes(b"not a zip at all")
    with pytest.raises(LineageFormatError, match="truncated or corrupt"):
        load_lineage(path)


def test_wrong_version_rejected(tmp_path):
    path = save_lineage(recorded_lineage(), tmp_path / "lineage.npz")
    rewrite(path, format_version=np.array(99, dtype=np.int64))
    with pytest.raises(LineageFormatError, match="unsupported lineage format version 99; this reader supports version 1"):
        load_lineage(path)


def test_dangling_parent_rejected(tmp_path):
    lin = recorded_lineage()
    path = save_lineage(lin, tmp_path / "lineage.npz")
    parent = lin.parent.numpy().copy()
    parent[5] = 3  # fine: 3 exists and is older
    rewrite(path, event_parent=parent)
    load_lineage(path)
    keep = np.array([0, 2, 3, 4, 5, 6])  # drop id 1, the parent of 5 and 6
    arrays = {f"event_{n}": getattr(lin, n).numpy()[keep] for n in EVENT_DTYPES}
    rewrite(path, event_id=lin.ids.numpy()[keep], **arrays)
    with pytest.raises(LineageFormatError, match=r"lineage\.npz: dangling parent: id 5 has parent 1"):
        load_lineage(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda lin: {"event_id": np.array([0, 1, 2, 3, 4, 4, 6])}, "duplicate id 4"),
        (lambda lin: {"snapshot_ids": np.array([0, 1, 2, 3, 0, 2, 4, 5, 66])}, "snapshot id 66 is not in the event table"),
        (lambda lin: {"snapshot_ids": np.array([0, 1, 2, 3, 0, 2, 4, 5, 3])}, "snapshot 1 \\(step 9\\) holds id 3, which is not alive"),
        (lambda lin: {"event_birth": lin.birth.numpy().astype(np.int64)}, "'birth' must be torch.int8"),
        (lambda lin: {"snapshot_state": lin.snapshot_state.numpy()[:, :58]}, "'snapshot_state' must be float of shape \\[9, 59\\]"),
    ],
)
def test_inconsistent_files_rejected(tmp_path, change, message):
    lin = recorded_lineage()
    path = save_lineage(lin, tmp_path / "lineage.npz")
    rewrite(path, **change(lin))
    with pytest.raises(LineageFormatError, match=message):
        load_lineage(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such lineage file"):
        load_lineage(tmp_path / "nope.npz")
