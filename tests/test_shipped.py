"""The built-in family as shipped in checkpoints/: loads offline, describes itself, samples with every guidance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from explore.data import scenes
from explore.engine import Recipe, plan, run
from explore.outputs import from_uint8
from explore.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[1] / "checkpoints"
BASE, CLF, EVAL, UP = "scenes32_base", "scenes32_classifier", "scenes32_evaluator", "scenes128_upsampler"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry(ROOT, device="cpu")


@pytest.mark.parametrize("name,kind", [(BASE, "diffusion"), (CLF, "classifier"), (EVAL, "evaluator"),
                                       (UP, "superres")])
def test_each_model_is_shipped_small_and_describes_itself(registry, name, kind):
    path = ROOT / f"{name}.safetensors"
    assert path.stat().st_size < 50 * 2 ** 20
    entry = registry.get(name)
    assert entry.kind == kind and entry.class_names == list(scenes.CLASS_NAMES)
    training = entry.loaded.metadata["training"]
    assert training["steps"] > 0 and training["data"] == "scenes" and training["cpu_minutes"] > 0
    if kind in ("diffusion", "superres"):
        assert entry.null_class == len(scenes.CLASS_NAMES)
        assert entry.diffusion.predict_v and entry.diffusion.low_res_skip == (kind == "superres")


def test_base_samples_are_of_their_class_under_cfg(registry):
    """A behaviour check of the trained weights: 8 samples, one per class, graded by the evaluator."""
    labels = torch.arange(8)
    final = run(Recipe(model=BASE, sampler="ddim", respacing="20", cfg_scale=3.0, batch_size=8, seed=100),
                registry, labels=labels)
    with torch.no_grad():
        predicted = registry.get(EVAL).module(final.x).argmax(1)
    assert (predicted == labels).sum() >= 6, predicted.tolist()


@pytest.mark.parametrize("extra", [{}, {"cfg_scale": 3.0}, {"classifier": CLF, "classifier_scale": 3.0}],
                         ids=["none", "cfg", "classifier"])
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_base_samples_with_each_guidance(registry, extra, sampler):
    steps = list(plan(Recipe(model=BASE, class_label=3, sampler=sampler, respacing="4", batch_size=2, **extra),
                      registry).steps())
    assert len(steps) == 4 and steps[-1].x.shape == (2, 3, 32, 32)
    assert torch.isfinite(steps[-1].x).all() and steps[-1].x.abs().max() <= 1.0 + 1e-5
    if extra:
        assert steps[0].guidance is not None or steps[0].stats


def test_upsampler_keeps_a_real_render_close_to_the_truth(registry):
    params = scenes.sample_params(np.random.default_rng(7), np.array([0, 4]))
    low = from_uint8((scenes.render(params, 32) * 255 + 0.5).astype(np.uint8))
    truth = from_uint8((scenes.render(params, 128) * 255 + 0.5).astype(np.uint8))
    final = run(Recipe(model=UP, sampler="ddim", respacing="5", batch_size=2), registry, low_res=low,
                labels=torch.tensor([0, 4]))
    assert final.x.shape == (2, 3, 128, 128)
    mse = float(((final.x - truth) / 2).pow(2).mean())
    assert 10 * np.log10(1 / mse) > 20  # an upsampling of the right picture (the card measures it properly)


def test_the_noisy_classifier_gradient_fades_with_the_signal(registry):
    """d/dx_t log p(y | x_t) of the true classifier vanishes like sqrt(abar_t); score-form guidance multiplies it by
    (1 - abar) / sqrt(abar), 2e4 at the cosine schedule's last timestep. The gated classifier's gradient there is a
    small fraction of its gradient where the class starts to show."""
    from explore.guidance import classifier_log_prob_and_grad
    from explore.schedules import Schedule
    labels = torch.arange(8)
    images, _ = scenes.render_batch(3, 8, 32, labels=labels.numpy())
    x0 = from_uint8(images)
    abar = Schedule.named("cosine", 1000).alphas_cumprod
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    norms = {}
    for t in (999, 960):
        x_t = float(abar[t]) ** 0.5 * x0 + float(1 - abar[t]) ** 0.5 * noise
        _, grad = classifier_log_prob_and_grad(registry.get(CLF).module, x_t, torch.full((8,), t), labels)
        norms[t] = float(grad.flatten(1).norm(dim=1).mean())
    assert norms[999] < 0.01 * norms[960], norms


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m"])
def test_classifier_guidance_from_the_unconditional_model_keeps_images_on_every_sampler(registry, sampler):
    """The blow-up this replaced: score-form guidance from t=999 left >90% of pixels saturated at scale 3."""
    from explore.metrics import saturated_fraction
    from explore.outputs import to_uint8
    recipe = Recipe(model=BASE, sampler=sampler, respacing="25", cfg_scale=0.0, classifier=CLF, classifier_scale=3.0,
                    batch_size=4, seed=0, class_label=0)
    assert saturated_fraction(to_uint8(run(recipe, registry).x)) < 0.15
