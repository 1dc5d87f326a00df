"""gvae-bench reports: the results table, the crop figure, the environment record."""

from __future__ import annotations

import math
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from gvae_ns.bench.config import BenchConfig
from gvae_ns.bench.plan import use_stock_splatfacto
from gvae_ns.datasets import atomic_write, write_json

TILE_PAD = 6
"""Pixels between the tiles of the crop figure (and around it)."""
TILE_CAPTION = 16
"""Height in pixels of the caption strip above each tile of the crop figure."""
BLIND_SPOT = (128, 128, 128)
"""Colour of a crop-figure tile whose model has no render (failed or not run yet)."""

# ------------------------------------------------------------------------------------------------ reporting
def slug_path(output: Path, row_name: str) -> Path:
    path = output.resolve() / "rows" / f"{row_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def render_path(output: Path, row_name: str) -> Path:
    """PNG of ``row_name``'s render of the figure view."""
    return output.resolve() / "renders" / f"{row_name}.png"


def _fmt(value: Optional[float], digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _scale(factor: int) -> str:
    return "full" if factor == 1 else f"x{factor}"


_COLUMNS = (
    ("PSNR ↑", "psnr", 2), ("SSIM ↑", "ssim", 4), ("PSNR train res ↑", "psnr_at_train", 2),
    ("SSIM train res ↑", "ssim_at_train", 4), ("LPIPS ↓", "lpips", 4), ("BRISQUE ↓", "brisque", 1),
    ("CD opaque ↓", "chamfer_opaque", 5), ("CD all ↓", "chamfer_all", 5), ("Gaussians", "num_gaussians", 0),
    ("train s", "train_s", 1), ("refine s", "refine_s", 1), ("ms/view", "ms_per_view", 1),
)
_BEST = {"psnr": max, "ssim": max, "psnr_at_train": max, "ssim_at_train": max, "lpips": min}


def format_table(results: Dict[str, Any]) -> str:
    """The markdown report of a results dict (``results.json``): a header, one table row per model (best PSNR /
    SSIM / LPIPS of each scale in bold, the oracle aside), then notes and the rows that have no result."""
    rows: List[dict] = results.get("rows", [])
    env = results.get("environment", {})
    data = results.get("dataset", {})
    suite = results.get("suite", {})
    lines = [f"# {suite.get('name', 'gvae-bench')}", ""]
    if data:
        lines.append(f"Dataset `{data.get('path')}`: {data.get('test_views')} test view(s) scored at "
                     f"{data.get('width')}x{data.get('height')} px; training copies {data.get('factors')}.")
        if data.get("split"):
            lines.append(f"Held out: {data['split']}.")
    if suite:
        budget = results.get("budget") or {}
        if budget.get("finetune"):
            steps = (f"gaussianvae trained for {budget['ours']} steps through its stages and its refined rows add "
                     f"{budget['finetune']} fine-tune steps; the baselines and the oracle trained for "
                     f"{budget['baselines']} steps, the same budget")
        else:
            steps = f"Every row trained for {suite.get('steps')} steps"
        lines.append(f"{steps} ({suite.get('jobs')} training(s) at once) on {env.get('device', 'unknown device')}.")
    lines.append("")
    lines.append("| scale | method | " + " | ".join(c[0] for c in _COLUMNS) + " |")
    lines.append("|---|---|" + "---:|" * len(_COLUMNS))
    ok = [r for r in rows if r.get("status") == "ok"]
    best: Dict[Tuple[int, str], float] = {}
    for factor in {r["factor"] for r in ok if r["factor"] != 1}:
        for key, pick in _BEST.items():
            vals = [r["metrics"].get(key) for r in ok if r["factor"] == factor]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            if vals:
                best[(factor, key)] = pick(vals)
    for r in ok:
        cells = []
        for _, key, digits in _COLUMNS:
            value = r.get(key) if key in ("train_s", "refine_s") else r["metrics"].get(key)
            text = _fmt(value, digits)
            if key == "refine_s" and value is not None and r.get("refine_includes_vae"):
                text += "*"
            if value is not None and best.get((r["factor"], key)) == value:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {_scale(r['factor'])} | {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Notes:"]
    lines.append("- PSNR / SSIM / LPIPS against the test images at full resolution (alpha put on the "
                 f"{suite.get('background', 'white')} background); bold: best of the scale (oracle excluded).")
    sizes = sorted({(r["metrics"].get("train_width"), r["metrics"].get("train_height")) for r in ok
                    if r["metrics"].get("train_width")})
    if sizes:
        lines.append("- PSNR / SSIM train res: the same test views rendered at the training copy's resolution ("
                     + ", ".join(f"{w}x{h}" for w, h in sizes) + " px; focal lengths, principal point and size "
                     "scaled by 1/factor) against the test images box-averaged down by the factor, as the copies "
                     "were made (a view not divisible by the factor first loses its last rows and columns to "
                     "the nearest multiple): what refinement must not trade away.")
    lines.append(f"- CD: Chamfer distance (mean squared nearest-neighbour distance, both ways) between Gaussian "
                 f"centres and the dataset's points_gt.npy; 'opaque' keeps opacity > {suite.get('chamfer_opacity')}.")
    lines.append("- train s: from config.yml to the last checkpoint (trainer set-up + steps; process start-up "
                 "excluded); trainings that ran at once shared the device. ms/view: render only, after a warm-up.")
    lines.append("- refine s: refine_run wall time (loads the run, then extrapolates); * includes training the "
                 "decoder (the lineage VAE; for GD head rows the densification head; the 3DGS-split rows learn nothing). "
                 "'3DGS split, no learning' rows are the control: 3DGS's split of the same selection, the same "
                 "family rule (opacity conserved, scales / 1.6), no decoder; ours minus them is what the learned part "
                 "adds.")
    if env.get("baselines"):
        lines.append(f"- Baselines: {env['baselines']}")
    lines += [f"- {note}" for note in data.get("notes", [])]
    lines += learned_part_lines(ok)
    lines += train_resolution_lines(ok)
    if any(r["metrics"].get("lpips") is None for r in ok):
        lines.append("- LPIPS n/a: AlexNet weights not on disk (never downloaded).")
    if any(r["metrics"].get("brisque") is None for r in ok):
        lines.append("- BRISQUE n/a: the optional brisque package is not installed (or failed).")
    missing = [r for r in rows if r.get("status") != "ok"]
    if missing:
        lines += ["", "Rows without a result:"]
        for r in missing:
            reason = str(r.get("error") or r.get("status", "pending")).strip().splitlines()
            lines.append(f"- {_scale(r['factor'])} {r['label']} ({r.get('status', 'pending')}): "
                         f"{reason[0] if reason else ''}")
    return "\n".join(lines) + "\n"


_LEARNED = {"temporal": "lineage VAE", "generative": "densification head", "prior": "shipped prior",
            "prior-tuned": "shipped prior, fine-tuned"}


def learned_part_lines(rows: List[dict]) -> List[str]:
    """Notes: each learned row's PSNR minus the best no-learning control of its run, stage count and selection
    (the 3DGS split of the same selection, the fine-tune alone), with its sign; and the refinement step against
    the same run unrefined."""
    psnr = {(r.get("run"), r.get("extrapolate_stages"), r.get("refine_select"), r.get("refine_decoder")):
            r["metrics"].get("psnr") for r in rows}
    out: List[str] = []
    for r in rows:
        decoder, k, select = r.get("refine_decoder"), r.get("extrapolate_stages"), r.get("refine_select")
        if decoder not in _LEARNED or k is None:
            continue
        controls = [v for v in (psnr.get((r.get("run"), k, select, "split")),
                                next((p for key, p in psnr.items() if key[0] == r.get("run") and key[1] == k
                                      and key[3] == "none"), None)) if v is not None]
        unrefined = psnr.get((r.get("run"), None, None, None))
        parts = []
        if controls:
            parts.append(f"the learned part {r['metrics']['psnr'] - max(controls):+.2f} dB (against the best "
                         "no-learning control)")
        if unrefined is not None:
            parts.append(f"the refinement step {r['metrics']['psnr'] - unrefined:+.2f} dB (against the run unrefined)")
        if parts:
            out.append(f"- {_scale(r['factor'])} {r['label']} ({_LEARNED[decoder]}): " + "; ".join(parts) + ".")
    return out


def train_resolution_lines(rows: List[dict]) -> List[str]:
    """Notes: at the training resolution, each gaussianvae row's PSNR minus antialiased splatfacto's of the same
    factor, with its sign (the issue's 'nothing traded away' check)."""
    out: List[str] = []
    for factor in sorted({r["factor"] for r in rows if r["factor"] != 1}):
        same = [r for r in rows if r["factor"] == factor and r["metrics"].get("psnr_at_train") is not None]
        base = next((r for r in same if r["kind"] == "baseline" and "antialiased" in r["name"]), None)
        ours = [r for r in same if r["kind"] == "ours"]
        if base is None or not ours:
            continue
        ref = base["metrics"]["psnr_at_train"]
        deltas = ", ".join(f"{r['label']} {r['metrics']['psnr_at_train'] - ref:+.2f}" for r in ours)
        out.append(f"- {_scale(factor)} at the training resolution, PSNR against {base['label']} "
                   f"({ref:.2f} dB): {deltas} dB.")
    return out


def pick_crop(reference: np.ndarray, crop: int) -> Tuple[int, int]:
    """Top-left ``(y, x)`` of the ``crop x crop`` window with the most image detail (gradient energy)."""
    img = np.asarray(reference, np.float64)
    if img.ndim == 3:
        img = img.mean(-1)
    h, w = img.shape
    crop = min(crop, h, w)
    energy = np.zeros_like(img)
    energy[:, 1:] += np.abs(np.diff(img, axis=1))
    energy[1:, :] += np.abs(np.diff(img, axis=0))
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[crop:, crop:] - integral[:-crop, crop:] - integral[crop:, :-crop] + integral[:-crop, :-crop]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x)


def figure_size(rows: int, cols: int, tile: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of a crop figure with ``rows x cols`` tiles of ``tile`` pixels."""
    return cols * tile + (cols + 1) * TILE_PAD, rows * (tile + TILE_CAPTION) + (rows + 1) * TILE_PAD


def crop_figure(
    grid: Sequence[Sequence[Tuple[str, Optional[Path]]]],
    reference: Path,
    output: Path,
    crop_px: Optional[int] = None,
    tile_px: int = 192,
) -> Path:
    """Draw the same crop of every image side by side: ``grid[r][c] = (caption, png or None)``.

    The crop is the most detailed ``crop_px`` square of ``reference`` (default a quarter of its shorter side,
    at least 16 px), enlarged by the integer factor that brings it closest to ``tile_px`` without exceeding it
    (at least 1). A missing image is a grey tile. The figure is :func:`figure_size` pixels; written atomically."""
    ref = np.asarray(Image.open(reference).convert("RGB"))
    h, w = ref.shape[:2]
    crop = min(h, w, crop_px if crop_px else max(16, min(h, w) // 4))
    y, x = pick_crop(ref, crop)
    zoom = max(1, tile_px // crop)
    tile = crop * zoom
    cols = max(len(r) for r in grid)
    width, height = figure_size(len(grid), cols, tile)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    max_chars = max(4, tile // 6)
    for r, line in enumerate(grid):
        top = TILE_PAD + r * (tile + TILE_CAPTION + TILE_PAD)
        for c, (caption, path) in enumerate(line):
            left = TILE_PAD + c * (tile + TILE_PAD)
            draw.text((left, top + 2), caption[:max_chars], fill=(0, 0, 0))
            patch = None
            if path is not None and Path(path).is_file():
                image = Image.open(path).convert("RGB")
                if image.size == (w, h):
                    patch = image.crop((x, y, x + crop, y + crop)).resize((tile, tile), Image.NEAREST)
            if patch is None:
                patch = Image.new("RGB", (tile, tile), BLIND_SPOT)
            canvas.paste(patch, (left, top + TILE_CAPTION))
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda tmp: canvas.save(tmp, format="PNG"))
    return output


def figure_grid(output: Path, rows: Sequence[dict]) -> List[List[Tuple[str, Optional[Path]]]]:
    """One figure row per LR factor: LR baseline (antialiased preferred), best-PSNR ours, oracle, ground truth."""
    ok = {r["name"]: r for r in rows if r.get("status") == "ok"}
    oracle = next((r for r in rows if r["kind"] == "oracle"), None)
    gt = output.resolve() / "renders" / "gt.png"
    grid = []
    for factor in sorted({r["factor"] for r in rows if r["factor"] != 1}):
        same = [r for r in rows if r["factor"] == factor]
        bases = sorted((r for r in same if r["kind"] == "baseline"), key=lambda r: "antialiased" not in r["name"])
        base = next((r for r in bases if r["name"] in ok), bases[0] if bases else None)
        ours = [r for r in same if r["kind"] == "ours"]
        scored = [r for r in ours if r["name"] in ok]
        best = max(scored, key=lambda r: (r.get("extrapolate_stages") is not None, r["metrics"]["psnr"] or -1.0),
                   default=ours[0] if ours else None)
        line = []
        for role, row in (("LR", base), ("ours", best), ("oracle", oracle)):
            if row is None:
                line.append((f"{role}: none", None))
            else:
                path = render_path(output, row["name"]) if row["name"] in ok else None
                label = row["label"].rsplit(" (", 1)[0] if row["label"].endswith(")") else row["label"]
                line.append((f"x{factor} {label}" if role != "oracle" else "oracle (full res)", path))
        line.append(("ground truth", gt))
        grid.append(line)
    if not grid and oracle is not None:
        ok_oracle = oracle["name"] in ok
        grid.append([("oracle (full res)", render_path(output, oracle["name"]) if ok_oracle else None),
                     ("ground truth", gt)])
    return grid


def environment(cfg: BenchConfig) -> Dict[str, Any]:
    """Device and software versions, and what the baselines are."""
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    if torch.cuda.is_available():
        device = f"CUDA: {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({os.cpu_count()} cores, project's CPU rasterizer)"
    stock = use_stock_splatfacto(cfg)
    return {
        "device": device,
        "torch": torch.__version__,
        "nerfstudio": installed("nerfstudio"),
        "gsplat": installed("gsplat"),
        "baselines": "stock ns-train splatfacto (gsplat)" if stock else (
            "splatfacto (CPU renderer): gaussianvae with one stage at the training resolution and no refinement, "
            "i.e. splatfacto's densification and losses rendered by the project's CPU rasterizer (compiled, or the "
            "PyTorch reference where no compiler is available)"),
    }


def write_reports(cfg: BenchConfig, results: Dict[str, Any]) -> None:
    """Write results.json, results.md and crops.png into the output directory."""
    out = cfg.output.resolve()
    write_json(out / "results.json", results)
    text = format_table(results)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    gt = out / "renders" / "gt.png"
    if gt.is_file():
        crop_figure(figure_grid(out, results["rows"]), gt, out / "crops.png", cfg.crop_px, cfg.tile_px)


