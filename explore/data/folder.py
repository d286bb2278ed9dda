"""Class-labelled image folders (root/<class name>/<image>) as cached uint8 arrays and training batches."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .scenes import Batch, to_model_space
from .wild import fit_square

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def load_image(path, size: int) -> np.ndarray:
    """Decode one image file -> size x size x 3 uint8 RGB (EXIF-rotated, alpha over white, centre-cropped, LANCZOS)."""
    with Image.open(path) as im:
        im.verify()  # catches truncated / corrupt files before decoding
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        rgb = np.asarray(im.convert("RGB"))
    return fit_square(rgb, size)


class ImageFolderData:
    """Images under root/<class>/ (class names = sorted sub-folder names), decoded once into memory."""

    def __init__(self, root, size: int):
        self.root = Path(root)
        self.size = size
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise ValueError(
                f"no class sub-folders in {self.root}: expected {self.root}/<class name>/<image>.png|jpg|webp"
            )
        self.class_names = [d.name for d in class_dirs]
        files = [
            (path, label)
            for label, d in enumerate(class_dirs)
            for path in sorted(d.rglob("*"))
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise ValueError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {self.root} "
                f"({', '.join(self.class_names)})"
            )
        images, labels, self.skipped = [], [], []
        for path, label in files:
            try:
                images.append(load_image(path, size))
                labels.append(label)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                self.skipped.append((path, f"{type(err).__name__}: {err}"))
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s) under {self.root}, "
                f"e.g. {self.skipped[0][0]} ({self.skipped[0][1]})",
                stacklevel=2,
            )
        if not images:
            raise ValueError(f"none of the {len(files)} image files under {self.root} could be read")
        self.images = np.stack(images)  # [N, size, size, 3] uint8
        self.labels = np.asarray(labels, np.int64)  # [N]
        empty = [name for c, name in enumerate(self.class_names) if not np.any(self.labels == c)]
        if empty:
            warnings.warn(
                f"class folder(s) without readable images under {self.root}: {', '.join(empty)}", stacklevel=2
            )

    def __len__(self) -> int:
        return len(self.images)

    def _batch(self, rng: np.random.Generator, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[idx]
        flip = rng.random(len(idx)) < 0.5
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return to_model_space(images), torch.from_numpy(self.labels[idx])

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One random batch (with replacement, random horizontal flips): x [-1,1] NCHW float32, labels int64."""
        return self._batch(rng, rng.integers(0, len(self), batch_size))

    def batches(self, seed: int, batch_size: int, low_res: int | None = None) -> Iterator[Batch]:
        """Endless shuffled batches (epoch by epoch) with random horizontal flips; low = area-downscaled x."""
        rng = np.random.default_rng(seed)
        order = np.zeros(0, np.int64)
        while True:
            while len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(self))])
            idx, order = order[:batch_size], order[batch_size:]
            x, labels = self._batch(rng, idx)
            low = F.interpolate(x, size=(low_res, low_res), mode="area") if low_res else None
            yield Batch(x, labels, low)
