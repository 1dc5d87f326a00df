"""gvae-bench on captures (gvae_ns.bench.scenes, gvae_ns.bench.scene_copies): nerfstudio-data and COLMAP layouts,
with and without lens distortion, generated small here (portrait, off-centre principal point, JPEG).

* the LR copy's cameras put a known 3D point at the same normalized image position as the capture's own frame;
* the held-out views are undistorted to pinhole cameras correctly (a blob drawn at the distorted projection lands
  at the pinhole projection);
* the split is every N-th frame by name, stable and disjoint, the same in every copy and in nerfstudio's parser;
* a Blender scene written as nerfstudio-data gives the evaluator the same cameras and images, and scores the same;
* bad input (missing image, frame without pose, missing intrinsics, a downscale that does not divide the image,
  a fisheye camera) stops gvae-bench with one message naming the file, before anything trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.data.utils.colmap_parsing_utils import rotmat2qvec
from PIL import Image

from gvae_ns.bench import evaluate, plan, report, run
from gvae_ns.bench.config import BenchConfig, CaptureConfig
from gvae_ns.bench.scene_copies import write_copy
from gvae_ns.bench.scenes import holdout_split, read_scene, validation_split
from gvae_ns.render import rasterize
from gvae_ns.synthetic import look_at, surface_points, write_scene

WIDTH, HEIGHT = 96, 160  # portrait, not square; 1/2 and 1/4 copies divide it
INTRINSICS = {"fl_x": 100.0, "fl_y": 104.0, "cx": 46.6, "cy": 83.2}  # principal point off the centre
DISTORTION = {"k1": 0.15, "k2": -0.04, "p1": 0.002, "p2": -0.0015}
POINT = np.array([0.2, -0.1, 2.0])
"""A 3D point every camera sees, high in the frame (the cameras look at the origin from 4 units away, 1 up)."""


def _quiet(*_):
    pass


def _poses(n: int) -> np.ndarray:
    angles = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([look_at([4 * math.cos(a), 4 * math.sin(a), 1.0 + 0.1 * math.sin(3 * a)]) for a in angles])


def _project(c2w: np.ndarray, fx: float, fy: float, cx: float, cy: float, dist=(0.0,) * 6, point=POINT):
    """Pixel position (continuous, pixel centres at +0.5) of ``point`` seen by an OpenGL camera-to-world ``c2w``
    with OpenCV's radial-tangential distortion (nerfstudio's order k1, k2, k3, k4, p1, p2): what cv2 and nerfstudio's
    datamanager assume."""
    c2w = np.asarray(c2w, np.float64)
    p = c2w[:3, :3].T @ (np.asarray(point, np.float64) - c2w[:3, 3])
    x, y = p[0] / -p[2], -p[1] / -p[2]  # OpenCV normalized coordinates (y down)
    k1, k2, k3, _, p1, p2 = dist
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return fx * xd + cx, fy * yd + cy


def _dist6(d: dict) -> tuple:
    return (d.get("k1", 0.0), d.get("k2", 0.0), 0.0, 0.0, d.get("p1", 0.0), d.get("p2", 0.0))


def _image(c2w: np.ndarray, dist: dict, seed: int) -> np.ndarray:
    """A smooth random texture with a bright blob drawn where :data:`POINT` projects (with distortion)."""
    rng = np.random.default_rng(seed)
    v, u = np.meshgrid(np.arange(HEIGHT) + 0.5, np.arange(WIDTH) + 0.5, indexing="ij")
    img = np.zeros((HEIGHT, WIDTH, 3))
    for c in range(3):
        fu, fv, phase = rng.uniform(0.02, 0.08), rng.uniform(0.02, 0.08), rng.uniform(0, 6)
        img[..., c] = 40 + 30 * np.sin(fu * u + phase) * np.cos(fv * v)
    bu, bv = _project(c2w, INTRINSICS["fl_x"], INTRINSICS["fl_y"], INTRINSICS["cx"], INTRINSICS["cy"], _dist6(dist))
    blob = 180 * np.exp(-((u - bu) ** 2 + (v - bv) ** 2) / (2 * 2.5**2))
    return np.clip(np.round(img + blob[..., None]), 0, 255).astype(np.uint8)


def nerfstudio_capture(root: Path, n: int = 12, distorted: bool = True, per_frame: bool = False) -> Path:
    """A nerfstudio-data capture of JPEGs (quality 98) named out of order; intrinsics once, or per frame."""
    dist = DISTORTION if distorted else {}
    camera = {**INTRINSICS, "w": WIDTH, "h": HEIGHT, **dist}
    frames = []
    for i, c2w in enumerate(_poses(n)):
        name = f"images/frame_{(i * 7) % n:03d}.jpg"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(c2w, dist, i)).save(root / name, quality=98)
        frames.append({"file_path": name, "transform_matrix": c2w.tolist(), **(camera if per_frame else {})})
    meta = {**({} if per_frame else camera), "camera_model": "OPENCV", "frames": frames}
    (root / "transforms.json").write_text(json.dumps(meta))
    return root


def colmap_capture(root: Path, n: int = 12, distorted: bool = True) -> Path:
    """A COLMAP text reconstruction (OPENCV or PINHOLE camera) with its PNG images and a few 3D points."""
    dist = DISTORTION if distorted else {}
    sparse = root / "colmap" / "sparse" / "0"
    sparse.mkdir(parents=True)
    k = INTRINSICS
    params = f"{k['fl_x']} {k['fl_y']} {k['cx']} {k['cy']}"
    model = "PINHOLE"
    if distorted:
        model, params = "OPENCV", params + f" {dist['k1']} {dist['k2']} {dist['p1']} {dist['p2']}"
    (sparse / "cameras.txt").write_text(f"1 {model} {WIDTH} {HEIGHT} {params}\n")
    lines = []
    (root / "images").mkdir()
    for i, c2w in enumerate(_poses(n)):
        Image.fromarray(_image(c2w, dist, i)).save(root / "images" / f"im_{i:02d}.png")
        cv = c2w.copy()
        cv[:3, 1:3] *= -1  # OpenGL -> OpenCV camera axes
        w2c = np.linalg.inv(cv)
        q, t = rotmat2qvec(w2c[:3, :3]), w2c[:3, 3]
        lines += [f"{i + 1} {' '.join(map(str, q))} {' '.join(map(str, t))} 1 im_{i:02d}.png", ""]
    (sparse / "images.txt").write_text("\n".join(lines) + "\n")
    (sparse / "points3D.txt").write_text("1 0.1 0.2 0.3 200 100 50 0.5\n2 -0.2 0.1 0.0 10 20 30 0.5\n")
    return root


def _cfg(data: Path, out: Path, **capture) -> BenchConfig:
    return BenchConfig(data=data, output=out, factors=(2,), oracle=False, capture=CaptureConfig(**capture))


def _outputs(parser_config, split: str = "train"):
    return parser_config.setup().get_dataparser_outputs(split)


def _by_stem(outputs) -> dict:
    return {Path(f).stem: i for i, f in enumerate(outputs.image_filenames)}


# ------------------------------------------------------------------------------------------- intrinsics
@pytest.mark.parametrize("layout, distorted, per_frame", [
    ("nerfstudio", True, False), ("nerfstudio", False, True), ("colmap", True, False), ("colmap", False, False)])
def test_lr_copy_reprojects_a_point_to_the_same_normalized_position(tmp_path, layout, distorted, per_frame):
    src = tmp_path / "cap"
    if layout == "nerfstudio":
        nerfstudio_capture(src, distorted=distorted, per_frame=per_frame)
        original = NerfstudioDataParserConfig(data=src, downscale_factor=1, eval_mode="all")
    else:
        colmap_capture(src, distorted=distorted)
        original = ColmapDataParserConfig(data=src, downscale_factor=1, eval_mode="all", load_3D_points=False)
    _, lowres, about = plan.prepare_data(_cfg(src, tmp_path / "out", score_downscale=2), log=_quiet)
    assert about["layout"] == layout and about["train_sizes"] == {"scene": [48, 80], "x2": [24, 40]}
    full = _outputs(original)
    lr = _outputs(NerfstudioDataParserConfig(data=lowres[2], downscale_factor=1, load_3D_points=False))
    # the copy keeps every frame, so nerfstudio places the world exactly as for the capture itself
    np.testing.assert_allclose(lr.dataparser_transform.numpy(), full.dataparser_transform.numpy(), atol=1e-6)
    assert lr.dataparser_scale == pytest.approx(full.dataparser_scale, rel=1e-6)
    # the point in nerfstudio's coordinates (for COLMAP, dataparser_transform includes the world's re-axing)
    T, s = full.dataparser_transform.numpy().astype(np.float64), full.dataparser_scale
    point = s * (T[:3, :3] @ POINT + T[:3, 3])
    index = _by_stem(full)
    checked = 0
    for j, stem in enumerate(Path(f).stem for f in lr.image_filenames):
        a, b = full.cameras[index[stem]], lr.cameras[j]
        np.testing.assert_allclose(b.distortion_params.numpy(), a.distortion_params.numpy(), err_msg="unchanged")
        assert (int(b.width), int(b.height)) == (WIDTH // 4, HEIGHT // 4)
        uv = []
        for cam in (a, b):
            c2w = np.concatenate([cam.camera_to_worlds.numpy(), [[0, 0, 0, 1]]])
            u, v = _project(c2w, float(cam.fx), float(cam.fy), float(cam.cx), float(cam.cy),
                            tuple(cam.distortion_params.numpy()), point)
            uv.append((u / float(cam.width), v / float(cam.height)))
        np.testing.assert_allclose(uv[1], uv[0], atol=2e-6, err_msg=f"frame {stem}")
        assert 0.1 < uv[0][0] < 0.9 and 0.1 < uv[0][1] < 0.9, "the point is in view"
        checked += 1
    assert checked == 9, "every training frame (12 frames: 2 held out, 1 validation)"
    if layout == "colmap":  # COLMAP's 3D points come along (nerfstudio's ply), in the same world as the cameras
        parser = NerfstudioDataParserConfig(data=lowres[2], downscale_factor=1, load_3D_points=True)
        points = _outputs(parser).metadata["points3D_xyz"]
        expected = s * (np.array([[0.1, 0.2, 0.3], [-0.2, 0.1, 0.0]]) @ T[:3, :3].T + T[:3, 3])
        np.testing.assert_allclose(points.numpy(), expected, atol=1e-5)


def test_held_out_views_are_undistorted_to_pinhole_cameras(tmp_path):
    src = nerfstudio_capture(tmp_path / "cap", distorted=True)
    data, _, about = plan.prepare_data(_cfg(src, tmp_path / "out", score_downscale=2, holdout_every=3), log=_quiet)
    meta = json.loads((data / "transforms.json").read_text())
    frames = {f["file_path"]: f for f in meta["frames"]}
    assert len(meta["test_filenames"]) == 4 and len(meta["val_filenames"]) == 2
    assert any("undistorted to pinhole cameras" in note for note in about["notes"])
    for name in meta["test_filenames"]:
        f = frames[name]
        assert all(f[k] == 0.0 for k in ("k1", "k2", "k3", "k4", "p1", "p2")), "held-out views are pinhole"
        img = np.asarray(Image.open(data / name).convert("L"), np.float64)
        assert img.shape == (f["h"], f["w"])
        u, v = _project(np.asarray(f["transform_matrix"]), f["fl_x"], f["fl_y"], f["cx"], f["cy"])
        naive = _project(np.asarray(f["transform_matrix"]), *(INTRINSICS[k] / 2 for k in ("fl_x", "fl_y", "cx", "cy")))
        # the blob's centroid (pixel centres at +0.5)
        r0, c0 = int(v), int(u)
        win = img[r0 - 6 : r0 + 7, c0 - 6 : c0 + 7]
        weight = np.clip(win - np.median(win) - 40.0, 0, None)  # the blob's top, above the texture
        rows, cols = np.mgrid[r0 - 6 : r0 + 7, c0 - 6 : c0 + 7] + 0.5
        centroid = (float((weight * cols).sum() / weight.sum()), float((weight * rows).sum() / weight.sum()))
        assert np.hypot(centroid[0] - u, centroid[1] - v) < 0.2, (name, centroid, (u, v))
        assert np.hypot(naive[0] - u, naive[1] - v) > 0.5, "the distortion moves the point (the check can fail)"
    for name in meta["train_filenames"] + meta["val_filenames"]:  # they keep the camera, scaled, and its distortion
        f = frames[name]
        assert (f["fl_x"], f["cx"], f["w"], f["k1"], f["p2"]) == (50.0, 23.3, 48, DISTORTION["k1"], DISTORTION["p2"])


# ------------------------------------------------------------------------------------------------ split
def test_split_is_stable_disjoint_and_the_same_everywhere(tmp_path):
    names = [f"images/{i:04d}.jpg" for i in range(67)]
    held, val = holdout_split(names, 8), validation_split(names, 8)
    assert held == tuple(names[::8]) and len(held) == 9 and val == tuple(names[4::16]) and len(val) == 4
    assert not set(held) & set(val)
    assert holdout_split(list(reversed(names)), 8) == held, "the order frames are listed in does not matter"
    assert validation_split(list(reversed(names)), 8) == val

    src = nerfstudio_capture(tmp_path / "cap", n=20)
    cfg = dataclasses.replace(_cfg(src, tmp_path / "out"), factors=(2, 4))
    data, lowres, about = plan.prepare_data(cfg, log=_quiet)
    assert about["held_out"] == [f"images/frame_{i:03d}.jpg" for i in (0, 8, 16)]
    assert about["validation"] == ["images/frame_004.jpg"]
    assert "every 8th frame in file-name order" in about["split"]
    splits = []
    for copy in (data, lowres[2], lowres[4]):
        meta = json.loads((copy / "transforms.json").read_text())
        test, val, train = (set(meta[f"{k}_filenames"]) for k in ("test", "val", "train"))
        assert not test & train and not val & train and not test & val and len(test | val | train) == 20
        splits.append(sorted(test))
        parsed = _outputs(NerfstudioDataParserConfig(data=copy, downscale_factor=1, load_3D_points=False), "test")
        assert [Path(f).name for f in parsed.image_filenames] == ["frame_000.png", "frame_008.png", "frame_016.png"]
    assert splits[0] == splits[1] == splits[2]

    meta = json.loads((src / "transforms.json").read_text())
    meta["frames"].reverse()
    (src / "transforms.json").write_text(json.dumps(meta))
    again = plan.prepare_data(dataclasses.replace(cfg, output=tmp_path / "out2"), log=_quiet)[2]
    assert again["held_out"] == about["held_out"], "reordering the frames keeps the split"
    table = report.format_table({"dataset": about, "rows": []})
    assert "Held out: every 8th frame in file-name order" in table and "- Held-out frames: images/frame_000" in table



# ------------------------------------------------------------------------------------- Blender round trip
class _Splats(torch.nn.Module):
    """Fixed isotropic Gaussians drawn with the project's rasterizer: a stand-in for a trained run, so that one
    scene can be scored through two datasets whose world frames differ by a known similarity transform."""

    device = torch.device("cpu")

    def __init__(self, means: torch.Tensor, scale: float, colors: torch.Tensor):
        super().__init__()
        self.means, self.scale, self.colors = means, scale, colors
        self.opacities = torch.full((len(means), 1), 2.0)

    def get_outputs_for_camera(self, camera) -> dict:
        c2w = camera.camera_to_worlds[0].double()
        rot = c2w[:, :3] * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)  # OpenGL -> OpenCV, as splatfacto
        viewmat = torch.eye(4, dtype=torch.float64)
        viewmat[:3, :3], viewmat[:3, 3] = rot.T, -rot.T @ c2w[:, 3]
        n = len(self.means)
        rgb, _, _ = rasterize(self.means, torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4),
                              torch.full((n, 3), self.scale), torch.sigmoid(self.opacities[:, 0]), self.colors,
                              viewmat.float()[None], camera.get_intrinsics_matrices()[:1].float(),
                              int(camera.width[0, 0]), int(camera.height[0, 0]), backgrounds=torch.ones(1, 3))
        return {"rgb": rgb[0], "background": torch.ones(3)}


def _score(dataset, model) -> dict:
    pipeline = SimpleNamespace(model=model, datamanager=SimpleNamespace(eval_dataset=dataset))
    return evaluate.evaluate_pipeline(pipeline, lpips=False, brisque=False)


def test_blender_scene_as_nerfstudio_data_scores_the_same(tmp_path):
    blender = write_scene(tmp_path / "blender", resolution=40, n_train=4, n_test=3, n_val=2, supersample=1,
                          n_points=10)
    scene = read_scene(blender)
    assert scene.layout == "blender" and scene.test == ("test/r_0.png", "test/r_1.png", "test/r_2.png")
    assert scene.val == ("val/r_0.png", "val/r_1.png") and len(scene.train) == 4
    copy = tmp_path / "as-nerfstudio"
    write_copy(scene, copy, 1, 1)
    original = _outputs(BlenderDataParserConfig(data=blender), "test")
    converted = _outputs(NerfstudioDataParserConfig(data=copy, downscale_factor=1, load_3D_points=False), "test")
    a, b = InputDataset(original), InputDataset(converted)
    assert len(a) == len(b) == 3
    for key in ("fx", "fy", "cx", "cy", "width", "height"):
        np.testing.assert_allclose(getattr(b.cameras, key).numpy(), getattr(a.cameras, key).numpy(), rtol=1e-6)
    T = converted.dataparser_transform.double()
    s = converted.dataparser_scale
    for i in range(3):
        np.testing.assert_array_equal(b.get_numpy_image(i), a.get_numpy_image(i))
        pose = a.cameras.camera_to_worlds[i].double()
        expected = torch.cat([T[:, :3] @ pose[:, :3], (s * (T[:, :3] @ pose[:, 3] + T[:, 3]))[:, None]], 1)
        np.testing.assert_allclose(b.cameras.camera_to_worlds[i].double().numpy(), expected.numpy(), atol=1e-5)

    # one scene, placed in each dataset's world frame: the same scores within round-off
    points = torch.as_tensor(surface_points(3000, 0), dtype=torch.float64)
    colors = torch.as_tensor(np.random.default_rng(0).uniform(0.1, 0.9, (3000, 3)), dtype=torch.float32)
    placed = (s * (points @ T[:, :3].T + T[:, 3])).float()
    first = _score(a, _Splats(points.float(), 0.04, colors))
    second = _score(b, _Splats(placed, 0.04 * s, colors))
    assert 8.0 < first["psnr"] < 40.0 and (first["width"], first["height"]) == (40, 40)
    np.testing.assert_allclose(second["per_view"]["psnr"], first["per_view"]["psnr"], atol=1e-3)
    np.testing.assert_allclose(second["per_view"]["ssim"], first["per_view"]["ssim"], atol=1e-4)


# -------------------------------------------------------------------------------------------- bad input
def _bench(tmp_path, monkeypatch, capsys, data: Path, *flags: str) -> str:
    """gvae-bench's one-line message for ``data``; checks the exit status and that nothing was trained."""
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("bad input must stop before training"))
    out = tmp_path / "out"
    assert run.main(["--data", str(data), "--output", str(out), "--factors", "2", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gvae-bench: ")
    assert "\n" not in err, "one paragraph"
    assert not (out / "runs").exists()
    return err


def _edit(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_bad_captures_are_refused_with_one_message_before_training(tmp_path, monkeypatch, capsys):
    src = nerfstudio_capture(tmp_path / "cap")
    transforms = src / "transforms.json"
    err = _bench(tmp_path, monkeypatch, capsys, src, "--factors", "5")
    assert (f"{transforms}: frame images/frame_000.jpg is 96x160 pixels, and capture.score_downscale x factor 5 = 5 "
            "does not divide that (96/5 = 19.2, 160/5 = 32)") in err
    assert "Downscales that divide every image of this capture: 2, 4, 8, 16, 32" in err
    err = _bench(tmp_path, monkeypatch, capsys, src, "--capture.score-downscale", "32")
    assert "capture.score_downscale x factor 2 = 64 does not divide" in err

    (src / "images" / "frame_003.jpg").rename(src / "frame_003.jpg")
    err = _bench(tmp_path, monkeypatch, capsys, src)
    assert f"{transforms}: frame 9 names the image {src / 'images' / 'frame_003.jpg'}, which does not exist" in err
    (src / "frame_003.jpg").rename(src / "images" / "frame_003.jpg")

    _edit(transforms, lambda meta: meta["frames"][5].pop("transform_matrix"))
    err = _bench(tmp_path, monkeypatch, capsys, src)
    assert f"{transforms}: frame 5 (images/frame_011.jpg) has no camera pose ('transform_matrix'" in err
    _edit(transforms, lambda meta: meta["frames"][5].update(transform_matrix=_poses(12)[5].tolist()))

    _edit(transforms, lambda meta: meta.pop("fl_x"))
    err = _bench(tmp_path, monkeypatch, capsys, src)
    assert f"{transforms}: frame 0 (images/frame_000.jpg) has no fl_x, and the file gives none at the top level" in err
    _edit(transforms, lambda meta: meta.update(fl_x=INTRINSICS["fl_x"], camera_model="OPENCV_FISHEYE"))
    assert "camera_model OPENCV_FISHEYE is not a pinhole camera" in _bench(tmp_path, monkeypatch, capsys, src)

    cap = colmap_capture(tmp_path / "colmap")
    (cap / "images" / "im_03.png").unlink()
    err = _bench(tmp_path, monkeypatch, capsys, cap)
    assert f"{cap / 'colmap/sparse/0/images.txt'}: image im_03.png names the image" in err and "does not exist" in err

    blender = write_scene(tmp_path / "blender", resolution=16, n_train=2, n_test=1, n_val=1, supersample=1,
                          n_points=10)
    err = _bench(tmp_path, monkeypatch, capsys, blender, "--capture.score-downscale", "2")
    assert "capture.score_downscale = 2 applies to nerfstudio-data / COLMAP captures" in err


# ------------------------------------------------------------------------------------------- end to end
def test_tiny_benchmark_on_a_distorted_capture(tmp_path):
    """gvae-bench on a nerfstudio-data capture with distortion: training through nerfstudio-data copies (the
    datamanager undistorts them), the refinement checked on the validation frames, scoring on the undistorted
    held-out views; about a minute on two cores."""
    src = nerfstudio_capture(tmp_path / "cap", n=12)
    cfg = BenchConfig(
        data=src, output=tmp_path / "out", factors=(2,), steps=40, baselines=("classic",), oracle=False,
        ours_downscales=(2, 1), ours_stage_fractions=(0.5, 0.5), extrapolate_stages=(1,), refine_selects=("hessian",),
        refine_decoders=("temporal",), refine_args="--decoder-steps 20 --finetune-steps 5",
        train_args="--pipeline.model.num-random 800 --pipeline.model.random-scale 2.0 "
        "--pipeline.model.warmup-length 20 --pipeline.model.refine-every 20",
        jobs=2, crop_px=8, tile_px=32, brisque=False, lpips=False,
        capture=CaptureConfig(score_downscale=2, holdout_every=4))
    results = run.run_bench(cfg, log=_quiet)
    assert results["complete"], [r.get("error") for r in results["rows"]]
    assert [r["name"] for r in results["rows"]] == ["splatfacto-classic-x2", "ours-x2", "ours-hessian-p1-x2"]
    copy = json.loads((tmp_path / "out" / "data" / "x2" / "transforms.json").read_text())["gvae_bench"]
    for row in results["rows"]:
        m = row["metrics"]
        assert (m["width"], m["height"], m["views"]) == (*copy["test_size"], 3), "the undistorted held-out views"
        assert math.isfinite(m["psnr"]) and 0.0 < m["ssim"] <= 1.0
    data = results["dataset"]
    assert data["layout"] == "nerfstudio" and data["path"] == str(src.resolve())
    assert data["held_out"] == [f"images/frame_{i:03d}.jpg" for i in (0, 4, 8)]
    assert data["validation"] == ["images/frame_002.jpg", "images/frame_010.jpg"]
    run_config = Path(results["rows"][1]["config"]).read_text()
    assert "NerfstudioDataParserConfig" in run_config and "downscale_factor: 1" in run_config
    table = (tmp_path / "out" / "results.md").read_text()
    assert "Held out: every 4th frame" in table and "undistorted to pinhole cameras" in table
