"""What every handler shares: one read-only model registry and the folder runs are written to."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from explore.engine import PRECISIONS
from explore.registry import ModelInfo, ModelRegistry
from explore.validate import caps_for

NONE = "none"
RANDOM_CLASS = "random (per image)"
UNCONDITIONAL = "(unconditional)"
KEEP_RUNS_S = 6 * 3600  # run folders older than this are pruned when a new run starts


@dataclass
class AppContext:
    """Models are loaded once by the registry and never swapped; runs go to `out_root`/<run id>/."""

    registry: ModelRegistry
    out_root: Path
    precision: str = "fp32"  # the server's choice for every run (recorded in each recipe)

    @classmethod
    def create(cls, checkpoints: str | Path | None = None, outputs: str | Path | None = None,
               device: str | None = None, precision: str | None = None) -> "AppContext":
        checkpoints = Path(checkpoints or os.environ.get("EXPLORE_CHECKPOINTS") or "checkpoints")
        outputs = outputs or os.environ.get("EXPLORE_OUTPUTS")
        if outputs is None:
            base = os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()
            outputs = Path(base) / "explore-runs"
        out_root = Path(outputs).resolve()
        out_root.mkdir(parents=True, exist_ok=True)
        registry = ModelRegistry(checkpoints, device=device)
        registry.caps = caps_for(registry.device)  # a server shared by many users: caps that suit its device
        precision = precision or os.environ.get("EXPLORE_PRECISION") or "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        return cls(registry, out_root, precision)

    def names(self, kind: str) -> list[str]:
        return [info.name for info in self.registry.infos(kind)]

    def info(self, name: str) -> ModelInfo:
        try:
            return self.registry.get(name).info
        except KeyError as err:
            raise gr.Error(str(err).strip("'\"")) from None

    def missing(self, kind: str, what: str, example: str) -> str | None:
        """A sentence for a tab whose model kind is absent, or None when one is there."""
        if self.names(kind):
            return None
        return (f"**No {what} found.** This tab needs a `{kind}` model in `{self.registry.root}`: for example "
                f"`{example}` (weights plus its `.json` description). Add the file and restart the app.")

    def new_run_dir(self, prefix: str) -> Path:
        self._prune()
        path = self.out_root / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    def _prune(self) -> None:
        now = time.time()
        for old in self.out_root.iterdir():
            if old.is_dir() and now - old.stat().st_mtime > KEEP_RUNS_S:
                shutil.rmtree(old, ignore_errors=True)

    def cli_model(self, name: str | None) -> str | None:
        """How the CLI (which looks in ./checkpoints) names this model: the name, or its file path."""
        if name is None:
            return None
        path = self.registry.resolve(name)
        return name if path.parent.resolve() == Path("checkpoints").resolve() else str(path)


def class_choices(info: ModelInfo | None) -> list[str]:
    """Dropdown choices for a model's classes: 'random' plus the names (or numbers)."""
    if info is None or info.num_labels is None:
        return [UNCONDITIONAL]
    return [RANDOM_CLASS, *class_names(info)]


def class_names(info: ModelInfo) -> list[str]:
    if info.class_names:
        return list(info.class_names)
    return [str(i) for i in range(info.num_labels or 0)]


def class_index(info: ModelInfo, choice: str | int | None, allow_random: bool = True) -> int | None:
    """A dropdown value (class name, number, or 'random') -> label index (None = random / unconditional)."""
    if info.num_labels is None or choice in (None, "", UNCONDITIONAL):
        if info.num_labels is not None and not allow_random:
            raise gr.Error("Pick a class: this needs one requested class.")
        return None
    if choice == RANDOM_CLASS:
        if not allow_random:
            raise gr.Error("Pick a class: this needs one requested class, not 'random'.")
        return None
    names = class_names(info)
    if isinstance(choice, str) and choice in names:
        return names.index(choice)
    if re.fullmatch(r"\d+", str(choice)) and int(choice) < len(names):
        return int(choice)
    raise gr.Error(f"Unknown class {str(choice)[:60]!r} for {info.name}; choose one of: {', '.join(names[:20])}"
                   f"{' ...' if len(names) > 20 else ''}")


def optional(name: str | None) -> str | None:
    return None if name in (None, "", NONE) else name
