"""The main path with the viewer on: ``ns-train gaussianvae`` refines before the viewer's completion loop.

nerfstudio's ``Trainer.train`` ends in an endless loop when the viewer is on, so refinement must run as an
``AFTER_TRAIN`` callback. Each test trains the tiny built-in scene with ``--vis viewer`` (and
``viewer+tensorboard``), waits for ``refinement.pt``, then reads the viewer's state the way a browser does:
a websocket client on the viser server (127.0.0.1) decodes the GUI messages and finds the refinement
controls' "Added Gaussians" count. The process is then stopped (it would wait for ctrl+c forever).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

import msgspec
import pytest
from tiny_runs import BIN, run_env, stop_process, tiny_flags
from websockets.sync.client import connect

FLAGS = tiny_flags(vis=None)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from gvae_ns.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("scene"), resolution=32, n_train=8, n_test=2, n_val=2,
                       supersample=2, n_points=2000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gui_numbers(port: int, seconds: float = 3.0) -> Dict[str, float]:
    """Label -> value of every number field the viewer currently holds, as a new browser would get them."""
    labels: Dict[str, str] = {}
    values: Dict[str, float] = {}
    with connect(f"ws://127.0.0.1:{port}", open_timeout=10, max_size=None) as ws:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                raw = ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            if not isinstance(raw, bytes):
                continue
            decoded = msgspec.msgpack.decode(raw)
            for message in decoded if isinstance(decoded, (list, tuple)) else [decoded]:
                kind = message.get("type")
                if kind == "GuiAddNumberMessage":
                    labels[message["id"]] = message["label"]
                    values[message["id"]] = message["value"]
                elif kind == "GuiUpdateMessage" and "value" in message.get("updates", {}):
                    values[message["id"]] = message["updates"]["value"]
    return {labels[i]: v for i, v in values.items() if i in labels}


@pytest.mark.parametrize("vis", ["viewer", "viewer+tensorboard"])
def test_default_viewer_run_refines_and_shows_the_refined_count(scene, tmp_path, vis):
    port = _free_port()
    log = tmp_path / "ns-train.log"
    env = run_env()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "ns-train"), "gaussianvae", "--output-dir", str(tmp_path / "out"), "--experiment-name", "v",
             "--vis", vis, "--viewer.websocket-port", str(port), *FLAGS, "blender-data", "--data", str(scene)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        numbers: Optional[Dict[str, float]] = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"ns-train exited ({proc.returncode}) instead of waiting in the viewer:\n"
                                     f"{log.read_text()[-3000:]}")
            refined = list((tmp_path / "out").rglob("refinement.pt"))
            if refined and "Refined scene" in log.read_text():
                numbers = _gui_numbers(port)
                if numbers.get("Added Gaussians", 0) > 0:
                    break
            time.sleep(1.0)
        text = log.read_text()
        assert numbers is not None, f"no refinement.pt within the time limit:\n{text[-3000:]}"
        assert numbers.get("Added Gaussians", 0) > 0, numbers
        assert numbers.get("Original Gaussians", 0) > 0, numbers
        assert "Training Finished" in text
        assert f"http://127.0.0.1:{port}" in text  # listens on this machine only by default
        # the viewer's completion loop is where the process waits now: it is still alive
        assert proc.poll() is None
    finally:
        stop_process(proc, grace_s=15)
