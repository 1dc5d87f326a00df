"""Atomic file writes: write a temporary file beside the target, then rename it into place.

A crash or an error mid-write leaves the previous file (or none), never a half-written one: the temporary
file is flushed to disk (``fsync``) before the rename, and the directory after it, so a power cut cannot
leave a renamed but empty file either.

``GVAE_STALL_WRITE=<file name>[@k]`` (for fault-injection tests only) makes the k-th write (default: every
write) of that file in this process pause for ``GVAE_STALL_SECONDS`` (default 60) after its temporary file is
complete and before the rename, so a test can kill the process mid-write.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

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
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        _stall_if_asked(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_writes_seen: Dict[str, int] = {}


def _stall_if_asked(path: Path) -> None:
    name, _, nth = os.environ.get("GVAE_STALL_WRITE", "").partition("@")
    if name != path.name:
        return
    _writes_seen[name] = _writes_seen.get(name, 0) + 1
    if not nth or int(nth) == _writes_seen[name]:
        time.sleep(float(os.environ.get("GVAE_STALL_SECONDS", "60")))


def torch_save_atomic(obj: Any, path: Union[str, Path], tmp_dir: Optional[Path] = None) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), tmp_dir)
