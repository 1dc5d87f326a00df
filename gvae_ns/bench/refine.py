"""gvae-bench refinement: gvae-refine on each gaussianvae run, recorded with a fingerprint."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Optional

import tyro

from gvae_ns.bench.config import (
    BenchConfig,
    BenchError,
    RowSpec,
    fingerprint,
)
from gvae_ns.bench.evaluate import sync
from gvae_ns.datasets import read_json, write_json
from gvae_ns.prior.shipped import read_manifest
from gvae_ns.refine.cli import RefineConfig, refine_run
from gvae_ns.run_layout import DECODER_FILES, RunLayout


# ---------------------------------------------------------------------------------------------- refinement
def refinement_path(output: Path, row: RowSpec) -> Path:
    """Where the benchmark keeps ``row``'s refinement file."""
    return output.resolve() / "refinements" / f"{row.name}.pt"


REFINE_METHOD = 3
"""Bumped when what a refinement computes changes (3: the fine-tune's densification is opt-in), so older ones are
made again."""


def _refine_fingerprint(cfg: BenchConfig, row: RowSpec, run_record: dict) -> str:
    spec = {"run": [run_record.get("fingerprint"), run_record.get("finished_at")], "steps": row.extrapolate_stages,
            "select": row.refine_select, "fraction": cfg.refine_fraction, "args": shlex.split(cfg.refine_args),
            "method": REFINE_METHOD}
    if row.refine_decoder not in (None, "temporal"):  # temporal refinements made before the field stay valid
        spec["decoder"] = row.refine_decoder
    if row.refine_decoder in ("prior", "prior-tuned"):  # another shipped prior makes the row again
        spec["prior_sha256"] = read_manifest()["sha256"]
    return fingerprint(spec)


def refined(cfg: BenchConfig, row: RowSpec, run_record: dict) -> Optional[dict]:
    """The refinement record of ``row`` when it is done with the current settings, else None."""
    path = refinement_path(cfg.output, row)
    record = read_json(path.with_suffix(".json"))
    if record and record.get("fingerprint") == _refine_fingerprint(cfg, row, run_record) and path.is_file():
        return record
    return None


def suite_refine_config(cfg: BenchConfig) -> RefineConfig:
    """gvae-refine's settings with the suite's ``refine_args`` (the run and the row's own fields left out)."""
    return _parse_refine_args(cfg, RefineConfig(load_config=Path("config.yml")))


def _parse_refine_args(cfg: BenchConfig, default: RefineConfig) -> RefineConfig:
    if not cfg.refine_args:
        return default
    try:
        return tyro.cli(RefineConfig, default=default, args=shlex.split(cfg.refine_args))
    except SystemExit:
        raise BenchError(f"refine_args {cfg.refine_args!r} are not valid gvae-refine flags (see gvae-refine "
                         "--help).") from None


def refine_config(cfg: BenchConfig, row: RowSpec, config_path: Path) -> RefineConfig:
    """The :class:`~gvae_ns.refine.cli.RefineConfig` that refines ``row`` of the run at ``config_path`` (its config.yml)."""
    decoder = row.refine_decoder or "temporal"
    # each row measures its own decoder: no swap for the fine-tune alone, which has a row of its own
    refine_cfg = RefineConfig(load_config=config_path, stages=row.extrapolate_stages, select=row.refine_select,
                              fraction=cfg.refine_fraction, output=refinement_path(cfg.output, row), decoder=decoder,
                              compare_with_finetune_only=False)
    refine_cfg = _parse_refine_args(cfg, refine_cfg)
    if refine_cfg.decoder != decoder:
        raise BenchError(f"refine_args {cfg.refine_args!r} set --decoder; list decoders in refine_decoders instead.")
    return refine_cfg


def refine_row(cfg: BenchConfig, row: RowSpec, run_record: dict) -> dict:
    """Refine the run of ``row`` (in this process, timed) and return the refinement record."""
    out = refinement_path(cfg.output, row)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path = Path(run_record["config"])
    refine_cfg = refine_config(cfg, row, config_path)
    learned = refine_cfg.decoder in DECODER_FILES  # the 3DGS-split control has no file
    vae_file = RunLayout.of_config(config_path).decoder(refine_cfg.decoder) if learned else None
    vae_marker = config_path.parent / f".bench-{vae_file.stem if vae_file else refine_cfg.decoder}.json"
    vae_spec = {"refine_args": shlex.split(cfg.refine_args)}
    if refine_cfg.decoder == "prior-tuned":  # fine-tuned from another shipped prior: fine-tune it again
        vae_spec["prior_sha256"] = read_manifest()["sha256"]
    if vae_file is not None and vae_file.is_file() and read_json(vae_marker) != vae_spec:
        vae_file.unlink()  # made with other VAE settings (refine_args): train it again
    vae_before = vae_file is None or vae_file.is_file()
    sync()
    start = time.perf_counter()
    refine_run(refine_cfg, pipeline=None)
    sync()
    refine_s = time.perf_counter() - start
    if not out.is_file():
        raise BenchError(f"refine_run finished but wrote no refinement file at {out}.")
    write_json(vae_marker, vae_spec)
    record = {"fingerprint": _refine_fingerprint(cfg, row, run_record), "refine_s": round(refine_s, 2),
              "includes_vae_training": not vae_before, "file": str(out), "made_at": time.time()}
    write_json(out.with_suffix(".json"), record)
    return record


