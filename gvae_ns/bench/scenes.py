"""gvae-bench scenes: a dataset on disk read into one record of frames and a held-out split, whatever its layout.

Layouts (:func:`detect_layout`):

* **Blender** (``transforms_{train,val,test}.json``, ``camera_angle_x``): square pixels, principal point at the
  centre, no distortion; the held-out frames are its test split (val is left out).
* **nerfstudio-data** (``transforms.json``; ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h`` once for all frames or
  per frame, often ``k1``, ``k2``, ``p1``, ``p2``): the intrinsics and distortion each frame gets are the ones
  nerfstudio's dataparser would give it (:func:`gvae_ns.data_checks.frame_intrinsics`).
* **COLMAP** (``cameras`` / ``images`` ``.bin`` or ``.txt``): read by nerfstudio's own COLMAP dataparser, which
  turns the reconstruction into nerfstudio-data frames (its camera models, its OpenCV -> OpenGL pose convention,
  its world convention).

Every frame is checked first (:func:`gvae_ns.data_checks.check_dataset`: the files, each image, each pose, the
intrinsics); what the benchmark cannot score (fisheye or other non-pinhole cameras, a 4th radial coefficient) is
refused here, before anything is written or trains. Captures hold out every N-th frame in file-name order for
scoring (:func:`holdout_split`) and a few frames between them for validation (:func:`validation_split`: the
views gvae-refine checks its fine-tune on, so that the scored views never decide anything).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from nerfstudio.cameras.cameras import CAMERA_MODEL_TO_TYPE, CameraType
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from PIL import Image

from gvae_ns.bench.config import CaptureConfig
from gvae_ns.data_checks import DataCheckError, check_dataset, frame_distortion, frame_intrinsics

LAYOUTS = ("blender", "nerfstudio", "colmap")
COLMAP_DEFAULTS = (Path("colmap/sparse/0"), Path("sparse/0"))
"""Where a COLMAP reconstruction is looked for, relative to the capture: ns-process-data's, then COLMAP's own."""
KEPT_KEYS = ("applied_transform", "applied_scale", "orientation_override")
"""Top-level transforms.json keys a copy of a nerfstudio-data capture keeps (they place the world frame)."""
NS_PROCESS_DATA_TRANSFORM = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]]
"""The applied_transform nerfstudio assumes for a capture with colmap/sparse/0 and none in its transforms.json."""


@dataclass(frozen=True)
class Frame:
    """One image and its camera."""

    name: str
    """The image's path relative to the dataset folder (POSIX); frames are sorted by it and splits list it."""
    image: Path
    """The image file."""
    c2w: Tuple[Tuple[float, ...], ...]
    """Camera-to-world 4x4 in nerfstudio's convention (OpenGL: x right, y up, looking down -z)."""
    fx: float
    """Focal length along x in pixels."""
    fy: float
    """Focal length along y in pixels."""
    cx: float
    """Principal point x in pixels (pixel centres at +0.5, nerfstudio's and COLMAP's convention)."""
    cy: float
    """Principal point y in pixels."""
    width: int
    """Image width in pixels."""
    height: int
    """Image height in pixels."""
    distortion: Tuple[float, ...] = (0.0,) * 6
    """k1, k2, k3, k4, p1, p2 (nerfstudio's order); all zero for a pinhole camera."""

    @property
    def distorted(self) -> bool:
        """Whether any distortion coefficient is non-zero."""
        return any(v != 0.0 for v in self.distortion)

    def scaled(self, factor: int) -> "Frame":
        """The camera of this frame's image box-filtered down by ``factor``: focal lengths, principal point and size
        divided together (pixel centres stay at +0.5), distortion coefficients unchanged (they act on normalized
        image coordinates)."""
        return replace(self, fx=self.fx / factor, fy=self.fy / factor, cx=self.cx / factor, cy=self.cy / factor,
                       width=self.width // factor, height=self.height // factor)


@dataclass
class Scene:
    """A dataset as the benchmark uses it: every frame, the held-out ones, and where the cameras came from."""

    root: Path
    """The dataset folder."""
    layout: str
    """One of :data:`LAYOUTS`."""
    source: Path
    """The file the cameras were read from (named in messages and in the results)."""
    frames: Tuple[Frame, ...]
    """Every frame, sorted by name."""
    test: Tuple[str, ...]
    """Names of the held-out (scored) frames."""
    val: Tuple[str, ...]
    """Names of the validation frames (neither trained on nor scored; gvae-refine checks its fine-tune on them)."""
    split: str
    """How the held-out frames were chosen, in words (for the results)."""
    camera_model: str = "OPENCV"
    """nerfstudio-data ``camera_model`` (a pinhole model with OpenCV distortion)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Top-level keys a nerfstudio-data copy keeps (:data:`KEPT_KEYS`)."""
    points: Optional[Path] = None
    """A point cloud nerfstudio initialises from: a .ply, or a COLMAP reconstruction folder with points3D."""

    @property
    def train(self) -> Tuple[Frame, ...]:
        """The training frames: neither held out nor validation."""
        held = {*self.test, *self.val}
        return tuple(f for f in self.frames if f.name not in held)

    @property
    def held_out(self) -> Tuple[Frame, ...]:
        """The held-out frames, in name order."""
        held = set(self.test)
        return tuple(f for f in self.frames if f.name in held)


def holdout_split(names: List[str] | Tuple[str, ...], every: int) -> Tuple[str, ...]:
    """The held-out names: every ``every``-th in sorted order, starting with the first (indices 0, N, 2N, ...:
    nerfstudio's ``--eval-mode interval``, LLFF's every 8th). Depends only on the names, not on their order."""
    if every < 2:
        raise ValueError(f"holdout_split: every must be >= 2, got {every}.")
    return tuple(sorted(names)[::every])


def validation_split(names: List[str] | Tuple[str, ...], every: int) -> Tuple[str, ...]:
    """The validation names: in sorted order, every ``2 * every``-th starting half-way between the first two
    held-out frames (indices N/2, 5N/2, ...: for N = 8 frames 4, 20, 36, ...), so never a held-out one."""
    if every < 2:
        raise ValueError(f"validation_split: every must be >= 2, got {every}.")
    return tuple(sorted(names)[every // 2 :: 2 * every])


def detect_layout(data: Path, layout: str = "auto", colmap_path: Optional[Path] = None) -> str:
    """The layout of ``data`` (:data:`LAYOUTS`); ``layout`` other than 'auto' is checked, not guessed."""
    data = Path(data)
    if data.suffix == ".json" and data.is_file():
        found = "nerfstudio"
    elif not data.is_dir():
        raise DataCheckError(f"dataset {data} does not exist or is not a directory. Point --data at a Blender "
                             "dataset, a nerfstudio-data capture (transforms.json) or a COLMAP capture.")
    elif layout != "auto":
        found = layout
    elif (data / "transforms_train.json").is_file():
        found = "blender"
    elif (data / "transforms.json").is_file():
        found = "nerfstudio"
    elif any((data / p).is_dir() for p in ((colmap_path,) if colmap_path else COLMAP_DEFAULTS)):
        found = "colmap"
    else:
        raise DataCheckError(
            f"{data} is no dataset the benchmark knows: it has no transforms_train.json (Blender), no transforms.json "
            f"(nerfstudio-data) and no {' or '.join(str(p) for p in COLMAP_DEFAULTS)} (COLMAP). Point --data at the "
            "dataset folder, or set capture.layout and capture.colmap_path.")
    if found not in LAYOUTS:
        raise DataCheckError(f"capture.layout must be one of {['auto', *LAYOUTS]}, got {layout!r}.")
    return found


def read_scene(data: Path | str, capture: Optional[CaptureConfig] = None) -> Scene:
    """Check and read the dataset at ``data``; raises :class:`DataCheckError` naming the file and the problem."""
    capture = capture or CaptureConfig()
    data = Path(data).resolve()
    layout = detect_layout(data, capture.layout, capture.colmap_path)
    if layout == "blender":
        return read_blender(data)
    if layout == "nerfstudio":
        return read_nerfstudio(data, capture.holdout_every)
    return read_colmap(data, capture.holdout_every, capture.colmap_path, capture.images_path)


# ----------------------------------------------------------------------------------------------- layouts
def _pose(matrix: Any) -> Tuple[Tuple[float, ...], ...]:
    m = np.asarray(matrix, np.float64)
    if m.shape == (3, 4):
        m = np.concatenate([m, [[0.0, 0.0, 0.0, 1.0]]])
    return tuple(tuple(float(v) for v in row) for row in m)


def _name(root: Path, image: Path) -> str:
    rel = os.path.relpath(image, root)
    return Path(rel).as_posix() if not rel.startswith("..") else f"images/{image.name}"


def _check_camera_model(source: Path, model: str, frames: Tuple[Frame, ...]) -> None:
    if CAMERA_MODEL_TO_TYPE.get(model) != CameraType.PERSPECTIVE:
        raise DataCheckError(
            f"{source}: camera_model {model} is not a pinhole camera. The benchmark renders and scores pinhole views "
            f"(gsplat, the CPU rasterizer); use a capture with one of "
            f"{sorted(k for k, v in CAMERA_MODEL_TO_TYPE.items() if v == CameraType.PERSPECTIVE)}.")
    for frame in frames:
        if frame.distortion[3] != 0.0:
            raise DataCheckError(
                f"{source}: frame {frame.name} has k4 = {frame.distortion[3]}; nerfstudio undistorts k1, k2, k3, p1, "
                "p2 only. Calibrate without k4 (COLMAP's OPENCV model) or set it to 0.")


def _sorted(frames: List[Frame], source: Path) -> Tuple[Frame, ...]:
    names = [f.name for f in frames]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataCheckError(f"{source}: {len(twice)} image(s) appear in more than one frame, e.g. {twice[0]}; "
                             "each frame needs its own image.")
    return tuple(sorted(frames, key=lambda f: f.name))


def read_blender(root: Path) -> Scene:
    """A Blender-format dataset (nerfstudio's ``blender-data`` cameras): its train and test splits."""
    check_dataset("BlenderDataParserConfig", root)
    frames: List[Frame] = []
    held: Dict[str, List[str]] = {"val": [], "test": []}
    for split in ("train", "val", "test"):
        meta = json.loads((root / f"transforms_{split}.json").read_text(encoding="utf-8"))
        for entry in meta["frames"]:
            image = root / f"{str(entry['file_path']).removeprefix('./')}.png"
            with Image.open(image) as im:
                width, height = im.size
            focal = 0.5 * width / math.tan(0.5 * float(meta["camera_angle_x"]))
            frame = Frame(_name(root, image), image, _pose(entry["transform_matrix"]), focal, focal, width / 2.0,
                          height / 2.0, width, height)
            frames.append(frame)
            if split in held:
                held[split].append(frame.name)
    return Scene(root, "blender", root / "transforms_test.json", _sorted(frames, root / "transforms_train.json"),
                 tuple(sorted(held["test"])), tuple(sorted(held["val"])),
                 "the dataset's test split (transforms_test.json)")


def read_nerfstudio(data: Path, holdout_every: int = 8) -> Scene:
    """A nerfstudio-data capture (``data`` a folder with transforms.json, or the .json file itself)."""
    check_dataset("NerfstudioDataParserConfig", data)
    source = data if data.suffix == ".json" else data / "transforms.json"
    root = source.parent
    meta = json.loads(source.read_text(encoding="utf-8"))
    frames = []
    for entry in meta["frames"]:
        path = Path(entry["file_path"])
        image = path if path.is_absolute() else root / path
        k = frame_intrinsics(meta, entry)
        frames.append(Frame(_name(root, image), image, _pose(entry["transform_matrix"]), k["fl_x"], k["fl_y"],
                            k["cx"], k["cy"], int(k["w"]), int(k["h"]), frame_distortion(meta, entry)))
    ordered = _sorted(frames, source)
    model = str(meta.get("camera_model", "OPENCV"))
    _check_camera_model(source, model, ordered)
    extra = {key: meta[key] for key in KEPT_KEYS if key in meta}
    if "applied_transform" not in extra and (root / COLMAP_DEFAULTS[0]).is_dir():
        extra["applied_transform"] = NS_PROCESS_DATA_TRANSFORM  # what nerfstudio's parser assumes there
    points = root / meta["ply_file_path"] if "ply_file_path" in meta else None
    names = [f.name for f in ordered]
    test, val = holdout_split(names, holdout_every), validation_split(names, holdout_every)
    return Scene(root, "nerfstudio", source, ordered, test, val, _split_words(holdout_every, test, val, names),
                 model, extra, points if points is not None and points.is_file() else None)


def _split_words(every: int, test: Tuple[str, ...], val: Tuple[str, ...], names: List[str]) -> str:
    nth = f"{every}{ {2: 'nd', 3: 'rd'}.get(every % 10 if every % 100 not in (12, 13) else 0, 'th')}"
    return (f"every {nth} frame in file-name order from the first (LLFF's convention, nerfstudio's eval-mode "
            f"interval): {len(test)} of {len(names)} frames held out and scored; {len(val)} more (every "
            f"{2 * every}th from index {every // 2}) validate the refinement's fine-tune; "
            f"{len(names) - len(test) - len(val)} train")


def read_colmap(root: Path, holdout_every: int = 8, colmap_path: Optional[Path] = None,
                images_path: Path = Path("images")) -> Scene:
    """A COLMAP capture, through nerfstudio's COLMAP dataparser (its camera models and conventions)."""
    if colmap_path is None:
        colmap_path = next((p for p in COLMAP_DEFAULTS if (root / p).is_dir()), COLMAP_DEFAULTS[0])
    check_dataset("ColmapDataParserConfig", root, SimpleNamespace(images_path=images_path, colmap_path=colmap_path))
    recon = root / colmap_path
    parser = ColmapDataParserConfig(data=root, colmap_path=colmap_path, images_path=images_path).setup()
    try:
        meta = parser._get_all_images_and_cameras(recon)  # nerfstudio's COLMAP -> nerfstudio-data frames
    except (NotImplementedError, AssertionError, ValueError) as err:
        raise DataCheckError(f"{recon}: nerfstudio cannot read this reconstruction's cameras ({type(err).__name__}: "
                             f"{err or 'unsupported'}). Re-export it with a PINHOLE, SIMPLE_RADIAL, RADIAL or OPENCV "
                             "camera model.") from None
    frames = []
    for entry in meta["frames"]:
        if any(float(entry.get(k, 0.0)) != 0.0 for k in ("k4", "k5", "k6")):
            raise DataCheckError(f"{recon}: image {Path(entry['file_path']).name} has a camera with k4/k5/k6, which "
                                 "nerfstudio reads differently from COLMAP; re-export with the OPENCV model.")
        image = Path(entry["file_path"])
        frames.append(Frame(_name(root, image), image, _pose(entry["transform_matrix"]), float(entry["fl_x"]),
                            float(entry["fl_y"]), float(entry["cx"]), float(entry["cy"]), int(entry["w"]),
                            int(entry["h"]), frame_distortion({}, entry)))
    source = recon / ("images.bin" if (recon / "images.bin").is_file() else "images.txt")
    ordered = _sorted(frames, source)
    _check_camera_model(source, str(meta["camera_model"]), ordered)
    has_points = (recon / "points3D.bin").is_file() or (recon / "points3D.txt").is_file()
    names = [f.name for f in ordered]
    test, val = holdout_split(names, holdout_every), validation_split(names, holdout_every)
    return Scene(root, "colmap", source, ordered, test, val, _split_words(holdout_every, test, val, names),
                 "OPENCV", {"applied_transform": meta["applied_transform"]}, recon if has_points else None)
