"""The compiled CPU kernels as autograd Functions: compositing (:func:`composite_cpp`) and SH colours.

``csrc/rasterize_cpu.cpp`` (built and loaded by :mod:`gvae_ns.render.extension`) bins Gaussians into
16x16 tiles with per-tile depth-sorted lists, composites each pixel front to back with early
termination (the constants and stopping rule of :mod:`gvae_ns.render.contract`), and runs the
backward pass back to front from the saved final transmittance and the count of list entries each
pixel consumed, in parallel over tiles (4x4-pixel blocks of a tile walk their narrowed lists in
lockstep, SSE2 in float32). It also evaluates SH colours: as tensor ops they are a broadcast over
``[C, N, 16, 3]`` (and three more for the backward), about 15% of a step at SH degree 3.
Projection and covariances stay PyTorch (:func:`gvae_ns.render.projection.project_gaussians_fast`,
:func:`gvae_ns.quaternions.covariance`), a small share of a step (``scripts/bench_render_cpp.py``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import Tensor

from gvae_ns.render.contract import ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN
from gvae_ns.render.extension import build_error, load_extension
from gvae_ns.render.sh import eval_sh

ROW_FIXED = 8
"""Per-Gaussian gradient row: mean x/y, conic a/b/c, opacity, |mean| x/y, then the D colour channels."""


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("rasterize_cpp: the C++ rasterizer ran out of memory")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


class _CompositeCpp(torch.autograd.Function):
    """Front-to-back compositing by the C++ kernel, with its back-to-front backward."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, radii, depths, width, height,
                tile_size, absgrad_sink, differentiable):
        lib = load_extension()
        if lib is None:
            raise RuntimeError(f"the compiled CPU rasterizer is not available: {build_error()}")
        C, N, D = colors.shape
        dtype = _compute_dtype(means2d)
        m, con, col, op, dep = (
            t.detach().to(dtype).contiguous() for t in (means2d, conics, colors, opacities, depths)
        )
        rad = radii.to(torch.int32).contiguous()
        consts = (ALPHA_MIN, ALPHA_MAX, TRANSMITTANCE_MIN)
        geom = (int(dtype == torch.float64), C, N, width, height, tile_size, torch.get_num_threads())
        tiles = C * (-(-width // tile_size)) * (-(-height // tile_size))
        goff = torch.empty(C * N + 1, dtype=torch.int64)
        n_pairs = ctypes.c_int64()
        _check(lib.gvr_count_pairs(*geom, _ptr(m), _ptr(con), _ptr(op), _ptr(rad), consts[0], _ptr(goff),
                                   ctypes.byref(n_pairs)))
        if n_pairs.value >= 2**31 - 1:
            raise RuntimeError(f"rasterize_cpp: {n_pairs.value} (Gaussian, tile) pairs exceed int32")
        toff = torch.empty(tiles + 1, dtype=torch.int64)
        ids = torch.empty(n_pairs.value, dtype=torch.int32)
        slot = torch.empty(n_pairs.value, dtype=torch.int32)
        _check(lib.gvr_fill_bins(*geom, _ptr(m), _ptr(con), _ptr(op), _ptr(rad), _ptr(dep), consts[0], _ptr(goff),
                                 _ptr(toff), _ptr(ids), _ptr(slot)))
        out = torch.empty(C, height, width, D, dtype=dtype)
        t_final = torch.empty(C, height, width, dtype=dtype)
        last = torch.empty(C, height, width, dtype=torch.int32)
        _check(lib.gvr_forward(*geom, D, _ptr(m), _ptr(con), _ptr(col), _ptr(op), _ptr(toff), _ptr(ids), *consts,
                               _ptr(out), _ptr(t_final), _ptr(last)))
        bins = (toff, ids, goff, slot)
        alphas = (1.0 - t_final).unsqueeze(-1)
        if backgrounds is not None:
            out = out + t_final.unsqueeze(-1) * backgrounds.detach().to(dtype).view(C, 1, 1, D)
        if differentiable:
            ctx.save_for_backward(m, con, col, op, rad, t_final, last, *bins)
            ctx.backgrounds = None if backgrounds is None else backgrounds.detach()
            ctx.geom, ctx.consts = geom, consts
            ctx.dtypes = tuple(t.dtype for t in (means2d, conics, colors, opacities))
            ctx.absgrad_sink = absgrad_sink
        return out.to(colors.dtype), alphas.to(colors.dtype)

    @staticmethod
    def backward(ctx, v_render, v_alphas):
        m, con, col, op, _, t_final, last, toff, ids, goff, slot = ctx.saved_tensors
        dtype = m.dtype
        C, N, D = col.shape
        v_render = v_render.to(dtype).contiguous()
        v_T = -v_alphas.to(dtype)[..., 0]  # alpha = 1 - T_final
        bgs = ctx.backgrounds
        if bgs is not None:  # colour = ... + T_final * background
            v_T = v_T + (v_render * bgs.to(dtype).view(C, 1, 1, D)).sum(-1)
        v_T = v_T.contiguous()
        R = ROW_FIXED + D
        pair_grad = torch.zeros(ids.numel(), R, dtype=dtype)
        grad = torch.empty(C, N, R, dtype=dtype)
        _check(load_extension().gvr_backward(
            *ctx.geom, D, _ptr(m), _ptr(con), _ptr(col), _ptr(op), _ptr(toff), _ptr(ids), _ptr(goff), _ptr(slot),
            *ctx.consts, _ptr(t_final), _ptr(last), _ptr(v_render), _ptr(v_T), _ptr(pair_grad), _ptr(grad),
        ))
        v_m, v_con, v_op, v_abs, v_col = grad[..., 0:2], grad[..., 2:5], grad[..., 5], grad[..., 6:8], grad[..., 8:]
        if ctx.absgrad_sink is not None:
            ctx.absgrad_sink(v_abs.to(ctx.dtypes[0]))
        v_bg = None
        if bgs is not None and ctx.needs_input_grad[4]:
            v_bg = (v_render * t_final.unsqueeze(-1)).sum((1, 2)).to(bgs.dtype)
        dm, dcon, dcol, dop = ctx.dtypes
        return (v_m.to(dm), v_con.to(dcon), v_col.to(dcol), v_op.to(dop), v_bg,
                None, None, None, None, None, None, None)


def composite_cpp(
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
    """:func:`gvae_ns.render.composite_torch.composite` (same arguments and results) computed by the C++ kernel."""
    C, N, D = colors.shape
    for name, t, shape in (("means2d", means2d, (C, N, 2)), ("conics", conics, (C, N, 3)),
                           ("opacities", opacities, (C, N)), ("radii", radii, (C, N)), ("depths", depths, (C, N))):
        if tuple(t.shape) != shape:
            raise ValueError(f"composite_cpp: {name} must have shape {shape}, got {tuple(t.shape)}.")
    if backgrounds is not None and tuple(backgrounds.shape) != (C, D):
        raise ValueError(f"composite_cpp: backgrounds must have shape {(C, D)}, got {tuple(backgrounds.shape)}.")
    tensors = (means2d, conics, colors, opacities, backgrounds)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _CompositeCpp.apply(
        means2d, conics, colors, opacities, backgrounds, radii, depths.detach(),
        width, height, tile_size, absgrad_sink, differentiable,
    )


class _ShCpp(torch.autograd.Function):
    """SH colours by the C++ kernel: forward, and the backward to the coefficients and the directions."""

    @staticmethod
    def forward(ctx, degree, dirs, coeffs):
        C, N = dirs.shape[:2]
        dtype = _compute_dtype(dirs)
        shared = coeffs.dim() == 4 and coeffs.stride(0) == 0 and C > 1  # one [N, K, 3] for every camera
        base = coeffs[0] if shared else coeffs
        d = dirs.detach().to(dtype).contiguous()
        cf = base.detach().to(dtype).contiguous()
        out = torch.empty(C, N, 3, dtype=dtype)
        geom = (int(dtype == torch.float64), C, N, cf.shape[-2], degree, int(shared), torch.get_num_threads())
        _check(load_extension().gvr_sh_forward(*geom, _ptr(d), _ptr(cf), _ptr(out)))
        ctx.save_for_backward(d, cf)
        ctx.geom, ctx.shared, ctx.dtypes, ctx.coeff_shape = geom, shared, (dirs.dtype, coeffs.dtype), coeffs.shape
        return out.to(coeffs.dtype)

    @staticmethod
    def backward(ctx, v_out):
        d, cf = ctx.saved_tensors
        v_out = v_out.to(d.dtype).contiguous()
        v_cf = torch.empty_like(cf)
        v_d = torch.empty_like(d)
        _check(load_extension().gvr_sh_backward(*ctx.geom, _ptr(d), _ptr(cf), _ptr(v_out), _ptr(v_cf), _ptr(v_d)))
        if ctx.shared:  # the expanded input's gradient: the sum in camera 0 (expand's backward adds them)
            total = v_cf
            v_cf = total.new_zeros(ctx.coeff_shape)
            v_cf[0] = total
        return None, v_d.to(ctx.dtypes[0]), v_cf.to(ctx.dtypes[1])


def eval_sh_cpp(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """:func:`gvae_ns.render.sh.eval_sh` for ``dirs [C,N,3]``, ``coeffs [C,N,K,3]`` by the C++ kernel.

    When ``coeffs`` is one ``[N,K,3]`` expanded over the cameras (what
    :func:`gvae_ns.render.pipeline.rasterize_with` passes), the kernel reads it once per camera and
    sums the cameras' gradients itself.
    """
    if dirs.dim() != 3 or coeffs.dim() != 4 or coeffs.shape[:2] != dirs.shape[:2] or coeffs.shape[-1] != 3:
        return eval_sh(degree, dirs, coeffs)  # other layouts: the reference
    return _ShCpp.apply(degree, dirs, coeffs)
