"""Models shared read-only between requests: found in checkpoints/, loaded once, never swapped."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from explore.validate import LIMITS, Caps
from explore.zoo import LoadedModel, load_model

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


def default_device() -> torch.device:
    """CUDA when present, else MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class ModelInfo:
    """What the UI and engine need to know about a loaded model."""

    name: str
    kind: str  # diffusion | superres | classifier | evaluator
    image_size: int
    num_labels: int | None  # real classes (without the null class); None = unconditional
    class_names: list[str] | None
    null_class: int | None


def describe(name: str, loaded: LoadedModel) -> ModelInfo:
    cfg = loaded.config
    if loaded.kind in ("classifier", "evaluator"):
        num_labels = getattr(cfg, "out_channels", None) or getattr(cfg, "num_classes", None)
    elif getattr(cfg, "num_classes", None) is None:
        num_labels = None
    else:
        num_labels = cfg.num_classes - (1 if loaded.null_class is not None else 0)
    if loaded.class_names:
        num_labels = len(loaded.class_names)
    return ModelInfo(name, loaded.kind, int(getattr(cfg, "image_size", 32)), num_labels,
                     list(loaded.class_names) if loaded.class_names else None, loaded.null_class)


class Entry:
    """A loaded model plus its description; attribute access falls through to the LoadedModel."""

    def __init__(self, info: ModelInfo, loaded: LoadedModel):
        self.info, self.loaded = info, loaded
        self._variants: dict[torch.dtype, torch.nn.Module] = {}
        self._variants_lock = threading.Lock()

    def torso_in(self, dtype: torch.dtype) -> torch.nn.Module:
        """A read-only copy whose torso convolutions hold `dtype` weights, channels-last, made once.

        The CPU path for bf16 runs: casting the weights on every call (autocast) costs more than the convs gain.
        """
        with self._variants_lock:
            if dtype not in self._variants:
                self._variants[dtype] = self.loaded.module.torso_copy(dtype)
            return self._variants[dtype]

    def __getattr__(self, item: str) -> Any:
        if item in ModelInfo.__dataclass_fields__:
            return getattr(self.info, item)
        return getattr(self.loaded, item)


class ModelRegistry:
    """Name -> loaded model. Names are checkpoint file stems under `root`, or paths."""

    def __init__(self, root: str | Path = "checkpoints", device: torch.device | str | None = None,
                 flags: dict[str, dict] | None = None, dtype: torch.dtype | None = None, caps: Caps | None = None):
        self.root = Path(root)
        self.device = torch.device(device) if device is not None else default_device()
        self.caps = caps or LIMITS  # most work one run may ask for (plan() checks recipes against it)
        self.flags = flags or {}
        self.dtype = dtype
        self._cache: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def available(self) -> dict[str, Path]:
        """Checkpoint files found under root, by name (the file stem)."""
        found: dict[str, Path] = {}
        if self.root.is_dir():
            for path in sorted(self.root.iterdir()):
                if path.suffix in CHECKPOINT_SUFFIXES and path.stem not in found:
                    found[path.stem] = path
        return found

    def resolve(self, name: str) -> Path:
        files = self.available()
        if name in files:
            return files[name]
        path = Path(name)
        if path.is_file():
            return path
        known = ", ".join(files) or "none"
        if path.suffix or len(path.parts) > 1:
            raise KeyError(f"model file {name} does not exist (models in {self.root}/: {known})")
        raise KeyError(f"unknown model {name!r}; available in {self.root}/: {known}")

    def get(self, name: str) -> Entry:
        """Load once (thread-safe); every caller shares the same read-only module."""
        with self._lock:
            if name not in self._cache:
                path = self.resolve(name)
                loaded = load_model(path, flags=self.flags.get(name), device=self.device, dtype=self.dtype)
                loaded.module.eval().requires_grad_(False)
                self._cache[name] = Entry(describe(name, loaded), loaded)
            return self._cache[name]

    def infos(self, kind: str | None = None) -> list[ModelInfo]:
        """Descriptions of every available model (loads each once)."""
        out = []
        for name in self.available():
            try:
                info = self.get(name).info
            except Exception:  # an unreadable file is listed nowhere rather than breaking the UI
                continue
            if kind is None or info.kind == kind:
                out.append(info)
        return out
