"""Hugging Face ZeroGPU: `spaces.GPU` when the `spaces` package is installed, a no-op otherwise."""
from __future__ import annotations

from typing import Callable

try:
    import spaces  # only present on Hugging Face Spaces
except ImportError:
    spaces = None


def gpu(duration: int = 120) -> Callable[[Callable], Callable]:
    """Decorator asking ZeroGPU for a GPU for up to `duration` seconds per call (no-op without `spaces`)."""
    def wrap(fn: Callable) -> Callable:
        if spaces is None or not hasattr(spaces, "GPU"):
            return fn
        return spaces.GPU(duration=duration)(fn)
    return wrap
