"""Lineage of every Gaussian: recording during training, the on-disk file, tensors for the VAE.

* :mod:`~gvae_ns.lineage.recorder`: ``LineageStrategy`` (gsplat ``DefaultStrategy`` + ids) and ``LineageRecorder``.
* :mod:`~gvae_ns.lineage.format`: ``lineage.npz`` (versioned, validated) and the in-memory ``Lineage``.
* :mod:`~gvae_ns.lineage.dataset`: stage transitions and ancestor histories as tensors.
* :mod:`~gvae_ns.lineage.report`: the ``gvae-lineage`` summary CLI.
"""

from gvae_ns.lineage.dataset import (
    TransitionSet,
    ancestor_rows,
    build_transitions,
    depths,
    final_histories,
    transition_pairs,
)
from gvae_ns.lineage.format import (
    ALIVE,
    CLONE,
    FORMAT_VERSION,
    PRUNED,
    SEED,
    SPLIT,
    SPLIT_REPLACED,
    Lineage,
    LineageFormatError,
    Snapshot,
    load_lineage,
    save_lineage,
)
from gvae_ns.lineage.recorder import ID_KEY, LineageRecorder, LineageStrategy

__all__ = [
    "ALIVE",
    "CLONE",
    "FORMAT_VERSION",
    "ID_KEY",
    "PRUNED",
    "SEED",
    "SPLIT",
    "SPLIT_REPLACED",
    "Lineage",
    "LineageFormatError",
    "LineageRecorder",
    "LineageStrategy",
    "Snapshot",
    "TransitionSet",
    "ancestor_rows",
    "build_transitions",
    "depths",
    "final_histories",
    "load_lineage",
    "save_lineage",
    "transition_pairs",
]
