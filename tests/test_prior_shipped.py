"""The shipped cross-scene prior: its manifest, the checks before loading, and the ``prior`` decoder."""

from __future__ import annotations

import json

import pytest
import torch

from gvae_ns.prior import shipped
from gvae_ns.prior.shipped import MANIFEST_KEYS, PriorUnavailable, load_shipped, read_manifest, write_shipped
from gvae_ns.refine import decoder as decoder_module
from gvae_ns.refine.decoder import DECODERS, PriorDecoder, TunedPriorDecoder, decoder_for_run
from gvae_ns.refine.result import rebuild_hint
from gvae_ns.run_layout import DECODER_FILES
from gvae_ns.tagged_file import Provenance, TaggedFileError
from gvae_ns.vae.model import GaussianVAE, GaussianVAEConfig, StreamConfig
from gvae_ns.vae.train import VAETrainConfig, train_vae
from test_vae import make_transitions

STREAM = dict(width=16, encoder_layers=1, decoder_layers=1, heads=2, latent_dim=4, flow_layers=2, flow_hidden=8,
              child_embed=4)
FACTS = {"command": "gvae-pretrain --test", "scene_seeds": [1, 2], "transitions": 10, "steps": 3, "world_size": 2,
         "backend": "gloo", "wall_s": 1.0, "date": "2026-12-04", "machine": "test"}


def tiny_vae(seed: int = 0) -> GaussianVAE:
    torch.manual_seed(seed)
    return GaussianVAE(GaussianVAEConfig(geometry=StreamConfig(**STREAM), appearance=StreamConfig(**STREAM)))


def test_written_prior_loads_with_the_same_weights(tmp_path):
    vae = tiny_vae()
    manifest = write_shipped(vae, tmp_path, FACTS)
    assert set(MANIFEST_KEYS) <= set(manifest)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["bytes"] == (tmp_path / "prior.pt").stat().st_size
    loaded = load_shipped(directory=tmp_path)
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not loaded.training


def test_weights_that_disagree_with_the_manifest_are_refused(tmp_path):
    write_shipped(tiny_vae(0), tmp_path, FACTS)
    manifest = (tmp_path / "manifest.json").read_text()
    write_shipped(tiny_vae(1), tmp_path, FACTS)  # other weights, then the old manifest put back
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(PriorUnavailable, match="prior.pt.*manifest says"):
        load_shipped(directory=tmp_path)


def test_missing_or_incomplete_manifest_names_the_file(tmp_path):
    with pytest.raises(PriorUnavailable, match="manifest.json: no cross-scene prior"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"file": "prior.pt"}))
    with pytest.raises(PriorUnavailable, match="lacks"):
        read_manifest(tmp_path)
    write_shipped(tiny_vae(), tmp_path, FACTS)
    (tmp_path / "prior.pt").unlink()
    with pytest.raises(PriorUnavailable, match="missing"):
        load_shipped(directory=tmp_path)


def test_oversized_weights_are_not_shipped(tmp_path):
    with pytest.raises(ValueError, match="over the 100-byte cap"):
        write_shipped(tiny_vae(), tmp_path, FACTS, max_bytes=100)
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "prior.pt").exists()
    assert list(tmp_path.iterdir()) == []


def test_manifest_facts_are_required(tmp_path):
    with pytest.raises(ValueError, match="lack.*date"):
        write_shipped(tiny_vae(), tmp_path, {k: v for k, v in FACTS.items() if k != "date"})


def test_prior_decoder_uses_the_shipped_weights_without_a_file_beside_the_run(tmp_path, monkeypatch):
    vae = tiny_vae(3)
    write_shipped(vae, tmp_path / "weights", FACTS)
    monkeypatch.setattr(decoder_module, "load_shipped", lambda device: load_shipped(device, tmp_path / "weights"))
    assert DECODERS["prior"] is PriorDecoder and not PriorDecoder.per_run
    run = tmp_path / "run"
    run.mkdir()
    decoder = decoder_for_run("prior", run, lineage=None, provenance=None, steps=5, device="cpu")
    assert isinstance(decoder, PriorDecoder)
    assert torch.equal(decoder.net.state_dict()["geometry.token_norm.std"], vae.state_dict()["geometry.token_norm.std"])
    assert list(run.iterdir()) == []  # nothing fitted, nothing written beside the run


def test_the_package_ships_a_prior_within_the_size_cap():
    manifest = read_manifest()
    assert manifest["bytes"] <= shipped.MAX_BYTES
    assert manifest["scene_seeds"] and manifest["transitions"] > 0
    net = load_shipped()
    assert sum(p.numel() for p in net.parameters()) * 4 <= shipped.MAX_BYTES


def test_training_can_start_from_a_prior_and_leaves_it_unchanged():
    from_prior = tiny_vae(4)
    from_prior.history_window.fill_(3)
    from_prior.geometry.token_norm.std.fill_(2.5)  # statistics no scene fit would give
    before = {k: v.clone() for k, v in from_prior.state_dict().items()}
    tuned, log = train_vae(make_transitions(n=32, stages=3, seed=5), VAETrainConfig(steps=4, batch_size=16),
                           start_from=from_prior)
    assert all(torch.equal(before[k], v) for k, v in from_prior.state_dict().items())  # the prior is untouched
    assert tuned.window == 3 and log["history_window"] == 3
    assert torch.equal(tuned.geometry.token_norm.std, before["geometry.token_norm.std"])  # kept, not refitted
    assert tuned.config == from_prior.config
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and all("token_norm" not in k and "target_norm" not in k for k in moved)  # statistics kept
    fresh, _ = train_vae(make_transitions(n=32, stages=3, seed=5), VAETrainConfig(model=from_prior.config, steps=4,
                                                                                   batch_size=16))
    assert not torch.equal(fresh.geometry.token_norm.std, tuned.geometry.token_norm.std)


def test_tuned_prior_decoder_is_fitted_from_the_shipped_weights_and_kept_beside_the_run(tmp_path, monkeypatch):
    prior = tiny_vae(6)
    write_shipped(prior, tmp_path / "weights", FACTS)
    monkeypatch.setattr(decoder_module, "load_shipped", lambda device: load_shipped(device, tmp_path / "weights"))
    seen = {}

    def fake_transitions(lineage, max_children, cameras=None):
        seen["max_children"] = max_children
        return make_transitions(n=24, stages=3, seed=7)

    monkeypatch.setattr(decoder_module, "build_transitions", fake_transitions)
    assert TunedPriorDecoder.per_run and DECODER_FILES["prior-tuned"] == "prior_tuned.pt"
    path = tmp_path / "prior_tuned.pt"
    provenance = Provenance(step=7, num_gaussians=24, gaussians_sha256="a" * 64, config_sha256="b" * 64)
    decoder = decoder_for_run("prior-tuned", path, lineage=object(), provenance=provenance, steps=3, device="cpu")
    assert seen["max_children"] == prior.config.max_children
    assert path.is_file()
    assert torch.equal(decoder.net.appearance.target_norm.mean, prior.appearance.target_norm.mean)
    again = decoder_for_run("prior-tuned", path, lineage=object(), provenance=provenance, steps=3, device="cpu")
    for key, value in decoder.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[key], value)


def test_tuned_prior_from_another_shipped_prior_is_refused_until_retrained(tmp_path, monkeypatch):
    """prior_tuned.pt records the prior it started from: installing another prior makes it stale."""
    weights = tmp_path / "weights"
    monkeypatch.setattr(decoder_module, "load_shipped", lambda device: load_shipped(device, weights))
    monkeypatch.setattr(decoder_module, "read_manifest", lambda: read_manifest(weights))
    monkeypatch.setattr(decoder_module, "build_transitions",
                        lambda lineage, max_children, cameras=None: make_transitions(n=24, stages=3, seed=7))
    first = write_shipped(tiny_vae(6), weights, FACTS)
    path = tmp_path / "prior_tuned.pt"
    provenance = Provenance(step=7, num_gaussians=24, gaussians_sha256="a" * 64, config_sha256="b" * 64)
    decoder_for_run("prior-tuned", path, lineage=object(), provenance=provenance, steps=2, device="cpu")
    assert torch.load(path, weights_only=True)["provenance"]["base_sha256"] == first["sha256"]
    decoder_for_run("prior-tuned", path, lineage=object(), provenance=provenance, steps=2, device="cpu")  # reused

    second = write_shipped(tiny_vae(8), weights, FACTS)
    assert second["sha256"] != first["sha256"]
    hint = rebuild_hint(tmp_path, path.name, "prior-tuned")
    assert "--decoder prior-tuned --retrain-decoder" in hint
    with pytest.raises(TaggedFileError) as err:
        decoder_for_run("prior-tuned", path, lineage=object(), provenance=provenance, steps=2, device="cpu",
                        rebuild=hint)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert f"base weights sha256 {first['sha256'][:12]}... (the installed ones' is {second['sha256'][:12]}...)" in message
    assert hint[1:] in message  # (its first letter capitalised)
    decoder_for_run("prior-tuned", path, lineage=object(), provenance=provenance, steps=2, device="cpu", retrain=True)
    assert torch.load(path, weights_only=True)["provenance"]["base_sha256"] == second["sha256"]

    # a file from before the field (no base recorded) is stale too; the lineage VAE's files record none
    data = torch.load(path, weights_only=True)
    del data["provenance"]["base_sha256"]
    torch.save(data, path)
    with pytest.raises(TaggedFileError, match=r"base weights sha256 none \(the installed ones' is"):
        decoder_for_run("prior-tuned", path, lineage=object(), provenance=provenance, steps=2, device="cpu")
    assert Provenance.from_dict(provenance.to_dict()) == provenance and provenance.base_sha256 is None
    with pytest.raises(ValueError, match="base_sha256"):
        Provenance.from_dict({**provenance.to_dict(), "base_sha256": "short"})
