"""Space-filling-curve serialization: hand-checked codes, bijection, locality, batching by offsets."""

import itertools

import pytest
import torch

from gvae_ns.densify import serialization as ser
from gvae_ns.densify.serialization import (
    CURVES,
    grid_coords,
    hilbert_decode,
    hilbert_encode,
    morton_decode,
    morton_encode,
    offsets_to_batch,
    serialize,
)

BITS = 4


@pytest.fixture(scope="module")
def full_grid() -> torch.Tensor:
    side = range(1 << BITS)
    return torch.tensor(list(itertools.product(side, side, side)), dtype=torch.long)


def test_morton_codes_by_hand():
    cells = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [2, 0, 0], [3, 5, 6]])
    # x bit i -> code bit 3i+2, y -> 3i+1, z -> 3i. (3, 5, 6) = (011, 101, 110):
    # bit0 (1,1,0)=6, bit1 (1,0,1)=5 -> 40, bit2 (0,1,1)=3 -> 192; total 238.
    assert morton_encode(cells, BITS).tolist() == [0, 4, 2, 1, 7, 32, 238]
    assert morton_encode(torch.tensor([[1023, 1023, 1023]]), 10).item() == (1 << 30) - 1


@pytest.mark.parametrize("curve", CURVES)
def test_codes_are_a_bijection_on_the_full_grid(full_grid, curve):
    codes = ser.encode(full_grid, curve, BITS)
    assert codes.dtype == torch.int64
    assert torch.equal(torch.sort(codes).values, torch.arange(full_grid.shape[0]))
    s = serialize(full_grid, curve, BITS)
    assert torch.equal(full_grid[s.order][s.inverse], full_grid)
    assert torch.equal(s.codes[s.order], torch.sort(s.codes).values)


@pytest.mark.parametrize("encode,decode", [(morton_encode, morton_decode), (hilbert_encode, hilbert_decode)])
def test_decode_inverts_encode(encode, decode):
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 1 << 16, (2000, 3), generator=g)
    assert torch.equal(decode(encode(cells, 16), 16), cells)


def test_hilbert_steps_are_face_neighbours_and_z_order_jumps(full_grid):
    steps = {}
    for curve in ("hilbert", "z"):
        ordered = full_grid[serialize(full_grid, curve, BITS).order]
        steps[curve] = (ordered[1:] - ordered[:-1]).abs().sum(dim=1)
    assert bool((steps["hilbert"] == 1).all())
    assert steps["z"].float().mean() > 1.5


def test_curve_neighbours_are_much_closer_than_random_pairs():
    g = torch.Generator().manual_seed(1)
    points = torch.rand(4000, 3, generator=g)
    random_pairs = (points[torch.randperm(4000, generator=g)] - points).norm(dim=1).mean()
    mean_step = {}
    for curve in CURVES:
        ordered = points[serialize(points, curve, 10).order]
        mean_step[curve] = (ordered[1:] - ordered[:-1]).norm(dim=1).mean()
        assert mean_step[curve] < 0.2 * random_pairs, curve
    assert mean_step["hilbert"] <= mean_step["z"]
    assert mean_step["hilbert-trans"] <= mean_step["z-trans"]


def test_transposed_order_swaps_x_and_y():
    cells = torch.tensor([[1, 0, 0], [0, 1, 0]])
    assert torch.equal(ser.encode(cells, "z-trans", BITS), ser.encode(cells[:, [1, 0, 2]], "z", BITS))
    assert not torch.equal(ser.encode(cells, "z-trans", BITS), ser.encode(cells, "z", BITS))


def test_batching_by_offsets_keeps_clouds_separate():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(50, 3, generator=g), torch.rand(30, 3, generator=g) * 5 - 1
    both = torch.cat([a, b])
    s = serialize(both, "hilbert", 8, offsets=torch.tensor([50, 80]))
    cloud = offsets_to_batch(torch.tensor([50, 80]), 80)
    assert torch.equal(cloud[s.order], torch.sort(cloud).values)
    assert torch.equal(s.codes >> 24, cloud)
    assert torch.equal(s.order[:50], serialize(a, "hilbert", 8).order)
    assert torch.equal(s.order[50:] - 50, serialize(b, "hilbert", 8).order)
    assert torch.equal(both[s.order][s.inverse], both)


def test_grid_coords_quantises_each_cloud_to_its_own_box():
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.25], [10.0, 10.0, 10.0], [12.0, 10.0, 11.0]])
    grid = grid_coords(points, bits=3, offsets=torch.tensor([2, 4]))
    assert grid.tolist() == [[0, 0, 0], [7, 4, 2], [0, 0, 0], [7, 0, 4]]
    cells = grid_coords(points[:2], bits=3, grid_size=0.25)
    assert cells.tolist() == [[0, 0, 0], [4, 2, 1]]
    with pytest.raises(ValueError, match="raise bits"):
        grid_coords(points[:2], bits=2, grid_size=0.25)


def test_swapped_kernel_is_used(monkeypatch):
    calls = []

    def kernel(grid, bits):
        calls.append(bits)
        return morton_encode(grid, bits).flip(0)

    monkeypatch.setitem(ser.CURVE_KERNELS, "z", kernel)
    cells = torch.tensor([[0, 0, 0], [1, 0, 0]])
    assert serialize(cells, "z", BITS).codes.tolist() == [4, 0]
    assert calls == [BITS]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 0}, "bits must be"),
        ({"bits": 17}, "bits must be"),
        ({"curve": "peano"}, "unknown curve"),
        ({"offsets": torch.tensor([3, 5])}, "ending at N=4"),
        ({"offsets": torch.tensor([3, 2, 4])}, "non-decreasing"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    points = torch.rand(4, 3)
    with pytest.raises(ValueError, match=match):
        serialize(points, **kwargs)


def test_out_of_range_cells_and_nan_points_raise():
    with pytest.raises(ValueError, match="raise bits"):
        serialize(torch.tensor([[16, 0, 0]]), "z", BITS)
    with pytest.raises(ValueError, match="NaN"):
        serialize(torch.tensor([[float("nan"), 0.0, 0.0]]))


def test_empty_input():
    s = serialize(torch.zeros(0, 3))
    assert s.codes.shape == s.order.shape == s.inverse.shape == (0,)
