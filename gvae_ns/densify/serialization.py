"""Space-filling-curve serialization of point clouds (z-order and Hilbert), batched by offsets.

Points are quantised on a ``2**bits`` grid per axis, encoded to a ``3 * bits``-bit curve code
(int64), and the index of their point cloud is put in the bits above that, so one sort groups
the clouds and orders each along its curve. Several clouds travel concatenated, described by
``offsets`` (cumulative counts, Pointcept style): ``offsets = [n0, n0 + n1, ...]``.

Curves (``CURVES``):

- ``"z"``: Morton / z-order, bits of (x, y, z) interleaved, x most significant.
- ``"hilbert"``: 3D Hilbert curve (Skilling's transpose algorithm); consecutive cells on it are
  always face neighbours, so it is at least as local as z-order.
- ``"z-trans"``, ``"hilbert-trans"``: the same curves with x and y swapped, a second ordering that
  breaks the first one's patch boundaries when layers alternate between them.

Kernel and fallback path: the encoders below are pure PyTorch (integer bit operations over whole
tensors, a Python loop over bits only), run on any device, and are the reference the tests check.
They are looked up through ``CURVE_KERNELS``; to use a faster kernel (a CUDA extension, a Triton
port), assign a function with the same contract, ``fn(grid: LongTensor[N, 3], bits: int) ->
LongTensor[N]`` returning codes in ``[0, 2**(3 * bits))``, to ``CURVE_KERNELS["z"]`` or
``CURVE_KERNELS["hilbert"]``. Everything else (quantisation, batching, sorting, the transposed
orders) stays here and keeps working unchanged; deleting the entry restores nothing, so keep the
original function around if you swap it.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import torch

CURVES = ("z", "z-trans", "hilbert", "hilbert-trans")
MAX_BITS = 16
"""Bits per axis at most: 48 code bits leave 15 bits for the cloud index in an int64."""

_SPREAD_MASKS = (
    (32, 0x001F00000000FFFF),
    (16, 0x001F0000FF0000FF),
    (8, 0x100F00F00F00F00F),
    (4, 0x10C30C30C30C30C3),
    (2, 0x1249249249249249),
)


class Serialization(NamedTuple):
    """Result of :func:`serialize`."""

    codes: torch.Tensor
    """``[N]`` int64: cloud index in the high bits, curve code in the low ``3 * bits`` bits."""
    order: torch.Tensor
    """``[N]`` int64 permutation: ``x[order]`` is sorted by code (clouds contiguous, in order)."""
    inverse: torch.Tensor
    """``[N]`` int64 inverse permutation: ``x[order][inverse] == x``."""


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"serialization: bits must be an int in [1, {MAX_BITS}], got {bits!r}")


def _check_grid(grid: torch.Tensor, bits: int) -> None:
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.dtype != torch.int64:
        raise ValueError(
            f"serialization: grid must be an int64 tensor [N, 3], got {tuple(grid.shape)} {grid.dtype}"
        )
    if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) >= (1 << bits)):
        raise ValueError(
            f"serialization: grid coordinates must lie in [0, {1 << bits}) for bits={bits}; "
            f"got [{int(grid.min())}, {int(grid.max())}]: raise bits or quantise with grid_coords()"
        )


def _spread3(v: torch.Tensor) -> torch.Tensor:
    """Insert two zero bits after every bit of ``v`` (up to 21 bits): ``abc -> a00b00c``."""
    v = v & 0x1FFFFF
    for shift, mask in _SPREAD_MASKS:
        v = (v | (v << shift)) & mask
    return v


def _compact3(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_spread3`: keep every third bit, starting at bit 0."""
    v = v & 0x1249249249249249
    masks = [0x1FFFFF] + [mask for _, mask in _SPREAD_MASKS[:-1]]
    for (shift, _), mask in zip(reversed(_SPREAD_MASKS), reversed(masks)):
        v = (v | (v >> shift)) & mask
    return v


def _interleave(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (_spread3(a) << 2) | (_spread3(b) << 1) | _spread3(c)


def _deinterleave(codes: torch.Tensor) -> List[torch.Tensor]:
    return [_compact3(codes >> 2), _compact3(codes >> 1), _compact3(codes)]


def morton_encode(grid: torch.Tensor, bits: int) -> torch.Tensor:
    """Z-order codes of integer grid cells ``[N, 3]`` (bit ``i`` of x -> code bit ``3i + 2``)."""
    _check_bits(bits)
    _check_grid(grid, bits)
    return _interleave(grid[:, 0], grid[:, 1], grid[:, 2])


def morton_decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`morton_encode`: ``[N]`` codes -> ``[N, 3]`` grid cells."""
    _check_bits(bits)
    return torch.stack(_deinterleave(codes.long()), dim=1)


def _flag(v: torch.Tensor, bit: int) -> torch.Tensor:
    """All ones where bit ``bit`` of ``v`` is set, zero elsewhere (a branch-free select mask)."""
    return -((v >> bit) & 1)


def _undo_exchange(x: List[torch.Tensor], i: int, bit: int) -> None:
    """Skilling's step for axis ``i`` at ``bit``: invert x0's low bits if x_i has ``bit`` set, else swap them."""
    low = (1 << bit) - 1
    hit = _flag(x[i], bit)
    if i == 0:
        x[0].bitwise_xor_(hit & low)
        return
    swap = (x[0] ^ x[i]) & low & ~hit
    x[0].bitwise_xor_((hit & low) | swap)
    x[i].bitwise_xor_(swap)


def hilbert_encode(grid: torch.Tensor, bits: int) -> torch.Tensor:
    """Hilbert codes of integer grid cells ``[N, 3]`` (Skilling 2004, vectorised over points)."""
    _check_bits(bits)
    _check_grid(grid, bits)
    x = [grid[:, i].clone() for i in range(3)]
    for bit in range(bits - 1, 0, -1):
        for i in range(3):
            _undo_exchange(x, i, bit)
    x[1].bitwise_xor_(x[0])
    x[2].bitwise_xor_(x[1])
    t = torch.zeros_like(x[2])
    for bit in range(bits - 1, 0, -1):
        t.bitwise_xor_(_flag(x[2], bit) & ((1 << bit) - 1))
    return _interleave(x[0] ^ t, x[1] ^ t, x[2] ^ t)


def hilbert_decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`hilbert_encode`: ``[N]`` codes -> ``[N, 3]`` grid cells."""
    _check_bits(bits)
    x = _deinterleave(codes.long())
    t = x[2] >> 1
    x[2].bitwise_xor_(x[1])
    x[1].bitwise_xor_(x[0])
    x[0].bitwise_xor_(t)
    for bit in range(1, bits):
        for i in (2, 1, 0):
            _undo_exchange(x, i, bit)
    return torch.stack(x, dim=1)


CURVE_KERNELS: Dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "z": morton_encode,
    "hilbert": hilbert_encode,
}
"""Curve name -> encoder ``fn(grid [N, 3] int64, bits) -> codes [N] int64``; swap entries here."""


def offsets_to_batch(offsets: Optional[torch.Tensor], n: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Cloud index per point from cumulative ``offsets`` (``None``: one cloud of ``n`` points)."""
    if offsets is None:
        return torch.zeros(n, dtype=torch.long, device=device)
    offsets = torch.as_tensor(offsets, dtype=torch.long, device=device)
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(f"serialization: offsets must be a non-empty 1D tensor, got shape {tuple(offsets.shape)}")
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    if bool((counts < 0).any()) or int(offsets[-1]) != n:
        raise ValueError(
            f"serialization: offsets must be non-decreasing cumulative counts ending at N={n} "
            f"(e.g. [n0, n0 + n1]), got {offsets.tolist()[:8]}"
        )
    return torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), counts)


def batch_to_offsets(batch: torch.Tensor, num_clouds: Optional[int] = None) -> torch.Tensor:
    """Cumulative counts from a sorted per-point cloud index (inverse of :func:`offsets_to_batch`)."""
    return torch.cumsum(torch.bincount(batch, minlength=num_clouds or 0), dim=0)


def grid_coords(
    points: torch.Tensor,
    bits: int = 10,
    offsets: Optional[torch.Tensor] = None,
    grid_size: Optional[float] = None,
) -> torch.Tensor:
    """Quantise float points ``[N, 3]`` to int64 grid cells in ``[0, 2**bits)``, per cloud.

    Each cloud is shifted to start at 0. With ``grid_size=None`` its largest extent is divided into
    ``2**bits`` cells (same cell size on every axis); with a ``grid_size`` the cells have that size
    and a cloud too large for ``bits`` raises.
    """
    _check_bits(bits)
    if points.dim() != 2 or points.shape[1] != 3 or not points.is_floating_point():
        raise ValueError(f"serialization: points must be a float tensor [N, 3], got {tuple(points.shape)} {points.dtype}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("serialization: points contain NaN or inf; drop or fix them before serializing")
    n = points.shape[0]
    batch = offsets_to_batch(offsets, n, points.device)
    num = int(batch.max()) + 1 if n else 1
    index = batch[:, None].expand(-1, 3)
    pts = points.double()
    lo = pts.new_zeros(num, 3).scatter_reduce(0, index, pts, reduce="amin", include_self=False)
    rel = pts - lo[batch]
    cells = 1 << bits
    if grid_size is None:
        hi = pts.new_zeros(num, 3).scatter_reduce(0, index, pts, reduce="amax", include_self=False)
        extent = (hi - lo).amax(dim=1)
        cell = torch.where(extent > 0, extent / cells, torch.ones_like(extent))
        return torch.floor(rel / cell[batch, None]).long().clamp_(0, cells - 1)
    if grid_size <= 0:
        raise ValueError(f"serialization: grid_size must be > 0, got {grid_size}")
    grid = torch.floor(rel / grid_size).long()
    if n and int(grid.max()) >= cells:
        raise ValueError(
            f"serialization: a cloud spans {int(grid.max()) + 1} cells of grid_size={grid_size} but "
            f"bits={bits} allows {cells}; raise bits, raise grid_size, or pass grid_size=None"
        )
    return grid


def encode(grid: torch.Tensor, curve: str = "hilbert", bits: int = 10) -> torch.Tensor:
    """Curve codes ``[N]`` of grid cells ``[N, 3]`` for one of ``CURVES`` (no cloud index)."""
    if curve not in CURVES:
        raise ValueError(f"serialization: unknown curve {curve!r}; choose one of {CURVES}")
    base, _, trans = curve.partition("-")
    if trans:
        grid = grid[:, [1, 0, 2]]
    return CURVE_KERNELS[base](grid, bits)


def serialize(
    coords: torch.Tensor,
    curve: str = "hilbert",
    bits: int = 10,
    offsets: Optional[torch.Tensor] = None,
    grid_size: Optional[float] = None,
) -> Serialization:
    """Codes, sorting permutation and its inverse for points (float) or grid cells (int64) ``[N, 3]``.

    Float points are quantised with :func:`grid_coords`; int64 input is taken as grid cells. The
    cloud index (from ``offsets``) fills the bits above ``3 * bits``; ties keep input order.
    """
    if coords.is_floating_point():
        grid = grid_coords(coords, bits, offsets, grid_size)
    else:
        grid = coords.long()
    n = grid.shape[0]
    batch = offsets_to_batch(offsets, n, grid.device)
    num = int(batch.max()) + 1 if n else 1
    if (num - 1).bit_length() + 3 * bits > 63:
        raise ValueError(
            f"serialization: {num} clouds and bits={bits} do not fit an int64 code; lower bits"
        )
    codes = encode(grid, curve, bits) | (batch << (3 * bits))
    order = torch.argsort(codes, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    return Serialization(codes, order, inverse)
