"""Render 3D Gaussians: gsplat's CUDA rasterizer on CUDA tensors, a CPU one elsewhere.

:func:`rasterize` is the one call the rest of the package uses. It has the signature and the
semantics of ``gsplat.rendering.rasterization`` (gsplat 1.4.0) and dispatches on the device of
``means``: CUDA tensors go to gsplat, CPU tensors to the rasterizer :func:`cpu_rasterizer` picks,
the compiled one (:func:`rasterize_cpp`, the default) or the pure-PyTorch reference
(:func:`rasterize_torch`, also the fallback when the C++ one cannot be built).

The package, in the order data flows (each module imports only those above it):

* :mod:`~gvae_ns.render.contract`: modes, compositing constants, the :class:`Projection` record,
  gsplat's tile box;
* :mod:`~gvae_ns.render.projection`: EWA projection (reference and element-wise), ``world_to_camera``;
  :mod:`~gvae_ns.render.sh`: SH colours; covariances are :func:`gvae_ns.quaternions.covariance`;
* :mod:`~gvae_ns.render.composite_torch`: the PyTorch block compositor and its autograd Function;
* :mod:`~gvae_ns.render.extension`: build and load ``csrc/rasterize_cpu.cpp``;
  :mod:`~gvae_ns.render.compiled`: its compositor and SH as autograd Functions;
* :mod:`~gvae_ns.render.pipeline`: :func:`rasterize_with` (checks, stages, ``info``) and the two
  kernel sets;
* :mod:`~gvae_ns.render.filter3d`: Mip-Splatting's 3D smoothing filter, baked into scales and opacities
  (callers apply it to the parameters before :func:`rasterize`);
* this module: the dispatch, and the names callers import.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import gsplat
import torch
from torch import Tensor

from gvae_ns.render.compiled import composite_cpp, eval_sh_cpp
from gvae_ns.render.composite_torch import BLOCK, MAX_ENTRIES_PER_CHUNK, composite
from gvae_ns.render.contract import (
    ALPHA_MAX,
    ALPHA_MIN,
    TRANSMITTANCE_MIN,
    Projection,
    RasterizeMode,
    RenderMode,
)
from gvae_ns.render.extension import build_error, load_extension
from gvae_ns.render.filter3d import SmoothingFilter3D, apply_filter_3d, max_sampling_rate
from gvae_ns.render.pipeline import (
    CPP_KERNELS,
    TORCH_KERNELS,
    Kernels,
    rasterize_cpp,
    rasterize_torch,
    rasterize_with,
)
from gvae_ns.render.projection import (
    project_gaussians,
    project_gaussians_fast,
    world_to_camera,
)
from gvae_ns.render.sh import eval_sh, sh_basis

try:  # nerfstudio's console, so that the line reads like ns-train's own output
    from nerfstudio.utils.rich_utils import CONSOLE
except ImportError:  # used without nerfstudio: plain stderr
    CONSOLE = None

__all__ = [
    "ALPHA_MAX",
    "ALPHA_MIN",
    "BLOCK",
    "CPP_KERNELS",
    "MAX_ENTRIES_PER_CHUNK",
    "RASTERIZER_ENV",
    "TORCH_KERNELS",
    "TRANSMITTANCE_MIN",
    "Kernels",
    "Projection",
    "RasterizeMode",
    "RenderMode",
    "SmoothingFilter3D",
    "apply_filter_3d",
    "build_error",
    "composite",
    "composite_cpp",
    "cpu_rasterizer",
    "eval_sh",
    "eval_sh_cpp",
    "load_extension",
    "max_sampling_rate",
    "project_gaussians",
    "project_gaussians_fast",
    "rasterize",
    "rasterize_cpp",
    "rasterize_torch",
    "rasterize_with",
    "sh_basis",
    "world_to_camera",
]

Rasterizer = Callable[..., tuple[Tensor, Tensor, dict]]


def rasterize(means: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor, dict]:
    """Render with ``gsplat.rasterization`` when ``means`` is on CUDA, else with the CPU rasterizer.

    Arguments and return values are those of ``gsplat.rendering.rasterization`` (every path has its
    defaults); keyword arguments only gsplat knows go to gsplat unchanged on CUDA. On CPU the
    compiled rasterizer (:func:`rasterize_cpp`) runs unless it cannot be built or
    ``GVAE_RASTERIZER=torch`` asks for :func:`rasterize_torch`; one log line says which runs.
    """
    if means.is_cuda:
        return gsplat.rasterization(means, *args, **kwargs)
    return cpu_rasterizer()(means, *args, **kwargs)


RASTERIZER_ENV = "GVAE_RASTERIZER"
"""Environment variable choosing the CPU path: ``cpp`` (compiled; fails if it cannot be built),
``torch`` (the pure-PyTorch reference), or unset / ``auto`` (compiled, else PyTorch)."""
_cpu_choice: dict[str, Rasterizer] = {}


def cpu_rasterizer() -> Rasterizer:
    """The CPU rasterizer ``$GVAE_RASTERIZER`` selects (see :data:`RASTERIZER_ENV`).

    Decided once per value of the variable; the decision is logged in one line, so a fallback to
    the slower PyTorch path is never silent.
    """
    choice = os.environ.get(RASTERIZER_ENV, "auto").strip().lower() or "auto"
    if choice in _cpu_choice:
        return _cpu_choice[choice]
    if choice not in ("auto", "cpp", "torch"):
        raise ValueError(f"{RASTERIZER_ENV} must be 'cpp', 'torch' or 'auto', got {choice!r}.")
    if choice == "torch":
        fn, line = rasterize_torch, f"pure PyTorch ({RASTERIZER_ENV}=torch)"
    else:
        t0 = time.perf_counter()
        ext = load_extension()
        seconds = time.perf_counter() - t0
        if ext is not None:
            fn = rasterize_cpp
            n = torch.get_num_threads()
            line = f"compiled C++ ({n} thread{'s' if n != 1 else ''}"
            line += f", built/loaded in {seconds:.0f} s)" if seconds > 2 else ")"
        elif choice == "cpp":
            raise RuntimeError(
                f"{RASTERIZER_ENV}=cpp but the compiled CPU rasterizer cannot be built: {build_error()}"
            )
        else:
            fn = rasterize_torch
            line = (f"pure PyTorch, several times slower: the C++ one cannot be built "
                    f"({build_error()}); set {RASTERIZER_ENV}=torch to silence this")
    _log(f"gvae-ns CPU rasterizer: {line}")
    _cpu_choice[choice] = fn
    return fn


def _log(line: str) -> None:
    if CONSOLE is not None:
        CONSOLE.print(line, highlight=False)
    else:
        print(line, file=sys.stderr)
