"""Sample-quality metrics shared by the evaluation command, the app and the benchmarks.

Feature-space metrics take feature vectors ([N, D] arrays or tensors, e.g. from
`EvalClassifier.features`); image metrics take NHWC arrays (uint8, or float in
[0, 1]). Everything is deterministic and runs on the CPU in seconds for a few
thousand samples.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# --- Frechet distance -------------------------------------------------------------------------

def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] (unbiased covariance, N >= 2)."""
    f = _as_f64(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID of Heusel et al. 2017).

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); the trace of the matrix square root
    is taken as Tr (S1^(1/2) S2 S1^(1/2))^(1/2), whose argument is symmetric PSD, so no
    complex parts or ill-conditioned sqrtm appear.
    """
    mu1, mu2, s1, s2 = (_as_f64(v) for v in (mu1, mu2, sigma1, sigma2))
    root1 = _psd_sqrt(s1)
    cross = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0, None)).sum()
    d2 = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(d2, 0.0)


def frechet_distance_features(real, fake) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D]."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


# --- precision / recall -----------------------------------------------------------------------

def _pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i:i + chunk], b) for i in range(0, len(a), chunk)])


def knn_radii(features, k: int = 3) -> np.ndarray:
    """Distance from every point to its k-th nearest other point of the same set."""
    f = torch.as_tensor(_as_f64(features))
    if len(f) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(f)}")
    d = _pairwise(f, f)
    # Sorted distances: index 0 is the point itself (0), index k its k-th neighbour.
    return d.kthvalue(k + 1, dim=1).values.numpy()


def coverage_fraction(reference, queries, k: int = 3) -> float:
    """Fraction of `queries` inside the union of the k-NN balls around the `reference` points."""
    ref, q = (torch.as_tensor(_as_f64(v)) for v in (reference, queries))
    radii = torch.as_tensor(knn_radii(ref, k))
    d = _pairwise(q, ref)
    return float((d <= radii[None, :]).any(dim=1).double().mean())


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    precision = fraction of fake features inside the union of k-NN balls of the real ones;
    recall = fraction of real features inside the union of k-NN balls of the fake ones.
    """
    return coverage_fraction(real, fake, k), coverage_fraction(fake, real, k)


# --- diversity --------------------------------------------------------------------------------

def mean_pairwise_distance(features) -> float:
    """Mean Euclidean distance over all unordered pairs of distinct points."""
    f = torch.as_tensor(_as_f64(features))
    n = len(f)
    if n < 2:
        return float("nan")
    return float(_pairwise(f, f).sum() / (n * (n - 1)))


def diversity(features, labels) -> float:
    """Mean over classes of the mean pairwise feature distance within the class."""
    labels = np.asarray(labels)
    f = _as_f64(features)
    values = [mean_pairwise_distance(f[labels == c]) for c in np.unique(labels) if np.sum(labels == c) >= 2]
    return float(np.mean(values)) if values else float("nan")


def pixel_std(images, labels) -> float:
    """Mean over classes of the per-pixel standard deviation across the class's images (in [0, 1] units)."""
    x = _images01(images)
    labels = np.asarray(labels)
    values = [x[labels == c].std(axis=0).mean() for c in np.unique(labels) if np.sum(labels == c) >= 2]
    return float(np.mean(values)) if values else float("nan")


# --- image fidelity ---------------------------------------------------------------------------

def _images01(images) -> np.ndarray:
    x = np.asarray(images)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def psnr(reference, test) -> np.ndarray:
    """Per-image PSNR in dB of test against reference, NHWC (or HWC) images in [0, 1] or uint8."""
    from skimage.metrics import peak_signal_noise_ratio

    ref, out = _batched(reference, test)
    with np.errstate(divide="ignore"):  # identical images: inf dB
        return np.array([peak_signal_noise_ratio(r, o, data_range=1.0) for r, o in zip(ref, out)])


def ssim(reference, test) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004; skimage, 7x7 window, channels averaged) of test against reference."""
    from skimage.metrics import structural_similarity

    ref, out = _batched(reference, test)
    return np.array([structural_similarity(r, o, data_range=1.0, channel_axis=-1) for r, o in zip(ref, out)])


def _batched(reference, test) -> tuple[np.ndarray, np.ndarray]:
    ref, out = _images01(reference), _images01(test)
    if ref.shape != out.shape:
        raise ValueError(f"image shapes differ: {list(ref.shape)} vs {list(out.shape)}")
    if ref.ndim == 3:
        ref, out = ref[None], out[None]
    return ref, out


__all__ = ["coverage_fraction", "diversity", "frechet_distance", "frechet_distance_features", "gaussian_stats",
           "knn_radii", "mean_pairwise_distance", "pixel_std", "precision_recall", "psnr", "ssim"]


def saturated_fraction(images: np.ndarray) -> float:
    """Fraction of pixels (uint8 NHWC) with a channel at 0 or 255: clipped, as guidance that overshoots leaves them."""
    images = np.asarray(images)
    return float(((images == 0) | (images == 255)).any(axis=-1).mean())


def grain(images: np.ndarray) -> float:
    """Mean absolute difference between horizontally and vertically neighbouring pixels (uint8 NHWC, 0-255 units):
    high-frequency energy, which sampling noise left in an image raises above that of real images."""
    x = np.asarray(images, dtype=np.float32)
    return float((np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()) / 2)
