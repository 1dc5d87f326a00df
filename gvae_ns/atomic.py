"""Atomic file writes: write a temporary file beside the target, then rename it into place.

A crash or an error mid-write leaves the previous file (or none), never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: Union[str, Path], write: Callable[[str], None], tmp_dir: Optional[Path] = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` (or in ``tmp_dir``, on the same file
    system), then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def torch_save_atomic(obj: Any, path: Union[str, Path], tmp_dir: Optional[Path] = None) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), tmp_dir)
