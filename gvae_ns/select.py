"""Which Gaussians to refine: importance scores and deterministic top-K selection.

Two per-Gaussian signals, both accumulated during training:

- ``grad2d``: the mean view-space positional gradient norm (what gsplat's ``DefaultStrategy``
  accumulates to decide densification: ``grad2d / count``), high where the image error pulls a
  Gaussian's projection around;
- ``hessian``: a diagonal Gauss-Newton estimate of the loss curvature in the Gaussian's position,
  the sum over steps of squared position gradients (``[N]``, or ``[N, 3]`` per axis, summed: the
  trace of the 3x3 block), high where a small move changes the loss a lot.

:func:`combine_scores` modes:

- ``"grad"``: ``grad2d`` alone (the 3D-GS / Generative Densification heuristic);
- ``"hessian"``: the Hessian-assisted score, the normalised geometric mean
  ``sqrt((g / mean(g)) * (h / mean(h)))``: each signal divided by its mean so neither's units
  dominate, and the product so a Gaussian must rank high in both. A signal that is zero
  everywhere carries no information and is replaced by ones, leaving the other to decide;
- ``"all"``: ones for every Gaussian, the whole-scene ablation (select with ``k=None`` and
  ``fraction=None`` to take them all).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

SCORE_MODES = ("hessian", "grad", "all")


def _check_signal(name: str, value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if value.dim() == 2 and value.shape[1] == 3:
        value = value.sum(dim=1)
    if value.dim() != 1:
        raise ValueError(f"combine_scores: {name} must be [N] or [N, 3], got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"selection scores: {name} is NaN or infinite for {bad} of {value.numel()} Gaussians, so the checkpoint's "
            "Gaussians or their renders are not finite (a diverged run). Retrain with lower learning rates; a "
            "Gaussian no training view sees scores 0, not NaN.")
    if bool((value < 0).any()):
        raise ValueError(f"combine_scores: {name} must be non-negative (a norm or a sum of squares)")
    return value.float()


def _mean_normalised(value: torch.Tensor) -> torch.Tensor:
    mean = value.mean() if value.numel() else value.new_zeros(())
    return value / mean if float(mean) > 0 else torch.ones_like(value)


def combine_scores(
    grad2d: Optional[torch.Tensor], hessian: Optional[torch.Tensor] = None, mode: str = "hessian"
) -> torch.Tensor:
    """Per-Gaussian importance ``[N]`` (higher = refine first) from the signals (module docstring)."""
    if mode not in SCORE_MODES:
        raise ValueError(f"combine_scores: mode must be one of {SCORE_MODES}, got {mode!r}")
    g = _check_signal("grad2d", grad2d)
    h = _check_signal("hessian", hessian)
    if g is not None and h is not None and g.shape != h.shape:
        raise ValueError(f"combine_scores: grad2d has {g.shape[0]} Gaussians but hessian has {h.shape[0]}")
    if mode == "all":
        ref = g if g is not None else h
        if ref is None:
            raise ValueError("combine_scores: mode='all' still needs grad2d or hessian to know N")
        return torch.ones_like(ref)
    if g is None:
        raise ValueError(f"combine_scores: mode={mode!r} needs grad2d (mean view-space gradient norm)")
    if mode == "grad":
        return g
    if h is None:
        raise ValueError("combine_scores: mode='hessian' needs hessian (sum of squared position gradients); use mode='grad' without it")
    return torch.sqrt(_mean_normalised(g) * _mean_normalised(h))


def select_top(score: torch.Tensor, k: Optional[int] = None, fraction: Optional[float] = None) -> torch.Tensor:
    """Indices of the ``k`` highest scores (or ``round(fraction * N)``; neither: all), best first.

    Ties go to the lower index, so the selection is deterministic.
    """
    if score.dim() != 1:
        raise ValueError(f"select_top: score must be 1D [N], got {tuple(score.shape)}")
    if bool(torch.isnan(score).any()):
        raise ValueError("select_top: score has NaN entries; they cannot be ranked")
    n = score.shape[0]
    if k is not None and fraction is not None:
        raise ValueError("select_top: give k or fraction, not both")
    if fraction is not None:
        if isinstance(fraction, bool) or not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"select_top: fraction must be in [0, 1], got {fraction!r}")
        k = int(round(float(fraction) * n))
    if k is None:
        k = n
    try:
        valid = not isinstance(k, bool) and 0 <= operator.index(k) <= n
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"select_top: k must be an int in [0, N={n}], got {k!r}")
    k = operator.index(k)
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:k]
