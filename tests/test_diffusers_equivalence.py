"""Our samplers against diffusers' schedulers on the same grid and the same denoiser (closed-form Gaussian)."""
import numpy as np
import pytest
import torch

from explore.denoisers import Cond
from explore.noise import PerImageNoise
from explore.samplers import SAMPLERS, Grid
from tests.test_samplers import SHAPE, GaussianDenoiser

diffusers = pytest.importorskip("diffusers")


def ours(name, grid, den, **opts):
    noise = PerImageNoise.from_seed(0, 2, SHAPE)
    x_T = noise.initial()
    steps = list(SAMPLERS[name](den, x_T, grid, Cond(), noise, clip_denoised=False, **opts))
    return x_T, steps[-1].x


def theirs(scheduler, x_T, den, timesteps):
    scheduler.set_timesteps(timesteps=timesteps) if timesteps is not None else None
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        eps = den(model_in, t.reshape(1).expand(len(x)).float(), Cond()).eps
        x = scheduler.step(eps, t, x).prev_sample
    return x


LINEAR = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def test_ddim_equals_diffusers_ddim_scheduler():
    grid = Grid.make("linear", "ddim10")
    den = GaussianDenoiser(grid.base)
    x_T, x = ours("ddim", grid, den)
    sched = diffusers.DDIMScheduler(**LINEAR, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == grid.schedule.timesteps[::-1].tolist()
    torch.testing.assert_close(x, theirs(sched, x_T, den, None), atol=1e-4, rtol=1e-4)


def test_euler_equals_diffusers_euler_scheduler_on_the_respaced_grid():
    grid = Grid.make("linear", "10")
    den = GaussianDenoiser(grid.base)
    x_T, x = ours("euler", grid, den)
    sched = diffusers.EulerDiscreteScheduler(**LINEAR)
    torch.testing.assert_close(x, theirs(sched, x_T, den, grid.schedule.timesteps[::-1].tolist()),
                               atol=1e-4, rtol=1e-4)


def test_dpmpp_2m_equals_diffusers_multistep_on_the_respaced_grid():
    grid = Grid.make("linear", "20")
    den = GaussianDenoiser(grid.base)
    x_T, x = ours("dpmpp_2m", grid, den)
    sched = diffusers.DPMSolverMultistepScheduler(**LINEAR, algorithm_type="dpmsolver++", solver_order=2,
                                                  lower_order_final=False, final_sigmas_type="zero")
    torch.testing.assert_close(x, theirs(sched, x_T, den, grid.schedule.timesteps[::-1].tolist()),
                               atol=1e-3, rtol=1e-3)
