"""Guidance over an interval of timesteps, CFG rescale and dynamic thresholding: equivalences with the plain runs
they reduce to, and closed forms."""
from dataclasses import replace

import pytest
import torch

from explore.engine import Recipe, RecipeError, iterate, run
from explore.guidance import dynamic_thresholded, rescaled

import tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(model="tiny_cond", class_label=2, respacing="6", seed=11, batch_size=3)
GUIDED = [dict(cfg_scale=3.0), dict(classifier="tiny_classifier", classifier_scale=2.0),
          dict(cfg_scale=2.0, classifier="tiny_classifier", classifier_scale=1.0)]
UNGUIDED = dict(cfg_scale=1.0, classifier=None, classifier_scale=0.0)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save_all(directory)
    return tiny_models.registry(directory)


@pytest.mark.parametrize("guidance", GUIDED, ids=["cfg", "classifier", "both"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_an_interval_holding_every_step_is_guidance_everywhere_and_one_holding_none_is_no_guidance(
        registry, guidance, sampler):
    recipe = Recipe(**BASE, sampler=sampler, **guidance)
    everywhere = run(replace(recipe, guidance_interval="0,999"), registry).x
    assert torch.equal(everywhere, run(recipe, registry).x)
    nowhere = run(replace(recipe, guidance_interval="1000,2000"), registry).x
    assert torch.equal(nowhere, run(replace(recipe, **UNGUIDED), registry).x)
    assert not torch.equal(everywhere, nowhere)


def test_guidance_acts_only_inside_the_interval(registry):
    recipe = Recipe(**BASE, sampler="ddim", cfg_scale=3.0, guidance_interval="300,700")
    steps = list(iterate(recipe, registry))
    inside = [300 <= s.timestep <= 700 for s in steps]
    assert any(inside) and not all(inside)
    assert [("cfg_delta_norm" in s.stats) for s in steps] == inside
    plain = list(iterate(replace(recipe, guidance_interval=""), registry))
    first_inside = inside.index(True)
    for a, b in zip(steps[:first_inside], plain[:first_inside]):  # before the interval: the unguided model
        assert not torch.equal(a.x, b.x)
    unguided = list(iterate(replace(recipe, **UNGUIDED), registry))
    assert torch.equal(steps[first_inside - 1].x, unguided[first_inside - 1].x)


@pytest.mark.parametrize("text", ["x", "800,200", "1,2,3", "-1,5", "nan,5"])
def test_bad_intervals_are_refused_naming_the_field(text):
    with pytest.raises(RecipeError, match=r"^guidance_interval: .*'low,high' timesteps"):
        Recipe(**BASE, guidance_interval=text).validate()


def test_cfg_rescale_zero_is_plain_cfg_and_one_matches_the_conditional_spread(registry):
    recipe = Recipe(**BASE, sampler="ddim", cfg_scale=4.0)
    assert torch.equal(run(replace(recipe, cfg_rescale=0.0), registry).x, run(recipe, registry).x)
    assert not torch.equal(run(replace(recipe, cfg_rescale=0.7), registry).x, run(recipe, registry).x)
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(4, 3, 8, 8, generator=generator)
    guided = 3.0 * cond + 0.5 * torch.randn(4, 3, 8, 8, generator=generator)
    full = rescaled(guided, cond, 1.0)
    torch.testing.assert_close(full.flatten(1).std(1), cond.flatten(1).std(1))
    torch.testing.assert_close(rescaled(guided, cond, 0.25), 0.25 * full + 0.75 * guided)
    assert torch.equal(rescaled(guided, cond, 0.0), guided)


def test_dynamic_thresholding_clamps_at_the_percentile_and_rescales():
    x = torch.stack([torch.linspace(-4.0, 4.0, 3 * 8 * 8).view(3, 8, 8), torch.linspace(-0.5, 0.5, 3 * 8 * 8).view(3, 8, 8)])
    out = dynamic_thresholded(x, 0.9)
    s = torch.quantile(x[0].abs().flatten(), 0.9)  # 3.6: the first image is clamped there and divided by it
    torch.testing.assert_close(out[0], x[0].clamp(-s, s) / s, atol=0, rtol=0)
    assert out[0].abs().max() == 1.0 and (out[0].abs() == 1.0).float().mean() >= 0.09
    assert torch.equal(out[1], x[1])  # the threshold is at least 1: an image inside [-1, 1] is left alone


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m"])
def test_dynamic_thresholding_keeps_guided_predictions_inside_the_image_range(registry, sampler):
    recipe = Recipe(**BASE, sampler=sampler, cfg_scale=8.0, classifier="tiny_classifier", classifier_scale=50.0,
                    clip_denoised=False)
    wild = max(float(s.pred_x0.abs().max()) for s in iterate(recipe, registry))
    guarded = list(iterate(replace(recipe, dynamic_threshold=0.99), registry))
    assert wild > 1.0
    assert all(float(s.pred_x0.abs().max()) <= 1.0 + 1e-6 for s in guarded)
    assert torch.equal(run(replace(recipe, dynamic_threshold=0.0), registry).x, run(recipe, registry).x)
