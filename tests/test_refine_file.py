"""The refinement file: round trip, and clear errors for files that do not belong or are damaged."""

import pytest
import torch

from gvae_ns.refine import (
    REFINEMENT_VERSION,
    Refinement,
    RefinementFileError,
    load_refinement,
    save_refinement,
)


def _refinement(n_original: int = 10, n_added: int = 4, removed=(2,)) -> Refinement:
    n = n_original - len(removed) + n_added
    params = {
        "means": torch.randn(n, 3), "scales": torch.randn(n, 3), "quats": torch.randn(n, 4),
        "features_dc": torch.randn(n, 3), "features_rest": torch.randn(n, 15, 3), "opacities": torch.randn(n, 1),
    }
    is_new = torch.zeros(n, dtype=torch.bool)
    is_new[n - n_added:] = True
    return Refinement(params=params, is_new=is_new, selected=torch.tensor([1, 2, 3]),
                      removed=torch.tensor(list(removed), dtype=torch.long),
                      scores={"grad2d": torch.rand(n_original), "hessian": torch.rand(n_original)},
                      num_original=n_original, steps=2, select="hessian", decoder="temporal")


def test_round_trip(tmp_path):
    ref = _refinement()
    path = save_refinement(ref, tmp_path / "refinement.pt")
    back = load_refinement(path, num_original=10)
    assert back.num_added == 4 and back.steps == 2 and back.select == "hessian"
    assert torch.equal(back.params["means"], ref.params["means"])
    assert torch.equal(back.removed, ref.removed)
    assert torch.equal(back.scores["hessian"], ref.scores["hessian"])
    assert "10 original" in back.describe() and "4 added" in back.describe()


def test_refinement_of_another_checkpoint_is_refused(tmp_path):
    path = save_refinement(_refinement(), tmp_path / "refinement.pt")
    with pytest.raises(RefinementFileError, match=r"refinement\.pt.*10 Gaussians.*checkpoint has 12"):
        load_refinement(path, num_original=12)


def test_damaged_files_are_refused_with_the_file_named(tmp_path):
    path = save_refinement(_refinement(), tmp_path / "refinement.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RefinementFileError, match=r"refinement\.pt: cannot be read"):
        load_refinement(path, num_original=10)
    path.write_bytes(b"not a torch file")
    with pytest.raises(RefinementFileError, match="cannot be read"):
        load_refinement(path, num_original=10)


def test_wrong_version_and_inconsistent_rows_are_refused(tmp_path):
    path = save_refinement(_refinement(), tmp_path / "refinement.pt")
    payload = torch.load(path, weights_only=True)
    payload["version"] = REFINEMENT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(RefinementFileError, match="format version"):
        load_refinement(path, num_original=10)
    payload["version"] = REFINEMENT_VERSION
    payload["removed"] = torch.tensor([1, 2, 3])
    torch.save(payload, path)
    with pytest.raises(RefinementFileError, match="do not add up"):
        load_refinement(path, num_original=10)
    payload["removed"] = torch.tensor([2])
    payload["params"]["means"][0, 0] = float("nan")
    torch.save(payload, path)
    with pytest.raises(RefinementFileError, match="non-finite"):
        load_refinement(path, num_original=10)
