"""The tagged files beside a run (refinement.pt, vae.pt, densify_head.pt): round trip, provenance, and one
clean paragraph for files that do not belong to the run or are damaged."""


import pytest
import torch

from gvae_ns.gaussians import PARAM_KEYS
from gvae_ns.refine.result import (
    REFINEMENT_VERSION,
    Refinement,
    RefinementFileError,
    load_refinement,
    provenance_of,
    rebuild_hint,
    save_refinement,
)
from gvae_ns.tagged_file import (
    Provenance,
    TaggedFileError,
    digest_config,
    digest_tensors,
)


def _params(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(n, 3, generator=g), "scales": torch.randn(n, 3, generator=g),
        "quats": torch.randn(n, 4, generator=g), "features_dc": torch.randn(n, 3, generator=g),
        "features_rest": torch.randn(n, 15, 3, generator=g), "opacities": torch.randn(n, 1, generator=g),
    }


def _provenance(seed: int = 0, n: int = 10, step=69, config="a") -> Provenance:
    return Provenance(step=step, num_gaussians=n, gaussians_sha256=digest_tensors(_params(n, seed).values()),
                      config_sha256=digest_config({"c": config}))


def _refinement(n_original: int = 10, n_added: int = 4, removed=(2,), provenance=None) -> Refinement:
    n = n_original - len(removed) + n_added
    is_new = torch.zeros(n, dtype=torch.bool)
    is_new[n - n_added:] = True
    return Refinement(params=_params(n), is_new=is_new, selected=torch.tensor([1, 2, 3]),
                      removed=torch.tensor(list(removed), dtype=torch.long),
                      scores={"grad2d": torch.rand(n_original), "hessian": torch.rand(n_original)},
                      num_original=n_original, steps=2, select="hessian", decoder="temporal",
                      provenance=provenance)


def _one_paragraph(err: Exception, path) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    assert text.startswith(str(path)), text
    return text


def test_round_trip_keeps_params_and_provenance(tmp_path):
    ref = _refinement(provenance=_provenance())
    path = save_refinement(ref, tmp_path / "refinement.pt")
    back = load_refinement(path, num_original=10, expected=_provenance())
    assert back.num_added == 4 and back.steps == 2 and back.select == "hessian"
    for k in PARAM_KEYS:
        assert torch.equal(back.params[k], ref.params[k]), k
    assert torch.equal(back.removed, ref.removed) and torch.equal(back.selected, ref.selected)
    assert torch.equal(back.scores["hessian"], ref.scores["hessian"])
    assert back.provenance == _provenance()
    assert "10 original" in back.describe() and "4 added" in back.describe()
    assert not list(tmp_path.glob(".*.tmp"))


def test_refinement_of_another_checkpoint_is_refused(tmp_path):
    path = save_refinement(_refinement(), tmp_path / "refinement.pt")
    with pytest.raises(RefinementFileError, match=r"refinement\.pt.*10 Gaussians.*checkpoint has 12"):
        load_refinement(path, num_original=12)


@pytest.mark.parametrize(
    "expected, words",
    [
        (_provenance(seed=1), "ids/parameters sha256"),  # same count, other Gaussians: never matched by count
        (_provenance(config="b"), "config sha256"),
        (_provenance(step=100), "checkpoint step 69 (the run's checkpoint is step 100)"),
    ],
)
def test_stale_or_foreign_refinement_is_refused_naming_what_differs(tmp_path, expected, words):
    path = save_refinement(_refinement(provenance=_provenance()), tmp_path / "refinement.pt")
    hint = rebuild_hint(tmp_path, "refinement.pt")
    with pytest.raises(RefinementFileError) as info:
        load_refinement(path, num_original=10, expected=expected, rebuild=hint)
    text = _one_paragraph(info.value, path)
    assert words in text and "another run state" in text
    assert f"gvae-refine --load-config {tmp_path / 'config.yml'}" in text


def test_unknown_step_is_not_compared_but_digests_are(tmp_path):
    path = save_refinement(_refinement(provenance=_provenance()), tmp_path / "refinement.pt")
    load_refinement(path, num_original=10, expected=_provenance(step=None))
    with pytest.raises(RefinementFileError, match="ids/parameters"):
        load_refinement(path, num_original=10, expected=_provenance(seed=3, step=None))


def test_file_without_provenance_is_refused_when_a_run_is_expected(tmp_path):
    path = save_refinement(_refinement(), tmp_path / "refinement.pt")
    with pytest.raises(RefinementFileError, match="records no run"):
        load_refinement(path, num_original=10, expected=_provenance())


def test_damaged_files_are_refused_with_the_file_named(tmp_path):
    path = save_refinement(_refinement(), tmp_path / "refinement.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RefinementFileError, match=r"refinement\.pt: not a readable refinement file, it cannot be read"):
        load_refinement(path, num_original=10)
    path.write_bytes(b"not a torch file")
    with pytest.raises(RefinementFileError, match="cannot be read") as info:
        load_refinement(path, num_original=10)
    _one_paragraph(info.value, path)
    torch.save({"format": "gvae_ns.vae", "version": 2}, path)
    with pytest.raises(RefinementFileError, match=r"not a refinement file \(format tag 'gvae_ns.vae'"):
        load_refinement(path, num_original=10)
    with pytest.raises(FileNotFoundError, match="no such refinement file"):
        load_refinement(tmp_path / "missing.pt", num_original=10)


def _tampered(tmp_path, change):
    path = save_refinement(_refinement(), tmp_path / "refinement.pt")
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


def _set(*keys, value):
    def change(payload):
        target = payload
        for k in keys[:-1]:
            target = target[k]
        if value is KeyError:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
    return change


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize(
    "change, words",
    [
        (_set("version", value=REFINEMENT_VERSION + 1), "format version"),
        (_set("version", value=1), "format version 1, this gvae-ns reads version 2"),
        (_set("removed", value=torch.tensor([1, 2, 3])), "do not add up"),
        (_set("params", "means", value=_nan), "'params.means' holds NaN"),
        (_set("params", "features_rest", value=lambda t: t.double().fill_(float("inf"))), "NaN or Inf"),
        (_set("scores", "hessian", value=_nan), "'scores.hessian' holds NaN"),
        (_set("params", "quats", value=KeyError), "'params' lacks ['quats']"),
        (_set("is_new", value=KeyError), "lacks the key 'is_new'"),
        (_set("params", value=[1, 2]), "'params' is list, expected dict"),
        (_set("is_new", value=lambda t: t.float()), "'is_new' is torch.float32, expected a bool tensor"),
        (_set("params", "scales", value=lambda t: t[:, :2]), "'params.scales' has shape"),
        (_set("params", "opacities", value=lambda t: t[:-1]), "expected 13 rows"),
        (_set("params", "means", value=lambda t: t.long()), "expected a floating point tensor"),
        (_set("scores", "grad2d", value=lambda t: t[:3]), "'scores.grad2d' has shape (3,), expected 10 rows"),
        (_set("selected", value=torch.tensor([99])), "'selected' holds indices outside"),
        (_set("num_original", value="10"), "'num_original' is str, expected int"),
        (_set("steps", value=9), "not values gvae-refine writes"),
        (_set("provenance", value={"step": 1}), "provenance 'num_gaussians'"),
    ],
)
def test_malformed_but_tagged_files_give_one_clean_paragraph(tmp_path, change, words):
    path = _tampered(tmp_path, change)
    with pytest.raises(RefinementFileError) as info:
        load_refinement(path, num_original=10, rebuild=rebuild_hint(tmp_path, "refinement.pt"))
    text = _one_paragraph(info.value, path)
    assert words in text, text
    assert "gvae-refine --load-config" in text


def test_run_provenance_ties_to_ids_parameters_and_config():
    from gvae_ns.model import GaussianVAEModelConfig

    def run(seed=0, ids=None, step=None, **config):
        return provenance_of(_params(10, seed), torch.arange(10) if ids is None else ids,
                             GaussianVAEModelConfig(**config), step)

    base = run(step=5)
    assert base.step == 5 and base.num_gaussians == 10
    assert run(step=5) == base
    assert run(seed=1).gaussians_sha256 != base.gaussians_sha256
    assert run(ids=torch.arange(10) + 1).gaussians_sha256 != base.gaussians_sha256
    assert run(sh_degree=2).config_sha256 != base.config_sha256
    assert run(stage_steps=(10, 10, 20)).config_sha256 != base.config_sha256  # the schedule shapes the scene
    assert run(refine_every=50).config_sha256 != base.config_sha256  # densification setting
    # Settings that do not change the trained Gaussians do not make the files stale.
    same = run(run_dir="/elsewhere", show_refined=False, extrapolate_stages=3, extrapolate_fraction=0.5,
               decoder_steps=7, refine_steps=2)
    assert same.config_sha256 == base.config_sha256


def test_digest_sees_dtype_shape_and_bytes():
    a = torch.arange(6, dtype=torch.float32)
    assert digest_tensors([a]) == digest_tensors([a.clone()])
    assert digest_tensors([a]) != digest_tensors([a.reshape(2, 3)])
    assert digest_tensors([a]) != digest_tensors([a.double()])
    b = a.clone()
    b[3] = float(torch.nextafter(b[3], torch.tensor(10.0)))
    assert digest_tensors([a]) != digest_tensors([b])
    assert issubclass(RefinementFileError, ValueError) and RefinementFileError is TaggedFileError
