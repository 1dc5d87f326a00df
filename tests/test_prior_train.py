"""Cross-scene prior training: shards, global normaliser statistics, a 2-process gloo run, resume."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import torch
import torch.distributed as dist

from gvae_ns.prior.train import (CHECKPOINT_NAME, PRIOR_NAME, SHARD_FORMAT, PriorTrainConfig, load_shard, moments,
                                 run_distributed, save_shard, statistics_from_moments, train_prior)
from gvae_ns.tagged_file import digest_tensors, save_tagged
from gvae_ns.vae.file import load_vae, save_vae
from gvae_ns.vae.model import GaussianVAE, Normalizer
from gvae_ns.vae.train import NORMALIZERS, VAETrainConfig, clean_transitions, normalizer_rows, prepare_training
from test_vae import make_transitions, tiny_config

# (transitions, stages, seed) per scene: histories of different lengths, so the global window (4) is
# longer than rank 0's own shards need (scenes 0 and 2) in the 2-process run.
SCENES = ((24, 3, 11), (20, 5, 12), (16, 4, 13), (12, 3, 14))


def prior_config(steps: int = 10, checkpoint_every: int = 4, lr: float = 1e-3) -> PriorTrainConfig:
    train = VAETrainConfig(model=tiny_config(), lr=lr, log_every=1, kl_period=5, kl_alpha=0.1, coarse_fraction=0.3)
    return PriorTrainConfig(train=train, steps=steps, batch_per_rank=8, checkpoint_every=checkpoint_every, seed=0)


def write_shards(directory: Path, scenes=SCENES) -> List[Path]:
    paths = []
    for i, (n, stages, seed) in enumerate(scenes):
        paths.append(save_shard(directory / f"scene{i}.pt", make_transitions(n=n, stages=stages, seed=seed),
                                f"scene{i}"))
    return paths


def state_digest(vae: GaussianVAE) -> str:
    state = vae.state_dict()
    return digest_tensors(state[k] for k in sorted(state))


def reference_model(shards: List[Path], config: PriorTrainConfig, window: int) -> GaussianVAE:
    """The model with its normalisers fitted (Normalizer.fit) on all shards' rows together."""
    sets = [clean_transitions(load_shard(p), config.train.model.max_children) for p in shards]
    vae, _ = prepare_training(sets, config.vae_config(), window, config.seed)
    return vae


def _rank_main(shards: List[Path], out_dir: Path, config: PriorTrainConfig, report_dir: Path) -> None:
    """One process of the 2-process run: train, then write this rank's weight digest."""
    torch.set_num_threads(1)
    vae = train_prior(shards, config, out_dir, device="cpu")
    (report_dir / f"rank{dist.get_rank()}.txt").write_text(f"{dist.get_world_size()} {state_digest(vae)}")


# ---------------------------------------------------------------------------------------------- tests
def test_global_statistics_of_two_shards_equal_fitting_on_their_concatenation(tmp_path):
    shards = write_shards(tmp_path, SCENES[:2])
    config = prior_config()
    vcfg = config.vae_config()
    sets = [clean_transitions(load_shard(p), 4) for p in shards]
    parts = [normalizer_rows(d.tokens, d.targets) for d in (prepare_training([s], vcfg, 4, 0)[1] for s in sets)]
    for name in NORMALIZERS:
        a, b = parts[0][name], parts[1][name]
        assert a.shape[0] > 1 and b.shape[0] > 1
        mean, std = statistics_from_moments(moments(a) + moments(b), vcfg.min_std)  # what all_reduce(SUM) adds up
        ref = Normalizer(a.shape[1])
        ref.fit(torch.cat([a, b]), vcfg.min_std)
        torch.testing.assert_close(mean, ref.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std, ref.std, rtol=1e-5, atol=1e-6)
        alone = Normalizer(a.shape[1])
        alone.fit(a, vcfg.min_std)
        assert not torch.allclose(alone.mean, ref.mean, rtol=1e-3, atol=1e-4), name  # the shards differ
    # Edge cases behave as Normalizer.fit: no rows -> identity, one row -> std 1, constant column -> floor.
    for rows in (torch.zeros(0, 3), torch.randn(1, 3), torch.tensor([[1.0, 2.0, 5.0], [1.0, 3.0, 5.0]])):
        ref = Normalizer(3)
        ref.fit(rows, 1e-3)
        mean, std = statistics_from_moments(moments(rows), 1e-3)
        torch.testing.assert_close((mean, std), (ref.mean, ref.std), rtol=1e-6, atol=1e-7)


def test_two_process_gloo_run_keeps_the_ranks_identical_and_uses_global_statistics(tmp_path):
    shards = write_shards(tmp_path)
    out, reports = tmp_path / "out", tmp_path / "reports"
    reports.mkdir()
    config = prior_config(steps=10, checkpoint_every=4)
    run_distributed(_rank_main, 2, "gloo", args=(shards, out, config, reports))

    lines = [(reports / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert lines[0][0] == lines[1][0] == "2"  # both ran in a world of 2
    assert lines[0][1] == lines[1][1]  # DDP kept the weights identical
    prior = load_vae(out / PRIOR_NAME)
    assert state_digest(prior) == lines[0][1]

    # Trained: the weights moved away from the initialisation (same seed, same init on every rank).
    ref = reference_model(shards, config, window=4)
    assert not torch.equal(prior.geometry.encoder.embed.weight, ref.geometry.encoder.embed.weight)
    # Global window and statistics: rank 0's scenes alone need a window of 3 and give other statistics.
    assert prior.window == 4
    for name in NORMALIZERS:
        got, want = prior.get_submodule(name), ref.get_submodule(name)
        torch.testing.assert_close(got.mean, want.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.std, want.std, rtol=1e-5, atol=1e-6)
    rank0 = reference_model(shards[0::2], config, window=4).geometry.token_norm
    assert not torch.allclose(rank0.mean, prior.geometry.token_norm.mean, rtol=1e-3, atol=1e-4)

    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["step"] == 10 and ckpt["world_size"] == 2 and ckpt["scenes"] == [f"scene{i}" for i in range(4)]
    assert ckpt["log"]["step"] == list(range(10))
    # Each rank drew its own batches (own rows, rank-seeded generator).
    orders = [r["sampler"]["order"] for r in ckpt["ranks"]]
    assert orders[0].shape != orders[1].shape or not torch.equal(orders[0], orders[1])
    assert not torch.equal(ckpt["ranks"][0]["noise"], ckpt["ranks"][1]["noise"])


class _Stop(Exception):
    pass


def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    shards = write_shards(tmp_path)
    config = prior_config(steps=10, checkpoint_every=4)
    torch.set_num_threads(1)
    full = train_prior(shards, config, tmp_path / "full", device="cpu")

    def crash(done, losses):
        if done == 7:  # step 6 done, last checkpoint at step 4
            raise _Stop
    with pytest.raises(_Stop):
        train_prior(shards, config, tmp_path / "cut", device="cpu", progress=crash)
    assert torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=True)["step"] == 4
    assert not (tmp_path / "cut" / PRIOR_NAME).exists()

    seen: List[int] = []
    resumed = train_prior(shards, config, tmp_path / "cut", device="cpu", progress=lambda done, _: seen.append(done))
    assert seen[0] == 5  # it resumed after step 4 rather than starting again
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key
    assert state_digest(load_vae(tmp_path / "cut" / PRIOR_NAME)) == state_digest(full)
    logs = [torch.load(tmp_path / d / CHECKPOINT_NAME, weights_only=True)["log"] for d in ("full", "cut")]
    assert logs[0] == logs[1]

    # A checkpoint made with another config is refused, naming it.
    with pytest.raises(ValueError, match=str(tmp_path / "cut" / CHECKPOINT_NAME)):
        train_prior(shards, prior_config(lr=2e-3), tmp_path / "cut", device="cpu")


def test_corrupt_or_foreign_shards_raise_a_value_error_naming_the_file(tmp_path):
    good = write_shards(tmp_path, SCENES[:1])[0]
    shard = load_shard(good)
    data = make_transitions(n=24, stages=3, seed=11)
    assert shard.scene == "scene0" and len(shard) == 24
    for name in ("history", "history_mask", "children", "children_mask", "stage"):
        assert torch.equal(getattr(shard, name), getattr(data, name)), name

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:200])
    foreign = tmp_path / "foreign.pt"
    save_vae(GaussianVAE(tiny_config()), foreign)
    not_torch = tmp_path / "text.pt"
    not_torch.write_text("hello")
    malformed = tmp_path / "malformed.pt"
    payload = {name: getattr(data, name) for name in ("history", "history_mask", "children", "children_mask", "stage")}
    save_tagged(malformed, SHARD_FORMAT, {**payload, "scene": "x", "history": data.history[..., :10]})
    for path in (corrupt, foreign, not_torch, malformed):
        with pytest.raises(ValueError, match=str(path)):
            load_shard(path)
    # train_prior refuses the bad shard the same way.
    with pytest.raises(ValueError, match=str(corrupt)):
        train_prior([good, corrupt], prior_config(steps=1), tmp_path / "out", device="cpu")
