"""Tensors -> display images: grids, nearest-neighbour enlargement, signed maps, animations."""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from explore.outputs import to_uint8

DISPLAY_PX = 256  # small images are enlarged (nearest) to at least this width


def enlarge(img: np.ndarray, min_width: int = DISPLAY_PX) -> np.ndarray:
    """HxWx3 uint8 -> enlarged by an integer factor with nearest neighbour, so pixels stay sharp."""
    scale = max(1, math.ceil(min_width / img.shape[1]))
    return img if scale == 1 else img.repeat(scale, 0).repeat(scale, 1)


def tile(images: np.ndarray, columns: int | None = None, pad: int = 0) -> np.ndarray:
    """uint8 NHWC -> one HxWx3 grid (`pad` white pixels between images)."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    out = np.full((rows * h + (rows - 1) * pad, columns * w + (columns - 1) * pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        out[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = img
    return out


def batch_view(x: torch.Tensor | np.ndarray, min_width: int = DISPLAY_PX) -> np.ndarray:
    """A batch in [-1, 1] (NCHW tensor or array) -> one enlarged grid image."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x, dtype=np.float32))
    pad = 1 if len(x) > 1 else 0
    return enlarge(tile(to_uint8(x), pad=pad), min_width)


def inline_png(img: np.ndarray, alt: str) -> str:
    """HxWx3 uint8 -> an <img> whose PNG travels inside the HTML (a data: URL): a streamed frame then costs no
    file in Gradio's cache and no second request from the browser."""
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="PNG", compress_level=1)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
            f'width="{img.shape[1]}" height="{img.shape[0]}">')


def noise_view(eps: np.ndarray) -> np.ndarray:
    """Predicted noise (about N(0, 1)) -> uint8 HWC, +-3 standard deviations mapped to the full range."""
    return (np.clip(eps.astype(np.float32) / 3.0, -1, 1) * 127.5 + 127.5).astype(np.uint8).transpose(1, 2, 0)


def signed_view(term: np.ndarray) -> tuple[np.ndarray, float]:
    """A signed CHW map -> uint8 HWC centred on grey, scaled by its own largest magnitude (returned)."""
    term = term.astype(np.float32)
    peak = float(np.abs(term).max())
    scaled = term / peak if peak > 0 else term
    return (scaled * 127.5 + 127.5).clip(0, 255).astype(np.uint8).transpose(1, 2, 0), peak


def placeholder(size: int, text: str = "") -> np.ndarray:
    """A grey square with a short message, for outputs that do not apply."""
    img = Image.new("RGB", (size, size), (200, 200, 200))
    if text:
        draw = ImageDraw.Draw(img)
        draw.multiline_text((size // 2, size // 2), text, fill=(60, 60, 60), font=font(max(10, size // 14)),
                            anchor="mm", align="center")
    return np.asarray(img)


def font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(cells: dict[tuple[int, int], np.ndarray], rows: list[str], cols: list[str],
                  notes: dict[tuple[int, int], str], cell_size: tuple[int, int], row_title: str,
                  col_title: str) -> np.ndarray:
    """An X/Y grid of equally sized cell images with headings and a note under each cell; missing cells grey."""
    cell_h, cell_w = cell_size
    small, big = font(12), font(13)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    side = 8 + int(max(measure.textlength(t, font=small) for t in [row_title, *rows]))
    head, note_h, gap = 36, 18, 8
    width = side + len(cols) * (cell_w + gap)
    height = head + len(rows) * (cell_h + note_h + gap)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((side, 2), col_title, fill=(0, 0, 0), font=big)
    draw.text((4, 19), row_title, fill=(0, 0, 0), font=small)
    for j, name in enumerate(cols):
        draw.text((side + j * (cell_w + gap) + 2, 19), name, fill=(0, 0, 0), font=small)
    for i, name in enumerate(rows):
        top = head + i * (cell_h + note_h + gap)
        draw.text((4, top + cell_h // 2 - 6), name, fill=(0, 0, 0), font=small)
        for j in range(len(cols)):
            left = side + j * (cell_w + gap)
            img = cells.get((i, j))
            if img is None:
                draw.rectangle([left, top, left + cell_w - 1, top + cell_h - 1], fill=(225, 225, 225))
            else:
                canvas.paste(Image.fromarray(img), (left, top))
            if (i, j) in notes:
                draw.text((left + 1, top + cell_h + 2), notes[(i, j)], fill=(30, 30, 30), font=small)
    return np.asarray(canvas)


def write_animation(frames: list[np.ndarray], path: str | Path, seconds: float = 4.0) -> Path:
    """Frames (HxWx3 uint8) -> an animated GIF or WebP (by suffix), about `seconds` long, last frame held."""
    path = Path(path)
    pictures = [Image.fromarray(f) for f in frames]
    if path.suffix == ".gif":  # a fast palette per frame (PIL's default median cut took ~0.3 s for 50 frames)
        pictures = [p.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE) for p in pictures]
    per_frame = max(20, int(1000 * seconds / max(1, len(pictures))))
    durations = [per_frame] * (len(pictures) - 1) + [1500]
    options = {"lossless": True} if path.suffix == ".webp" else {"optimize": False, "disposal": 1}
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0, **options)
    return path
