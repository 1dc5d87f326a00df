"""Faults tried for real: ``kill -9`` during the checkpoint, lineage and refinement writes, then resume.

``GVAE_STALL_WRITE`` (see :mod:`gvae_ns.atomic`) pauses one chosen write after its temporary file is complete
and before the rename, the widest window a crash can hit. The test kills ``ns-train`` there, three times:

1. run A, during its third checkpoint (``step-000000030.ckpt``): that checkpoint is absent, the earlier
   ones and ``lineage.npz`` are whole;
2. run B, resumed from A, during its second lineage write: the checkpoint of that save is whole, the lineage
   file is the previous complete one;
3. run C, resumed from B, during the refinement write at the end of training: no ``refinement.pt``;
   ``gvae-refine`` then redoes it.

Each resume starts from the last complete checkpoint, and the final lineage keeps every Gaussian recorded
before each crash (same ids, parents, births) and never reuses an id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import pytest
import torch
from tiny_runs import BIN, run_env, tiny_flags

FLAGS = tiny_flags(num_random=400, stage_steps=(20, 20, 20), every=5, decoder_steps=20, save_every=10) + [
    "--save-only-latest-checkpoint", "False"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from gvae_ns.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("scene"), resolution=32, n_train=6, n_test=2, n_val=2,
                       supersample=1, n_points=500)


def _env(**extra: str) -> dict:
    return run_env(**extra)


def _train_and_kill(out: Path, name: str, stall: str, extra: List[str], scene: Path) -> Path:
    """Start ns-train with the write ``stall`` paused; SIGKILL it once that write's temp file is complete."""
    log = out.parent / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(BIN / "ns-train"), "gaussianvae", "--output-dir", str(out), "--experiment-name", name, *FLAGS,
             *extra, "blender-data", "--data", str(scene)],
            stdout=f, stderr=subprocess.STDOUT, env=_env(GVAE_STALL_WRITE=stall, GVAE_STALL_SECONDS="600"),
            start_new_session=True)
    target = stall.partition("@")[0]
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"ns-train ended ({proc.returncode}) before the stalled write of {stall}:\n"
                                     f"{log.read_text()[-3000:]}")
            temps = list(out.rglob(f".{target}.*.tmp"))
            if temps:
                size = temps[0].stat().st_size
                time.sleep(1.0)  # the write is complete once the file stops growing (it is fsynced, then stalls)
                if size > 0 and temps[0].stat().st_size == size:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no stalled write of {stall} within the time limit:\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return next((out / name / "gaussianvae").iterdir())


def _steps(run: Path) -> List[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run / "nerfstudio_models").glob("step-*.ckpt"))


def _assert_whole(run: Path) -> None:
    """Every file under its real name loads; only hidden temporary files can be partial."""
    from gvae_ns.lineage.format import load_lineage

    for ckpt in (run / "nerfstudio_models").glob("*.ckpt"):
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == int(ckpt.stem.split("-")[1])
    if (run / "lineage.npz").exists():
        load_lineage(run / "lineage.npz")
    assert not list((run / "nerfstudio_models").glob(".*")), "temporary files among nerfstudio's checkpoints"


def _assert_prefix(before, after) -> None:
    n = before.num_ids
    assert after.num_ids >= n
    assert torch.equal(after.ids[:n], before.ids)
    assert torch.equal(after.parent[:n], before.parent)
    assert torch.equal(after.birth[:n], before.birth)
    assert after.ids.unique().numel() == after.ids.numel(), "an id was used twice"


def test_kill_during_each_write_then_resume(scene, tmp_path):
    from gvae_ns.lineage.format import load_lineage
    from gvae_ns.run_layout import REFINEMENT_FILE

    out = tmp_path / "out"
    # 1. the third checkpoint write (saves at steps 10, 20, 30, ...)
    run_a = _train_and_kill(out, "a", "step-000000030.ckpt", [], scene)
    _assert_whole(run_a)
    assert _steps(run_a) == [10, 20]
    lineage_a = load_lineage(run_a / "lineage.npz")  # written after the step-20 checkpoint

    # 2. resumed from A (step 20 -> starts at 21), killed in its second lineage write (after step 40's checkpoint)
    run_b = _train_and_kill(out, "b", "lineage.npz@2",
                            ["--load-dir", str(run_a / "nerfstudio_models")], scene)
    _assert_whole(run_b)
    assert _steps(run_b) == [30, 40], "the resume did not continue from the last complete checkpoint (20)"
    lineage_b = load_lineage(run_b / "lineage.npz")  # the first save's (step 30): whole, one save behind
    _assert_prefix(lineage_a, lineage_b)

    # 3. resumed from B's step 40 (its last whole checkpoint), killed while writing the refinement
    run_c = _train_and_kill(out, "c", REFINEMENT_FILE, ["--load-dir", str(run_b / "nerfstudio_models"),
                                                        "--max-num-iterations", "20"], scene)
    _assert_whole(run_c)
    assert _steps(run_c)[-1] == 60 and not (run_c / REFINEMENT_FILE).exists()
    lineage_c = load_lineage(run_c / "lineage.npz")
    _assert_prefix(lineage_b, lineage_c)
    _assert_prefix(lineage_a, lineage_c)

    # refinement is redone from the complete run
    proc = subprocess.run([str(BIN / "gvae-refine"), "--load-config", str(run_c / "config.yml"), "--decoder-steps", "20"],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_c / REFINEMENT_FILE).is_file()
    ckpt = torch.load(run_c / "nerfstudio_models" / "step-000000060.ckpt", map_location="cpu", weights_only=True)
    payload = torch.load(run_c / REFINEMENT_FILE, map_location="cpu", weights_only=True)
    assert isinstance(payload, dict) and ckpt["step"] == 60
