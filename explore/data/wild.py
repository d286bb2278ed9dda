"""Real photographs that ship inside installed packages ("in the wild" inputs), loaded offline.

scikit-image 0.26 keeps these seven images in its own package data (no pooch
download needed; tests/test_data.py checks that they load with sockets blocked),
and matplotlib ships grace_hopper.jpg in mpl-data/sample_data.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

_SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
WILD_PHOTO_NAMES = (*_SKIMAGE_PHOTOS, "grace_hopper")


def as_rgb_uint8(img) -> np.ndarray:
    """Any HxW / HxWx1 / HxWx3 / HxWx4 image (uint8 or float in [0,1]) -> HxWx3 uint8; alpha is dropped."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


@functools.cache
def _load(name: str) -> np.ndarray:
    if name in _SKIMAGE_PHOTOS:
        import skimage.data

        img = getattr(skimage.data, name)()
    elif name == "grace_hopper":
        import matplotlib.cbook

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
            img = np.asarray(im.convert("RGB"))
    else:
        raise KeyError(f"unknown wild photo {name!r}; known: {', '.join(WILD_PHOTO_NAMES)}")
    img = as_rgb_uint8(img).copy()
    img.setflags(write=False)  # shared cache: read-only
    return img


def wild_photo(name: str) -> np.ndarray:
    """One bundled photo as a read-only HxWx3 uint8 RGB array (loaded once, then cached)."""
    return _load(name)


def wild_photos() -> dict[str, np.ndarray]:
    """All bundled photos by name, read-only HxWx3 uint8 RGB arrays (loaded lazily, cached)."""
    return {name: _load(name) for name in WILD_PHOTO_NAMES}


def center_crop(img: np.ndarray, size: int | None = None) -> np.ndarray:
    """The centred size x size window of img (default: the largest centred square)."""
    h, w = img.shape[:2]
    size = min(h, w) if size is None else size
    if size > min(h, w):
        raise ValueError(f"crop size {size} is larger than the image ({h}x{w})")
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def downscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Area-average downscale by an integer factor (Pillow BOX filter, via Image.reduce).

    Each output pixel is the mean of a factor x factor block, the same box filter
    the scene tests use to compare a 128 px render with its 32 px render. Rows and
    columns that do not fill a whole block are trimmed from the bottom / right.
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    factor = int(factor)
    img = as_rgb_uint8(img)
    h, w = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    if h == 0 or w == 0:
        raise ValueError(f"image {img.shape[:2]} is smaller than one {factor}x{factor} block")
    return np.asarray(Image.fromarray(np.ascontiguousarray(img[:h, :w])).reduce(factor))


def fit_square(img: np.ndarray, size: int) -> np.ndarray:
    """Largest centred square, resized to size x size (Pillow LANCZOS, antialiased when shrinking)."""
    square = np.ascontiguousarray(center_crop(as_rgb_uint8(img)))
    if square.shape[0] == size:
        return square.copy()
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))
