"""Lineage -> tensors for the VAE: stage transitions (parent -> descendants) and ancestor histories.

Every Gaussian alive at snapshot ``k + 1`` has exactly one nearest ancestor-or-self that was
alive at snapshot ``k`` (walk parent links until one is in snapshot ``k``). Grouping snapshot
``k + 1`` by that ancestor partitions it into the descendants of snapshot ``k``'s Gaussians.
All ancestor look-ups use pointer doubling over the parent links (vectorised, ``log(depth)``
passes), never a per-Gaussian Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from gvae_ns.footprint import log2_pixels_per_unit
from gvae_ns.gaussians import MEANS, OPACITY, PACKED_DIM
from gvae_ns.lineage.format import Lineage


@dataclass
class TransitionSet:
    """One row per (snapshot ``s``, Gaussian alive at ``s``) pair with ``s < S - 1``."""

    history: Tensor
    """[N, S, 59] state at snapshot 0..S-1 of the parent's ancestor chain (row t = the chain member
    alive at snapshot t); rows after the parent's snapshot are zero."""
    history_mask: Tensor
    """[N, S] bool, False where no ancestor existed yet or t > the parent's snapshot."""
    children: Tensor
    """[N, C, 59] the parent's descendants at snapshot s + 1: slot 0 is the parent itself when it
    survived, then the others by descending opacity."""
    children_mask: Tensor
    """[N, C] bool; all False when every descendant died."""
    stage: Tensor
    """[N] long, the parent's snapshot index s."""
    parent_ids: Tensor
    """[N] long Gaussian ids of the parents."""
    children_ids: Tensor
    """[N, C] long ids of the children, -1 in empty slots."""
    num_children: Tensor
    """[N] long number of descendants before the ``max_children`` cut."""
    num_overflow: int = 0
    """Descendants dropped because a parent had more than ``max_children``."""
    num_orphans: int = 0
    """Gaussians at snapshot s + 1 without any ancestor at snapshot s (dropped)."""
    log2_px_per_unit: Optional[Tensor] = None
    """[N] pixels per world unit around each parent at its snapshot's stage resolution, log2
    (:func:`gvae_ns.footprint.log2_pixels_per_unit`); ``None`` unless built with the training cameras."""

    def __len__(self) -> int:
        return int(self.parent_ids.shape[0])

    def _map(self, f: Callable[[Tensor], Tensor]) -> "TransitionSet":
        kept = ("num_overflow", "num_orphans")
        return TransitionSet(
            **{k.name: None if getattr(self, k.name) is None else f(getattr(self, k.name))
               for k in fields(self) if k.name not in kept},
            num_overflow=self.num_overflow,
            num_orphans=self.num_orphans,
        )

    def __getitem__(self, index: Union[Tensor, slice]) -> "TransitionSet":
        """Rows ``index`` (counts of dropped items are kept as they are)."""
        return self._map(lambda t: t[index])

    def to(self, device: Union[str, torch.device]) -> "TransitionSet":
        """Copy of the set on ``device``."""
        return self._map(lambda t: t.to(device))


def _fixed_point(jump: Tensor) -> Tensor:
    """Follow ``jump`` (an index map whose chains end in fixed points) to the end, by doubling."""
    while True:
        nxt = jump[jump]
        if torch.equal(nxt, jump):
            return jump
        jump = nxt


def ancestor_rows(lineage: Lineage, k: int) -> Tensor:
    """[M] event-table row of each Gaussian's nearest ancestor-or-self alive at snapshot ``k``, -1 if none."""
    m = lineage.num_ids
    in_k = torch.zeros(m, dtype=torch.bool)
    in_k[lineage.rows_of(lineage.snapshot(k).ids)] = True
    prow = lineage.rows_of(lineage.parent)
    rows = torch.arange(m)
    jump = torch.where(in_k, rows, torch.where(prow >= 0, prow, torch.full_like(prow, m)))
    end = _fixed_point(torch.cat([jump, torch.tensor([m])]))[:m]
    return torch.where(end == m, torch.full_like(end, -1), end)


def depths(lineage: Lineage) -> Tensor:
    """[M] number of generations between each Gaussian and its seed (seeds are 0)."""
    ptr = lineage.rows_of(lineage.parent)
    dist = (ptr >= 0).long()
    while bool((ptr >= 0).any()):
        has = ptr >= 0
        safe = ptr.clamp_min(0)
        dist, ptr = torch.where(has, dist + dist[safe], dist), torch.where(has, ptr[safe], ptr)
    return dist


def transition_pairs(lineage: Lineage, k: int) -> Tuple[Tensor, Tensor]:
    """All (ancestor, descendant) pairs of snapshot ``k`` -> ``k + 1``, as row indices into the two
    snapshots: ``(parent_index [P], child_index [P])``; orphans of snapshot ``k + 1`` are left out."""
    rows_k = lineage.rows_of(lineage.snapshot(k).ids)
    pos = torch.full((lineage.num_ids,), -1, dtype=torch.long)
    pos[rows_k] = torch.arange(rows_k.shape[0])
    anc = ancestor_rows(lineage, k)[lineage.rows_of(lineage.snapshot(k + 1).ids)]
    child = (anc >= 0).nonzero().flatten()
    return pos[anc[child]], child


class _Snapshots:
    """Per-snapshot look-ups shared by the builders."""

    def __init__(self, lineage: Lineage) -> None:
        self.lineage = lineage
        self.count = lineage.num_snapshots
        self.rows: List[Tensor] = []
        self.pos: List[Tensor] = []
        self.anc: List[Tensor] = []
        for k in range(self.count):
            rows = lineage.rows_of(lineage.snapshot(k).ids)
            pos = torch.full((lineage.num_ids,), -1, dtype=torch.long)
            pos[rows] = torch.arange(rows.shape[0])
            self.rows.append(rows)
            self.pos.append(pos)
            self.anc.append(ancestor_rows(lineage, k))

    def histories(self, k: int) -> Tuple[Tensor, Tensor]:
        """Ancestor-chain states of snapshot ``k``'s Gaussians at snapshots 0..k."""
        rows = self.rows[k]
        hist = torch.zeros(rows.shape[0], self.count, PACKED_DIM)
        mask = torch.zeros(rows.shape[0], self.count, dtype=torch.bool)
        for t in range(k + 1):
            anc = self.anc[t][rows]
            ok = anc >= 0
            pos = self.pos[t][anc[ok]]
            hist[ok, t] = self.lineage.snapshot(t).state[pos]
            mask[:, t] = ok
        return hist, mask


def snapshot_downscale(lineage: Lineage, k: int) -> float:
    """The image downscale factor of the stage snapshot ``k`` closes (1 when the lineage records none)."""
    stage, downscales = int(lineage.snapshot_stage[k]), lineage.stage_downscales
    return float(downscales[min(stage, downscales.numel() - 1)]) if downscales.numel() else 1.0


def build_transitions(lineage: Lineage, max_children: int = 4, cameras: Any = None) -> TransitionSet:
    """Every (snapshot s -> s + 1) parent with up to ``max_children`` descendants, for all s; with the training
    ``cameras`` (nerfstudio ``Cameras`` at the data's resolution), also each parent's ``log2_px_per_unit`` at
    its snapshot's stage resolution."""
    if max_children < 1:
        raise ValueError(f"max_children must be >= 1, got {max_children}")
    snaps = _Snapshots(lineage)
    s_count, c = snaps.count, max_children
    parts, pixels = [], []
    overflow = orphans = 0
    for k in range(s_count - 1):
        parent_rows = snaps.rows[k]
        n = parent_rows.shape[0]
        hist, hmask = snaps.histories(k)
        nxt = lineage.snapshot(k + 1)
        child_rows = snaps.rows[k + 1]
        anc = snaps.anc[k][child_rows]
        has = anc >= 0
        orphans += int((~has).sum())
        child_rows, anc, child_state = child_rows[has], anc[has], nxt.state[has]
        group = snaps.pos[k][anc]
        is_self = child_rows == anc
        by_opacity = torch.argsort(-child_state[:, OPACITY].flatten(), stable=True)
        order = by_opacity[torch.argsort((~is_self[by_opacity]).to(torch.int8), stable=True)]
        order = order[torch.argsort(group[order], stable=True)]
        g = group[order]
        counts = torch.bincount(group, minlength=n)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(g.shape[0]) - starts[g]
        keep = rank < c
        overflow += int((~keep).sum())
        children = torch.zeros(n, c, PACKED_DIM)
        cmask = torch.zeros(n, c, dtype=torch.bool)
        cids = torch.full((n, c), -1, dtype=torch.long)
        gk, rk, ok = g[keep], rank[keep], order[keep]
        children[gk, rk] = child_state[ok]
        cmask[gk, rk] = True
        cids[gk, rk] = lineage.ids[child_rows[ok]]
        parts.append(
            (hist, hmask, children, cmask, torch.full((n,), k, dtype=torch.long), lineage.ids[parent_rows], cids, counts)
        )
        if cameras is not None:
            means = lineage.snapshot(k).state[:, MEANS]
            pixels.append(log2_pixels_per_unit(means, cameras, snapshot_downscale(lineage, k)))
    if not parts:
        return TransitionSet(
            history=torch.zeros(0, s_count, PACKED_DIM),
            history_mask=torch.zeros(0, s_count, dtype=torch.bool),
            children=torch.zeros(0, c, PACKED_DIM),
            children_mask=torch.zeros(0, c, dtype=torch.bool),
            stage=torch.zeros(0, dtype=torch.long),
            parent_ids=torch.zeros(0, dtype=torch.long),
            children_ids=torch.zeros(0, c, dtype=torch.long),
            num_children=torch.zeros(0, dtype=torch.long),
            log2_px_per_unit=None if cameras is None else torch.zeros(0),
        )
    cols = [torch.cat(col) for col in zip(*parts)]
    return TransitionSet(*cols, num_overflow=overflow, num_orphans=orphans,
                         log2_px_per_unit=torch.cat(pixels) if pixels else None)


def final_histories(lineage: Lineage) -> Tuple[Tensor, Tensor, Tensor]:
    """Ancestor chains of the Gaussians in the last snapshot: ``(history [N,S,59], mask [N,S], ids [N])``."""
    if lineage.num_snapshots == 0:
        raise ValueError(f"{lineage.source or 'lineage'} has no snapshots; record at least one with recorder.snapshot()")
    snaps = _Snapshots(lineage)
    hist, mask = snaps.histories(snaps.count - 1)
    return hist, mask, lineage.snapshot(-1).ids.clone()


def check_footprints(transitions: Any) -> Optional[Tensor]:
    """The ``log2_px_per_unit [N]`` of a transition set (``None`` when it has none); ``ValueError`` when it is
    not a finite float tensor with one value per transition."""
    value = getattr(transitions, "log2_px_per_unit", None)
    if value is None:
        return None
    n = int(_tensor(transitions, "stage").shape[0])
    if not isinstance(value, Tensor) or value.shape != (n,) or not value.is_floating_point():
        raise ValueError(f"transitions.log2_px_per_unit: expected a float tensor [{n}], got "
                         f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError("transitions.log2_px_per_unit: non-finite values")
    return value.float()


def _tensor(obj: Any, name: str) -> Tensor:
    value = getattr(obj, name, None)
    if not isinstance(value, Tensor):
        raise ValueError(f"transitions.{name}: expected a tensor, got {type(value).__name__}")
    return value


def check_transitions(transitions: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(history, history_mask, children, children_mask, stage)`` of a :class:`TransitionSet`-like object,
    as float / bool / long tensors; ``ValueError`` naming the field when one is missing, mis-shaped or not finite."""
    history = _tensor(transitions, "history").float()
    history_mask = _tensor(transitions, "history_mask").bool()
    children = _tensor(transitions, "children").float()
    children_mask = _tensor(transitions, "children_mask").bool()
    stage = _tensor(transitions, "stage").long()
    n = history.shape[0]
    if n == 0:
        raise ValueError("transitions: the set is empty; record at least two stages of lineage first")
    if history.ndim != 3 or history.shape[2] != PACKED_DIM:
        raise ValueError(f"transitions.history: expected [N, S, {PACKED_DIM}], got {tuple(history.shape)}")
    if history_mask.shape != history.shape[:2]:
        raise ValueError(
            f"transitions.history_mask: expected {tuple(history.shape[:2])}, got {tuple(history_mask.shape)}"
        )
    if children.ndim != 3 or children.shape[0] != n or children.shape[2] != PACKED_DIM:
        raise ValueError(f"transitions.children: expected [{n}, C, {PACKED_DIM}], got {tuple(children.shape)}")
    if children_mask.shape != children.shape[:2]:
        raise ValueError(
            f"transitions.children_mask: expected {tuple(children.shape[:2])}, got {tuple(children_mask.shape)}"
        )
    if stage.shape != (n,):
        raise ValueError(f"transitions.stage: expected [{n}], got {tuple(stage.shape)}")
    for name, value, mask in (("history", history, history_mask), ("children", children, children_mask)):
        if not bool(torch.isfinite(value[mask]).all()):
            raise ValueError(f"transitions.{name}: non-finite values in present entries")
    return history, history_mask, children, children_mask, stage
