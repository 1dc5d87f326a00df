"""GaussianVAE: features, flow prior, losses, training, leakage, save/load."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from gvae_ns.gaussians import MEANS, OPACITY, QUATS, SCALES, SH_DC, PACKED_DIM
from gvae_ns.vae import features as feats
from gvae_ns.vae.flow import FlowPrior
from gvae_ns.vae.losses import chamfer_distance, cyclic_beta, exist_bce, masked_mse
from gvae_ns.vae.child_decoders import DecoderSpec, register_decoder
from gvae_ns.vae.model import GaussianVAE, GaussianVAEConfig, StreamConfig
from gvae_ns.vae.file import load_vae, save_vae
from gvae_ns.vae.train import VAETrainConfig, train_vae

TINY_STREAM = dict(width=32, encoder_layers=1, decoder_layers=2, heads=2, latent_dim=4, flow_layers=2,
                   flow_hidden=16, child_embed=8)


def tiny_config(**overrides) -> GaussianVAEConfig:
    kwargs = dict(geometry=StreamConfig(**TINY_STREAM), appearance=StreamConfig(**TINY_STREAM), max_children=4,
                  max_history=4)
    kwargs.update(overrides)
    return GaussianVAEConfig(**kwargs)


def random_states(n: int, gen: torch.Generator) -> torch.Tensor:
    s = torch.zeros(n, PACKED_DIM)
    s[:, MEANS] = torch.randn(n, 3, generator=gen) * 3
    s[:, QUATS] = torch.randn(n, 4, generator=gen)
    s[:, SCALES] = torch.randn(n, 3, generator=gen) * 0.5 - 2
    s[:, OPACITY] = torch.rand(n, 1, generator=gen) * 4 - 2
    s[:, SH_DC] = torch.randn(n, 3, generator=gen) * 0.5
    s[:, 14:] = torch.randn(n, 45, generator=gen) * 0.1
    return s


def rule_child(parent: torch.Tensor, offset_x: float, dlog: float, dopacity: float, ddc: float) -> torch.Tensor:
    rel = torch.zeros(parent.shape[0], feats.REL_DIM)
    rel[:, 0] = offset_x
    rel[:, feats.REL_ROTATION] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rel[:, feats.REL_LOG_SCALE] = dlog
    rel[:, feats.REL_SH_REST] = 0.02
    rel[:, feats.REL_RGB] = ddc
    rel[:, feats.REL_OPACITY] = dopacity
    return feats.absolute_state(rel, parent)


def make_transitions(n: int = 64, stages: int = 4, children: int = 4, seed: int = 0) -> SimpleNamespace:
    """Lineages following a fixed rule: the continuation moves +0.3 parent units along its local x,
    shrinks by exp(-0.2) and gains opacity; a second child (-0.8 units, exp(-0.5)) appears exactly when
    the parent's opacity logit is positive."""
    gen = torch.Generator().manual_seed(seed)
    chain = [random_states(n, gen)]
    for _ in range(stages - 1):
        chain.append(rule_child(chain[-1], 0.3, -0.2, 0.5, 0.1))
    chain_t = torch.stack(chain, dim=1)
    stage = torch.randint(0, stages - 1, (n,), generator=gen)
    history = torch.where((torch.arange(stages)[None, :] <= stage[:, None])[..., None], chain_t, 0.0)
    history_mask = torch.arange(stages)[None, :] <= stage[:, None]
    parent = chain_t[torch.arange(n), stage]
    kids = torch.zeros(n, children, PACKED_DIM)
    kids_mask = torch.zeros(n, children, dtype=torch.bool)
    kids[:, 0] = chain_t[torch.arange(n), stage + 1]
    kids_mask[:, 0] = True
    split = parent[:, OPACITY.start] > 0
    kids[:, 1] = torch.where(split[:, None], rule_child(parent, -0.8, -0.5, -0.3, 0.0), 0.0)
    kids_mask[:, 1] = split
    return SimpleNamespace(history=history, history_mask=history_mask, children=kids, children_mask=kids_mask,
                           stage=stage, parent_ids=torch.arange(n))


# ---------------------------------------------------------------------------------------------- features


def test_relative_absolute_round_trip_is_exact():
    gen = torch.Generator().manual_seed(0)
    parent = random_states(200, gen)
    parent[:50, SCALES] -= 6.0  # tiny parents: large relative offsets must still invert
    state = random_states(200, gen)
    rel = feats.relative_features(state, parent)
    back = feats.absolute_state(rel, parent)
    expected = state.clone()
    expected[:, QUATS] = feats.normalize_quat(state[:, QUATS])
    torch.testing.assert_close(back, expected, atol=2e-5, rtol=1e-5)
    assert torch.allclose(back[:, QUATS].norm(dim=-1), torch.ones(200), atol=1e-6)
    assert bool((back[:, 3] >= 0).all())


def test_features_ignore_scene_scale_and_rotation():
    gen = torch.Generator().manual_seed(1)
    parent, state = random_states(30, gen), random_states(30, gen)
    rel = feats.relative_features(state, parent)
    # Scale the whole scene by 7 and rotate it by a global quaternion g: geometry features are unchanged.
    g = feats.normalize_quat(torch.tensor([0.3, -0.5, 0.7, 0.2]))

    def transform(x):
        y = x.clone()
        y[:, MEANS] = feats.quat_rotate(g.expand(len(x), 4), x[:, MEANS]) * 7.0
        y[:, QUATS] = feats.quat_multiply(g.expand(len(x), 4), x[:, QUATS])
        y[:, SCALES] = x[:, SCALES] + math.log(7.0)
        return y

    rel2 = feats.relative_features(transform(state), transform(parent))
    torch.testing.assert_close(rel2, rel, atol=2e-5, rtol=1e-4)


def test_history_tokens_right_align_relative_to_newest():
    gen = torch.Generator().manual_seed(2)
    history = random_states(3 * 5, gen).view(3, 5, PACKED_DIM)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    tokens = feats.history_tokens(history, mask, window=3)
    torch.testing.assert_close(tokens.parent, history[[0, 1, 2], [1, 4, 2]])
    assert tokens.mask.tolist() == [[False, True, True], [True, True, True], [False, True, True]]
    newest = tokens.geometry[:, -1, :feats.GEOMETRY_DIM]
    identity = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float32)
    torch.testing.assert_close(newest, identity.expand(3, -1), atol=1e-6, rtol=0)
    # The oldest kept token of row 1 is stage 2, relative to stage 4.
    expected = feats.relative_features(history[1, 2], history[1, 4])[feats.GEOMETRY]
    torch.testing.assert_close(tokens.geometry[1, 0, :feats.GEOMETRY_DIM], expected)
    assert bool((tokens.geometry[~tokens.mask] == 0).all())
    with pytest.raises(ValueError, match="row 0 has no present stage"):
        feats.history_tokens(history, torch.zeros(3, 5, dtype=torch.bool), window=3)


# -------------------------------------------------------------------------------------------------- flow


def _random_flow(dim: int, seed: int, context_dim: int = 0) -> FlowPrior:
    torch.manual_seed(seed)
    flow = FlowPrior(dim, layers=4, hidden=16, context_dim=context_dim)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.4)
    return flow


def test_flow_density_integrates_to_one_on_a_grid():
    flow = _random_flow(2, seed=3)
    lin = torch.linspace(-30, 30, 1201)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    z = torch.stack([xx.flatten(), yy.flatten()], dim=-1)
    with torch.no_grad():
        mass = flow.log_prob(z).exp().sum() * (lin[1] - lin[0]) ** 2
    assert abs(float(mass) - 1.0) < 0.02


@pytest.mark.parametrize("context_dim", [0, 3])
def test_flow_log_prob_matches_autograd_jacobian_and_inverts(context_dim):
    flow = _random_flow(4, seed=4, context_dim=context_dim)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=gen) * 2
    ctx = torch.randn(5, 3, generator=gen) if context_dim else None
    for i, row in enumerate(z):
        c = None if ctx is None else ctx[i:i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: flow.inverse(v[None], c)[0][0], row)
        eps = flow.inverse(row[None], c)[0][0]
        expected = -0.5 * (eps.pow(2).sum() + 4 * math.log(2 * math.pi)) + torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(flow.log_prob(row[None], c)[0], expected, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(flow.transform(flow.inverse(z, ctx)[0], ctx), z, atol=1e-5, rtol=1e-5)
        a = flow.sample(5, torch.Generator().manual_seed(9), context=ctx)
        b = flow.sample(5, torch.Generator().manual_seed(9), context=ctx)
    assert torch.equal(a, b)
    if ctx is not None:
        with pytest.raises(ValueError, match="expected a context of shape"):
            flow.log_prob(z)


# ------------------------------------------------------------------------------------------------ losses


def test_loss_pieces():
    assert cyclic_beta(0, 0.1, 20) == 0.0
    assert cyclic_beta(5, 0.1, 20) == pytest.approx(0.5)
    assert cyclic_beta(15, 0.1, 20) == 1.0
    assert cyclic_beta(21, 0.1, 20) == pytest.approx(0.1)

    pred = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [9, 9, 9]]])
    target = torch.tensor([[[0.0, 0, 1], [5, 5, 5], [1, 0, 0]]])
    mask = torch.tensor([[True, False, True]])
    # Sets {p0, p2} vs {t0, t2}: p0->t0 1, p2(9,9,9)->t2 64+81+81=226; t0->p0 1, t2->p0 1.
    assert float(chamfer_distance(pred, target, mask)) == pytest.approx(1 + 226 + 1 + 1)
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert float(chamfer_distance(pred, target, none)) == 0.0

    a = torch.zeros(1, 3, 2)
    b = torch.ones(1, 3, 2)
    b[0, 1] = 100.0  # absent slot: ignored
    assert float(masked_mse(a, b, mask)) == pytest.approx(1.0)
    logits = torch.tensor([[10.0, -10.0, 10.0]])
    assert float(exist_bce(logits, mask)) < 1e-3
    assert float(exist_bce(-logits, mask)) > 5


# ---------------------------------------------------------------------------------------------- training


def test_training_overfits_a_small_transition_set():
    data = make_transitions(n=64)
    config = VAETrainConfig(model=tiny_config(), steps=300, batch_size=64, lr=3e-3, log_every=1,
                            kl_period=100, kl_alpha=0.02, coarse_fraction=0.2)
    vae, hist = train_vae(data, config, seed=0)
    first, last = hist["recon"][0], sum(hist["recon"][-10:]) / 10
    assert last < first / 10, (first, last)
    assert hist["phase"][0] == "coarse" and hist["phase"][-1] == "fine"
    assert hist["history_window"] == 3
    # The inference path (z from the flow prior, no target) reproduces the rule.
    tokens = vae.history_tokens(data.history, data.history_mask)
    states, prob = vae.predict_children(data.history, data.history_mask, torch.Generator().manual_seed(0))
    d_log = (states[:, 0, SCALES] - tokens.parent[:, SCALES]).mean()
    assert float(d_log) == pytest.approx(-0.2, abs=0.05)
    split = tokens.parent[:, OPACITY.start] > 0
    accuracy = ((prob[:, 1] > 0.5) == split).float().mean()
    assert float(accuracy) > 0.9
    assert bool((prob[:, 0] > 0.5).all())


def test_masked_target_never_reaches_the_history_path():
    torch.manual_seed(0)
    vae = GaussianVAE(tiny_config()).eval()
    data = make_transitions(n=16, seed=5)
    other = make_transitions(n=16, seed=6)  # different children, same history below
    tokens = vae.history_tokens(data.history, data.history_mask)
    t_a = vae.child_targets(data.children, data.children_mask, tokens.parent)
    t_b = vae.child_targets(other.children, other.children_mask, tokens.parent)
    out_a = vae(tokens, t_a, generator=torch.Generator().manual_seed(1))
    out_b = vae(tokens, t_b, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out_a.geometry.context, out_b.geometry.context)
    assert torch.equal(out_a.appearance.context, out_b.appearance.context)
    assert not torch.equal(out_a.geometry.z, out_b.geometry.z)  # the posterior does see the target
    inf_a = vae(tokens, generator=torch.Generator().manual_seed(2))
    inf_b = vae(tokens, generator=torch.Generator().manual_seed(2))
    assert torch.equal(inf_a.geometry.features, inf_b.geometry.features)
    assert torch.equal(inf_a.appearance.exist_logits, inf_b.appearance.exist_logits)


def test_training_ignores_history_rows_past_the_stage_and_is_deterministic():
    data = make_transitions(n=24, seed=7)
    leaked = SimpleNamespace(**vars(data))
    leaked.history = data.history.clone()
    leaked.history_mask = data.history_mask.clone()
    rows = torch.arange(24)
    leaked.history[rows, data.stage + 1] = data.children[:, 0]  # the target, marked present
    leaked.history_mask[rows, data.stage + 1] = True
    config = VAETrainConfig(model=tiny_config(), steps=4, batch_size=8)
    a, _ = train_vae(data, config, seed=3)
    b, _ = train_vae(data, config, seed=3)
    c, _ = train_vae(leaked, config, seed=3)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
        assert torch.equal(value, c.state_dict()[key]), key


def test_training_rejects_bad_transitions():
    data = make_transitions(n=8)
    bad = SimpleNamespace(**vars(data))
    bad.children = data.children[..., :10]
    with pytest.raises(ValueError, match="transitions.children"):
        train_vae(bad, VAETrainConfig(model=tiny_config(), steps=1))
    with pytest.raises(ValueError, match="transitions.stage"):
        train_vae(SimpleNamespace(**{**vars(data), "stage": None}), VAETrainConfig(model=tiny_config(), steps=1))


# ----------------------------------------------------------------------------------------- model / files


def test_default_sizes_are_near_the_papers():
    counts = GaussianVAE().parameter_counts()
    geo_mb, app_mb = counts["geometry"] * 4 / 1e6, counts["appearance"] * 4 / 1e6
    assert 0.4 < geo_mb < 0.7, geo_mb
    assert 0.8 < app_mb < 1.3, app_mb


def test_child_decoder_is_swappable():
    class ConstantDecoder(torch.nn.Module):
        def __init__(self, spec: DecoderSpec) -> None:
            super().__init__()
            self.spec = spec
            self.bias = torch.nn.Parameter(torch.zeros(spec.feature_dim + 1))

        def forward(self, context, z):
            out = self.bias.expand(context.shape[0], self.spec.max_children, -1)
            return out[..., :-1], out[..., -1] + 3.0

    register_decoder("test-constant", ConstantDecoder)
    vae = GaussianVAE(tiny_config(decoder="test-constant"))
    assert isinstance(vae.geometry.decoder, ConstantDecoder)
    gen = torch.Generator().manual_seed(0)
    history = random_states(5, gen)[:, None]
    states, prob = vae.predict_children(history, torch.ones(5, 1, dtype=torch.bool), gen)
    assert states.shape == (5, 4, PACKED_DIM)
    torch.testing.assert_close(prob, torch.full((5, 4), torch.sigmoid(torch.tensor(3.0)).item()))
    for name in ("slots", "mlp"):
        other = GaussianVAE(tiny_config(decoder=name))
        assert other.predict_children(history, torch.ones(5, 1, dtype=torch.bool), gen)[0].shape == (5, 4, 59)
    with pytest.raises(ValueError, match="unknown decoder 'nope'"):
        GaussianVAE(tiny_config(decoder="nope"))


def test_save_load_round_trip_and_corrupt_file(tmp_path):
    data = make_transitions(n=16)
    vae, _ = train_vae(data, VAETrainConfig(model=tiny_config(), steps=3, batch_size=8), seed=0)
    path = save_vae(vae, tmp_path / "sub" / "vae.pt")
    loaded = load_vae(path)
    assert loaded.window == vae.window
    for key, value in vae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    a = vae.predict_children(data.history, data.history_mask, torch.Generator().manual_seed(4))
    b = loaded.predict_children(data.history, data.history_mask, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert [p.name for p in path.parent.iterdir()] == ["vae.pt"]  # no temp file left behind

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt.pt: not a readable GaussianVAE file"):
        load_vae(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt: not a GaussianVAE file"):
        load_vae(foreign)
    mismatched = tmp_path / "mismatched.pt"
    payload = torch.load(path, weights_only=True)
    payload["config"]["max_children"] = 6
    torch.save(payload, mismatched)
    with pytest.raises(ValueError, match="mismatched.pt: GaussianVAE weights do not match"):
        load_vae(mismatched)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_vae(tmp_path / "missing.pt")
