"""Checked user input: caps that suit the device, and validators that return a clean value or say what fits.

Every validator raises InputError (a ValueError) whose message starts with the field name and states the
accepted range, so the UI, the API and the command line can show it as it is. Nothing is clipped silently.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Sequence

import torch

MAX_SEED = 2 ** 63 - 1 - 10_000  # image i of a batch uses seed + i, which must stay a 64-bit seed
MAX_CLASSES = 100_000  # any class index above this is a typo, whatever the model
MiB = 2 ** 20


class InputError(ValueError):
    """A value that cannot be used; the message names the field and what is accepted."""


@dataclass(frozen=True)
class Caps:
    """Most work one request may ask for; smaller on a CPU than on a GPU."""

    batch: int  # images per run
    steps: int  # sampler steps a respacing spec may yield
    image_side: int  # longest side of an uploaded photo, px
    pixels: int  # width x height of an uploaded photo, checked before its pixels are decoded
    upload_bytes: int  # size of one uploaded file
    npz_images: int  # images taken from one uploaded sample file


CPU_CAPS = Caps(batch=16, steps=1_000, image_side=8_192, pixels=24_000_000, upload_bytes=32 * MiB, npz_images=64)
GPU_CAPS = Caps(batch=64, steps=4_000, image_side=16_384, pixels=64_000_000, upload_bytes=128 * MiB,
                npz_images=256)
# The command line on one's own machine: only values no run could use are refused.
LIMITS = Caps(batch=4_096, steps=4_000, image_side=65_535, pixels=400_000_000, upload_bytes=4096 * MiB,
              npz_images=1_000_000)


def caps_for(device: torch.device | str | None) -> Caps:
    """Caps for a server that shares this device between users."""
    kind = torch.device(device).type if device is not None else "cpu"
    return CPU_CAPS if kind == "cpu" else GPU_CAPS


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(field: str, value, low: float, high: float) -> float:
    """A finite real number in [low, high] (numeric text accepted); bools, NaN and infinities are refused."""
    accepted = f"a number in [{low:g}, {high:g}]"
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 64:
            raise InputError(f"{field}: {_shown(value)} is not {accepted}")
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{field}: {_shown(value)} is not {accepted}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{field}: {_shown(value)} is not {accepted}")
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        raise InputError(f"{field}: {_shown(value)} is outside the accepted range [{low:g}, {high:g}]") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{field}: {_shown(value)} is outside the accepted range [{low:g}, {high:g}]")
    return value


def whole(field: str, value, low: int, high: int) -> int:
    """A whole number in [low, high]; 3.0 and '3' are accepted, 2.5, True, NaN and infinities are not."""
    accepted = f"a whole number in [{low}, {high}]"
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d{1,30}", text):
            value = int(text)
        elif re.fullmatch(r"[+-]?\d{1,30}\.0*", text):
            value = int(text.split(".")[0])
        else:
            raise InputError(f"{field}: {_shown(value)} is not {accepted}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{field}: {_shown(value)} is not {accepted}")
    if not isinstance(value, numbers.Integral):
        value = float(value)
        if not math.isfinite(value) or not value.is_integer():
            raise InputError(f"{field}: {_shown(value)} is not {accepted}")
    value = int(value)
    if not low <= value <= high:
        raise InputError(f"{field}: {_shown(value)} is outside the accepted range [{low}, {high}]")
    return value


def choice(field: str, value, options: Sequence[str]) -> str:
    """One of `options`, exactly."""
    if not isinstance(value, str) or value not in options:
        shown = ", ".join(map(str, options[:20])) + (" ..." if len(options) > 20 else "")
        raise InputError(f"{field}: {_shown(value)} is not one of {shown}")
    return value


def flag(field: str, value) -> bool:
    """True or False (not 1, 'yes' or None)."""
    if not isinstance(value, bool):
        raise InputError(f"{field}: {_shown(value)} must be True or False")
    return value


def class_label(field: str, value, names: Sequence[str]) -> int:
    """A class given by name or by index -> its index in `names`."""
    if isinstance(value, str) and value in names:
        return list(names).index(value)
    try:
        return whole(field, value, 0, len(names) - 1)
    except InputError:
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise InputError(f"{field}: unknown class {_shown(value)}; accepted: {shown} "
                         f"(or an index in [0, {len(names) - 1}])") from None


def respacing(value, steps: int = 1000, max_steps: int | None = None, field: str = "respacing") -> list[int]:
    """The timesteps a respacing spec keeps (see schedules.space_timesteps), at most `max_steps` of them."""
    from explore.schedules import RespacingError, space_timesteps

    if not isinstance(value, str):
        raise InputError(f"{field}: {_shown(value)} must be text such as '250', 'ddim25' or '10,15,20'")
    try:
        kept = space_timesteps(steps, value)
    except RespacingError as err:
        raise InputError(f"{field}: {err}") from None
    if max_steps is not None and len(kept) > max_steps:
        what = "'' (every step)" if not value.strip() else _shown(value)
        raise InputError(f"{field}: {what} gives {len(kept)} steps; at most {max_steps} per run here "
                         f"(accepted: 1..{max_steps} steps, e.g. '{min(250, max_steps)}' or 'ddim50')")
    return kept
