"""Time writing N Gaussians as a 3DGS PLY: gvae-ns' block writer vs nerfstudio 1.1.5's per-value writer.

    .venv/bin/python scripts/bench_ply.py --n 1000000 --reference-n 20000

nerfstudio's writer is timed on ``--reference-n`` rows and scaled linearly (it is a per-value Python loop).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np


def columns(n: int) -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(0)
    names = ["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(45)]
    names += ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    return OrderedDict((k, rng.standard_normal((n, 1)).astype(np.float32)) for k in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--reference-n", type=int, default=20_000)
    args = parser.parse_args()
    from nerfstudio.scripts.exporter import ExportGaussianSplat

    from gvae_ns.ply import write_ply

    with tempfile.TemporaryDirectory() as tmp:
        cols = columns(args.n)
        t = time.perf_counter()
        write_ply(Path(tmp) / "fast.ply", args.n, cols)
        fast = time.perf_counter() - t
        size = (Path(tmp) / "fast.ply").stat().st_size
        ref_cols = columns(args.reference_n)
        t = time.perf_counter()
        ExportGaussianSplat.write_ply(str(Path(tmp) / "ref.ply"), args.reference_n, ref_cols)
        ref = (time.perf_counter() - t) * args.n / args.reference_n
    print(f"gvae-ns write_ply: {args.n} Gaussians in {fast:.2f} s ({size / 2**20:.0f} MiB)")
    print(f"nerfstudio write_ply (from {args.reference_n} rows, scaled): {ref:.1f} s; speed-up {ref / fast:.0f}x")


if __name__ == "__main__":
    main()
