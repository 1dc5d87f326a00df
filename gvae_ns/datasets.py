"""Blender-format datasets on disk: validation and low-resolution training copies.

The layout is the one nerfstudio's ``blender-data`` dataparser reads: ``transforms_{split}.json`` with
``camera_angle_x`` and ``frames`` whose ``file_path`` (without extension) names a PNG relative to the
dataset directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from gvae_ns.atomic import atomic_write

SPLITS = ("train", "val", "test")
_PIXEL_KEYS = ("w", "h", "fl_x", "fl_y", "cx", "cy")


def _load_transforms(file: Path) -> dict:
    if not file.is_file():
        raise ValueError(
            f"{file} is missing: a Blender-format dataset needs one transforms_<split>.json per split "
            f"(train, val, test). Point --data at the dataset folder, or generate one with gvae-synthetic."
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). "
            f"Fix or regenerate the file."
        ) from None
    if not isinstance(meta, dict) or "camera_angle_x" not in meta or "frames" not in meta:
        raise ValueError(
            f"{file} must be a JSON object with 'camera_angle_x' (horizontal field of view in radians) and "
            f"'frames' (a list of {{file_path, transform_matrix}}); found keys "
            f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__}."
        )
    if not isinstance(meta["frames"], list) or not meta["frames"]:
        raise ValueError(f"{file}: 'frames' must be a non-empty list of frames.")
    return meta


def _frame_images(file: Path, meta: dict) -> List[Path]:
    images = []
    for i, frame in enumerate(meta["frames"]):
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise ValueError(f"{file}: frame {i} needs both 'file_path' and 'transform_matrix'.")
        if np.asarray(frame["transform_matrix"], dtype=object).shape != (4, 4):
            raise ValueError(f"{file}: frame {i} 'transform_matrix' must be a 4x4 camera-to-world matrix.")
        images.append(file.parent / (str(frame["file_path"]).replace("./", "") + ".png"))
    return images


def _image_size(path: Path) -> Tuple[int, int]:
    with Image.open(path) as img:
        return img.height, img.width


def check_blender_dir(path: Path | str, splits: Sequence[str] = SPLITS) -> Dict[str, Tuple[int, int]]:
    """Check that ``path`` is a readable Blender-format dataset and return ``{split: (height, width)}``.

    Raises ValueError naming the file and the problem for a missing directory, a missing or malformed
    ``transforms_<split>.json``, frames whose image is missing, or images of different sizes in a split.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(
            f"Blender dataset directory {root} does not exist or is not a directory. Point --data at a folder "
            f"holding transforms_train.json, transforms_val.json and transforms_test.json, or generate one "
            f"with gvae-synthetic."
        )
    sizes: Dict[str, Tuple[int, int]] = {}
    for split in splits:
        file = root / f"transforms_{split}.json"
        images = _frame_images(file, _load_transforms(file))
        missing = [img for img in images if not img.is_file()]
        if missing:
            raise ValueError(
                f"{file}: {len(missing)} of {len(images)} frames reference images that do not exist, the first "
                f"is {missing[0]} (file_path + '.png', relative to {root}). Restore the images or remove "
                f"those frames."
            )
        found = {img: _image_size(img) for img in images}
        first = found[images[0]]
        odd = [img for img, size in found.items() if size != first]
        if odd:
            raise ValueError(
                f"{file}: all images of a split must have one size (nerfstudio reads it from the first "
                f"frame), but {images[0]} is {first[1]}x{first[0]} and {odd[0]} is "
                f"{found[odd[0]][1]}x{found[odd[0]][0]}."
            )
        sizes[split] = first
    return sizes


def box_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks of an ``[H, W]`` or ``[H, W, C]`` image (H, W divisible by
    ``factor``). With 2 or 4 channels the last is taken as straight alpha and colours are averaged
    premultiplied, so edges do not pick up the colour stored under transparent pixels. Returns float64 in
    the input's value range."""
    img = np.asarray(image, np.float64)
    h, w = img.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"image of {w}x{h} pixels is not divisible by the downscale factor {factor}.")
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]

    def pool(x: np.ndarray) -> np.ndarray:
        return x.reshape(h // factor, factor, w // factor, factor, x.shape[-1]).mean((1, 3))

    if img.shape[-1] in (2, 4):
        top = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
        alpha = img[..., -1:] / top
        mean_alpha = pool(alpha)
        premult = pool(img[..., :-1] * alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            color = np.where(mean_alpha > 0, premult / mean_alpha, pool(img[..., :-1]))
        out = np.concatenate([color, mean_alpha * top], -1)
    else:
        out = pool(img)
    return out[..., 0] if squeeze else out


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object (a record to redo)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def _save_downscaled(src: Path, dst: Path, factor: int) -> None:
    with Image.open(src) as img:
        data = np.asarray(img if img.mode in ("L", "LA", "RGB", "RGBA", "I;16") else img.convert("RGBA"))
    small = np.clip(np.round(box_downscale(data, factor)), 0, np.iinfo(data.dtype).max).astype(data.dtype)
    atomic_write(dst, lambda tmp: Image.fromarray(small).save(tmp, format="PNG"))


def _scale_pixel_keys(entry: dict, factor: int) -> dict:
    out = dict(entry)
    for key in _PIXEL_KEYS:
        if key in out:
            out[key] = int(out[key]) // factor if key in ("w", "h") else out[key] / factor
    return out


def _scaled_meta(meta: dict, factor: int) -> dict:
    """Rescale optional pixel-unit intrinsics (``w``, ``h``, ``fl_x``, ...) at the top level and per frame."""
    out = _scale_pixel_keys(meta, factor)
    out["frames"] = [_scale_pixel_keys(frame, factor) for frame in meta["frames"]]
    return out


def downscale_blender(src: Path | str, dst: Path | str, factor: int, splits: Sequence[str] = ("train",)) -> Path:
    """Copy the Blender-format dataset ``src`` to ``dst`` with the images of ``splits`` box-filtered down
    by the integer ``factor``; the other splits' images, every ``transforms_*.json`` (pixel-unit
    intrinsics rescaled where present) and ``points_gt.npy`` are copied unchanged. Returns ``dst``."""
    src_dir, dst_dir = Path(src), Path(dst)
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"downscale_blender: factor must be an integer >= 1, got {factor!r}.")
    if dst_dir.resolve() == src_dir.resolve():
        raise ValueError(f"downscale_blender: destination {dst_dir} is the source; choose another folder.")
    files = sorted(src_dir.glob("transforms_*.json")) if src_dir.is_dir() else []
    present = [file.stem[len("transforms_") :] for file in files]
    sizes = check_blender_dir(src_dir, list(dict.fromkeys([*splits, *present])))
    for split in splits:
        height, width = sizes[split]
        if height % factor or width % factor:
            raise ValueError(
                f"{src_dir / f'transforms_{split}.json'}: the {split} images are {width}x{height} pixels, not "
                f"divisible by the downscale factor {factor}; pick a factor that divides both sides."
            )
    for split, file in zip(present, files, strict=True):
        meta = _load_transforms(file)
        shrink = split in splits and factor > 1
        for image in _frame_images(file, meta):
            rel = Path(os.path.relpath(image, src_dir))
            if rel.parts[0] == "..":
                raise ValueError(
                    f"{file}: image {image} lies outside {src_dir}, so it cannot be mirrored into {dst_dir}."
                )
            target = dst_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if shrink:
                _save_downscaled(image, target, factor)
            else:
                atomic_write(target, lambda tmp, image=image: shutil.copyfile(image, tmp))
        write_json(dst_dir / file.name, _scaled_meta(meta, factor) if shrink else meta)
    points = src_dir / "points_gt.npy"
    if points.is_file():
        atomic_write(dst_dir / points.name, lambda tmp: shutil.copyfile(points, tmp))
    return dst_dir
