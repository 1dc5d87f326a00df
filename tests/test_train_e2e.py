"""End to end on CPU: ns-train gaussianvae on a tiny built-in scene, then ns-export, eval_setup, resume.

One tiny run (32 px, stages 8 -> 16 -> 32 px) is trained once for the module; the tests read what it left.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from tiny_runs import BIN, run_env, tiny_flags

TINY_FLAGS = tiny_flags(save_every=35)


def _env() -> dict:
    return run_env()


def ns(cmd: str, *args: str, check: bool = True, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / cmd), *map(str, args)], capture_output=True, text=True, env=env or _env(),
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from gvae_ns.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("scene"), resolution=32, n_train=8, n_test=2, n_val=2,
                       supersample=2, n_points=2000)


@pytest.fixture(scope="module")
def run(scene, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs")
    ns("ns-train", "gaussianvae", "--output-dir", out, "--experiment-name", "tiny", *TINY_FLAGS,
       "blender-data", "--data", scene)
    runs = sorted((out / "tiny" / "gaussianvae").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_run_leaves_checkpoint_lineage_vae_and_refinement(run):
    ckpts = sorted((run / "nerfstudio_models").glob("step-*.ckpt"))
    assert [c.name for c in ckpts] == ["step-000000069.ckpt"]
    for name in ("config.yml", "lineage.npz", "vae.pt", "refinement.pt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob(".*.tmp"))
    # Loads under PyTorch's default weights_only=True, as stock ns-viewer / ns-export / ns-eval do.
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert state["step"] == 69


def test_lineage_has_one_snapshot_per_stage(run):
    from gvae_ns.lineage.format import load_lineage

    lineage = load_lineage(run / "lineage.npz")
    assert lineage.snapshot_stage.tolist() == [0, 1, 2]
    assert lineage.snapshot_step.tolist() == [19, 39, 69]
    assert lineage.stage_downscales.tolist() == [4, 2, 1]
    # Densification happened and was recorded: more Gaussians ever created than seeds.
    assert lineage.num_ids > 600


def test_export_writes_refined_scene_by_default_and_original_on_request(run, tmp_path):
    """ns-export gaussian-splat writes the model's own values (refined by default, the checkpoint's with
    GVAE_REFINED=0), column by column, and a third-party reader (splat-transform) reads them back."""
    from plyfile import PlyData
    from test_splat_transform import (
        assert_ply_matches,
        check_exported_ply,
        expected_columns,
        exported_rows,
    )

    from gvae_ns.gaussians import PARAM_KEYS
    from gvae_ns.refine.result import load_refinement

    ckpt = torch.load(next((run / "nerfstudio_models").glob("*.ckpt")), map_location="cpu", weights_only=True)
    original = {k: ckpt["pipeline"][f"_model.gauss_params.{k}"] for k in PARAM_KEYS}
    n_original = original["means"].shape[0]
    refined = load_refinement(run / "refinement.pt", n_original)
    assert refined.num_added > 0

    ns("ns-export", "gaussian-splat", "--load-config", run / "config.yml", "--output-dir", tmp_path / "a")
    ply = PlyData.read(str(tmp_path / "a" / "splat.ply"))
    names = [p.name for p in ply["vertex"].properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert len(names) == 62  # 45 f_rest_* for SH degree 3
    cols = expected_columns(refined.params, sh_degree=3)
    assert ply["vertex"].count == int(exported_rows(cols).sum()) > n_original
    # positions, scales, opacities (logits), rotations and every SH coefficient: the refined model's own values
    assert_ply_matches(tmp_path / "a" / "splat.ply", cols)
    check_exported_ply(tmp_path / "a" / "splat.ply", tmp_path, count=ply["vertex"].count, sh_bands=3)

    ns("ns-export", "gaussian-splat", "--load-config", run / "config.yml", "--output-dir", tmp_path / "b",
       env=dict(_env(), GVAE_REFINED="0"))
    plain = expected_columns(original, sh_degree=3)
    assert PlyData.read(str(tmp_path / "b" / "splat.ply"))["vertex"].count == int(exported_rows(plain).sum())
    assert_ply_matches(tmp_path / "b" / "splat.ply", plain)


def test_eval_setup_sees_refinement_and_renders_full_resolution(run):
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(run / "config.yml", test_mode="test")
    model = pipeline.model
    assert model.refinement_active
    camera = pipeline.datamanager.eval_dataset.cameras[0:1]
    out = model.get_outputs_for_camera(camera)
    assert out["rgb"].shape == (32, 32, 3)  # the data's full resolution, never trained at
    assert torch.isfinite(out["rgb"]).all()
    model.config.show_refined = False
    plain = model.get_outputs_for_camera(camera)["rgb"]
    assert not torch.equal(out["rgb"], plain)


def test_resume_continues_the_same_lineage(run, scene, tmp_path):
    from gvae_ns.lineage.format import load_lineage

    before = load_lineage(run / "lineage.npz")
    flags = [f for f in TINY_FLAGS]
    flags[flags.index("--max-num-iterations") + 1] = "10"
    ns("ns-train", "gaussianvae", "--output-dir", tmp_path, "--experiment-name", "resumed", *flags,
       "--pipeline.model.refinement-after-training", "False", "--load-dir", run / "nerfstudio_models",
       "blender-data", "--data", scene)
    resumed_run = next((tmp_path / "resumed" / "gaussianvae").iterdir())
    after = load_lineage(resumed_run / "lineage.npz")
    n = before.num_ids
    assert after.num_ids >= n
    # Nothing lost: the first n events are the same Gaussians with the same parents and births.
    assert torch.equal(after.ids[:n], before.ids)
    assert torch.equal(after.parent[:n], before.parent)
    assert torch.equal(after.birth[:n], before.birth)
    assert after.snapshot_stage.tolist()[:3] == [0, 1, 2]


@pytest.mark.parametrize(
    "flags, data, words",
    [
        ([], "missing", "does not exist"),
        (["--pipeline.model.stage-downscales", "64", "32", "16"], None, "fewer than 8"),
        (["--pipeline.model.stage-downscales", "2", "4", "1"], None, "strictly decrease"),
        (["--max-num-iterations", "5"], None, "ends before the last stage"),
        (["--machine.device-type", "cuda"], None, "no CUDA device"),
    ],
)
def test_bad_input_stops_with_one_paragraph(scene, tmp_path, flags, data, words):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    target = tmp_path / "nope" if data == "missing" else scene
    proc = ns("ns-train", "gaussianvae", "--output-dir", tmp_path, *TINY_FLAGS, *flags, "blender-data",
              "--data", target, check=False, timeout=300)
    assert proc.returncode != 0
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_damaged_refinement_file_falls_back_to_the_original_scene(run):
    from nerfstudio.utils.eval_utils import eval_setup

    path = run / "refinement.pt"
    backup = path.read_bytes()
    try:
        path.write_bytes(backup[:100])
        _, pipeline, _, _ = eval_setup(run / "config.yml", test_mode="inference")
        model = pipeline.model
        assert model.refinement is None and not model.refinement_active
        assert "refinement.pt" in model.refinement_note and "cannot be read" in model.refinement_note
        assert model.num_points == model.gauss_params["means"].shape[0]
    finally:
        path.write_bytes(backup)


def test_ns_eval_loads_the_run(run, tmp_path):
    import json
    import math

    ns("ns-eval", "--load-config", run / "config.yml", "--output-path", tmp_path / "eval.json")
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert math.isfinite(results["psnr"]) and 0.0 < results["ssim"] <= 1.0
    assert "lpips" not in results  # left out offline, not faked
