"""The engine: recipes (validation, JSON, command lines), plans on tiny random models, guidance equivalences,
precision, batch independence and noise replay."""
import math

from dataclasses import replace

import pytest
import torch

from explore.__main__ import recipe_from_command
from explore.denoisers import ADMDenoiser, Cond
from explore.engine import FixedBatch, Recipe, RecipeError, SeededStepNoise, plan, run
from explore.noise import PerImageNoise, RecordedNoise, Recorder
from explore.outputs import to_uint8
from explore.samplers import SAMPLERS, Grid

import floors
import tiny_models
from tiny_models import CLASSES, SIZE, SMALL

SHAPE = (3, SIZE, SIZE)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save_all(directory)
    return tiny_models.registry(directory)


def final(recipe, registry, **kwargs):
    return run(recipe, registry, **kwargs).x


def psnr(a, b):
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4 / mse)


# --- recipes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("model", ""), ("class_label", -1), ("class_label", 1.5), ("sampler", "plms"), ("respacing", "ddim999"),
    ("respacing", "ten"), ("respacing", 10), ("cfg_scale", float("nan")), ("cfg_scale", -1.0),
    ("classifier_scale", float("inf")), ("eta", 1.5), ("churn", -1.0), ("guidance_method", "both"),
    ("seed", -1), ("seed", 2 ** 63), ("seed", True), ("batch_size", 0), ("batch_size", 2.0),
    ("clip_denoised", "yes"), ("precision", "fp8"), ("karras", 1), ("classifier", ""), ("uncond_model", 3),
])
def test_validate_names_the_field(field, value):
    with pytest.raises(RecipeError) as err:
        Recipe(**{"model": "m", field: value}).validate()
    assert str(err.value).startswith(f"{field}: "), str(err.value)


def test_karras_is_refused_for_ddpm_by_name():
    with pytest.raises(RecipeError, match="^karras: "):
        Recipe(model="m", sampler="ddim", karras=True).validate()
    Recipe(model="m", sampler="heun", karras=True).validate()


RECIPES = [
    Recipe(model="tiny_cond"),
    Recipe(model="checkpoints/my model.safetensors", class_label=3, sampler="ddim", respacing="ddim25",
           cfg_scale=1 / 3, eta=0.25, seed=123456789012, batch_size=5, clip_denoised=False, precision="bf16"),
    Recipe(model="a", classifier="clf", classifier_scale=2.5e-3, guidance_method="conflict", sampler="euler_a",
           karras=True, respacing="10,15,20", uncond_model="u", cfg_scale=7.0, eta=1.0),
    Recipe(model="a", sampler="heun", churn=0.1 + 0.2, respacing="", eta=0.3, precision="fp16"),
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_json_round_trip(recipe):
    text = recipe.to_json()
    assert Recipe.from_json(text) == recipe
    assert Recipe.from_json(text).to_json() == text


def test_from_json_rejects_what_it_cannot_use():
    with pytest.raises(RecipeError, match="unknown recipe fields"):
        Recipe.from_json('{"model": "m", "steps": 3}')
    with pytest.raises(RecipeError, match="^recipe: "):
        Recipe.from_json("[1, 2]")
    with pytest.raises(RecipeError, match="^recipe: "):
        Recipe.from_json("{not json")
    with pytest.raises(RecipeError, match="^model: "):
        Recipe.from_json('{"seed": 1}')


@pytest.mark.parametrize("recipe", RECIPES)
def test_cli_command_parses_back_to_the_same_recipe(recipe):
    assert recipe_from_command(recipe.cli_command()) == recipe
    flags = {"image_size": 32, "num_channels": 32, "learn_sigma": True}
    command = recipe.cli_command("out", model_flags=flags)
    assert "--image_size 32 --num_channels 32 --learn_sigma True" in command
    assert recipe_from_command(command) == recipe


# --- plans on tiny models ------------------------------------------------------------------------

def test_two_model_cfg_is_the_formula(registry):
    scale = 3.0
    recipe = Recipe(model="tiny_cond", uncond_model="tiny_uncond", cfg_scale=scale, class_label=2, batch_size=2)
    the_plan = plan(recipe, registry)
    x, t = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 400])
    labels = torch.tensor([2, 2])
    with torch.no_grad():
        pred = the_plan.denoiser(x, t, the_plan.cond)
        # each network sees one row per image, evaluated a row at a time (batch-invariant)
        out_c = torch.cat([registry.get("tiny_cond").module(x[i:i + 1], t[i:i + 1], y=labels[i:i + 1])
                           for i in range(2)])
        out_u = torch.cat([registry.get("tiny_uncond").module(x[i:i + 1], t[i:i + 1]) for i in range(2)])
    eps_c, eps_u = out_c[:, :3], out_u[:, :3]
    # the networks saw the same rows in the same calls, so only the formula's rounding may differ: a few ulps of
    # its largest term
    atol = floors.FACTOR * max(floors.ulp_floor(eps_u), floors.ulp_floor(scale * (eps_c - eps_u)))
    torch.testing.assert_close(pred.eps, eps_u + scale * (eps_c - eps_u), atol=atol, rtol=0)
    torch.testing.assert_close(pred.var_values, out_c[:, 3:], atol=0, rtol=0)  # the conditional model's variance
    assert (pred.eps - eps_c).abs().max() > 1e-2  # the guidance does something


def _sample_directly(registry, name, labels, sampler="ddpm", seed=0, respacing="10"):
    """The sampler driven by hand with the conditional model's adapter (no engine)."""
    loaded = registry.get(name)
    # the engine's batch-invariant evaluation on CPU: one row per call
    denoiser = ADMDenoiser(FixedBatch(loaded.module, 1), learn_sigma=True, class_cond=True)
    noise = PerImageNoise.from_seed(seed, len(labels), SHAPE)
    grid = Grid.make(loaded.diffusion.noise_schedule, respacing)
    with torch.no_grad():
        return list(SAMPLERS[sampler](denoiser, noise.initial(), grid, Cond(labels=labels), noise))[-1].x


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cfg_scale_one_is_the_conditional_model_and_zero_the_null_class(registry, sampler):
    base = dict(model="tiny_cond", class_label=1, sampler=sampler, respacing="10", seed=4, batch_size=2)
    labels = torch.tensor([1, 1])
    direct = _sample_directly(registry, "tiny_cond", labels, sampler, seed=4)
    torch.testing.assert_close(final(Recipe(**base, cfg_scale=1.0), registry), direct, atol=0, rtol=0)
    null = registry.get("tiny_cond").null_class
    unconditional = _sample_directly(registry, "tiny_cond", torch.full((2,), null), sampler, seed=4)
    torch.testing.assert_close(final(Recipe(**base, cfg_scale=0.0), registry), unconditional, atol=0, rtol=0)
    assert (direct - unconditional).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler"])
def test_classifier_guidance_at_scale_zero_is_no_classifier(registry, sampler):
    base = dict(model="tiny_cond", class_label=3, sampler=sampler, respacing="10", seed=9, batch_size=2)
    plain = final(Recipe(**base), registry)
    zero = run(Recipe(**base, classifier="tiny_classifier", classifier_scale=0.0), registry)
    assert torch.equal(zero.x, plain)
    assert (to_uint8(zero.x) == to_uint8(plain)).all()
    assert "log_prob" in zero.stats  # the classifier still reports, without steering
    guided = final(Recipe(**base, classifier="tiny_classifier", classifier_scale=2.0), registry)
    assert not torch.equal(guided, plain)


def test_unconditional_model_with_a_classifier_draws_labels_for_the_classifier(registry):
    recipe = Recipe(model="tiny_uncond", classifier="tiny_classifier", classifier_scale=1.0, class_label=2,
                    respacing="4", batch_size=2)
    the_plan = plan(recipe, registry)
    assert the_plan.cond.labels.tolist() == [2, 2]
    assert the_plan.denoiser.inner.class_cond is False  # the diffusion model itself gets no label
    with pytest.raises(RecipeError, match="^class_label: 'tiny_uncond' is unconditional"):
        plan(Recipe(model="tiny_uncond", class_label=2), registry)


# bf16 keeps 8 mantissa bits: ~30 dB on this random cosine model, whose first step amplifies eps errors
# by sqrt(1/abar - 1) ~ 2e4 before clipping; fp16 keeps 11 bits and ranges that fit this small model.
@pytest.mark.parametrize("precision,min_psnr", [("bf16", 25), ("fp16", 50)])
def test_reduced_precision_runs_on_cpu_and_stays_close(registry, precision, min_psnr):
    base = dict(model="tiny_cond", class_label=0, sampler="ddim", respacing="10", seed=2, batch_size=2)
    reference = final(Recipe(**base), registry)
    reduced = final(Recipe(**base, precision=precision), registry)
    value = psnr(reduced, reference)
    print(f"{precision} autocast on CPU vs fp32: PSNR {value:.1f} dB, max abs diff "
          f"{(reduced - reference).abs().max().item():.3g}")
    assert reduced.dtype == torch.float32 and torch.isfinite(reduced).all()
    assert 0 < (reduced - reference).abs().max()  # the reduced path really ran
    assert value > min_psnr


def test_bf16_on_cpu_runs_a_cached_bf16_torso_copy_and_leaves_the_shared_model_alone(registry):
    entry = registry.get("tiny_cond")
    recipe = Recipe(model="tiny_cond", class_label=1, sampler="ddim", respacing="4", seed=3, batch_size=3,
                    precision="bf16", cfg_scale=2.0)
    first = final(recipe, registry)
    torso = entry.torso_in(torch.bfloat16)
    assert torso is not entry.module and entry.torso_in(torch.bfloat16) is torso
    assert entry.module.input_blocks[0][0].weight.dtype == torch.float32  # the shared fp32 model is untouched
    assert torso.input_blocks[0][0].weight.dtype == torch.bfloat16 and torso.out[-1].weight.dtype == torch.float32
    assert torso.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
    one = final(replace(recipe, batch_size=1, seed=5), registry)
    assert torch.equal(first[2:], one)  # still batch-invariant


def test_bf16_classifier_guidance_on_cpu_uses_the_classifiers_bf16_torso(registry):
    base = dict(model="tiny_cond", class_label=2, sampler="ddpm", respacing="6", seed=8, batch_size=2,
                classifier="tiny_classifier", classifier_scale=2.0)
    clf = registry.get("tiny_classifier")
    clf._variants.clear()
    reduced = run(Recipe(**base, precision="bf16"), registry)
    assert torch.bfloat16 in clf._variants  # the run made (and cached) the bf16 copy
    torso = clf.torso_in(torch.bfloat16)
    assert torso is not clf.module and clf.module.input_blocks[0][0].weight.dtype == torch.float32
    reference = run(Recipe(**base), registry)
    assert torch.isfinite(reduced.x).all() and 0 < (reduced.x - reference.x).abs().max()
    # the guidance still steers: log p(y | x_t) of the guided bf16 run matches the fp32 run's closely
    torch.testing.assert_close(reduced.stats["log_prob"], reference.stats["log_prob"], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a"])
def test_image_i_is_seed_plus_i_bit_for_bit_whatever_the_batch(registry, sampler):
    """CPU kernels sum in another order for 1 row than for 2-5 or 6+, so the networks run in fixed chunks."""
    base = dict(model="tiny_cond", sampler=sampler, respacing="4", classifier="tiny_classifier",
                classifier_scale=1.0)  # and a class per image drawn from its seed
    big = run(Recipe(**base, seed=20, batch_size=7), registry).x
    for seed, batch in [(21, 1), (22, 3)]:
        small = run(Recipe(**base, seed=seed, batch_size=batch), registry).x
        assert torch.equal(big[seed - 20:seed - 20 + batch], small)
    labels = plan(Recipe(**base, seed=20, batch_size=7), registry).cond.labels
    assert labels[2:5].tolist() == plan(Recipe(**base, seed=22, batch_size=3), registry).cond.labels.tolist()


def test_fixed_batch_evaluation_is_the_plain_evaluation_per_image(registry):
    """Chunked evaluation of the networks gives each row what the network gives it alone, gradients included."""
    net = registry.get("tiny_cond").module
    x, t = torch.randn(5, *SHAPE), torch.tensor([999, 700, 400, 100, 0])
    y = torch.tensor([0, 1, 2, 0, 1])
    chunked = FixedBatch(net, 2)(x, t, y=y)
    for i in range(5):  # a chunk of 2 rows against 1 row: another summation order of the same forward
        atol = floors.tolerance(lambda: net(x[i:i + 1], t[i:i + 1], y=y[i:i + 1]))
        torch.testing.assert_close(chunked[i:i + 1], net(x[i:i + 1], t[i:i + 1], y=y[i:i + 1]), atol=atol, rtol=0)
    clf = registry.get("tiny_classifier").module
    x_in = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(FixedBatch(clf, 2)(x_in, t).logsumexp(-1).sum(), x_in)[0]

    def plain_grad():
        x_ref = x.clone().requires_grad_(True)
        return torch.autograd.grad(clf(x_ref, t).logsumexp(-1).sum(), x_ref)[0]
    torch.testing.assert_close(grad, plain_grad(), atol=floors.tolerance(plain_grad), rtol=0)
    assert plan(Recipe(model="tiny_cond"), registry).eval_batch == 1  # on by default on CPU, a row per image
    assert plan(Recipe(model="tiny_cond", cfg_scale=3.0), registry).eval_batch == 2  # [cond, uncond] together
    assert plan(Recipe(model="tiny_cond"), registry, batch_invariant=False).eval_batch is None


def test_recorded_noise_replays_with_another_guidance_scale(registry):
    base = dict(model="tiny_cond", class_label=1, sampler="ddpm", respacing="8", seed=6, batch_size=2)
    recorder = Recorder(PerImageNoise.from_seed(6, 2, SHAPE))
    first = final(Recipe(**base, cfg_scale=2.0), registry, noise=recorder)
    replay = recorder.replay()
    assert torch.equal(final(Recipe(**base, cfg_scale=2.0), registry, noise=replay), first)

    # the same x_T and per-step noise under another scale: what a fresh run at that scale with this seed draws
    seen = Recorder(recorder.replay())
    other = final(Recipe(**base, cfg_scale=4.0), registry, noise=seen)
    assert torch.equal(seen.x_T, recorder.x_T)
    assert all(torch.equal(a, b) for a, b in zip(seen.steps, recorder.steps)) and len(seen.steps) == 8
    assert torch.equal(other, final(Recipe(**base, cfg_scale=4.0), registry))
    assert not torch.equal(other, first)


def test_x_T_alone_takes_the_per_step_noise_from_the_seeds(registry):
    recipe = Recipe(model="tiny_cond", class_label=1, sampler="ddpm", respacing="6", seed=30, batch_size=2)
    x_T = PerImageNoise.from_seed(30, 2, SHAPE).initial()
    assert torch.equal(final(recipe, registry, noise=SeededStepNoise(x_T, 30)), final(recipe, registry))
    with pytest.raises(ValueError, match="recorded noise has 0 steps"):
        final(recipe, registry, noise=RecordedNoise(x_T))


def test_given_labels_may_be_the_null_class(registry):
    null = registry.get("tiny_cond").null_class
    the_plan = plan(Recipe(model="tiny_cond", respacing="4", batch_size=2), registry, labels=torch.tensor([null, 0]))
    assert the_plan.cond.labels.tolist() == [null, 0]
    with pytest.raises(RecipeError, match=r"^class_label: 4 is outside \[0, 3\]"):  # a recipe's class is a real one
        plan(Recipe(model="tiny_cond", class_label=null), registry)


def test_superres_plan_feeds_low_res_and_labels(registry):
    low = torch.rand(2, 3, SMALL, SMALL) * 2 - 1
    recipe = Recipe(model="tiny_sr", sampler="ddim", respacing="4", batch_size=2)
    the_plan = plan(recipe, registry, low_res=low, labels=torch.tensor([0, 3]))
    assert the_plan.shape == (3, SIZE, SIZE) and torch.equal(the_plan.cond.low_res, low)
    assert list(the_plan.steps())[-1].x.shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("recipe,kwargs,message", [
    (Recipe(model="tiny_sr", respacing="4"), {}, "^low_res: a super-resolution model needs"),
    (Recipe(model="tiny_cond", respacing="4"), {"low_res": torch.zeros(1, 3, 8, 8)}, "^low_res: 'tiny_cond' is not"),
    (Recipe(model="tiny_sr", respacing="4", batch_size=2), {"low_res": torch.zeros(1, 3, 8, 8)}, "^low_res: expected"),
    (Recipe(model="tiny_cond", respacing="4"), {"labels": torch.tensor([CLASSES + 1])},
     r"^labels: \[5\] are not all in \[0, 4\] \(4 is the null class\)"),
    (Recipe(model="tiny_cond", respacing="4", batch_size=2), {"labels": torch.tensor([1])}, "^labels: expected 2"),
    (Recipe(model="tiny_cond", class_label=CLASSES), {}, r"^class_label: 4 is outside \[0, 3\]"),
    (Recipe(model="tiny_uncond", cfg_scale=3.0), {}, "^cfg_scale: 'tiny_uncond' is unconditional"),
    (Recipe(model="tiny_cond", cfg_scale=3.0, uncond_model="tiny_cond"), {}, "^uncond_model: "),
    (Recipe(model="tiny_cond", classifier="tiny_cond"), {}, "^classifier: 'tiny_cond' is a diffusion"),
    (Recipe(model="tiny_classifier"), {}, "^model: 'tiny_classifier' is a classifier"),
    (Recipe(model="tiny_cond", classifier_scale=1.0), {}, "^classifier_scale: no classifier"),
    (Recipe(model="tiny_cond"), {"noise": RecordedNoise(torch.zeros(1, 3, 8, 8))}, r"^noise: x_T has shape \[1, 3, 8, 8\]"),
])
def test_plan_errors_name_the_problem(registry, recipe, kwargs, message):
    with pytest.raises(RecipeError, match=message):
        plan(recipe, registry, **kwargs)


def test_unknown_model_names_what_is_available(registry):
    with pytest.raises(KeyError, match="unknown model 'nope'; available in .*tiny_classifier, tiny_cond"):
        plan(Recipe(model="nope"), registry)
    with pytest.raises(KeyError, match="model file missing/x.pt does not exist"):
        plan(Recipe(model="missing/x.pt"), registry)


def test_steps_do_not_leak_no_grad_and_stop_on_request(registry):
    the_plan = plan(Recipe(model="tiny_cond", class_label=0, respacing="6"), registry)
    seen = []
    for step in the_plan.steps(should_stop=lambda: len(seen) >= 3):
        seen.append(step.index)
        assert torch.is_grad_enabled()  # no_grad holds inside the iterator only
        assert not step.x.requires_grad
    assert seen == [0, 1, 2]
