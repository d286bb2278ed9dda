"""Noise schedules and timestep respacing as data (Ho et al. 2020; Nichol & Dhariwal 2021).

All arrays are float64 numpy, as in the original; per-step values are cast to
float32 when they meet tensors.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch


MAX_SPEC_CHARS = 4_000


class RespacingError(ValueError):
    """A timestep-respacing spec that cannot be honoured."""


def named_betas(name: str, steps: int) -> np.ndarray:
    """Betas of the 'linear' or 'cosine' schedule for `steps` diffusion steps."""
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if name == "cosine":
        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                         for i in range(steps)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r}; expected 'linear' or 'cosine'")


def space_timesteps(steps: int, spec: str | list[int]) -> list[int]:
    """Original timesteps kept by a respacing spec ('250', 'ddim25', '10,15,20'), sorted.

    Same syntax and rounding as guided-diffusion's respace.py: positions are
    accumulated in floating point and rounded half-to-even. An empty spec keeps every step.
    Anything that cannot be honoured raises RespacingError (and nothing else).
    """
    if isinstance(spec, str):
        spec = spec.strip()
        if len(spec) > MAX_SPEC_CHARS:
            raise RespacingError(f"respacing spec of {len(spec)} characters is too long (at most {MAX_SPEC_CHARS})")
        if spec == "":
            return list(range(steps))
        if spec.startswith("ddim"):
            count = _parse_int(spec[4:], spec, steps)
            for stride in range(1, steps):
                if len(range(0, steps, stride)) == count:
                    return list(range(0, steps, stride))
            possible = sorted({len(range(0, steps, stride)) for stride in range(1, steps)})
            below = [n for n in possible if n < count][-1:]
            above = [n for n in possible if n > count][:1]
            near = " or ".join(f"ddim{n}" for n in below + above)
            raise RespacingError(f"cannot create exactly {count} steps with an integer stride "
                                 f"(respacing {spec!r} on {steps} steps); the nearest that work: {near}")
        counts = [_parse_int(part, spec, steps) for part in spec.split(",")]
    elif isinstance(spec, (list, tuple)) and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                                                 for c in spec):
        counts = [int(c) for c in spec]
    else:
        raise RespacingError(f"respacing {spec!r} must be text such as '250', 'ddim25' or '10,15,20', "
                             "or a list of whole numbers")
    if not counts:
        raise RespacingError("respacing spec is empty")
    if len(counts) > steps:
        raise RespacingError(f"respacing has {len(counts)} sections; at most {steps} (one per step)")
    size_per, extra = divmod(steps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1:
            raise RespacingError(f"section {i + 1} of respacing asks for {count} steps; need at least 1")
        if size < count:
            raise RespacingError(f"cannot divide section of {size} steps into {count} "
                                 f"(accepted: 1..{size} steps in that section)")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return sorted(kept)


def _parse_int(text: str, spec: str, steps: int) -> int:
    text = text.strip()
    if re.fullmatch(r"[0-9]+", text) and len(text) > 7:
        raise RespacingError(f"respacing {spec!r}: {text} steps is far more than the {steps} the model has "
                             f"(accepted: 1..{steps})")
    if not re.fullmatch(r"[0-9]{1,7}", text):
        raise RespacingError(f"respacing {spec!r}: {text!r} is not a whole number of steps "
                             "(use e.g. '250', 'ddim25' or '10,15,20')")
    return int(text)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A (possibly respaced) discrete diffusion process.

    `betas[k]` belongs to respaced index k, whose model timestep is `timesteps[k]`
    (original scale, e.g. 0..999).
    """

    betas: np.ndarray
    timesteps: np.ndarray
    base_steps: int

    @classmethod
    def named(cls, name: str = "linear", steps: int = 1000) -> "Schedule":
        betas = named_betas(name, steps)
        return cls(betas, np.arange(steps, dtype=np.int64), steps)

    def respace(self, spec: str | list[int]) -> "Schedule":
        """Keep a subset of timesteps, with betas recomputed so alphas_cumprod is unchanged there."""
        if len(self.timesteps) != self.base_steps:
            raise ValueError("respace the full schedule, not an already respaced one")
        keep = space_timesteps(self.base_steps, spec)
        abar = self.alphas_cumprod[keep]
        prev = np.concatenate([[1.0], abar[:-1]])
        return Schedule(1.0 - abar / prev, np.asarray(keep, dtype=np.int64), self.base_steps)

    def __len__(self) -> int:
        return len(self.betas)

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @cached_property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @cached_property
    def posterior_variance(self) -> np.ndarray:
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @cached_property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        var = self.posterior_variance
        if len(var) == 1:
            return np.log(np.maximum(var, 1e-20))
        return np.log(np.append(var[1], var[1:]))

    @cached_property
    def posterior_mean_coef1(self) -> np.ndarray:
        return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @cached_property
    def posterior_mean_coef2(self) -> np.ndarray:
        return (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)

    @cached_property
    def sqrt_recip_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod)

    @cached_property
    def sqrt_recipm1_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod - 1.0)

    @cached_property
    def log_betas(self) -> np.ndarray:
        return np.log(self.betas)

    @cached_property
    def fixed_large_log_variance(self) -> np.ndarray:
        """Log of the 'fixed large' variance: betas with entry 0 set to the posterior variance."""
        return np.log(np.append(self.posterior_variance[1] if len(self) > 1 else self.betas[0], self.betas[1:]))

    @cached_property
    def sigmas(self) -> np.ndarray:
        """Variance-exploding noise levels sqrt((1 - abar) / abar) per index."""
        abar = self.alphas_cumprod
        return np.sqrt((1.0 - abar) / abar)

    def coef(self, name: str, k: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample coefficient `name`[k] as float32, broadcastable against `like`."""
        values = getattr(self, name)
        if isinstance(k, torch.Tensor):
            picked = torch.from_numpy(values).to(like.device)[k.to(like.device)].float()
            return picked.view(-1, *([1] * (like.ndim - 1)))
        return torch.tensor(float(values[k]), dtype=torch.float32, device=like.device)

    def q_sample(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse x0 to respaced index k: sqrt(abar) x0 + sqrt(1 - abar) noise."""
        return self.coef("sqrt_alphas_cumprod", k, x0) * x0 + self.coef("sqrt_one_minus_alphas_cumprod", k, x0) * noise

    @cached_property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)

    @cached_property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod)

    def timestep_for_sigma(self, sigma: np.ndarray) -> np.ndarray:
        """Fractional original timestep of a VE noise level, interpolating log-sigma of the full schedule."""
        if len(self.timesteps) != self.base_steps:
            raise ValueError("timestep_for_sigma needs the full schedule")
        log_sigmas = np.log(self.sigmas)
        return np.interp(np.log(np.maximum(sigma, 1e-12)), log_sigmas, np.arange(self.base_steps, dtype=np.float64))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels of Karras et al. 2022, eq. 5 (descending, without the final 0)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@dataclass(frozen=True, eq=False)
class Grid:
    """The time grid a run walks: a respaced schedule, optionally replaced by Karras sigmas."""

    schedule: Schedule  # respaced schedule (DDPM / DDIM walk its indices K-1 .. 0)
    base: Schedule  # the full schedule the model was trained on
    karras: bool = False
    start: int = 0  # first loop step to run (x_T is then the input of that step)

    @classmethod
    def make(cls, noise_schedule: str = "linear", respacing: str = "", steps: int = 1000,
             karras: bool = False) -> "Grid":
        base = Schedule.named(noise_schedule, steps)
        return cls(base.respace(respacing), base, karras)

    def __len__(self) -> int:
        return len(self.schedule)

    def from_step(self, start: int) -> "Grid":
        """The same grid, entered at loop step `start` (replay a step, or branch a trajectory)."""
        if not 0 <= start < len(self):
            raise ValueError(f"start step {start} is outside 0..{len(self) - 1}")
        return replace(self, start=start)

    @cached_property
    def sigmas(self) -> np.ndarray:
        """Descending VE noise levels, one per step, followed by a final 0."""
        if self.karras:
            levels = karras_sigmas(self.base.sigmas[0], self.base.sigmas[-1], len(self.schedule))
        else:
            levels = self.base.sigmas[self.schedule.timesteps[::-1]]
        return np.append(levels, 0.0)

    @cached_property
    def times(self) -> np.ndarray:
        """Original (possibly fractional) timestep for each noise level in `sigmas[:-1]`."""
        if self.karras:
            return self.base.timestep_for_sigma(self.sigmas[:-1])
        return self.schedule.timesteps[::-1].astype(np.float64)
