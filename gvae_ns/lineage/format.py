"""The lineage file: one versioned ``lineage.npz`` per training run.

A numpy ``.npz`` archive (uncompressed zip of ``.npy`` arrays) that loads with
``numpy.load(path, allow_pickle=False)``: no pickled objects, every array has a fixed dtype.
It is written atomically (temp file in the same directory, then ``os.replace``).

Notation: ``M`` Gaussians ever created, ``K`` snapshots, ``T`` snapshot rows in total
(sum of the live counts of all snapshots), ``D`` resolution stages, ``B`` stage boundaries.

Header

=====================  =========  ======  ===================================================
array                  dtype      shape   meaning
=====================  =========  ======  ===================================================
``format_name``        ``<U..``   ()      always ``"gvae_ns.lineage"``
``format_version``     int64      ()      :data:`FORMAT_VERSION`; other versions are rejected
``stage_downscales``   int64      [D]     image downscale factor of each stage (e.g. 8, 4, 2)
``stage_boundaries``   int64      [B]     first training step of stages 1.. (usually B = D - 1)
=====================  =========  ======  ===================================================

Event table: one row per Gaussian ever created, sorted by id

=====================  =========  ======  ===================================================
``event_id``           int64      [M]     persistent id, strictly increasing, never reused
``event_parent``       int64      [M]     id of the Gaussian it was copied from, -1 for seeds
``event_birth``        int8       [M]     :data:`SEED` 0, :data:`CLONE` 1, :data:`SPLIT` 2
``event_birth_step``   int32      [M]     training step of the birth
``event_birth_stage``  int16      [M]     resolution stage of the birth
``event_death_step``   int32      [M]     training step of the death, -1 while alive
``event_death_stage``  int16      [M]     resolution stage of the death, -1 while alive
``event_death_cause``  int8       [M]     :data:`ALIVE` 0, :data:`PRUNED` 1, :data:`SPLIT_REPLACED` 2
=====================  =========  ======  ===================================================

A clone keeps the original alive (same id) and adds one new id (event ``CLONE``). A split kills
the original (cause ``SPLIT_REPLACED``) and adds two new ids (event ``SPLIT``), both with the
original as parent. Parents always have a smaller id than their children.

Snapshots: every live Gaussian's raw state at stage boundaries and at the end of training,
concatenated; snapshot ``k`` is rows ``snapshot_offsets[k]:snapshot_offsets[k + 1]``

=====================  =============  =======  ==============================================
``snapshot_stage``     int64          [K]      stage the snapshot closes, strictly increasing
``snapshot_step``      int64          [K]      training step at which it was taken
``snapshot_offsets``   int64          [K + 1]  row offsets, 0 first and T last
``snapshot_ids``       int64          [T]      Gaussian id of each row (in the event table)
``snapshot_state``     float32/16     [T, 59]  :func:`gvae_ns.gaussians.pack_gaussians` layout
``snapshot_grad2d``    float32        [T]      mean view-space gradient norm accumulated by the
                                               strategy since its last refinement (0 if none)
``snapshot_count``     float32        [T]      number of visible views behind that mean
=====================  =============  =======  ==============================================

In memory a :class:`Lineage` holds the same arrays as CPU torch tensors (snapshot states always
float32). :func:`load_lineage` validates a file fully and raises :class:`LineageFormatError`,
naming the file and the problem, for anything it cannot trust.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
from torch import Tensor

from gvae_ns.atomic import atomic_write
from gvae_ns.gaussians import MEANS, OPACITY, QUATS, SCALES, SH_DC, SH_REST, PACKED_DIM

FORMAT_NAME = "gvae_ns.lineage"
FORMAT_VERSION = 1

SEED, CLONE, SPLIT = 0, 1, 2
"""Birth events."""
BIRTH_NAMES = ("seed", "clone", "split")

ALIVE, PRUNED, SPLIT_REPLACED = 0, 1, 2
"""Death causes (``ALIVE`` while the Gaussian lives)."""
DEATH_NAMES = ("alive", "prune", "split")

EVENT_DTYPES: Dict[str, torch.dtype] = {
    "parent": torch.int64,
    "birth": torch.int8,
    "birth_step": torch.int32,
    "birth_stage": torch.int16,
    "death_step": torch.int32,
    "death_stage": torch.int16,
    "death_cause": torch.int8,
}
"""Event-table columns besides ``id`` and their dtypes (in memory and on disk)."""

_STATE_FIELDS = {"means": MEANS, "quats": QUATS, "scales": SCALES, "opacity": OPACITY, "sh_dc": SH_DC, "sh_rest": SH_REST}
_FLOAT16_MAX = 65504.0


class LineageFormatError(ValueError):
    """A lineage file (or in-memory lineage) is unreadable or inconsistent."""


@dataclass
class Snapshot:
    """The live Gaussians at one snapshot (views into a :class:`Lineage`)."""

    stage: int
    """Stage the snapshot closes."""
    step: int
    """Training step it was taken at."""
    ids: Tensor
    """[n] int64 Gaussian ids."""
    state: Tensor
    """[n, 59] float32 packed states."""
    grad2d: Tensor
    """[n] float32 mean view-space gradient norm."""
    count: Tensor
    """[n] float32 visibility count behind ``grad2d``."""


@dataclass
class Lineage:
    """A whole run's lineage as CPU tensors; see the module docstring for every field."""

    ids: Tensor
    """[M] int64 Gaussian ids, strictly increasing."""
    parent: Tensor
    """[M] int64 parent id, -1 for seeds."""
    birth: Tensor
    """[M] int8 birth event (SEED / CLONE / SPLIT)."""
    birth_step: Tensor
    """[M] int32 training step of the birth."""
    birth_stage: Tensor
    """[M] int16 stage of the birth."""
    death_step: Tensor
    """[M] int32 training step of the death, -1 while alive."""
    death_stage: Tensor
    """[M] int16 stage of the death, -1 while alive."""
    death_cause: Tensor
    """[M] int8 death cause (ALIVE / PRUNED / SPLIT_REPLACED)."""
    snapshot_stage: Tensor
    """[K] int64 stage each snapshot closes."""
    snapshot_step: Tensor
    """[K] int64 step each snapshot was taken at."""
    snapshot_offsets: Tensor
    """[K + 1] int64 row offsets of the snapshots."""
    snapshot_ids: Tensor
    """[T] int64 id of each snapshot row."""
    snapshot_state: Tensor
    """[T, 59] float32 packed state of each snapshot row."""
    snapshot_grad2d: Tensor
    """[T] float32 mean view-space gradient norm."""
    snapshot_count: Tensor
    """[T] float32 visibility count behind ``snapshot_grad2d``."""
    stage_downscales: Tensor
    """[D] int64 downscale factor of each stage."""
    stage_boundaries: Tensor
    """[B] int64 first step of stages 1.."""
    version: int = FORMAT_VERSION
    """Format version."""
    source: Optional[Path] = None
    """File it was loaded from, if any."""

    @property
    def num_ids(self) -> int:
        """Number of Gaussians ever created (rows of the event table)."""
        return int(self.ids.shape[0])

    @property
    def num_snapshots(self) -> int:
        """Number of snapshots ``K``."""
        return int(self.snapshot_stage.shape[0])

    def snapshot(self, k: int) -> Snapshot:
        """Snapshot ``k`` (negative indices count from the end)."""
        if not -self.num_snapshots <= k < self.num_snapshots:
            raise IndexError(f"snapshot {k} out of range: the lineage has {self.num_snapshots} snapshots")
        k %= self.num_snapshots
        a, b = int(self.snapshot_offsets[k]), int(self.snapshot_offsets[k + 1])
        return Snapshot(
            stage=int(self.snapshot_stage[k]),
            step=int(self.snapshot_step[k]),
            ids=self.snapshot_ids[a:b],
            state=self.snapshot_state[a:b],
            grad2d=self.snapshot_grad2d[a:b],
            count=self.snapshot_count[a:b],
        )

    def rows_of(self, ids: Tensor) -> Tensor:
        """Event-table rows of ``ids`` (-1 for ids not in the table, including -1 itself)."""
        top = int(self.ids.max()) if self.num_ids else -1
        table = torch.full((top + 2,), -1, dtype=torch.long)  # last slot: "not found"
        table[self.ids] = torch.arange(self.num_ids)
        ids = ids.long()
        return table[torch.where((ids >= 0) & (ids <= top), ids, torch.full_like(ids, top + 1))]

    def validate(self, where: str = "lineage") -> None:
        """Raise :class:`LineageFormatError` (message starts with ``where``) on any inconsistency."""
        _validate(self, where)


def _fail(where: str, problem: str) -> None:
    raise LineageFormatError(f"{where}: {problem}")


def _validate(lin: Lineage, where: str) -> None:
    if lin.version != FORMAT_VERSION:
        _fail(where, f"unsupported lineage format version {lin.version}; this reader supports version {FORMAT_VERSION}")
    m = lin.num_ids
    expected = {"ids": torch.int64, **EVENT_DTYPES}
    for name, dtype in expected.items():
        col = getattr(lin, name)
        if col.dtype != dtype or col.shape != (m,):
            _fail(where, f"event column '{name}' must be {dtype} of shape [{m}], got {col.dtype} {tuple(col.shape)}")
    k = lin.num_snapshots
    for name in ("snapshot_stage", "snapshot_step"):
        col = getattr(lin, name)
        if col.dtype != torch.int64 or col.shape != (k,):
            _fail(where, f"'{name}' must be int64 of shape [{k}], got {col.dtype} {tuple(col.shape)}")
    off = lin.snapshot_offsets
    if off.dtype != torch.int64 or off.shape != (k + 1,):
        _fail(where, f"'snapshot_offsets' must be int64 of shape [{k + 1}], got {off.dtype} {tuple(off.shape)}")
    t = int(lin.snapshot_ids.shape[0])
    if int(off[0]) != 0 or int(off[-1]) != t or bool((off[1:] < off[:-1]).any()):
        _fail(where, f"'snapshot_offsets' must rise from 0 to the {t} snapshot rows, got {off.tolist()}")
    if lin.snapshot_ids.dtype != torch.int64 or lin.snapshot_ids.dim() != 1:
        _fail(where, f"'snapshot_ids' must be 1-D int64, got {lin.snapshot_ids.dtype} {tuple(lin.snapshot_ids.shape)}")
    if lin.snapshot_state.shape != (t, PACKED_DIM) or not lin.snapshot_state.is_floating_point():
        _fail(where, f"'snapshot_state' must be float of shape [{t}, {PACKED_DIM}], got {lin.snapshot_state.dtype} {tuple(lin.snapshot_state.shape)}")
    for name in ("snapshot_grad2d", "snapshot_count"):
        col = getattr(lin, name)
        if col.shape != (t,) or col.dtype != torch.float32:
            _fail(where, f"'{name}' must be float32 of shape [{t}], got {col.dtype} {tuple(col.shape)}")
    for name in ("stage_downscales", "stage_boundaries"):
        col = getattr(lin, name)
        if col.dtype != torch.int64 or col.dim() != 1:
            _fail(where, f"'{name}' must be 1-D int64, got {col.dtype} {tuple(col.shape)}")

    ids = lin.ids
    if m and int(ids[0]) < 0:
        _fail(where, f"negative id {int(ids[0])} in the event table")
    if m > 1:
        step = ids[1:] - ids[:-1]
        if bool((step == 0).any()):
            dup = int(ids[1:][step == 0][0])
            _fail(where, f"duplicate id {dup} in the event table (ids must be unique)")
        if bool((step < 0).any()):
            _fail(where, "event ids are not sorted in increasing order")
    if bool(((lin.birth < SEED) | (lin.birth > SPLIT)).any()):
        _fail(where, f"unknown birth event code (allowed {dict(enumerate(BIRTH_NAMES))})")
    if bool(((lin.death_cause < ALIVE) | (lin.death_cause > SPLIT_REPLACED)).any()):
        _fail(where, f"unknown death cause code (allowed {dict(enumerate(DEATH_NAMES))})")
    seed = lin.birth == SEED
    bad = seed & (lin.parent != -1)
    if bool(bad.any()):
        _fail(where, f"seed id {int(ids[bad][0])} has parent {int(lin.parent[bad][0])}; seeds must have parent -1")
    prow = lin.rows_of(lin.parent)
    bad = ~seed & (prow < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        _fail(where, f"dangling parent: id {int(ids[i])} has parent {int(lin.parent[i])}, which is not in the event table")
    bad = ~seed & (lin.parent >= ids)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        _fail(where, f"id {int(ids[i])} has parent {int(lin.parent[i])}; parents must have smaller ids than children")
    dead = lin.death_cause != ALIVE
    if bool((dead != (lin.death_step >= 0)).any()) or bool((dead != (lin.death_stage >= 0)).any()):
        _fail(where, "death_step / death_stage must be -1 exactly where death_cause is 'alive'")
    bad = dead & (lin.death_step < lin.birth_step)
    if bool(bad.any()):
        _fail(where, f"id {int(ids[bad][0])} dies before it is born")

    stages = lin.snapshot_stage
    if k > 1 and bool((stages[1:] <= stages[:-1]).any()):
        _fail(where, f"snapshot stages must be strictly increasing, got {stages.tolist()}")
    if t:
        srow = lin.rows_of(lin.snapshot_ids)
        if bool((srow < 0).any()):
            _fail(where, f"snapshot id {int(lin.snapshot_ids[srow < 0][0])} is not in the event table")
        for j in range(k):
            a, b = int(off[j]), int(off[j + 1])
            rows = srow[a:b]
            if rows.numel() != rows.unique().numel():
                _fail(where, f"snapshot {j} lists an id twice")
            s = int(lin.snapshot_step[j])
            born_late = lin.birth_step[rows] > s
            died = (lin.death_step[rows] >= 0) & (lin.death_step[rows] < s)
            if bool((born_late | died).any()):
                i = int(lin.snapshot_ids[a:b][born_late | died][0])
                _fail(where, f"snapshot {j} (step {s}) holds id {i}, which is not alive at that step")
        if not bool(torch.isfinite(lin.snapshot_state).all()):
            _fail(where, "snapshot states contain NaN or inf")


def save_lineage(lineage: Lineage, path: Union[str, Path], *, float16: bool = False) -> Path:
    """Validate and atomically write ``lineage`` to ``path`` (``.npz``); returns the path.

    ``float16`` stores the snapshot states in half precision (about half the file size).
    """
    path = Path(path)
    lineage.validate(where=f"refusing to write {path}")
    state = lineage.snapshot_state.float()
    if float16:
        too_big = state.abs().amax(dim=0) > _FLOAT16_MAX if state.shape[0] else torch.zeros(PACKED_DIM, dtype=torch.bool)
        for name, sl in _STATE_FIELDS.items():
            if bool(too_big[sl].any()):
                raise ValueError(f"{path}: snapshot field '{name}' exceeds the float16 range (|x| > {_FLOAT16_MAX}); save with float16=False")
        state = state.half()
    arrays: Dict[str, np.ndarray] = {
        "format_name": np.array(FORMAT_NAME),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "stage_downscales": lineage.stage_downscales.numpy(),
        "stage_boundaries": lineage.stage_boundaries.numpy(),
        "event_id": lineage.ids.numpy(),
    }
    for name in EVENT_DTYPES:
        arrays[f"event_{name}"] = getattr(lineage, name).numpy()
    arrays.update(
        snapshot_stage=lineage.snapshot_stage.numpy(),
        snapshot_step=lineage.snapshot_step.numpy(),
        snapshot_offsets=lineage.snapshot_offsets.numpy(),
        snapshot_ids=lineage.snapshot_ids.numpy(),
        snapshot_state=state.numpy(),
        snapshot_grad2d=lineage.snapshot_grad2d.numpy(),
        snapshot_count=lineage.snapshot_count.numpy(),
    )

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # atomic_write fsyncs the file and its directory

    return atomic_write(path, write)


_REQUIRED = (
    ["format_version", "stage_downscales", "stage_boundaries", "event_id"]
    + [f"event_{n}" for n in EVENT_DTYPES]
    + ["snapshot_stage", "snapshot_step", "snapshot_offsets", "snapshot_ids", "snapshot_state", "snapshot_grad2d", "snapshot_count"]
)


def load_lineage(path: Union[str, Path]) -> Lineage:
    """Read and fully validate a lineage file; raises :class:`LineageFormatError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such lineage file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise LineageFormatError(
            f"{path}: not a readable lineage file (truncated or corrupt zip archive: {exc}); "
            "re-export it from the run's checkpoint or re-run training"
        ) from exc
    if "format_name" in arrays and str(arrays["format_name"]) != FORMAT_NAME:
        _fail(str(path), f"format_name is '{arrays['format_name']}', expected '{FORMAT_NAME}'")
    missing = [name for name in _REQUIRED if name not in arrays]
    if "format_version" in arrays:
        version = arrays["format_version"]
        if version.shape != () or version.dtype.kind not in "iu":
            _fail(str(path), f"'format_version' must be an integer scalar, got {version.dtype} {version.shape}")
        if int(version) != FORMAT_VERSION:
            _fail(str(path), f"unsupported lineage format version {int(version)}; this reader supports version {FORMAT_VERSION}")
    if missing:
        _fail(str(path), f"missing arrays {missing} (not a gvae_ns lineage file, or written by an incompatible version)")
    state = arrays["snapshot_state"]
    if state.dtype not in (np.float16, np.float32):
        _fail(str(path), f"'snapshot_state' must be float16 or float32, got {state.dtype}")
    tensors = {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in arrays.items() if name not in ("format_name", "format_version")}
    kwargs = {"ids": tensors["event_id"]}
    for name in EVENT_DTYPES:
        kwargs[name] = tensors[f"event_{name}"]
    for f in fields(Lineage):
        if f.name.startswith("snapshot_") or f.name.startswith("stage_"):
            kwargs[f.name] = tensors[f.name]
    kwargs["snapshot_state"] = tensors["snapshot_state"].float()
    lineage = Lineage(**kwargs, version=int(arrays["format_version"]), source=path)
    lineage.validate(where=str(path))
    return lineage
