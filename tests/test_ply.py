"""The fast PLY writer: same bytes as nerfstudio's exporter, atomic, clear errors.

nerfstudio's writer is taken from :func:`gvae_ns.ply.nerfstudio_write_ply`, never from
``ExportGaussianSplat.write_ply``: building any gaussianvae model swaps that attribute for our writer for the
whole process, after which it would compare the fast writer with itself.
"""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from nerfstudio.scripts.exporter import ExportGaussianSplat
from plyfile import PlyData

from gvae_ns.ply import nerfstudio_write_ply, use_fast_ply_writer, write_ply


def _splat_columns(n: int, seed: int = 0) -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(seed)
    cols = OrderedDict()
    for name in ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]:
        cols[name] = rng.standard_normal((n, 1)).astype(np.float32)
    for i in range(45):
        cols[f"f_rest_{i}"] = rng.standard_normal((n, 1)).astype(np.float32)
    for name in ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]:
        cols[name] = rng.standard_normal(n).astype(np.float64)  # float64 is written as float32
    return cols


def _nerfstudio_writer():
    original = nerfstudio_write_ply()
    assert original is not write_ply and original.__module__ == "nerfstudio.scripts.exporter"
    return original


@pytest.mark.parametrize("with_rgb", [False, True])
def test_same_bytes_as_nerfstudio_writer(tmp_path, with_rgb):
    cols = _splat_columns(50)
    if with_rgb:
        cols["red"] = np.arange(50, dtype=np.uint8)
    _nerfstudio_writer()(str(tmp_path / "ref.ply"), 50, cols)
    write_ply(tmp_path / "fast.ply", 50, cols)
    assert (tmp_path / "fast.ply").read_bytes() == (tmp_path / "ref.ply").read_bytes()
    vertex = PlyData.read(str(tmp_path / "fast.ply"))["vertex"]
    assert vertex.count == 50 and len(vertex.properties) == 62 + with_rgb
    np.testing.assert_allclose(vertex["rot_3"], cols["rot_3"].astype(np.float32))
    np.testing.assert_array_equal(vertex["f_rest_44"], cols["f_rest_44"][:, 0])


def test_comparison_still_uses_nerfstudio_writer_after_a_model_was_built(tmp_path):
    """The trap this file once fell into: a model built in the same process swaps the exporter's writer."""
    from nerfstudio.data.scene_box import SceneBox

    from gvae_ns.model import GaussianVAEModelConfig

    config = GaussianVAEModelConfig(num_random=8, stage_downscales=(2, 1), stage_steps=(5, 5))
    config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=2, metadata={})
    assert ExportGaussianSplat.write_ply is write_ply, "building a model installs the fast writer"
    cols = _splat_columns(7, seed=3)
    _nerfstudio_writer()(str(tmp_path / "ref.ply"), 7, cols)
    ExportGaussianSplat.write_ply(str(tmp_path / "fast.ply"), 7, cols)
    assert (tmp_path / "fast.ply").read_bytes() == (tmp_path / "ref.ply").read_bytes()


def test_bad_columns_leave_no_file(tmp_path):
    cols = _splat_columns(5)
    cols["x"] = cols["x"][:4]
    with pytest.raises(ValueError, match="'x' has 4 values, expected 5"):
        write_ply(tmp_path / "a.ply", 5, cols)
    cols = _splat_columns(5)
    cols["id"] = np.arange(5, dtype=np.int64)
    with pytest.raises(ValueError, match="'id' is int64"):
        write_ply(tmp_path / "a.ply", 5, cols)
    assert list(tmp_path.iterdir()) == []


def test_exporter_uses_fast_writer_once_installed(monkeypatch):
    monkeypatch.setattr(ExportGaussianSplat, "write_ply", staticmethod(nerfstudio_write_ply()))
    use_fast_ply_writer()
    assert ExportGaussianSplat.write_ply is write_ply
    assert nerfstudio_write_ply() is not write_ply
