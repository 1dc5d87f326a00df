"""Serialized patch attention and the generative densification head."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gvae_ns.densify.head import DensifyHead, DensifyHeadConfig
from gvae_ns.densify.patch_attention import (
    SerializedAttention,
    SerializedTransformer,
    build_layout,
)
from gvae_ns.gaussians import MEANS, QUATS, SCALES, PACKED_DIM
from gvae_ns.quaternions import rotate as quat_rotate

DIM, HEADS = 16, 4


def _reference_attention(attn: SerializedAttention, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention of ``x [n, C]`` over all its tokens, with ``attn``'s weights."""
    n, c = x.shape
    qkv = attn.qkv(x).view(n, 3, HEADS, c // HEADS).permute(1, 2, 0, 3)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return attn.proj(out.transpose(0, 1).reshape(n, c))


@pytest.fixture
def cloud():
    g = torch.Generator().manual_seed(0)
    return torch.rand(70, 3, generator=g), torch.randn(70, DIM, generator=g)


def test_one_patch_covering_all_points_is_full_attention(cloud):
    points, x = cloud
    torch.manual_seed(0)
    attn = SerializedAttention(DIM, HEADS)
    layout = build_layout(points, "hilbert", patch_size=128)
    assert layout.num_patches == 1 and layout.has_padding
    torch.testing.assert_close(attn(x, layout), _reference_attention(attn, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("curve", ["z", "hilbert-trans"])
def test_small_patches_attend_only_within_their_patch(cloud, curve):
    points, x = cloud
    torch.manual_seed(0)
    attn = SerializedAttention(DIM, HEADS)
    offsets = torch.tensor([45, 70])
    layout = build_layout(points, curve, patch_size=16, offsets=offsets)
    # 45 -> 3 patches (3 padded slots), 25 -> 2 patches (7 padded slots); clouds never share a patch.
    assert layout.num_patches == 5 and int(layout.valid.sum()) == 70
    out = attn(x, layout)
    members = layout.source.new_full((layout.valid.numel(),), -1)
    members[layout.slot] = layout.source
    members = members.view(5, 16)
    for patch, valid in zip(members, layout.valid):
        idx = patch[valid]
        assert bool((idx < 45).all()) or bool((idx >= 45).all())
        torch.testing.assert_close(out[idx], _reference_attention(attn, x[idx]), atol=1e-5, rtol=1e-4)
    assert (out - _reference_attention(attn, x)).abs().max() > 1e-2


def test_serialized_transformer_is_permutation_equivariant_and_differentiable():
    g = torch.Generator().manual_seed(3)
    cells = torch.randperm(16**3, generator=g)[:150]
    points = torch.stack([cells // 256, cells // 16 % 16, cells % 16], dim=1).float()
    x = torch.randn(150, DIM, generator=g, requires_grad=True)
    torch.manual_seed(0)
    net = SerializedTransformer(DIM, depth=3, num_heads=HEADS, patch_size=32, orders=("z", "hilbert"), bits=4)
    out = net(x, points)
    perm = torch.randperm(150, generator=g)
    torch.testing.assert_close(net(x[perm], points[perm]), out[perm], atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0


def _state(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(n, PACKED_DIM, generator=g)
    state[:, MEANS] = torch.rand(n, 3, generator=g) * 4.0
    state[:, SCALES] = torch.rand(n, 3, generator=g) * 2.0 - 4.0
    state[:, QUATS] = state[:, QUATS] * 3.0
    return state


def _head(**overrides) -> DensifyHead:
    torch.manual_seed(0)
    cfg = dataclasses.replace(DensifyHeadConfig(width=32, patch_size=16, children=3, num_layers=3), **overrides)
    return DensifyHead(cfg)


def test_generated_gaussians_are_valid_and_bounded_by_their_parent():
    state = _state(60)
    head = _head()
    out = head(state)
    r, k = head.cfg.children, head.cfg.offset_sigmas
    m = out.states.shape[0]
    assert out.states.shape == (m, PACKED_DIM) and out.source.shape == out.layer.shape == (m,)
    assert bool(torch.isfinite(out.states).all())
    torch.testing.assert_close(out.states[:, QUATS].norm(dim=1), torch.ones(m))
    root = state[out.source]
    assert bool((out.states[:, SCALES] < root[:, SCALES]).all())
    reach = (out.layer + 1).float() * k * 3**0.5 * root[:, SCALES].exp().amax(dim=1)
    assert bool(((out.states[:, MEANS] - root[:, MEANS]).norm(dim=1) <= reach * 1.0001).all())
    # leaves only: layer l emits the children it did not keep, the last layer emits all.
    kept = [int(mask.sum()) for mask in out.keep_mask]
    assert len(out.keep_mask) == len(out.keep_prob) == 2
    assert out.keep_mask[0].shape == (60 * r,) and out.keep_mask[1].shape == (kept[0] * r,)
    assert 0 < kept[0] < 60 * r
    counts = torch.bincount(out.layer, minlength=3).tolist()
    assert counts == [60 * r - kept[0], kept[0] * r - kept[1], kept[1] * r]


def test_children_start_inside_the_parent_with_its_colour():
    state = _state(20)
    out = _head(num_layers=1)(state)
    root = state[out.source]
    assert out.states.shape[0] == 20 * 3 and out.keep_mask == []
    torch.testing.assert_close(out.states[:, 10:], root[:, 10:])
    shrink = root[:, SCALES] - out.states[:, SCALES]
    torch.testing.assert_close(shrink, torch.full_like(shrink, torch.log(torch.tensor(3.0)).item() / 3))


def test_keeping_densified_children_outputs_every_layer():
    state = _state(30)
    out = _head(replace_densified=False)(state)
    kept = [int(mask.sum()) for mask in out.keep_mask]
    assert torch.bincount(out.layer, minlength=3).tolist() == [90, kept[0] * 3, kept[1] * 3]


def test_straight_through_mask_is_hard_forward_and_passes_gradients():
    state = _state(40)
    head = _head()
    out = head(state)
    loss = out.states[:, MEANS].square().sum() + out.states[:, 10:].square().sum()
    loss.backward()
    for layer in head.layers[:-1]:
        grads = [p.grad for p in layer.mask_mlp.parameters()]
        assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
        assert sum(float(gr.abs().sum()) for gr in grads) > 0
    # A bias shift that flips no hard decision leaves the forward output bit-identical.
    prob = out.keep_prob[0].detach()
    margin = (prob - head.cfg.keep_threshold).abs().min().item()
    with torch.no_grad():
        head.layers[0].mask_mlp[-1].bias += 0.25 * margin
        again = head(state)
    assert torch.equal(again.states, out.states.detach())
    assert not torch.equal(again.keep_prob[0], prob)


def test_feature_input_changes_the_result_and_is_checked():
    state = _state(25)
    head = _head(feature_dim=8, num_layers=1)
    feature = torch.randn(25, 8)
    plain, conditioned = head(state), head(state, feature)
    assert plain.states.shape == conditioned.states.shape
    assert (plain.states[:, MEANS] - conditioned.states[:, MEANS]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="feature_dim"):
        head(state, torch.randn(25, 5))
    with pytest.raises(ValueError, match="feature_dim is 0"):
        _head(num_layers=1)(state, feature)


def test_scenes_batched_by_offsets_do_not_interact():
    a, b = _state(40, seed=1), _state(24, seed=2)
    head = _head()
    alone = head(a)
    both = head(torch.cat([a, b]), offsets=torch.tensor([40, 64]))
    from_a = both.source < 40
    torch.testing.assert_close(both.states[from_a], alone.states, atol=1e-5, rtol=1e-4)
    assert torch.equal(both.source[from_a], alone.source)
    assert int((~from_a).sum()) > 0


def test_empty_selection_and_bad_states():
    head = _head()
    out = head(torch.zeros(0, PACKED_DIM))
    assert out.states.shape == (0, PACKED_DIM) and out.source.numel() == 0
    bad = _state(4)
    bad[1, QUATS] = 0.0
    with pytest.raises(ValueError, match="zero quaternion"):
        head(bad)
    bad = _state(4)
    bad[2, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        head(bad)
    with pytest.raises(ValueError, match=r"\[N, 59\]"):
        head(torch.zeros(3, 14))


def test_quat_rotate_matches_rotation_matrix():
    q = F.normalize(torch.tensor([[0.9, 0.1, -0.3, 0.2]]), dim=-1)
    w, x, y, z = q[0]
    rot = torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    v = torch.tensor([[0.3, -1.2, 2.0]])
    torch.testing.assert_close(quat_rotate(q, v), v @ rot.T)


def test_one_token_patch_sends_finite_gradients_to_positions():
    # 5 points with patch size 4: the last patch holds a single token, whose relative position is 0.
    points = torch.randn(5, 3, requires_grad=True)
    layout = build_layout(points.detach(), "z", patch_size=4)
    layout.patch_relative(points).sum().backward()
    assert torch.isfinite(points.grad).all()
