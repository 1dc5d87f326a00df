"""The compiled CPU rasterizer: gsplat's tile algorithm in C++ with OpenMP, behind ``rasterize``'s contract.

Projection and covariances stay PyTorch (element-wise rewrites of :mod:`gvae_ns.render`'s, a small
share of a step; see ``scripts/bench_render_cpp.py``); compositing and SH colours are compiled.
``csrc/rasterize_cpu.cpp`` bins Gaussians into 16x16 tiles with per-tile depth-sorted lists,
composites each pixel front to back with early termination (the constants and stopping rule of
``gvae_ns.render``), and runs the backward pass back to front from the saved final transmittance
and the count of list entries each pixel consumed, in parallel over tiles (4x4-pixel blocks of a
tile walk their narrowed lists in lockstep, SSE2 in float32). It also evaluates SH colours.

The C++ file has a plain C interface and includes no PyTorch header, so building it is one
``g++ -O3 -fopenmp -shared`` call of a few seconds (a ``torch.utils.cpp_extension`` build spends a
minute of CPU on PyTorch's headers alone on the 2-core machine) and needs no ninja. It is built on
first use into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions/gvae_ns_rasterize_cpu``), under a name hashing the source and the flags,
so later processes load it at once and an edited source rebuilds. No ``-march=native``: a cached
build stays valid on any x86-64 machine sharing the cache. ``$CXX`` chooses the compiler (default
``g++``). :func:`load_extension` returns None, with the reason in :func:`build_error`, when it
cannot be built.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from gvae_ns import render

SOURCE = Path(__file__).parent / "csrc" / "rasterize_cpu.cpp"
CXXFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ABI_VERSION = 1
ROW_FIXED = 8
"""Per-Gaussian gradient row: mean x/y, conic a/b/c, opacity, |mean| x/y, then the D colour channels."""

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None


def build_dir() -> Path:
    """Where the compiled library is cached."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root) / "gvae_ns_rasterize_cpu"


def _compile() -> Path:
    """Path of the shared library for the current source, compiling it if it is not cached."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler: install g++ (Debian: apt-get install g++) or set $CXX")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((cxx, *CXXFLAGS, platform.machine())).encode())
    lib = build_dir() / f"rasterize_cpu_{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.stem}.{os.getpid()}.tmp.so")  # concurrent builders each rename their own
    proc = subprocess.run([cxx, *CXXFLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{cxx} failed ({proc.returncode}): {tail}")
    os.replace(tmp, lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    i, d, p = ctypes.c_int, ctypes.c_double, ctypes.c_void_p
    geom = [i] * 7  # dbl, C, N, W, H, tile_size, threads
    lib.gvr_count_pairs.argtypes = geom + [p] * 4 + [d, p, p]
    lib.gvr_fill_bins.argtypes = geom + [p] * 5 + [d] + [p] * 4
    lib.gvr_forward.argtypes = geom + [i] + [p] * 6 + [d] * 3 + [p] * 3
    lib.gvr_backward.argtypes = geom + [i] + [p] * 8 + [d] * 3 + [p] * 6
    lib.gvr_sh_forward.argtypes = [i] * 7 + [p] * 3
    lib.gvr_sh_backward.argtypes = [i] * 7 + [p] * 5
    for fn in (lib.gvr_count_pairs, lib.gvr_fill_bins, lib.gvr_forward, lib.gvr_backward, lib.gvr_abi_version,
               lib.gvr_sh_forward, lib.gvr_sh_backward):
        fn.restype = i


def load_extension() -> Optional[ctypes.CDLL]:
    """The compiled library (built on first call, then cached), or None when it cannot be built."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                lib = ctypes.CDLL(str(_compile()))
                _declare(lib)
                if lib.gvr_abi_version() != ABI_VERSION:
                    raise RuntimeError(f"library ABI {lib.gvr_abi_version()} != {ABI_VERSION}")
                _lib = lib
            except Exception as exc:  # no compiler, a failed build, an unloadable library: callers fall back
                _error = f"{type(exc).__name__}: {exc}"
        return _lib


def build_error() -> Optional[str]:
    """Why :func:`load_extension` returned None (None if it has not failed)."""
    return _error


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
        consts = (render.ALPHA_MIN, render.ALPHA_MAX, render.TRANSMITTANCE_MIN)
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
        m, con, col, op, rad, t_final, last, toff, ids, goff, slot = ctx.saved_tensors
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
    backgrounds: Optional[Tensor] = None,
    tile_size: int = 16,
    absgrad_sink: Optional[Callable[[Tensor], None]] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`gvae_ns.render.composite` (same arguments and results) computed by the C++ kernel."""
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


# Projection and covariances as element-wise tensor code: the reference's batched 3x3 matmuls
# (einsum / bmm over N tiny matrices) cost as much as the whole compiled compositor on CPU, while a few
# dozen element-wise ops over [C, N] run in milliseconds, forward and backward. Same formulas.
# SH colours go to C++: as tensor ops they are a broadcast over [C, N, 16, 3] (and three more for the
# backward), about 15% of a step at SH degree 3.


def quat_scale_to_covar_fast(quats: Tensor, scales: Tensor) -> Tensor:
    """:func:`gvae_ns.render.quat_scale_to_covar` (``R S S R^T``, ``[N,3,3]``) without batched matmuls."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    sx, sy, sz = scales.unbind(-1)
    # rows of M = R diag(s)
    m = (
        ((1 - 2 * (y * y + z * z)) * sx, 2 * (x * y - w * z) * sy, 2 * (x * z + w * y) * sz),
        (2 * (x * y + w * z) * sx, (1 - 2 * (x * x + z * z)) * sy, 2 * (y * z - w * x) * sz),
        (2 * (x * z - w * y) * sx, 2 * (y * z + w * x) * sy, (1 - 2 * (x * x + y * y)) * sz),
    )

    def dot(i: int, j: int) -> Tensor:
        return m[i][0] * m[j][0] + m[i][1] * m[j][1] + m[i][2] * m[j][2]

    c00, c01, c02, c11, c12, c22 = dot(0, 0), dot(0, 1), dot(0, 2), dot(1, 1), dot(1, 2), dot(2, 2)
    return torch.stack([c00, c01, c02, c01, c11, c12, c02, c12, c22], dim=-1).view(*quats.shape[:-1], 3, 3)


def project_gaussians_fast(
    means: Tensor, covars: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int, eps2d: float = 0.3,
    near_plane: float = 0.01, far_plane: float = 1e10, radius_clip: float = 0.0, calc_compensations: bool = False,
) -> render.Projection:
    """:func:`gvae_ns.render.project_gaussians` (gsplat's EWA projection) written element-wise over ``[C, N]``."""
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    # unbind, not indexing: the backward of each index op would fill a zero tensor of the input's size
    mx, my, mz = (v.unsqueeze(0) for v in means.unbind(-1))  # [1, N]
    r = [[R[:, i, j, None] for j in range(3)] for i in range(3)]  # [C, 1]
    x = r[0][0] * mx + r[0][1] * my + r[0][2] * mz + t[:, 0, None]
    y = r[1][0] * mx + r[1][1] * my + r[1][2] * mz + t[:, 1, None]
    z = r[2][0] * mx + r[2][1] * my + r[2][2] * mz + t[:, 2, None]
    flat = [v.unsqueeze(0) for v in covars.reshape(-1, 9).unbind(-1)]  # [1, N]
    cov = [flat[3 * i : 3 * i + 3] for i in range(3)]
    # A = R Sigma, then Sigma_c = A R^T (symmetric: six entries)
    A = [[r[i][0] * cov[0][k] + r[i][1] * cov[1][k] + r[i][2] * cov[2][k] for k in range(3)] for i in range(3)]

    def cc(i: int, l: int) -> Tensor:
        return A[i][0] * r[l][0] + A[i][1] * r[l][1] + A[i][2] * r[l][2]

    c00, c01, c02, c11, c12, c22 = cc(0, 0), cc(0, 1), cc(0, 2), cc(1, 1), cc(1, 2), cc(2, 2)

    depth_ok = (z >= near_plane) & (z <= far_plane) & (z != 0)
    z_safe = torch.where(depth_ok, z, torch.ones_like(z))
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = z_safe * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / z_safe))
    ty = z_safe * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / z_safe))
    # J = [[j00, 0, j02], [0, j11, j12]]
    j00, j11 = fx / z_safe, fy / z_safe
    j02, j12 = -fx * tx / z_safe**2, -fy * ty / z_safe**2
    a = j00 * j00 * c00 + 2 * j00 * j02 * c02 + j02 * j02 * c22
    b = j00 * j11 * c01 + j00 * j12 * c02 + j02 * j11 * c12 + j02 * j12 * c22
    c = j11 * j11 * c11 + 2 * j11 * j12 * c12 + j12 * j12 * c22
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)

    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    det_ok = det > 0
    det_safe = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)
    compensations = None
    if calc_compensations:
        ratio = det_orig / det_safe
        pos = ratio > 0
        compensations = torch.where(pos, torch.sqrt(torch.where(pos, ratio, torch.ones_like(ratio))),
                                    torch.zeros_like(ratio))
    with torch.no_grad():
        half_trace = 0.5 * (a + c)
        v1 = half_trace + torch.sqrt(torch.clamp(half_trace**2 - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(v1))
        px, py = means2d.unbind(-1)
        visible = (
            depth_ok & det_ok & (radius > radius_clip)
            & (px + radius > 0) & (px - radius < width) & (py + radius > 0) & (py - radius < height)
        )
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
    return render.Projection(radii, means2d, z, conics, compensations)


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
    """:func:`gvae_ns.render.eval_sh` for ``dirs [C,N,3]``, ``coeffs [C,N,K,3]`` by the C++ kernel.

    When ``coeffs`` is one ``[N,K,3]`` expanded over the cameras (what :func:`rasterize_with` passes),
    the kernel reads it once per camera and sums the cameras' gradients itself.
    """
    if dirs.dim() != 3 or coeffs.dim() != 4 or coeffs.shape[:2] != dirs.shape[:2] or coeffs.shape[-1] != 3:
        return render.eval_sh(degree, dirs, coeffs)  # other layouts: the reference
    return _ShCpp.apply(degree, dirs, coeffs)


CPP_KERNELS = render.Kernels(composite_cpp, quat_scale_to_covar_fast, project_gaussians_fast, eval_sh_cpp)
"""The compiled compositor and SH, with element-wise projection and covariances."""


def rasterize_cpp(*args, **kwargs):
    """:func:`gvae_ns.render.rasterize_torch` (same arguments, results, ``info``) with :data:`CPP_KERNELS`."""
    return render.rasterize_with(CPP_KERNELS, *args, **kwargs)
