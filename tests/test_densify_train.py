"""Training the generative densification head, its file, stage-wise densify and the generative refiner."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gvae_ns.densify.apply import densify
from gvae_ns.densify.head import DensifyHead, DensifyHeadConfig
from gvae_ns.densify.train import (
    DensifyTrainConfig,
    densify_loss,
    load_densify_head,
    save_densify_head,
    spatial_batches,
    train_densify_head,
)
from gvae_ns.gaussians import MEANS, OPACITY, QUATS, SCALES, SH_DC, SH_REST, PACKED_DIM
from gvae_ns.lineage.dataset import TransitionSet
from gvae_ns.quaternions import rotate as quat_rotate
from gvae_ns.run_layout import DENSIFY_HEAD_FILE

HEAD = DensifyHeadConfig(children=2, width=32, num_heads=4, patch_size=16)
STEPS = 60


def split_parents(n: int, seed: int) -> torch.Tensor:
    """``n`` random anisotropic Gaussians in a 4-unit box, ``[n, 59]``."""
    g = torch.Generator().manual_seed(seed)
    parent = torch.zeros(n, PACKED_DIM)
    parent[:, MEANS] = torch.rand(n, 3, generator=g) * 4.0
    parent[:, QUATS] = F.normalize(torch.randn(n, 4, generator=g), dim=-1)
    parent[:, SCALES] = torch.log(torch.tensor([0.12, 0.04, 0.03])) + 0.3 * torch.randn(n, 1, generator=g)
    parent[:, OPACITY] = torch.randn(n, 1, generator=g)
    parent[:, SH_DC] = 0.5 * torch.randn(n, 3, generator=g)
    parent[:, SH_REST] = 0.05 * torch.randn(n, 45, generator=g)
    return parent


def transition_set(parent: torch.Tensor, num_children: torch.Tensor) -> TransitionSet:
    """Parents at stage 0; a parent with 2 children splits along its major axis (+-1 sigma), one with 1
    continues as it is, one with 0 died."""
    n = parent.shape[0]
    axis = quat_rotate(parent[:, QUATS], torch.tensor([1.0, 0.0, 0.0]).expand(n, 3))
    sigma = parent[:, SCALES].exp()[:, :1]
    halves = []
    for sign in (1.0, -1.0):
        child = parent.clone()
        child[:, MEANS] = parent[:, MEANS] + sign * sigma * axis
        child[:, SCALES] = parent[:, SCALES] - math.log(1.6)
        child[:, OPACITY] = parent[:, OPACITY] - 0.5
        child[:, SH_DC] = 0.8 * parent[:, SH_DC]
        halves.append(child)
    split = num_children == 2
    children = torch.zeros(n, 4, PACKED_DIM)
    children[:, 0] = torch.where(split[:, None], halves[0], parent)
    children[:, 1] = halves[1]
    cmask = torch.arange(4)[None, :] < num_children[:, None]
    history = torch.stack([parent, torch.zeros_like(parent)], dim=1)
    hmask = torch.tensor([True, False]).expand(n, 2).clone()
    return TransitionSet(history=history, history_mask=hmask, children=children, children_mask=cmask,
                         stage=torch.zeros(n, dtype=torch.long), parent_ids=torch.arange(n),
                         children_ids=torch.where(cmask, 1, -1), num_children=num_children)


def all_split(n: int, seed: int) -> TransitionSet:
    return transition_set(split_parents(n, seed), torch.full((n,), 2))


@pytest.fixture(scope="module")
def trained():
    head, log = train_densify_head(all_split(96, seed=0), DensifyTrainConfig(head=HEAD, steps=STEPS, batch_size=48,
                                                                            lr=3e-3, log_every=5))
    return head, log


def held_out_chamfer(head: DensifyHead) -> float:
    test = all_split(48, seed=1)
    with torch.no_grad():
        terms = densify_loss(head.eval(), test.history[:, 0], test.children, test.children_mask,
                             DensifyTrainConfig().weights)
    return float(terms["chamfer"])


def test_training_loss_falls_and_children_land_on_the_targets(trained):
    head, log = trained
    assert log["parents"] == 96 and log["split_parents"] == 96 and log["batches_per_epoch"] >= 2
    first, last = log["total"][0], sum(log["total"][-3:]) / 3
    assert last * 3 <= first, f"loss fell only from {first:.3f} to {last:.3f}"
    torch.manual_seed(0)
    untrained = held_out_chamfer(DensifyHead(HEAD))
    trained_cd = held_out_chamfer(head)
    assert trained_cd < 0.25 * untrained, (trained_cd, untrained)


def test_parents_that_do_not_split_are_left_alone():
    # As in 3D-GS: the large Gaussians split; of the others, the transparent ones die.
    parent = split_parents(96, seed=2)
    large = torch.arange(96) % 2 == 0
    parent[large, SCALES] += 1.0
    counts = torch.where(large, 2, torch.where(parent[:, OPACITY].flatten() > 0, 1, 0))
    config = DensifyTrainConfig(head=HEAD, steps=150, batch_size=48, lr=3e-3)
    head, log = train_densify_head(transition_set(parent, counts), config)
    assert log["split_parents"] == 48 and log["dead_parents"] > 10
    generated, source = densify(head, parent, steps=1, max_new=10_000)
    densified = torch.zeros(96, dtype=torch.bool)
    densified[source] = True
    assert bool(densified[counts == 2].float().mean() > 0.9)
    assert bool(densified[counts < 2].float().mean() < 0.1)


def test_batches_are_contiguous_curve_runs_within_a_stage():
    g = torch.Generator().manual_seed(0)
    means = torch.rand(1000, 3, generator=g)
    stage = torch.tensor([0] * 600 + [1] * 400)
    batches = spatial_batches(means, stage, 16, g)
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    assert all(len(b) <= 16 and len(torch.unique(stage[b])) == 1 for b in batches)
    # A curve run is compact: its spread is far below that of random rows of the same size.
    spread = lambda idx: float(means[idx].std(dim=0).mean())  # noqa: E731
    full = [b for b in batches if len(b) == 16]
    assert sum(map(spread, full)) / len(full) < 0.5 * spread(torch.arange(16))
    assert [b.tolist() for b in spatial_batches(means, stage, 16, torch.Generator().manual_seed(0))] != \
        [b.tolist() for b in spatial_batches(means, stage, 16, torch.Generator().manual_seed(1))], "borders move"


def test_save_load_round_trip_and_bad_files(trained, tmp_path):
    head, _ = trained
    path = save_densify_head(head, tmp_path / "densify_head.pt")
    loaded = load_densify_head(path)
    assert loaded.cfg == head.cfg and not loaded.training
    x = split_parents(20, seed=3)
    with torch.no_grad():
        a, b = head(x), loaded(x)
    torch.testing.assert_close(a.states, b.states)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["densify_head.pt"], "no temp file is left behind"

    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_densify_head(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_densify_head(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(ValueError, match="other.pt"):
        load_densify_head(other)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_densify_outputs_valid_bounded_deterministic_gaussians(trained, steps):
    head, _ = trained
    x = split_parents(40, seed=4)
    cap = 60
    generated, source = densify(head, x, steps=steps, max_new=cap)
    assert generated.shape[0] == source.shape[0] and 0 < generated.shape[0] <= cap
    assert bool(torch.isfinite(generated).all())
    assert float(generated[:, QUATS].norm(dim=-1).min()) > 0.5
    assert bool((generated[:, SCALES] <= x[source, SCALES] + 1e-6).all())
    assert bool((source[1:] >= source[:-1]).all()), "grouped by source row"
    again, again_source = densify(head, x, steps=steps, max_new=cap)
    assert torch.equal(generated, again) and torch.equal(source, again_source)
    assert densify(head, x, steps=steps, max_new=0)[0].shape[0] == 0
    # Uncapped, every stage densifies again: at least two leaves per Gaussian per stage.
    free, free_source = densify(head, x[:6], steps=steps, max_new=10**6)
    assert free.shape[0] >= 6 * 2**steps and torch.equal(free_source.unique(), torch.arange(6))


def test_cap_takes_whole_families_in_row_order_for_a_one_layer_head():
    torch.manual_seed(0)
    head = DensifyHead(dataclasses.replace(HEAD, num_layers=1))
    x = split_parents(8, seed=6)
    generated, source = densify(head, x, steps=1, max_new=11)
    assert generated.shape[0] == 10 and source.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_head_for_run_trains_once_then_loads(tmp_path, monkeypatch):
    from gvae_ns.lineage.recorder import LineageRecorder
    from gvae_ns.refine import decoder as decoders
    from gvae_ns.tagged_file import Provenance

    state = split_parents(24, seed=7)
    params = {"means": state[:, MEANS], "quats": state[:, QUATS], "scales": state[:, SCALES],
              "opacities": state[:, OPACITY], "features_dc": state[:, SH_DC],
              "features_rest": state[:, SH_REST].reshape(24, 15, 3)}
    recorder = LineageRecorder()
    recorder.snapshot(params, {}, stage=0, step=0)
    recorder.snapshot(params, {}, stage=1, step=10)
    monkeypatch.setattr(decoders, "DensifyTrainConfig", lambda steps: DensifyTrainConfig(head=HEAD, steps=steps))
    provenance = Provenance(step=10, num_gaussians=24, gaussians_sha256="a" * 64, config_sha256="b" * 64)
    path = tmp_path / DENSIFY_HEAD_FILE
    messages: list = []

    def get(retrain=False):
        return decoders.decoder_for_run("generative", path, recorder.to_lineage(), provenance, 3, "cpu",
                                        retrain=retrain, log=messages.append)

    first = get()
    assert path.is_file() and "trained" in messages[-1]
    again = get()
    assert "using" in messages[-1]
    for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values()):
        torch.testing.assert_close(a, b)
    get(retrain=True)
    assert "trained" in messages[-1]


def test_generative_refiner_replaces_selected_by_their_descendants(trained, tmp_path):
    from gvae_ns.lineage.recorder import LineageRecorder
    from gvae_ns.refine.decoder import DensifyHeadDecoder, decoder_class
    from gvae_ns.refine.refiner import Refiner, RunState
    from gvae_ns.refine.result import load_refinement, save_refinement
    from gvae_ns.tagged_file import Provenance

    head, _ = trained
    n = 30
    state = split_parents(n, seed=5)
    params = {"means": state[:, MEANS], "quats": state[:, QUATS], "scales": state[:, SCALES],
              "opacities": state[:, OPACITY], "features_dc": state[:, SH_DC],
              "features_rest": state[:, SH_REST].reshape(n, 15, 3)}
    recorder = LineageRecorder()
    strategy_state: dict = {}
    recorder.snapshot(params, strategy_state, stage=0, step=0)
    recorder.snapshot(params, strategy_state, stage=1, step=10)
    provenance = Provenance(step=10, num_gaussians=n, gaussians_sha256="a" * 64, config_sha256="b" * 64)
    run = RunState(params=params, lineage=recorder.to_lineage(), live_ids=recorder.live_ids, provenance=provenance,
                   run_dir=None, device="cpu")
    scores = {"grad2d": torch.linspace(1.0, 0.1, n), "hessian": torch.linspace(1.0, 0.1, n)}
    refiner = Refiner(run, DensifyHeadDecoder(head), scores, fraction=0.5, max_new_ratio=1.0)
    out = refiner.refine(2, "hessian")

    assert torch.equal(out.selected, torch.arange(15))
    assert 0 < len(out.removed) and set(out.removed.tolist()) <= set(out.selected.tolist())
    assert 0 < out.num_added <= 15
    kept = torch.ones(n, dtype=torch.bool)
    kept[out.removed] = False
    assert torch.equal(out.params["means"][~out.is_new], state[kept, MEANS])
    assert not bool(out.is_new[: int(kept.sum())].any()) and bool(out.is_new[int(kept.sum()):].all())
    largest = state[out.removed, SCALES].max()
    assert bool((out.params["scales"][out.is_new] <= largest + 1e-6).all())
    path = save_refinement(out, tmp_path / "refinement.pt")
    again = load_refinement(path, num_original=n)
    assert torch.equal(again.is_new, out.is_new) and torch.equal(again.removed, out.removed)
    assert out.decoder == "generative"
    with pytest.raises(ValueError, match="decoder"):
        decoder_class("spline")
