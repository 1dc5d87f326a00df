"""Score a trained gaussianvae run on its test views at full resolution: unrefined, then +k per selection.

    .venv/bin/python scripts/eval_refinement.py outputs/synthetic/gaussianvae/<timestamp>/config.yml --stages 1 2

Reuses the run's vae.pt when it was trained on this checkpoint (trains one if missing); renders with the model's own code, like gvae-bench.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gvae_ns.bench.evaluate import evaluate_pipeline, load_pipeline
from gvae_ns.refine.cli import RefineConfig, build_refiner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the run's config.yml")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="extrapolation stages to score")
    parser.add_argument("--selects", nargs="+", default=["hessian", "all"], help="selections to score")
    args = parser.parse_args()
    pipeline = load_pipeline(args.config)
    model = pipeline.model
    model.eval()

    def report(label: str) -> None:
        r = evaluate_pipeline(pipeline, lpips=False, brisque=False)
        print(f"| {label} | {r['psnr']:.2f} | {r['ssim']:.4f} | {model.num_points} |", flush=True)

    print(f"| {args.config.parent.name} | PSNR | SSIM | Gaussians |\n|---|--:|--:|--:|")
    model.set_refinement(None)
    report("trained, no refinement")
    dm = pipeline.datamanager
    views = model.scoring_views(dm.train_dataset.cameras, [d["image"] for d in dm.cached_train])
    refiner = build_refiner(RefineConfig(load_config=args.config), model.run_state(), views)
    for select in args.selects:
        for k in args.stages:
            model.show_refinement(refiner.refine(k, select))
            report(f"{select} +{k}")


if __name__ == "__main__":
    main()
