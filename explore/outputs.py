"""Sample files in the original format, PNGs that carry their recipe, and reading them back safely."""
from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

MAX_NPZ_BYTES = 512 * 1024 * 1024
MAX_IMAGES = 4096


class SampleFileError(ValueError):
    """An .npz that is not a usable sample file; the message says why."""


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC exactly as the original scripts: ((x + 1) * 127.5).clamp(0, 255), truncated."""
    return ((x.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the original's / 127.5 - 1)."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2).contiguous()


def save_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """np.savez with arr_0 = uint8 NHWC images and arr_1 = int64 labels (when given), as the original."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [np.asarray(images, dtype=np.uint8)]
    if labels is not None:
        arrays.append(np.asarray(labels, dtype=np.int64))
    np.savez(path, *arrays)
    return path


def load_samples_npz(path: str | Path, max_bytes: int = MAX_NPZ_BYTES) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a sample file: images as uint8 NHWC (NCHW and [0, 1] / [-1, 1] floats accepted), labels or None.

    A plain .npy holding only images is accepted too.
    Never unpickles (allow_pickle=False); checks size, dtype and shape before use.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return _load_npy(path, max_bytes), None
    if path.stat().st_size > max_bytes:
        raise SampleFileError(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB is larger than "
                              f"the {max_bytes / 2**20:.0f} MiB limit")
    if not zipfile.is_zipfile(path):
        raise SampleFileError(f"{path.name}: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = data.files
            if not names:
                raise SampleFileError(f"{path.name}: the archive holds no arrays")
            image_key = "arr_0" if "arr_0" in names else ("images" if "images" in names else names[0])
            with zipfile.ZipFile(path) as archive:
                declared = sum(info.file_size for info in archive.infolist())
            if declared > 4 * max_bytes:
                raise SampleFileError(f"{path.name}: unpacks to {declared / 2**20:.0f} MiB, too large")
            images = data[image_key]
            label_key = "arr_1" if "arr_1" in names else ("labels" if "labels" in names else None)
            labels = data[label_key] if label_key else None
    except ValueError as err:
        if isinstance(err, SampleFileError):
            raise
        if "allow_pickle" in str(err) or "pickle" in str(err).lower():
            raise SampleFileError(f"{path.name}: contains pickled Python objects, which are refused") from None
        raise SampleFileError(f"{path.name}: cannot be read as .npz ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise SampleFileError(f"{path.name}: corrupt or truncated ({err})") from None
    images = normalise_images(images, path.name)
    return images, _check_labels(labels, len(images), path.name)


def _load_npy(path: Path, max_bytes: int) -> np.ndarray:
    if path.stat().st_size > max_bytes:
        raise SampleFileError(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB is larger than "
                              f"the {max_bytes / 2**20:.0f} MiB limit")
    try:
        images = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise SampleFileError(f"{path.name}: contains pickled Python objects, which are refused") from None
        raise SampleFileError(f"{path.name}: cannot be read as .npy ({err})") from None
    except (OSError, EOFError) as err:
        raise SampleFileError(f"{path.name}: corrupt or truncated ({err})") from None
    return normalise_images(images, path.name)


def normalise_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Any of uint8 / float, NHWC / NCHW, RGB / grey -> uint8 NHWC RGB."""
    if images.dtype == object or images.dtype.kind not in "uif":
        raise SampleFileError(f"{name}: images must be numbers (uint8 or float), got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None] if images.shape[-1] not in (1, 3) else images[None]
    if images.ndim != 4:
        raise SampleFileError(f"{name}: images must be [N, H, W, 3] or [N, 3, H, W], got shape {list(images.shape)}")
    if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] not in (1, 3):
        raise SampleFileError(f"{name}: expected 1 or 3 colour channels, got shape {list(images.shape)}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if not 0 < len(images) <= MAX_IMAGES:
        raise SampleFileError(f"{name}: holds {len(images)} images; accepted 1..{MAX_IMAGES}")
    if images.dtype.kind == "f":
        if not np.isfinite(images).all():
            raise SampleFileError(f"{name}: images contain NaN or infinity")
        lo, hi = float(images.min()), float(images.max())
        if lo >= -1.0001 and hi <= 1.0001 and lo < 0:
            images = (images + 1) * 127.5
        elif lo >= 0 and hi <= 1.0001:
            images = images * 255
        elif not (lo >= -0.5 and hi <= 255.5):
            raise SampleFileError(f"{name}: float images must lie in [-1, 1], [0, 1] or [0, 255]; "
                                  f"these span [{lo:g}, {hi:g}]")
        images = np.clip(np.rint(images), 0, 255)  # rounded, so from_uint8's floats read back exactly
    elif images.min() < 0 or images.max() > 255:
        raise SampleFileError(f"{name}: integer images must lie in 0..255")
    return np.ascontiguousarray(images.astype(np.uint8))


def _check_labels(labels, count: int, name: str) -> np.ndarray | None:
    if labels is None:
        return None
    if labels.dtype.kind not in "iu" or labels.ndim != 1 or len(labels) != count:
        raise SampleFileError(f"{name}: labels (arr_1) must be {count} integers, got {labels.dtype} "
                              f"shape {list(labels.shape)}")
    return labels.astype(np.int64)


def image_grid(images: np.ndarray, columns: int | None = None, scale: int = 1) -> Image.Image:
    """uint8 NHWC -> one PIL grid, enlarged by nearest-neighbour `scale` (no blur)."""
    n, h, w, _ = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return Image.fromarray(grid)


def save_png(image: Image.Image, path: str | Path, recipe_json: str | None = None, extra: dict | None = None) -> Path:
    """PNG with the recipe (and anything else) in text chunks, so the image can be reproduced."""
    info = PngImagePlugin.PngInfo()
    if recipe_json is not None:
        info.add_text("recipe", recipe_json)
    for key, value in (extra or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def read_png_recipe(path_or_bytes) -> str | None:
    """The recipe JSON stored in a PNG by save_png, or None."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as img:
        return img.text.get("recipe") if hasattr(img, "text") else None
