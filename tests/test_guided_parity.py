"""Classifier-guided DDPM / DDIM and super-resolution sampling against guided-diffusion's math, step by step.

`Reference` below is a plain re-implementation of SpacedDiffusion.p_sample and
ddim_sample from shared/reference/NOTES.md (sections 7-9), written with
per-step float32 coefficients gathered from float64 arrays, as the original
does; it does not use explore.samplers or explore.schedules' Schedule. The
engine runs a whole trajectory; every step is then recomputed by the reference
from the engine's own input of that step and the same noise.

Facts being checked (where an implementation most easily goes wrong):
* cond_fn = scale * d/dx sum_b log_softmax(classifier(x, t))[b, y_b], with t the
  ORIGINAL timestep (timestep_map[k]), not the respaced index k;
* DDPM: mean += variance * cond_fn, with the learned-range variance of the
  respaced process; noise masked out at k = 0;
* DDIM: eps derived from the CLAMPED pred_x0, eps -= sqrt(1 - abar) cond_fn, pred_x0
  recomputed from it WITHOUT a second clamp, eps re-derived, eta = 0 update.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explore.engine import FixedBatch, Recipe, plan
from explore.noise import PerImageNoise, Recorder
from explore.schedules import space_timesteps

import floors
import tiny_models


pytestmark = pytest.mark.usefixtures("one_thread")


def base_betas(name: str, steps: int = 1000) -> np.ndarray:
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)

    def abar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)])


class Reference:
    """SpacedDiffusion(use_timesteps) of the original, learned-range variance, clip_denoised=True.

    dtype=torch.float64 does the step's arithmetic in float64 on the same float32 coefficients and network
    outputs: how far that lies from the float32 step is the rounding floor of the step's own arithmetic.
    """

    def __init__(self, schedule: str, respacing: str, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        full_abar = np.cumprod(1.0 - base_betas(schedule))
        self.timestep_map = sorted(space_timesteps(1000, respacing))  # checked against the reference lists elsewhere
        betas, last = [], 1.0
        for i in self.timestep_map:
            betas.append(1 - full_abar[i] / last)
            last = full_abar[i]
        betas = np.array(betas, dtype=np.float64)
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.arrays = {
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "log_betas": np.log(betas),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        }

    def c(self, name: str, k: int) -> torch.Tensor:
        """_extract_into_tensor: gather in float64, cast to float32 (then to the arithmetic's dtype)."""
        return torch.from_numpy(self.arrays[name])[torch.tensor([k])].float().to(self.dtype).view(1, 1, 1, 1)

    def t(self, k: int, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.timestep_map[k], dtype=torch.int64)

    def p_mean_variance(self, model_fn, x, k):
        out = model_fn(x.float(), self.t(k, len(x))).to(self.dtype)  # the networks always run in float32
        eps, v = out.split(3, dim=1)
        frac = (v + 1) / 2
        log_var = frac * self.c("log_betas", k) + (1 - frac) * self.c("posterior_log_variance_clipped", k)
        x0 = (self.c("sqrt_recip_alphas_cumprod", k) * x - self.c("sqrt_recipm1_alphas_cumprod", k) * eps).clamp(-1, 1)
        mean = self.c("posterior_mean_coef1", k) * x0 + self.c("posterior_mean_coef2", k) * x
        return {"mean": mean, "variance": torch.exp(log_var), "log_variance": log_var, "pred_xstart": x0}

    def cond_fn(self, classifier, scale, labels, x, k, respaced_t=False):
        t = torch.full((len(x),), k) if respaced_t else self.t(k, len(x))  # respaced_t: a deliberate mistake
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), labels.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    def eps_from_xstart(self, x, k, x0):
        return (self.c("sqrt_recip_alphas_cumprod", k) * x - x0) / self.c("sqrt_recipm1_alphas_cumprod", k)

    def p_sample(self, model_fn, x, k, noise, cond_fn=None):
        out = self.p_mean_variance(model_fn, x, k)
        mean = out["mean"]
        if cond_fn is not None:
            mean = mean.to(self.dtype) + out["variance"] * cond_fn(x, k).to(self.dtype)  # .float() in the original
        mask = float(k != 0)
        return mean + mask * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(self, model_fn, x, k, noise, cond_fn=None, eta=0.0):
        out = self.p_mean_variance(model_fn, x, k)
        x0 = out["pred_xstart"]
        if cond_fn is not None:
            alpha_bar = self.c("alphas_cumprod", k)
            eps = self.eps_from_xstart(x, k, x0)
            eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, k)
            x0 = self.c("sqrt_recip_alphas_cumprod", k) * x - self.c("sqrt_recipm1_alphas_cumprod", k) * eps
        eps = self.eps_from_xstart(x, k, x0)
        abar, abar_prev = self.c("alphas_cumprod", k), self.c("alphas_cumprod_prev", k)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean_pred = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        return mean_pred + float(k != 0) * sigma * noise


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save_all(directory)
    return tiny_models.registry(directory)


def engine_trajectory(registry, recipe, low_res=None, labels=None):
    shape = (3, tiny_models.SIZE, tiny_models.SIZE)
    recorder = Recorder(PerImageNoise.from_seed(recipe.seed, recipe.batch_size, shape))
    run = plan(recipe, registry, noise=recorder, low_res=low_res, labels=labels)
    steps = list(run.steps())
    return run, recorder, steps


def step_errors(step_fn, recorder, steps) -> list[float]:
    """Every step recomputed by the reference from the engine's input of that step and the same noise:
    max |engine - reference| per step (the reference with one intra-op thread)."""
    errors = []
    for s, step in enumerate(steps):
        x_in = recorder.x_T if s == 0 else steps[s - 1].x
        expected = floors.at_threads(1, lambda: step_fn(x_in, len(steps) - 1 - s, recorder.steps[s]))
        errors.append((step.x - expected).abs().max().item())
    return errors


def step_bounds(step_fn, exact_fn, recorder, steps) -> list[float]:
    """Per step, FACTOR x the float floor of the reference step (floors.py), the larger of two floors:
    * the same step with 2 intra-op threads instead of 1 (the summation order inside the networks; the engine
      evaluates them one row per call, FixedBatch, a change of the same kind);
    * the same step with its arithmetic in float64 (exact_fn) on the same float32 coefficients and network
      outputs: the rounding of the step's own formula, which at t = 999 cancels terms ~1/sqrt(abar) |x| large.
    """
    bounds = []
    for s in range(len(steps)):
        x_in = recorder.x_T if s == 0 else steps[s - 1].x
        k, z = len(steps) - 1 - s, recorder.steps[s]
        one = floors.at_threads(1, lambda: step_fn(x_in, k, z))
        two = floors.at_threads(2, lambda: step_fn(x_in, k, z))
        exact = floors.at_threads(1, lambda: exact_fn(x_in.double(), k, z.double()))
        floor = max((one - two).abs().max().item(), (one.double() - exact).abs().max().item())
        bounds.append(floors.FACTOR * floor)
    return bounds


def worst(errors: list[float], bounds: list[float]) -> float:
    """The largest error / bound over the steps (<= 1: every step within its bound)."""
    return max(e / b for e, b in zip(errors, bounds))


# DDIM's score-form guidance moves pred_x0 by sqrt(1/abar - 1) sqrt(1 - abar) grad, about 2e4 x grad at
# t = 999 on the cosine schedule, so scale 4 drives x to ~180 (one float32 ulp there is 1.5e-5); each step's
# bound is a multiple of that step's own float floor, so large and small |x| are held to the same standard.
@pytest.mark.parametrize("sampler,scale", [("ddpm", 4.0), ("ddim", 0.01), ("ddim", 4.0)])
def test_classifier_guided_sampling_matches_the_original_step_by_step(registry, sampler, scale):
    recipe = Recipe(model="tiny_cond", classifier="tiny_classifier", classifier_scale=scale, sampler=sampler,
                    respacing="10", seed=3, batch_size=2)
    run, recorder, steps = engine_trajectory(registry, recipe)
    labels = run.cond.labels
    # the networks evaluated one row per call, as the engine does on CPU (batch-invariant)
    model = FixedBatch(registry.get("tiny_cond").module, 1)
    classifier = FixedBatch(registry.get("tiny_classifier").module, 1)
    reference, exact = Reference("cosine", "10"), Reference("cosine", "10", torch.float64)
    name = "p_sample" if sampler == "ddpm" else "ddim_sample"

    def model_fn(x, t):
        return model(x, t, y=labels)

    def step(ref, respaced_t=None):
        """ref's step with classifier guidance (respaced_t=None: none; True: the classifier sees k, a mistake)."""
        def cond_fn(x, k):
            return reference.cond_fn(classifier, scale, labels, x, k, respaced_t)
        return lambda x, k, z: getattr(ref, name)(model_fn, x, k, z, None if respaced_t is None else cond_fn)

    with torch.no_grad():
        errors = step_errors(step(reference, False), recorder, steps)
        bounds = step_bounds(step(reference, False), step(exact, False), recorder, steps)
        unguided = step_errors(step(reference), recorder, steps)
    print(f"{sampler} classifier scale {scale:g}, cosine, new attention order: max step error {max(errors):.3g}, "
          f"{worst(errors, bounds):.3g} x its bound (bounds {min(bounds):.3g}..{max(bounds):.3g}; without "
          f"guidance the steps differ by {max(unguided):.3g})")
    assert worst(errors, bounds) <= 1
    # the guidance really acts, so the comparison above means something
    assert max(unguided) > 1e-3 and worst(unguided, bounds) > 1
    if sampler == "ddpm":  # and the classifier's timestep matters: the respaced index would not match
        with torch.no_grad():
            wrong_t = step_errors(step(reference, True), recorder, steps)
        assert max(wrong_t) > 1e-4 and worst(wrong_t, bounds) > 1, wrong_t


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_superres_sampling_matches_the_original_step_by_step(registry, sampler):
    g = torch.Generator().manual_seed(5)
    low_uint8 = torch.randint(0, 256, (2, tiny_models.SMALL, tiny_models.SMALL, 3), generator=g, dtype=torch.uint8)
    low_res = low_uint8.float() / 127.5 - 1.0  # super_res_sample.py's load_data_for_worker
    low_res = low_res.permute(0, 3, 1, 2)
    labels = torch.tensor([1, 3])
    recipe = Recipe(model="tiny_sr", sampler=sampler, respacing="10", seed=11, batch_size=2)
    run, recorder, steps = engine_trajectory(registry, recipe, low_res=low_res, labels=labels)
    model = registry.get("tiny_sr").module
    reference, exact = Reference("linear", "10"), Reference("linear", "10", torch.float64)
    name = "p_sample" if sampler == "ddpm" else "ddim_sample"

    def model_fn(x, t):
        return model(x, t, low_res=low_res, y=labels)

    def step(ref):
        return lambda x, k, z: getattr(ref, name)(model_fn, x, k, z)

    with torch.no_grad():
        errors = step_errors(step(reference), recorder, steps)
        bounds = step_bounds(step(reference), step(exact), recorder, steps)
    print(f"{sampler} super-res, linear: max step error {max(errors):.3g}, {worst(errors, bounds):.3g} x its "
          f"bound (bounds {min(bounds):.3g}..{max(bounds):.3g})")
    assert worst(errors, bounds) <= 1
    assert steps[-1].x.shape == (2, 3, tiny_models.SIZE, tiny_models.SIZE)


def test_superres_forward_is_the_unet_on_x_and_bilinear_low_res():
    """SuperResModel(x, t, low_res) = UNet([x, bilinear(low_res)]) (NOTES.md section 6)."""
    from dataclasses import replace

    from explore.models.adm import UNetModel
    sr = tiny_models.build()["superres"]
    plain = UNetModel(replace(tiny_models.SUPERRES, super_res=False, in_channels=6))
    plain.load_state_dict(sr.state_dict())
    x, low = torch.randn(2, 3, 16, 16), torch.rand(2, 3, 8, 8) * 2 - 1
    t, y = torch.tensor([10, 900]), torch.tensor([0, 2])
    up = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(sr(x, t, low_res=low, y=y), plain.eval()(torch.cat([x, up], 1), t, y=y),
                                   atol=0, rtol=0)
