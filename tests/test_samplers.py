"""Samplers and guidance on closed-form denoisers: Gaussian data has an exact optimal denoiser."""
import math

import numpy as np
import pytest
import torch

from explore.denoisers import Cond, Prediction
from explore.guidance import ClassifierFreeGuidance, ClassifierGuidance, combine
from explore.noise import PerImageNoise, RecordedNoise, Recorder
from explore.samplers import SAMPLERS, Grid

MU, STD = 0.3, 0.5
SHAPE = (3, 8, 8)


class GaussianDenoiser:
    """Exact eps for data x0 ~ N(mu_y, STD^2 I) (mu depends on the label, offset per class)."""

    def __init__(self, base_schedule, class_offset=0.0, learned_var=False):
        self.log_sigmas = np.log(base_schedule.sigmas)
        self.class_offset, self.learned_var, self.calls = class_offset, learned_var, 0

    def abar(self, t):
        sigma = np.exp(np.interp(t.double().cpu().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas))
        return torch.tensor(1 / (1 + sigma ** 2), dtype=torch.float32).view(-1, 1, 1, 1)

    def mean(self, cond, n):
        if cond.labels is None:
            return torch.full((n, 1, 1, 1), MU)
        return MU + self.class_offset * cond.labels.float().view(-1, 1, 1, 1)

    def __call__(self, x, t, cond):
        self.calls += 1
        abar = self.abar(t)
        mu = self.mean(cond, x.shape[0])
        x0_hat = mu + STD ** 2 * abar.sqrt() / (abar * STD ** 2 + 1 - abar) * (x - abar.sqrt() * mu)
        eps = (x - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        var = torch.zeros_like(x) if self.learned_var else None
        return Prediction(eps, var)


def ode_solution(x_T, sigma_max):
    """Exact probability-flow ODE map for Gaussian data: x0 = mu + std * z, z the whitened start."""
    x_ve = x_T * math.sqrt(1 + sigma_max ** 2)
    return MU + STD * (x_ve - MU) / math.sqrt(STD ** 2 + sigma_max ** 2)


def run(sampler, denoiser, grid, cond=Cond(), seed=0, batch=4, **opts):
    noise = PerImageNoise.from_seed(seed, batch, SHAPE)
    x_T = noise.initial()
    steps = list(SAMPLERS[sampler](denoiser, x_T, grid, cond, noise, clip_denoised=False, **opts))
    return x_T, steps


@pytest.mark.parametrize("sampler,karras,steps,order", [
    ("ddim", False, 50, 1), ("euler", False, 50, 1), ("euler", True, 50, 1),
    ("heun", False, 25, 2), ("heun", True, 25, 2), ("dpmpp_2m", True, 25, 2), ("dpmpp_2m", False, 100, 2),
])
def test_deterministic_samplers_converge_to_the_exact_ode_at_their_order(sampler, karras, steps, order):
    errors = []
    for n in (steps, 2 * steps):
        grid = Grid.make("linear", str(n), karras=karras)
        x_T, trajectory = run(sampler, GaussianDenoiser(grid.base), grid)
        errors.append((trajectory[-1].x - ode_solution(x_T, grid.sigmas[0])).abs().max().item())
    assert errors[1] < 0.1, errors
    assert errors[1] / errors[0] < {1: 0.6, 2: 0.35}[order], f"{sampler}: errors {errors}"


@pytest.mark.parametrize("sampler,opts", [("ddpm", {}), ("euler_a", {}), ("ddim", {"eta": 1.0}),
                                          ("heun", {"churn": 10.0})])
def test_stochastic_samplers_reach_the_data_distribution(sampler, opts):
    grid = Grid.make("linear", "200", karras=False)
    _, steps = run(sampler, GaussianDenoiser(grid.base, learned_var=True), grid, batch=64, **opts)
    x = steps[-1].x
    assert abs(x.mean().item() - MU) < 0.03 and abs(x.std().item() - STD) < 0.03


def test_ddim_eta1_equals_euler_ancestral_with_the_same_noise():
    grid = Grid.make("linear", "20")
    den = GaussianDenoiser(grid.base)
    _, ddim = run("ddim", den, grid, eta=1.0)
    _, euler_a = run("euler_a", den, grid, eta=1.0)
    torch.testing.assert_close(ddim[-1].x, euler_a[-1].x, atol=1e-4, rtol=1e-4)


def test_ddim_eta0_equals_euler_on_the_same_grid():
    grid = Grid.make("cosine", "ddim25")
    den = GaussianDenoiser(grid.base)
    _, ddim = run("ddim", den, grid)
    _, euler = run("euler", den, grid)
    for a, b in zip(ddim, euler):
        torch.testing.assert_close(a.x, b.x, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(a.pred_x0, b.pred_x0, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_yields_one_step_per_grid_point(sampler):
    grid = Grid.make("linear", "10")
    den = GaussianDenoiser(grid.base, learned_var=True)
    x_T, steps = run(sampler, den, grid)
    assert [s.index for s in steps] == list(range(10)) and all(s.total == 10 for s in steps)
    assert all(s.x.shape == x_T.shape and s.pred_x0.shape == x_T.shape for s in steps)
    sigmas = [s.sigma for s in steps]
    assert sigmas == sorted(sigmas, reverse=True)


def test_heun_calls_the_model_twice_per_step_but_once_at_the_end():
    grid = Grid.make("linear", "10")
    den = GaussianDenoiser(grid.base)
    run("heun", den, grid)
    assert den.calls == 19


def test_karras_is_refused_for_ddpm_and_ddim():
    grid = Grid.make("linear", "10", karras=True)
    for name in ("ddpm", "ddim"):
        with pytest.raises(ValueError, match="Karras"):
            run(name, GaussianDenoiser(grid.base), grid)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "heun"])
def test_same_seed_same_image_regardless_of_batch_size(sampler):
    grid = Grid.make("linear", "10")
    den = GaussianDenoiser(grid.base, learned_var=True)
    opts = {"churn": 5.0} if sampler == "heun" else {}
    noise_big = PerImageNoise([7, 8, 9], SHAPE)
    big = list(SAMPLERS[sampler](den, noise_big.initial(), grid, Cond(), noise_big, **opts))[-1].x
    noise_one = PerImageNoise([8], SHAPE)
    one = list(SAMPLERS[sampler](den, noise_one.initial(), grid, Cond(), noise_one, **opts))[-1].x
    torch.testing.assert_close(big[1:2], one)


def test_recorded_noise_replays_a_run_exactly():
    grid = Grid.make("linear", "10")
    den = GaussianDenoiser(grid.base, learned_var=True)
    recorder = Recorder(PerImageNoise.from_seed(3, 2, SHAPE))
    first = list(SAMPLERS["ddpm"](den, recorder.initial(), grid, Cond(), recorder))[-1].x
    replay = recorder.replay()
    second = list(SAMPLERS["ddpm"](den, replay.initial(), grid, Cond(), replay))[-1].x
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_recorded_noise_file_round_trip(tmp_path):
    recorder = Recorder(PerImageNoise.from_seed(1, 2, SHAPE))
    recorder.initial(), recorder.step(0)
    recorder.save(tmp_path / "noise.npz")
    loaded = RecordedNoise.load(tmp_path / "noise.npz")
    torch.testing.assert_close(loaded.initial(), recorder.x_T)
    torch.testing.assert_close(loaded.step(0), recorder.steps[0])
    with pytest.raises(ValueError, match="recorded noise has 1 steps"):
        loaded.step(1)


# --- guidance -------------------------------------------------------------------------------

def test_cfg_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    grid = Grid.make("linear", "10")
    den = GaussianDenoiser(grid.base, class_offset=0.2)
    x, t = torch.randn(4, *SHAPE), torch.full((4,), 500)
    cond = Cond(labels=torch.tensor([0, 1, 2, 3]))
    null = 9  # the Gaussian model maps label 9 to a different mean: a stand-in null class
    torch.testing.assert_close(ClassifierFreeGuidance(den, 1.0, null_class=null)(x, t, cond).eps, den(x, t, cond).eps)
    uncond = Cond(labels=torch.full((4,), null))
    torch.testing.assert_close(ClassifierFreeGuidance(den, 0.0, null_class=null)(x, t, cond).eps, den(x, t, uncond).eps)
    two_models = ClassifierFreeGuidance(den, 3.0, uncond_denoiser=den)
    expected = den(x, t, Cond()).eps + 3.0 * (den(x, t, cond).eps - den(x, t, Cond()).eps)
    torch.testing.assert_close(two_models(x, t, cond).eps, expected)
    batched = ClassifierFreeGuidance(den, 3.0, null_class=null)(x, t, cond).eps
    torch.testing.assert_close(batched, den(x, t, uncond).eps + 3.0 * (den(x, t, cond).eps - den(x, t, uncond).eps))


class LinearClassifier(torch.nn.Module):
    """log p(y | x) with logits w_y . x: its gradient is known in closed form."""

    def __init__(self, classes=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(classes, int(np.prod(SHAPE))) * 0.1)

    def forward(self, x, t):
        return x.flatten(1) @ self.w.T


def test_classifier_gradient_is_exact_and_summed_over_the_batch():
    clf = LinearClassifier()
    grid = Grid.make("linear", "10")
    x, t, labels = torch.randn(2, *SHAPE), torch.full((2,), 10), torch.tensor([0, 2])
    pred = ClassifierGuidance(GaussianDenoiser(grid.base), clf, scale=2.0)(x, t, Cond(labels))
    probs = torch.softmax(x.flatten(1) @ clf.w.T, -1)
    expected = 2.0 * (clf.w[labels] - probs @ clf.w).view_as(x)
    torch.testing.assert_close(pred.grad, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.stats["log_prob"], torch.log(probs[[0, 1], labels]).detach())


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("method", ["standard", "conflict"])
def test_classifier_guidance_at_scale_zero_equals_none(sampler, method):
    grid = Grid.make("linear", "10")
    den = GaussianDenoiser(grid.base, learned_var=True)
    cond = Cond(labels=torch.tensor([0, 1]))
    _, plain = run(sampler, den, grid, cond, batch=2)
    _, guided = run(sampler, ClassifierGuidance(den, LinearClassifier(), 0.0, method), grid, cond, batch=2)
    torch.testing.assert_close(plain[-1].x, guided[-1].x, atol=0, rtol=0)
    assert "log_prob" in guided[-1].stats


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_classifier_guidance_raises_the_class_probability(sampler):
    torch.manual_seed(0)
    clf = LinearClassifier()
    grid = Grid.make("linear", "10")
    den = GaussianDenoiser(grid.base, learned_var=True)
    cond = Cond(labels=torch.tensor([1] * 8))

    def final_log_prob(scale):
        _, steps = run(sampler, ClassifierGuidance(den, clf, scale), grid, cond, batch=8)
        return torch.log_softmax(steps[-1].x.flatten(1) @ clf.w.T, -1)[:, 1].mean().item()

    assert final_log_prob(3.0) > final_log_prob(0.0) + 0.5


def test_ddpm_guidance_is_the_mean_shift_and_ddim_the_score_form():
    """One step by hand: ancestral mean += var * g; DDIM eps -= sqrt(1 - abar) g."""
    clf = LinearClassifier()
    grid = Grid.make("linear", "10")
    den = GaussianDenoiser(grid.base)
    cond = Cond(labels=torch.tensor([2]))
    noise = PerImageNoise([0], SHAPE)
    x_T = noise.initial()
    plain = next(SAMPLERS["ddpm"](den, x_T, grid, cond, PerImageNoise([0], SHAPE)))
    guided = next(SAMPLERS["ddpm"](ClassifierGuidance(den, clf, 1.0), x_T, grid, cond, PerImageNoise([0], SHAPE)))
    grad = ClassifierGuidance(den, clf, 1.0)(x_T, torch.tensor([999]), cond).grad
    var = float(np.float32(grid.schedule.fixed_large_log_variance[-1]))
    # the first step of "10" is at index 9 with fixed-large variance exp(log_var)
    torch.testing.assert_close(guided.x - plain.x, math.exp(var) * grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(guided.guidance, math.exp(var) * grad, atol=1e-5, rtol=1e-4)
    plain = next(SAMPLERS["ddim"](den, x_T, grid, cond, noise))
    guided = next(SAMPLERS["ddim"](ClassifierGuidance(den, clf, 1.0), x_T, grid, cond, noise))
    abar = grid.schedule.alphas_cumprod[-1]
    torch.testing.assert_close(guided.eps, plain.eps - math.sqrt(1 - abar) * grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("respacing,at_most,at_least", [("50", None, 500.0), ("25", None, 1000.0),
                                                        ("ddim50", 2.0, None), ("ddim25", 2.0, None)])
def test_ddim_score_form_amplifies_guidance_at_the_cosine_schedules_last_timestep(respacing, at_most, at_least):
    """The first DDIM step moves x by gain * sqrt(1 - abar) * scale * grad, gain = sqrt(abar_prev) sqrt(1/abar - 1)
    - sqrt(1 - abar_prev): ~1 from t=960/980 ('ddimN'), but ~600-1300 from t=999 ('25', '50'), where the
    cosine schedule's abar is 2.4e-9 (the blow-up of classifier guidance with DDIM on those respacings)."""
    clf = LinearClassifier()
    grid = Grid.make("cosine", respacing)
    den = GaussianDenoiser(grid.base)
    cond = Cond(labels=torch.tensor([1]))
    noise = PerImageNoise([0], SHAPE)
    x_T = noise.initial()
    plain = next(SAMPLERS["ddim"](den, x_T, grid, cond, noise, clip_denoised=False))
    guided = next(SAMPLERS["ddim"](ClassifierGuidance(den, clf, 1.0), x_T, grid, cond, noise, clip_denoised=False))
    grad = ClassifierGuidance(den, clf, 1.0)(x_T, torch.tensor([int(grid.times[0])]), cond).grad
    abar, abar_prev = grid.schedule.alphas_cumprod[-1], grid.schedule.alphas_cumprod_prev[-1]
    gain = math.sqrt(abar_prev) * math.sqrt(1 / abar - 1) - math.sqrt(1 - abar_prev)
    expected = gain * math.sqrt(1 - abar) * grad
    # float32 floor: x0 = sqrt(1/abar) x - ... carries ~sqrt(1/abar) * 1.2e-7 * |x| of rounding, which the step
    # scales by sqrt(abar_prev): about 1e-4 of the gain for |x| ~ 1
    torch.testing.assert_close(guided.x - plain.x, expected, atol=1e-4 * gain, rtol=1e-3)
    torch.testing.assert_close(guided.guidance, expected, atol=1e-4 * gain, rtol=1e-3)
    assert (at_most is None or gain <= at_most) and (at_least is None or gain >= at_least)


def test_conflict_projection_removes_the_opposing_components():
    d = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[-1.0, 1.0]])
    out = combine(d, g, conflict_projection=True)
    d_proj = d - (-1.0 / 2.0) * g  # d minus its component along g
    g_proj = g - (-1.0 / 1.0) * d
    torch.testing.assert_close(out, d_proj + g_proj)
    assert (d_proj * g).sum() == pytest.approx(0) and (g_proj * d).sum() == pytest.approx(0)
    agree = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(combine(d, agree, True), d + agree)  # no conflict: plain sum
    # per sample
    both = combine(torch.cat([d, d]), torch.cat([g, agree]), True)
    torch.testing.assert_close(both, torch.cat([d_proj + g_proj, d + agree]))
