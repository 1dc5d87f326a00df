"""``gvae-bench``: the loop over runs and rows, and the command line."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from gvae_ns.bench.config import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RESUME,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    BenchConfig,
    BenchError,
    RowSpec,
    check_config,
    fingerprint,
    load_suite,
)
from gvae_ns.bench.evaluate import (
    attach_refinement,
    evaluate_pipeline,
    free_memory,
    load_pipeline,
)
from gvae_ns.bench.plan import baseline_steps, plan, prepare_data
from gvae_ns.bench.refine import refine_row, refined, refinement_path
from gvae_ns.bench.report import environment, render_path, slug_path, write_reports
from gvae_ns.bench.train import Budget, train_all
from gvae_ns.console import say
from gvae_ns.datasets import read_json, write_json


# ------------------------------------------------------------------------------------------------- the loop
EVAL_METHOD = 2
"""Bumped when what a row's evaluation computes changes (2: test views not divisible by the training factor are
cropped to it and scored at the training resolution, instead of left out), so older rows are scored again."""


def _row_fingerprint(cfg: BenchConfig, row: RowSpec, run_record: dict, refine_record: Optional[dict]) -> str:
    """What a row's result depends on: the run (and when it finished), the refinement (and when it was made)
    and the evaluation settings; a run or refinement made again invalidates the row."""
    return fingerprint({"run": [run_record.get("fingerprint"), run_record.get("finished_at")],
                         "refine": [row.extrapolate_stages, row.refine_select],
                         "refine_fp": [refine_record.get("fingerprint"), refine_record.get("made_at")]
                         if refine_record else None,
                         "eval": [cfg.max_test_views, cfg.chamfer_opacity, cfg.figure_view, cfg.lpips, cfg.brisque,
                                  cfg.score_at_train_resolution, EVAL_METHOD]})


def _row_entry(row: RowSpec, status: str, **extra: Any) -> Dict[str, Any]:
    entry = {"name": row.name, "label": row.label, "kind": row.kind, "factor": row.factor, "run": row.run,
             "extrapolate_stages": row.extrapolate_stages, "refine_select": row.refine_select,
             "refine_decoder": row.refine_decoder, "status": status, "metrics": {}}
    entry.update(extra)
    return entry


def run_bench(cfg: BenchConfig, log=say) -> Dict[str, Any]:
    """Run (or resume) the whole benchmark and write its reports; returns the results dict."""
    check_config(cfg)
    out = cfg.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(cfg.time_budget_s)
    data, lowres, about = prepare_data(cfg, log)
    runs, rows = plan(cfg, data, lowres)
    points_file = data / "points_gt.npy"
    points = np.load(points_file) if points_file.is_file() else None

    train_records = train_all(cfg, runs, budget, log)
    refine_records: Dict[str, dict] = {}
    refine_errors: Dict[str, str] = {}
    for row in rows:
        run_record = train_records.get(row.run)
        if row.extrapolate_stages is None or not run_record or run_record.get("status") != "ok":
            continue
        done = refined(cfg, row, run_record)
        if done is not None:
            refine_records[row.name] = done
            continue
        if not budget.allows(cfg.refine_estimate_s):
            continue
        log(f"[refine] {row.name}: +{row.extrapolate_stages} ({row.refine_select})")
        try:
            refine_records[row.name] = refine_row(cfg, row, run_record)
            log(f"[refine] {row.name}: {refine_records[row.name]['refine_s']:.1f} s")
        except Exception as err:  # one failed refinement must not stop the other rows
            refine_errors[row.name] = f"refinement failed: {type(err).__name__}: {err}"
            log(f"[refine] {row.name}: FAILED ({refine_errors[row.name]})")
        free_memory()

    entries: Dict[str, Dict[str, Any]] = {}
    to_eval: Dict[str, List[RowSpec]] = {}
    for row in rows:
        run_record = train_records.get(row.run)
        if run_record is None:
            entries[row.name] = _row_entry(row, "pending", error="not trained yet (time budget)")
            continue
        if run_record.get("status") != "ok":
            entries[row.name] = _row_entry(row, "failed", error=f"training failed: {run_record.get('error')}")
            continue
        if row.name in refine_errors:
            entries[row.name] = _row_entry(row, "failed", error=refine_errors[row.name])
            continue
        if row.extrapolate_stages is not None and row.name not in refine_records:
            entries[row.name] = _row_entry(row, "pending", error="not refined yet (time budget)")
            continue
        saved = read_json(slug_path(out, row.name))
        row_fp = _row_fingerprint(cfg, row, run_record, refine_records.get(row.name))
        if saved and saved.get("status") == "ok" and saved.get("fingerprint") == row_fp:
            log(f"[skip] {row.name}: evaluated already")
            entries[row.name] = {**saved, "label": row.label}  # labels follow the code, results the fingerprints
            continue
        to_eval.setdefault(row.run, []).append(row)

    for run_name, group in to_eval.items():
        if not budget.allows(cfg.eval_estimate_s):
            for row in group:
                entries[row.name] = _row_entry(row, "pending", error="not evaluated yet (time budget)")
            continue
        run_record = train_records[run_name]
        try:
            pipeline = load_pipeline(Path(run_record["config"]))
        except Exception as err:
            for row in group:
                entries[row.name] = _row_entry(row, "failed", error=f"loading the run failed: {err}")
            continue
        for row in group:
            log(f"[eval] {row.name}")
            refine_record = refine_records.get(row.name)
            try:
                counts = attach_refinement(pipeline.model,
                                           refinement_path(out, row) if row.extrapolate_stages is not None else None)
                metrics = evaluate_pipeline(
                    pipeline, points_gt=points, max_views=cfg.max_test_views, chamfer_opacity=cfg.chamfer_opacity,
                    save_view=cfg.figure_view, save_to=render_path(out, row.name),
                    gt_to=out / "renders" / "gt.png", lpips=cfg.lpips, brisque=cfg.brisque,
                    train_factor=row.factor if cfg.score_at_train_resolution else None,
                )
                metrics.update(counts)
            except Exception as err:  # keep going: the table lists the failure
                entries[row.name] = _row_entry(row, "failed", error=f"evaluation failed: {type(err).__name__}: {err}")
                log(f"[eval] {row.name}: FAILED ({err})")
                continue
            entry = _row_entry(
                row, "ok", metrics=metrics, fingerprint=_row_fingerprint(cfg, row, run_record, refine_record),
                train_s=run_record["train_s"], train_wall_s=run_record["wall_s"],
                refine_s=refine_record["refine_s"] if refine_record else None,
                refine_includes_vae=bool(refine_record and refine_record.get("includes_vae_training")),
                config=run_record["config"],
            )
            write_json(slug_path(out, row.name), entry)
            entries[row.name] = entry
            log(f"[eval] {row.name}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                f"{metrics['num_gaussians']} Gaussians, {metrics['ms_per_view']:.1f} ms/view")
        del pipeline
        free_memory()

    first = next((e for e in entries.values() if e.get("status") == "ok"), None)
    results = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "suite": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "environment": environment(cfg),
        "dataset": {
            "path": str(data), "factors": [f"x{f}" for f in cfg.factors], "has_points": points is not None,
            "test_views": first["metrics"]["views"] if first else None,
            "height": first["metrics"]["height"] if first else None,
            "width": first["metrics"]["width"] if first else None,
            **about,
        },
        "budget": {"ours": cfg.steps, "baselines": baseline_steps(cfg), "finetune": baseline_steps(cfg) - cfg.steps},
        "complete": all(e.get("status") == "ok" for e in entries.values()),
        "rows": [entries[row.name] for row in rows],
    }
    write_reports(cfg, results)
    return results


def parse_args(argv: Optional[Sequence[str]] = None) -> BenchConfig:
    """Command line -> config: ``--config FILE`` supplies the defaults, the other flags override them."""
    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    base = BenchConfig()
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            base = load_suite(args[i + 1])
        elif arg.startswith("--config="):
            base = load_suite(arg.split("=", 1)[1])
    return tyro.cli(BenchConfig, default=base, args=args, description=__doc__.split("\n\n")[0])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``gvae-bench``; returns the exit code (see :data:`EXIT_OK` and friends)."""
    try:
        cfg = parse_args(argv)
        results = run_bench(cfg)
    except BenchError as err:
        print(f"gvae-bench: {err}", file=sys.stderr)
        return 2
    out = cfg.output.resolve()
    say("")
    say((out / "results.md").read_text(encoding="utf-8"))
    say(f"Wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'crops.png'}.")
    statuses = [r["status"] for r in results["rows"]]
    if "pending" in statuses:
        say("Not finished within --time-budget-s: run the same command again to resume.")
        return EXIT_RESUME
    return EXIT_FAILED if "failed" in statuses else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
