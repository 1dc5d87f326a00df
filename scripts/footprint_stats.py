"""How large the Gaussians are in pixels, in a trained run and in a prior's training corpus.

    .venv/bin/python scripts/footprint_stats.py --run outputs/<run>/config.yml --shards outputs/prior/shards

For a run: every stage snapshot of its lineage, at that stage's resolution. For shards (gvae-pretrain
``--out``'s ``shards/``, built with footprints): every transition's parent, by the stage it closes. Each row
gives quantiles of the log2 pixel length of a Gaussian's largest axis (:mod:`gvae_ns.footprint`); a prior
reads that length only where its corpus covered it, so the two tables show whether a run is in the corpus's
range.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Iterable

import torch
import yaml
from torch import Tensor

from gvae_ns.footprint import log2_pixels_per_unit
from gvae_ns.gaussians import MEANS, SCALES
from gvae_ns.lineage.dataset import snapshot_downscale
from gvae_ns.lineage.format import load_lineage
from gvae_ns.prior.train import load_shard
from gvae_ns.run_layout import RunLayout
from gvae_ns.vae.features import newest_index

QUANTILES = (0.1, 0.5, 0.9)


def row(label: str, sizes: Tensor) -> str:
    q = torch.quantile(sizes.float(), torch.tensor(QUANTILES)).tolist()
    return f"| {label} | {sizes.numel()} | " + " | ".join(f"{v:.2f}" for v in q) + " |"


def header(title: str) -> Iterable[str]:
    yield f"| {title} | Gaussians | " + " | ".join(f"q{int(q * 100)}" for q in QUANTILES) + " |"
    yield "|---|--:|" + "--:|" * len(QUANTILES)


def run_table(config_path: Path) -> Iterable[str]:
    config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    cameras = config.pipeline.datamanager.dataparser.setup().get_dataparser_outputs("train").cameras
    lineage = load_lineage(RunLayout.of_config(config_path).lineage)
    yield from header(f"{config_path.parent.name}: snapshot (px)")
    for k in range(lineage.snapshot_stage.numel()):
        state = lineage.snapshot(k).state
        downscale = snapshot_downscale(lineage, k)
        pixels = log2_pixels_per_unit(state[:, MEANS], cameras, downscale)
        width = int(cameras.width[0]) / downscale
        yield row(f"{k} ({width:.0f})", pixels + state[:, SCALES].amax(dim=1) / math.log(2.0))


def shard_table(shard_dir: Path) -> Iterable[str]:
    by_stage = {}
    for path in sorted(shard_dir.glob("*.pt")):
        shard = load_shard(path)
        if shard.log2_px_per_unit is None:
            raise SystemExit(f"{path}: this shard has no footprints (built before them); run gvae-pretrain again")
        newest = newest_index(shard.history_mask)
        state = shard.history[torch.arange(newest.numel()), newest]
        sizes = shard.log2_px_per_unit + state[:, SCALES].amax(dim=1) / math.log(2.0)
        for stage in shard.stage.unique().tolist():
            by_stage.setdefault(stage, []).append(sizes[shard.stage == stage])
    if not by_stage:
        raise SystemExit(f"{shard_dir}: no *.pt shards")
    yield from header(f"{shard_dir}: parents closing stage")
    for stage in sorted(by_stage):
        yield row(str(stage), torch.cat(by_stage[stage]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a gaussianvae run's config.yml")
    parser.add_argument("--shards", type=Path, help="a gvae-pretrain output's shards/ folder")
    args = parser.parse_args()
    if args.run is None and args.shards is None:
        parser.error("give --run, --shards or both")
    for table in ([run_table(args.run)] if args.run else []) + ([shard_table(args.shards)] if args.shards else []):
        print("\n".join(table) + "\n", flush=True)


if __name__ == "__main__":
    main()
