"""Evaluation metrics: PSNR, SSIM, Chamfer distance, and LPIPS / BRISQUE when available offline.

Images are float tensors in ``[0, 1]`` shaped ``[H, W, 3]`` or ``[B, H, W, 3]`` (channels last, as
nerfstudio renders them). Per-image metrics return one value per image: a 0-d tensor for ``[H, W, 3]``,
``[B]`` for a batch.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from pathlib import Path
from typing import Optional, Set, Tuple, Union

import numpy as np
import pytorch_msssim
import torch

from gvae_ns.offline import lpips_weights_available

ArrayLike = Union[torch.Tensor, np.ndarray]
_WARNED: Set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _batched(img: ArrayLike, ref: ArrayLike, name: str) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    x = torch.as_tensor(img)
    y = torch.as_tensor(ref).to(x.device)
    if x.shape != y.shape:
        raise ValueError(f"{name}: image {tuple(x.shape)} and reference {tuple(y.shape)} must have the same shape.")
    if x.ndim not in (3, 4):
        raise ValueError(f"{name}: expected [H, W, C] or [B, H, W, C] images, got shape {tuple(x.shape)}.")
    single = x.ndim == 3
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    return (x[None], y[None], single) if single else (x, y, single)


def psnr(img: ArrayLike, ref: ArrayLike, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``; ``inf`` for identical images."""
    x, y, single = _batched(img, ref, "psnr")
    mse = ((x - y) ** 2).flatten(1).mean(1)
    out = 10 * torch.log10(data_range**2 / mse)
    return out[0] if single else out


def ssim(img: ArrayLike, ref: ArrayLike, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) from ``pytorch_msssim``, the implementation splatfacto's own
    eval metric uses: ``window x window`` Gaussian of std ``sigma``, K1 = 0.01, K2 = 0.03, averaged over the
    valid region (no padding) and channels, so ``ns-eval`` and ``gvae-bench`` report the same SSIM."""
    x, y, single = _batched(img, ref, "ssim")
    if min(x.shape[1:3]) < window:
        raise ValueError(f"ssim: images of {x.shape[2]}x{x.shape[1]} pixels are smaller than the {window}px window.")
    out = pytorch_msssim.ssim(x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2), data_range=data_range,
                              size_average=False, win_size=window, win_sigma=sigma)
    return out[0] if single else out


def _as_point_sets(a: ArrayLike, b: ArrayLike, chunk: int, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    pa = torch.as_tensor(a)
    pb = torch.as_tensor(b).to(pa.device)
    if pa.ndim != 2 or pb.ndim != 2 or pa.shape[1] != pb.shape[1] or len(pa) == 0 or len(pb) == 0:
        raise ValueError(
            "chamfer: expected two non-empty point sets [N, D] and [M, D], "
            f"got {tuple(pa.shape)} and {tuple(pb.shape)}."
        )
    if chunk < 1:
        raise ValueError(f"chamfer: chunk must be >= 1, got {chunk}.")
    if method not in ("auto", "kdtree", "cdist"):
        raise ValueError(f"chamfer: method must be 'auto', 'kdtree' or 'cdist', got {method!r}.")
    dtype = torch.float64 if torch.float64 in (pa.dtype, pb.dtype) else torch.float32
    center = pa.to(dtype).mean(0)
    return pa.to(dtype) - center, pb.to(dtype) - center


def _nearest_kdtree(pa: torch.Tensor, pb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    from scipy.spatial import cKDTree

    xa, xb = pa.detach().cpu().double().numpy(), pb.detach().cpu().double().numpy()
    to_b = torch.from_numpy(cKDTree(xb).query(xa, workers=-1)[1]).to(pa.device)
    to_a = torch.from_numpy(cKDTree(xa).query(xb, workers=-1)[1]).to(pa.device)
    return to_b, to_a


def _nearest_cdist(pa: torch.Tensor, pb: torch.Tensor, chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    best_a = torch.full((len(pa),), math.inf, dtype=pa.dtype, device=pa.device)
    best_b = torch.full((len(pb),), math.inf, dtype=pa.dtype, device=pa.device)
    idx_a = torch.zeros(len(pa), dtype=torch.long, device=pa.device)
    idx_b = torch.zeros(len(pb), dtype=torch.long, device=pa.device)
    for i in range(0, len(pa), chunk):
        block_a = pa[i : i + chunk]
        for j in range(0, len(pb), chunk):
            block_b = pb[j : j + chunk]
            dist = torch.cdist(block_a, block_b)
            cand_a, cand_b = dist.argmin(1) + j, dist.argmin(0) + i
            exact_a = ((block_a - pb[cand_a]) ** 2).sum(1)
            exact_b = ((block_b - pa[cand_b]) ** 2).sum(1)
            better_a, better_b = exact_a < best_a[i : i + chunk], exact_b < best_b[j : j + chunk]
            best_a[i : i + chunk] = torch.where(better_a, exact_a, best_a[i : i + chunk])
            idx_a[i : i + chunk] = torch.where(better_a, cand_a, idx_a[i : i + chunk])
            best_b[j : j + chunk] = torch.where(better_b, exact_b, best_b[j : j + chunk])
            idx_b[j : j + chunk] = torch.where(better_b, cand_b, idx_b[j : j + chunk])
    return idx_a, idx_b


def nearest_sq_distances(
    a: ArrayLike, b: ArrayLike, chunk: int = 4096, method: str = "auto"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Squared distance from every point of ``a`` ``[N, D]`` to its nearest point in ``b`` ``[M, D]``
    and back: ``([N], [M])``, on ``a``'s device.

    ``method``: ``"kdtree"`` (scipy, CPU, seconds for 200k x 200k), ``"cdist"`` (``chunk x chunk``
    blocks of ``torch.cdist``, memory ``~4 chunk^2`` bytes; the fast path on a GPU) or ``"auto"``
    (kdtree for CPU tensors when scipy is installed). Either way the distance to the chosen neighbour
    is recomputed exactly, so a set against itself gives exactly 0.
    """
    pa, pb = _as_point_sets(a, b, chunk, method)
    if method == "auto":
        use_tree = pa.device.type == "cpu" and importlib.util.find_spec("scipy") is not None
        method = "kdtree" if use_tree else "cdist"
    idx_a, idx_b = _nearest_kdtree(pa, pb) if method == "kdtree" else _nearest_cdist(pa, pb, chunk)
    return ((pa - pb[idx_a]) ** 2).sum(1), ((pb - pa[idx_b]) ** 2).sum(1)


def chamfer_distance(a: ArrayLike, b: ArrayLike, chunk: int = 4096, method: str = "auto") -> float:
    """Symmetric Chamfer distance: mean squared nearest-neighbour distance from ``a`` to ``b`` plus the
    same from ``b`` to ``a`` (so two copies of a set shifted by ``v`` score ``2 |v|^2`` when ``|v|`` is
    below the point spacing). ``chunk`` and ``method`` as in :func:`nearest_sq_distances`."""
    to_b, to_a = nearest_sq_distances(a, b, chunk, method)
    return float(to_b.mean() + to_a.mean())


@functools.lru_cache(maxsize=4)
def _lpips_module(device: str) -> torch.nn.Module:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device).eval()


def lpips_or_none(img: ArrayLike, ref: ArrayLike) -> Optional[torch.Tensor]:
    """LPIPS (AlexNet) per image, or None (with a one-time warning) when its weights are not already on
    disk; never downloads."""
    if not lpips_weights_available():
        _warn_once(
            "lpips",
            "LPIPS skipped: AlexNet weights are not in the torch hub cache "
            f"({Path(torch.hub.get_dir()) / 'checkpoints'}) and will not be downloaded. Copy "
            "alexnet-owt-7be5be79.pth there to enable it.",
        )
        return None
    x, y, single = _batched(img, ref, "lpips")
    module = _lpips_module(str(x.device))
    with torch.no_grad():
        scores = torch.stack(
            [
                module(a[None].permute(0, 3, 1, 2).float(), b[None].permute(0, 3, 1, 2).float())
                for a, b in zip(x, y, strict=True)
            ]
        )
    module.reset()
    return scores[0] if single else scores


@functools.lru_cache(maxsize=1)
def _brisque_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from brisque import BRISQUE

    return BRISQUE(url=False)


def brisque_or_none(img: ArrayLike) -> Optional[float]:
    """No-reference BRISQUE score of one ``[H, W, 3]`` image in ``[0, 1]`` (lower is better), or None
    (with a one-time warning) when the optional ``brisque`` package is not installed."""
    if importlib.util.find_spec("brisque") is None:
        _warn_once("brisque", "BRISQUE skipped: the optional 'brisque' package is not installed (pip install brisque).")
        return None
    x = torch.as_tensor(img)
    if x.ndim != 3 or x.shape[-1] not in (3, 4):
        raise ValueError(f"brisque: expected one [H, W, 3] image, got shape {tuple(x.shape)}.")
    pixels = (x[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(_brisque_model().score(pixels))
