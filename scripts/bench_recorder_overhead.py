"""Lineage recorder overhead: the same ns-train gaussianvae run with and without lineage recording.

    .venv/bin/python scripts/bench_recorder_overhead.py --data data/synthetic --repeats 2

Each run is a separate process. "without" swaps the recording strategy back to gsplat's DefaultStrategy
and skips snapshots and the lineage file (refinement is off in both). Prints the wall time of each run
(set-up, the same for both, included; densification and the recorder run outside nerfstudio's own
per-iteration timer, so that timer would not see them) and the relative difference.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_TRAIN = """
import sys, time
from nerfstudio.scripts.train import entrypoint
sys.argv = ["ns-train"] + sys.argv[1:]
start = time.perf_counter()
entrypoint()
print(f"WALL {time.perf_counter() - start:.3f}")
"""
_WITH = _TRAIN
_WITHOUT = """
from nerfstudio.models.splatfacto import SplatfactoModel
import gvae_ns.model as m
class _NoRecorder:
    stage_downscales = stage_boundaries = snapshot_dtype = None
m._lineage_strategy_from = lambda strategy: strategy
m.GaussianVAEModel.recorder = property(lambda self: _NoRecorder())
m.GaussianVAEModel.step_cb = SplatfactoModel.step_cb
m.GaussianVAEModel.after_step = lambda self, step: None
m.GaussianVAEModel.get_extra_state = lambda self: {}
m.GaussianVAEModel.save_lineage = lambda self, path: None
""" + _TRAIN


def run(code: str, data: Path, steps: int, out: Path) -> float:
    s = steps // 5
    args = [
        "gaussianvae", "--output-dir", str(out), "--vis", "tensorboard", "--machine.device-type", "cpu",
        "--pipeline.model.background-color", "white", "--pipeline.model.num-random", "5000",
        "--pipeline.model.random-scale", "3.0", "--pipeline.model.stage-downscales", "8", "4", "2",
        "--pipeline.model.stage-steps", str(s), str(s), str(steps - 2 * s), "--max-num-iterations", str(steps),
        "--pipeline.model.warmup-length", "100", "--pipeline.model.refine-every", "100",
        "--pipeline.model.refinement-after-training", "False", "--steps-per-eval-image", "100000",
        "--steps-per-eval-all-images", "100000", "--steps-per-save", "100000",
        "blender-data", "--data", str(data),
    ]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    found = re.search(r"^WALL ([0-9.]+)$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Blender-format dataset (e.g. gvae-synthetic output)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant (alternating)")
    args = parser.parse_args()
    times = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, code in (("without", _WITHOUT), ("with", _WITH)):
                t = run(code, args.data, args.steps, Path(tmp) / f"{name}{i}")
                times[name].append(t)
                print(f"{name:8s} lineage: {t:.1f} s for {args.steps} steps", flush=True)
    w, wo = (sum(times[k]) / len(times[k]) for k in ("with", "without"))
    print(f"mean: with {w:.1f} s, without {wo:.1f} s, overhead {100 * (w / wo - 1):+.1f}%")


if __name__ == "__main__":
    main()
