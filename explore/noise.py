"""Where a run's randomness comes from: start noise x_T and one noise tensor per step.

Randomness is passed in, never taken from the global RNG. `PerImageNoise` gives
every image its own generator (seed + i), so an image does not depend on the
batch it was drawn in; `BatchNoise` reproduces the original scripts'
`torch.manual_seed(seed)` stream; `RecordedNoise` replays stored tensors, and
`Recorder` keeps whatever another source produced so a run can be replayed with
other guidance scales or samplers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


class NoiseSource(Protocol):
    def initial(self) -> Tensor: ...
    def step(self, s: int) -> Tensor: ...


class PerImageNoise:
    """Image i draws x_T and then one tensor per step from its own CPU generator seeded seed + i."""

    def __init__(self, seeds: list[int], shape: tuple[int, int, int], device: torch.device | str = "cpu"):
        self.shape, self.device = tuple(shape), torch.device(device)
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    @classmethod
    def from_seed(cls, seed: int, batch_size: int, shape, device="cpu") -> "PerImageNoise":
        return cls([seed + i for i in range(batch_size)], shape, device)

    def _draw(self) -> Tensor:
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(self.device, non_blocking=True)

    def initial(self) -> Tensor:
        return self._draw()

    def step(self, s: int) -> Tensor:
        return self._draw()


class BatchNoise:
    """The original scripts' stream: a generator seeded once, one randn(B, C, H, W) per step.

    x_T can be given (as the reference runs do) or drawn first from the same stream.
    """

    def __init__(self, seed: int, shape: tuple[int, ...], x_T: Tensor | None = None,
                 device: torch.device | str = "cpu"):
        self.generator = torch.Generator().manual_seed(int(seed))
        self.shape, self.x_T, self.device = tuple(shape), x_T, torch.device(device)

    def initial(self) -> Tensor:
        if self.x_T is not None:
            return self.x_T.to(self.device)
        return torch.randn(self.shape, generator=self.generator).to(self.device)

    def step(self, s: int) -> Tensor:
        return torch.randn(self.shape, generator=self.generator).to(self.device, non_blocking=True)


class RecordedNoise:
    """Replays stored noise: x_T [B, C, H, W] and per-step noise [K, B, C, H, W] (None for deterministic runs)."""

    def __init__(self, x_T: Tensor, steps: Tensor | None = None, device: torch.device | str = "cpu"):
        self.x_T, self.steps, self.device = x_T, steps, torch.device(device)

    def initial(self) -> Tensor:
        return self.x_T.to(self.device)

    def step(self, s: int) -> Tensor:
        if self.steps is None or s >= len(self.steps):
            recorded = 0 if self.steps is None else len(self.steps)
            raise ValueError(f"the recorded noise has {recorded} steps; this sampler needs noise at step {s + 1}")
        return self.steps[s].to(self.device)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "RecordedNoise":
        """Load x_T (key 'x_T', or the only array) and optional 'steps' from an .npz or .npy file."""
        path = Path(path)
        if path.suffix == ".npy":
            return cls(_float_tensor(np.load(path, allow_pickle=False), "x_T"), None, device)
        with np.load(path, allow_pickle=False) as data:
            if "x_T" in data.files:
                x_T = data["x_T"]
            elif len(data.files) == 1:
                x_T = data[data.files[0]]
            else:
                raise ValueError(f"{path.name}: expected an array named 'x_T' (found {', '.join(data.files)})")
            steps = data["steps"] if "steps" in data.files else None
        return cls(_float_tensor(x_T, "x_T"), None if steps is None else _float_tensor(steps, "steps"), device)


class Recorder:
    """Wraps a noise source and keeps every tensor it hands out."""

    def __init__(self, source: NoiseSource):
        self.source, self.x_T, self.steps = source, None, []

    def initial(self) -> Tensor:
        self.x_T = self.source.initial()
        return self.x_T

    def step(self, s: int) -> Tensor:
        z = self.source.step(s)
        self.steps.append(z)
        return z

    def replay(self) -> RecordedNoise:
        steps = torch.stack(self.steps) if self.steps else None
        return RecordedNoise(self.x_T, steps, self.x_T.device)

    def save(self, path: str | Path) -> None:
        arrays = {"x_T": self.x_T.cpu().numpy()}
        if self.steps:
            arrays["steps"] = torch.stack(self.steps).cpu().numpy()
        np.savez(path, **arrays)


def _float_tensor(array: np.ndarray, name: str) -> Tensor:
    if array.dtype.kind != "f":
        raise ValueError(f"noise array {name!r} must be floating point, got {array.dtype}")
    if name == "x_T" and array.ndim != 4:
        raise ValueError(f"x_T must have shape [B, C, H, W], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"noise array {name!r} contains NaN or infinity")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
