"""The README's commands work as written.

* Every script, config file and console tool the README names exists.
* The run commands (``gvae-refine``, ``gvae-lineage``, ``ns-export`` with and without ``GVAE_REFINED=0``,
  ``ns-viewer``) run as written on a tiny trained run, with only the README's placeholders (``<run>``,
  ``<dir>``, ``<timestamp>``) filled in.
* The lego recipe runs as written from the repository root, where ``../shared/data/lego`` is: the copy is
  made and ``ns-train`` passes every check and starts training (it is stopped then: the full run is hours on
  a CPU). Skipped where the lego data is not beside the repository.

``bash scripts/demo.sh`` and ``bash scripts/test.sh`` are the main job and this suite; ``gvae-bench`` with the
CPU suite runs in ``tests/test_bench.py`` at a smaller size.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = (REPO / "README.md").read_text()
LEGO = REPO.parent / "shared" / "data" / "lego"


def _commands() -> List[str]:
    """The shell commands of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def _env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("GVAE_REFINED", None)
    return env


def _argv(command: str) -> tuple:
    """(environment additions, argv) of a README command; ``.venv/bin/X`` is this interpreter's X."""
    words = shlex.split(command)
    extra = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        key, _, value = words.pop(0).partition("=")
        extra[key] = value
    if words[0].startswith(".venv/bin/"):
        words[0] = str(BIN / words[0][len(".venv/bin/"):])
    elif (BIN / words[0]).exists():
        words[0] = str(BIN / words[0])
    return extra, words


def test_every_file_and_tool_the_readme_names_exists():
    commands = _commands()
    assert any(c.startswith("bash scripts/demo.sh") for c in commands)
    assert any(c.startswith("bash scripts/test.sh") for c in commands)
    for path in set(re.findall(r"(?:scripts|configs)/[\w\-./]+\.(?:sh|py|yaml|args)", README)):
        assert (REPO / path).is_file(), f"README names {path}, which does not exist"
    for command in commands:
        _, argv = _argv(command)
        if argv[0] in ("bash", "python", "python3"):
            continue
        assert Path(argv[0]).is_file() or shutil.which(argv[0]), f"README command needs {argv[0]}: {command}"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from gvae_ns.synthetic import write_scene

    root = tmp_path_factory.mktemp("readme")
    scene = write_scene(root / "scene", resolution=32, n_train=6, n_test=2, n_val=2, supersample=1, n_points=500)
    flags = ["--vis", "tensorboard", "--machine.device-type", "cpu", "--pipeline.model.background-color", "white",
             "--pipeline.model.num-random", "400", "--pipeline.model.stage-downscales", "4", "2", "1",
             "--pipeline.model.stage-steps", "15", "15", "20", "--max-num-iterations", "50",
             "--pipeline.model.warmup-length", "5", "--pipeline.model.refine-every", "5",
             "--pipeline.model.decoder-steps", "20", "--pipeline.model.extrapolate-fraction", "0.2",
             "--steps-per-eval-image", "1000", "--steps-per-eval-all-images", "100000"]
    proc = subprocess.run([str(BIN / "ns-train"), "gaussianvae", "--output-dir", str(root / "outputs"),
                           "--experiment-name", "synthetic", *flags, "blender-data", "--data", str(scene)],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((root / "outputs" / "synthetic" / "gaussianvae").iterdir())


def _fill(command: str, run: Path, out: Path) -> str:
    command = command.replace("outputs/synthetic/gaussianvae/<timestamp>", str(run))
    return command.replace("<run>", str(run)).replace("<dir>", str(out)).replace("exports/", f"{out}/")


@pytest.mark.parametrize("tool", ["gvae-refine", "gvae-lineage", "GVAE_REFINED=0 ns-export", "ns-export"])
def test_run_commands_work_as_written(run, tmp_path, tool):
    commands = [c for c in _commands() if re.sub(r"^\.venv/bin/", "", c).startswith(tool + " ")]
    assert commands, f"the README shows no {tool} command"
    for command in commands:
        extra, argv = _argv(_fill(command, run, tmp_path / "export"))
        proc = subprocess.run(argv, capture_output=True, text=True, env={**_env(), **extra}, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    if "ns-export" in tool:
        assert (tmp_path / "export" / "splat.ply").is_file()


def _start_until(argv: List[str], env: Dict[str, str], cwd: Path, log: Path, marker: str, timeout: float) -> str:
    """Start ``argv``; stop it once ``marker`` is in its output (fail if it exits first); returns the output."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text()
            if marker in text:
                return text
            if proc.poll() is not None:
                raise AssertionError(f"{' '.join(argv)} exited ({proc.returncode}):\n{text[-3000:]}")
            time.sleep(0.5)
        raise AssertionError(f"no '{marker}' within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def test_viewer_command_serves_on_localhost(run, tmp_path):
    command = next(c for c in _commands() if "ns-viewer" in c)
    extra, argv = _argv(_fill(command, run, tmp_path))
    text = _start_until(argv, {**_env(), **extra}, REPO, tmp_path / "viewer.log", "ws://", 300)
    assert "http://127.0.0.1:" in text and "0.0.0.0" not in text


@pytest.mark.skipif(not LEGO.is_dir(), reason=f"the lego data is not at {LEGO}")
def test_lego_recipe_runs_as_written(tmp_path):
    section = README[README.index("### On a GPU, with NeRF-synthetic lego"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    assert lines[0] == "bash scripts/setup.sh"  # what this suite itself runs under
    copy = REPO / "data" / "lego_x2"
    before = set((REPO / "outputs").rglob("config.yml"))
    made: List[Path] = []
    try:
        extra, argv = _argv(lines[1])
        proc = subprocess.run(argv, cwd=REPO, env={**_env(), **extra}, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (copy / "transforms_train.json").is_file()
        extra, argv = _argv(lines[2])
        text = _start_until(argv, {**_env(), **extra}, REPO, tmp_path / "lego.log", "Step (% Done)", 600)
        made = sorted(set((REPO / "outputs").rglob("config.yml")) - before)
        assert "ns-train gaussianvae:" not in text
        assert made, "ns-train did not get past its checks"
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        for config in made:
            shutil.rmtree(config.parent, ignore_errors=True)
            for parent in (config.parent.parent, config.parent.parent.parent):  # <experiment>/<method>, if emptied
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
