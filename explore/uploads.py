"""Uploaded photos read safely: bytes and declared pixels are checked before a single pixel is decoded.

`read_image` accepts what people upload (PNG, JPEG, WebP, GIF, BMP, TIFF; greyscale, palette, RGBA, 16-bit,
CMYK, animated, EXIF-rotated) and returns an upright H x W x 3 uint8 RGB array plus notes that say what was
done to it. Everything else raises UploadError with a message that says what is wrong and what is accepted.
"""
from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from explore.validate import CPU_CAPS, LIMITS, Caps, InputError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # (JPEG covers MPO); never EPS, PDF or exotic decoders
# Pillow's own guard stays on as a backstop (it raises at twice this); the caps below it are checked first.
Image.MAX_IMAGE_PIXELS = LIMITS.pixels
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UploadError(InputError):
    """An upload that cannot be used; the message says why and what would be accepted."""


@dataclass
class Photo:
    """An uploaded photo as upright uint8 RGB, with what was done to read it."""

    pixels: np.ndarray  # H x W x 3 uint8
    notes: list[str] = field(default_factory=list)  # e.g. "animated GIF (12 frames): the first frame is used"


def read_image(path: str | os.PathLike, caps: Caps = CPU_CAPS, field_name: str = "photo") -> Photo:
    """An uploaded image file -> Photo, refusing oversized files and decompression bombs before decoding."""
    path = Path(path)
    name = f"{field_name} {path.name!r}"
    try:
        size = path.stat().st_size
    except OSError:
        raise UploadError(f"{name}: the uploaded file cannot be found; upload it again") from None
    if size == 0:
        raise UploadError(f"{name}: the file is empty")
    if size > caps.upload_bytes:
        raise UploadError(f"{name}: {size / 2 ** 20:.1f} MiB is larger than the {caps.upload_bytes / 2 ** 20:.0f} MiB "
                          "accepted per upload")
    accepted = f"accepted: {', '.join(FORMATS)} images up to {caps.image_side} px a side and " \
               f"{caps.pixels / 1e6:.0f} megapixels"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # 1. header only: format and declared size
        try:
            with Image.open(path, formats=FORMATS) as img:
                width, height, kind = img.width, img.height, img.format
        except UnidentifiedImageError:
            raise UploadError(f"{name}: not an image this app reads ({accepted})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(f"{name}: declares more pixels than Pillow allows; refused before decoding "
                              f"({accepted})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise UploadError(f"{name}: the file is truncated or corrupt ({_brief(err)})") from None
        # 2. declared size against the caps, before any pixel is decoded
        if width < 1 or height < 1:
            raise UploadError(f"{name}: declares an empty {width}x{height} image")
        if max(width, height) > caps.image_side or width * height > caps.pixels:
            raise UploadError(f"{name}: {width}x{height} ({width * height / 1e6:.1f} megapixels) is too large; "
                              f"refused before decoding ({accepted})")
        # 3. structure (chunk checksums for PNG), then the pixels of the first frame
        try:
            with Image.open(path, formats=FORMATS) as img:
                img.verify()
            with Image.open(path, formats=FORMATS) as img:
                return _to_rgb(img, kind)
        except UploadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(f"{name}: declares more pixels than Pillow allows ({accepted})") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
            raise UploadError(f"{name}: the file is truncated or corrupt ({_brief(err)})") from None


def _brief(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:120]


def _to_rgb(img: Image.Image, kind: str) -> Photo:
    notes = []
    frames = getattr(img, "n_frames", 1)
    if getattr(img, "is_animated", False) and frames > 1:
        notes.append(f"animated {kind} ({frames} frames): the first frame is used")
        img.seek(0)
    img.load()
    orientation = _orientation(img)
    if orientation not in (None, 1):
        try:
            img = ImageOps.exif_transpose(img)
            notes.append("turned upright as its EXIF orientation says")
        except Exception:  # a broken EXIF block: the pixels are still fine
            notes.append("its EXIF orientation is unreadable: used as stored")
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if mode == "F" and values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        elif mode != "F" and values.size and values.max() > 255:
            values = values / 257.0  # 16-bit full range -> 8 bits
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        notes.append(f"{'16-bit' if mode.startswith('I;16') or mode == 'I' else '32-bit float'} greyscale: "
                     "scaled to 8 bits")
        return Photo(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2)), notes)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info) \
            or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append("transparent pixels shown on white")
        return Photo(np.ascontiguousarray(np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))), notes)
    if mode in ("1", "L"):
        notes.append("greyscale: the same values in red, green and blue")
    elif mode == "CMYK":
        notes.append("CMYK: converted to RGB")
    elif mode not in ("RGB", "P"):
        notes.append(f"{mode}: converted to RGB")
    return Photo(np.ascontiguousarray(np.asarray(img.convert("RGB"))), notes)


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # unreadable EXIF: treated as upright
        return None
