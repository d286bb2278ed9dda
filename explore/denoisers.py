"""One protocol over every model family: denoiser(x_t, t, cond) -> Prediction.

x_t is in the variance-preserving space the networks were trained on, t are
original timesteps (0..999, possibly fractional for Karras grids).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from explore.schedules import Schedule


@dataclass(frozen=True)
class Cond:
    """What a denoiser is conditioned on."""

    labels: Tensor | None = None  # int64 [B] class labels (None for unconditional models)
    low_res: Tensor | None = None  # [B, 3, h, w] in [-1, 1] for super-resolution models
    requested: Tensor | None = None  # int64 [B] classes asked for where `labels` stand in (CFG's null label)

    @property
    def classes(self) -> Tensor | None:
        """The classes asked for, which classifier guidance aims at: `requested`, else `labels`."""
        return self.labels if self.requested is None else self.requested

    def repeat(self, times: int) -> "Cond":
        """The same conditioning for a batch stacked `times` times."""
        def rep(v):
            return None if v is None else torch.cat([v] * times)
        return Cond(rep(self.labels), rep(self.low_res), rep(self.requested))


@dataclass
class Prediction:
    """A denoiser's output for one evaluation."""

    eps: Tensor  # predicted noise, float32 [B, C, H, W]
    var_values: Tensor | None = None  # learned-range interpolation in [-1, 1], None for fixed variance
    grad: Tensor | None = None  # classifier guidance: scale * d/dx log p(y | x_t), or None
    cfg_eps: Tensor | None = None  # what classifier-free guidance added to eps (guided - conditional), or None
    conflict_projection: bool = False  # combine grad with the denoising term by PixelAsParam projection
    stats: dict[str, Tensor] = field(default_factory=dict)  # per-sample telemetry


class Denoiser(Protocol):
    def __call__(self, x: Tensor, t: Tensor, cond: Cond) -> Prediction: ...


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the network forward only (samplers always compute in fp32)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class ADMDenoiser:
    """Adapter for ADM-style UNets (official checkpoints and the built-in family).

    The network returns eps (3 channels) or eps + learned-range values (6 channels); `fixed_small` (a model
    trained with sigma_small) reports the range's low end, the posterior variance (FIXED_SMALL). Given `v_schedule` (the
    full training schedule), it returns v instead, turned into eps = sqrt(abar) v + sqrt(1 - abar) x_t. With
    `low_res_skip` (super-resolution) that v is the residual's: x0 = bicubic(low_res) + the network's x0, so at
    high noise a network that outputs zero already predicts the bicubic upsampling (a skip connection in the
    spirit of Karras et al. 2022's c_skip); the diffusion itself stays in image space, so every sampler and
    guidance applies unchanged.
    """

    def __init__(self, module: torch.nn.Module, learn_sigma: bool, class_cond: bool = True,
                 precision: torch.dtype | None = None, channels_last: bool = False,
                 v_schedule: Schedule | None = None, low_res_skip: bool = False, fixed_small: bool = False):
        self.module = module
        self.fixed_small = fixed_small and not learn_sigma  # the posterior variance: var_values -1 everywhere
        self.learn_sigma, self.class_cond = learn_sigma, class_cond
        self.precision = precision
        self.channels_last = channels_last
        self.v_schedule = v_schedule
        self._log_sigmas: Tensor | None = None  # log_sigma_table, moved to the device once
        if low_res_skip and v_schedule is None:
            raise ValueError("low_res_skip needs a v-prediction model (v_schedule)")
        self.low_res_skip = low_res_skip

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __call__(self, x: Tensor, t: Tensor, cond: Cond) -> Prediction:
        inputs = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        with autocast_context(x.device, self.precision):
            kwargs = {"y": cond.labels if self.class_cond else None}
            if cond.low_res is not None:
                kwargs["low_res"] = cond.low_res
            out = self.module(inputs, t, **kwargs).float()
        var_values = None
        if self.learn_sigma:
            out, var_values = out.split(x.shape[1], dim=1)
            var_values = var_values.contiguous()
        elif self.fixed_small:
            var_values = torch.full_like(x, -1.0)
        if self.v_schedule is not None:
            if self._log_sigmas is None or self._log_sigmas.device != t.device:
                self._log_sigmas = log_sigma_table(self.v_schedule).to(t.device)
            abar = alpha_bar_at(self._log_sigmas, t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            a, b = abar.sqrt(), (1 - abar).clamp(min=0).sqrt()
            if self.low_res_skip:  # v = sqrt(abar) eps - sqrt(1 - abar) (skip + r0) = v_r - sqrt(1 - abar) skip
                out = out - b * upsampled(cond.low_res, x.shape[-2:])
            out = a * out + b * x  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
        return Prediction(out.contiguous(), var_values)


def log_sigma_table(schedule: Schedule) -> Tensor:
    """log sqrt((1 - abar) / abar) per original timestep (float64), for alpha_bar_at."""
    return torch.from_numpy(np.log(schedule.sigmas))


def alpha_bar_at(log_sigmas: Tensor, t: Tensor) -> Tensor:
    """abar at original timesteps t; fractional t interpolate log-sigma, as Karras grids map sigma to t.

    `log_sigmas` (log_sigma_table) on t's device: no host sync or copy inside the step loop.
    """
    last = len(log_sigmas) - 1
    tt = t.to(log_sigmas.dtype).clamp(0, last)
    low = tt.floor().clamp(max=max(last - 1, 0)).long()
    high = (low + 1).clamp(max=last)
    log_sigma = torch.lerp(log_sigmas[low], log_sigmas[high], tt - low)
    return torch.sigmoid(-2 * log_sigma)  # 1 / (1 + sigma^2)


def upsampled(low_res: Tensor, size) -> Tensor:
    """The skip of low-res-skip upsamplers: bicubic to `size`, clamped to [-1, 1]."""
    return F.interpolate(low_res.float(), size=tuple(size), mode="bicubic", align_corners=False).clamp(-1, 1)


class FixedBatch(torch.nn.Module):
    """A network evaluated in chunks of exactly `size` rows, the last chunk padded by repeating its last row.

    CPU kernels choose their summation order by batch size (a GEMV for one row, other blockings for 6 or 16),
    so an image's bits would depend on the batch it was drawn in; at one fixed evaluation size they do not.
    Rows never mix inside these networks, so each output row depends on its own input row alone. Wrapping
    the networks (not the guidance) keeps CFG's stacked [cond, uncond] pair of one image in one chunk.
    """

    def __init__(self, network: torch.nn.Module, size: int = 2):
        super().__init__()
        self.network, self.size = network, size

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        n = x.shape[0]
        if n == self.size:
            return self.network(x, t, **kwargs)
        outputs = []
        for start in range(0, n, self.size):
            if start + self.size <= n:  # a full chunk: views, no copies
                index = slice(start, start + self.size)
            else:  # the last chunk, padded by repeating its last row
                index = torch.arange(start, start + self.size, device=x.device).clamp_max(n - 1)
            chunk = {k: None if v is None else v[index] for k, v in kwargs.items()}
            out = self.network(x[index], t[index] if t.ndim else t, **chunk)
            outputs.append(out[:min(self.size, n - start)])
        return torch.cat(outputs)
