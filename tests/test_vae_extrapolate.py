"""Extrapolating lineages past the last stage: validity, budget, death, determinism, feedback."""

from __future__ import annotations

import math

import pytest
import torch

from gvae_ns.gaussians import MEANS, OPACITY, QUATS, SCALES, SH_DC, PACKED_DIM
from gvae_ns.vae.extrapolate import extrapolate
from gvae_ns.vae.child_decoders import MLPDecoder
from gvae_ns.vae.model import GaussianVAE, GaussianVAEConfig, StreamConfig

STREAM = dict(width=32, encoder_layers=1, decoder_layers=1, heads=2, latent_dim=4, flow_layers=2, flow_hidden=16,
              child_embed=8)
C = 4


def make_vae(slot0_bias: float, other_bias: float, weight_scale: float = 1.0, seed: int = 0) -> GaussianVAE:
    """Untrained tiny VAE whose exist logits are pinned by the decoders' biases (weights zeroed) and
    whose other outputs are random, ``weight_scale`` times larger than at init (to hit the clamps)."""
    torch.manual_seed(seed)
    vae = GaussianVAE(GaussianVAEConfig(geometry=StreamConfig(**STREAM), appearance=StreamConfig(**STREAM),
                                        max_children=C, max_history=4))
    with torch.no_grad():
        for stream in (vae.geometry, vae.appearance):
            decoder = stream.decoder
            assert isinstance(decoder, MLPDecoder)
            last = decoder.net[-1]
            last.weight.mul_(weight_scale)
            last.bias.normal_(0.0, weight_scale)
            f = decoder.feature_dim + 1
            for slot in range(C):
                col = slot * f + f - 1
                last.weight[col].zero_()
                last.bias[col] = slot0_bias if slot == 0 else other_bias
    return vae.eval()


def make_history(n: int, stages: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.zeros(n, stages, PACKED_DIM)
    h[..., MEANS] = torch.randn(n, 1, 3, generator=gen) * 2 + torch.randn(n, stages, 3, generator=gen) * 0.05
    h[..., QUATS] = torch.randn(n, stages, 4, generator=gen)
    h[..., SCALES] = -2 - 0.3 * torch.arange(stages).view(1, stages, 1) + torch.randn(n, stages, 3, generator=gen) * 0.2
    h[..., OPACITY] = torch.randn(n, stages, 1, generator=gen)
    h[..., SH_DC] = torch.randn(n, stages, 3, generator=gen) * 0.3
    h[..., 14:] = torch.randn(n, stages, 45, generator=gen) * 0.05
    stage = torch.randint(0, stages, (n,), generator=gen)
    mask = torch.arange(stages)[None, :] <= stage[:, None]
    h = torch.where(mask[..., None], h, 0.0)
    return h, mask


def newest(history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    idx = torch.where(mask, torch.arange(mask.shape[1]), -1).amax(1)
    return history[torch.arange(len(idx)), idx]


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_extrapolation_returns_valid_gaussians(steps):
    vae = make_vae(slot0_bias=3.0, other_bias=0.0, weight_scale=30.0)
    cfg = vae.config
    history, mask = make_history(40)
    start = newest(history, mask)
    res = extrapolate(vae, history, mask, steps=steps, max_new=60, seed=1)
    assert res.refined.shape == (40, PACKED_DIM) and res.alive.shape == (40,)
    m = res.added.shape[0]
    assert res.added_source.shape == (m,) and res.added_step.shape == (m,)
    assert 0 < m <= 60
    assert len(res.step_counts) == steps
    for out in (res.refined, res.added):
        assert bool(torch.isfinite(out).all())
        torch.testing.assert_close(out[:, QUATS].norm(dim=-1), torch.ones(len(out)), atol=1e-5, rtol=0)
    # Every step changes log-scales within the config's bounds relative to the parent.
    lo, hi = steps * cfg.min_log_scale_change - 1e-4, steps * cfg.max_log_scale_change + 1e-4
    d_ref = res.refined[:, SCALES] - start[:, SCALES]
    d_add = res.added[:, SCALES] - start[res.added_source][:, SCALES]
    assert bool(((d_ref >= lo) & (d_ref <= hi)).all())
    assert bool(((d_add >= lo) & (d_add <= hi)).all())
    # ... and positions within max_offset parent units per axis (units grow at most exp(max) per step).
    unit = start[:, SCALES].amax(-1).exp()
    reach = sum(math.sqrt(3) * cfg.max_offset * math.exp(j * cfg.max_log_scale_change) for j in range(steps))
    dist = (res.added[:, MEANS] - start[res.added_source][:, MEANS]).norm(dim=-1)
    assert bool((dist <= reach * unit[res.added_source] * (1 + 1e-4)).all())
    assert bool(((res.added_step >= 1) & (res.added_step <= steps)).all())
    for c in res.step_counts:
        assert c["candidates"] == c["spawned"] + c["capped"]
        assert c["lineages"] == c["continued"] + c["died"]
    assert res.step_counts[-1]["added_alive"] == m


def test_same_seed_same_result_and_chunking_does_not_matter():
    vae = make_vae(slot0_bias=2.0, other_bias=0.0, weight_scale=3.0)
    history, mask = make_history(50, seed=3)
    a = extrapolate(vae, history, mask, steps=3, seed=7)
    again = extrapolate(vae, history, mask, steps=3, seed=7)
    for x, y in ((a.refined, again.refined), (a.added, again.added), (a.added_source, again.added_source)):
        assert torch.equal(x, y)
    assert a.step_counts == again.step_counts
    # Chunks draw the same noise; only float summation order may differ between batch shapes.
    b = extrapolate(vae, history, mask, steps=3, seed=7, chunk_size=9)
    assert a.step_counts == b.step_counts and torch.equal(a.added_source, b.added_source)
    torch.testing.assert_close(b.refined, a.refined, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.added, a.added, atol=1e-4, rtol=1e-4)
    c = extrapolate(vae, history, mask, steps=3, seed=8)
    assert not torch.equal(a.refined, c.refined)


def test_budget_caps_growth_and_zero_budget_only_refines():
    vae = make_vae(slot0_bias=10.0, other_bias=10.0)
    history, mask = make_history(30, seed=4)
    res = extrapolate(vae, history, mask, steps=2, max_new=25, seed=0)
    assert res.added.shape[0] == 25
    assert res.step_counts[0] == dict(step=1, lineages=30, continued=30, died=0, inputs_died=0,
                                      candidates=30 * (C - 1), spawned=25, capped=30 * (C - 1) - 25, added_alive=25)
    assert res.step_counts[1]["spawned"] == 0 and res.step_counts[1]["lineages"] == 55
    assert bool(res.alive.all())
    none = extrapolate(vae, history, mask, steps=2, max_new=0, seed=0)
    assert none.added.shape == (0, PACKED_DIM)
    assert not torch.equal(none.refined, newest(history, mask))


def test_parents_without_continuation_are_flagged_dead():
    vae = make_vae(slot0_bias=-10.0, other_bias=10.0)
    history, mask = make_history(12, seed=5)
    res = extrapolate(vae, history, mask, steps=2, max_new=100, seed=0)
    assert not bool(res.alive.any())
    torch.testing.assert_close(res.refined, newest(history, mask))
    # Step 1's children die in step 2 as well (slot 0 never exists); their own children remain.
    assert res.step_counts[1]["died"] == res.step_counts[1]["lineages"]
    assert bool((res.added_step == 2).all()) and res.added.shape[0] > 0


def test_each_step_feeds_its_output_back_as_the_newest_stage():
    vae = make_vae(slot0_bias=10.0, other_bias=-10.0, weight_scale=2.0)
    history, mask = make_history(20, seed=6)
    res = extrapolate(vae, history, mask, steps=2, seed=11)
    gen = torch.Generator().manual_seed(11)
    h, m = history, mask
    for _ in range(2):
        tokens = vae.history_tokens(h, m)
        out = vae(tokens, noise=vae.sample_noise(20, gen))
        children, _ = vae.children_from_output(out, tokens.parent)
        stage = torch.where(m, torch.arange(m.shape[1]), -1).amax(1)
        h = torch.cat([h, torch.zeros(20, 1, PACKED_DIM)], dim=1)
        m = torch.cat([m, torch.zeros(20, 1, dtype=torch.bool)], dim=1)
        h[torch.arange(20), stage + 1] = children[:, 0]
        m[torch.arange(20), stage + 1] = True
    torch.testing.assert_close(res.refined, newest(h, m), atol=1e-5, rtol=1e-5)
    assert res.added.shape[0] == 0


def test_bad_arguments_are_rejected():
    vae = make_vae(0.0, 0.0)
    history, mask = make_history(3)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        extrapolate(vae, history, mask, steps=0)
    with pytest.raises(ValueError, match="exist_threshold"):
        extrapolate(vae, history, mask, exist_threshold=1.0)
    empty = extrapolate(vae, history[:0], mask[:0], steps=2)
    assert empty.refined.shape == (0, PACKED_DIM) and len(empty.step_counts) == 2


def test_lineages_that_all_end_early_leave_an_empty_result_not_an_error(monkeypatch):
    torch.manual_seed(0)
    vae = GaussianVAE(GaussianVAEConfig())
    original = vae.children_from_output

    def nothing_exists(out, parent):  # every slot below threshold: every lineage ends at step 1
        children, prob = original(out, parent)
        return children, torch.zeros_like(prob)

    monkeypatch.setattr(vae, "children_from_output", nothing_exists)
    history = torch.zeros(6, 3, 59)
    history[:, :, 3] = 1.0
    mask = torch.ones(6, 3, dtype=torch.bool)
    result = extrapolate(vae, history, mask, steps=3)
    assert result.added.shape == (0, 59)
    assert not result.alive.any()
    assert [c["lineages"] for c in result.step_counts] == [6, 0, 0]
