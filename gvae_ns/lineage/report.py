"""``gvae-lineage``: summarise a run's lineage file as a table, a JSON file and a PNG figure.

Usage: ``gvae-lineage outputs/<run dir>`` (searched for ``**/lineage.npz``) or
``gvae-lineage path/to/lineage.npz``. Writes ``lineage_report.json`` and ``lineage_report.png``
next to the lineage file (or into ``--output-dir``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import tyro

from gvae_ns.atomic import atomic_write
from gvae_ns.console import say
from gvae_ns.gaussians import OPACITY, SCALES
from gvae_ns.lineage.dataset import build_transitions, depths, transition_pairs
from gvae_ns.lineage.format import (
    ALIVE,
    CLONE,
    PRUNED,
    SEED,
    SPLIT,
    SPLIT_REPLACED,
    Lineage,
    LineageFormatError,
    load_lineage,
)

JSON_NAME = "lineage_report.json"
PNG_NAME = "lineage_report.png"


@dataclass
class ReportConfig:
    """Summarise a lineage file."""

    path: tyro.conf.Positional[Path]
    """A training run directory (searched for **/lineage.npz) or a lineage file."""
    output_dir: Optional[Path] = None
    """Where the JSON and PNG go; defaults to the lineage file's directory."""
    max_children: int = 4
    """Descendant slots per parent, to report how many descendants a VAE batch would drop."""


def find_lineage_file(path: Path) -> Path:
    """``path`` itself if it is a file, else the newest ``**/lineage.npz`` below it."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory or lineage file")
    found = sorted(path.glob("**/lineage.npz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"{path}: no lineage.npz below this directory; pass the run directory written by "
            "`ns-train gaussianvae` (it saves lineage.npz at each stage boundary) or the lineage file itself"
        )
    if len(found) > 1:
        say(f"{len(found)} lineage files under {path}; using the newest, {found[-1]}")
    return found[-1]


def _stats(x: torch.Tensor) -> Dict[str, float]:
    if x.numel() == 0:
        return {"mean": 0.0, "std": 0.0}
    return {"mean": float(x.mean()), "std": float(x.std(unbiased=False))}


def summarize(lineage: Lineage, max_children: int = 4) -> Dict[str, Any]:
    """All report numbers as a JSON-ready dict."""
    n_stages = max(
        len(lineage.stage_downscales),
        int(lineage.birth_stage.max()) + 1 if lineage.num_ids else 0,
        int(lineage.death_stage.max()) + 1 if lineage.num_ids else 0,
        int(lineage.snapshot_stage.max()) + 1 if lineage.num_snapshots else 0,
    )
    stages = []
    for s in range(n_stages):
        born = lineage.birth_stage == s
        died = (lineage.death_stage == s) & (lineage.death_cause != ALIVE)
        stages.append(
            {
                "stage": s,
                "downscale": int(lineage.stage_downscales[s]) if s < len(lineage.stage_downscales) else None,
                "seeds": int((born & (lineage.birth == SEED)).sum()),
                "clones": int((born & (lineage.birth == CLONE)).sum()),
                "splits": int((died & (lineage.death_cause == SPLIT_REPLACED)).sum()),
                "split_children": int((born & (lineage.birth == SPLIT)).sum()),
                "prunes": int((died & (lineage.death_cause == PRUNED)).sum()),
            }
        )
    snapshots = [
        {"index": k, "stage": int(lineage.snapshot_stage[k]), "step": int(lineage.snapshot_step[k]), "count": int(lineage.snapshot(k).ids.shape[0])}
        for k in range(lineage.num_snapshots)
    ]
    depth = depths(lineage)
    final_depth = depth[lineage.rows_of(lineage.snapshot(-1).ids)] if lineage.num_snapshots else depth[:0]
    transitions = []
    ts = build_transitions(lineage, max_children=max_children)
    for k in range(lineage.num_snapshots - 1):
        pi, ci = transition_pairs(lineage, k)
        before, after = lineage.snapshot(k), lineage.snapshot(k + 1)
        ps, cs = before.state[pi], after.state[ci]
        dlog = cs[:, SCALES].mean(1) - ps[:, SCALES].mean(1)
        dopa = torch.sigmoid(cs[:, OPACITY].flatten()) - torch.sigmoid(ps[:, OPACITY].flatten())
        new = before.ids[pi] != after.ids[ci]
        rows = ts.stage == k
        transitions.append(
            {
                "from_snapshot": k,
                "to_snapshot": k + 1,
                "parents": int(rows.sum()),
                "parents_without_descendants": int((ts.num_children[rows] == 0).sum()),
                "mean_descendants": float(ts.num_children[rows].float().mean()) if bool(rows.any()) else 0.0,
                "pairs": int(pi.shape[0]),
                "new_pairs": int(new.sum()),
                "orphans": int(after.ids.shape[0] - pi.shape[0]),
                "dropped_at_max_children": int((ts.num_children[rows] - max_children).clamp_min(0).sum()),
                "dlog_scale": _stats(dlog),
                "dopacity": _stats(dopa),
                "new_dlog_scale": _stats(dlog[new]),
                "new_dopacity": _stats(dopa[new]),
            }
        )
    return {
        "file": str(lineage.source) if lineage.source else None,
        "format_version": lineage.version,
        "num_ids": lineage.num_ids,
        "stage_downscales": lineage.stage_downscales.tolist(),
        "stage_boundaries": lineage.stage_boundaries.tolist(),
        "max_children": max_children,
        "snapshots": snapshots,
        "stages": stages,
        "depth_histogram_final": torch.bincount(final_depth).tolist(),
        "depth_histogram_all": torch.bincount(depth).tolist(),
        "transitions": transitions,
    }


def plot(lineage: Lineage, summary: Dict[str, Any], path: Path) -> None:
    """Four panels: live counts, events per stage, depth histogram, parent->child log-scale change."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), layout="constrained")
    ax = fig.subplots(2, 2)
    snaps = summary["snapshots"]
    ax[0, 0].bar([f"s{s['stage']}\n@{s['step']}" for s in snaps], [s["count"] for s in snaps], color="tab:blue")
    ax[0, 0].set_title("live Gaussians per snapshot")
    stages = summary["stages"]
    xs = torch.arange(len(stages)).float()
    for j, (key, color) in enumerate([("clones", "tab:green"), ("splits", "tab:orange"), ("prunes", "tab:red")]):
        ax[0, 1].bar((xs + (j - 1) * 0.27).tolist(), [s[key] for s in stages], width=0.27, label=key, color=color)
    ax[0, 1].set_xticks(xs.tolist(), [f"stage {s['stage']}" for s in stages])
    ax[0, 1].set_title("densification events per stage")
    ax[0, 1].legend()
    hist = summary["depth_histogram_final"]
    ax[1, 0].bar(list(range(len(hist))), hist, color="tab:purple")
    ax[1, 0].set_title("generations since seed (final Gaussians)")
    ax[1, 0].set_xlabel("depth")
    for k in range(lineage.num_snapshots - 1):
        pi, ci = transition_pairs(lineage, k)
        ps, cs = lineage.snapshot(k).state[pi], lineage.snapshot(k + 1).state[ci]
        dlog = (cs[:, SCALES].mean(1) - ps[:, SCALES].mean(1)).numpy()
        if dlog.size:
            ax[1, 1].hist(dlog, bins=50, histtype="step", label=f"{k}->{k + 1}")
    ax[1, 1].set_title("parent -> descendant change of mean log-scale")
    if lineage.num_snapshots > 1:
        ax[1, 1].legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def format_table(summary: Dict[str, Any]) -> str:
    """A short plain-text table of the summary."""
    lines = [f"lineage: {summary['file']}  ({summary['num_ids']} Gaussians ever created)"]
    lines.append(f"{'stage':>5} {'down':>5} {'seeds':>8} {'clones':>8} {'splits':>8} {'prunes':>8}")
    for s in summary["stages"]:
        down = "-" if s["downscale"] is None else str(s["downscale"])
        lines.append(f"{s['stage']:>5} {down:>5} {s['seeds']:>8} {s['clones']:>8} {s['splits']:>8} {s['prunes']:>8}")
    lines.append(f"{'snap':>5} {'stage':>5} {'step':>8} {'live':>8}")
    for s in summary["snapshots"]:
        lines.append(f"{s['index']:>5} {s['stage']:>5} {s['step']:>8} {s['count']:>8}")
    for t in summary["transitions"]:
        lines.append(
            f"{t['from_snapshot']}->{t['to_snapshot']}: {t['parents']} parents, {t['parents_without_descendants']} died out, "
            f"{t['mean_descendants']:.2f} descendants each, dlogscale {t['dlog_scale']['mean']:+.3f}, "
            f"dopacity {t['dopacity']['mean']:+.3f}"
        )
    return "\n".join(lines)


def run_report(config: ReportConfig) -> Dict[str, Any]:
    """Load, summarise, write JSON + PNG, print the table; returns the summary."""
    path = find_lineage_file(config.path)
    lineage = load_lineage(path)
    summary = summarize(lineage, max_children=config.max_children)
    out = config.output_dir if config.output_dir is not None else path.parent
    out.mkdir(parents=True, exist_ok=True)
    summary["json"] = str(out / JSON_NAME)
    summary["figure"] = str(out / PNG_NAME)
    atomic_write(out / JSON_NAME, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    plot(lineage, summary, out / PNG_NAME)
    say(format_table(summary))
    say(f"wrote {out / JSON_NAME} and {out / PNG_NAME}")
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point ``gvae-lineage``."""
    config = tyro.cli(ReportConfig, args=argv)
    try:
        run_report(config)
    except (FileNotFoundError, LineageFormatError) as exc:
        print(f"gvae-lineage: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
