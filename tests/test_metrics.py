"""Image and geometry metrics (gvae_ns.metrics)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from gvae_ns import metrics


def _smooth_image(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A textured image in [0.2, 0.8] (no clipping when small noise is added)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8, w // 8, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (0.2 + 0.6 * img)[0].permute(1, 2, 0)


def test_psnr_identity_and_gaussian_noise():
    ref = _smooth_image(96, 96)
    assert math.isinf(float(metrics.psnr(ref, ref)))
    sigma = 0.02
    noisy = ref + sigma * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    assert float(metrics.psnr(noisy, ref)) == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.1)
    batch = metrics.psnr(torch.stack([noisy, ref + 0.1]), torch.stack([ref, ref]))
    assert batch.shape == (2,) and float(batch[1]) == pytest.approx(20.0, abs=1e-4)
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(ref, ref[:-1])


def test_ssim_identity_shift_and_reference_implementation():
    ref = _smooth_image(64, 64)
    assert float(metrics.ssim(ref, ref)) == pytest.approx(1.0, abs=1e-6)
    detail = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2))
    shifted = torch.roll(detail, shifts=2, dims=1)
    assert float(metrics.ssim(shifted, detail)) < 0.5
    noisy = (ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    ours = metrics.ssim(torch.stack([noisy, shifted]), torch.stack([ref, detail]))
    assert ours.shape == (2,) and 0.3 < float(ours[0]) < 0.99
    from skimage.metrics import structural_similarity

    for img, target, value in ((noisy, ref, ours[0]), (shifted, detail, ours[1])):
        theirs = structural_similarity(
            img.double().numpy(),
            target.double().numpy(),
            channel_axis=-1,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert float(value) == pytest.approx(theirs, abs=1e-5)
    with pytest.raises(ValueError, match="smaller than the 11px window"):
        metrics.ssim(ref[:8, :8], ref[:8, :8])


def _brute_force_chamfer(a: np.ndarray, b: np.ndarray) -> float:
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return float(d.min(1).mean() + d.min(0).mean())


@pytest.mark.parametrize("method", ["kdtree", "cdist"])
def test_chamfer_zero_shift_and_brute_force(method):
    grid = np.stack(np.meshgrid(*[np.arange(6.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    assert metrics.chamfer_distance(grid, grid, chunk=50, method=method) == 0.0
    shift = np.array([0.1, -0.05, 0.02])
    expected = 2 * float((shift**2).sum())
    assert metrics.chamfer_distance(grid, grid + shift, chunk=37, method=method) == pytest.approx(expected, rel=1e-5)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 3)), rng.normal(size=(170, 3)) + 0.3
    for chunk in (7, 64, 4096):
        got = metrics.chamfer_distance(a, b, chunk=chunk, method=method)
        assert got == pytest.approx(_brute_force_chamfer(a, b), rel=1e-9)
    to_b, to_a = metrics.nearest_sq_distances(torch.from_numpy(a), torch.from_numpy(b), chunk=64, method=method)
    d = ((a[:, None] - b[None]) ** 2).sum(-1)
    np.testing.assert_allclose(to_b.numpy(), d.min(1), rtol=1e-9)
    np.testing.assert_allclose(to_a.numpy(), d.min(0), rtol=1e-9)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.chamfer_distance(a[:0], b, method=method)


@pytest.mark.parametrize("method", ["kdtree", "cdist"])
def test_chamfer_float32_is_exact_for_close_points(method):
    """Dense float32 sets far from the origin: tiny distances survive (no |a|^2 + |b|^2 - 2ab cancellation)."""
    rng = np.random.default_rng(1)
    a = (rng.random((2000, 3)) + 50.0).astype(np.float32)
    b = a + np.float32(1e-3) * np.array([1.0, 0.0, 0.0], np.float32)
    assert metrics.chamfer_distance(a, b, chunk=512, method=method) == pytest.approx(2e-6, rel=2e-2)
    with pytest.raises(ValueError, match="method must be"):
        metrics.chamfer_distance(a, b, method="faiss")


def test_lpips_without_weights_returns_none_and_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(metrics, "_WARNED", set())
    img = _smooth_image(32, 32)
    assert not metrics.lpips_weights_available()
    with pytest.warns(RuntimeWarning, match="LPIPS skipped"):
        assert metrics.lpips_or_none(img, img) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.lpips_or_none(img, img) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    assert metrics.lpips_weights_available()


def test_brisque_optional():
    img = _smooth_image(64, 64)
    try:
        import brisque  # noqa: F401
    except ImportError:
        with pytest.warns(RuntimeWarning, match="BRISQUE skipped"):
            assert metrics.brisque_or_none(img) is None
        return
    clean = metrics.brisque_or_none(img)
    noisy = metrics.brisque_or_none((img + 0.1 * torch.randn(img.shape)).clamp(0, 1))
    assert isinstance(clean, float) and isinstance(noisy, float) and clean != noisy
    with pytest.raises(ValueError, match="one \\[H, W, 3\\] image"):
        metrics.brisque_or_none(img[None])


def test_lpips_pipeline_with_stand_in_backbone(monkeypatch):
    """The scoring path, with torchvision's AlexNet built untrained instead of loading ImageNet weights."""
    import torchvision

    real_alexnet = torchvision.models.alexnet
    monkeypatch.setattr(torchvision.models, "alexnet", lambda weights=None, **kw: real_alexnet(weights=None))
    monkeypatch.setattr(metrics, "lpips_weights_available", lambda: True)
    metrics._lpips_module.cache_clear()
    try:
        torch.manual_seed(0)
        ref = _smooth_image(64, 64)
        noisy = (ref + 0.2 * torch.randn(ref.shape)).clamp(0, 1)
        single = metrics.lpips_or_none(noisy, ref)
        batch = metrics.lpips_or_none(torch.stack([ref, noisy]), torch.stack([ref, ref]))
    finally:
        metrics._lpips_module.cache_clear()
    assert single.ndim == 0 and batch.shape == (2,)
    assert float(batch[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(batch[1]) == pytest.approx(float(single), rel=1e-5) and float(single) > 0
