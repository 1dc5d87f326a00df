"""LineageStrategy / LineageRecorder against what gsplat 1.4.0's ops actually do, on CPU."""

from __future__ import annotations

import io
import math
from typing import Dict, List, Tuple

import pytest
import torch

from gvae_ns.lineage.format import ALIVE, CLONE, PRUNED, SEED, SPLIT, SPLIT_REPLACED
from gvae_ns.lineage.recorder import ID_KEY, LineageRecorder, LineageStrategy

W = H = 100  # image size; gsplat scales x-gradients by W / 2 and radii by 1 / max(W, H)


def make_scene(scales: List[float], opacities: List[float]) -> Tuple[torch.nn.ParameterDict, Dict[str, torch.optim.Optimizer]]:
    """Gaussians with the given max scale and opacity; features_dc[:, 0] = row index (a signature)."""
    n = len(scales)
    g = torch.Generator().manual_seed(0)
    params = torch.nn.ParameterDict(
        {
            "means": torch.randn(n, 3, generator=g),
            "scales": torch.log(torch.tensor(scales)).unsqueeze(1).repeat(1, 3),
            "quats": torch.randn(n, 4, generator=g),
            "opacities": torch.logit(torch.tensor(opacities)).unsqueeze(1),
            "features_dc": torch.stack([torch.arange(n).float(), torch.zeros(n), torch.zeros(n)], dim=1),
            "features_rest": torch.zeros(n, 15, 3),
        }
    )
    optimizers = {k: torch.optim.Adam([{"params": p, "lr": 1e-3, "name": k}]) for k, p in params.items()}
    return params, optimizers


def make_info(grads: List[float], radii: List[float]) -> Dict:
    """Fake rasterizer output whose normalised view-space gradient norms are ``grads``."""
    n = len(grads)
    means2d = torch.zeros(1, n, 2, requires_grad=True)
    grad = torch.zeros(1, n, 2)
    grad[0, :, 0] = torch.tensor(grads) / (W / 2.0)
    means2d.grad = grad
    return {
        "means2d": means2d,
        "radii": torch.tensor(radii).reshape(1, n),
        "width": W,
        "height": H,
        "n_cameras": 1,
        "gaussian_ids": None,
    }


def make_strategy(**kw) -> LineageStrategy:
    base = dict(refine_start_iter=0, refine_every=10, reset_every=1000, pause_refine_after_reset=0, grow_grad2d=0.5, grow_scale3d=0.01, prune_opa=0.05)
    base.update(kw)
    return LineageStrategy(**base)


def events(rec: LineageRecorder) -> Dict[int, Tuple[int, int, int, int]]:
    """id -> (parent, birth, death_cause, death_step)."""
    lin = rec.to_lineage()
    return {
        int(i): (int(p), int(b), int(c), int(d))
        for i, p, b, c, d in zip(lin.ids, lin.parent, lin.birth, lin.death_cause, lin.death_step)
    }


def test_clone_split_prune_in_one_step():
    small, large, hi, lo = 0.005, 0.05, 0.5, 0.01
    # row: 0 clone, 1 split, 2 prune, 3 clone (copy and original pruned), 4 split (children pruned), 5 idle
    params, opt = make_scene([small, large, small, small, large, small], [hi, hi, lo, lo, lo, hi])
    seed_means = params["means"].detach().clone()
    strat = make_strategy()
    state = strat.initialize_state()
    info = make_info([1, 1, 0, 1, 1, 0], [5] * 6)
    strat.step_pre_backward(params, opt, state, 10, info)
    assert state[ID_KEY].tolist() == list(range(6))
    strat.step_post_backward(params, opt, state, 10, info)

    ids = state[ID_KEY]
    assert ids.tolist() == [0, 5, 6, 8, 10]
    assert ids.shape[0] == params["means"].shape[0]
    assert strat.recorder.live_ids is ids
    # every row's signature is the seed it descends from
    assert params["features_dc"][:, 0].tolist() == [0, 5, 0, 1, 1]
    assert torch.equal(params["means"][2], seed_means[0])  # id 6 is an unchanged copy of 0
    assert not torch.equal(params["means"][3], seed_means[1])  # split children are resampled
    assert torch.allclose(params["scales"][3:5], torch.full((2, 3), math.log(large / 1.6)))
    assert events(strat.recorder) == {
        0: (-1, SEED, ALIVE, -1),
        1: (-1, SEED, SPLIT_REPLACED, 10),
        2: (-1, SEED, PRUNED, 10),
        3: (-1, SEED, PRUNED, 10),
        4: (-1, SEED, SPLIT_REPLACED, 10),
        5: (-1, SEED, ALIVE, -1),
        6: (0, CLONE, ALIVE, -1),
        7: (3, CLONE, PRUNED, 10),
        8: (1, SPLIT, ALIVE, -1),
        9: (4, SPLIT, PRUNED, 10),
        10: (1, SPLIT, ALIVE, -1),
        11: (4, SPLIT, PRUNED, 10),
    }
    strat.recorder.to_lineage().validate()


def test_same_gaussian_cloned_and_split():
    """The screen-size rule can mark a small Gaussian for both duplicate and split."""
    small, hi, lo = 0.005, 0.5, 0.01
    # row: 0 clone + screen split, 1 screen split, 2 clone, 3 idle, 4 pruned
    params, opt = make_scene([small] * 5, [hi, hi, hi, hi, lo])
    strat = make_strategy(refine_scale2d_stop_iter=100)
    strat.recorder.stage = 2
    state = strat.initialize_state()
    info = make_info([1, 0, 1, 0, 0], [10, 10, 1, 1, 1])
    strat.step_pre_backward(params, opt, state, 10, info)
    strat.step_post_backward(params, opt, state, 10, info)

    assert state[ID_KEY].tolist() == [2, 3, 5, 6, 7, 8, 9, 10]
    assert params["features_dc"][:, 0].tolist() == [2, 3, 0, 2, 0, 1, 0, 1]
    assert torch.allclose(params["scales"][2], torch.full((3,), math.log(small)))  # the clone of 0
    assert torch.allclose(params["scales"][4], torch.full((3,), math.log(small / 1.6)))  # a split child of 0
    ev = events(strat.recorder)
    assert ev[0] == (-1, SEED, SPLIT_REPLACED, 10)
    assert ev[5] == (0, CLONE, ALIVE, -1)
    assert ev[6] == (2, CLONE, ALIVE, -1)
    assert [ev[i][:2] for i in (7, 8, 9, 10)] == [(0, SPLIT), (1, SPLIT), (0, SPLIT), (1, SPLIT)]
    assert ev[1][2] == SPLIT_REPLACED and ev[4][2] == PRUNED and ev[2][2] == ALIVE
    lin = strat.recorder.to_lineage()
    assert set(lin.birth_stage.tolist()) == {2}
    assert lin.death_stage[lin.death_cause != ALIVE].tolist() == [2, 2, 2]


def run_random_steps(strat, params, opt, state, steps, gen) -> None:
    """Refinement steps with random gradients, sizes and opacity drops; checks each step's events
    against the parameter rows gsplat produced."""
    for step in steps:
        n = params["means"].shape[0]
        with torch.no_grad():
            drop = torch.rand(n, generator=gen) < 0.15
            params["opacities"][drop] = -6.0
            params["scales"].add_(0.6 * torch.randn(n, 1, generator=gen))
        info = make_info((torch.rand(n, generator=gen) * 1.2).tolist(), [5.0] * n)
        strat.step_pre_backward(params, opt, state, step, info)
        before_ids = state[ID_KEY].clone()
        before = {k: params[k].detach().clone() for k in ("means", "scales")}
        strat.step_post_backward(params, opt, state, step, info)
        ids = state[ID_KEY]
        lin = strat.recorder.to_lineage()
        lin.validate()
        assert ids.shape[0] == params["means"].shape[0]
        assert bool((ids[1:] > ids[:-1]).all())
        old = torch.isin(ids, before_ids)
        row_before = torch.searchsorted(before_ids, ids)
        # survivors are untouched rows
        assert torch.equal(params["means"][old], before["means"][row_before[old]])
        # new rows: parent was a row before this step, and the params match the event kind
        new = ids[~old]

        def col(name: str, of: torch.Tensor) -> torch.Tensor:
            return getattr(lin, name)[lin.rows_of(of)]

        assert bool((col("birth_step", new) == step).all())
        parents = col("parent", new)
        prow = torch.searchsorted(before_ids, parents)
        assert torch.equal(before_ids[prow], parents)
        clone = col("birth", new) == CLONE
        new_rows = (~old).nonzero().flatten()
        assert torch.equal(params["means"][new_rows[clone]], before["means"][prow[clone]])
        assert torch.equal(params["scales"][new_rows[clone]], before["scales"][prow[clone]])
        split = col("birth", new) == SPLIT
        assert torch.allclose(params["scales"][new_rows[split]], before["scales"][prow[split]] - math.log(1.6), atol=1e-6)
        assert bool((col("death_cause", parents[split]) == SPLIT_REPLACED).all())
        # the ids that vanished died now, as split originals or pruned
        gone = before_ids[~torch.isin(before_ids, ids)]
        assert bool((col("death_step", gone) == step).all())
        assert bool((col("death_cause", gone) != ALIVE).all())
        # signature: every row descends from the seed whose index it carries
        root = ids.clone()
        for _ in range(64):
            p = col("parent", root)
            root = torch.where(p >= 0, p, root)
        assert torch.equal(params["features_dc"][:, 0].long(), root)


def test_random_steps_match_gsplat_rows():
    gen = torch.Generator().manual_seed(1)
    n = 60
    params, opt = make_scene((torch.rand(n, generator=gen) * 0.02).tolist(), [0.5] * n)
    strat = make_strategy()
    state = strat.initialize_state()
    run_random_steps(strat, params, opt, state, range(10, 90, 10), gen)
    lin = strat.recorder.to_lineage()
    assert (lin.birth == CLONE).any() and (lin.birth == SPLIT).any() and (lin.death_cause == PRUNED).any()


def test_snapshot_contents_and_stage_replacement():
    params, opt = make_scene([0.005, 0.05, 0.005], [0.5, 0.5, 0.01])
    strat = make_strategy()
    state = strat.initialize_state()
    rec = strat.recorder
    rec.snapshot(params, state, stage=0, step=0)  # seeds ids, no gradient statistics yet
    assert rec.to_lineage().snapshot(0).grad2d.tolist() == [0.0, 0.0, 0.0]
    info = make_info([1.0, 0.2, 0.0], [5.0, 5.0, 0.0])
    strat.step_pre_backward(params, opt, state, 3, info)
    strat.step_post_backward(params, opt, state, 3, info)  # no refinement at step 3
    rec.snapshot(params, state, stage=0, step=3)  # replaces stage 0
    lin = rec.to_lineage()
    assert lin.num_snapshots == 1
    snap = lin.snapshot(0)
    assert snap.step == 3 and snap.ids.tolist() == [0, 1, 2]
    assert torch.allclose(snap.grad2d, torch.tensor([1.0, 0.2, 0.0]))
    assert snap.count.tolist() == [1.0, 1.0, 0.0]
    assert torch.equal(snap.state[:, 7:10], params["scales"].detach())
    rec.snapshot(params, state, stage=1, step=4)
    assert rec.num_snapshots == 2
    with pytest.raises(ValueError, match="stages must not decrease"):
        rec.snapshot(params, state, stage=0, step=5)


def test_state_dict_resume_keeps_ids_and_events():
    gen = torch.Generator().manual_seed(2)
    n = 40
    params, opt = make_scene((torch.rand(n, generator=gen) * 0.02).tolist(), [0.5] * n)
    strat = make_strategy()
    strat.recorder.stage_downscales = [4, 2]
    strat.recorder.stage_boundaries = [20]
    state = strat.initialize_state()
    run_random_steps(strat, params, opt, state, [10, 20], gen)
    strat.recorder.stage = 1
    strat.recorder.snapshot(params, state, stage=0, step=20)

    buf = io.BytesIO()
    torch.save({"lineage": strat.recorder.state_dict()}, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)["lineage"]
    resumed = make_strategy()
    resumed.recorder.load_state_dict(sd)
    before = strat.recorder.to_lineage()
    after = resumed.recorder.to_lineage()
    for name in ("ids", "parent", "birth", "birth_step", "death_step", "death_cause", "snapshot_ids", "snapshot_state"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert resumed.recorder.stage == 1 and resumed.recorder.stage_downscales == [4, 2]

    # a freshly initialised strategy state (nerfstudio does not checkpoint it) picks up the ids
    new_state = resumed.initialize_state()
    next_id = resumed.recorder.next_id
    run_random_steps(resumed, params, opt, new_state, [30, 40], gen)
    lin = resumed.recorder.to_lineage()
    assert torch.equal(lin.ids[: before.num_ids], before.ids)
    assert torch.equal(lin.parent[: before.num_ids], before.parent)
    assert bool((lin.birth_step[before.num_ids :] >= 30).all())
    assert int(lin.ids[before.num_ids]) == next_id


def test_truncate_after_restores_older_checkpoint():
    gen = torch.Generator().manual_seed(3)
    n = 40
    params, opt = make_scene((torch.rand(n, generator=gen) * 0.02).tolist(), [0.5] * n)
    strat = make_strategy()
    state = strat.initialize_state()
    run_random_steps(strat, params, opt, state, [10, 20], gen)
    strat.recorder.snapshot(params, state, stage=0, step=20)
    at20 = strat.recorder.to_lineage()
    params20 = {k: v.detach().clone() for k, v in params.items()}
    run_random_steps(strat, params, opt, state, [30, 40], gen)
    strat.recorder.snapshot(params, state, stage=1, step=40)
    retired = strat.recorder.next_id
    assert retired > at20.num_ids

    strat.recorder.truncate_after(20)
    lin = strat.recorder.to_lineage()
    for name in ("ids", "parent", "birth", "birth_step", "death_step", "death_cause", "snapshot_ids", "snapshot_stage"):
        assert torch.equal(getattr(lin, name), getattr(at20, name)), name
    # the checkpoint at step 20: rows = live ids in increasing order; new ids are never reused
    params2, opt2 = make_scene([0.005] * params20["means"].shape[0], [0.5] * params20["means"].shape[0])
    with torch.no_grad():
        for k in params2:
            params2[k].copy_(params20[k])
    state2 = strat.initialize_state()
    run_random_steps(strat, params2, opt2, state2, [30], gen)
    lin = strat.recorder.to_lineage()
    fresh = lin.ids[lin.ids >= at20.num_ids]
    assert fresh.numel() > 0 and int(fresh.min()) >= retired


def test_row_count_mismatch_is_explained():
    params, opt = make_scene([0.005] * 3, [0.5] * 3)
    strat = make_strategy()
    state = strat.initialize_state()
    strat.recorder.sync_ids(state, 3, 0, "cpu")
    params2, _ = make_scene([0.005] * 4, [0.5] * 4)
    with pytest.raises(ValueError, match="tracks 3 Gaussian ids but the parameters have 4 rows"):
        strat.recorder.snapshot(params2, state, stage=0, step=0)
