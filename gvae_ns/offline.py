"""Running without network access: checkpoint loading and optional LPIPS.

* nerfstudio 1.1.5 checkpoints hold numpy scalars (scheduler state), which PyTorch >= 2.6 rejects under its
  default ``weights_only=True`` load. :func:`to_weights_only_safe` converts a checkpoint dict to plain Python
  and tensors before it is written, so stock ``ns-viewer`` / ``ns-export`` / ``ns-eval`` load ours as they
  are. :func:`allow_numpy_scalars` registers numpy's scalar types as safe globals, so checkpoints written
  before that conversion still load.
* torchmetrics' LPIPS downloads AlexNet weights when it is built. :func:`make_lpips` builds it only when
  those weights are already on disk, and otherwise warns once and returns ``None``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
_warned_lpips = False


def to_weights_only_safe(obj: Any) -> Any:
    """Recursively replace numpy scalars and arrays with Python numbers and tensors."""
    if isinstance(obj, dict):
        return {k: to_weights_only_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_weights_only_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_weights_only_safe(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    return obj


def allow_numpy_scalars() -> None:
    """Let ``torch.load(weights_only=True)`` accept numpy scalars (older nerfstudio checkpoints)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:
        return
    safe = [np.dtype, np.core.multiarray.scalar] if hasattr(np, "core") else [np.dtype]
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    try:
        add(safe)
    except Exception:  # an older torch without these hooks: nothing to register
        pass


def lpips_weights_available() -> bool:
    """Whether torchvision's AlexNet weights (what LPIPS needs) are already in the torch hub cache."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS).is_file()


def make_lpips(lpips_class: Any = None) -> Optional[torch.nn.Module]:
    """torchmetrics' LPIPS (or ``lpips_class``) when its weights are on disk, else ``None`` (warns once)."""
    global _warned_lpips
    if lpips_weights_available():
        if lpips_class is None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity as lpips_class
        return lpips_class(normalize=True)
    if not _warned_lpips:
        logging.getLogger("gvae_ns").warning(
            "LPIPS is left out: its AlexNet weights (%s) are not in %s/checkpoints and nothing is downloaded.",
            ALEXNET_WEIGHTS, torch.hub.get_dir(),
        )
        _warned_lpips = True
    return None
