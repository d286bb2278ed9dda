"""Feature-space and image metrics against closed forms and hand-computed cases."""

import numpy as np
import pytest
import torch

from explore import metrics


def rotation(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_closed_form_commuting_covariances():
    # S1 = R diag(a) R^T and S2 = R diag(b) R^T commute, so d^2 = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    r = rotation(5)
    a, b = np.array([1.0, 2.0, 0.5, 3.0, 0.1]), np.array([2.0, 0.5, 0.5, 1.0, 0.4])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1].copy()
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, r @ np.diag(a) @ r.T, mu2, r @ np.diag(b) @ r.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_scipy_sqrtm_for_general_covariances():
    from scipy import linalg

    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T, m2 @ m2.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_from_samples_approaches_the_analytic_value():
    rng = np.random.default_rng(2)
    r = rotation(4, seed=3)
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([1.0, 1.0, 1.0, 1.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -1.0, 0.5])
    s1, s2 = r @ np.diag(a) @ r.T, r @ np.diag(b) @ r.T
    x = rng.multivariate_normal(mu1, s1, size=40_000)
    y = rng.multivariate_normal(mu2, s2, size=40_000)
    analytic = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert analytic == pytest.approx(2.25 + np.sum((np.sqrt(a) - 1) ** 2))
    assert metrics.frechet_distance_features(x, y) == pytest.approx(analytic, rel=0.03)


def test_frechet_of_identical_sets_is_zero_and_accepts_tensors():
    f = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance_features(f, f.clone()) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance_features(f, f + 1) == pytest.approx(16.0, rel=1e-6)


def test_precision_recall_identical_and_disjoint_sets():
    f = np.random.default_rng(0).normal(size=(200, 8))
    assert metrics.precision_recall(f, f.copy(), k=3) == (1.0, 1.0)
    assert metrics.precision_recall(f, f + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_partial_overlap_known_answer():
    # Real: points 0..9 on a line, so their 3-NN radii are 3 at the ends and 2 inside.
    # Fake: 0..4 (on real points) plus 1000..1004 (far away) -> precision 5/10.
    # Fake radii for 0..4 are 3, 2, 2, 2, 3: their balls cover [-3, 7], so real 0..7 are covered -> recall 8/10.
    real = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
    fake = np.stack([np.r_[np.arange(5.0), 1000 + np.arange(5.0)], np.zeros(10)], axis=1)
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(0.8)
    assert metrics.knn_radii(real, 3).tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]


def test_precision_recall_separates_mode_collapse_from_coverage():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(500, 2))
    collapsed = rng.normal(size=(500, 2)) * 0.2  # all inside the real support, covering little of it
    precision, recall = metrics.precision_recall(real, collapsed, k=3)
    assert precision > 0.95 and recall < 0.5


def test_knn_radii_needs_more_points_than_k():
    with pytest.raises(ValueError, match="more than 3 points"):
        metrics.knn_radii(np.zeros((3, 2)), 3)


def test_diversity_and_pixel_std():
    # Class 0: two points 3-4-5 apart; class 1: three points on a unit equilateral triangle.
    feats = np.array([[0, 0], [3, 4], [0, 0], [1, 0], [0.5, np.sqrt(3) / 2]])
    labels = np.array([0, 0, 1, 1, 1])
    assert metrics.diversity(feats, labels) == pytest.approx((5 + 1) / 2)
    assert metrics.mean_pairwise_distance(feats[:1]) != metrics.mean_pairwise_distance(feats[:1])  # nan
    same = np.full((4, 8, 8, 3), 100, np.uint8)
    assert metrics.pixel_std(same, [0, 0, 1, 1]) == 0.0
    two = np.stack([np.zeros((8, 8, 3)), np.ones((8, 8, 3))])
    assert metrics.pixel_std(two, [0, 0]) == pytest.approx(0.5)


def test_psnr_and_ssim_sanity():
    rng = np.random.default_rng(0)
    ref = rng.random((3, 32, 32, 3))
    shifted = ref + 0.1  # MSE 0.01 -> 20 dB (data range 1)
    assert metrics.psnr(ref, shifted) == pytest.approx([20.0] * 3)
    assert np.all(np.isinf(metrics.psnr(ref, ref)))
    assert metrics.ssim(ref, ref) == pytest.approx([1.0] * 3)
    noisy = np.clip(ref + rng.normal(scale=0.05, size=ref.shape), 0, 1)
    noisier = np.clip(ref + rng.normal(scale=0.3, size=ref.shape), 0, 1)
    assert np.all(metrics.ssim(ref, noisy) > metrics.ssim(ref, noisier))
    assert np.all(metrics.psnr(ref, noisy) > metrics.psnr(ref, noisier))
    u8 = (ref * 255).round().astype(np.uint8)
    assert metrics.psnr(u8[0], u8[0] // 2).shape == (1,)  # a single HWC image, uint8 scaled to [0, 1]
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(ref, ref[:, :16])


def test_the_app_psnr_ssim_are_the_shared_ones():
    """The upsampling lab's numbers for uint8 images; scaled to [0, 1] they differ from scikit-image's at data
    range 255 (what the lab computed before) by float64 rounding only."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from explore.ui.metrics import psnr_ssim

    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    b = np.clip(a + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    psnr, ssim = psnr_ssim(a, b)
    assert (psnr, ssim) == (metrics.psnr(a, b)[0], metrics.ssim(a, b)[0])
    assert psnr == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-13)
    assert ssim == pytest.approx(structural_similarity(a, b, channel_axis=-1, data_range=255), rel=1e-13)


def test_saturated_fraction_counts_pixels_with_a_clipped_channel():
    images = np.full((2, 2, 5, 3), 128, np.uint8)
    images[0, 0, 0] = (255, 128, 128)  # one channel at the top
    images[1, 1, :, 2] = 0  # a row with blue at the bottom
    images[1, 0, 0] = (254, 1, 128)  # close to the limits but not clipped
    assert metrics.saturated_fraction(images) == pytest.approx(6 / 20)
    assert metrics.saturated_fraction(np.full((1, 4, 4, 3), 255, np.uint8)) == 1.0
