"""Tests for nin.data.whiten: GCN semantics, ZCA whitening properties, chunked fit, subsets, batch transform, files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nin.data.whiten import Whitening, _moments, fit_whitening, global_contrast_normalize
from nin.errors import NinError

SHAPE = (3, 8, 8)
D = 3 * 8 * 8

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_images(n: int = 3000, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, 8, 8] images with strongly correlated pixels and a well-spread covariance spectrum."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(D, D, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, D, dtype=torch.float64)
    z = torch.randn(n, D, generator=g, dtype=torch.float64) @ mixing.T  # pixel covariance mixing mixing^T
    x = 128 + 30 * z / z.std() + 20 * torch.randn(n, 1, generator=g, dtype=torch.float64)  # plus a brightness shift
    return x.round().clamp(0, 255).to(torch.uint8).view(n, *SHAPE)


IMAGES = correlated_images()


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def covariance(x: torch.Tensor) -> torch.Tensor:
    x = x.flatten(1).double()
    x = x - x.mean(0)
    return x.T @ x / len(x)


@pytest.fixture(scope="module")
def white() -> Whitening:
    return fit_whitening(IMAGES)


# ------------------------------------------------------------------- GCN
def test_gcn_centres_each_image_and_sets_its_norm_to_scale():
    x = as_float(IMAGES[:50]).double()
    out = global_contrast_normalize(x, scale=55.0, eps=0.0)
    flat = out.flatten(1)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(flat.mean(1), torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(flat.norm(dim=1), torch.full((50,), 55.0, dtype=torch.float64))
    # So the per-value RMS is scale / sqrt(D), not scale.
    torch.testing.assert_close(flat.square().mean(1).sqrt(), torch.full((50,), 55.0 / D**0.5, dtype=torch.float64))


def test_gcn_eps_is_added_to_the_sum_of_squares():
    x = as_float(IMAGES[:5]).double()
    centred = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
    s = centred.square().sum(1)
    for eps, factor in ((0.0, 1.0), (float(s[0]), 0.5**0.5), (3 * float(s[0]), 0.5)):
        out = global_contrast_normalize(x[:1], scale=2.0, eps=eps)
        assert out.flatten(1).norm() == pytest.approx(2.0 * factor, rel=1e-12)


def test_gcn_constant_image_is_only_centred_without_nan():
    x = torch.tensor([0.0, 0.7, 1.0, 1 / 3]).view(4, 1, 1, 1).expand(4, *SHAPE)
    for eps in (1e-8, 0.0):
        out = global_contrast_normalize(x, eps=eps)
        assert torch.isfinite(out).all()
        assert torch.equal(out, torch.zeros_like(out))
    # A divisor under min_divisor is replaced by 1: the image is centred, not scaled.
    y = as_float(IMAGES[:3])
    out = global_contrast_normalize(y, scale=55.0, min_divisor=1e9)
    torch.testing.assert_close(out, y - y.mean((1, 2, 3), keepdim=True))


def test_gcn_accepts_channels_last_and_returns_contiguous():
    x = as_float(IMAGES[:4])
    out = global_contrast_normalize(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous()
    torch.testing.assert_close(out, global_contrast_normalize(x))


# ------------------------------------------------------------------- ZCA
def test_whitened_training_data_has_identity_covariance_and_zero_mean():
    w = fit_whitening(IMAGES, gcn_scale=55.0, eps=1e-5)
    out = w(as_float(IMAGES)).double().flatten(1)
    assert out.mean(0).abs().max() < 1e-3
    # Check on the eigen-directions of the GCN'd data whose variance dwarfs eps.
    _, cov_in = _moments(IMAGES, None, 55.0, 4096)
    s, u = torch.linalg.eigh(cov_in)
    big = u[:, s > 1000 * 1e-5]
    assert big.shape[1] > D // 2
    cov_out = big.T @ covariance(out) @ big
    assert (cov_out - torch.eye(big.shape[1], dtype=torch.float64)).abs().max() < 2e-2
    # GCN removes one direction (the per-image mean): its output variance stays ~0, not blown up.
    ones = torch.full((D,), D**-0.5, dtype=torch.float64)
    assert float(ones @ covariance(out) @ ones) < 1e-3


def test_eps_shrinks_low_variance_directions_as_formula_says():
    w = fit_whitening(IMAGES, gcn_scale=None, eps=0.1)
    _, cov_in = _moments(IMAGES, None, None, 4096)
    s, u = torch.linalg.eigh(cov_in)
    cov_out = u.T @ covariance(w(as_float(IMAGES))) @ u
    torch.testing.assert_close(cov_out.diagonal(), s / (s + 0.1), atol=1e-4, rtol=1e-3)


def test_zca_matrix_is_symmetric_and_float32(white):
    assert white.matrix.dtype == torch.float32 and white.mean.dtype == torch.float32
    assert white.matrix.shape == (D, D) and white.mean.shape == (D,)
    assert torch.equal(white.matrix, white.matrix.T)
    assert torch.linalg.eigvalsh(white.matrix.double()).min() > 0


def test_zca_is_zero_phase_whitened_images_stay_closest_to_originals():
    w = fit_whitening(IMAGES, gcn_scale=None, eps=1e-5)
    x = as_float(IMAGES).flatten(1).double()
    xc = x - x.mean(0)
    out = w(as_float(IMAGES)).flatten(1).double()
    # Each output pixel is positively correlated with the same input pixel.
    corr = ((xc * (out - out.mean(0))).mean(0)) / (xc.std(0, correction=0) * out.std(0, correction=0))
    assert corr.min() > 0.05
    # Other whitenings of the same data (PCA whitening, a rotation of ZCA) are as white but further from the input:
    # ZCA minimises the mean squared distance between whitened and original image.
    s, u = torch.linalg.eigh(covariance(x))
    pca = xc @ u * (s + 1e-5).rsqrt()
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rotated = out @ q
    assert covariance(rotated).trace() == pytest.approx(float(covariance(out).trace()), rel=1e-9)  # equally white
    distance = (out - xc).square().sum(1).mean()
    assert distance < 0.9 * (pca - xc).square().sum(1).mean()
    assert distance < 0.9 * (rotated - xc).square().sum(1).mean()
    assert (pca * xc).mean(0).min() < 0  # PCA whitening is not zero-phase: some pixels flip sign


# ------------------------------------------------------------- the fit itself
def test_chunked_moments_equal_the_direct_computation():
    x = global_contrast_normalize(IMAGES[:500].double() / 255, 55.0)
    direct_mean = x.flatten(1).mean(0)
    direct_cov = covariance(x)
    for chunk in (7, 64, 4096):
        mean, cov = _moments(IMAGES[:500], None, 55.0, chunk)
        torch.testing.assert_close(mean, direct_mean, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(cov, direct_cov, atol=1e-12, rtol=1e-10)
    small = fit_whitening(IMAGES[:500], _chunk=13)
    whole = fit_whitening(IMAGES[:500], _chunk=4096)
    torch.testing.assert_close(small.matrix, whole.matrix, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(small.mean, whole.mean)


def test_max_images_subset_is_seeded_and_deterministic():
    a = fit_whitening(IMAGES, max_images=400, seed=3, _chunk=100)
    b = fit_whitening(IMAGES, max_images=400, seed=3)
    c = fit_whitening(IMAGES, max_images=400, seed=4)
    torch.testing.assert_close(a.matrix, b.matrix, atol=1e-4, rtol=1e-5)
    assert (a.matrix - c.matrix).abs().max() > 1e-2
    # It is a subset of 400 images: the same as fitting on exactly those images.
    index = torch.randperm(len(IMAGES), generator=torch.Generator().manual_seed(3))[:400]
    torch.testing.assert_close(a.matrix, fit_whitening(IMAGES[index]).matrix, atol=1e-4, rtol=1e-5)
    # No subset when N <= max_images.
    full = fit_whitening(IMAGES[:500], max_images=500)
    torch.testing.assert_close(full.matrix, fit_whitening(IMAGES[:500], max_images=None).matrix)


# ---------------------------------------------------------- batch transform
def test_batch_transform_matches_float64_reference(white):
    x = as_float(IMAGES[:32])
    out = white(x)
    assert out.shape == (32, *SHAPE) and out.dtype == torch.float32 and out.is_contiguous()
    ref = (global_contrast_normalize(x.double(), 55.0).flatten(1) - white.mean.double()) @ white.matrix.double()
    torch.testing.assert_close(out.flatten(1).double(), ref, atol=1e-3, rtol=1e-4)
    assert white(x.double()).dtype == torch.float32


def test_channels_last_input_equals_nchw(white):
    x = as_float(IMAGES[:16])
    out = white(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous()
    torch.testing.assert_close(out, white(x), atol=0, rtol=0)


def test_wrong_batch_is_rejected(white):
    with pytest.raises(NinError, match="3x8x8"):
        white(torch.zeros(2, 1, 8, 8))
    with pytest.raises(NinError, match="float"):
        white(IMAGES[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_the_batch_device(white):
    x = as_float(IMAGES[:8])
    on_gpu = white.to("cuda")
    assert on_gpu.matrix.is_cuda and not white.matrix.is_cuda
    out = on_gpu(x.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), white(x), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(fit_whitening(IMAGES[:500].cuda()).matrix, fit_whitening(IMAGES[:500]).matrix)


# ------------------------------------------------------------------- files
@pytest.mark.parametrize("gcn_scale", [55.0, None])
def test_save_load_round_trip(tmp_path, gcn_scale):
    w = fit_whitening(IMAGES[:500], gcn_scale=gcn_scale, eps=0.05)
    path = tmp_path / "zca.safetensors"
    w.save(path)
    back = Whitening.load(path)
    assert (back.shape, back.gcn_scale, back.eps) == (SHAPE, gcn_scale, 0.05)
    x = as_float(IMAGES[:10])
    assert torch.equal(back(x), w(x))
    assert all(isinstance(v, torch.Tensor) for v in w.state_dict().values())
    again = Whitening.from_state_dict(w.state_dict())
    assert torch.equal(again(x), w(x))
    moved = w.to("cpu")
    assert isinstance(moved, Whitening) and torch.equal(moved(x), w(x))


def test_load_errors_name_the_file(tmp_path, white):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    missing = tmp_path / "missing.safetensors"
    partial = tmp_path / "partial.safetensors"
    state = white.state_dict()
    del state["matrix"]
    save_file({k: v.contiguous() for k, v in state.items()}, partial)
    for path in (corrupt, missing, partial):
        with pytest.raises(NinError) as info:
            Whitening.load(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message
    with pytest.raises(NinError, match="matrix"):
        Whitening.load(partial)


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("images", "kwargs", "match"),
    [
        (IMAGES[:10].float(), {}, "uint8"),
        (IMAGES[:10, 0], {}, "uint8"),
        (IMAGES[:1], {}, "at least 2 images"),
        (torch.zeros(2, 1, 91, 91, dtype=torch.uint8), {}, "ZCA over 8281 features .* too large"),
        (IMAGES[:10], {"eps": 0.0}, "eps"),
        (IMAGES[:10], {"gcn_scale": -1.0}, "GCN scale"),
        (IMAGES[:10], {"max_images": 1}, "max_images"),
    ],
)
def test_bad_input_raises_one_line_nin_error(images, kwargs, match):
    with pytest.raises(NinError, match=match) as info:
        fit_whitening(images, **kwargs)
    assert "\n" not in str(info.value)
