"""Data-parallel training of the cross-scene prior GaussianVAE on many scenes' lineage transitions.

**Shards.** One file per scene (:func:`save_shard` / :func:`load_shard`): the scene's name and its
transition tensors (``history``, ``history_mask``, ``children``, ``children_mask``, ``stage``, and
``log2_px_per_unit`` when it was built with the scene's cameras), a tagged file
(:mod:`gvae_ns.tagged_file`) written atomically and read with ``torch.load(weights_only=True)``.

**Training** (:func:`train_prior`) runs in every process of a ``torch.distributed`` group, or alone:

- rank ``r`` of ``W`` takes the shards ``r, r + W, r + 2W, ...``;
- the history window and the four normalisers' statistics are global: each rank sums the row count, the
  per-feature sum and sum of squares (float64) over its own rows, one ``all_reduce`` adds them up, and mean /
  std follow with :meth:`Normalizer.fit <gvae_ns.vae.model.Normalizer.fit>`'s floor, so the statistics are
  those of all shards' rows together;
- every rank builds the same model (same seed); with ``W > 1`` it is wrapped in
  ``DistributedDataParallel``, which averages the gradients, so the weights stay the same on every rank;
- each rank draws its mini-batches (coarse to fine, as :func:`~gvae_ns.vae.train.train_vae` does) from its
  own rows, with generators seeded by the rank;
- rank 0 writes ``out_dir/checkpoint.pt`` every ``checkpoint_every`` steps and at the end (weights,
  optimiser state, step, every rank's generator and batch-order state, config, losses); a run that finds one
  there resumes from it (every rank reads it) and ends with the weights an uninterrupted run would have.
  ``out_dir`` must be the same directory for every rank (one machine, or a shared file system);
- rank 0 writes the model to ``out_dir/prior.pt`` (:func:`~gvae_ns.vae.file.save_vae`, no provenance).

The model, the batches, the optimisation step and the loop are the per-scene trainer's
(:mod:`gvae_ns.vae.train`); only the data placement, the statistics and the checkpoint are added here.

**Processes.** :func:`process_group` joins the group the environment describes (``torchrun`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL where CUDA is available (device
``cuda:LOCAL_RANK``), else gloo on the CPU; :func:`train_prior` enters it itself, so a script that calls it
can be started by ``torchrun``. :func:`run_distributed` starts ``W`` local processes
(``torch.multiprocessing.spawn``, a free localhost port) and runs a function in each, inside the group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from gvae_ns.console import say
from gvae_ns.lineage.dataset import check_footprints, check_transitions
from gvae_ns.tagged_file import FileFormat, TaggedFileError, digest_config, load_tagged, save_tagged
from gvae_ns.vae.file import save_vae
from gvae_ns.vae.model import GaussianVAE
from gvae_ns.vae.train import (BatchSampler, Progress, VAETrainConfig, clean_transitions, needed_window, new_log,
                               prepare_training, train_steps)

__all__ = ["Shard", "save_shard", "load_shard", "PriorTrainConfig", "train_prior", "moments",
           "statistics_from_moments", "global_statistics", "process_group", "run_distributed", "default_backend"]

CHECKPOINT_NAME = "checkpoint.pt"
"""The checkpoint's file name inside ``out_dir``."""
PRIOR_NAME = "prior.pt"
"""The trained model's file name inside ``out_dir``."""

_SHARD_TENSORS = (("history", "f", 3), ("history_mask", "b", 2), ("children", "f", 3), ("children_mask", "b", 2),
                  ("stage", "i", 1))
_FOOTPRINTS = (("log2_px_per_unit", "f", 1),)  # optional: shards written before footprints lack it
SHARD_FORMAT = FileFormat(
    tag="gvae_ns.prior.shard", version=1, what="prior transition shard",
    keys={"scene": str, **{name: torch.Tensor for name, _, _ in _SHARD_TENSORS}},
    rebuild="build the scene's transitions again and write them with gvae_ns.prior.train.save_shard",
)
CHECKPOINT_FORMAT = FileFormat(
    tag="gvae_ns.prior.checkpoint", version=1, what="prior training checkpoint",
    keys={"config": dict, "config_sha256": str, "step": int, "world_size": int, "scenes": list, "model": dict,
          "optimizer": dict, "ranks": list, "log": dict},
    rebuild="delete it to train from the start",
)


# ---------------------------------------------------------------------------------------------- shards
@dataclass
class Shard:
    """One scene's transitions as :func:`load_shard` reads them (usable wherever a ``TransitionSet`` is)."""

    scene: str
    """The scene's name."""
    history: Tensor
    """``[N, S, 59]`` float ancestor-chain states."""
    history_mask: Tensor
    """``[N, S]`` bool."""
    children: Tensor
    """``[N, C, 59]`` float children one stage later."""
    children_mask: Tensor
    """``[N, C]`` bool."""
    stage: Tensor
    """``[N]`` long parent stage."""
    log2_px_per_unit: Optional[Tensor] = None
    """``[N]`` float pixels per world unit around each parent at its stage's resolution, log2 (``None``: the
    shard was built without the scene's cameras; a prior with ``footprint_context`` cannot train on it)."""

    def __len__(self) -> int:
        return int(self.stage.shape[0])


def save_shard(path: Union[str, os.PathLike], transitions: Any, scene: str) -> Path:
    """Write ``transitions`` (a ``TransitionSet`` or any object with its five tensors, checked as
    :func:`~gvae_ns.lineage.dataset.check_transitions` does) as scene ``scene``'s shard, atomically."""
    if not isinstance(scene, str) or not scene:
        raise ValueError(f"save_shard: scene must be a non-empty string, got {scene!r}")
    tensors = check_transitions(transitions)
    pixels = check_footprints(transitions)
    if pixels is not None:
        tensors = (*tensors, pixels)
    # clone: a slice of a larger set would otherwise save the whole storage it views
    names = [name for name, _, _ in _SHARD_TENSORS + _FOOTPRINTS]
    payload = {name: t.detach().cpu().contiguous().clone() for name, t in zip(names, tensors)}
    return save_tagged(path, SHARD_FORMAT, {"scene": scene, **payload})


def load_shard(path: Union[str, os.PathLike]) -> Shard:
    """Read a shard written by :func:`save_shard`. A missing file raises ``FileNotFoundError``; an unreadable,
    foreign, other-version or malformed one a ``ValueError`` (:class:`~gvae_ns.tagged_file.TaggedFileError`)
    naming the file."""
    loaded = load_tagged(path, SHARD_FORMAT)
    if not loaded.payload["scene"]:
        loaded.fail("'scene' is empty")
    tensors = {name: loaded.tensor(name, ndim=ndim, dtype_kind=kind) for name, kind, ndim in _SHARD_TENSORS}
    tensors.update({name: loaded.tensor(name, ndim=ndim, dtype_kind=kind) for name, kind, ndim in _FOOTPRINTS
                    if name in loaded.payload})
    shard = Shard(scene=loaded.payload["scene"], **tensors)
    with loaded.checking():
        check_transitions(shard)
        check_footprints(shard)
    return shard


# ---------------------------------------------------------------------------------------------- config
@dataclass
class PriorTrainConfig:
    """How to train the prior."""

    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    """Model, optimiser, loss weights, KL and coarse-to-fine schedules and logging, as for one scene (its
    ``steps`` and ``batch_size`` are not used: :attr:`steps` and :attr:`batch_per_rank` replace them)."""
    steps: int = 20000
    """Optimiser steps in total (every rank takes each step together)."""
    batch_per_rank: int = 256
    """Transitions per mini-batch on each rank (capped at the rank's rows); a step sees ``W`` times this."""
    checkpoint_every: int = 500
    """Write the checkpoint every this many steps (0: only at the end); it is always written at the end."""
    seed: int = 0
    """Model initialisation (the same on every rank) and, together with the rank, each rank's batch and
    noise generators."""

    def vae_config(self) -> VAETrainConfig:
        """:attr:`train` with this config's steps and per-rank batch size."""
        return dataclasses.replace(self.train, steps=self.steps, batch_size=self.batch_per_rank)

    def check(self) -> None:
        """``ValueError`` naming the field for a value no run can use."""
        if self.steps < 0:
            raise ValueError(f"PriorTrainConfig.steps: must be >= 0, got {self.steps}")
        if self.batch_per_rank < 1:
            raise ValueError(f"PriorTrainConfig.batch_per_rank: must be >= 1, got {self.batch_per_rank}")
        if self.checkpoint_every < 0:
            raise ValueError(f"PriorTrainConfig.checkpoint_every: must be >= 0, got {self.checkpoint_every}")


# ------------------------------------------------------------------------------------ process group
def default_backend() -> str:
    """``"nccl"`` where CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` in an NCCL group, or alone where CUDA is available; else the CPU."""
    if dist.is_available() and dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
    else:
        nccl = torch.cuda.is_available()
    return torch.device("cuda", _local_rank()) if nccl else torch.device("cpu")


@contextlib.contextmanager
def process_group(backend: Optional[str] = None) -> Iterator[None]:
    """Be inside the process group the environment describes for the duration of the block.

    A group the caller already initialised is used as it is and left alone. Otherwise, where ``WORLD_SIZE``
    is above 1 (``torchrun``, :func:`run_distributed`), the group is initialised from the environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with ``backend`` (default
    :func:`default_backend`; NCCL binds the process to ``cuda:LOCAL_RANK``) and destroyed at the end.
    Otherwise the process runs alone, without a group."""
    owned = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(_local_rank())
        dist.init_process_group(backend=backend)
        owned = True
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _all_reduce(t: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
    """``t`` reduced over the ranks (a copy; ``t`` itself when alone)."""
    if _rank_world()[1] == 1:
        return t
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(comm, copy=True)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def _all_gather(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (pickled; small objects only)."""
    world_size = _rank_world()[1]
    if world_size == 1:
        return [obj]
    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _mean_over_ranks(values: Dict[str, Tensor]) -> Dict[str, Tensor]:
    keys = list(values)
    mean = _all_reduce(torch.stack([values[k].float() for k in keys])) / _rank_world()[1]
    return dict(zip(keys, mean.unbind(0)))


# ------------------------------------------------------------------------------------- statistics
def moments(rows: Tensor) -> Tensor:
    """``[1 + 2 * dim]`` float64: the row count, the per-feature sum and sum of squares of ``rows [M, dim]``.
    Moments of disjoint row sets add up to those of their union."""
    x = rows.detach().to("cpu", torch.float64)
    return torch.cat([x.new_tensor([x.shape[0]]), x.sum(0), x.square().sum(0)])


def statistics_from_moments(m: Tensor, min_std: float) -> Tuple[Tensor, Tensor]:
    """Float32 ``(mean, std)`` from :func:`moments`, as :meth:`Normalizer.fit <gvae_ns.vae.model.Normalizer.fit>`
    gives them (population std floored at ``min_std``; identity without rows, std 1 for one row)."""
    dim = (m.shape[0] - 1) // 2
    count = float(m[0])
    if count == 0:
        return torch.zeros(dim), torch.ones(dim)
    mean = m[1:1 + dim] / count
    if count == 1:
        return mean.float(), torch.ones(dim)
    var = (m[1 + dim:] / count - mean.square()).clamp_min(0.0)
    return mean.float(), var.sqrt().clamp_min(min_std).float()


def global_statistics(rows: Tensor, min_std: float) -> Tuple[Tensor, Tensor]:
    """A :data:`~gvae_ns.vae.train.Statistics` over every rank's ``rows`` (one ``all_reduce``; a collective,
    so every rank calls it in the same order)."""
    return statistics_from_moments(_all_reduce(moments(rows)), min_std)


# ------------------------------------------------------------------------------------- checkpoint
def _refuse(path: Path, problem: str) -> NoReturn:
    raise TaggedFileError(f"{path}: {problem}. Delete it to train from the start, or resume with the config, "
                          "shards and number of processes it was made with.")


def _config_digest(config: PriorTrainConfig) -> str:
    return digest_config(config, exclude=("checkpoint_every",))


def _cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it copied to the CPU (dicts, lists and tuples walked)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


@dataclass
class _Run:
    """What a checkpoint saves and restores."""

    config: PriorTrainConfig
    scenes: List[str]
    vae: GaussianVAE
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    noise: torch.Generator
    log: Dict[str, List[Any]]

    def save(self, path: Path, step: int) -> None:
        """Write the checkpoint at ``step`` (a collective: every rank calls it; rank 0 writes)."""
        ranks = _all_gather({"sampler": self.sampler.state_dict(), "noise": self.noise.get_state()})
        if _rank_world()[0] != 0:
            return
        save_tagged(path, CHECKPOINT_FORMAT, {
            "config": dataclasses.asdict(self.config), "config_sha256": _config_digest(self.config), "step": step,
            "world_size": len(ranks), "scenes": list(self.scenes), "model": _cpu(self.vae.state_dict()),
            "optimizer": _cpu(self.optimizer.state_dict()), "ranks": _cpu(ranks), "log": self.log,
        })

    def restore(self, path: Path) -> int:
        """Continue from the checkpoint at ``path``; returns its step. ``ValueError`` naming the file when it is
        unreadable or was made by another config, other shards or another number of processes."""
        loaded = load_tagged(path, CHECKPOINT_FORMAT)
        data = loaded.payload
        rank, world_size = _rank_world()
        if data["config_sha256"] != _config_digest(self.config):
            _refuse(path, "it was made with another PriorTrainConfig")
        if data["world_size"] != world_size or len(data["ranks"]) != world_size:
            _refuse(path, f"it was made by {data['world_size']} processes, this run has {world_size}")
        if data["scenes"] != self.scenes:
            _refuse(path, f"it was made from the scenes {data['scenes']}, this run has {self.scenes}")
        if not 0 <= data["step"] <= self.config.steps:
            loaded.fail(f"step {data['step']} is outside 0..{self.config.steps}")
        with loaded.checking():
            self.vae.load_state_dict(data["model"], strict=True)
            self.optimizer.load_state_dict(data["optimizer"])
            self.sampler.load_state_dict(data["ranks"][rank]["sampler"])
            self.noise.set_state(data["ranks"][rank]["noise"])
            self.log = {k: list(v) for k, v in data["log"].items()}
        return data["step"]


# ---------------------------------------------------------------------------------------------- training
def _rank_seed(seed: int, rank: int) -> int:
    """The rank's batch-order seed (its noise seed is this + 1)."""
    return seed * 65_537 + 2 * rank


def train_prior(shards: Sequence[Union[str, os.PathLike]], config: Optional[PriorTrainConfig],
                out_dir: Union[str, os.PathLike], device: Union[None, str, torch.device] = None,
                progress: Optional[Progress] = None) -> GaussianVAE:
    """Train the prior on ``shards`` (the same list, in the same order, on every rank) into ``out_dir``; returns
    the model (eval mode, the same on every rank). See the module docstring.

    Runs inside the initialised process group, or enters the one the environment describes
    (:func:`process_group`), or runs alone. ``device``: default ``cuda:LOCAL_RANK`` with NCCL (or alone
    where CUDA is available), else the CPU. ``progress(done, losses)`` is called on rank 0 at every logged
    step with the losses averaged over the ranks. Resumes from ``out_dir/checkpoint.pt`` when it exists."""
    config = config or PriorTrainConfig()
    config.check()
    with process_group():
        return _train([Path(p) for p in shards], config, Path(out_dir), device, progress)


def _train(shards: List[Path], config: PriorTrainConfig, out_dir: Path, device: Union[None, str, torch.device],
           progress: Optional[Progress]) -> GaussianVAE:
    rank, world_size = _rank_world()
    device = _default_device() if device is None else torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # NCCL's object collectives and barrier use the current device
    if len(shards) < world_size:
        raise ValueError(f"train_prior: {len(shards)} shards for {world_size} processes; each needs at least one")
    vcfg = config.vae_config()
    mine = list(range(rank, len(shards), world_size))
    loaded = [load_shard(shards[i]) for i in mine]
    sets = [clean_transitions(shard, vcfg.model.max_children) for shard in loaded]
    for shard, clean in zip(loaded, sets):
        if clean.dropped:
            warnings.warn(f"train_prior: scene {shard.scene!r}: {clean.dropped} children beyond max_children="
                          f"{vcfg.model.max_children} slots were dropped", stacklevel=2)
    scenes: List[str] = [""] * len(shards)
    for part in _all_gather([(i, shard.scene) for i, shard in zip(mine, loaded)]):
        for i, scene in part:
            scenes[i] = scene

    local_window = max(needed_window(clean, vcfg.model.max_history) for clean in sets)
    window = int(_all_reduce(torch.tensor(local_window), dist.ReduceOp.MAX))
    vae, data = prepare_training(sets, vcfg, window, config.seed, device, statistics=global_statistics)
    del loaded, sets
    multi_stage = bool(_all_reduce(torch.tensor(int(data.multi_stage)), dist.ReduceOp.MAX))
    coarse_steps = int(round(vcfg.coarse_fraction * vcfg.steps)) if multi_stage else 0
    seed = _rank_seed(config.seed, rank)
    run = _Run(config=config, scenes=scenes, vae=vae,
               optimizer=torch.optim.Adam(vae.parameters(), lr=vcfg.lr, weight_decay=vcfg.weight_decay),
               sampler=BatchSampler(data.coarse, coarse_steps, vcfg.batch_size, seed),
               noise=torch.Generator(device=device).manual_seed(seed + 1), log=new_log())
    checkpoint = out_dir / CHECKPOINT_NAME
    step = 0
    if checkpoint.exists():
        step = run.restore(checkpoint)
        if rank == 0:
            say(f"train_prior: resuming from {checkpoint} at step {step} of {config.steps}")

    model = vae
    if world_size > 1:
        model = DistributedDataParallel(vae, device_ids=[device.index] if device.type == "cuda" else None)
    reduce = _mean_over_ranks if world_size > 1 else None
    every = config.checkpoint_every
    while step < config.steps:
        end = config.steps if every == 0 else min(config.steps, (step // every + 1) * every)
        train_steps(model, run.optimizer, data, run.sampler, run.noise, vcfg, range(step, end), run.log,
                    progress if rank == 0 else None, reduce, name="train_prior")
        step = end
        if step < config.steps:
            run.save(checkpoint, step)
    run.save(checkpoint, step)
    vae.eval()
    if rank == 0:
        path = save_vae(vae, out_dir / PRIOR_NAME, provenance=None)
        say(f"train_prior: {config.steps} steps on {len(shards)} scenes, {world_size} process(es); wrote {path}")
    if world_size > 1:
        dist.barrier()
    return vae


# ---------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, fn: Callable[..., Any], world_size: int, backend: str, port: int, args: Tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    with process_group(backend):
        fn(*args)


def run_distributed(fn: Callable[..., Any], world_size: int, backend: Optional[str] = None,
                    args: Sequence[Any] = ()) -> None:
    """Run ``fn(*args)`` in ``world_size`` new local processes (``torch.multiprocessing.spawn``), each inside
    the process group (:func:`process_group`; rank = local rank = the process's index, a free localhost
    port). ``backend``: default :func:`default_backend` (NCCL needs a GPU per process). ``fn`` and ``args``
    must be picklable (``fn`` a module-level function). Returns when every process has finished; an
    exception in one stops the others and is raised here
    (``torch.multiprocessing.ProcessRaisedException``)."""
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    mp.spawn(_worker, args=(fn, world_size, backend or default_backend(), _free_port(), tuple(args)),
             nprocs=world_size, join=True)
