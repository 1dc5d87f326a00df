"""Scale-free features of a Gaussian relative to its parent, and their exact inverse.

The VAE never sees world coordinates. A child (or an older ancestor) is described relative to the
*parent*, the newest state of its lineage, so one trained model applies at any scene scale:

| slice             | width | what                                                                 |
|-------------------|-------|----------------------------------------------------------------------|
| ``REL_OFFSET``    | 3     | ``R_p^T (mu - mu_p) / exp(max log-scale_p)``: offset in the parent's  |
|                   |       | frame, in units of the parent's largest axis                          |
| ``REL_ROTATION``  | 4     | ``conj(q_p) * q`` (unit, w >= 0), so that ``q = q_p * q_rel``         |
| ``REL_LOG_SCALE`` | 3     | ``log-scale - log-scale_p``                                           |
| ``REL_SH_REST``   | 45    | SH bands 1..3 change                                                  |
| ``REL_RGB``       | 3     | SH DC (colour) change                                                 |
| ``REL_OPACITY``   | 1     | opacity-logit change                                                  |

``GEOMETRY`` (10 columns) and ``APPEARANCE`` (49) split this vector into the two model streams; each
stream adds an exist flag, giving the paper's 11 and 50 features (its table 5).

:func:`absolute_state` inverts :func:`relative_features` exactly, up to the quaternion's raw norm and
sign, which the renderer ignores: absolute quaternions come back unit-length with ``w >= 0``. The
quaternion algebra is :mod:`gvae_ns.quaternions`'s, imported here under the names callers use
(``normalize_quat``, ``quat_multiply``, ``quat_conjugate``, ``quat_rotate``).

History tokens (:func:`history_tokens`) are the lineage's states relative to its newest one, right-
aligned so that the newest stage is always the last column, plus a few scale-free context features of
each token's own state (:func:`context_features`); the model appends the exist flag. A model that reads
pixel footprints (``GaussianVAEConfig.footprint_context``) gets one more context column,
:func:`footprint_column`: each token's log2 pixel length at the resolution of its own stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from gvae_ns.gaussians import MEANS, OPACITY, QUATS, SCALES, SH_DC, SH_REST, PACKED_DIM
from gvae_ns.quaternions import conjugate as quat_conjugate
from gvae_ns.quaternions import multiply as quat_multiply
from gvae_ns.quaternions import normalize as normalize_quat
from gvae_ns.quaternions import rotate as quat_rotate

REL_OFFSET = slice(0, 3)
REL_ROTATION = slice(3, 7)
REL_LOG_SCALE = slice(7, 10)
REL_SH_REST = slice(10, 55)
REL_RGB = slice(55, 58)
REL_OPACITY = slice(58, 59)
REL_DIM = 59

GEOMETRY = slice(0, 10)
APPEARANCE = slice(10, 59)
GEOMETRY_DIM = 10
APPEARANCE_DIM = 49

CONTEXT_DIM = 7
"""Per-token scale-free context of the token's own state, given to both streams: log-scale anisotropy
``log-scale - max(log-scale)`` (3), opacity logit (1), SH DC colour (3). Survival (pruning) hangs on
opacity and split-vs-clone on shape, so both streams need both to predict the exist flags."""
FOOTPRINT_DIM = 1
"""The optional footprint context column (:func:`footprint_column`)."""


def _check_state(x: Tensor, name: str) -> None:
    if x.shape[-1] != PACKED_DIM:
        raise ValueError(f"{name}: expected {PACKED_DIM} state floats in the last dim, got shape {tuple(x.shape)}")


def _parent_unit(parent: Tensor) -> Tensor:
    """The parent's length unit: ``exp`` of its largest log-scale, shape ``[..., 1]``."""
    return parent[..., SCALES].amax(dim=-1, keepdim=True).exp()


def relative_features(state: Tensor, parent: Tensor) -> Tensor:
    """Features ``[..., 59]`` of raw states relative to ``parent`` (broadcast against ``state``)."""
    _check_state(state, "state")
    _check_state(parent, "parent")
    parent = parent.expand_as(state)
    q_parent = normalize_quat(parent[..., QUATS])
    offset = quat_rotate(quat_conjugate(q_parent), state[..., MEANS] - parent[..., MEANS]) / _parent_unit(parent)
    q_rel = normalize_quat(quat_multiply(quat_conjugate(q_parent), normalize_quat(state[..., QUATS])))
    return torch.cat(
        [
            offset,
            q_rel,
            state[..., SCALES] - parent[..., SCALES],
            state[..., SH_REST] - parent[..., SH_REST],
            state[..., SH_DC] - parent[..., SH_DC],
            state[..., OPACITY] - parent[..., OPACITY],
        ],
        dim=-1,
    )


def absolute_state(rel: Tensor, parent: Tensor) -> Tensor:
    """Inverse of :func:`relative_features`: relative features + parent -> raw states ``[..., 59]``."""
    if rel.shape[-1] != REL_DIM:
        raise ValueError(f"rel: expected {REL_DIM} relative features in the last dim, got shape {tuple(rel.shape)}")
    _check_state(parent, "parent")
    shape = torch.broadcast_shapes(rel.shape, parent.shape)
    rel = rel.expand(shape)
    parent = parent.expand(shape)
    q_parent = normalize_quat(parent[..., QUATS])
    means = parent[..., MEANS] + quat_rotate(q_parent, rel[..., REL_OFFSET] * _parent_unit(parent))
    quats = normalize_quat(quat_multiply(q_parent, normalize_quat(rel[..., REL_ROTATION])))
    return torch.cat(
        [
            means,
            quats,
            parent[..., SCALES] + rel[..., REL_LOG_SCALE],
            parent[..., OPACITY] + rel[..., REL_OPACITY],
            parent[..., SH_DC] + rel[..., REL_RGB],
            parent[..., SH_REST] + rel[..., REL_SH_REST],
        ],
        dim=-1,
    )


def split_streams(rel: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., 59]`` relative features -> (geometry ``[..., 10]``, appearance ``[..., 49]``)."""
    return rel[..., GEOMETRY], rel[..., APPEARANCE]


def merge_streams(geometry: Tensor, appearance: Tensor) -> Tensor:
    """Inverse of :func:`split_streams`."""
    return torch.cat([geometry, appearance], dim=-1)


def context_features(state: Tensor) -> Tensor:
    """Scale-free context ``[..., 7]`` of raw states (see :data:`CONTEXT_DIM`)."""
    _check_state(state, "state")
    scales = state[..., SCALES]
    anisotropy = scales - scales.amax(dim=-1, keepdim=True)
    return torch.cat([anisotropy, state[..., OPACITY], state[..., SH_DC]], dim=-1)


def footprint_column(states: Tensor, log2_px_per_unit: Tensor) -> Tensor:
    """``[N, W, 1]`` log2 pixel length of each right-aligned token's largest axis at its own stage's resolution.

    ``log2_px_per_unit [N]``: pixels per world unit around the lineage at the newest stage's resolution
    (:func:`gvae_ns.footprint.log2_pixels_per_unit`); a token ``j`` stages older was trained at ``2**-j`` of that
    resolution (stages double), and the newest state's own next stage is this column + 1."""
    w = states.shape[1]
    if log2_px_per_unit.shape != states.shape[:1]:
        raise ValueError(f"log2_px_per_unit: expected [{states.shape[0]}], got {tuple(log2_px_per_unit.shape)}")
    back = torch.arange(w - 1, -1, -1, device=states.device, dtype=states.dtype)
    largest = states[..., SCALES].amax(dim=-1) / math.log(2.0)
    return (log2_px_per_unit.to(states)[:, None] - back[None, :] + largest)[..., None]


def newest_index(history_mask: Tensor) -> Tensor:
    """Index ``[N]`` of each row's newest present stage; raises if a row has none."""
    if history_mask.ndim != 2:
        raise ValueError(f"history_mask: expected [N, S], got shape {tuple(history_mask.shape)}")
    present = history_mask.any(dim=1)
    if not bool(present.all()):
        bad = int((~present).nonzero()[0, 0])
        raise ValueError(f"history_mask: row {bad} has no present stage; every lineage needs its parent state")
    stages = torch.arange(history_mask.shape[1], device=history_mask.device)
    return torch.where(history_mask, stages, -1).amax(dim=1)


def right_align(history: Tensor, history_mask: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Re-index histories so column ``window - 1`` is each row's newest stage and column ``j`` is
    ``window - 1 - j`` stages older; stages older than the window are dropped.

    Returns (states ``[N, window, 59]``, mask ``[N, window]``)."""
    _check_state(history, "history")
    if history.shape[:2] != history_mask.shape:
        raise ValueError(
            f"history {tuple(history.shape)} and history_mask {tuple(history_mask.shape)} disagree on [N, S]"
        )
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    newest = newest_index(history_mask)
    back = torch.arange(window - 1, -1, -1, device=history.device)
    source = newest[:, None] - back[None, :]
    valid = source >= 0
    source = source.clamp_min(0)
    mask = valid & torch.gather(history_mask, 1, source)
    states = torch.gather(history, 1, source[..., None].expand(-1, -1, PACKED_DIM))
    states = torch.where(mask[..., None], states, torch.zeros((), dtype=states.dtype, device=states.device))
    return states, mask


@dataclass
class HistoryTokens:
    """Per-stream history tokens of a batch of lineages, right-aligned (newest stage last)."""

    geometry: Tensor
    """``[N, W, 17]``: relative geometry (10) + context (7; 8 with the footprint column)."""
    appearance: Tensor
    """``[N, W, 56]``: relative appearance (49) + context (7; 8 with the footprint column)."""
    mask: Tensor
    """``[N, W]`` bool: stage present (the last column is always present)."""
    parent: Tensor
    """``[N, 59]``: the newest raw state, which every feature is relative to."""

    def index(self, idx: Tensor) -> HistoryTokens:
        """The tokens of the rows ``idx``."""
        return HistoryTokens(self.geometry[idx], self.appearance[idx], self.mask[idx], self.parent[idx])

    def to(self, device: torch.device | str) -> HistoryTokens:
        """The same tokens on ``device``."""
        return HistoryTokens(
            self.geometry.to(device), self.appearance.to(device), self.mask.to(device), self.parent.to(device)
        )


def tokens_from_aligned(states: Tensor, mask: Tensor, log2_px_per_unit: Optional[Tensor] = None) -> HistoryTokens:
    """History tokens from right-aligned raw states ``[N, W, 59]`` and mask ``[N, W]`` (with
    ``log2_px_per_unit [N]``: plus the :func:`footprint_column`)."""
    parent = states[:, -1]
    rel = relative_features(states, parent[:, None, :])
    geo, app = split_streams(rel)
    ctx = context_features(states)
    if log2_px_per_unit is not None:
        ctx = torch.cat([ctx, footprint_column(states, log2_px_per_unit)], dim=-1)
    zero = torch.zeros((), dtype=states.dtype, device=states.device)
    geometry = torch.where(mask[..., None], torch.cat([geo, ctx], dim=-1), zero)
    appearance = torch.where(mask[..., None], torch.cat([app, ctx], dim=-1), zero)
    return HistoryTokens(geometry=geometry, appearance=appearance, mask=mask, parent=parent)


def history_tokens(history: Tensor, history_mask: Tensor, window: int,
                   log2_px_per_unit: Optional[Tensor] = None) -> HistoryTokens:
    """History tokens of raw histories ``[N, S, 59]`` (any layout; the newest present row is the parent)."""
    states, mask = right_align(history, history_mask.bool(), window)
    return tokens_from_aligned(states, mask, log2_px_per_unit)
