"""The Refiner's rule, the same for every decoder: families of two or more replace their parent with its
opacity conserved and its scales shrunk as a 3DGS split; everything else stays exactly as trained."""

from __future__ import annotations

import math

import pytest
import torch

from gvae_ns.gaussians import MEANS, OPACITY, PACKED_DIM, SCALES, pack_gaussians
from gvae_ns.lineage.recorder import LineageRecorder
from gvae_ns.refine.decoder import LineageVAEDecoder, Proposal, SplitDecoder, split_gaussians
from gvae_ns.refine.refiner import SPLIT_SHRINK, Refiner, RunState, conserve_families
from gvae_ns.tagged_file import Provenance
from gvae_ns.vae.config import GaussianVAEConfig
from gvae_ns.vae.model import GaussianVAE


def _params(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"means": torch.randn(n, 3, generator=g), "scales": torch.randn(n, 3, generator=g) - 3.0,
            "quats": torch.randn(n, 4, generator=g), "features_dc": torch.randn(n, 3, generator=g),
            "features_rest": torch.randn(n, 15, 3, generator=g) * 0.1,
            "opacities": torch.randn(n, 1, generator=g)}


def _run(n: int = 40, seed: int = 0) -> RunState:
    params = _params(n, seed)
    recorder = LineageRecorder()
    recorder.snapshot(params, {}, stage=0, step=0)
    recorder.snapshot(params, {}, stage=1, step=10)
    provenance = Provenance(step=10, num_gaussians=n, gaussians_sha256="a" * 64, config_sha256="b" * 64)
    return RunState(params=params, lineage=recorder.to_lineage(), live_ids=recorder.live_ids, provenance=provenance,
                    run_dir=None, device="cpu")


def _scores(n: int):
    return {"grad2d": torch.linspace(1.0, 0.1, n), "hessian": torch.linspace(1.0, 0.1, n)}


def test_conserved_families_keep_their_parents_coverage():
    parents = torch.randn(3, PACKED_DIM)
    parents[:, SCALES] = torch.tensor([[-2.0, -3.0, -1.0]])
    members = torch.randn(7, PACKED_DIM)
    members[:, SCALES] = 0.5  # wider than every parent
    source = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    out = conserve_families(parents, members, source)
    a_parent = torch.sigmoid(parents[:, OPACITY].squeeze(-1)).double()
    a_member = torch.sigmoid(out[:, OPACITY].squeeze(-1)).double()
    for p in range(3):
        family = a_member[source == p]
        torch.testing.assert_close(1 - torch.prod(1 - family), a_parent[p], atol=1e-6, rtol=0)
    assert bool((out[:, SCALES] <= parents[source][:, SCALES] - math.log(SPLIT_SHRINK) + 1e-6).all())
    torch.testing.assert_close(out[:, MEANS], members[:, MEANS])  # positions and colours are the decoder's


def test_split_control_is_3dgs_split_k_times_and_deterministic():
    parents = pack_gaussians(_params(5))
    decoder = SplitDecoder()
    one = decoder.propose(parents, torch.zeros(5, 1, PACKED_DIM), torch.ones(5, 1, dtype=torch.bool), stages=1,
                          max_new=100, seed=3)
    assert one.source.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    torch.testing.assert_close(one.members[:, SCALES], parents[one.source][:, SCALES] - math.log(1.6))
    spread = (one.members[:, MEANS] - parents[one.source][:, MEANS]).norm(dim=-1)
    assert bool((spread < 6 * torch.exp(parents[one.source][:, SCALES]).max(dim=-1).values).all())
    two = decoder.propose(parents, torch.zeros(5, 1, PACKED_DIM), torch.ones(5, 1, dtype=torch.bool), stages=2,
                          max_new=100, seed=3)
    assert torch.bincount(two.source).tolist() == [4] * 5
    again = decoder.propose(parents, torch.zeros(5, 1, PACKED_DIM), torch.ones(5, 1, dtype=torch.bool), stages=2,
                            max_new=100, seed=3)
    assert torch.equal(two.members, again.members)
    capped = decoder.propose(parents, torch.zeros(5, 1, PACKED_DIM), torch.ones(5, 1, dtype=torch.bool), stages=1,
                             max_new=2, seed=3)
    assert torch.bincount(capped.source, minlength=5).tolist() == [2, 2, 1, 1, 1], "the budget caps the splits"
    with pytest.raises(ValueError):
        split_gaussians(parents[:, :10], torch.Generator())


def test_split_refinement_replaces_only_the_selected_and_keeps_the_rest_bit_exact():
    run = _run(40)
    refined = Refiner(run, SplitDecoder(), _scores(40), fraction=0.25).refine(1, "hessian")
    assert refined.selected.tolist() == list(range(10)) and refined.removed.tolist() == list(range(10))
    assert refined.num_added == 20 and refined.params["means"].shape[0] == 50 and refined.decoder == "split"
    kept = pack_gaussians(run.params)[10:]
    assert torch.equal(pack_gaussians(refined.params)[:30], kept), "unselected Gaussians are never touched"
    assert "10 replaced by 20 added" in refined.describe()


class _OneEach:
    """A decoder that proposes one changed Gaussian per parent: a prediction, not a family."""

    name, label, learned = "fake", "fake", False

    def propose(self, states, history, history_mask, stages, max_new, seed, temperature=0.0, log2_px_per_unit=None):
        return Proposal(members=states + 1.0, source=torch.arange(states.shape[0]))


def test_a_single_proposal_never_overwrites_a_trained_gaussian():
    run = _run(20)
    refined = Refiner(run, _OneEach(), _scores(20), fraction=0.5).refine(1, "hessian")  # type: ignore[arg-type]
    assert refined.num_added == 0 and refined.removed.numel() == 0
    assert torch.equal(pack_gaussians(refined.params), pack_gaussians(run.params))


class _Recording(_OneEach):
    """Records the pixel scales it is given."""

    def propose(self, states, history, history_mask, stages, max_new, seed, temperature=0.0, log2_px_per_unit=None):
        self.pixels = log2_px_per_unit
        return super().propose(states, history, history_mask, stages, max_new, seed, temperature)


def test_the_decoder_gets_the_pixel_scales_of_the_selected_gaussians_from_the_scores():
    run, decoder = _run(20), _Recording()
    scores = {**_scores(20), "log2_px_per_unit": torch.arange(20.0)}
    refined = Refiner(run, decoder, scores, fraction=0.25).refine(1, "hessian")  # type: ignore[arg-type]
    assert torch.equal(decoder.pixels, scores["log2_px_per_unit"][refined.selected])
    Refiner(run, decoder, _scores(20), fraction=0.25).refine(1, "hessian")  # type: ignore[arg-type]
    assert decoder.pixels is None, "scores from before footprints give none"


def test_vae_refinement_is_deterministic_at_temperature_zero():
    torch.manual_seed(0)
    vae = LineageVAEDecoder(GaussianVAE(GaussianVAEConfig()).eval())
    run = _run(30)

    def refine(seed, temperature):
        return Refiner(run, vae, _scores(30), fraction=0.5, seed=seed, temperature=temperature).refine(2, "hessian")

    a, b = refine(0, 0.0), refine(1, 0.0)
    assert torch.equal(a.is_new, b.is_new)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    c, d = refine(0, 1.0), refine(1, 1.0)
    assert any(not torch.equal(c.params[k], d.params[k]) for k in c.params) or not torch.equal(c.is_new, d.is_new)


def _views(params, side: int = 16, n: int = 2):
    """``n`` cameras at z = 3 looking at the origin, and images of ``params`` rendered at 2x and averaged down."""
    from nerfstudio.cameras.cameras import Cameras

    from gvae_ns.refine.finetune import _render_down
    from gvae_ns.refine.score import ScoringViews

    c2w = torch.zeros(n, 3, 4)
    c2w[:, :3, :3] = torch.eye(3)
    c2w[:, 2, 3] = 3.0
    c2w[:, 0, 3] = torch.linspace(-0.2, 0.2, n)
    cameras = Cameras(camera_to_worlds=c2w, fx=20.0, fy=20.0, cx=side / 2, cy=side / 2, width=side, height=side)
    views = ScoringViews(cameras=cameras, images=[torch.zeros(side, side, 3)] * n, downscale=1,
                         background=torch.ones(3), sh_degree=None, rasterize_mode="antialiased")
    with torch.no_grad():
        views.images = [_render_down(params, views, i, 2)[0] for i in range(n)]
    return views


def test_finetune_fits_the_training_views_through_averaged_down_renders():
    from gvae_ns.refine.finetune import finetune, held_out_loss

    g = torch.Generator().manual_seed(0)
    n = 60
    truth = {"means": torch.randn(n, 3, generator=g) * 0.4, "scales": torch.full((n, 3), -2.5),
             "quats": torch.randn(n, 4, generator=g), "features_dc": torch.randn(n, 3, generator=g) * 2,
             "features_rest": torch.zeros(n, 0, 3), "opacities": torch.full((n, 1), 1.0)}
    views = _views(truth)
    start = {**truth, "features_dc": torch.zeros(n, 3), "opacities": torch.full((n, 1), -1.0)}
    before = held_out_loss(start, views, 2)
    tuned, is_new, kept = finetune(start, views, factor=2, steps=60, seed=0)
    assert not is_new.any() and torch.equal(kept, torch.arange(n)), "no densification: the same rows"
    after = held_out_loss(tuned, views, 2)
    assert after < 0.7 * before, (before, after)
    assert held_out_loss(truth, views, 2) < 1e-3
    assert torch.equal(start["features_dc"], torch.zeros(n, 3)), "the input is left as it is"


def test_finetune_densifies_and_keeps_the_refinement_layout():
    """With a densification policy the fine-tune splits what the fine renders call for: the added rows come
    last and are new, the surviving rows keep their order and say where they came from."""
    from gsplat.strategy import DefaultStrategy

    from gvae_ns.refine.finetune import finetune, finetune_strategy

    g = torch.Generator().manual_seed(1)
    n = 40
    truth = {"means": torch.randn(n, 3, generator=g) * 0.4, "scales": torch.full((n, 3), -3.0),
             "quats": torch.randn(n, 4, generator=g), "features_dc": torch.randn(n, 3, generator=g) * 2,
             "features_rest": torch.zeros(n, 0, 3), "opacities": torch.full((n, 1), 2.0)}
    views = _views(truth, side=24)
    coarse = 8  # a few wide Gaussians where the truth has many small ones
    scales = torch.full((coarse, 3), -1.2)
    scales[::2] = -3.0  # small ones are cloned (and stay), wide ones split (and go)
    start = {"means": torch.randn(coarse, 3, generator=g) * 0.3, "scales": scales,
             "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(coarse, 1),
             "features_dc": torch.zeros(coarse, 3), "features_rest": torch.zeros(coarse, 0, 3),
             "opacities": torch.full((coarse, 1), 0.0)}
    marked = torch.zeros(coarse, dtype=torch.bool)
    marked[-2:] = True  # the last two rows stand for a decoder's proposals
    policy = DefaultStrategy(grow_grad2d=1e-6, grow_scale3d=0.1, prune_opa=0.001, absgrad=False)
    strategy = finetune_strategy(policy, 80)
    assert strategy is not None and strategy.refine_every == 20 and strategy.reset_every > 80
    assert finetune_strategy(policy, 30) is None and finetune_strategy(None, 200) is None
    tuned, is_new, kept = finetune(start, views, factor=2, steps=80, seed=0, is_new=marked, strategy=strategy)
    m = tuned["means"].shape[0]
    assert m > coarse, "the densification added Gaussians"
    assert is_new.shape == (m,) and is_new.sum() > 2
    n_kept = int((~is_new).sum())
    assert not is_new[:n_kept].any() and is_new[n_kept:].all(), "kept rows first, then the added ones"
    assert 0 < len(kept) == n_kept and torch.all(kept[1:] > kept[:-1]) and int(kept.max()) < coarse - 2
    assert torch.allclose(tuned["scales"][:n_kept], start["scales"][kept], atol=0.5), "kept rows are the inputs'"
    assert torch.isfinite(tuned["means"]).all()
