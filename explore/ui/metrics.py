"""Image measurements for the explorer and the upsampling lab (images as numpy arrays)."""
from __future__ import annotations

import numpy as np

from explore import metrics as shared

# Luma weights (ITU-R BT.601) for turning RGB into one channel before a spectrum.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
BANDS = {"coarse": (0.0, 0.125), "middle": (0.125, 0.25), "fine": (0.25, 0.5)}  # cycles / pixel


def luma(images: np.ndarray) -> np.ndarray:
    """[..., 3, H, W] float -> [..., H, W]."""
    return np.tensordot(images.astype(np.float32), LUMA, axes=([-3], [0]))


def _radius(h: int, w: int) -> np.ndarray:
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    return np.sqrt(fy ** 2 + fx ** 2)  # cycles / pixel, 0 .. ~0.707


def radial_power_spectrum(gray: np.ndarray, bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of [..., H, W] images: (frequencies, power [..., bins]).

    Frequencies run from the lowest non-zero one to Nyquist (0.5 cycles / pixel); DC is left out.
    """
    h, w = gray.shape[-2:]
    bins = bins or min(h, w) // 2
    power = np.abs(np.fft.fft2(gray)) ** 2 / (h * w)
    radius = _radius(h, w)
    edges = np.linspace(0, 0.5, bins + 1)
    which = np.digitize(radius, edges, right=True) - 1  # radius 0 -> -1 (DC), corners above 0.5 -> bins
    flat = power.reshape(*power.shape[:-2], -1)
    centres, out = [], []
    for b in range(bins):
        mask = (which == b).ravel()
        if mask.any():
            centres.append(radius.ravel()[mask].mean())
            out.append(flat[..., mask].mean(-1))
    return np.asarray(centres), np.stack(out, axis=-1)


def band_similarity(series: np.ndarray, final: np.ndarray) -> dict[str, np.ndarray]:
    """Per frequency band, cosine similarity of each frame's band-passed image with the final one.

    series: [S, H, W] (e.g. predicted x0 per step), final: [H, W]. Values near 1 mean that band has settled.
    """
    h, w = final.shape
    radius = _radius(h, w)
    f_series, f_final = np.fft.fft2(series), np.fft.fft2(final)
    out = {}
    for name, (lo, hi) in BANDS.items():
        mask = (radius > lo) & (radius <= hi) if lo > 0 else (radius > 0) & (radius <= hi)
        a, b = f_series[:, mask], f_final[mask]
        dot = np.real((a * np.conj(b)).sum(-1))
        norm = np.sqrt((np.abs(a) ** 2).sum(-1) * (np.abs(b) ** 2).sum())
        out[name] = np.where(norm > 0, dot / np.maximum(norm, 1e-12), 1.0)
    return out


def settle_steps(series: np.ndarray, steps: np.ndarray, tol: float = 0.1, patch: int = 1) -> np.ndarray:
    """Per region, the first recorded step after which the prediction stays within `tol` of its final value.

    series: [S, C, H, W] in [-1, 1] (predicted x0 per recorded step); steps: their loop indices [S].
    The error is averaged over channels and over patch x patch regions; returns [H/patch, W/patch].
    """
    err = np.abs(series.astype(np.float32) - series[-1].astype(np.float32)).mean(1)  # [S, H, W]
    if patch > 1:
        s, h, w = err.shape
        err = err[:, :h // patch * patch, :w // patch * patch]
        err = err.reshape(s, h // patch, patch, w // patch, patch).mean((2, 4))
    # largest error from step s to the end; the region has settled once that drops below tol
    future = np.maximum.accumulate(err[::-1], axis=0)[::-1]
    settled = future < tol
    first = np.argmax(settled, axis=0)  # the last frame always qualifies (its error is 0)
    return steps[first]


def high_frequency_fraction(image: np.ndarray, cutoff: float = 0.25) -> float:
    """Share of an HxWx3 uint8 image's spectral energy (mean removed) above `cutoff` cycles / pixel."""
    gray = luma(image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)[0]
    h, w = gray.shape
    power = np.abs(np.fft.fft2(gray - gray.mean())) ** 2
    total = power.sum()
    return float(power[_radius(h, w) > cutoff].sum() / total) if total > 0 else 0.0


def laplacian_sharpness(image: np.ndarray) -> float:
    """Mean absolute discrete Laplacian of the luma (0..1 scale); larger = more fine detail / edges."""
    gray = luma(image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)[0]
    lap = (-4 * gray[1:-1, 1:-1] + gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:])
    return float(np.abs(lap).mean())


def psnr_ssim(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two HxWx3 uint8 images (explore.metrics)."""
    return float(shared.psnr(reference, test)[0]), float(shared.ssim(reference, test)[0])
