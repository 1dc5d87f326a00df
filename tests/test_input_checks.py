"""Bad input is refused before anything trains: every frame of Blender, nerfstudio-data and COLMAP datasets,
and every refinement option. Unit tests on :mod:`gvae_ns.data_checks` and ``check_refine_options``, then a few
``ns-train`` runs that check the exit status (2), the single paragraph and that no run directory was made."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gvae_ns.data_checks import DataCheckError, check_dataset
from gvae_ns.model import GaussianVAEModelConfig
from gvae_ns.stages import StageSchedule
from gvae_ns.trainer import RunConfigError, check_refine_options

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def blender(tmp_path_factory) -> Path:
    from gvae_ns.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("blender"), resolution=32, n_train=4, n_test=3, n_val=2,
                       supersample=1, n_points=200)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _png(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)


# -------------------------------------------------------------------------------------------- Blender
def test_blender_scene_passes_and_returns_the_train_size(blender):
    assert check_dataset("BlenderDataParserConfig", blender) == (32, 32)


def _edit_frames(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta["frames"])
    path.write_text(json.dumps(meta))


def test_blender_missing_image_in_a_later_split_and_frame(blender, tmp_path):
    data = _copy(blender, tmp_path / "d")
    frames = json.loads((data / "transforms_test.json").read_text())["frames"]
    last = data / f"{frames[-1]['file_path']}.png"
    last.unlink()
    with pytest.raises(DataCheckError, match=r"transforms_test\.json: frame 2 names the image .* does not exist"):
        check_dataset("BlenderDataParserConfig", data)


def test_blender_frame_without_file_path(blender, tmp_path):
    data = _copy(blender, tmp_path / "d")
    _edit_frames(data / "transforms_val.json", lambda frames: frames[1].pop("file_path"))
    with pytest.raises(DataCheckError, match=r"transforms_val\.json: frame 1 has no 'file_path'"):
        check_dataset("BlenderDataParserConfig", data)


def test_blender_mixed_sizes_in_a_split(blender, tmp_path):
    data = _copy(blender, tmp_path / "d")
    frames = json.loads((data / "transforms_train.json").read_text())["frames"]
    _png(data / f"{frames[2]['file_path']}.png", 16, 32)
    with pytest.raises(DataCheckError, match=r"share one size.* is 32x32 and .* is 16x32"):
        check_dataset("BlenderDataParserConfig", data)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_blender_unreadable_image(blender, tmp_path, damage):
    data = _copy(blender, tmp_path / "d")
    frames = json.loads((data / "transforms_train.json").read_text())["frames"]
    image = data / f"{frames[3]['file_path']}.png"
    raw = image.read_bytes()
    image.write_bytes(b"not a png at all" if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(DataCheckError, match=r"frame 3: the image .* cannot be read"):
        check_dataset("BlenderDataParserConfig", data)


def test_blender_transforms_not_json(blender, tmp_path):
    data = _copy(blender, tmp_path / "d")
    (data / "transforms_val.json").write_text("{ nope")
    with pytest.raises(DataCheckError, match=r"transforms_val\.json is not valid JSON"):
        check_dataset("BlenderDataParserConfig", data)


# ------------------------------------------------------------------------------------ nerfstudio-data
def _nerfstudio_capture(root: Path, n: int = 5, width: int = 24, height: int = 40) -> Path:
    frames = []
    for i in range(n):
        _png(root / "images" / f"frame_{i:05d}.png", width, height)
        frames.append({"file_path": f"images/frame_{i:05d}.png", "transform_matrix": np.eye(4).tolist()})
    meta = {"fl_x": 30.0, "fl_y": 30.0, "cx": width / 2, "cy": height / 2, "w": width, "h": height,
            "k1": 0.01, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames}
    (root / "transforms.json").write_text(json.dumps(meta))
    return root


def test_nerfstudio_capture_passes(tmp_path):
    data = _nerfstudio_capture(tmp_path / "cap")
    assert check_dataset("NerfstudioDataParserConfig", data) == (24, 40)
    assert check_dataset("NerfstudioDataParserConfig", data / "transforms.json") == (24, 40)


def test_nerfstudio_missing_image_frame_and_size(tmp_path):
    data = _nerfstudio_capture(tmp_path / "cap")
    (data / "images" / "frame_00004.png").unlink()
    with pytest.raises(DataCheckError, match=r"frame 4 names the image .*frame_00004\.png, which does not exist"):
        check_dataset("NerfstudioDataParserConfig", data)
    _png(data / "images" / "frame_00004.png", 24, 40)
    _edit_frames(data / "transforms.json", lambda frames: frames[0].pop("file_path"))
    with pytest.raises(DataCheckError, match=r"frame 0 has no 'file_path'"):
        check_dataset("NerfstudioDataParserConfig", data)


def test_nerfstudio_image_size_must_match_the_declared_size(tmp_path):
    data = _nerfstudio_capture(tmp_path / "cap")
    _png(data / "images" / "frame_00003.png", 40, 24)  # rotated: landscape in a portrait capture
    with pytest.raises(DataCheckError, match=r"frame 3 declares 24x40 .* is 40x24"):
        check_dataset("NerfstudioDataParserConfig", data)


def test_nerfstudio_per_frame_sizes_are_honoured(tmp_path):
    data = _nerfstudio_capture(tmp_path / "cap")
    _png(data / "images" / "frame_00003.png", 12, 20)
    _edit_frames(data / "transforms.json", lambda frames: frames[3].update(w=12, h=20))
    # nerfstudio's rule: a top-level w / h holds for every frame, so frame 3's own size is ignored
    with pytest.raises(DataCheckError, match=r"frame 3 declares 24x40 .* is 12x20"):
        check_dataset("NerfstudioDataParserConfig", data)
    meta = json.loads((data / "transforms.json").read_text())
    for frame in meta["frames"]:
        frame.setdefault("w", meta["w"])
        frame.setdefault("h", meta["h"])
    del meta["w"], meta["h"]
    (data / "transforms.json").write_text(json.dumps(meta))
    assert check_dataset("NerfstudioDataParserConfig", data) == (24, 40)


def test_nerfstudio_frames_need_a_pose_and_intrinsics(tmp_path):
    data = _nerfstudio_capture(tmp_path / "cap")
    _edit_frames(data / "transforms.json", lambda frames: frames[2].pop("transform_matrix"))
    with pytest.raises(DataCheckError, match=r"frame 2 \(images/frame_00002\.png\) has no camera pose"):
        check_dataset("NerfstudioDataParserConfig", data)
    _edit_frames(data / "transforms.json", lambda frames: frames[2].update(transform_matrix=[[1, 0], [0, 1]]))
    with pytest.raises(DataCheckError, match=r"frame 2 .* not a 4x4 matrix"):
        check_dataset("NerfstudioDataParserConfig", data)
    _edit_frames(data / "transforms.json", lambda frames: frames[2].update(transform_matrix=np.eye(4).tolist()))
    meta = json.loads((data / "transforms.json").read_text())
    del meta["fl_y"], meta["cx"]
    (data / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(DataCheckError, match=r"frame 0 \(images/frame_00000\.png\) has no fl_y, cx, and the file "
                                             r"gives none at the top level"):
        check_dataset("NerfstudioDataParserConfig", data)
    _edit_frames(data / "transforms.json", lambda frames: [f.update(fl_y=30.0, cx=12.0) for f in frames])
    assert check_dataset("NerfstudioDataParserConfig", data) == (24, 40)


# --------------------------------------------------------------------------------------------- COLMAP
def _colmap_capture(root: Path, n: int = 4, width: int = 30, height: int = 20) -> Path:
    sparse = root / "colmap" / "sparse" / "0"
    sparse.mkdir(parents=True)
    (sparse / "cameras.txt").write_text(f"# camera list\n1 OPENCV {width} {height} 25 25 15 10 0.01 0 0 0\n")
    lines = ["# image list"]
    for i in range(n):
        _png(root / "images" / f"im{i}.png", width, height)
        lines += [f"{i + 1} 1 0 0 0 0 0 {i} 1 im{i}.png", ""]
    (sparse / "images.txt").write_text("\n".join(lines) + "\n")
    (sparse / "points3D.txt").write_text("# empty\n")
    return root


def test_colmap_capture_passes_and_catches_each_fault(tmp_path):
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    data = _colmap_capture(tmp_path / "cap")
    parser = ColmapDataParserConfig(data=data)
    assert check_dataset("ColmapDataParserConfig", data, parser) == (30, 20)

    (data / "images" / "im3.png").unlink()
    with pytest.raises(DataCheckError, match=r"images\.txt: image im3\.png names the image .* does not exist"):
        check_dataset("ColmapDataParserConfig", data, parser)
    _png(data / "images" / "im3.png", 20, 30)
    with pytest.raises(DataCheckError, match=r"im3\.png is 20x30 but its COLMAP camera 1 is 30x20"):
        check_dataset("ColmapDataParserConfig", data, parser)
    (data / "images" / "im3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataCheckError, match=r"im3\.png cannot be read"):
        check_dataset("ColmapDataParserConfig", data, parser)
    with pytest.raises(DataCheckError, match=r"does not exist: set --colmap-path"):
        check_dataset("ColmapDataParserConfig", data, ColmapDataParserConfig(data=data, colmap_path=Path("nope")))
    (data / "colmap" / "sparse" / "0" / "images.txt").write_text("1 1 0 0 0 0 0 0 1 im0.png\n\n")
    (data / "colmap" / "sparse" / "0" / "cameras.txt").write_text("2 PINHOLE 30 20 25 25 15 10\n")
    with pytest.raises(DataCheckError, match=r"uses camera 1, which .* does not define"):
        check_dataset("ColmapDataParserConfig", data, parser)


# ------------------------------------------------------------------------------------ refine options
SCHEDULE = StageSchedule((4, 2, 1), (10, 10, 10))


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"extrapolate_stages": 0}, "extrapolate-stages is 0"),
        ({"extrapolate_stages": 5}, "extrapolate-stages is 5"),
        ({"extrapolate_fraction": 0.0}, "extrapolate-fraction is 0.0"),
        ({"extrapolate_fraction": 1.5}, "extrapolate-fraction is 1.5"),
        ({"decoder_steps": 0}, "decoder-steps is 0"),
        ({"extrapolate_fraction": 1e-6}, "selects none"),
    ],
)
def test_refine_options_out_of_range(changes, words):
    config = GaussianVAEModelConfig(**changes)
    with pytest.raises(RunConfigError, match=words):
        check_refine_options(config, SCHEDULE, expected_gaussians=50_000)


def test_one_stage_schedule_with_refinement_on_is_refused_and_allowed_when_off():
    one = StageSchedule((1,), (30,))
    with pytest.raises(RunConfigError, match="is one stage"):
        check_refine_options(GaussianVAEModelConfig(), one, expected_gaussians=50_000)
    check_refine_options(GaussianVAEModelConfig(refinement_after_training=False), one, expected_gaussians=50_000)
    check_refine_options(GaussianVAEModelConfig(extrapolate_select="all", extrapolate_fraction=1e-6), SCHEDULE, 50_000)


# --------------------------------------------------------------------------------------------- ns-train
FLAGS = ["--vis", "tensorboard", "--machine.device-type", "cpu", "--pipeline.model.stage-downscales", "4", "2",
         "1", "--pipeline.model.stage-steps", "5", "5", "5", "--max-num-iterations", "15"]


def _ns_train(output: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([str(BIN / "ns-train"), "gaussianvae", "--output-dir", str(output), *FLAGS, *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("case", ["extrapolate-stages", "missing-test-image", "colmap-size"])
def test_ns_train_refuses_before_training_with_exit_status_2(blender, tmp_path, case):
    if case == "extrapolate-stages":
        args = ["--pipeline.model.extrapolate-stages", "7", "blender-data", "--data", str(blender)]
        words = "extrapolate-stages is 7"
    elif case == "missing-test-image":
        data = _copy(blender, tmp_path / "d")
        frames = json.loads((data / "transforms_test.json").read_text())["frames"]
        (data / f"{frames[1]['file_path']}.png").unlink()
        args, words = ["blender-data", "--data", str(data)], "frame 1 names the image"
    else:
        data = _colmap_capture(tmp_path / "cap", width=64, height=48)
        _png(data / "images" / "im2.png", 48, 64)
        args, words = ["colmap", "--data", str(data)], "but its COLMAP camera 1 is 64x48"
    proc = _ns_train(tmp_path / "out", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = [line for line in proc.stderr.splitlines() if line.startswith("ns-train gaussianvae:")]
    assert len(message) == 1 and words in message[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("config.yml"))


def test_old_refinement_flag_names_still_work_and_say_the_new_ones(capsys):
    """The 0.1 names (--pipeline.model.refine-steps ...) map onto the new fields for one release."""
    import tyro

    config = tyro.cli(GaussianVAEModelConfig, args=["--refine-steps", "3", "--refine-fraction", "0.5",
                                                    "--refine-vae-steps", "7", "--refine-after-training", "False"])
    assert (config.extrapolate_stages, config.extrapolate_fraction, config.decoder_steps) == (3, 0.5, 7)
    assert config.refinement_after_training is False and config.refine_steps is None
    out = capsys.readouterr().out
    assert "--pipeline.model.refine-steps is deprecated, use --pipeline.model.extrapolate-stages" in " ".join(out.split())
    assert "run-dir" not in " ".join(tyro.extras.get_parser(GaussianVAEModelConfig).format_help().split())


def test_prior_decoder_is_refused_before_training_when_no_prior_is_installed(monkeypatch):
    from gvae_ns import trainer

    check_refine_options(GaussianVAEModelConfig(decoder="prior"), SCHEDULE, expected_gaussians=50_000)  # shipped

    def missing():
        raise trainer.PriorUnavailable("/x/manifest.json: no cross-scene prior is installed here")

    monkeypatch.setattr(trainer, "read_manifest", missing)
    for decoder in ("prior", "prior-tuned"):
        with pytest.raises(RunConfigError, match=f"--pipeline.model.decoder {decoder}: /x/manifest.json: no cross"):
            check_refine_options(GaussianVAEModelConfig(decoder=decoder), SCHEDULE, expected_gaussians=50_000)
    check_refine_options(GaussianVAEModelConfig(decoder="temporal"), SCHEDULE, expected_gaussians=50_000)


def test_ns_train_refines_with_the_shipped_prior_when_asked(blender, tmp_path):
    """--pipeline.model.decoder prior: the refinement after training uses the shipped prior, fits nothing."""
    proc = _ns_train(tmp_path / "out", "--pipeline.model.decoder", "prior", "--pipeline.model.finetune-steps", "0",
                     "--pipeline.model.num-random", "300", "--pipeline.model.extrapolate-fraction", "0.5",
                     "blender-data", "--data", str(blender))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "out").rglob("config.yml")).parent
    assert (run / "refinement.pt").is_file() and not (run / "vae.pt").exists()
    record = torch.load(run / "refinement.pt", weights_only=True)
    assert record["decoder"] == "prior"
