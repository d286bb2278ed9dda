"""Guidance over an interval of timesteps and CFG rescale: equivalences with the plain runs they reduce to."""
from dataclasses import replace

import pytest
import torch

from explore.engine import Recipe, RecipeError, iterate, run
from explore.guidance import rescaled

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
