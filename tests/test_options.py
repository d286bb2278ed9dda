"""One definition per run option: a new option, declared once beside the sampler keyword that uses it, reaches
validation, the recipe JSON, the command line and its --help, the reproduce command, the UI form and the sampler
without any other edit."""
from dataclasses import dataclass, replace

import gradio as gr
import pytest
import torch

from explore.__main__ import help_text, recipe_from_command
from explore.engine import plan, run
from explore.recipe import Number, Recipe, RecipeError, Widget, option, options_of
from explore.samplers import SAMPLERS, sample_heun
from explore.ui.form import Form
from explore.ui.sampling import FIRST_INPUTS, Sampler
from explore.validate import InputError

import tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class WithSNoise(Recipe):
    """The Recipe plus Heun's s_noise (a keyword of sample_heun that the shipped Recipe does not expose)."""

    s_noise: float = option(1.0, Number(0.0, 2.0), "scale of the churn noise (S_noise)",
                            widget=Widget("slider", "S_noise", 0, 2, 0.05))


HEUN = dict(model="tiny_cond", class_label=1, sampler="heun", respacing="4", churn=40.0, seed=3, batch_size=2)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save_all(directory)
    return tiny_models.registry(directory)


def test_the_new_option_is_validated_and_round_trips_through_json():
    recipe = WithSNoise(**HEUN, s_noise=0.5)
    recipe.validate()
    assert WithSNoise.from_json(recipe.to_json()) == recipe
    with pytest.raises(RecipeError, match=r"^s_noise: 3.5 is outside the accepted range \[0, 2\]"):
        replace(recipe, s_noise=3.5).validate()
    with pytest.raises(RecipeError, match=r"^s_noise: 'x' is not a number"):
        replace(recipe, s_noise="x").validate()


def test_the_new_option_reaches_the_command_line_help_and_the_reproduce_command():
    recipe = WithSNoise(**HEUN, s_noise=0.5)
    command = recipe.cli_command()
    assert "--s_noise 0.5" in command
    assert recipe_from_command(command, WithSNoise) == recipe
    assert recipe_from_command(Recipe(**HEUN).cli_command(), WithSNoise) == WithSNoise(**HEUN)  # its default
    text = help_text(WithSNoise)
    assert "--s_noise" in text and "for heun (default 1)" in text
    assert "--s_noise" not in help_text(Recipe)


def test_the_new_option_is_passed_to_the_sampler_that_takes_it(registry):
    assert WithSNoise(**HEUN, s_noise=0.5).sampler_options() == {"churn": 40.0, "s_noise": 0.5, "clip_denoised": True,
                                                                 "dynamic_threshold": 0.0}
    assert "s_noise" not in replace(WithSNoise(**HEUN), sampler="euler_a").sampler_options()
    plain = run(Recipe(**HEUN), registry).x
    assert torch.equal(run(WithSNoise(**HEUN), registry).x, plain)  # its default is the sampler's own
    assert not torch.equal(run(WithSNoise(**HEUN, s_noise=0.2), registry).x, plain)
    assert plan(WithSNoise(**HEUN), registry).recipe.s_noise == 1.0


def test_the_new_option_appears_in_the_form_for_the_samplers_that_take_it(app_context):
    form = Form(app_context, WithSNoise)
    with gr.Blocks():
        form.widget("sampler", value="ddim")
        slider = form.widget("s_noise")
        form.widget("karras")
    assert isinstance(slider, gr.Slider) and slider.label == "S_noise" and slider.visible is False
    s_noise, karras = form.sampler_changed("heun")  # the sampler's options, then Karras
    assert s_noise["visible"] is True and s_noise["value"] == 1.0 and karras["interactive"] is True
    values = {"model": "scenes32_base", "class_label": "forest", "sampler": "heun", "respacing": "5",
              "s_noise": "0.25", "churn": 3}
    assert form.recipe(values).s_noise == 0.25
    assert form.recipe({**values, "sampler": "ddim"}).s_noise == 1.0  # does not apply: its default
    with pytest.raises(InputError, match=r"^s_noise: 9.0 is outside"):
        form.recipe({**values, "s_noise": 9})


def test_every_sampler_keyword_that_is_a_recipe_field_is_passed():
    """The shipped recipe's sampler options are exactly the samplers' keywords it declares."""
    takes = {name for sampler in SAMPLERS.values() for name in sampler.__kwdefaults__}
    assert set(Recipe(model="m").sampler_options()) <= takes
    assert {"eta", "churn", "clip_denoised"} <= set(options_of(Recipe)) & takes
    assert "s_noise" in sample_heun.__kwdefaults__ and "s_noise" not in options_of(Recipe)
    # the Live sampling API keeps its first parameters in place and takes every option the page shows
    assert Sampler.INPUTS[:len(FIRST_INPUTS)] == FIRST_INPUTS
    assert {name for name, opt in options_of(Recipe).items() if opt.widget} <= set(Sampler.INPUTS)
