"""Transitions and histories on a small hand-built lineage.

Snapshot 0 (step 10): seeds 0, 1, 2.
Step 15: clone 0 -> 3, split 1 -> 4, 5, prune 2.  Step 18: clone 3 -> 6, split 4 -> 7, 8.
Snapshot 1 (step 20): 0, 3, 5, 6, 7, 8.
Step 22: a late seed 11.  Step 25: split 0 -> 9, 10, prune 5.
Snapshot 2 (step 30): 3, 6, 7, 8, 9, 10, 11.
State column 0 of a snapshot row is ``id + 100 * snapshot``; column OPACITY is set per row.
"""

from __future__ import annotations

import json
import math
from typing import Dict, List

import pytest
import torch

from gvae_ns.gaussians import OPACITY, PACKED_DIM
from gvae_ns.lineage.dataset import ancestor_rows, build_transitions, depths, final_histories
from gvae_ns.lineage.format import ALIVE, CLONE, PRUNED, SEED, SPLIT, SPLIT_REPLACED, Lineage

#        id: parent, birth, birth_step, death_step, death_cause
EVENTS = {
    0: (-1, SEED, 0, 25, SPLIT_REPLACED),
    1: (-1, SEED, 0, 15, SPLIT_REPLACED),
    2: (-1, SEED, 0, 15, PRUNED),
    3: (0, CLONE, 15, -1, ALIVE),
    4: (1, SPLIT, 15, 18, SPLIT_REPLACED),
    5: (1, SPLIT, 15, 25, PRUNED),
    6: (3, CLONE, 18, -1, ALIVE),
    7: (4, SPLIT, 18, -1, ALIVE),
    8: (4, SPLIT, 18, -1, ALIVE),
    9: (0, SPLIT, 25, -1, ALIVE),
    10: (0, SPLIT, 25, -1, ALIVE),
    11: (-1, SEED, 22, -1, ALIVE),
}
# (step, {id: opacity logit})
SNAPSHOTS = [
    (10, {0: 0.0, 1: 0.0, 2: 0.0}),
    (20, {0: 0.0, 3: 1.0, 5: -1.0, 6: 2.0, 7: 3.0, 8: 0.5}),
    (30, {3: 0.0, 6: 0.0, 7: 0.0, 8: 0.0, 9: 1.0, 10: 2.0, 11: 0.0}),
]


def hand_lineage() -> Lineage:
    ids = sorted(EVENTS)
    col = lambda i, dtype: torch.tensor([EVENTS[k][i] for k in ids], dtype=dtype)  # noqa: E731
    stage_of = lambda step: 0 if step < 20 else (1 if step < 30 else 2)  # noqa: E731
    death_step = col(3, torch.int32)
    snap_ids: List[int] = []
    states = []
    for k, (_, ops) in enumerate(SNAPSHOTS):
        for i, opa in ops.items():
            s = torch.zeros(PACKED_DIM)
            s[0] = i + 100 * k
            s[OPACITY] = opa
            snap_ids.append(i)
            states.append(s)
    counts = torch.tensor([len(o) for _, o in SNAPSHOTS])
    lin = Lineage(
        ids=torch.tensor(ids),
        parent=col(0, torch.int64),
        birth=col(1, torch.int8),
        birth_step=col(2, torch.int32),
        birth_stage=torch.tensor([stage_of(EVENTS[k][2]) for k in ids], dtype=torch.int16),
        death_step=death_step,
        death_stage=torch.tensor([stage_of(EVENTS[k][3]) if EVENTS[k][3] >= 0 else -1 for k in ids], dtype=torch.int16),
        death_cause=col(4, torch.int8),
        snapshot_stage=torch.arange(3),
        snapshot_step=torch.tensor([s for s, _ in SNAPSHOTS]),
        snapshot_offsets=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        snapshot_ids=torch.tensor(snap_ids),
        snapshot_state=torch.stack(states),
        snapshot_grad2d=torch.zeros(len(snap_ids)),
        snapshot_count=torch.zeros(len(snap_ids)),
        stage_downscales=torch.tensor([4, 2, 1]),
        stage_boundaries=torch.tensor([20, 30]),
    )
    lin.validate()
    return lin


def rows_by_parent(ts) -> Dict[tuple, int]:
    return {(int(s), int(p)): i for i, (s, p) in enumerate(zip(ts.stage, ts.parent_ids))}


def test_ancestors_and_depths():
    lin = hand_lineage()
    assert ancestor_rows(lin, 0).tolist() == [0, 1, 2, 0, 1, 1, 0, 1, 1, 0, 0, -1]
    assert ancestor_rows(lin, 1).tolist() == [0, -1, -1, 3, -1, 5, 6, 7, 8, 0, 0, -1]
    assert depths(lin).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 1, 1, 0]


def test_transitions_partition_the_next_snapshot():
    lin = hand_lineage()
    ts = build_transitions(lin, max_children=8)
    assert len(ts) == 3 + 6
    assert ts.num_overflow == 0 and ts.num_orphans == 1  # the late seed 11
    idx = rows_by_parent(ts)
    kids = lambda s, p: ts.children_ids[idx[(s, p)]][ts.children_mask[idx[(s, p)]]].tolist()  # noqa: E731
    assert kids(0, 0) == [0, 6, 3]  # itself first, then by descending opacity
    assert kids(0, 1) == [7, 8, 5]
    assert kids(0, 2) == []  # pruned without descendants: kept, all-False mask
    assert kids(1, 0) == [10, 9]
    assert [kids(1, p) for p in (3, 5, 6, 7, 8)] == [[3], [], [6], [7], [8]]
    for s in (0, 1):
        rows = ts.stage == s
        got = sorted(ts.children_ids[rows][ts.children_mask[rows]].tolist())
        assert got == sorted(i for i in SNAPSHOTS[s + 1][1] if i != 11)
    assert ts.num_children.tolist() == [3, 3, 0, 2, 1, 0, 1, 1, 1]
    # children carry their snapshot s + 1 state
    r = idx[(0, 1)]
    assert ts.children[r, :3, 0].tolist() == [107, 108, 105]
    assert ts.children[r, 3:].abs().sum() == 0


def test_histories_follow_the_ancestor_chain():
    lin = hand_lineage()
    ts = build_transitions(lin)
    idx = rows_by_parent(ts)
    r = idx[(1, 6)]  # 6 <- 3 <- 0
    assert ts.history_mask[r].tolist() == [True, True, False]
    assert ts.history[r, :, 0].tolist() == [0, 106, 0]
    r = idx[(1, 7)]  # 7 <- 4 <- 1
    assert ts.history[r, :2, 0].tolist() == [1, 107]
    assert ts.history[r, 2].abs().sum() == 0
    r = idx[(0, 2)]
    assert ts.history_mask[r].tolist() == [True, False, False]
    hist, mask, ids = final_histories(lin)
    assert ids.tolist() == [3, 6, 7, 8, 9, 10, 11]
    assert hist[4, :, 0].tolist() == [0, 100, 209]  # 9 <- 0
    assert mask[6].tolist() == [False, False, True]  # late seed: no ancestors before snapshot 2
    assert bool(mask[:6].all())


def test_overflow_keeps_self_and_most_opaque():
    lin = hand_lineage()
    ts = build_transitions(lin, max_children=2)
    assert ts.num_overflow == 2
    idx = rows_by_parent(ts)
    assert ts.children_ids[idx[(0, 0)]].tolist() == [0, 6]
    assert ts.children_ids[idx[(0, 1)]].tolist() == [7, 8]
    assert ts.children_ids[idx[(0, 2)]].tolist() == [-1, -1]
    sub = ts[ts.stage == 1]
    assert len(sub) == 6 and sub.children.shape == (6, 2, PACKED_DIM)


def test_report_cli_writes_json_and_figure(tmp_path, capsys):
    from gvae_ns.lineage.format import save_lineage
    from gvae_ns.lineage.report import JSON_NAME, PNG_NAME, main

    run = tmp_path / "outputs" / "scene" / "gaussianvae" / "2026"
    save_lineage(hand_lineage(), run / "lineage.npz")
    main([str(tmp_path / "outputs")])
    summary = json.loads((run / JSON_NAME).read_text())
    assert (run / PNG_NAME).read_bytes()[:4] == b"\x89PNG"
    assert [s["count"] for s in summary["snapshots"]] == [3, 6, 7]
    stage = {s["stage"]: s for s in summary["stages"]}
    assert (stage[0]["seeds"], stage[0]["clones"], stage[0]["splits"], stage[0]["split_children"], stage[0]["prunes"]) == (3, 2, 2, 4, 1)
    assert (stage[1]["seeds"], stage[1]["clones"], stage[1]["splits"], stage[1]["split_children"], stage[1]["prunes"]) == (1, 0, 1, 2, 1)
    assert stage[2]["downscale"] == 1 and stage[2]["clones"] == 0
    assert summary["depth_histogram_final"] == [1, 3, 3]
    t0, t1 = summary["transitions"]
    assert (t0["parents"], t0["parents_without_descendants"], t0["pairs"], t0["new_pairs"], t0["orphans"]) == (3, 1, 6, 5, 0)
    assert (t1["parents"], t1["parents_without_descendants"], t1["pairs"], t1["orphans"]) == (6, 1, 6, 1)
    assert t0["dropped_at_max_children"] == 0 and t0["dlog_scale"]["mean"] == 0.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = sum(sig(x) - 0.5 for x in (0.0, 1.0, 2.0, -1.0, 3.0, 0.5)) / 6
    assert t0["dopacity"]["mean"] == pytest.approx(expected, abs=1e-6)
    assert "stage" in capsys.readouterr().out


def test_report_cli_without_lineage_file(tmp_path, capsys):
    from gvae_ns.lineage.report import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path)])
    assert exc.value.code == 1
    assert "no lineage.npz below this directory" in capsys.readouterr().err
