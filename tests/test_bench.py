"""The benchmark harness (gvae_ns.bench): suite files, table, crop figure, evaluation, resuming.

The CPU suite (configs/bench-cpu.yaml), shrunk for CI, runs once for the module: built-in scene at 32 px, x2
copy at 16 px, 60 steps; the splatfacto (CPU renderer) classic baseline, gaussianvae through stages 1/2, 1/1 and
its +1 Hessian-guided refinement (a 30-step VAE); two ns-train processes at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from PIL import Image

from gvae_ns.bench import config, evaluate, plan, refine as bench_refine, report, run, train
from gvae_ns.bench.config import BenchConfig, BenchError, SceneConfig

ROOT = Path(__file__).resolve().parents[1]


def _tiny_config(output: Path) -> BenchConfig:
    """The CPU suite (configs/bench-cpu.yaml) shrunk for CI: 32 px scene, 60 steps, one baseline, +1 Hessian,
    no oracle (the oracle is the baseline's code path on the full-resolution copy)."""
    suite = config.load_suite(ROOT / "configs" / "bench-cpu.yaml")
    return dataclasses.replace(
        suite,
        name="tiny",
        scene=SceneConfig(resolution=32, n_train=6, n_val=1, n_test=2, n_points=3000, supersample=2),
        output=output,
        steps=60,
        baselines=("classic",),
        oracle=False,
        ours_downscales=(2, 1),
        ours_stage_fractions=(0.5, 0.5),
        extrapolate_stages=(1,),
        refine_selects=("hessian",),
        refine_decoders=("temporal",),
        refine_args="--decoder-steps 30",
        train_args="--pipeline.model.num-random 1000 --pipeline.model.random-scale 2.0 "
        "--pipeline.model.warmup-length 20 --pipeline.model.refine-every 20",
        jobs=2,
        crop_px=8,
        tile_px=64,
        brisque=False,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = _tiny_config(tmp_path_factory.mktemp("bench") / "out")
    results = run.run_bench(cfg, log=lambda *_: None)
    return cfg, results


def _fake_results() -> dict:
    def row(name, label, kind, factor, psnr, lpips=None, status="ok", **extra):
        metrics = {"psnr": psnr, "ssim": psnr / 40, "lpips": lpips, "brisque": None, "chamfer_opaque": 0.01,
                   "chamfer_all": None, "num_gaussians": 1000, "ms_per_view": 12.5, "views": 2,
                   "height": 64, "width": 64, "psnr_at_train": psnr + 5, "ssim_at_train": psnr / 35,
                   "train_height": 32, "train_width": 32}
        entry = {"name": name, "label": label, "kind": kind, "factor": factor, "status": status,
                 "metrics": metrics if status == "ok" else {}, "train_s": 10.0, "refine_s": None}
        entry.update(extra)
        return entry

    return {
        "suite": {"name": "fake suite", "steps": 300, "jobs": 2, "chamfer_opacity": 0.5, "background": "white"},
        "environment": {"device": "CPU (2 cores)", "baselines": "stand-ins"},
        "dataset": {"path": "/data/x", "test_views": 2, "width": 64, "height": 64, "factors": ["x2"]},
        "rows": [
            row("base", "splatfacto classic", "baseline", 2, 20.0, lpips=0.30),
            row("ours", "Ours +2", "ours", 2, 22.5, lpips=0.20, refine_s=33.3, refine_includes_vae=True),
            row("broken", "Ours-nabla2 +2", "ours", 2, 0.0, status="failed", error="refinement failed: boom\nmore"),
            row("oracle", "oracle", "oracle", 1, 30.0, lpips=0.05),
        ],
    }


def test_format_table_from_fake_results():
    text = report.format_table(_fake_results())
    lines = text.splitlines()
    assert lines[0] == "# fake suite"
    header = next(line for line in lines if line.startswith("| scale"))
    assert header.count("|") == len(report._COLUMNS) + 3
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| scale")]
    assert [line.split(" | ")[1] for line in table] == ["splatfacto classic", "Ours +2", "oracle"]
    ours = next(line for line in table if "Ours +2" in line)
    assert "**22.50**" in ours and "**0.2000**" in ours, "best of the scale is bold"
    assert "33.3*" in ours, "refinement that trained the VAE is starred"
    oracle = next(line for line in table if line.startswith("| full"))
    assert "**" not in oracle, "the oracle is not a contender"
    assert "30.00" in oracle
    base = next(line for line in table if "classic" in line)
    assert base.count("n/a") == 3  # BRISQUE, CD all, refine s
    assert "- x2 Ours-nabla2 +2 (failed): refinement failed: boom" in text
    assert "**27.50**" in ours, "the training-resolution PSNR has its own best"
    assert "(32x32 px;" in text, "the note names the training resolution"
    assert "more" not in text.split("Rows without a result:")[1]


def test_suite_files_and_command_line(tmp_path):
    cfg = config.load_suite(ROOT / "configs" / "bench-cpu.yaml")
    assert cfg.factors == (2,) and cfg.scene.resolution == 64 and cfg.steps >= 100
    assert "--pipeline.model.num-random" in cfg.train_args.split()
    gpu = config.load_suite(ROOT / "configs" / "bench-lego-gpu.yaml")
    assert gpu.factors == (2, 4) and gpu.baseline_impl == "splatfacto" and gpu.data is not None
    assert cfg.refine_decoders == gpu.refine_decoders == ("temporal", "generative", "prior", "prior-tuned", "split", "none")
    _, rows = plan.plan(cfg, tmp_path / "scene", {2: tmp_path / "x2"})
    labels = [r.label for r in rows]
    assert "control: 3DGS split of the whole scene +1" in labels and "control: 3DGS split of the Hessian selection +2" in labels
    assert [lab for lab in labels if "fine-tune only" in lab] == ["control: fine-tune only at +1", "control: fine-tune only at +2"]
    config.check_config(cfg)
    config.check_config(gpu)
    lego = config.load_suite(ROOT / "configs" / "bench-lego-cpu.yaml")
    config.check_config(lego)
    assert lego.factors == (4, 2) and lego.refine_decoders == cfg.refine_decoders and lego.data is None
    # one step budget: the baselines train the gaussianvae steps plus the refinement's fine-tune steps
    runs, _ = plan.plan(cfg, tmp_path / "scene", {2: tmp_path / "x2"})
    steps = {r.name: r.steps for r in runs}
    assert steps["ours-x2"] == cfg.steps and steps["splatfacto-antialiased-x2"] == cfg.steps + 200
    assert steps["oracle"] == cfg.steps + 200
    short = dataclasses.replace(cfg, refine_args="--finetune-steps 30")
    assert plan.baseline_steps(short) == cfg.steps + 30
    assert plan.baseline_steps(dataclasses.replace(cfg, refine_decoders=())) == cfg.steps
    over = run.parse_args(["--config", str(ROOT / "configs" / "bench-cpu.yaml"), "--steps", "40",
                             "--scene.resolution", "48", "--refine-args=--decoder-steps 20"])
    assert (over.steps, over.scene.resolution, over.refine_args) == (40, 48, "--decoder-steps 20")
    assert over.train_args == cfg.train_args, "flags not given keep the suite's values"
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\nstepz: 3\n")
    with pytest.raises(BenchError, match=r"bad.yaml.*stepz"):
        config.load_suite(bad)
    bad.write_text("scene: {resolution: big}\n")
    with pytest.raises(BenchError, match="resolution must be an integer"):
        config.load_suite(bad)
    assert plan.stage_steps(300, (0.25, 0.25, 0.5)) == (75, 75, 150)
    assert sum(plan.stage_steps(7, (1, 1, 1))) == 7 and min(plan.stage_steps(3, (0.1, 0.1, 5))) == 1
    with pytest.raises(BenchError, match="must end at 1"):
        config.check_config(BenchConfig(ours_downscales=(4, 2), ours_stage_fractions=(0.5, 0.5)))


def test_generative_decoder_rows(tmp_path, monkeypatch):
    from gvae_ns.run_layout import DECODER_FILES

    cfg = BenchConfig(output=tmp_path / "out", baselines=(), oracle=False, extrapolate_stages=(2,),
                      refine_selects=("all", "hessian"), refine_decoders=("temporal", "generative"),
                      refine_args="--decoder-steps 7")
    _, rows = plan.plan(cfg, tmp_path / "scene", {2: tmp_path / "x2"})
    assert [(r.name, r.label, r.refine_decoder) for r in rows[1:]] == [
        ("ours-all-p2-x2", "Ours +2", "temporal"),
        ("ours-hessian-p2-x2", "Ours-nabla2 +2", "temporal"),
        ("ours-all-p2-gd-x2", "Ours (GD head) +2", "generative"),
        ("ours-hessian-p2-gd-x2", "Ours-nabla2 (GD head) +2", "generative"),
    ]
    temporal, generative = rows[1], rows[3]
    run_dir = tmp_path / "run_dir"
    run_dir.mkdir()
    built = bench_refine.refine_config(cfg, generative, run_dir / "config.yml")
    assert (built.decoder, built.select, built.stages, built.decoder_steps) == ("generative", "all", 2, 7)
    assert built.output == bench_refine.refinement_path(cfg.output, generative)
    assert bench_refine.refine_config(cfg, temporal, run_dir / "config.yml").decoder == "temporal"
    record = {"config": str(run_dir / "config.yml"), "fingerprint": "f", "finished_at": 1.0}
    assert bench_refine._refine_fingerprint(cfg, generative, record) != bench_refine._refine_fingerprint(cfg, temporal, record)
    with pytest.raises(BenchError, match="refine_decoders"):
        bench_refine.refine_config(dataclasses.replace(cfg, refine_args="--decoder temporal"), generative, run_dir / "config.yml")

    def fake_refine_run(config, pipeline=None):  # writes what refine_run would, without training
        name = DECODER_FILES[config.decoder]
        (run_dir / name).write_bytes(b"decoder")
        torch.save({}, config.output)

    monkeypatch.setattr(bench_refine, "refine_run", fake_refine_run)
    made = [bench_refine.refine_row(cfg, row, record)["includes_vae_training"] for row in (generative, rows[4], temporal)]
    assert made == [True, False, True], "each decoder's file is trained once per run, the first time it is needed"


def test_bad_dataset_paths_are_reported(tmp_path, capsys):
    missing = tmp_path / "no-such-dataset"
    assert run.main(["--data", str(missing), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "transforms_train.json").write_text("{}")
    assert run.main(["--data", str(broken), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "transforms_train.json" in err and "camera_angle_x" in err


def test_crop_figure_size_and_content(tmp_path):
    rng = np.random.default_rng(0)
    ref = np.full((40, 48, 3), 200, np.uint8)
    ref[20:30, 4:14] = rng.integers(0, 255, (10, 10, 3))  # the only detail
    assert report.pick_crop(ref, 10) == (20, 4)
    Image.fromarray(ref).save(tmp_path / "gt.png")
    other = np.zeros_like(ref)
    Image.fromarray(other).save(tmp_path / "black.png")
    grid = [[("a", tmp_path / "black.png"), ("missing", None), ("gt", tmp_path / "gt.png")],
            [("wrong size", tmp_path / "small.png"), ("gt", tmp_path / "gt.png")]]
    Image.fromarray(ref[:20]).save(tmp_path / "small.png")
    out = report.crop_figure(grid, tmp_path / "gt.png", tmp_path / "fig.png", crop_px=10, tile_px=45)
    fig = np.asarray(Image.open(out).convert("RGB"))
    tile = 10 * 4  # zoom = 45 // 10
    assert (fig.shape[1], fig.shape[0]) == report.figure_size(2, 3, tile)
    top = report.TILE_PAD + report.TILE_CAPTION
    left = lambda c: report.TILE_PAD + c * (tile + report.TILE_PAD)  # noqa: E731
    expected_gt = np.asarray(Image.fromarray(ref[20:30, 4:14]).resize((tile, tile), Image.NEAREST))
    np.testing.assert_array_equal(fig[top : top + tile, left(2) : left(2) + tile], expected_gt)
    assert (fig[top : top + tile, left(0) : left(0) + tile] == 0).all()
    assert (fig[top : top + tile, left(1) : left(1) + tile] == report.BLIND_SPOT).all()
    second = top + tile + report.TILE_PAD + report.TILE_CAPTION
    assert (fig[second : second + tile, left(0) : left(0) + tile] == report.BLIND_SPOT).all()


def test_tiny_benchmark_end_to_end(tiny):
    cfg, results = tiny
    out = cfg.output.resolve()
    assert results["complete"], [r.get("error") for r in results["rows"]]
    names = ["splatfacto-classic-x2", "ours-x2", "ours-hessian-p1-x2"]
    assert [r["name"] for r in results["rows"]] == names
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    for row in results["rows"]:
        m = row["metrics"]
        assert (m["height"], m["width"], m["views"]) == (32, 32, 2), "scored at the full resolution"
        assert 0.0 < m["ssim"] <= 1.0 and math.isfinite(m["psnr"]) and m["ms_per_view"] > 0
        assert (m["train_height"], m["train_width"]) == (16, 16), "also scored at the x2 copy's resolution"
        assert math.isfinite(m["psnr_at_train"]) and 0.0 < m["ssim_at_train"] <= 1.0
        assert len(m["per_view"]["psnr_at_train"]) == 2
        assert row["train_s"] > 0
    for row in results["rows"][:2]:
        assert 8.0 < row["metrics"]["psnr"] < 60.0 and row["metrics"]["chamfer_all"] > 0
    refined = results["rows"][2]
    assert refined["refine_s"] > 0 and refined["refine_includes_vae"]
    assert refined["metrics"]["num_original"] == results["rows"][1]["metrics"]["num_gaussians"]
    assert refined["metrics"]["num_gaussians"] == (refined["metrics"]["num_original"] + refined["metrics"]["num_added"]
                                                   - refined["metrics"]["num_removed"])
    assert (out / "refinements" / "ours-hessian-p1-x2.pt").is_file()
    assert Image.open(out / "data" / "x2" / "train" / "r_0.png").size == (16, 16)
    table = (out / "results.md").read_text()
    assert "| x2 | splatfacto classic (CPU renderer) |" in table and "| x2 | Ours-nabla2 +1 |" in table
    fig = np.asarray(Image.open(out / "crops.png").convert("RGB"))
    tile = 8 * (64 // 8)
    assert (fig.shape[1], fig.shape[0]) == report.figure_size(1, 4, tile)
    top, oracle_left = report.TILE_PAD + report.TILE_CAPTION, report.TILE_PAD + 2 * (tile + report.TILE_PAD)
    assert (fig[top : top + tile, oracle_left : oracle_left + tile] == report.BLIND_SPOT).all(), "no oracle run"
    assert not (fig[top : top + tile, report.TILE_PAD : report.TILE_PAD + tile] == report.BLIND_SPOT).all()


def test_evaluation_of_a_trained_run(tiny):
    cfg, results = tiny
    row = results["rows"][0]
    points = np.load(cfg.output.resolve() / "data" / "scene" / "points_gt.npy")
    pipeline = evaluate.load_pipeline(row["config"])
    model = pipeline.model
    first = evaluate.evaluate_pipeline(pipeline, points_gt=points, lpips=False, brisque=False)
    assert first["psnr"] == pytest.approx(row["metrics"]["psnr"], abs=1e-4), "same render, same score"
    n = model.gauss_params["means"].shape[0]
    assert first["num_gaussians"] == n
    ssim = [float(v) for v in first["per_view"]["ssim"]]
    assert len(ssim) == 2 and first["ssim"] == pytest.approx(np.mean(ssim))

    # A hand-made refinement: the originals plus transparent Gaussians far from the scene.
    params = {k: v.detach().clone() for k, v in model.gauss_params.items()}
    extra = 50
    far = {k: v[:extra].clone() for k, v in params.items()}
    far["means"] = far["means"] + torch.tensor([10.0, 0.0, 0.0])
    far["opacities"] = torch.full_like(far["opacities"], -20.0)
    refined = {k: torch.cat([params[k], far[k]]) for k in params}
    is_new = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(extra, dtype=torch.bool)])
    model.set_refinement(refined, is_new, note="test")
    second = evaluate.evaluate_pipeline(pipeline, points_gt=points, lpips=False, brisque=False)
    assert second["num_gaussians"] == n + extra
    assert second["psnr"] == pytest.approx(first["psnr"], abs=1e-3), "transparent Gaussians change no pixel"
    assert second["chamfer_opaque"] == pytest.approx(first["chamfer_opaque"], rel=1e-6)
    assert second["chamfer_all"] > first["chamfer_all"] + 1.0, "far centres count in the all-Gaussian Chamfer"
    assert evaluate.attach_refinement(model, None) == {}
    small = evaluate.evaluate_pipeline(pipeline, lpips=False, brisque=False, train_factor=2)
    assert (small["train_height"], small["train_width"]) == (16, 16)
    assert small["psnr"] == pytest.approx(first["psnr"], abs=1e-4), "the full-resolution score is unchanged"
    assert small["psnr_at_train"] > first["psnr"] + 0.5, "a run trained at 16 px scores better at 16 px than at 32"
    assert first["psnr_at_train"] is None and first["train_height"] is None
    odd = evaluate.evaluate_pipeline(pipeline, lpips=False, brisque=False, train_factor=3)  # 32 px: cropped to 30
    assert (odd["train_height"], odd["train_width"]) == (10, 10) and odd["ssim_at_train"] is None  # < SSIM window
    assert odd["psnr"] == pytest.approx(first["psnr"], abs=1e-4)
    assert odd["psnr_at_train"] > first["psnr"] + 0.5, "scored at about its own 16 px resolution, not at 32"
    again = evaluate.evaluate_pipeline(pipeline, lpips=False, brisque=False, train_factor=2)
    assert again["psnr_at_train"] == pytest.approx(small["psnr_at_train"], abs=1e-6), "the crop left the cameras"
    assert evaluate.evaluate_pipeline(pipeline, max_views=1, lpips=False, brisque=False)["num_gaussians"] == n


def test_second_run_resumes_without_training(tiny, monkeypatch):
    cfg, results = tiny
    out = cfg.output.resolve()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(subprocess, "Popen", no_training)
    evaluated = []
    real_evaluate = evaluate.evaluate_pipeline
    monkeypatch.setattr(run, "evaluate_pipeline", lambda *a, **k: evaluated.append(1) or real_evaluate(*a, **k))
    again = run.run_bench(cfg, log=lambda *_: None)
    assert evaluated == [] and again["rows"] == results["rows"]

    (out / "rows" / "ours-hessian-p1-x2.json").unlink()
    again = run.run_bench(cfg, log=lambda *_: None)
    assert len(evaluated) == 1, "only the row without a result is evaluated"
    assert again["rows"][-1]["metrics"]["psnr"] == pytest.approx(results["rows"][-1]["metrics"]["psnr"], abs=1e-4)

    made = json.loads((out / "refinements" / "ours-hessian-p1-x2.json").read_text())["made_at"]
    (out / "refinements" / "ours-hessian-p1-x2.pt").unlink()
    again = run.run_bench(cfg, log=lambda *_: None)
    assert len(evaluated) == 2, "a refinement made again is evaluated again"
    redone = json.loads((out / "refinements" / "ours-hessian-p1-x2.json").read_text())
    assert redone["made_at"] > made and not redone["includes_vae_training"], "the run's VAE is reused"
    assert again["rows"][-1]["status"] == "ok" and again["rows"][:2] == results["rows"][:2]

    changed = dataclasses.replace(cfg, steps=cfg.steps + 1)
    runs, rows = plan.plan(changed, out / "data" / "scene", {2: out / "data" / "x2"})
    assert all(train.trained(changed, spec) is None for spec in runs), "changed settings retrain"
    record = json.loads((out / "runs" / "ours-x2" / "train.json").read_text())
    other_select = dataclasses.replace(cfg, refine_fraction=0.5)
    assert bench_refine.refined(cfg, rows[2], record) is not None and bench_refine.refined(other_select, rows[2], record) is None


def test_time_budget_leaves_work_for_the_next_call(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("nothing fits a zero budget"))
    cfg = _tiny_config(tmp_path / "out")
    cfg.scene = SceneConfig(resolution=16, n_train=2, n_val=1, n_test=1, n_points=10, supersample=1)
    cfg.time_budget_s = 0.0
    results = run.run_bench(cfg, log=lambda *_: None)
    assert not results["complete"]
    assert {r["status"] for r in results["rows"]} == {"pending"}
    assert "not trained yet" in (tmp_path / "out" / "results.md").read_text()


def test_learned_part_is_ours_minus_the_best_control_with_its_sign():
    def row(name, psnr, k=None, select=None, decoder=None, label=None):
        return {"name": name, "label": label or name, "factor": 4, "run": "ours-x4", "extrapolate_stages": k,
                "refine_select": select, "refine_decoder": decoder, "metrics": {"psnr": psnr}}

    rows = [row("unrefined", 20.0), row("vae", 20.5, 1, "hessian", "temporal", "Ours-nabla2 +1"),
            row("gd", 20.1, 1, "hessian", "generative", "Ours-nabla2 (GD head) +1"),
            row("split", 20.3, 1, "hessian", "split"), row("ft", 20.2, 1, "all", "none"),
            row("other-run", 25.0, 1, "hessian", "split") | {"run": "ours-x2"}]
    lines = report.learned_part_lines(rows)
    assert len(lines) == 2
    vae, gd = lines
    assert "x4 Ours-nabla2 +1 (lineage VAE)" in vae and "learned part +0.20 dB" in vae
    assert "refinement step +0.50 dB" in vae
    assert "learned part -0.20 dB" in gd, "the best control of the same run (the split, 20.3), with its sign"


def test_training_resolution_lines_compare_ours_to_antialiased_splatfacto():
    def row(name, kind, factor, at_train, label=None):
        return {"name": name, "label": label or name, "kind": kind, "factor": factor,
                "metrics": {"psnr_at_train": at_train}}

    rows = [row("splatfacto-classic-x4", "baseline", 4, 25.0), row("splatfacto-antialiased-x4", "baseline", 4, 26.0,
                                                                     "splatfacto antialiased"),
            row("ours-x4", "ours", 4, 25.9, "unrefined"), row("ours-hessian-p1-x4", "ours", 4, 26.25, "VAE +1"),
            row("ours-x2", "ours", 2, 30.0), row("oracle", "oracle", 1, None)]
    lines = report.train_resolution_lines(rows)
    assert lines == ["- x4 at the training resolution, PSNR against splatfacto antialiased (26.00 dB): "
                     "unrefined -0.10, VAE +1 +0.25 dB."], "x2 has no antialiased row: no line"


def test_a_view_not_divisible_by_the_factor_is_cropped_at_the_bottom_right():
    cameras = Cameras(camera_to_worlds=torch.eye(4)[:3][None], fx=50.0, fy=50.0, cx=4.5, cy=3.0, width=10, height=7)
    cropped, kept = evaluate._divisible_view(cameras[0:1], (7, 10), 4)
    assert kept == (4, 8)
    assert (int(cropped.height), int(cropped.width)) == (4, 8)
    assert (float(cropped.cx), float(cropped.cy)) == (4.5, 3.0), "the principal point is measured from the top-left"
    assert (int(cameras.height), int(cameras.width)) == (7, 10), "the dataset's cameras are untouched"
    same, kept = evaluate._divisible_view(cameras[0:1], (8, 12), 4)
    assert kept == (8, 12)
    with pytest.raises(BenchError, match="smaller than the training factor 8"):
        evaluate._divisible_view(cameras[0:1], (7, 10), 8)
