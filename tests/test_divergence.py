"""A NaN in training stops the run at the step it appears, naming the step and the parameter group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gvae_ns.trainer import GaussianVAETrainer

BIN = Path(sys.executable).parent


def _fake_trainer(groups, last_checkpoint=None):
    return SimpleNamespace(pipeline=SimpleNamespace(get_param_groups=lambda: groups), last_checkpoint=last_checkpoint)


def test_finite_step_passes_and_a_nan_group_is_named_with_the_last_checkpoint(tmp_path, capsys):
    groups = {"means": [torch.nn.Parameter(torch.zeros(4, 3))], "scales": [torch.nn.Parameter(torch.zeros(4, 3))]}
    loss = {"main_loss": torch.tensor(0.5)}
    GaussianVAETrainer._check_finite(_fake_trainer(groups), 7, loss["main_loss"], loss)
    groups["scales"][0].data[2, 1] = float("inf")
    ckpt = tmp_path / "nerfstudio_models" / "step-000000100.ckpt"
    with pytest.raises(SystemExit) as stop:
        GaussianVAETrainer._check_finite(_fake_trainer(groups, ckpt), 123, loss["main_loss"], loss)
    assert stop.value.code == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    assert "diverged at step 123: scales became NaN or infinite" in message
    assert f"last good checkpoint is {ckpt}" in message and "--optimizers.scales.optimizer.lr" in message


def test_nan_loss_is_named(capsys):
    groups = {"means": [torch.nn.Parameter(torch.zeros(2, 3))]}
    loss = {"main_loss": torch.tensor(float("nan")), "scale_reg": torch.tensor(0.1)}
    with pytest.raises(SystemExit):
        GaussianVAETrainer._check_finite(_fake_trainer(groups), 3, loss["main_loss"], loss)
    assert "step 3: loss main_loss became NaN" in capsys.readouterr().err


def test_diverging_run_stops_at_once_and_saves_nothing(tmp_path):
    from gvae_ns.synthetic import write_scene

    scene = write_scene(tmp_path / "scene", resolution=32, n_train=4, n_test=1, n_val=1, supersample=1, n_points=100)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [str(BIN / "ns-train"), "gaussianvae", "--output-dir", str(tmp_path / "out"), "--vis", "tensorboard",
         "--machine.device-type", "cpu", "--pipeline.model.num-random", "300", "--pipeline.model.stage-downscales",
         "4", "2", "1", "--pipeline.model.stage-steps", "10", "10", "10", "--max-num-iterations", "30",
         "--optimizers.scales.optimizer.lr", "1e6", "blender-data", "--data", str(scene)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "diverged at step" in line]
    assert len(lines) == 1 and "scales" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").rglob("*.ckpt")) and not list((tmp_path / "out").rglob("refinement.pt"))
