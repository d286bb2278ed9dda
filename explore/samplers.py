"""Samplers as step iterators with one signature.

    sampler(denoiser, x_T, grid, cond, noise, **options) -> Iterator[Step]

Every sampler yields one `Step` per loop iteration; running to the end is the
last Step of the same iterator. x_T and every yielded x are in the
variance-preserving space of the networks (x_T ~ N(0, I)). DDPM and DDIM follow
guided-diffusion exactly; Euler, Euler ancestral, Heun and DPM-Solver++(2M) run
on variance-exploding noise levels sigma = sqrt((1 - abar) / abar) (Karras et al.
2022), either the respaced grid or Karras sigmas.
"""
from __future__ import annotations

import math
import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from explore.denoisers import Cond, Denoiser, Prediction
from explore.guidance import combine, dynamic_thresholded
from explore.noise import NoiseSource
from explore.schedules import Grid


@dataclass
class Step:
    """What one sampler iteration produced."""

    index: int  # loop step s = 0 .. total-1 (0 is the noisiest)
    total: int  # number of loop steps
    timestep: float  # original model timestep evaluated at this step
    sigma: float  # VE noise level of the input x_t (sqrt((1 - abar) / abar))
    x: Tensor  # the sample after this step (x_{t-1}; the final image at the last step)
    pred_x0: Tensor  # predicted clean image at this step
    eps: Tensor  # predicted noise used by the update (after guidance)
    guidance: Tensor | None = None  # how much classifier guidance changed x in this step
    cfg_guidance: Tensor | None = None  # how much classifier-free guidance changed x (first order), same units
    drift: Tensor | None = None  # the whole deterministic change of x in this step (no fresh noise), same units
    stats: dict[str, Tensor] = field(default_factory=dict)  # per-sample telemetry


Sampler = Callable[..., Iterator[Step]]


def facts(*, karras: bool, draws_noise: Callable[[dict], bool] = lambda options: True):
    """What the edges need to know of a sampler, kept with it: whether it runs on Karras sigmas, and whether it
    draws per-step noise given its options. Its options and their defaults are its keyword arguments."""
    def mark(sampler: Sampler) -> Sampler:
        sampler.karras, sampler.draws_noise = karras, draws_noise
        return sampler
    return mark


def _stack_t(value: float, x: Tensor) -> Tensor:
    if float(value).is_integer():
        return torch.full((x.shape[0],), int(value), dtype=torch.int64, device=x.device)
    return torch.full((x.shape[0],), float(value), dtype=torch.float32, device=x.device)


def _f32(value) -> float:
    """A schedule value rounded to float32, as the original casts gathered coefficients."""
    return float(np.float32(value))


def _denoise(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Cond, abar: float,
             clip: bool, threshold: float = 0.0) -> tuple[Tensor, Tensor, Prediction, Tensor | None]:
    """pred_x0 and eps at noise level abar, with classifier guidance in score form.

    As guided-diffusion's DDIM: x0 from eps (clamped), eps re-derived from that x0;
    guidance: eps <- eps - sqrt(1 - abar) grad, x0 recomputed (no second clamp).
    With `threshold` the final x0 is dynamically thresholded (and eps re-derived).
    Also returns the guidance's change of eps (or None).
    """
    recip, recipm1 = _f32(math.sqrt(1.0 / abar)), _f32(math.sqrt(1.0 / abar - 1.0))
    pred = denoiser(x, t, cond)
    x0 = recip * x - recipm1 * pred.eps
    if clip:
        x0 = x0.clamp(-1, 1)
    eps = (recip * x - x0) / recipm1
    guide = None
    if pred.grad is not None:
        sqrt_1m_abar = math.sqrt(1.0 - _f32(abar))
        # score form (Song et al. 2021): score = -eps / sqrt(1 - abar), plus grad log p
        guided = -sqrt_1m_abar * combine(-eps / sqrt_1m_abar, pred.grad, pred.conflict_projection)
        guide, eps = guided - eps, guided
        x0 = recip * x - recipm1 * eps
    if threshold:
        x0 = dynamic_thresholded(x0, threshold)
        eps = (recip * x - x0) / recipm1
    return x0, eps, pred, guide


@facts(karras=False)
def sample_ddpm(denoiser: Denoiser, x_T: Tensor, grid: Grid, cond: Cond, noise: NoiseSource, *,
                clip_denoised: bool = True, dynamic_threshold: float = 0.0) -> Iterator[Step]:
    """Ancestral sampling (Ho et al. 2020) with learned-range or fixed-large variance (Nichol & Dhariwal 2021).

    Classifier guidance shifts the mean by variance * grad (Dhariwal & Nichol 2021, Alg. 1).
    """
    _no_karras(grid, "ddpm")
    sched, x, total = grid.schedule, x_T, len(grid)
    for s in range(grid.start, total):
        k = total - 1 - s
        t = _stack_t(sched.timesteps[k], x)
        pred = denoiser(x, t, cond)
        # 1. predicted x0 and the posterior mean of q(x_{t-1} | x_t, x0)
        x0 = _f32(sched.sqrt_recip_alphas_cumprod[k]) * x - _f32(sched.sqrt_recipm1_alphas_cumprod[k]) * pred.eps
        if dynamic_threshold:
            x0 = dynamic_thresholded(x0, dynamic_threshold)
        elif clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = _f32(sched.posterior_mean_coef1[k]) * x0 + _f32(sched.posterior_mean_coef2[k]) * x
        # 2. variance: interpolate log(beta) and the clipped posterior log-variance, or fixed large
        if pred.var_values is not None:
            frac = (pred.var_values + 1) / 2
            log_var = frac * _f32(sched.log_betas[k]) + (1 - frac) * _f32(sched.posterior_log_variance_clipped[k])
        else:
            log_var = torch.full_like(x, _f32(sched.fixed_large_log_variance[k]))
        z = noise.step(s)
        # 3. guidance as a mean shift
        guide = None
        if pred.grad is not None:
            shifted = x + combine(mean - x, torch.exp(log_var) * pred.grad, pred.conflict_projection)
            guide, mean = shifted - mean, shifted
        cfg = _scaled(pred.cfg_eps, -_f32(sched.posterior_mean_coef1[k]) * _f32(sched.sqrt_recipm1_alphas_cumprod[k]))
        drift = mean - x
        x = mean + torch.exp(0.5 * log_var) * z if k > 0 else mean
        yield Step(s, total, float(sched.timesteps[k]), float(grid.sigmas[s]), x, x0, pred.eps, guide, cfg, drift,
                   pred.stats)


@facts(karras=False)
def sample_ddim(denoiser: Denoiser, x_T: Tensor, grid: Grid, cond: Cond, noise: NoiseSource, *,
                eta: float = 0.0, clip_denoised: bool = True, dynamic_threshold: float = 0.0) -> Iterator[Step]:
    """DDIM (Song et al. 2021, eq. 12); eta = 1 gives ancestral-like noise. Guidance in score form."""
    _no_karras(grid, "ddim")
    sched, x, total = grid.schedule, x_T, len(grid)
    for s in range(grid.start, total):
        k = total - 1 - s
        t = _stack_t(sched.timesteps[k], x)
        x0, eps, pred, guide = _denoise(denoiser, x, t, cond, sched.alphas_cumprod[k], clip_denoised,
                                      dynamic_threshold)
        abar, abar_prev = _f32(sched.alphas_cumprod[k]), _f32(sched.alphas_cumprod_prev[k])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
        z = noise.step(s)  # drawn every step, as the original does
        eps_coef = math.sqrt(1 - abar_prev - sigma ** 2)
        x_prev = x0 * math.sqrt(abar_prev) + eps_coef * eps
        per_eps = eps_coef - math.sqrt(abar_prev) * math.sqrt(1 / abar - 1)  # x0 moves by -sqrt(1/abar - 1) eps
        guide, cfg, drift = _scaled(guide, per_eps), _scaled(pred.cfg_eps, per_eps), x_prev - x
        x = x_prev + sigma * z if k > 0 else x_prev
        yield Step(s, total, float(sched.timesteps[k]), float(grid.sigmas[s]), x, x0, eps, guide, cfg, drift,
                   pred.stats)


class _VEModel:
    """The denoiser seen from variance-exploding space: D(x, sigma) -> (x0, eps, pred, guide)."""

    def __init__(self, denoiser: Denoiser, cond: Cond, clip: bool, threshold: float = 0.0):
        self.denoiser, self.cond, self.clip, self.threshold = denoiser, cond, clip, threshold

    def __call__(self, x: Tensor, sigma: float, t: float):
        abar = 1.0 / (1.0 + sigma * sigma)
        return _denoise(self.denoiser, x * math.sqrt(abar), _stack_t(t, x), self.cond, abar, self.clip,
                        self.threshold)


def _average(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The mean of two evaluations' guidance terms; a missing one (outside a guidance interval) counts as zero."""
    if a is None and b is None:
        return None
    return ((0 if a is None else a) + (0 if b is None else b)) / 2


def _scaled(term: Tensor | None, factor: float) -> Tensor | None:
    return None if term is None else factor * term


def _ve_step(s: int, total: int, t: float, sigma: float, sigma_next: float, x: Tensor, x_moved: Tensor,
             x_next: Tensor, x0: Tensor, eps: Tensor, guide_eps: Tensor | None, pred: Prediction,
             cfg_eps: Tensor | None = None, per_eps: float | None = None) -> Step:
    """Report a VE sampler step in VP space. x -> x_moved is the step without fresh noise (its drift); guidance
    terms move x_moved by per_eps times their change of eps (default: the Euler step's sigma_next - sigma)."""
    scale, scale_before = 1.0 / math.sqrt(1.0 + sigma_next * sigma_next), 1.0 / math.sqrt(1.0 + sigma * sigma)
    per_eps = (sigma_next - sigma if per_eps is None else per_eps) * scale
    return Step(s, total, float(t), float(sigma), x_next * scale, x0, eps, _scaled(guide_eps, per_eps),
                _scaled(pred.cfg_eps if cfg_eps is None else cfg_eps, per_eps), x_moved * scale - x * scale_before,
                pred.stats)


@facts(karras=True, draws_noise=lambda options: False)
def sample_euler(denoiser: Denoiser, x_T: Tensor, grid: Grid, cond: Cond, noise: NoiseSource, *,
                 clip_denoised: bool = True, dynamic_threshold: float = 0.0) -> Iterator[Step]:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 with Euler steps)."""
    model, sigmas, times = _VEModel(denoiser, cond, clip_denoised, dynamic_threshold), grid.sigmas, grid.times
    x, total = x_T * math.sqrt(1.0 + sigmas[grid.start] ** 2), len(grid)
    for s in range(grid.start, total):
        x0, eps, pred, guide = model(x, sigmas[s], times[s])
        x_next = x + (sigmas[s + 1] - sigmas[s]) * eps  # d = (x - x0) / sigma = eps
        yield _ve_step(s, total, times[s], sigmas[s], sigmas[s + 1], x, x_next, x_next, x0, eps, guide, pred)
        x = x_next


@facts(karras=True)
def sample_euler_ancestral(denoiser: Denoiser, x_T: Tensor, grid: Grid, cond: Cond, noise: NoiseSource, *,
                           eta: float = 1.0, clip_denoised: bool = True,
                           dynamic_threshold: float = 0.0) -> Iterator[Step]:
    """Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion's ancestral Euler)."""
    model, sigmas, times = _VEModel(denoiser, cond, clip_denoised, dynamic_threshold), grid.sigmas, grid.times
    x, total = x_T * math.sqrt(1.0 + sigmas[grid.start] ** 2), len(grid)
    for s in range(grid.start, total):
        x0, eps, pred, guide = model(x, sigmas[s], times[s])
        sigma, sigma_next = sigmas[s], sigmas[s + 1]
        sigma_up = min(sigma_next, eta * math.sqrt(max(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2, 0.0)))
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        z = noise.step(s)
        x_moved = x + (sigma_down - sigma) * eps
        x_next = x_moved + sigma_up * z if sigma_next > 0 else x_moved
        yield _ve_step(s, total, times[s], sigma, sigma_next, x, x_moved, x_next, x0, eps, guide, pred,
                       per_eps=sigma_down - sigma)
        x = x_next


@facts(karras=True, draws_noise=lambda options: options.get("churn", 0.0) > 0)
def sample_heun(denoiser: Denoiser, x_T: Tensor, grid: Grid, cond: Cond, noise: NoiseSource, *,
                churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                clip_denoised: bool = True, dynamic_threshold: float = 0.0) -> Iterator[Step]:
    """Heun's 2nd-order method with stochastic churn (Karras et al. 2022, Alg. 2), its trapezoid taken in 1/sigma.

    On y = x / sigma the ODE reads dy/d(1/sigma) = x0(x, sigma): the corrected step averages the two x0
    predictions, x_next = r x + (1 - r) (x0 + x0') / 2 with r = sigma_next / sigma, exact for constant x0. Alg. 2's
    trapezoid in sigma averages eps instead and multiplies their difference by the step: on the cosine
    schedule's first step (sigma 2e4 -> 15) that turns a small change of eps into coloured noise.
    """
    model, sigmas, times = _VEModel(denoiser, cond, clip_denoised, dynamic_threshold), grid.sigmas, grid.times
    x, total = x_T * math.sqrt(1.0 + sigmas[grid.start] ** 2), len(grid)
    for s in range(grid.start, total):
        sigma, sigma_next = sigmas[s], sigmas[s + 1]
        gamma = min(churn / total, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        # Increase noise temporarily.
        sigma_hat, t_hat = sigma * (1 + gamma), times[s]
        if gamma > 0:
            z = noise.step(s)
            x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * s_noise * z
            t_hat = float(grid.base.timestep_for_sigma(np.array([sigma_hat]))[0])
        # Euler step.
        x0, d_cur, pred, guide = model(x, sigma_hat, t_hat)
        x_next = x + (sigma_next - sigma_hat) * d_cur
        # 2nd order correction.
        cfg_eps = pred.cfg_eps
        if sigma_next > 0:
            x0_prime, _, pred_prime, guide_prime = model(x_next, sigma_next, times[s + 1])
            ratio = sigma_next / sigma_hat
            x_next = ratio * x + (1 - ratio) * (x0 + x0_prime) / 2
            guide, cfg_eps = _average(guide, guide_prime), _average(cfg_eps, pred_prime.cfg_eps)
        yield _ve_step(s, total, t_hat, sigma_hat, sigma_next, x, x_next, x_next, x0, d_cur, guide, pred, cfg_eps)
        x = x_next


@facts(karras=True, draws_noise=lambda options: False)
def sample_dpmpp_2m(denoiser: Denoiser, x_T: Tensor, grid: Grid, cond: Cond, noise: NoiseSource, *,
                    clip_denoised: bool = True, dynamic_threshold: float = 0.0) -> Iterator[Step]:
    """DPM-Solver++(2M), multistep 2nd order in log-sigma time (Lu et al. 2022, Alg. 2)."""
    model, sigmas, times = _VEModel(denoiser, cond, clip_denoised, dynamic_threshold), grid.sigmas, grid.times
    x, total = x_T * math.sqrt(1.0 + sigmas[grid.start] ** 2), len(grid)
    old_x0 = None
    for s in range(grid.start, total):
        sigma, sigma_next = sigmas[s], sigmas[s + 1]
        x0, eps, pred, guide = model(x, sigma, times[s])
        if sigma_next == 0:
            x_next = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            x0_blend, weight = x0, 1.0  # weight: of this step's x0 in the blend
            if old_x0 is not None:
                r = (math.log(sigmas[s - 1]) - math.log(sigma)) / h
                weight = 1 + 1 / (2 * r)
                x0_blend = weight * x0 - (1 / (2 * r)) * old_x0
            x_next = (sigma_next / sigma) * x - math.expm1(-h) * x0_blend
        old_x0 = x0
        per_eps = -sigma if sigma_next == 0 else (sigma_next - sigma) * weight  # x0 = x - sigma eps
        yield _ve_step(s, total, times[s], sigma, sigma_next, x, x_next, x_next, x0, eps, guide, pred,
                       per_eps=per_eps)
        x = x_next


def _no_karras(grid: Grid, name: str) -> None:
    if grid.karras:
        supported = [other for other, sampler in SAMPLERS.items() if sampler.karras]
        raise ValueError(f"Karras sigmas do not apply to the {name} sampler; use {', '.join(supported[:-1])} or "
                         f"{supported[-1]}")


SAMPLERS: dict[str, Sampler] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def sampler_defaults(name: str) -> dict:
    """A sampler's keyword options and their defaults (clip_denoised included)."""
    return {p.name: p.default for p in inspect.signature(SAMPLERS[name]).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}
