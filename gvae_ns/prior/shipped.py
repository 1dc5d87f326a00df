"""The cross-scene prior that ships inside the package: its weights file and the manifest that vouches for it.

``gvae_ns/prior/weights/`` holds ``prior.pt`` (a GaussianVAE file of :mod:`gvae_ns.vae.file`, read with
``torch.load(weights_only=True)``, no provenance: it belongs to no run) and ``manifest.json``:

============================  ==========================================================================
key                           what
============================  ==========================================================================
``file``                      the weights file's name (``prior.pt``)
``sha256``, ``bytes``         its digest and size; a file that does not match is refused
``command``                   the ``gvae-pretrain`` command line that made it
``scene_seeds``               the procedural scenes (``gvae-synthetic --scene-seed``) it was trained on
``transitions``, ``steps``    training-set size and optimiser steps
``world_size``, ``backend``   the ``torch.distributed`` run that trained it
``wall_s``, ``date``          how long it took (scene generation and training included) and when
``machine``                   where (e.g. "2-core CPU")
============================  ==========================================================================

:func:`write_shipped` writes both (the weights first, the manifest last, each atomically), so a crash never
leaves a manifest describing other weights. :func:`load_shipped` checks size, digest and format before any
weight is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from gvae_ns.atomic import atomic_write
from gvae_ns.vae.file import load_vae, save_vae
from gvae_ns.vae.model import GaussianVAE

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
"""Where the package keeps its prior."""
WEIGHTS_FILE = "prior.pt"
MANIFEST_FILE = "manifest.json"
MAX_BYTES = 2 * 1024 * 1024
"""Size cap of the shipped weights (the GaussianVAE paper's model size, about 2 MB)."""
MANIFEST_KEYS = ("file", "sha256", "bytes", "command", "scene_seeds", "transitions", "steps", "world_size",
                 "backend", "wall_s", "date", "machine")
"""Keys every manifest has (see the module docstring)."""
REBUILD = "make it again with gvae-pretrain (see the README), or refine with another --decoder"


class PriorUnavailable(FileNotFoundError):
    """No usable shipped prior: missing, or its files disagree. The message names the file and the fix."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: Union[str, Path] = SHIPPED_DIR) -> Dict[str, Any]:
    """The manifest of the prior in ``directory``; :class:`PriorUnavailable` when it is missing or incomplete."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise PriorUnavailable(f"{path}: no cross-scene prior is installed here; {REBUILD}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PriorUnavailable(f"{path}: not a readable manifest ({err}); {REBUILD}.") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise PriorUnavailable(f"{path}: the manifest lacks {missing}; {REBUILD}.")
    return manifest


def load_shipped(device: Union[str, torch.device] = "cpu",
                 directory: Union[str, Path] = SHIPPED_DIR) -> GaussianVAE:
    """The prior in ``directory`` (eval mode) after checking it against its manifest (name, size, sha256)."""
    manifest = read_manifest(directory)
    weights = Path(directory) / str(manifest["file"])
    if not weights.is_file():
        raise PriorUnavailable(f"{weights}: the manifest names it but it is missing; {REBUILD}.")
    size, digest = weights.stat().st_size, sha256_of(weights)
    if size != manifest["bytes"] or digest != manifest["sha256"]:
        raise PriorUnavailable(f"{weights}: {size} bytes with sha256 {digest[:12]}..., but the manifest says "
                               f"{manifest['bytes']} bytes, {str(manifest['sha256'])[:12]}...; {REBUILD}.")
    return load_vae(weights, map_location=device, expected=None, rebuild=REBUILD)


def write_shipped(vae: GaussianVAE, directory: Union[str, Path], facts: Dict[str, Any],
                  max_bytes: Optional[int] = MAX_BYTES) -> Dict[str, Any]:
    """Write ``vae`` and its manifest into ``directory``; ``facts`` holds every manifest key but the file's
    own (``file``, ``sha256``, ``bytes``). ``ValueError`` (and no manifest) when the weights exceed
    ``max_bytes``. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    missing = [k for k in MANIFEST_KEYS if k not in ("file", "sha256", "bytes") and k not in facts]
    if missing:
        raise ValueError(f"write_shipped: the manifest facts lack {missing}")
    staged = save_vae(vae.cpu(), directory / f".{WEIGHTS_FILE}.new", provenance=None)
    size = staged.stat().st_size
    if max_bytes is not None and size > max_bytes:
        staged.unlink()
        raise ValueError(f"{directory / WEIGHTS_FILE}: {size} bytes, over the {max_bytes}-byte cap of a shipped "
                         "prior; make the model smaller (its widths, layers or latent sizes)")
    weights = staged.replace(directory / WEIGHTS_FILE)
    manifest = {"file": WEIGHTS_FILE, "sha256": sha256_of(weights), "bytes": size, **facts}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(directory / MANIFEST_FILE, write)
    return manifest
