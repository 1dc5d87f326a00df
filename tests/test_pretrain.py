"""``gvae-pretrain`` end to end on a tiny corpus: scenes, ns-train runs, shards, 2-process training, shipping,
resuming; and the benchmark's check for a missing prior."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from gvae_ns.bench import config as bench_config
from gvae_ns.bench.config import BenchConfig, BenchError, check_config
from gvae_ns.prior.cli import PretrainConfig, pretrain
from gvae_ns.prior.corpus import CorpusConfig, shard_path, stage_steps
from gvae_ns.prior.shipped import PriorUnavailable, load_shipped
from gvae_ns.prior.train import PriorTrainConfig, load_shard
from gvae_ns.vae.train import VAETrainConfig
from test_vae import tiny_config
from tiny_runs import BIN, run_env

TINY_CORPUS = CorpusConfig(scene_seeds=(1, 2), resolution=32, stage_downscales=(4, 2, 1),
                           stage_fractions=(0.2, 0.3, 0.5), steps=60, n_train=8, n_val=2, supersample=1,
                           train_args="--pipeline.model.num-random 300 --pipeline.model.warmup-length 10 "
                                      "--pipeline.model.refine-every 10")


def test_stage_steps_split_the_total():
    assert stage_steps(1500, (0.1, 0.15, 0.25, 0.5)) == (150, 225, 375, 750)
    assert sum(stage_steps(61, (0.2, 0.3, 0.5))) == 61


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    config = PretrainConfig(out=out / "work", corpus=TINY_CORPUS, world_size=2, ship=True, ship_dir=out / "ship",
                            train=PriorTrainConfig(train=VAETrainConfig(model=tiny_config()), steps=6,
                                                   batch_per_rank=32, checkpoint_every=3))
    prior = pretrain(config, ["--test"])
    return config, prior


def test_pretrain_makes_shards_from_real_runs_and_ships_them(pretrained):
    config, prior = pretrained
    assert prior.is_file()
    shards = [load_shard(shard_path(config.out.resolve(), s)) for s in (1, 2)]
    for seed, shard in zip((1, 2), shards):
        assert shard.scene == f"gvae-synthetic --scene-seed {seed}"
        assert len(shard) > 0
        assert set(shard.stage.unique().tolist()) == {0, 1}  # 3 stages: transitions 0 -> 1 and 1 -> 2
    # the scenes differ, so do their runs
    assert shards[0].history.shape != shards[1].history.shape or not torch.equal(shards[0].history,
                                                                                shards[1].history)
    manifest = json.loads((config.ship_dir / "manifest.json").read_text())
    assert manifest["scene_seeds"] == [1, 2] and manifest["world_size"] == 2 and manifest["backend"] == "gloo"
    assert manifest["transitions"] == sum(len(s) for s in shards)
    assert manifest["command"] == "gvae-pretrain --test" and manifest["steps"] == 6
    net = load_shipped(directory=config.ship_dir)
    assert net.config.geometry.width == tiny_config().geometry.width


def test_pretrain_resumes_without_training_again(pretrained):
    config, _ = pretrained
    runs = config.out.resolve() / "runs"
    stamp = {p: p.stat().st_mtime_ns for p in runs.rglob("lineage.npz")}
    shard_stamp = {s: shard_path(config.out.resolve(), s).stat().st_mtime_ns for s in (1, 2)}
    assert len(stamp) == 2
    pretrain(config, ["--test"])
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("lineage.npz")} == stamp
    assert {s: shard_path(config.out.resolve(), s).stat().st_mtime_ns for s in (1, 2)} == shard_stamp


@pytest.mark.parametrize("corpus, words", [
    (dict(scene_seeds=()), "scene-seeds is empty"),
    (dict(scene_seeds=(1, -2)), "scene-seeds must be distinct and >= 0"),
    (dict(scene_seeds=(3, 3)), "scene-seeds must be distinct"),
    (dict(stage_downscales=(4, 2)), "stage-downscales must be >= 1 and end at 1"),
    (dict(stage_fractions=(0.5, 0.5)), "stage-fractions needs one positive share per stage"),
    (dict(resolution=100), "resolution must be >= 8 and divisible"),
    (dict(steps=3), "steps must give every stage a step"),
    (dict(jobs=0), "--corpus.jobs must be at least 1"),
])
def test_pretrain_refuses_bad_settings_before_any_work(tmp_path, corpus, words):
    with pytest.raises(ValueError, match=words):
        pretrain(PretrainConfig(out=tmp_path / "w", corpus=CorpusConfig(**corpus)))
    with pytest.raises(ValueError, match="--world-size"):
        pretrain(PretrainConfig(out=tmp_path / "w", world_size=0))
    assert not (tmp_path / "w").exists()


def test_gvae_pretrain_command_reports_errors_without_a_trace(tmp_path):
    proc = subprocess.run([str(BIN / "gvae-pretrain"), "--out", str(tmp_path / "w"), "--world-size", "0"],
                          capture_output=True, text=True, env=run_env(), timeout=120)
    assert proc.returncode != 0
    assert "gvae-pretrain: --world-size must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_with_prior_rows_stops_early_when_no_prior_is_shipped(monkeypatch):
    def missing():
        raise PriorUnavailable("/nowhere/manifest.json: no cross-scene prior is installed here")

    monkeypatch.setattr(bench_config, "read_manifest", missing)
    with pytest.raises(BenchError, match="refine_decoders has a shipped-prior row.*no cross-scene prior"):
        check_config(BenchConfig(refine_decoders=("temporal", "prior")))
    check_config(BenchConfig(refine_decoders=("temporal",)))  # no prior row: no check
