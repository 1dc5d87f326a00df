"""Recording every Gaussian's lineage while gsplat's ``DefaultStrategy`` densifies.

Each Gaussian carries a persistent int64 id in the strategy state under :data:`ID_KEY`.
gsplat's ``duplicate``, ``split`` and ``remove`` permute every state tensor exactly as they
permute the parameters, so after an op every new row still holds the id of the row it was
copied from. :class:`LineageStrategy` lets gsplat's own ``_grow_gs`` / ``_prune_gs`` run
unchanged and reads the events off that column:

* ``_grow_gs`` duplicates first (copies appended at the end), then splits (split originals
  removed, both children appended at the end; copies are never split). So after it returns
  with ``(n_dupli, n_split)`` the last ``n_dupli + 2 * n_split`` rows are new: ``n_dupli``
  clones, then the two halves of the split children, each half listing the split originals in
  order. A Gaussian can be cloned and split in the same step (2D screen-size rule): the clone
  survives as a new id, the original dies.
* ``_prune_gs`` removes rows; the ids missing afterwards died.

New rows get fresh ids in row order, so ids in the state column stay strictly increasing.
The :class:`LineageRecorder` keeps the event table in growable CPU tensors (one host copy
of the new/dead ids per refinement, no per-Gaussian Python work) and the stage snapshots.

Ownership: ``LineageStrategy`` creates its own recorder unless one is passed in
(``LineageStrategy(recorder=...)``); the model reaches it as ``strategy.recorder``, sets
``recorder.stage`` when a stage begins, calls ``recorder.snapshot(...)`` at each stage boundary
and at the end, stores ``recorder.state_dict()`` in its checkpoint and writes
``recorder.save(path)``.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from gsplat.strategy import DefaultStrategy
from torch import Tensor

from gvae_ns.gaussians import PACKED_DIM, pack_gaussians
from gvae_ns.lineage.format import (
    ALIVE,
    CLONE,
    EVENT_DTYPES,
    FORMAT_VERSION,
    PRUNED,
    SEED,
    SPLIT,
    SPLIT_REPLACED,
    Lineage,
    save_lineage,
)

ID_KEY = "lineage_ids"
"""Key of the int64 id column in the strategy state."""

_STATE_KEYS = (
    ["format_version", "next_id", "stage", "snapshot_float16", "has_live", "live_ids", "stage_downscales", "stage_boundaries"]
    + [f"event_{name}" for name in EVENT_DTYPES]
    + ["snapshot_stage", "snapshot_step", "snapshot_offsets", "snapshot_ids", "snapshot_state", "snapshot_grad2d", "snapshot_count"]
)
_VOID = -1  # birth code of ids discarded by truncate_after (never exported, never reused)


class LineageRecorder:
    """Event table (id, parent, birth, death) and stage snapshots of one training run.

    Ids are indices into the table; they are handed out in increasing order and never reused.
    """

    def __init__(self, snapshot_dtype: torch.dtype = torch.float32, capacity: int = 4096) -> None:
        """``snapshot_dtype``: in-memory dtype of snapshot states (float16 halves checkpoint size).
        ``capacity``: initial event-table rows (it doubles when full)."""
        if snapshot_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"snapshot_dtype must be torch.float32 or torch.float16, got {snapshot_dtype}")
        self.snapshot_dtype = snapshot_dtype
        self._cols: Dict[str, Tensor] = {n: torch.empty(max(capacity, 1), dtype=d) for n, d in EVENT_DTYPES.items()}
        self._size = 0
        self._stage = 0
        self._live: Optional[Tensor] = None
        self._live_authoritative = False
        self._snapshots: List[Dict[str, Any]] = []
        self.stage_downscales: List[int] = []
        """Downscale factor of each stage, set by the model (written to the file)."""
        self.stage_boundaries: List[int] = []
        """First step of stages 1.., set by the model (written to the file)."""

    def __repr__(self) -> str:
        return f"LineageRecorder(ids={self._size}, stage={self._stage}, snapshots={len(self._snapshots)})"

    @property
    def stage(self) -> int:
        """Current resolution stage; births and deaths are tagged with it."""
        return self._stage

    @stage.setter
    def stage(self, value: int) -> None:
        if int(value) < 0:
            raise ValueError(f"recorder.stage must be >= 0, got {value}")
        self._stage = int(value)

    @property
    def next_id(self) -> int:
        """The id the next new Gaussian will get."""
        return self._size

    @property
    def live_ids(self) -> Optional[Tensor]:
        """Ids of the current parameter rows, in row order (None before the first hook)."""
        return self._live

    @property
    def num_snapshots(self) -> int:
        """Number of snapshots taken so far."""
        return len(self._snapshots)

    def _column(self, name: str) -> Tensor:
        return self._cols[name][: self._size]

    def _append(self, parents: Tensor, births: Tensor, step: int) -> int:
        """Add rows for new ids (CPU ``parents`` / ``births``); returns the first new id."""
        k = int(parents.shape[0])
        first = self._size
        need = first + k
        cap = self._cols["parent"].shape[0]
        if need > cap:
            new_cap = max(need, 2 * cap)
            for name, col in self._cols.items():
                grown = torch.empty(new_cap, dtype=col.dtype)
                grown[:first] = col[:first]
                self._cols[name] = grown
        c = self._cols
        c["parent"][first:need] = parents
        c["birth"][first:need] = births
        c["birth_step"][first:need] = step
        c["birth_stage"][first:need] = self._stage
        c["death_step"][first:need] = -1
        c["death_stage"][first:need] = -1
        c["death_cause"][first:need] = ALIVE
        self._size = need
        return first

    def _kill(self, ids: Tensor, cause: int, step: int) -> None:
        ids = ids.cpu()
        if bool((self._cols["death_cause"][ids] != ALIVE).any()):
            raise RuntimeError(f"lineage: ids {ids[self._cols['death_cause'][ids] != ALIVE][:5].tolist()} died twice")
        self._cols["death_step"][ids] = step
        self._cols["death_stage"][ids] = self._stage
        self._cols["death_cause"][ids] = cause

    def register_seeds(self, n: int, step: int, device: Union[str, torch.device] = "cpu") -> Tensor:
        """Give ``n`` initial Gaussians fresh ids (parent -1, event seed); returns them on ``device``."""
        first = self._append(torch.full((n,), -1, dtype=torch.int64), torch.full((n,), SEED, dtype=torch.int8), step)
        return torch.arange(first, first + n, dtype=torch.int64, device=device)

    def sync_ids(self, state: Dict[str, Any], n: int, step: int, device: Union[str, torch.device]) -> Tensor:
        """Make ``state[ID_KEY]`` hold the ids of the ``n`` current rows and return it.

        Seeds ids on first use; after :meth:`load_state_dict` or :meth:`truncate_after` the
        recorder's live ids replace whatever the state held.
        """
        ids = state.get(ID_KEY)
        if ids is None or self._live_authoritative:
            if self._live is None:
                if self._size:
                    raise ValueError(
                        f"lineage: the recorder holds {self._size} ids but no live-id column; "
                        "load the recorder state that belongs to these parameters"
                    )
                ids = self.register_seeds(n, step, device)
            else:
                ids = self._live.to(device)
            self._live_authoritative = False
        if ids.shape[0] != n:
            raise ValueError(
                f"lineage: the strategy state tracks {ids.shape[0]} Gaussian ids but the parameters have {n} rows. "
                "Gaussians were added or removed outside LineageStrategy, or the recorder state belongs to a "
                "different checkpoint; change Gaussians only through the strategy and restore the recorder "
                "from the same checkpoint as the parameters (truncate_after(step) for an older one)"
            )
        state[ID_KEY] = ids
        self._live = ids
        return ids

    def record_growth(self, state: Dict[str, Any], n_before: int, n_dupli: int, n_split: int, step: int) -> None:
        """Turn the rows gsplat's ``_grow_gs`` appended into clone / split events (see module doc)."""
        ids = state[ID_KEY]
        n = int(ids.shape[0])
        if n != n_before + n_dupli + n_split:
            raise RuntimeError(
                f"lineage: _grow_gs went from {n_before} to {n} rows with {n_dupli} duplicated and "
                f"{n_split} split; gsplat's op layout is not what LineageStrategy expects (gsplat 1.4.0)"
            )
        n_new = n_dupli + 2 * n_split
        if n_new == 0:
            self._live = ids
            return
        parents = ids[n - n_new :].cpu()
        split_a, split_b = parents[n_dupli : n_dupli + n_split], parents[n_dupli + n_split :]
        if not torch.equal(split_a, split_b):
            raise RuntimeError("lineage: split children do not come in matching halves; gsplat's split layout changed")
        births = torch.full((n_new,), SPLIT, dtype=torch.int8)
        births[:n_dupli] = CLONE
        first = self._append(parents, births, step)
        new_ids = torch.arange(first, first + n_new, dtype=torch.int64, device=ids.device)
        self._kill(split_a, SPLIT_REPLACED, step)
        ids = torch.cat([ids[: n - n_new], new_ids])
        state[ID_KEY] = ids
        self._live = ids

    def record_removal(self, ids_before: Tensor, state: Dict[str, Any], step: int, cause: int = PRUNED) -> int:
        """Mark the ids of ``ids_before`` missing from ``state[ID_KEY]`` as dead; returns how many."""
        ids_after = state[ID_KEY]
        kept = torch.zeros(self._size, dtype=torch.bool, device=ids_before.device)
        kept[ids_after] = True
        dead = ids_before[~kept[ids_before]]
        if dead.shape[0] != ids_before.shape[0] - ids_after.shape[0]:
            raise RuntimeError("lineage: rows were removed but the surviving ids are not a subset of the old ones")
        self._kill(dead, cause, step)
        self._live = ids_after
        return int(dead.shape[0])

    @torch.no_grad()
    def snapshot(self, params: Mapping[str, Tensor], state: Dict[str, Any], stage: int, step: int) -> None:
        """Store every live Gaussian's packed state and gradient statistics as the snapshot of ``stage``.

        Snapshot stages must not decrease; taking one again for the last stage replaces it.
        """
        n = int(params["means"].shape[0])
        ids = self.sync_ids(state, n, step, params["means"].device)
        if self._snapshots and stage < self._snapshots[-1]["stage"]:
            raise ValueError(f"lineage: snapshot for stage {stage} after one for stage {self._snapshots[-1]['stage']}; stages must not decrease")
        grad2d, count = state.get("grad2d"), state.get("count")
        if grad2d is None or count is None:
            mean_grad = torch.zeros(n)
            count = torch.zeros(n)
        else:
            mean_grad = (grad2d / count.clamp_min(1)).float().cpu()
            count = count.float().cpu()
        snap = {
            "stage": int(stage),
            "step": int(step),
            "ids": ids.cpu().clone(),
            "state": pack_gaussians(params).detach().to("cpu", self.snapshot_dtype),
            "grad2d": mean_grad,
            "count": count,
        }
        if self._snapshots and stage == self._snapshots[-1]["stage"]:
            self._snapshots[-1] = snap
        else:
            self._snapshots.append(snap)

    def truncate_after(self, step: int) -> None:
        """Forget everything after ``step`` (for resuming from an older checkpoint).

        Births after ``step`` are dropped (their ids stay retired), deaths after it are undone,
        snapshots taken after it are dropped. The live ids become the Gaussians alive after
        ``step``'s refinement, in increasing id order, which is the parameters' row order.
        """
        c = {name: self._column(name) for name in EVENT_DTYPES}
        late = (c["birth_step"] > step) & (c["birth"] != _VOID)
        c["birth"][late] = _VOID
        revived = c["death_step"] > step
        c["death_step"][revived] = -1
        c["death_stage"][revived] = -1
        c["death_cause"][revived] = ALIVE
        c["death_step"][late] = -1
        c["death_stage"][late] = -1
        c["death_cause"][late] = ALIVE
        self._snapshots = [s for s in self._snapshots if s["step"] <= step]
        alive = (c["birth"] != _VOID) & (c["death_cause"] == ALIVE)
        self._live = alive.nonzero().flatten()
        self._live_authoritative = True

    def state_dict(self) -> Dict[str, Union[Tensor, int]]:
        """Everything needed to continue this lineage, as CPU tensors and Python ints only."""
        sd: Dict[str, Union[Tensor, int]] = {
            "format_version": FORMAT_VERSION,
            "next_id": self._size,
            "stage": self._stage,
            "snapshot_float16": int(self.snapshot_dtype == torch.float16),
            "has_live": int(self._live is not None),
            "live_ids": self._live.cpu().clone() if self._live is not None else torch.zeros(0, dtype=torch.int64),
            "stage_downscales": torch.tensor(self.stage_downscales, dtype=torch.int64),
            "stage_boundaries": torch.tensor(self.stage_boundaries, dtype=torch.int64),
        }
        for name in EVENT_DTYPES:
            sd[f"event_{name}"] = self._column(name).clone()
        sd.update(self._packed_snapshots(self.snapshot_dtype))
        return sd

    def load_state_dict(self, sd: Mapping[str, Union[Tensor, int]]) -> None:
        """Restore :meth:`state_dict` output; the next hook puts its live ids back into the strategy state."""
        missing = [k for k in _STATE_KEYS if k not in sd]
        if missing:
            raise ValueError(f"lineage recorder state is missing {missing}; it was not written by LineageRecorder.state_dict()")
        if int(sd["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"lineage recorder state has format version {int(sd['format_version'])}, this code reads {FORMAT_VERSION}")
        size = int(sd["next_id"])
        for name, dtype in EVENT_DTYPES.items():
            col = sd[f"event_{name}"]
            if not isinstance(col, Tensor) or col.shape != (size,):
                raise ValueError(f"lineage recorder state: 'event_{name}' must be a tensor of shape [{size}]")
        self._cols = {name: sd[f"event_{name}"].to("cpu", dtype).clone() for name, dtype in EVENT_DTYPES.items()}  # type: ignore[union-attr]
        if size == 0:
            self._cols = {name: torch.empty(1, dtype=dtype) for name, dtype in EVENT_DTYPES.items()}
        self._size = size
        self._stage = int(sd["stage"])
        self.snapshot_dtype = torch.float16 if int(sd["snapshot_float16"]) else torch.float32
        self._live = sd["live_ids"].long().clone() if int(sd["has_live"]) else None  # type: ignore[union-attr]
        self._live_authoritative = self._live is not None
        self.stage_downscales = [int(v) for v in sd["stage_downscales"].tolist()]  # type: ignore[union-attr]
        self.stage_boundaries = [int(v) for v in sd["stage_boundaries"].tolist()]  # type: ignore[union-attr]
        offsets = sd["snapshot_offsets"].tolist()  # type: ignore[union-attr]
        self._snapshots = []
        for k, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            self._snapshots.append(
                {
                    "stage": int(sd["snapshot_stage"][k]),  # type: ignore[index]
                    "step": int(sd["snapshot_step"][k]),  # type: ignore[index]
                    "ids": sd["snapshot_ids"][a:b].clone(),  # type: ignore[index]
                    "state": sd["snapshot_state"][a:b].to(self.snapshot_dtype).clone(),  # type: ignore[index]
                    "grad2d": sd["snapshot_grad2d"][a:b].clone(),  # type: ignore[index]
                    "count": sd["snapshot_count"][a:b].clone(),  # type: ignore[index]
                }
            )

    def _packed_snapshots(self, dtype: torch.dtype) -> Dict[str, Tensor]:
        snaps = self._snapshots
        counts = torch.tensor([s["ids"].shape[0] for s in snaps], dtype=torch.int64)
        offsets = torch.zeros(len(snaps) + 1, dtype=torch.int64)
        offsets[1:] = counts.cumsum(0)

        def cat(key: str, empty: Tensor) -> Tensor:
            return torch.cat([s[key] for s in snaps]) if snaps else empty

        return {
            "snapshot_stage": torch.tensor([s["stage"] for s in snaps], dtype=torch.int64),
            "snapshot_step": torch.tensor([s["step"] for s in snaps], dtype=torch.int64),
            "snapshot_offsets": offsets,
            "snapshot_ids": cat("ids", torch.zeros(0, dtype=torch.int64)),
            "snapshot_state": cat("state", torch.zeros(0, PACKED_DIM)).to(dtype),
            "snapshot_grad2d": cat("grad2d", torch.zeros(0)),
            "snapshot_count": cat("count", torch.zeros(0)),
        }

    def to_lineage(self) -> Lineage:
        """The recorded lineage as a :class:`Lineage` (copies; float32 states)."""
        valid = self._cols["birth"][: self._size] != _VOID
        cols = {name: self._column(name)[valid].clone() for name in EVENT_DTYPES}
        snaps = self._packed_snapshots(torch.float32)
        return Lineage(
            ids=torch.arange(self._size, dtype=torch.int64)[valid],
            **cols,
            **snaps,
            stage_downscales=torch.tensor(self.stage_downscales, dtype=torch.int64),
            stage_boundaries=torch.tensor(self.stage_boundaries, dtype=torch.int64),
        )

    def lineage_with_snapshot(self, params: Mapping[str, Tensor], state: Dict[str, Any], stage: int,
                              step: int) -> Lineage:
        """:meth:`to_lineage` with one more snapshot of ``params`` (as :meth:`snapshot` would take it, replacing
        a last one of the same ``stage``); the recorder's own snapshots are left as they are."""
        kept = list(self._snapshots)
        try:
            self.snapshot(params, state, stage, step)
            return self.to_lineage()
        finally:
            self._snapshots = kept

    def save(self, path: Union[str, Path], *, float16: bool = False) -> Path:
        """Write the lineage file (see :mod:`gvae_ns.lineage.format`); returns its path."""
        return save_lineage(self.to_lineage(), path, float16=float16)


@dataclass
class LineageStrategy(DefaultStrategy):
    """gsplat's ``DefaultStrategy`` that records every clone, split and prune in :attr:`recorder`.

    Densification decisions are gsplat's own; only the bookkeeping is added.
    """

    recorder: LineageRecorder = field(default_factory=LineageRecorder, repr=False, compare=False)
    """Where events go; pass one in to share it, or use the one created here."""

    @classmethod
    def from_default(cls, strategy: DefaultStrategy) -> "LineageStrategy":
        """The same densification policy as ``strategy`` (e.g. splatfacto's), with lineage recording."""
        return cls(**{f.name: getattr(strategy, f.name) for f in dataclasses.fields(DefaultStrategy) if f.init})

    def initialize_state(self, scene_scale: float = 1.0) -> Dict[str, Any]:
        """gsplat's state plus the id column (filled on the first hook, when the rows are known)."""
        state = super().initialize_state(scene_scale=scene_scale)
        state[ID_KEY] = None
        return state

    def _sync(self, params: Mapping[str, Tensor], state: Dict[str, Any], step: int) -> Tensor:
        means = params["means"]
        return self.recorder.sync_ids(state, int(means.shape[0]), step, means.device)

    def step_pre_backward(self, params, optimizers, state, step, info) -> None:  # type: ignore[override]
        """gsplat's hook; also seeds or restores the id column."""
        self._sync(params, state, step)
        super().step_pre_backward(params, optimizers, state, step, info)

    @torch.no_grad()
    def _grow_gs(self, params, optimizers, state, step) -> Tuple[int, int]:  # type: ignore[override]
        n_before = int(self._sync(params, state, step).shape[0])
        n_dupli, n_split = super()._grow_gs(params, optimizers, state, step)
        self.recorder.record_growth(state, n_before, int(n_dupli), int(n_split), step)
        return n_dupli, n_split

    @torch.no_grad()
    def _prune_gs(self, params, optimizers, state, step) -> int:  # type: ignore[override]
        before = self._sync(params, state, step)
        n_prune = super()._prune_gs(params, optimizers, state, step)
        if n_prune > 0:
            self.recorder.record_removal(before, state, step)
        return n_prune
