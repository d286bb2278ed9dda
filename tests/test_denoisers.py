"""v-prediction: a network that outputs v gives the same eps as one that outputs eps (closed-form Gaussian data)."""
import numpy as np
import pytest
import torch

from explore.denoisers import ADMDenoiser, Cond, alpha_bar_at, log_sigma_table, upsampled
from explore.samplers import Grid
from explore.schedules import Schedule
from tests.test_samplers import SHAPE, GaussianDenoiser, run


class GaussianVNetwork(torch.nn.Module):
    """Outputs the exact v = sqrt(abar) eps - sqrt(1 - abar) x0 of GaussianDenoiser's data, as a network would."""

    def __init__(self, schedule):
        super().__init__()
        self.exact = GaussianDenoiser(schedule)
        self.unused = torch.nn.Parameter(torch.zeros(()))  # ADMDenoiser reads the device from the parameters

    def forward(self, x, t, y=None):
        abar = self.exact.abar(t)
        eps = self.exact(x, t, Cond(labels=y)).eps
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_at_matches_the_table_and_the_karras_mapping(name):
    schedule = Schedule.named(name, 1000)
    t = torch.tensor([0, 1, 250, 998, 999])
    np.testing.assert_allclose(alpha_bar_at(log_sigma_table(schedule), t).numpy(), schedule.alphas_cumprod[t.numpy()], rtol=1e-12)
    sigmas = np.array([0.05, 0.7, 3.0, 60.0])
    fractional = torch.from_numpy(schedule.timestep_for_sigma(sigmas))
    np.testing.assert_allclose(alpha_bar_at(log_sigma_table(schedule), fractional).numpy(), 1 / (1 + sigmas ** 2), rtol=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_v_network_gives_the_eps_of_the_equivalent_eps_network(name):
    schedule = Schedule.named(name, 1000)
    denoiser = ADMDenoiser(GaussianVNetwork(schedule), learn_sigma=False, class_cond=False, v_schedule=schedule)
    exact = GaussianDenoiser(schedule)
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(0))
    for t in (torch.tensor([0, 10, 500, 990, 999]), torch.tensor([0.5, 10.25, 499.9, 990.5, 998.99])):
        torch.testing.assert_close(denoiser(x, t, Cond()).eps, exact(x, t, Cond()).eps, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("sampler,name,respacing,karras", [("ddim", "cosine", "ddim50", False),
                                                           ("euler", "linear", "50", True)])
def test_sampling_a_v_network_follows_the_exact_ode(sampler, name, respacing, karras):
    grid = Grid.make(name, respacing, karras=karras)
    denoiser = ADMDenoiser(GaussianVNetwork(grid.base), learn_sigma=False, class_cond=False, v_schedule=grid.base)
    _, steps = run(sampler, denoiser, grid)
    _, reference = run(sampler, GaussianDenoiser(grid.base), grid)
    torch.testing.assert_close(steps[-1].x, reference[-1].x, atol=1e-4, rtol=1e-4)


class ResidualVNetwork(GaussianVNetwork):
    """The same exact denoiser, but reporting v of the residual over the bicubic skip: v_r = v + sqrt(1-abar) skip."""

    def forward(self, x, t, y=None, low_res=None):
        abar = self.exact.abar(t)
        return super().forward(x, t, y) + (1 - abar).sqrt() * upsampled(low_res, x.shape[-2:])


def test_low_res_skip_adds_the_bicubic_upsampling_back():
    schedule = Schedule.named("linear", 1000)
    network = ResidualVNetwork(schedule)
    denoiser = ADMDenoiser(network, learn_sigma=False, class_cond=False, v_schedule=schedule, low_res_skip=True)
    exact = GaussianDenoiser(schedule)
    g = torch.Generator().manual_seed(1)
    x, low_res = torch.randn(4, *SHAPE, generator=g), torch.rand(4, 3, 2, 2, generator=g) * 2 - 1
    t = torch.tensor([0, 300, 800, 999])
    cond = Cond(low_res=low_res)
    torch.testing.assert_close(denoiser(x, t, cond).eps, exact(x, t, Cond()).eps, atol=2e-5, rtol=1e-4)
    # at the highest noise level an all-zero network output means "no residual": x0 is the bicubic upsampling
    zero = ADMDenoiser(ZeroNetwork(), learn_sigma=False, class_cond=False, v_schedule=schedule, low_res_skip=True)
    top = torch.full((4,), 999)
    abar = alpha_bar_at(log_sigma_table(schedule), top).view(-1, 1, 1, 1).float()
    eps = zero(x, top, cond).eps
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    torch.testing.assert_close(x0, upsampled(low_res, SHAPE[1:]), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="v-prediction"):
        ADMDenoiser(network, learn_sigma=False, low_res_skip=True)


class ZeroNetwork(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None, low_res=None):
        return torch.zeros_like(x)
