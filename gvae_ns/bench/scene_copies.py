"""gvae-bench scene copies: a :class:`~gvae_ns.bench.scenes.Scene` written as nerfstudio-data at the benchmark's
resolutions, the form every capture run trains and is scored on.

A copy holds every frame of the scene, in one ``transforms.json`` with per-frame intrinsics and the split written
out (``train_filenames`` / ``val_filenames`` / ``test_filenames``, which nerfstudio's dataparser obeys):

* training and validation frames box-filtered by ``train_downscale``: focal lengths, principal point and size
  divided by it, distortion coefficients unchanged, so nerfstudio's datamanager undistorts them as it would the
  originals (the validation frames are the unseen low-resolution views gvae-refine checks its fine-tune on);
* held-out frames box-filtered by ``test_downscale`` and, where the camera has distortion, undistorted to a
  pinhole camera with nerfstudio's own undistortion (the one its datamanager applies to training images), since
  gsplat and the CPU rasterizer render pinhole views: the evaluator then compares renders with these images as
  they are.

Images are written as PNG (JPEG inputs are decoded once, never compressed again), each atomically, and
``transforms.json`` last, so an interrupted copy is never mistaken for a finished one.
"""

from __future__ import annotations

import math
import os
import shutil
from functools import reduce
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.datamanagers.full_images_datamanager import _undistort_image
from nerfstudio.process_data.colmap_utils import create_ply_from_colmap
from PIL import Image

from gvae_ns.atomic import atomic_write
from gvae_ns.bench.scenes import Frame, Scene
from gvae_ns.data_checks import DISTORTION_KEYS, DataCheckError
from gvae_ns.datasets import box_downscale, write_json

COPY_FORMAT = 1
"""Version of the copies' layout (in their ``gvae_bench`` record; a change remakes them)."""


def check_downscales(scene: Scene, downscales: Mapping[str, int]) -> None:
    """Raise :class:`DataCheckError` for the first frame whose width or height one of ``downscales`` (``{what it
    is: factor}``) does not divide, naming the file, the frame and the factors that would divide every image."""
    common = reduce(math.gcd, [v for f in scene.frames for v in (f.width, f.height)])
    fits = [d for d in range(2, min(common, 64) + 1) if common % d == 0]
    for frame in scene.frames:
        for what, factor in downscales.items():
            if frame.width % factor or frame.height % factor:
                raise DataCheckError(
                    f"{scene.source}: frame {frame.name} is {frame.width}x{frame.height} pixels, and {what} = {factor} "
                    f"does not divide that ({frame.width}/{factor} = {frame.width / factor:g}, {frame.height}/{factor} "
                    f"= {frame.height / factor:g}). Downscales that divide every image of this capture: "
                    f"{', '.join(map(str, fits)) or 'none above 1'}; choose capture.score_downscale and factors "
                    "whose products are among them.")


def copy_name(frame: Frame) -> str:
    """Where the copy keeps ``frame``'s image, relative to the copy (the same path, as PNG)."""
    return Path(frame.name).with_suffix(".png").as_posix()


def _load(image: Path) -> np.ndarray:
    with Image.open(image) as im:
        alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
        return np.asarray(im.convert("RGBA" if alpha else "RGB"))


def _shrink(pixels: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return pixels
    return np.clip(np.round(box_downscale(pixels, factor)), 0, 255).astype(np.uint8)


def undistort(pixels: np.ndarray, frame: Frame) -> Tuple[np.ndarray, Frame]:
    """``pixels`` seen by ``frame``'s camera, undistorted to a pinhole camera by nerfstudio's datamanager code
    (OpenCV, bilinear, cropped to the valid pixels); returns the image and its pinhole camera."""
    if not frame.distorted:
        return pixels, frame
    camera = Cameras(camera_to_worlds=torch.eye(4)[:3], fx=frame.fx, fy=frame.fy, cx=frame.cx, cy=frame.cy,
                     width=frame.width, height=frame.height,
                     distortion_params=torch.tensor(frame.distortion, dtype=torch.float32),
                     camera_type=CameraType.PERSPECTIVE)
    K = camera.get_intrinsics_matrices().numpy()
    K, image, _ = _undistort_image(camera, camera.distortion_params.numpy(), {}, pixels, K)
    pinhole = Frame(frame.name, frame.image, frame.c2w, float(K[0, 0]), float(K[1, 1]), float(K[0, 2]),
                    float(K[1, 2]), int(image.shape[1]), int(image.shape[0]))
    return np.ascontiguousarray(image), pinhole


def _frame_entry(frame: Frame, file_path: str) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"file_path": file_path, "transform_matrix": [list(row) for row in frame.c2w],
                             "fl_x": frame.fx, "fl_y": frame.fy, "cx": frame.cx, "cy": frame.cy,
                             "w": frame.width, "h": frame.height}
    entry.update(zip(DISTORTION_KEYS, frame.distortion))
    return entry


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def _write_points(scene: Scene, dst: Path) -> Dict[str, str]:
    if scene.points is None:
        return {}
    if scene.points.is_dir():  # a COLMAP reconstruction: its points3D as nerfstudio's ns-process-data writes them
        staging = dst / ".points"
        staging.mkdir(parents=True, exist_ok=True)
        transform = scene.extra.get("applied_transform")
        create_ply_from_colmap("sparse_pc.ply", scene.points, staging,
                               None if transform is None else torch.tensor(transform, dtype=torch.float32))
        os.replace(staging / "sparse_pc.ply", dst / "sparse_pc.ply")
        staging.rmdir()
        return {"ply_file_path": "sparse_pc.ply"}
    atomic_write(dst / "points.ply", lambda tmp: shutil.copyfile(scene.points, tmp))
    return {"ply_file_path": "points.ply"}


def write_copy(scene: Scene, dst: Path | str, train_downscale: int, test_downscale: int) -> Dict[str, Any]:
    """Write ``scene`` into ``dst`` as nerfstudio-data: training frames at 1/``train_downscale``, held-out frames at
    1/``test_downscale`` and pinhole (module docstring). Returns the copy's record (also in its transforms.json
    under ``gvae_bench``): source, layout, split, downscales, sizes and whether the held-out views were
    undistorted."""
    dst = Path(dst)
    if dst.resolve() == scene.root.resolve():
        raise DataCheckError(f"write_copy: the destination {dst} is the capture itself; choose another folder.")
    check_downscales(scene, {"train_downscale": train_downscale, "test_downscale": test_downscale})
    names = [copy_name(f) for f in scene.frames]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DataCheckError(f"{scene.source}: two images would both be copied to {twice} (same name, different "
                             "extensions); rename one of them.")
    held = set(scene.test)
    frames: List[Dict[str, Any]] = []
    sizes: Dict[str, Tuple[int, int]] = {}
    for frame in scene.frames:
        name = copy_name(frame)
        test = frame.name in held
        pixels = _shrink(_load(frame.image), test_downscale if test else train_downscale)
        camera = frame.scaled(test_downscale if test else train_downscale)
        if test:
            pixels, camera = undistort(pixels, camera)
        _save_png(dst / name, pixels)
        frames.append(_frame_entry(camera, name))
        sizes.setdefault("test" if test else "train", (camera.width, camera.height))
    test_names = [copy_name(f) for f in scene.held_out]
    val_names = [copy_name(f) for f in scene.frames if f.name in set(scene.val)]
    train_names = [copy_name(f) for f in scene.train]
    record = {"format": COPY_FORMAT, "source": str(scene.source), "layout": scene.layout, "split": scene.split,
              "test_frames": list(scene.test), "val_frames": list(scene.val), "train_downscale": train_downscale,
              "test_downscale": test_downscale,
              "test_undistorted": any(f.distorted for f in scene.held_out),
              "train_size": list(sizes.get("train", (0, 0))), "test_size": list(sizes.get("test", (0, 0)))}
    meta: Dict[str, Any] = {"camera_model": scene.camera_model, **scene.extra, **_write_points(scene, dst),
                            "frames": frames,
                            "train_filenames": train_names, "val_filenames": val_names, "test_filenames": test_names,
                            "gvae_bench": record}
    write_json(dst / "transforms.json", meta)
    return record


def copy_notes(scene: Scene, record: Mapping[str, Any]) -> List[str]:
    """What a results table should say about how ``scene`` was split, scaled and approximated (``record``: the
    :func:`write_copy` record of the copy the held-out views are scored from)."""
    shown = ", ".join(scene.test[:3]) + (", ..." if len(scene.test) > 3 else "")
    notes = [f"Held-out frames: {shown}; validation frames (gvae-refine's fine-tune check, at the training "
             f"resolution): {', '.join(scene.val) or 'none'}; {len(scene.train)} frames train."]
    if scene.layout == "blender":
        return notes
    first = scene.held_out[0] if scene.held_out else scene.frames[0]
    w, h = first.width // record["test_downscale"], first.height // record["test_downscale"]
    notes.append(f"Scored at 1/{record['test_downscale']} of the capture ({w}x{h} px, box-filtered); the training "
                 "copies are box-filtered further, with focal lengths, principal point and image size divided by the "
                 "same factor and the distortion coefficients unchanged.")
    if record.get("test_undistorted"):
        coeffs = ", ".join(f"{k} {v:.4g}" for k, v in zip(DISTORTION_KEYS, first.distortion) if v)
        tw, th = record["test_size"]
        notes.append(f"Lens distortion ({coeffs}): the renderers (gsplat, the CPU rasterizer) draw pinhole views, so "
                     "the held-out images were undistorted to pinhole cameras with nerfstudio's own undistortion "
                     f"(OpenCV, bilinear, cropped to the valid pixels: {tw}x{th} px) after the box filter, and every "
                     "row is scored against those; the resampling softens the reference images slightly. nerfstudio's "
                     "datamanager undistorts the training copies the same way before training.")
    if any(f.image.suffix.lower() in (".jpg", ".jpeg") for f in scene.frames):
        notes.append("JPEG inputs: decoded once; every copy is PNG (no second compression).")
    notes.append("A real capture: exposure and white balance are not compensated between frames (no per-image "
                 "appearance model), so PSNR counts frame-to-frame exposure differences against every row alike; "
                 "images are read in stored pixel order (EXIF orientation ignored, as nerfstudio does).")
    return notes
