"""Score a trained gaussianvae run on its test views at full resolution: unrefined, then +k per selection.

    .venv/bin/python scripts/eval_refinement.py outputs/synthetic/gaussianvae/<timestamp>/config.yml --stages 1 2

Reuses the run's decoder file (vae.pt for the default --decoder temporal) when it was trained on this checkpoint
(trains one if missing; --decoder prior uses the package's shipped prior); each row is what
gvae-refine makes with --no-compare-with-finetune-only (proposals, then the sub-pixel fine-tune kept only if the
held-out loss does not rise; the fine-tune-only control is a row too), and a line says which of the decoder's
row and the control gvae-refine keeps by default (the lower held-out loss); renders with the model's own code,
like gvae-bench.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gvae_ns.bench.evaluate import evaluate_pipeline, load_pipeline
from gvae_ns.refine.cli import RefineConfig, build_refiner, finetune_checked, keep_the_better, load_refiner
from gvae_ns.refine.cli import load_pipeline as load_val_pipeline
from gvae_ns.refine.finetune import finetune_strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the run's config.yml")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="extrapolation stages to score")
    parser.add_argument("--selects", nargs="+", default=["hessian", "all"], help="selections to score")
    parser.add_argument("--finetune-steps", type=int, default=RefineConfig.finetune_steps,
                        help="fine-tune steps of every row (0: the proposals alone)")
    parser.add_argument("--temperature", type=float, default=RefineConfig.temperature,
                        help="latent noise of the VAE's draws (0: the prior's mean; 1: the draws before 2026-12-02)")
    parser.add_argument("--finetune-densify", action="store_true", help="densify during the fine-tune")
    parser.add_argument("--decoder", default=RefineConfig.decoder,
                        help="decoder of the refined rows (gvae-refine --decoder; e.g. prior, the shipped prior)")
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
    config = RefineConfig(load_config=args.config, finetune_steps=args.finetune_steps, temperature=args.temperature,
                          finetune_densify=args.finetune_densify, decoder=args.decoder)
    # the held-out check uses the run's val split, as gvae-refine does; this pipeline holds the scored test split
    val_dm = load_val_pipeline(config)[0].datamanager
    held_out = model.scoring_views(val_dm.eval_dataset.cameras, [d["image"] for d in val_dm.cached_eval])
    run = model.run_state()
    refiner = build_refiner(config, run, views)
    controls = load_refiner(run, refiner.scores, "none", config.fraction)

    def refined(source, k: int, select: str):
        refinement, loss = source.refine(k, select), None
        if args.finetune_steps > 0:
            strategy = finetune_strategy(model.strategy, config.finetune_steps) if config.finetune_densify else None
            refinement, loss = finetune_checked(config, run, refinement, views, held_out, strategy=strategy)
        print(f"|   ({refinement.describe()}) | | | |", flush=True)
        return refinement, loss

    control_of = {}
    for k in args.stages:
        control_of[k] = refined(controls, k, "hessian")
        model.show_refinement(control_of[k][0])
        report(f"control: fine-tune only at +{k}")
    for select in args.selects:
        for k in args.stages:
            refinement, loss = refined(refiner, k, select)
            model.show_refinement(refinement)
            report(f"{select} +{k} ({args.decoder})")
            if loss is not None and control_of[k][1] is not None and args.decoder != "none":
                # what gvae-refine writes by default: the one of the two with the lower held-out loss
                chosen = keep_the_better(refinement, loss, *control_of[k])
                print(f"|   gvae-refine's default at {select} +{k}: the "
                      f"{'fine-tune alone' if chosen is not refinement else args.decoder + ' row'} | | | |", flush=True)


if __name__ == "__main__":
    main()
