"""Check every frame of a dataset before anything trains: Blender, nerfstudio-data and COLMAP layouts.

nerfstudio's dataparsers look at the first image and fail on a bad one only when the datamanager caches it,
minutes in, with a traceback from deep inside PIL or torch. :func:`check_dataset` reads what the chosen
dataparser will read, for every frame, and raises :class:`DataCheckError` with one paragraph naming the file
and the problem:

* the transforms / reconstruction files: missing, not valid JSON, no frames;
* each frame: a ``file_path`` (Blender, nerfstudio-data), an image that exists and decodes (``PIL``'s
  ``verify``, which reads the whole file without decoding pixels);
* image sizes: one size per split (Blender), the size the transforms or the COLMAP camera declare
  (nerfstudio-data, COLMAP), and large enough for the coarsest resolution stage;
* nerfstudio-data frames: a camera pose (``transform_matrix``) and the intrinsics ``fl_x``, ``fl_y``, ``cx``,
  ``cy``, ``w``, ``h``, resolved as nerfstudio resolves them (:func:`frame_intrinsics`: a key at the top level
  holds for every frame, else each frame needs its own).

The first image size found is returned so the caller can check it against the stage schedule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

BLENDER_SPLITS = ("train", "val", "test")
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
"""The pinhole intrinsics (pixels) nerfstudio-data needs for every frame, at the top level or per frame."""
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
"""nerfstudio's distortion coefficients, in the order of ``camera_utils.get_distortion_params``."""


class DataCheckError(ValueError):
    """A dataset that cannot train; the message names the file and the problem."""


def check_dataset(parser: str, data: Path, parser_config: object = None) -> Optional[Tuple[int, int]]:
    """Check the dataset at ``data`` as dataparser ``parser`` (its config class name) will read it.

    Returns ``(width, height)`` of the first training image, or ``None`` for a dataparser this module does
    not know (nothing is checked then). Raises :class:`DataCheckError`.
    """
    if parser == "BlenderDataParserConfig":
        return _check_blender(data)
    if parser == "NerfstudioDataParserConfig":
        return _check_nerfstudio(data)
    if parser == "ColmapDataParserConfig":
        images = Path(getattr(parser_config, "images_path", "images"))
        colmap = Path(getattr(parser_config, "colmap_path", "colmap/sparse/0"))
        return _check_colmap(data, data / colmap, data / images)
    return None


# ----------------------------------------------------------------------------------------------- shared
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataCheckError(f"{path} is missing. Point --data at a dataset directory, or pick the matching "
                             "dataparser subcommand (blender-data, nerfstudio-data, colmap).")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataCheckError(f"{path} is not valid JSON ({err}); regenerate or fix the file.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise DataCheckError(f"{path} has no non-empty 'frames' list: it is not a camera transforms file.")
    return meta


def _file_paths(path: Path, frames: List) -> List[str]:
    """Each frame's ``file_path``; a frame without one is an error naming its index."""
    out = []
    for i, frame in enumerate(frames):
        file_path = frame.get("file_path") if isinstance(frame, dict) else None
        if not isinstance(file_path, str) or not file_path:
            raise DataCheckError(f"{path}: frame {i} has no 'file_path', so nerfstudio cannot find its image. "
                                 "Add the image's path (relative to the dataset) or remove the frame.")
        out.append(file_path)
    return out


def _image_size(image: Path, listed_in: Path, what: str) -> Tuple[int, int]:
    """``(width, height)`` of an image that exists and reads to the end; else a DataCheckError."""
    if not image.is_file():
        raise DataCheckError(f"{listed_in}: {what} names the image {image}, which does not exist. Restore the "
                             "image or remove the frame.")
    try:
        with Image.open(image) as im:
            size = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataCheckError(f"{listed_in}: {what}: the image {image} cannot be read ({err}). Replace the "
                             "file or remove the frame.") from None
    return int(size[0]), int(size[1])


def _same_size(sizes: Dict[Path, Tuple[int, int]], listed_in: Path) -> Tuple[int, int]:
    images = list(sizes)
    first = sizes[images[0]]
    for image in images[1:]:
        if sizes[image] != first:
            raise DataCheckError(
                f"{listed_in}: images of one split must share one size, but {images[0]} is "
                f"{first[0]}x{first[1]} and {image} is {sizes[image][0]}x{sizes[image][1]}. Resize them to one "
                "size.")
    return first


# ---------------------------------------------------------------------------------------------- layouts
def _check_blender(data: Path) -> Tuple[int, int]:
    train_size: Optional[Tuple[int, int]] = None
    for split in BLENDER_SPLITS:
        path = data / f"transforms_{split}.json"
        if not path.is_file():
            raise DataCheckError(f"{path} is missing: Blender-format data wants transforms_{{train,val,test}}"
                                 ".json. Point --data at a dataset directory, or pick the matching dataparser "
                                 "subcommand (blender-data, nerfstudio-data, colmap).")
        meta = _read_json(path)
        sizes = {}
        for i, file_path in enumerate(_file_paths(path, meta["frames"])):
            image = data / f"{file_path.removeprefix('./')}.png"
            sizes[image] = _image_size(image, path, f"frame {i}")
        size = _same_size(sizes, path)
        if split == "train":
            train_size = size
    assert train_size is not None
    return train_size


def frame_intrinsics(meta: dict, frame: dict) -> Dict[str, Optional[float]]:
    """``{key: value}`` of :data:`INTRINSIC_KEYS` for one nerfstudio-data frame, as nerfstudio's dataparser
    reads them: a key at the top level of transforms.json holds for every frame (the frame's own is ignored),
    else the frame's; None where neither has it."""
    out: Dict[str, Optional[float]] = {}
    for key in INTRINSIC_KEYS:
        value = meta[key] if key in meta else frame.get(key)
        out[key] = None if value is None else float(value)
    return out


def frame_distortion(meta: dict, frame: dict) -> Tuple[float, ...]:
    """One frame's :data:`DISTORTION_KEYS` as nerfstudio's dataparser reads them: the top level's when it has any
    distortion key (or ``distortion_params``), else the frame's; missing coefficients are 0."""
    source = meta if any(k in meta for k in (*DISTORTION_KEYS, "distortion_params")) else frame
    if "distortion_params" in source:
        return tuple(float(v) for v in source["distortion_params"])
    return tuple(float(source.get(k, 0.0)) for k in DISTORTION_KEYS)


def _check_frame_camera(path: Path, meta: dict, frame: dict, i: int, file_path: str) -> Tuple[int, int]:
    """A frame's pose and intrinsics, as nerfstudio-data needs them; returns the declared ``(w, h)``."""
    pose = frame.get("transform_matrix")
    try:
        matrix = np.asarray(pose, dtype=np.float64)
    except (TypeError, ValueError):
        matrix = np.zeros(0)
    if matrix.shape not in ((4, 4), (3, 4)) or not np.isfinite(matrix).all():
        what = "has no camera pose" if pose is None else "has a camera pose that is not a 4x4 matrix of numbers"
        raise DataCheckError(
            f"{path}: frame {i} ({file_path}) {what} ('transform_matrix', camera-to-world). A frame the pose "
            "estimation could not place cannot train: remove the frame, or re-run ns-process-data / COLMAP.")
    values = frame_intrinsics(meta, frame)
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise DataCheckError(
            f"{path}: frame {i} ({file_path}) has no {', '.join(missing)}, and the file gives none at the top "
            "level. nerfstudio-data needs fl_x, fl_y, cx, cy (pixels) and w, h either once at the top level (one "
            "camera) or in every frame; add them (camera_angle_x alone is the Blender format: use blender-data).")
    bad = [k for k, v in values.items() if not (np.isfinite(v) and v > 0)]
    if bad:
        raise DataCheckError(f"{path}: frame {i} ({file_path}): {', '.join(bad)} must be positive numbers, got "
                             f"{', '.join(str(values[k]) for k in bad)}. Fix the intrinsics.")
    return int(values["w"]), int(values["h"])


def _check_nerfstudio(data: Path) -> Tuple[int, int]:
    path = data if data.suffix == ".json" else data / "transforms.json"
    root = path.parent
    meta = _read_json(path)
    first: Optional[Tuple[int, int]] = None
    for i, (frame, file_path) in enumerate(zip(meta["frames"], _file_paths(path, meta["frames"]))):
        image = Path(file_path) if Path(file_path).is_absolute() else root / file_path
        size = _image_size(image, path, f"frame {i}")
        declared = _check_frame_camera(path, meta, frame, i, file_path)
        if declared != size:
            raise DataCheckError(
                f"{path}: frame {i} declares {declared[0]}x{declared[1]} pixels (w, h) but its image {image} is "
                f"{size[0]}x{size[1]}. Fix w/h (and the intrinsics with them) or the image.")
        first = first or size
    assert first is not None
    return first


def _colmap_reconstruction(colmap: Path) -> Tuple[dict, dict]:
    # nerfstudio's own COLMAP reader: imported here, it pulls in nothing heavy, but only COLMAP runs need it
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_io

    if (colmap / "cameras.txt").is_file() and (colmap / "images.txt").is_file():
        readers = (colmap_io.read_cameras_text, colmap_io.read_images_text, "txt")
    elif (colmap / "cameras.bin").is_file() and (colmap / "images.bin").is_file():
        readers = (colmap_io.read_cameras_binary, colmap_io.read_images_binary, "bin")
    else:
        raise DataCheckError(f"{colmap} holds no COLMAP reconstruction (cameras.bin + images.bin, or the .txt "
                             "pair). Run ns-process-data or COLMAP, or set --colmap-path.")
    ext = readers[2]
    try:
        cameras = readers[0](colmap / f"cameras.{ext}")
        images = readers[1](colmap / f"images.{ext}")
    except Exception as err:  # COLMAP's readers fail with struct / index / value errors on damaged files
        raise DataCheckError(f"{colmap}: the COLMAP reconstruction cannot be read ({type(err).__name__}: "
                             f"{err}). Re-export it from COLMAP.") from None
    if not images:
        raise DataCheckError(f"{colmap / f'images.{ext}'} lists no images.")
    return cameras, images


def _check_colmap(data: Path, colmap: Path, image_dir: Path) -> Tuple[int, int]:
    if not colmap.is_dir():
        raise DataCheckError(f"COLMAP folder {colmap} does not exist: set --colmap-path (relative to --data) "
                             "to the folder with cameras.bin and images.bin.")
    cameras, images = _colmap_reconstruction(colmap)
    listed = colmap / "images.bin" if (colmap / "images.bin").is_file() else colmap / "images.txt"
    first: Optional[Tuple[int, int]] = None
    for image_id in sorted(images):
        entry = images[image_id]
        camera = cameras.get(entry.camera_id)
        if camera is None:
            raise DataCheckError(f"{listed}: image {entry.name} uses camera {entry.camera_id}, which "
                                 f"{colmap}/cameras.* does not define. Re-export the reconstruction.")
        image = image_dir / entry.name
        size = _image_size(image, listed, f"image {entry.name}")
        if size != (int(camera.width), int(camera.height)):
            raise DataCheckError(
                f"{listed}: image {image} is {size[0]}x{size[1]} but its COLMAP camera {entry.camera_id} is "
                f"{camera.width}x{camera.height}. Use the images COLMAP reconstructed from (--images-path).")
        first = first or size
    assert first is not None
    return first
