"""Running without network access: checkpoint loading and optional LPIPS.

* nerfstudio 1.1.5 checkpoints hold numpy scalars (scheduler state), which PyTorch >= 2.6 rejects under its
  default ``weights_only=True`` load. :func:`to_weights_only_safe` converts a checkpoint dict to plain Python
  and tensors before it is written, so stock ``ns-viewer`` / ``ns-export`` / ``ns-eval`` load ours as they
  are. Stock splatfacto checkpoints (numpy scalars inside) load weights-only too, inside
  :func:`stock_checkpoint_loading`, which allows exactly the numpy globals they hold and only while it is open.
* torchmetrics' LPIPS downloads AlexNet weights when it is built. :func:`make_lpips` builds it only when
  those weights are already on disk, and otherwise warns once and returns ``None``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, List, Optional

import numpy as np
import torch
import torchmetrics
import torchmetrics.image.lpip as lpip_module

from gvae_ns.console import say

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


def stock_checkpoint_globals() -> List[Any]:
    """The non-tensor globals stock nerfstudio 1.1.5 checkpoints hold: numpy scalars (in the schedulers'
    ``_last_lr``), i.e. numpy's scalar reconstructor, ``numpy.dtype`` and the float64 dtype class (what
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` and a load of one report)."""
    multiarray = np.core.multiarray if hasattr(np, "core") else np._core.multiarray
    return [multiarray.scalar, np.dtype, type(np.dtype("float64"))]


@contextlib.contextmanager
def stock_checkpoint_loading() -> Iterator[None]:
    """While open, ``torch.load(weights_only=True)`` also accepts :func:`stock_checkpoint_globals` and nothing
    else: how a stock splatfacto checkpoint is read without turning weights-only loading off."""
    with torch.serialization.safe_globals(stock_checkpoint_globals()):
        yield


def lpips_weights_available() -> bool:
    """Whether LPIPS (AlexNet) can be built without a download: torchvision's ImageNet AlexNet checkpoint
    (:data:`ALEXNET_WEIGHTS`) in the torch hub cache and torchmetrics' bundled linear-layer weights."""
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    linear = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "alex.pth"
    return backbone.is_file() and linear.is_file()


def make_lpips(lpips_class: Any = None) -> Optional[torch.nn.Module]:
    """torchmetrics' LPIPS (or ``lpips_class``) when its weights are on disk, else ``None`` (warns once)."""
    global _warned_lpips
    if lpips_weights_available():
        return (lpips_class or lpip_module.LearnedPerceptualImagePatchSimilarity)(normalize=True)
    if not _warned_lpips:
        say(f"LPIPS is left out: its AlexNet weights ({ALEXNET_WEIGHTS}) are not in {torch.hub.get_dir()}/checkpoints "
            "and nothing is downloaded.", style="yellow")
        _warned_lpips = True
    return None


@contextlib.contextmanager
def lpips_only_offline() -> Iterator[None]:
    """While splatfacto builds its metrics (``populate_modules``), build LPIPS only if its weights are on disk
    (else ``None``, with one message): splatfacto would download AlexNet."""
    original = lpip_module.LearnedPerceptualImagePatchSimilarity
    lpip_module.LearnedPerceptualImagePatchSimilarity = lambda **_: make_lpips(original)  # type: ignore
    try:
        yield
    finally:
        lpip_module.LearnedPerceptualImagePatchSimilarity = original
