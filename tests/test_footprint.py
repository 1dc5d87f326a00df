"""Pixel footprints: the pixel scale at a point from the cameras, the footprint context column, and a VAE that
reads it through training, the shard file and extrapolation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from gvae_ns.footprint import log2_pixels_per_unit
from gvae_ns.gaussians import MEANS, SCALES
from gvae_ns.lineage.dataset import TransitionSet
from gvae_ns.prior.train import load_shard, save_shard
from gvae_ns.refine.decoder import LineageVAEDecoder
from gvae_ns.refine.result import RefinementUnavailable
from gvae_ns.vae.extrapolate import extrapolate
from gvae_ns.vae.features import footprint_column, history_tokens
from gvae_ns.vae.model import GaussianVAE, GaussianVAEConfig, StreamConfig
from gvae_ns.vae.train import VAETrainConfig, train_vae
from test_vae_extrapolate import make_history

STREAM = dict(width=32, encoder_layers=1, decoder_layers=1, heads=2, latent_dim=4, flow_layers=2, flow_hidden=16,
              child_embed=8)


def _cameras(origins, focal=100.0, side=100):
    """Cameras at ``origins`` with world axes (looking down -z), ``focal`` px, ``side`` x ``side`` images."""
    v = len(origins)
    c2w = torch.zeros(v, 3, 4)
    c2w[:, :3, :3] = torch.eye(3)
    c2w[:, :, 3] = torch.tensor(origins, dtype=torch.float32)
    col = lambda x: torch.full((v, 1), float(x))  # noqa: E731
    return SimpleNamespace(camera_to_worlds=c2w, fx=col(focal), fy=col(focal), cx=col(side / 2), cy=col(side / 2),
                           width=col(side), height=col(side))


def test_pixel_scale_is_focal_over_depth_over_the_views_that_see_the_point():
    cams = _cameras([[0, 0, 0], [0, 0, 2]])  # the second is 2 units further back
    means = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.0, -6.0]])
    got = log2_pixels_per_unit(means, cams)
    want = torch.tensor([(math.log2(100 / 2) + math.log2(100 / 4)) / 2, (math.log2(100 / 6) + math.log2(100 / 8)) / 2])
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(log2_pixels_per_unit(means, cams, downscale=4), want - 2, atol=1e-5), "a quarter: -2"
    # seen by the first camera only (outside the second's image): the first alone counts
    off = torch.tensor([[0.9, 0.0, -2.0]])
    cams = _cameras([[0, 0, 0], [5, 0, 0]])
    assert torch.allclose(log2_pixels_per_unit(off, cams), torch.tensor([math.log2(50)]), atol=1e-5)
    # in front of a camera but outside every image: the views it is in front of; behind all: the others' median
    pts = torch.tensor([[0.0, 0.0, -2.0], [100.0, 0.0, -2.0], [0.0, 0.0, 5.0]])
    got = log2_pixels_per_unit(pts, _cameras([[0, 0, 0]]))
    assert torch.allclose(got[:2], torch.tensor([math.log2(50), math.log2(50)]), atol=1e-5)
    assert torch.isfinite(got).all() and float(got[2]) == pytest.approx(math.log2(50), abs=1e-5)
    with pytest.raises(ValueError, match="downscale"):
        log2_pixels_per_unit(pts, _cameras([[0, 0, 0]]), downscale=0)


def test_footprint_column_is_the_log2_pixel_length_of_each_tokens_largest_axis_at_its_stage():
    states = torch.zeros(2, 3, 59)
    states[..., SCALES] = torch.log(torch.tensor([0.5, 0.25, 0.125]))[None, :, None]  # largest axis per stage
    col = footprint_column(states, torch.tensor([4.0, 6.0]))[..., 0]
    # newest (last) at the given scale; each older stage half the resolution (-1)
    assert torch.allclose(col[0], torch.tensor([4 - 2 - 1, 4 - 1 - 2, 4 - 0 - 3.0]))
    assert torch.allclose(col[1] - col[0], torch.full((3,), 2.0))
    history, mask = make_history(5)
    plain = history_tokens(history, mask, 3)
    read = history_tokens(history, mask, 3, torch.zeros(5))
    assert read.geometry.shape[-1] == plain.geometry.shape[-1] + 1
    assert torch.equal(read.geometry[..., :-1], plain.geometry)
    assert bool((read.geometry[..., -1][~read.mask] == 0).all()), "absent stages stay zero"


def _transitions(n=64, seed=0):
    history, mask = make_history(n, stages=3, seed=seed)
    stage = mask.sum(1) - 1
    parent = history[torch.arange(n), stage]
    children = parent[:, None].repeat(1, 2, 1)
    children[:, 1, MEANS] += 0.01
    # the model is to learn: split where a Gaussian spans many pixels, keep it alone where it is sub-pixel
    pixels = torch.where(torch.arange(n) % 2 == 0, torch.full((n,), 8.0), torch.full((n,), -4.0))
    cmask = torch.stack([torch.ones(n, dtype=torch.bool), pixels > 0], dim=1)
    return TransitionSet(history=history, history_mask=mask, children=children, children_mask=cmask, stage=stage,
                         parent_ids=torch.arange(n), children_ids=torch.zeros(n, 2, dtype=torch.long),
                         num_children=cmask.sum(1), log2_px_per_unit=pixels)


def test_a_vae_that_reads_footprints_trains_on_them_extrapolates_with_them_and_refuses_without(tmp_path):
    config = GaussianVAEConfig(geometry=StreamConfig(**STREAM), appearance=StreamConfig(**STREAM), max_children=2,
                               max_history=3, footprint_context=True)
    ts = _transitions()
    vae, _ = train_vae(ts, VAETrainConfig(model=config, steps=150, batch_size=64), seed=0)
    history, mask = ts.history, ts.history_mask
    with pytest.raises(ValueError, match="footprint"):
        extrapolate(vae, history, mask)
    big = extrapolate(vae, history, mask, log2_px_per_unit=torch.full((64,), 8.0), temperature=0.0)
    small = extrapolate(vae, history, mask, log2_px_per_unit=torch.full((64,), -4.0), temperature=0.0)
    assert big.added.shape[0] > small.added.shape[0], "the footprint decides the split, as in its training data"
    with pytest.raises(ValueError, match="log2_px_per_unit"):
        extrapolate(vae, history, mask, log2_px_per_unit=torch.zeros(3))
    # the shard keeps the pixel scales; without them a footprint model refuses to train
    back = load_shard(save_shard(tmp_path / "s.pt", ts, scene="test"))
    assert torch.equal(back.log2_px_per_unit, ts.log2_px_per_unit)
    keys = ("history", "history_mask", "children", "children_mask", "stage", "parent_ids", "children_ids",
            "num_children")
    without = TransitionSet(**{k: getattr(ts, k) for k in keys})
    with pytest.raises(ValueError, match="footprint"):
        train_vae(without, VAETrainConfig(model=config, steps=1), seed=0)
    assert GaussianVAE(GaussianVAEConfig()).footprints(torch.zeros(2)) is None, "a plain VAE ignores them"
    # refinement with scores from before footprints: a clear refusal, not a stack trace
    parents = history[torch.arange(64), ts.stage]
    with pytest.raises(RefinementUnavailable, match="run gvae-refine again"):
        LineageVAEDecoder(vae).propose(parents, history, mask, stages=1, max_new=64, seed=0)
    proposal = LineageVAEDecoder(vae).propose(parents, history, mask, stages=1, max_new=64, seed=0,
                                              log2_px_per_unit=torch.full((64,), 8.0))
    assert proposal.members.shape[0] == 128
