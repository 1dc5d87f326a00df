"""The pure-PyTorch compositor (the reference rasterizer's back end) and its autograd Function.

:func:`composite` alpha-blends projected Gaussians front to back with gsplat's rules (see
:mod:`gvae_ns.render.contract`). Nothing is dense in ``N x H*W``. The image is cut into
``BLOCK x BLOCK``-pixel blocks; each block gets the depth-sorted list of the Gaussians whose
``alpha >= 1/255`` ellipse reaches one of its pixels (exact ellipse/box test, inside the 16x16 tiles
the Gaussian's radius box overlaps, as gsplat's ``isect_tiles``). Blocks with lists of similar length
are padded into ``[B, 16, K]`` batches in which every step is a dense tensor op: ``log(opacity) -
sigma`` is a quadratic in the pixel offset, so all exponents come from one matmul; transmittance is a
``cumsum`` of ``log(1 - alpha)`` along ``K``. Compositing is a ``torch.autograd.Function`` with a
hand-written backward that keeps only the block lists (cut after each block's last contributing
Gaussian) and recomputes the rest, so memory stays bounded (``MAX_ENTRIES_PER_CHUNK``) and the
view-space gradient ``info["means2d"].grad`` (and ``.absgrad``) is what gsplat's ``DefaultStrategy``
expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from gvae_ns.render.contract import ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN, tile_box

BLOCK = 4
"""Side in pixels of the blocks composited densely against their depth-sorted Gaussian lists."""
MAX_ENTRIES_PER_CHUNK = 1 << 20
"""(pixel, Gaussian) entries evaluated at once; bounds the temporary memory of a render."""
_PAD_SIZES = sorted({math.ceil(1.2**k) for k in range(120)})


def composite(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    tile_size: int = 16,
    absgrad_sink: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite projected Gaussians front to back: ``[C,H,W,D]`` colours, ``[C,H,W,1]`` alphas.

    Inputs are per camera: ``means2d [C,N,2]``, ``conics [C,N,3]``, ``colors [C,N,D]``,
    ``opacities [C,N]``, ``radii [C,N]`` (0 = skip), ``depths [C,N]`` (sort key only),
    ``backgrounds [C,D]``. ``absgrad_sink`` receives the ``[C,N,2]`` sum over pixels of absolute
    per-pixel gradients of ``means2d`` during backward.
    """
    tensors = (means2d, conics, colors, opacities, backgrounds)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _Composite.apply(
        means2d, conics, colors, opacities, backgrounds, radii, depths.detach(),
        width, height, tile_size, absgrad_sink, differentiable,
    )


def _block_lists(
    means2d: Tensor, conics: Tensor, opacities: Tensor, radii: Tensor, depths: Tensor,
    width: int, height: int, tile_size: int,
) -> tuple[Tensor, Tensor]:
    """(Gaussian, block) pairs in (camera, block, depth) order, as flat ``C*N`` and ``C*n_blocks`` ids.

    A Gaussian is listed in a block when some pixel centre of the block lies both in the tiles its
    radius box touches (gsplat's ``isect_tiles``) and in the ellipse where ``alpha >= 1/255``.
    """
    C, N = radii.shape
    device = means2d.device
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    blocks_x, blocks_y = math.ceil(width / BLOCK), math.ceil(height / BLOCK)
    gauss, block = [], []
    for cam in range(C):
        live = (radii[cam] > 0) & (opacities[cam] >= ALPHA_MIN)
        idx = torch.nonzero(live).squeeze(1)
        idx = idx[torch.argsort(depths[cam, idx], stable=True)]  # front to back, ties by index
        m2, con, op = means2d[cam, idx], conics[cam, idx], opacities[cam, idx]
        tx0, tx1, ty0, ty1 = tile_box(m2, radii[cam, idx], tile_size, tile_width, tile_height)
        det_conic = (con[:, 0] * con[:, 2] - con[:, 1] ** 2).clamp_min(1e-30)
        level = torch.log(op / ALPHA_MIN).clamp_min(0)  # alpha >= 1/255  <=>  sigma <= level
        ex = torch.sqrt(2.0 * level * con[:, 2] / det_conic)
        ey = torch.sqrt(2.0 * level * con[:, 0] / det_conic)
        # pixel ranges [x0, x1) x [y0, y1), one pixel of margin around the ellipse's box
        x0 = torch.maximum(tx0 * tile_size, torch.floor(m2[:, 0] - ex - 0.5).long())
        x1 = torch.minimum((tx1 * tile_size).clamp_max(width), torch.floor(m2[:, 0] + ex - 0.5).long() + 2)
        y0 = torch.maximum(ty0 * tile_size, torch.floor(m2[:, 1] - ey - 0.5).long())
        y1 = torch.minimum((ty1 * tile_size).clamp_max(height), torch.floor(m2[:, 1] + ey - 0.5).long() + 2)
        bx0, by0 = torch.div(x0, BLOCK, rounding_mode="floor"), torch.div(y0, BLOCK, rounding_mode="floor")
        nx = ((torch.div(x1 + BLOCK - 1, BLOCK, rounding_mode="floor") - bx0) * (x1 > x0)).clamp_min(0)
        ny = ((torch.div(y1 + BLOCK - 1, BLOCK, rounding_mode="floor") - by0) * (y1 > y0)).clamp_min(0)
        counts = nx * ny
        g = torch.repeat_interleave(torch.arange(idx.numel(), device=device), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        local = torch.arange(g.numel(), device=device) - first  # index inside the Gaussian's block box
        ints = _take(torch.stack([bx0, by0, nx, x0, x1, y0, y1], dim=1), g)
        floats = _take(torch.cat([m2, con, level[:, None]], dim=1), g)
        bx0_g, by0_g, nx_g, x0_g, x1_g, y0_g, y1_g = ints.unbind(1)
        mx, my, con_g, level_g = floats[:, 0], floats[:, 1], floats[:, 2:5], floats[:, 5]
        bx = bx0_g + local % nx_g
        by = by0_g + torch.div(local, nx_g, rounding_mode="floor")
        # pixel centres of the block that are in the Gaussian's pixel range, then the exact test
        lo_x = torch.maximum(bx * BLOCK, x0_g).to(m2.dtype) + 0.5
        hi_x = torch.minimum(bx * BLOCK + BLOCK, x1_g).to(m2.dtype) - 0.5
        lo_y = torch.maximum(by * BLOCK, y0_g).to(m2.dtype) + 0.5
        hi_y = torch.minimum(by * BLOCK + BLOCK, y1_g).to(m2.dtype) - 0.5
        min_sigma = _min_sigma_in_box(con_g, mx - hi_x, mx - lo_x, my - hi_y, my - lo_y)
        reach = torch.nonzero(min_sigma <= level_g * (1 + 1e-5) + 1e-6).squeeze(1)
        gauss.append(_take(idx, _take(g, reach)) + cam * N)
        block.append(_take(by * blocks_x + bx, reach) + cam * blocks_x * blocks_y)
    gauss, block = torch.cat(gauss), torch.cat(block)
    order = torch.argsort(block, stable=True)  # pairs were listed depth-major within a camera
    return _take(gauss, order), _take(block, order)


def _min_sigma_in_box(conics: Tensor, lx: Tensor, hx: Tensor, ly: Tensor, hy: Tensor) -> Tensor:
    """Minimum of ``0.5 d^T [[a, b], [b, c]] d`` over boxes ``d in [lx, hx] x [ly, hy]`` (per row)."""
    a, b, c = conics.unbind(-1)

    def sigma(dx: Tensor, dy: Tensor) -> Tensor:
        return 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy

    def along_y(dx: Tensor) -> Tensor:  # edge dx = const, best dy on it
        return sigma(dx, torch.minimum(torch.maximum(-b * dx / c, ly), hy))

    def along_x(dy: Tensor) -> Tensor:
        return sigma(torch.minimum(torch.maximum(-b * dy / a, lx), hx), dy)

    edges = torch.minimum(torch.minimum(along_y(lx), along_y(hx)), torch.minimum(along_x(ly), along_x(hy)))
    inside = (lx <= 0) & (hx >= 0) & (ly <= 0) & (hy >= 0)
    return torch.where(inside, torch.zeros_like(edges), edges)


def _chunks(gauss: Tensor, block: Tensor, null: int):
    """Group blocks by their padded list length into ``(block ids [B], Gaussian ids [B, K])`` chunks.

    ``gauss`` / ``block`` list each block's Gaussians contiguously, front to back. Lists are padded
    with ``null`` (an index whose opacity is zero) up to sizes growing by ~1.2x, and each chunk
    holds at most ``MAX_ENTRIES_PER_CHUNK`` pixel-Gaussian entries.
    """
    device = gauss.device
    if block.numel() == 0:
        return []
    starts = torch.ones_like(block, dtype=torch.bool)
    starts[1:] = block[1:] != block[:-1]
    run = torch.cumsum(starts, 0) - 1  # run (= block list) of each pair
    run_start = torch.nonzero(starts).squeeze(1)
    run_len = torch.diff(run_start, append=torch.tensor([block.numel()], device=device))
    slot = torch.arange(block.numel(), device=device) - _take(run_start, run)
    sizes = torch.tensor(_PAD_SIZES, device=device)
    run_size = _take(sizes, torch.searchsorted(sizes, run_len))
    # runs ordered by padded size; the pairs of run r go to row rank[r] of its size's matrix
    run_order = torch.argsort(run_size, stable=True)
    ordered_size = _take(run_size, run_order)
    size_values, size_counts = torch.unique_consecutive(ordered_size, return_counts=True)
    first_of_size = torch.cumsum(size_counts, 0) - size_counts
    rank = torch.empty_like(run_order)
    rank[run_order] = torch.arange(run_order.numel(), device=device)
    size_id = torch.searchsorted(size_values, run_size)
    row = rank - _take(first_of_size, size_id)
    pair_size_id = _take(size_id, run)
    pair_order = torch.argsort(pair_size_id, stable=True)
    pair_counts = torch.bincount(pair_size_id, minlength=size_values.numel()).tolist()
    out = []
    for sid, (size, n_runs, pairs) in enumerate(
        zip(size_values.tolist(), size_counts.tolist(), torch.split(pair_order, pair_counts))
    ):
        runs = run_order[first_of_size[sid] : first_of_size[sid] + n_runs]
        lists = torch.full((n_runs, size), null, dtype=torch.long, device=device)
        lists.index_put_((_take(row, _take(run, pairs)), _take(slot, pairs)), _take(gauss, pairs))
        blocks = _take(block, _take(run_start, runs))
        step = max(1, MAX_ENTRIES_PER_CHUNK // (BLOCK * BLOCK * size))
        for start in range(0, n_runs, step):
            out.append((blocks[start : start + step], lists[start : start + step]))
    return out


class _Entries(NamedTuple):
    """Per-chunk quantities shared by forward and backward; ``[B, P, K]`` unless noted."""

    pixel: Tensor
    """``[B, P]`` flat pixel id (``null_pixel`` for pixels outside the image)."""
    u: Tensor
    """``[B, K]`` Gaussian centre x relative to the block's first pixel centre."""
    v: Tensor
    """``[B, K]`` same for y."""
    params: Tensor
    """``[B, K, 6]`` mean x, mean y, conic a, b, c, opacity."""
    raw: Tensor
    """``opacity * exp(-sigma)`` before clamping."""
    alpha: Tensor
    """Clamped alpha, 0 where skipped."""
    trans: Tensor
    """Transmittance in front of the entry."""
    weight: Tensor
    """``alpha * trans`` where the entry contributes, else 0."""
    contributes: Tensor
    """Bool: the pixel had not stopped before this entry."""


def _take(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a table indexed along dim 0 (``index_select`` is faster on CPU)."""
    return torch.index_select(table, 0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def _block_basis(device, dtype) -> Tensor:
    """``[P, 6]`` monomials ``(1, qx, qy, qx^2, qx qy, qy^2)`` of the pixel offsets inside a block."""
    q = torch.arange(BLOCK, device=device, dtype=dtype)
    qy, qx = torch.meshgrid(q, q, indexing="ij")
    qx, qy = qx.reshape(-1), qy.reshape(-1)
    return torch.stack([torch.ones_like(qx), qx, qy, qx * qx, qx * qy, qy * qy], dim=-1)


def _entries(tab: Tensor, blocks: Tensor, lists: Tensor, width: int, height: int, n_cam_blocks: int,
             null_pixel: int, box: Tensor | None) -> _Entries:
    """Evaluate every (pixel of a block, Gaussian of its list) entry of one chunk.

    With pixel offsets ``q`` inside a block and ``(u, v)`` the centre relative to the block,
    ``log(opacity) - sigma`` is a quadratic in ``q``; all ``[B, P, K]`` exponents come out of one
    matmul of the monomials of ``q`` with six per-(block, Gaussian) coefficients.
    """
    device, dtype = tab.device, tab.dtype
    blocks_x = math.ceil(width / BLOCK)
    cam = torch.div(blocks, n_cam_blocks, rounding_mode="floor")
    local = blocks - cam * n_cam_blocks
    bx = (local % blocks_x) * BLOCK
    by = torch.div(local, blocks_x, rounding_mode="floor") * BLOCK
    basis = _block_basis(device, torch.long)
    px = bx[:, None] + basis[:, 1]
    py = by[:, None] + basis[:, 2]
    inside = (px < width) & (py < height)
    pixel = torch.where(inside, cam[:, None] * (width * height) + py * width + px, null_pixel)

    params = _take(tab, lists)  # [B, K, 6]
    mx, my, a, b, c, op = params.unbind(-1)
    u = mx - (bx.to(dtype) + 0.5)[:, None]
    v = my - (by.to(dtype) + 0.5)[:, None]
    log_op = torch.where(op > 0, torch.log(op.clamp_min(1e-30)), torch.full_like(op, -1e4))
    au_bv, cv_bu = a * u + b * v, c * v + b * u
    coef = torch.stack(
        [log_op - 0.5 * (u * au_bv + v * cv_bu), au_bv, cv_bu, -0.5 * a, -b, -0.5 * c], dim=1
    )  # [B, 6, K]: log(opacity) - sigma in the monomials of q
    raw = torch.exp(torch.matmul(basis.to(dtype), coef))  # [B, P, K]
    hit = raw >= ALPHA_MIN
    if box is not None:  # blocks straddle gsplat tiles: apply each Gaussian's tile box per pixel
        x0, x1, y0, y1 = _take(box, lists).unsqueeze(1).unbind(-1)
        hit &= (px[:, :, None] >= x0) & (px[:, :, None] < x1) & (py[:, :, None] >= y0) & (py[:, :, None] < y1)
    # (multiplying by boolean masks is much faster than masked_fill_ / where on CPU)
    alpha = raw.clamp_max(ALPHA_MAX).mul_(hit)
    log_t = torch.log1p(-alpha)
    cum = torch.cumsum(log_t, dim=-1)
    trans = torch.exp(cum - log_t)
    contributes = cum > math.log(TRANSMITTANCE_MIN)
    weight = (alpha * trans).mul_(contributes)
    return _Entries(pixel, u, v, params, raw, alpha, trans, weight, contributes)


class _Composite(torch.autograd.Function):
    """Blockwise front-to-back compositing with an analytic, recomputing backward."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, radii, depths, width, height,
                tile_size, absgrad_sink, differentiable):
        C, N, D = colors.shape
        HW = height * width
        n_cam_blocks = math.ceil(width / BLOCK) * math.ceil(height / BLOCK)
        gauss, block = _block_lists(means2d, conics, opacities, radii, depths, width, height, tile_size)
        chunks = _chunks(gauss, block, null=C * N)
        tab, box = _gauss_table(means2d, conics, opacities, radii, tile_size, width, height)
        flat_colors = torch.cat([colors.reshape(C * N, D), colors.new_zeros(1, D)])

        out = colors.new_zeros(C * HW + 1, D)
        acc = colors.new_zeros(C * HW + 1)
        kept_gauss, kept_block = [], []
        for blocks, lists in chunks:
            e = _entries(tab, blocks, lists, width, height, n_cam_blocks, C * HW, box)
            pix = e.pixel.reshape(-1)
            out.index_copy_(0, pix, torch.bmm(e.weight, _take(flat_colors, lists)).reshape(-1, D))
            acc.index_copy_(0, pix, e.weight.sum(-1).reshape(-1))
            if differentiable:  # backward only needs each list up to its last contributing Gaussian
                k = torch.arange(1, lists.shape[1] + 1, device=lists.device)
                length = ((e.weight.amax(1) > 0) * k).amax(1, keepdim=True)
                keep = k <= length
                kept_gauss.append(lists[keep])
                kept_block.append(blocks.unsqueeze(1).expand_as(lists)[keep])
        out, acc = out[:-1], acc[:-1]
        if differentiable and kept_gauss:
            chunks = _chunks(torch.cat(kept_gauss), torch.cat(kept_block), null=C * N)
        t_final = 1.0 - acc
        if backgrounds is not None:
            out = out + (t_final.view(C, HW, 1) * backgrounds.view(C, 1, D)).view(C * HW, D)

        ctx.save_for_backward(means2d, conics, colors, opacities, backgrounds, radii, t_final)
        ctx.chunks = chunks
        ctx.shape = (C, N, D, width, height, tile_size)
        ctx.absgrad_sink = absgrad_sink
        return out.view(C, height, width, D), acc.view(C, height, width, 1)

    @staticmethod
    def backward(ctx, v_render, v_alphas):
        means2d, conics, colors, opacities, backgrounds, radii, t_final = ctx.saved_tensors
        C, N, D, width, height, tile_size = ctx.shape
        HW = height * width
        n_cam_blocks = math.ceil(width / BLOCK) * math.ceil(height / BLOCK)
        tab, box = _gauss_table(means2d, conics, opacities, radii, tile_size, width, height)
        flat_colors = torch.cat([colors.reshape(C * N, D), colors.new_zeros(1, D)])
        basis_t = _block_basis(tab.device, tab.dtype).t()  # [6, P]

        # per pixel, with a zero row for pixels outside the image
        v_px = torch.cat([v_render.reshape(C * HW, D), v_render.new_zeros(1, D)])
        # d render_alpha / d t_final = -1; d colour / d t_final = background
        v_t_final = -v_alphas.reshape(C * HW)
        if backgrounds is not None:
            v_t_final = v_t_final + (v_render.reshape(C, HW, D) * backgrounds.view(C, 1, D)).sum(-1).view(-1)
        tv = torch.cat([t_final * v_t_final, t_final.new_zeros(1)])

        v_tab = tab.new_zeros(C * N + 1, 6)  # means x/y, conic a/b/c, opacity
        v_abs = tab.new_zeros(C * N + 1, 2)
        v_colors = colors.new_zeros(C * N + 1, D)
        for blocks, lists in ctx.chunks:
            e = _entries(tab, blocks, lists, width, height, n_cam_blocks, C * HW, box)
            g = _take(v_px, e.pixel)  # [B, P, D]
            v_colors.index_add_(0, lists.reshape(-1), torch.bmm(e.weight.transpose(1, 2), g).reshape(-1, D))
            dot = torch.bmm(g, _take(flat_colors, lists).transpose(1, 2))  # [B, P, K]
            wd = e.weight * dot
            later = wd.sum(-1, keepdim=True) - torch.cumsum(wd, dim=-1)
            v_alpha = e.trans * dot - (later + _take(tv, e.pixel).unsqueeze(-1)) / (1.0 - e.alpha)
            free = e.contributes & (e.alpha > 0) & (e.raw <= ALPHA_MAX)  # clamped alpha: no gradient
            h = v_alpha.mul_(free).mul_(e.raw)  # = -d loss / d sigma
            S = -torch.matmul(basis_t, h)  # [B, 6, K]: sums over pixels of dL/dsigma * monomials
            S0, Sx, Sy, Sxx, Sxy, Syy = S.unbind(1)
            _, _, a, b, c, op = e.params.unbind(-1)
            u, v = e.u, e.v
            dx_sum, dy_sum = u * S0 - Sx, v * S0 - Sy  # sums of dL/dsigma * dx, * dy
            grads = torch.stack(
                [
                    a * dx_sum + b * dy_sum,
                    c * dy_sum + b * dx_sum,
                    0.5 * (u * u * S0 - 2 * u * Sx + Sxx),
                    u * v * S0 - u * Sy - v * Sx + Sxy,
                    0.5 * (v * v * S0 - 2 * v * Sy + Syy),
                    torch.where(op > 0, -S0 / op.clamp_min(1e-30), torch.zeros_like(op)),
                ],
                dim=-1,
            )
            v_tab.index_add_(0, lists.reshape(-1), grads.reshape(-1, 6))
            if ctx.absgrad_sink is not None:
                h_abs = h.abs_()
                lin_x = torch.matmul(basis_t[:3].t(), torch.stack([a * u + b * v, -a, -b], dim=1))
                lin_y = torch.matmul(basis_t[:3].t(), torch.stack([c * v + b * u, -b, -c], dim=1))
                absg = torch.stack([(h_abs * lin_x.abs_()).sum(1), (h_abs * lin_y.abs_()).sum(1)], dim=-1)
                v_abs.index_add_(0, lists.reshape(-1), absg.reshape(-1, 2))
        if ctx.absgrad_sink is not None:
            ctx.absgrad_sink(v_abs[:-1].view(C, N, 2))
        v_tab = v_tab[:-1]
        v_bg = None
        if backgrounds is not None and ctx.needs_input_grad[4]:
            v_bg = (v_render.reshape(C, HW, D) * t_final.view(C, HW, 1)).sum(1)
        return (
            v_tab[:, 0:2].reshape(C, N, 2), v_tab[:, 2:5].reshape(C, N, 3), v_colors[:-1].view(C, N, D),
            v_tab[:, 5].reshape(C, N), v_bg, None, None, None, None, None, None, None,
        )


def _gauss_table(
    means2d: Tensor, conics: Tensor, opacities: Tensor, radii: Tensor, tile_size: int, width: int, height: int
) -> tuple[Tensor, Tensor | None]:
    """``[C*N+1, 6]`` (mean x, mean y, conic a, b, c, opacity) with a last all-zero, invisible row.

    The second value holds each Gaussian's gsplat tile box in pixels (``[C*N+1, 4]``), needed only
    when ``BLOCK`` does not divide ``tile_size``; None otherwise.
    """
    C, N = radii.shape
    tab = torch.cat(
        [means2d.reshape(C * N, 2), conics.reshape(C * N, 3), opacities.reshape(C * N, 1)], dim=1
    )
    tab = torch.cat([tab, tab.new_zeros(1, 6)])
    box = None
    if tile_size % BLOCK:
        tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
        x0, x1, y0, y1 = tile_box(
            means2d.reshape(C * N, 2), radii.reshape(C * N), tile_size, tile_width, tile_height
        )
        box = torch.stack([x0, x1, y0, y1], dim=-1) * tile_size
        box = torch.cat([box, box.new_zeros(1, 4)])
    return tab, box
