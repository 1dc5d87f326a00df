"""``gvae-refine`` on the command line: every user error is one paragraph (exit code 2, no traceback), and a
``vae.pt`` / ``densify_head.pt`` / ``refinement.pt`` that does not belong to the run's checkpoint, or is
damaged, is refused (never reused) in gvae-refine, in a loaded run (ns-viewer's path) and in ns-export.

One tiny run is trained for the module; each test works on its own copy of it (config.yml rewritten to
point at the copy), so tampering never leaks between tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from test_train_e2e import BIN, TINY_FLAGS, _env, ns

from gvae_ns.refine.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from gvae_ns.synthetic import write_scene

    scene = write_scene(tmp_path_factory.mktemp("scene"), resolution=32, n_train=8, n_test=2, n_val=2,
                        supersample=2, n_points=2000)
    out = tmp_path_factory.mktemp("outputs")
    ns("ns-train", "gaussianvae", "--output-dir", out, "--experiment-name", "tiny", *TINY_FLAGS,
       "blender-data", "--data", scene)
    (run_dir,) = sorted((out / "tiny" / "gaussianvae").iterdir())
    return run_dir


def copy_run(run: Path, root: Path) -> Path:
    """A copy of ``run`` under ``root`` whose config.yml points at the copy (checkpoints and run_dir)."""
    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    config.output_dir = root
    target = root / config.experiment_name / config.method_name / config.timestamp
    shutil.copytree(run, target)
    config.pipeline.model.run_dir = target
    (target / "config.yml").write_text(yaml.dump(config), "utf8")
    return target


def train_further(run: Path, step: int = 100) -> None:
    """Make the run's checkpoint a later one: same Gaussian count, slightly moved Gaussians, step ``step``.
    Every file beside the run is then stale."""
    (ckpt,) = (run / "nerfstudio_models").glob("step-*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["pipeline"]["_model.gauss_params.means"][0, 0] += 1e-3
    state["step"] = step
    torch.save(state, run / "nerfstudio_models" / f"step-{step:09d}.ckpt")
    ckpt.unlink()


def cli(capsys, *args) -> tuple:
    """``gvae-refine *args`` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_paragraph(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("gvae-refine: ")]
    assert len(ours) == 1 and lines[-1] == ours[0], err  # third-party import warnings may come first
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"


def tamper(path: Path, change) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def provenance_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)["provenance"]


# ------------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize(
    "args, words",
    [
        (["--stages", "0"], "--stages must be in 1..4"),
        (["--stages", "5"], "--stages must be in 1..4, got 5"),
        (["--fraction", "0"], "--fraction must be in (0, 1]"),
        (["--fraction", "1.5"], "--fraction must be in (0, 1], got 1.5"),
        (["--decoder-steps", "0"], "--decoder-steps must be at least 1"),
        (["--max-new-ratio", "0"], "--max-new-ratio must be above 0"),
        (["--score-views", "-1"], "--score-views must be 0"),
        ([], "does not exist: pass the run's config.yml"),
    ],
)
def test_bad_options_stop_before_anything_loads(capsys, tmp_path, args, words):
    code, _, err = cli(capsys, "--load-config", tmp_path / "nope" / "config.yml", *args)
    assert code == 2
    assert_one_paragraph(err, words)


def test_output_that_is_a_directory_is_refused(capsys, tmp_path):
    code, _, err = cli(capsys, "--load-config", tmp_path / "config.yml", "--output", tmp_path)
    assert code == 2
    assert_one_paragraph(err, f"--output {tmp_path} is a directory")


def test_unknown_choice_is_refused_by_the_parser(capsys, tmp_path):
    code, _, err = cli(capsys, "--load-config", tmp_path / "config.yml", "--select", "bogus")
    assert code == 2 and "Traceback" not in err and "bogus" in err


def test_console_script_exits_2_with_one_paragraph(tmp_path):
    proc = subprocess.run([str(BIN / "gvae-refine"), "--load-config", str(tmp_path / "config.yml"), "--stages", "7"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2
    assert_one_paragraph(proc.stderr, "--stages must be in 1..4, got 7")


# ---------------------------------------------------------------------------------------------- vae.pt
def test_vae_of_an_earlier_checkpoint_is_refused_then_rebuilt_on_request(capsys, run, tmp_path):
    copy = copy_run(run, tmp_path)
    train_further(copy)
    vae_before, ref_before = (copy / "vae.pt").read_bytes(), (copy / "refinement.pt").read_bytes()

    code, out, err = cli(capsys, "--load-config", copy / "config.yml")
    assert code == 2
    assert_one_paragraph(err, f"{copy / 'vae.pt'}: it was made from another run state", "checkpoint step 69 (the run's "
                         "checkpoint is step 100)", "ids/parameters sha256",
                         f"gvae-refine --load-config {copy / 'config.yml'} --retrain-decoder")
    assert "Gaussians (the checkpoint has" not in err, "the count is the same: the digest tells them apart"
    assert (copy / "vae.pt").read_bytes() == vae_before, "a refused file is left as it is"
    assert (copy / "refinement.pt").read_bytes() == ref_before
    assert "refinement.pt: it was made from another run state" in out, "the stale refinement is refused at load"

    code, out, err = cli(capsys, "--load-config", copy / "config.yml", "--retrain-decoder", "--decoder-steps", "5")
    assert code == 0, err
    assert "was refused" in out and "trained the VAE" in out
    assert provenance_of(copy / "vae.pt")["step"] == 100
    assert provenance_of(copy / "refinement.pt") == provenance_of(copy / "vae.pt")

    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(copy / "config.yml", test_mode="inference")
    assert pipeline.model.refinement_record is not None and pipeline.model.refinement_file_error is None


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda p: p["provenance"].update(num_gaussians=p["provenance"]["num_gaussians"] + 10,
                                          gaussians_sha256="ab" * 32, config_sha256="cd" * 32),
         ["another run state", "Gaussians (the checkpoint has", "config sha256"]),
        (lambda p: p.update(provenance=None), ["records no run"]),
        (lambda p: p.update(version=1), ["GaussianVAE file format version 1"]),
        (lambda p: p.update(format="gvae_ns.refinement"), ["not a GaussianVAE file"]),
        (lambda p: next(v for v in p["state_dict"].values() if v.is_floating_point()).fill_(float("nan")),
         ["malformed GaussianVAE file", "holds NaN"]),
        (lambda p: p.pop("config"), ["lacks the key 'config'"]),
        (lambda p: p["config"].update(max_children=7), ["weights do not match its config"]),
        (lambda p: p["config"].update(bogus=1), ["unknown GaussianVAEConfig fields"]),
    ],
    ids=["foreign", "no-provenance", "old-version", "wrong-tag", "nan", "missing-key", "wrong-shapes", "bad-config"],
)
def test_foreign_or_malformed_vae_is_refused(capsys, run, tmp_path, change, words):
    copy = copy_run(run, tmp_path)
    tamper(copy / "vae.pt", change)
    code, _, err = cli(capsys, "--load-config", copy / "config.yml")
    assert code == 2
    assert_one_paragraph(err, str(copy / "vae.pt"), "--retrain-decoder", *words)


def test_unreadable_vae_is_refused(capsys, run, tmp_path):
    copy = copy_run(run, tmp_path)
    (copy / "vae.pt").write_bytes((copy / "vae.pt").read_bytes()[:300])
    code, _, err = cli(capsys, "--load-config", copy / "config.yml")
    assert code == 2
    assert_one_paragraph(err, f"{copy / 'vae.pt'}: not a readable GaussianVAE file, it cannot be read")


# ------------------------------------------------------------------------------------- densify_head.pt
@pytest.mark.parametrize("damage", ["stale", "foreign", "nan", "wrong-shapes"])
def test_stale_or_malformed_densify_head_is_refused(capsys, run, tmp_path, damage):
    from gvae_ns.tagged_file import Provenance
    from gvae_ns.densify.head import DensifyHead
    from gvae_ns.densify.train import DensifyTrainConfig, save_densify_head

    copy = copy_run(run, tmp_path)
    own = Provenance.from_dict(provenance_of(copy / "vae.pt"))  # the trained run's own state
    path = save_densify_head(DensifyHead(DensifyTrainConfig().head), copy / "densify_head.pt", own)
    words = ["malformed densification head file"]
    if damage == "stale":
        train_further(copy)
        words = ["another run state", "checkpoint step 69"]
    elif damage == "foreign":
        tamper(path, lambda p: p["provenance"].update(gaussians_sha256="ef" * 32))
        words = ["another run state", "ids/parameters sha256"]
    elif damage == "nan":
        tamper(path, lambda p: next(v for v in p["state_dict"].values() if v.is_floating_point()).fill_(float("nan")))
    else:
        tamper(path, lambda p: p["config"].update(width=p["config"]["width"] * 2))
        words += ["weights do not match its config"]
    before = path.read_bytes()
    code, _, err = cli(capsys, "--load-config", copy / "config.yml", "--decoder", "generative")
    assert code == 2
    assert_one_paragraph(err, str(path), "--decoder generative --retrain-decoder", *words)
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------- refinement.pt
def test_stale_refinement_is_refused_at_load_and_replaced_by_gvae_refine(capsys, run, tmp_path):
    from nerfstudio.utils.eval_utils import eval_setup

    from gvae_ns.run_layout import REFINEMENT_FILE

    copy = copy_run(run, tmp_path)
    tamper(copy / REFINEMENT_FILE, lambda p: p["provenance"].update(gaussians_sha256="12" * 32))
    _, pipeline, _, _ = eval_setup(copy / "config.yml", test_mode="inference")
    model = pipeline.model
    assert model.refinement is None and not model.refinement_active
    assert model.num_points == model.gauss_params["means"].shape[0]
    assert "another run state" in model.refinement_note and str(copy / REFINEMENT_FILE) in model.refinement_note
    model.refinement_controls.sync()  # what the viewer does once it installed the controls
    assert "refinement off" in model.refinement_controls.note.value
    assert str(copy / REFINEMENT_FILE) in model.refinement_controls.note.value
    capsys.readouterr()

    code, out, err = cli(capsys, "--load-config", copy / "config.yml", "--stages", "2")
    assert code == 0, err
    assert "was refused" in out and "using the VAE" in out
    assert provenance_of(copy / REFINEMENT_FILE) == provenance_of(copy / "vae.pt")
    _, pipeline, _, _ = eval_setup(copy / "config.yml", test_mode="inference")
    assert pipeline.model.refinement_active and pipeline.model.refinement_record.steps == 2


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda p: p.update(is_new=p["is_new"].float()), "'is_new' is torch.float32, expected a bool tensor"),
        (lambda p: p["params"]["scales"].fill_(float("nan")), "'params.scales' holds NaN"),
        (lambda p: p["params"].pop("quats"), "'params' lacks ['quats']"),
    ],
    ids=["dtype", "nan", "missing"],
)
def test_malformed_refinement_gives_the_clean_message_at_load(capsys, run, tmp_path, change, words):
    from nerfstudio.utils.eval_utils import eval_setup

    copy = copy_run(run, tmp_path)
    tamper(copy / "refinement.pt", change)
    _, pipeline, _, _ = eval_setup(copy / "config.yml", test_mode="inference")
    model = pipeline.model
    assert model.refinement is None and words in model.refinement_note
    assert "malformed refinement file" in model.refinement_note
    out = capsys.readouterr().out
    assert words in out and "Traceback" not in out


def test_ns_export_refuses_a_malformed_refinement_with_the_same_message(run, tmp_path):
    from plyfile import PlyData

    copy = copy_run(run, tmp_path)
    tamper(copy / "refinement.pt", lambda p: p.update(removed=p["removed"].float()))
    proc = ns("ns-export", "gaussian-splat", "--load-config", copy / "config.yml", "--output-dir", tmp_path / "ply")
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "Traceback" not in text
    assert f"{copy / 'refinement.pt'}: 'removed' is torch.float32, expected an integer tensor" in text, text[-2000:]
    assert "malformed refinement file" in text and "The original scene is shown" in text
    ckpt = torch.load(next((copy / "nerfstudio_models").glob("*.ckpt")), map_location="cpu", weights_only=True)
    n_original = ckpt["pipeline"]["_model.gauss_params.means"].shape[0]
    assert PlyData.read(str(tmp_path / "ply" / "splat.ply"))["vertex"].count <= n_original


def test_old_gvae_refine_flag_names_still_work_and_say_the_new_ones(capsys):
    import tyro

    from gvae_ns.refine.cli import RefineConfig

    config = tyro.cli(RefineConfig, args=["--load-config", "x.yml", "--steps", "2", "--vae-steps", "9",
                                          "--retrain-vae"])
    assert (config.stages, config.decoder_steps, config.retrain_decoder) == (2, 9, True)
    out = " ".join(capsys.readouterr().out.split())
    assert "--steps is deprecated, use --stages" in out and "--vae-steps is deprecated" in out


@pytest.mark.parametrize("decoder", ["split", "none"])
def test_controls_refine_with_the_fine_tune_and_the_held_out_check(capsys, run, tmp_path, decoder):
    """The no-learning controls go through the same path: no decoder file, the fine-tune, the held-out check."""
    from nerfstudio.utils.eval_utils import eval_setup

    from gvae_ns.run_layout import REFINEMENT_FILE

    copy = copy_run(run, tmp_path)
    for name in ("vae.pt", "densify_head.pt"):
        (copy / name).unlink(missing_ok=True)
    code, out, err = cli(capsys, "--load-config", copy / "config.yml", "--decoder", decoder, "--finetune-steps", "5",
                         "--no-compare-with-finetune-only")
    assert code == 0, err
    out = " ".join(out.split())
    assert "fine-tuned 5 steps; held-out loss over" in out and ("kept" in out)
    assert "fine-tune alone" not in out, "the comparison is off"
    assert not (copy / "vae.pt").exists() and not (copy / "densify_head.pt").exists(), "a control trains nothing"
    _, pipeline, _, _ = eval_setup(copy / "config.yml", test_mode="inference")
    record = pipeline.model.refinement_record
    assert record is not None and record.decoder == decoder
    if decoder == "none" or "not kept" in out:
        assert record.num_added == 0 and record.removed.numel() == 0
    else:
        assert record.num_added == 2 * record.removed.numel() > 0
    assert (copy / REFINEMENT_FILE).is_file()


def test_the_refinement_written_is_the_decoders_or_the_fine_tune_alone_whichever_has_the_lower_held_out_loss(
        capsys, run, tmp_path):
    """By default the decoder's fine-tuned proposals are weighed against the fine-tune alone on the held-out
    views; the file holds the one with the lower loss, and the log gives both losses."""
    import re

    from nerfstudio.utils.eval_utils import eval_setup

    from gvae_ns.refine.finetune import held_out_loss

    copy = copy_run(run, tmp_path)
    code, out, err = cli(capsys, "--load-config", copy / "config.yml", "--decoder", "split", "--finetune-steps", "5")
    assert code == 0, err
    out = " ".join(out.split())
    losses = re.search(r"(fine-tune alone has the lower held-out loss|proposals hold against the fine-tune alone "
                       r"on the held-out views) \(([0-9.]+) against ([0-9.]+)", out)
    assert losses, out
    first, second = float(losses.group(2)), float(losses.group(3))
    control_won = losses.group(1).startswith("fine-tune alone")
    assert (first < second) if control_won else (first <= second), out
    _, pipeline, _, _ = eval_setup(copy / "config.yml", test_mode="val")
    record = pipeline.model.refinement_record
    assert record.decoder == ("none" if control_won else "split")
    # the file's scene has the loss the log gave for the choice
    dm = pipeline.datamanager
    held_out = pipeline.model.scoring_views(dm.eval_dataset.cameras, [d["image"] for d in dm.cached_eval])
    kept = held_out_loss(record.params, held_out, 2 ** record.steps, trained=record.num_added == 0 and
                         record.removed.numel() == 0 and not control_won)
    assert kept == pytest.approx(first, abs=5e-5)


@pytest.mark.parametrize("decoder", ["prior", "prior-tuned"])
def test_shipped_prior_refines_a_run_through_gvae_refine(capsys, run, tmp_path, decoder):
    """The shipped prior (zero-shot: nothing written beside the run) and its fine-tuned copy (prior_tuned.pt)."""
    from nerfstudio.utils.eval_utils import eval_setup

    copy = copy_run(run, tmp_path)
    for name in ("vae.pt", "densify_head.pt", "prior_tuned.pt"):
        (copy / name).unlink(missing_ok=True)
    code, out, err = cli(capsys, "--load-config", copy / "config.yml", "--decoder", decoder, "--decoder-steps", "5",
                         "--finetune-steps", "0")
    assert code == 0, err
    assert not (copy / "vae.pt").exists()
    assert (copy / "prior_tuned.pt").is_file() == (decoder == "prior-tuned")
    _, pipeline, _, _ = eval_setup(copy / "config.yml", test_mode="inference")
    record = pipeline.model.refinement_record
    assert record is not None and record.decoder == decoder
