"""Scoring a trained run at full resolution on its held-out test cameras (PSNR, SSIM, LPIPS / BRISQUE where
available, Chamfer, counts, render speed), with the model's own rendering code; optionally also at the training
copy's resolution (the same views rendered smaller, against the test images box-averaged down).

Used by gvae-bench, ``scripts/eval_refinement.py`` and the tests; it imports nothing of the harness.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from gvae_ns import metrics
from gvae_ns.bench.config import BenchError
from gvae_ns.datasets import atomic_write, box_downscale
from gvae_ns.offline import stock_checkpoint_loading
from gvae_ns.refine.result import load_refinement


# ---------------------------------------------------------------------------------------------- evaluation
SSIM_WINDOW = 11
"""SSIM's window (:func:`gvae_ns.metrics.ssim`): a training-resolution view smaller than this gets no SSIM."""


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_pipeline(config_path: Path | str):
    """Load a trained run for evaluation on its test split (nerfstudio's ``eval_setup``)."""
    # nerfstudio's method registry imports this plugin's model: import it when a run is loaded, not before
    from nerfstudio.utils.eval_utils import eval_setup

    config_path = Path(config_path)
    if not config_path.is_file():
        raise BenchError(f"{config_path} does not exist: point at the config.yml of a finished ns-train run.")
    # gaussianvae checkpoints load as they are; stock splatfacto's hold numpy scalars, allowed by name
    ours = "method_name: gaussianvae" in config_path.read_text()
    with (contextlib.nullcontext() if ours else stock_checkpoint_loading()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _, pipeline, _, _ = eval_setup(config_path, test_mode="test")
    pipeline.eval()
    return pipeline


def attach_refinement(model: torch.nn.Module, refinement: Optional[Path]) -> Dict[str, Any]:
    """Attach the refinement file (or detach any, with None) to a gaussianvae model; returns its counts."""
    if not hasattr(model, "set_refinement"):
        if refinement is not None:
            raise BenchError(f"{type(model).__name__} cannot take a refinement; only gaussianvae runs can.")
        return {}
    if refinement is None:
        model.set_refinement(None, note="benchmark: the run as trained")
        return {}
    # tied to the run it was made from: a refinement of another run of the same size is refused
    refined_set = load_refinement(refinement, num_original=model.gauss_params["means"].shape[0],
                                  expected=model.provenance())
    model.show_refinement(refined_set)
    if not model.refinement_active:
        raise BenchError(f"{refinement}: attached but not active (show_refined off or GVAE_REFINED=0?).")
    counts = {"num_original": refined_set.num_original, "num_added": refined_set.num_added,
              "num_refined": int(len(refined_set.selected))}
    removed = getattr(refined_set, "removed", None)
    if removed is not None:
        counts["num_removed"] = int(len(removed))
    return counts


def _test_dataset(pipeline):
    dm = pipeline.datamanager
    dataset = getattr(dm, "test_dataset", None)
    return dataset if dataset is not None else dm.eval_dataset


def _gt_on_background(dataset, index: int, background: torch.Tensor) -> torch.Tensor:
    image = torch.from_numpy(dataset.get_numpy_image(index).astype(np.float32) / 255.0)
    if image.shape[-1] == 4:
        alpha = image[..., 3:]
        image = image[..., :3] * alpha + background.to(image) * (1.0 - alpha)
    return image


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def save_png(path: Path, image: torch.Tensor | np.ndarray) -> None:
    """Write an ``[H, W, 3]`` float image in [0, 1] (or uint8) as PNG, atomically."""
    pixels = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 else _to_uint8(torch.as_tensor(image))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept and len(kept) == len(values) else None


def evaluate_pipeline(
    pipeline,
    points_gt: Optional[np.ndarray] = None,
    max_views: Optional[int] = None,
    chamfer_opacity: float = 0.5,
    save_view: Optional[int] = None,
    save_to: Optional[Path] = None,
    gt_to: Optional[Path] = None,
    lpips: bool = True,
    brisque: bool = True,
    train_factor: Optional[int] = None,
) -> Dict[str, Any]:
    """Render the pipeline's test cameras at their full resolution and score them against the test images.

    Returns means over the views (``psnr``, ``ssim``, ``lpips``, ``brisque``: None where unavailable), the
    per-view lists, ``ms_per_view`` (render only, after one untimed warm-up), ``num_gaussians`` (the refined
    set when one is attached), ``chamfer_opaque`` / ``chamfer_all`` (to ``points_gt``; None without it), and
    the resolution. ``save_view`` is written to ``save_to`` (and its ground truth to ``gt_to``) as PNG.
    With ``train_factor`` > 1 every view is also rendered at 1/``train_factor`` of its size (focal lengths,
    principal point and size scaled together, as the training copies are) and scored against the test image
    box-averaged down by that factor (the copies' filter): ``psnr_at_train``, ``ssim_at_train`` and
    ``train_height`` / ``train_width`` (None without it). A view whose size is not a multiple of the factor is
    first cropped at the bottom and right to one (view and image alike; fewer than ``train_factor`` rows and
    columns).
    """
    model = pipeline.model
    model.eval()
    dataset = _test_dataset(pipeline)
    cameras = dataset.cameras
    n = len(dataset) if max_views is None else min(len(dataset), max_views)
    if n == 0:
        raise BenchError("the test split has no views to evaluate.")
    distortion = getattr(cameras, "distortion_params", None)
    if distortion is not None and bool((distortion[:n] != 0).any()):
        raise BenchError(
            "the test cameras have lens distortion, but the renderers draw pinhole views and the test images are read "
            "as stored. Score undistorted test views: run gvae-bench on the capture (its copies undistort the "
            "held-out images), or undistort them to pinhole cameras in the dataset.")
    lowres = train_factor is not None and train_factor > 1
    per_view: Dict[str, List[Optional[float]]] = {
        k: [] for k in ("psnr", "ssim", "lpips", "brisque", "psnr_at_train", "ssim_at_train")}
    train_size: Tuple[Optional[int], Optional[int]] = (None, None)
    times: List[float] = []
    size: Tuple[int, int] = (0, 0)
    with torch.no_grad():
        model.get_outputs_for_camera(cameras[0:1].to(model.device))  # warm-up (kernels, caches)
        for i in range(n):
            camera = cameras[i : i + 1].to(model.device)
            sync()
            start = time.perf_counter()
            out = model.get_outputs_for_camera(camera)
            sync()
            times.append(time.perf_counter() - start)
            rgb = out["rgb"].float().clamp(0, 1).cpu()
            background = out.get("background")
            background = torch.ones(3) if background is None else background.float().cpu()
            gt = _gt_on_background(dataset, i, background)
            if gt.shape != rgb.shape:
                raise BenchError(f"test view {i}: rendered {tuple(rgb.shape)} but the image is {tuple(gt.shape)}.")
            size = (int(gt.shape[0]), int(gt.shape[1]))
            per_view["psnr"].append(float(metrics.psnr(rgb, gt)))
            per_view["ssim"].append(float(metrics.ssim(rgb, gt)))
            score = metrics.lpips_or_none(rgb, gt) if lpips else None
            per_view["lpips"].append(None if score is None else float(score))
            per_view["brisque"].append(_brisque(rgb) if brisque else None)
            if lowres:
                small, kept = _divisible_view(cameras[i : i + 1], size, train_factor)
                small.rescale_output_resolution(1.0 / train_factor, scale_rounding_mode="round")
                rgb_small = model.get_outputs_for_camera(small.to(model.device))["rgb"].float().clamp(0, 1).cpu()
                gt_kept = gt[: kept[0], : kept[1]].numpy()
                gt_small = torch.from_numpy(box_downscale(gt_kept, train_factor).astype(np.float32))
                if gt_small.shape != rgb_small.shape:
                    raise BenchError(f"test view {i} at 1/{train_factor}: rendered {tuple(rgb_small.shape)} but the "
                                     f"averaged-down image is {tuple(gt_small.shape)}.")
                train_size = (int(gt_small.shape[0]), int(gt_small.shape[1]))
                per_view["psnr_at_train"].append(float(metrics.psnr(rgb_small, gt_small)))
                tiny = min(train_size) < SSIM_WINDOW  # SSIM's window does not fit: left out (None)
                per_view["ssim_at_train"].append(None if tiny else float(metrics.ssim(rgb_small, gt_small)))
            if save_view == i and save_to is not None:
                save_png(save_to, rgb)
                if gt_to is not None:
                    save_png(gt_to, gt)
        means = model.means.detach()
        opacity = torch.sigmoid(model.opacities.detach()).reshape(-1)
    if not lowres:
        for key in ("psnr_at_train", "ssim_at_train"):
            per_view.pop(key)
    result: Dict[str, Any] = {k: _mean(v) for k, v in per_view.items()}
    result.setdefault("psnr_at_train", None)
    result.setdefault("ssim_at_train", None)
    result["per_view"] = per_view
    result["train_height"], result["train_width"] = train_size
    result["views"] = n
    result["height"], result["width"] = size
    result["ms_per_view"] = 1000.0 * float(np.mean(times))
    result["num_gaussians"] = int(means.shape[0])
    result["chamfer_opaque"] = result["chamfer_all"] = None
    result["num_opaque"] = int((opacity > chamfer_opacity).sum())
    if points_gt is not None:
        points = torch.as_tensor(np.asarray(points_gt, np.float32))
        centres = means.float().cpu()
        opaque = centres[(opacity > chamfer_opacity).cpu()]
        result["chamfer_all"] = metrics.chamfer_distance(centres, points) if len(centres) else None
        result["chamfer_opaque"] = metrics.chamfer_distance(opaque, points) if len(opaque) else None
    return result


def _divisible_view(camera, size: Tuple[int, int], factor: int):
    """``camera`` (one view of ``size`` = (height, width) px) cropped at the bottom and right to the largest
    multiple of ``factor`` (the principal point is measured from the top-left, so it stays), and that kept
    (height, width). Undistorted capture views (e.g. 539x959) are seldom divisible by the factor."""
    kept = (size[0] - size[0] % factor, size[1] - size[1] % factor)
    if kept == size:
        return camera, kept
    if min(kept) == 0:
        raise BenchError(f"a test view of {size[1]}x{size[0]} px is smaller than the training factor {factor}.")
    camera = camera[:]  # a new dataclass, so that replacing its sizes leaves the dataset's cameras as they are
    camera.height = torch.full_like(camera.height, kept[0])
    camera.width = torch.full_like(camera.width, kept[1])
    return camera, kept


def _brisque(image: torch.Tensor) -> Optional[float]:
    try:
        return metrics.brisque_or_none(image)
    except Exception as err:  # the optional package fails on some images (e.g. tiny or flat ones)
        warnings.warn(f"BRISQUE failed on a test view ({type(err).__name__}: {err}); left out.", RuntimeWarning)
        return None


def evaluate_run(
    config_path: Path | str,
    refinement: Optional[Path] = None,
    points_gt: Optional[np.ndarray] = None,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Load a trained run, attach ``refinement`` (gaussianvae only; None = the run as trained) and score it with
    :func:`evaluate_pipeline` (``kwargs`` go there)."""
    pipeline = load_pipeline(config_path)
    try:
        counts = attach_refinement(pipeline.model, refinement)
        result = evaluate_pipeline(pipeline, points_gt=points_gt, **kwargs)
        result.update(counts)
        return result
    finally:
        del pipeline
        free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


