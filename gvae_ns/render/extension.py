"""Build-on-first-use and ctypes loading of the compiled CPU rasterizer, ``gvae_ns/csrc/rasterize_cpu.cpp``.

The C++ file has a plain C interface and includes no PyTorch header, so building it is one
``g++ -O3 -fopenmp -shared`` call of a few seconds (a ``torch.utils.cpp_extension`` build spends a
minute of CPU on PyTorch's headers alone on the 2-core machine) and needs no ninja. It is built on
first use into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions/gvae_ns_rasterize_cpu``), under a name hashing the source and the flags,
so later processes load it at once and an edited source rebuilds. No ``-march=native``: a cached
build stays valid on any x86-64 machine sharing the cache. ``$CXX`` chooses the compiler (default
``g++``). :func:`load_extension` returns None, with the reason in :func:`build_error`, when it
cannot be built; :mod:`gvae_ns.render.compiled` wraps the library's functions for autograd.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

SOURCE = Path(__file__).parent.parent / "csrc" / "rasterize_cpu.cpp"
"""The C++ source (shipped as package data of ``gvae_ns``)."""
CXXFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ABI_VERSION = 1

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def build_dir() -> Path:
    """Where the compiled library is cached."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root) / "gvae_ns_rasterize_cpu"


def _compile() -> Path:
    """Path of the shared library for the current source, compiling it if it is not cached."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler: install g++ (Debian: apt-get install g++) or set $CXX")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((cxx, *CXXFLAGS, platform.machine())).encode())
    lib = build_dir() / f"rasterize_cpu_{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.stem}.{os.getpid()}.tmp.so")  # concurrent builders each rename their own
    cmd = [cxx, *CXXFLAGS, str(SOURCE), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # the status is read below
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{cxx} failed ({proc.returncode}): {tail}")
    os.replace(tmp, lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    i, d, p = ctypes.c_int, ctypes.c_double, ctypes.c_void_p
    geom = [i] * 7  # dbl, C, N, W, H, tile_size, threads
    lib.gvr_count_pairs.argtypes = geom + [p] * 4 + [d, p, p]
    lib.gvr_fill_bins.argtypes = geom + [p] * 5 + [d] + [p] * 4
    lib.gvr_forward.argtypes = geom + [i] + [p] * 6 + [d] * 3 + [p] * 3
    lib.gvr_backward.argtypes = geom + [i] + [p] * 8 + [d] * 3 + [p] * 6
    lib.gvr_sh_forward.argtypes = [i] * 7 + [p] * 3
    lib.gvr_sh_backward.argtypes = [i] * 7 + [p] * 5
    for fn in (lib.gvr_count_pairs, lib.gvr_fill_bins, lib.gvr_forward, lib.gvr_backward, lib.gvr_abi_version,
               lib.gvr_sh_forward, lib.gvr_sh_backward):
        fn.restype = i


def load_extension() -> ctypes.CDLL | None:
    """The compiled library (built on first call, then cached), or None when it cannot be built."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                lib = ctypes.CDLL(str(_compile()))
                _declare(lib)
                if lib.gvr_abi_version() != ABI_VERSION:
                    raise RuntimeError(f"library ABI {lib.gvr_abi_version()} != {ABI_VERSION}")
                _lib = lib
            except Exception as exc:  # noqa: BLE001  (no compiler, a failed build, a bad library: callers fall back)
                _error = f"{type(exc).__name__}: {exc}"
        return _lib


def build_error() -> str | None:
    """Why :func:`load_extension` returned None (None if it has not failed)."""
    return _error
