"""Property tests: the respacing parser and the input validators accept exactly what they promise and refuse
everything else with their own error, naming the field, never another exception and never a clipped value."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from explore import validate
from explore.engine import Recipe, RecipeError
from explore.schedules import RespacingError, space_timesteps
from explore.validate import CPU_CAPS, GPU_CAPS, LIMITS, InputError, caps_for

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10 ** 40, 10 ** 40),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                     st.lists(st.integers(), max_size=3), st.binary(max_size=8), st.complex_numbers())
SPEC_CHARS = st.sampled_from(list("0123456789,ddim ") + ["ddim", ",", "-", ".", "e", "x", "٣", "\n", "\0"])


def check_kept(kept, steps):
    assert kept == sorted(set(kept)), "sorted and unique"
    assert all(isinstance(t, int) and 0 <= t < steps for t in kept)


# --- respacing ----------------------------------------------------------------------------------

@FAST
@given(steps=st.integers(1, 4000), counts=st.lists(st.integers(-3, 4200), min_size=1, max_size=12),
       spaces=st.booleans())
@example(steps=1000, counts=[600, 600], spaces=False)
@example(steps=1000, counts=[1001], spaces=False)
@example(steps=1000, counts=[0], spaces=False)
@example(steps=1000, counts=[10, 15, 20], spaces=True)
def test_section_specs_give_exactly_the_requested_counts(steps, counts, spaces):
    spec = (", " if spaces else ",").join(map(str, counts))
    try:
        kept = space_timesteps(steps, spec)
    except RespacingError:
        sizes = [steps // len(counts) + (i < steps % len(counts)) for i in range(len(counts))]
        assert len(counts) > steps or any(not 1 <= c <= size for c, size in zip(counts, sizes))
        return
    check_kept(kept, steps)
    assert len(kept) == sum(counts)


@FAST
@given(steps=st.integers(1, 4000), count=st.integers(0, 5000))
@example(steps=1000, count=0)
@example(steps=1000, count=999)
@example(steps=1000, count=25)
def test_ddim_specs_give_exactly_the_requested_count(steps, count):
    try:
        kept = space_timesteps(steps, f"ddim{count}")
    except RespacingError as err:
        assert not any(len(range(0, steps, stride)) == count for stride in range(1, steps))
        assert "cannot create exactly" in str(err)
        return
    check_kept(kept, steps)
    assert len(kept) == count and kept[0] == 0 and len({b - a for a, b in zip(kept, kept[1:])}) <= 1


@FAST
@given(spec=st.one_of(st.text(max_size=30), st.lists(SPEC_CHARS, max_size=12).map("".join)),
       steps=st.sampled_from([1, 10, 1000, 4000]))
@example(spec="", steps=1000)
@example(spec="ddim", steps=1000)
@example(spec="99999999999", steps=1000)
@example(spec="1" * 5000, steps=1000)
@example(spec="ddim1000", steps=1000)
def test_any_text_is_parsed_or_refused_with_a_respacing_error(spec, steps):
    try:
        kept = space_timesteps(steps, spec)
    except RespacingError as err:
        assert str(err)
        return
    check_kept(kept, steps)
    assert 1 <= len(kept) <= steps


@pytest.mark.parametrize("spec", [None, 3, 2.5, ["1", "2"], [True], {"a": 1}, b"10"])
def test_specs_that_are_not_text_are_refused_by_the_parser(spec):
    with pytest.raises(RespacingError):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("spec,message", [
    ("ddim999", "nearest that work: ddim500 or ddim1000"),
    ("1001", r"accepted: 1..1000 steps in that section"),
    ("600,600", r"accepted: 1..500 steps"),
    ("99999999999", r"far more than the 1000 the model has \(accepted: 1..1000\)"),
    ("1," * 2500, "too long"),
])
def test_respacing_messages_name_what_is_accepted(spec, message):
    with pytest.raises(RespacingError, match=message):
        space_timesteps(1000, spec)


def test_steps_cap_suits_the_device():
    assert caps_for("cpu") == CPU_CAPS and caps_for("cuda") == GPU_CAPS and caps_for(None) == CPU_CAPS
    for field in ("batch", "steps", "pixels", "upload_bytes", "npz_images", "image_side"):
        assert getattr(CPU_CAPS, field) <= getattr(GPU_CAPS, field) <= getattr(LIMITS, field), field
    assert CPU_CAPS.batch < GPU_CAPS.batch and CPU_CAPS.pixels < GPU_CAPS.pixels
    assert validate.respacing("", 1000, 1000) == list(range(1000))  # empty: every step, as the original
    with pytest.raises(InputError, match=r"^respacing: '' \(every step\) gives 1000 steps; at most 500"):
        validate.respacing("", 1000, 500)
    with pytest.raises(InputError, match=r"^respacing: '800' gives 800 steps; at most 500 .*accepted: 1..500"):
        validate.respacing("800", 1000, 500)


# --- validators ---------------------------------------------------------------------------------

@FAST
@given(value=ANYTHING, low=st.floats(-1e6, 1e6), span=st.floats(0, 1e6))
@example(value=float("nan"), low=0.0, span=100.0)
@example(value=float("inf"), low=0.0, span=100.0)
@example(value=-1.0, low=0.0, span=100.0)
@example(value=1e308, low=0.0, span=100.0)
@example(value=10 ** 400, low=0.0, span=100.0)
@example(value=" 2.5 ", low=0.0, span=100.0)
@example(value="nan", low=0.0, span=100.0)
def test_number_returns_the_value_itself_or_names_the_field(value, low, span):
    high = low + span
    try:
        out = validate.number("cfg_scale", value, low, high)
    except InputError as err:
        assert str(err).startswith("cfg_scale: ") and f"[{low:g}, {high:g}]" in str(err)
        return
    assert isinstance(out, float) and math.isfinite(out) and low <= out <= high
    assert out == (float(value.strip()) if isinstance(value, str) else value)  # never clipped or rounded
    assert not isinstance(value, bool)


@FAST
@given(value=ANYTHING, low=st.integers(-10 ** 6, 10 ** 6), span=st.integers(0, 10 ** 20))
@example(value=2.5, low=0, span=10)
@example(value=3.0, low=0, span=10)
@example(value="3", low=0, span=10)
@example(value=True, low=0, span=10)
@example(value=2 ** 63, low=0, span=validate.MAX_SEED)
def test_whole_returns_the_value_itself_or_names_the_field(value, low, span):
    high = low + span
    try:
        out = validate.whole("seed", value, low, high)
    except InputError as err:
        assert str(err).startswith("seed: ") and f"[{low}, {high}]" in str(err)
        return
    assert type(out) is int and low <= out <= high
    if isinstance(value, str):
        assert out == float(value.strip())
    else:
        assert out == value and not isinstance(value, bool)


@FAST
@given(value=ANYTHING, names=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=10, unique=True))
def test_class_label_is_a_known_name_or_index(value, names):
    try:
        index = validate.class_label("class", value, names)
    except InputError as err:
        assert str(err).startswith("class: unknown class") and f"[0, {len(names) - 1}]" in str(err)
        return
    assert 0 <= index < len(names)
    if isinstance(value, str) and value in names:
        assert names[index] == value
    else:
        assert index == validate.whole("x", value, 0, len(names) - 1)


@pytest.mark.parametrize("value,expected", [("forest", 3), (3, 3), ("3", 3), (3.0, 3)])
def test_class_label_examples(value, expected):
    assert validate.class_label("class", value, ["alpine", "desert", "ocean", "forest"]) == expected


@pytest.mark.parametrize("value", ["moon", 4, -1, 2.5, None, float("nan"), "", True])
def test_unknown_classes_list_what_is_accepted(value):
    with pytest.raises(InputError, match=r"^class: unknown class .*accepted: alpine, desert, ocean, forest"):
        validate.class_label("class", value, ["alpine", "desert", "ocean", "forest"])


# --- the recipe ---------------------------------------------------------------------------------

RECIPE_VALUES = {
    "class_label": st.one_of(st.none(), ANYTHING), "sampler": st.one_of(st.sampled_from(["ddim", "heun"]), ANYTHING),
    "respacing": st.one_of(st.sampled_from(["5", "ddim25", "", "1001", "ddim0", "600,600", "10,15,20"]), ANYTHING),
    "karras": st.one_of(st.booleans(), ANYTHING), "cfg_scale": ANYTHING, "classifier_scale": ANYTHING,
    "eta": st.one_of(st.none(), ANYTHING), "churn": ANYTHING, "seed": ANYTHING, "batch_size": ANYTHING,
    "guidance_method": st.one_of(st.just("standard"), ANYTHING), "precision": st.one_of(st.just("fp32"), ANYTHING),
}
NAMES = {f.name for f in fields(Recipe)}


@FAST
@given(st.fixed_dictionaries({}, optional=RECIPE_VALUES), st.sampled_from([CPU_CAPS, GPU_CAPS, LIMITS]))
def test_recipe_validate_raises_only_recipe_errors_naming_a_field(values, caps):
    recipe = Recipe(model="m", **values)
    try:
        recipe.validate(caps)
    except RecipeError as err:
        assert str(err).split(":")[0] in NAMES, str(err)
        return
    assert recipe.batch_size <= caps.batch and len(space_timesteps(1000, recipe.respacing)) <= caps.steps
    for name in ("cfg_scale", "classifier_scale", "churn"):
        assert math.isfinite(getattr(recipe, name)) and getattr(recipe, name) >= 0
    assert 0 <= recipe.seed <= validate.MAX_SEED


@pytest.mark.parametrize("field,value,message", [
    ("cfg_scale", float("nan"), r"cfg_scale: nan is outside the accepted range \[0, 100\]"),
    ("cfg_scale", 1e300, r"cfg_scale: 1e\+300 is outside the accepted range \[0, 100\]"),
    ("classifier_scale", -0.5, r"classifier_scale: -0.5 is outside the accepted range \[0, 1000\]"),
    ("churn", float("-inf"), "churn: -inf is outside"),
    ("seed", 2 ** 64, r"seed: 18446744073709551616 is outside the accepted range \[0, 9223372036854765807\]"),
    ("batch_size", 17, r"batch_size: 17 is outside the accepted range \[1, 16\]"),
    ("respacing", "ddim0", "respacing: cannot create exactly 0 steps"),
    ("respacing", "1001", "respacing: cannot divide section of 1000 steps into 1001"),
    ("class_label", 10 ** 9, r"class_label: 1000000000 is outside the accepted range \[0, 100000\]"),
])
def test_recipe_messages_on_the_cpu_server(field, value, message):
    with pytest.raises(RecipeError, match="^" + message):
        Recipe(model="m", **{field: value}).validate(CPU_CAPS)


def test_caps_differ_by_device():
    recipe = Recipe(model="m", batch_size=32, respacing="ddim25")
    with pytest.raises(RecipeError, match=r"batch_size: 32 .*\[1, 16\]"):
        recipe.validate(CPU_CAPS)
    recipe.validate(GPU_CAPS)
    recipe.validate()  # the command line's limits


def test_registry_caps_apply_in_plan(tmp_path):
    import tiny_models
    from explore.engine import plan
    tiny_models.save_all(tmp_path)
    registry = tiny_models.registry(tmp_path)
    registry.caps = CPU_CAPS
    with pytest.raises(RecipeError, match=r"^batch_size: 17 is outside the accepted range \[1, 16\]"):
        plan(Recipe(model="tiny_cond", respacing="2", batch_size=17), registry)
    registry.caps = GPU_CAPS
    assert plan(Recipe(model="tiny_cond", respacing="2", batch_size=17), registry).recipe.batch_size == 17


# --- the command line ---------------------------------------------------------------------------

ADM32 = "tests/fixtures/adm32.pt"
ADM32_FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 2 --attention_resolutions 16 "
               "--channel_mult 1,2 --learn_sigma True --resblock_updown True --use_scale_shift_norm True").split()


@pytest.mark.parametrize("extra,expected", [
    (["--timestep_respacing", "99999999999"], "--timestep_respacing: respacing '99999999999': 99999999999 steps is "
                                              "far more than the 1000 the model has (accepted: 1..1000)"),
    (["--timestep_respacing", "ddim999"], "the nearest that work: ddim500 or ddim1000"),
    (["--timestep_respacing", "600,600"], "cannot divide section of 500 steps into 600 (accepted: 1..500"),
    (["--num_samples", "5000", "--batch_size", "5000"], "--batch_size: 5000 is outside the accepted range [1, 4096]"),
    (["--seed", str(2 ** 64)], "--seed: 18446744073709551616 is outside the accepted range [0, "),
    (["--cfg_scale", "1e999"], "--cfg_scale: inf is outside the accepted range [0, 100]"),
    (["--churn", "-1", "--sampler", "heun"], "--churn: -1.0 is outside the accepted range [0, 1000]"),
])
def test_command_line_names_the_flag_and_the_range(tmp_path, capsys, extra, expected):
    from explore.__main__ import main
    code = main(["sample", "--model_path", ADM32, *ADM32_FLAGS, "--timestep_respacing", "2", "--num_samples", "1",
                 *extra, "--out_dir", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not list(tmp_path.iterdir())


def test_command_line_reads_image_folders_through_the_safe_reader(tmp_path):
    from PIL import Image

    from explore.__main__ import CLIError, read_base_samples
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(folder / "a.png")
    images, labels = read_base_samples(str(folder))
    assert images.shape == (1, 8, 8, 3) and (images == 255).all() and labels is None  # alpha shown on white
    (folder / "b.png").write_text("not an image")
    with pytest.raises(CLIError, match="^--base_samples 'b.png': not an image this app reads"):
        read_base_samples(str(folder))
