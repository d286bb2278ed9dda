"""The Recipe: everything that determines a run, each option defined once.

Every field of `Recipe` is declared with `option(...)`: its type and accepted values (a `Kind`), default, help
text, command-line flags (the official guided-diffusion name first where one exists), when it applies and how
the UI shows it. Validation, the command line's parser and --help (explore.__main__), the UI form
(explore.ui.form), the recipe JSON written into every PNG and the reproduce command all read these definitions.

Adding a sampler option takes one `option(...)` field here and the keyword argument of the samplers that use
it: a field whose name is a keyword of the chosen sampler is passed to it.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable

import torch

from explore import validate as check
from explore.samplers import SAMPLERS, sampler_defaults
from explore.validate import LIMITS, MAX_CLASSES, MAX_SEED, Caps, InputError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GUIDANCE_METHODS = ("standard", "conflict")


class RecipeError(InputError):
    """A recipe value that cannot be used; the message names the field and what is accepted."""


# --- kinds of values ----------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class Kind:
    """What values an option accepts. `check` validates a recipe's value (strict: a recipe holds exact types);
    `parse` turns a value from a form or an API client into one (lenient: '3' and 3.0 for a whole number);
    `from_text` reads a command-line flag (type only: the range is checked by `check`)."""

    optional: bool = False  # None is accepted (and means "not set")
    what = "a value"

    def check(self, field: str, value, caps: Caps):
        return value

    def parse(self, field: str, value, caps: Caps):
        return None if value is None and self.optional else self.check(field, value, caps)

    def from_text(self, text: str):
        return text

    def text(self, value) -> str:
        """A flag value that reads back to the same value."""
        return str(value)


@dataclass(frozen=True)
class Number(Kind):
    low: float = 0.0
    high: float = 1.0
    what = "a number"

    def check(self, field, value, caps):
        return None if value is None and self.optional else check.number(field, value, self.low, self.high)

    def from_text(self, text):
        return float(text)

    def text(self, value):
        if isinstance(value, float):  # repr of floats is exact
            return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
        return str(value)


@dataclass(frozen=True)
class Whole(Kind):
    low: int = 0
    high: int | str = MAX_SEED  # a number, or the name of a Caps field (limits that depend on the device)
    what = "a whole number"

    def bounds(self, caps: Caps) -> tuple[int, int]:
        return self.low, getattr(caps, self.high) if isinstance(self.high, str) else self.high

    def check(self, field, value, caps):
        if value is None and self.optional:
            return None
        low, high = self.bounds(caps)
        if not _is_int(value):  # a recipe holds exact ints; parse() converts at the edges
            extra = " (or None)" if self.optional else ""
            raise RecipeError(f"{field}: {value!r:.60} must be a whole number in [{low}, {high}]{extra}")
        return check.whole(field, value, low, high)

    def parse(self, field, value, caps):
        return None if value is None and self.optional else check.whole(field, value, *self.bounds(caps))

    def from_text(self, text):
        return int(text)


@dataclass(frozen=True)
class Flag(Kind):
    what = "True or False"

    def check(self, field, value, caps):
        return check.flag(field, value)

    def from_text(self, text):
        from explore.models.configs import parse_bool
        return parse_bool(text)


@dataclass(frozen=True)
class Choice(Kind):
    choices: Callable[[], list[str]] | tuple[str, ...] = ()

    def options(self) -> list[str]:
        return list(self.choices() if callable(self.choices) else self.choices)

    def check(self, field, value, caps):
        return check.choice(field, value, self.options())


@dataclass(frozen=True)
class Respacing(Kind):
    what = "text such as '250', 'ddim25' or '10,15,20'"

    def check(self, field, value, caps):
        check.respacing(value, 1000, caps.steps, field)
        return value

    def parse(self, field, value, caps):
        return self.check(field, value.strip() if isinstance(value, str) else value, caps)


@dataclass(frozen=True)
class ModelName(Kind):
    what = "a model name or a checkpoint path"

    def check(self, field, value, caps):
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or not value:
            extra = " or None" if self.optional else ""
            raise RecipeError(f"{field}: {value!r:.60} must be a model name{',' if extra else ' or'} a checkpoint "
                              f"path{extra}")
        return value


@dataclass(frozen=True)
class Interval(Kind):
    """'low,high' original timesteps (inclusive), or '' for every step."""

    what = "'' (every step) or 'low,high' timesteps such as '200,800'"

    def check(self, field, value, caps):
        interval_bounds(value, field)
        return value

    def parse(self, field, value, caps):
        return self.check(field, value.strip() if isinstance(value, str) else value, caps)


def interval_bounds(value, field: str = "guidance_interval") -> tuple[float, float] | None:
    """The (low, high) of an Interval's text, None for every step; InputError naming the field otherwise."""
    accepted = "'' (every step) or 'low,high' timesteps with 0 <= low <= high, such as '200,800'"
    if not isinstance(value, str):
        raise InputError(f"{field}: {value!r:.60} must be {accepted}")
    if not value.strip():
        return None
    parts = value.split(",")
    try:
        low, high = (check.number(field, part, 0.0, 1e6) for part in parts) if len(parts) == 2 else (None, None)
    except InputError:
        low = high = None
    if low is None or low > high:
        raise InputError(f"{field}: {value!r:.60} is not {accepted}")
    return low, high


# --- options --------------------------------------------------------------------------------------

AS_RECIPE = type("AsRecipe", (), {"__repr__": lambda self: "AS_RECIPE"})()  # the command line's default is the recipe's


@dataclass(frozen=True)
class Widget:
    """How the UI shows an option (explore.ui.form turns it into a Gradio component)."""

    kind: str  # "slider", "number", "dropdown", "radio", "checkbox" or "textbox"
    label: str
    low: float | None = None  # slider / number range shown in the page (may be narrower than the accepted one)
    high: float | None = None
    step: float | None = None
    info: str | None = None
    choices: tuple | None = None  # radio / dropdown (label, value) pairs; None = the kind's choices


@dataclass(frozen=True)
class Option:
    """One run option (the metadata of a Recipe field)."""

    kind: Kind
    help: str
    flags: tuple[str, ...]  # command-line names; the first is the one the reproduce command writes
    cli_default: Any = AS_RECIPE  # where the command line's default differs from the recipe's (official scripts)
    needs: str | None = None  # applies only when this other field is set (else it keeps its default)
    always_written: bool = False  # the reproduce command writes it even at its default
    widget: Widget | None = None
    group: str = "run"

    @property
    def flag(self) -> str:
        return self.flags[0]


def option(default=MISSING, kind: Kind = Kind(), help: str = "", flags: tuple[str, ...] = (), **extra):
    """A Recipe field with its Option; `flags` default to the field's own name."""
    return dataclasses.field(default=default, metadata={"option": Option(kind, help, flags, **extra)})


def options_of(recipe_type) -> dict[str, Option]:
    """Field name -> Option, in field order."""
    out = {}
    for f in fields(recipe_type):
        opt = f.metadata["option"]
        out[f.name] = opt if opt.flags else dataclasses.replace(opt, flags=(f.name,))
    return out


def defaults_of(recipe_type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(recipe_type) if f.default is not MISSING}


def _karras_samplers() -> list[str]:
    return [name for name, fn in SAMPLERS.items() if fn.karras]


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a run; written into every image it produces."""

    model: str = option(kind=ModelName(), flags=("model_path",), always_written=True,
                        help="diffusion model: a file in checkpoints/ by name, or a checkpoint path",
                        widget=Widget("dropdown", "Model"))
    class_label: int | None = option(None, Whole(0, MAX_CLASSES, optional=True),
                                     "class for every image (default: a class per image drawn from its seed)",
                                     widget=Widget("dropdown", "Class"))
    sampler: str = option("ddpm", Choice(lambda: list(SAMPLERS)), f"one of {', '.join(SAMPLERS)}",
                          cli_default=None, always_written=True, widget=Widget("dropdown", "Sampler"))
    respacing: str = option("250", Respacing(), "timestep respacing: '250', 'ddim25' or '10,15,20'",
                            flags=("timestep_respacing",), always_written=True,
                            widget=Widget("textbox", "Timestep respacing", info="'50', 'ddim25', '10,15,20'"))
    karras: bool = option(False, Flag(), "Karras noise levels instead of the respaced grid",
                          widget=Widget("checkbox", "Karras noise levels"))
    cfg_scale: float = option(1.0, Number(0.0, 100.0), "classifier-free guidance scale (1 = the conditional "
                              "model, 0 = unconditional)", always_written=True, group="guidance",
                              widget=Widget("slider", "CFG scale (1 = conditional model)", 0, 10, 0.25))
    uncond_model: str | None = option(None, ModelName(optional=True), "unconditional model for two-model CFG "
                                      "(default: the model's null class)", flags=("uncond_model_path",),
                                      group="guidance")
    classifier: str | None = option(None, ModelName(optional=True), "noisy classifier for classifier guidance",
                                    flags=("classifier_path",), group="guidance",
                                    widget=Widget("dropdown", "Guidance classifier"))
    classifier_scale: float = option(0.0, Number(0.0, 1000.0), "classifier-guidance scale",
                                     cli_default=1.0, needs="classifier", always_written=True, group="guidance",
                                     widget=Widget("slider", "Classifier-guidance scale", 0, 20, 0.5))
    guidance_method: str = option("standard", Choice(GUIDANCE_METHODS), "'standard' or 'conflict' (PixelAsParam's "
                                  "conflict projection)", group="guidance",
                                  widget=Widget("radio", "Guidance method", choices=(
                                      ("standard", "standard"), ("conflict projection", "conflict"))))
    cfg_rescale: float = option(0.0, Number(0.0, 1.0), "CFG rescale phi (Lin et al. 2024): the guided noise "
                                "prediction scaled back to the conditional one's spread, against over-saturation",
                                group="guidance", widget=Widget("slider", "CFG rescale", 0, 1, 0.05))
    dynamic_threshold: float = option(0.0, Number(0.0, 1.0), "dynamic thresholding (Saharia et al. 2022): each "
                                      "step's predicted x0 clamped at this percentile of its |x0| and rescaled, "
                                      "against over-saturation at high guidance scales (0.995 typical); 0: off",
                                      group="guidance", widget=Widget("number", "Dynamic thresholding percentile",
                                                                      0, 1, info="0 = off; 0.995 typical"))
    guidance_interval: str = option("", Interval(), "guide only at timesteps low <= t <= high ('200,800'; "
                                    "Kynkaanniemi et al. 2024); empty: every step", group="guidance",
                                    widget=Widget("textbox", "Guidance interval (timesteps)",
                                                  info="'200,800': guidance only there; empty: every step"))
    eta: float | None = option(None, Number(0.0, 1.0, optional=True), "noise of the stochastic step",
                               widget=Widget("slider", "eta", 0, 1, 0.05))
    churn: float = option(0.0, Number(0.0, 1000.0), "stochastic churn (S_churn)",
                          widget=Widget("slider", "churn (Heun)", 0, 80, 1))
    seed: int = option(0, Whole(0, MAX_SEED), "image i uses seed + i", always_written=True,
                       widget=Widget("number", "Seed", 0))
    batch_size: int = option(1, Whole(1, "batch"), "number of images", flags=("num_samples",), cli_default=16,
                             always_written=True, widget=Widget("slider", "Batch size", 1, 16, 1))
    clip_denoised: bool = option(True, Flag(), "clamp the predicted x0 to [-1, 1]")
    precision: str = option("fp32", Choice(tuple(PRECISIONS)), "precision of the network forward")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"recipe: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise RecipeError(f"unknown recipe fields {unknown}")
        if "model" not in data:
            raise RecipeError("model: the recipe names no model")
        return cls(**data)

    def validate(self, caps: Caps | None = None) -> None:
        """Check values that do not need the model against `caps` (default: LIMITS); raise RecipeError naming
        the field and the accepted range."""
        caps = caps or LIMITS
        try:
            for name, opt in options_of(type(self)).items():
                opt.kind.check(name, getattr(self, name), caps)
        except RecipeError:
            raise
        except InputError as err:
            raise RecipeError(str(err)) from None
        if self.karras and not SAMPLERS[self.sampler].karras:
            raise RecipeError(f"karras: Karras sigmas apply to {', '.join(_karras_samplers()[:-1])} and "
                              f"{_karras_samplers()[-1]}, not {self.sampler}")

    def sampler_options(self) -> dict:
        """The recipe's values for the keyword options of its sampler (None: the sampler's default)."""
        takes = sampler_defaults(self.sampler)
        return {name: getattr(self, name) for name in options_of(type(self))
                if name in takes and getattr(self, name) is not None}

    def cli_command(self, out_dir: str = "samples", model_flags: dict | str | None = None) -> str:
        """The equivalent `python -m explore sample` command line (parse it back with explore.__main__.recipe_from_command).

        `model_flags` (official architecture flags) are added for checkpoints that do not describe themselves.
        """
        args, defaults = ["python", "-m", "explore", "sample"], defaults_of(type(self))
        for name, opt in options_of(type(self)).items():
            value = getattr(self, name)
            default = defaults.get(name) if opt.cli_default is AS_RECIPE else opt.cli_default
            if value is None or opt.needs and getattr(self, opt.needs) is None:
                continue
            if opt.always_written or value != default:
                args += [f"--{opt.flag}", opt.kind.text(value)]
            if name == "model":
                args += _model_flag_args(model_flags)
            elif name == "batch_size":
                args += ["--batch_size", str(value)]  # one batch, as the run was drawn
        args += ["--out_dir", out_dir]
        return shlex.join(args)


def _model_flag_args(model_flags: dict | str | None) -> list[str]:
    if isinstance(model_flags, str):
        return shlex.split(model_flags)
    return [arg for name, value in (model_flags or {}).items()
            for arg in (f"--{name.lstrip('-')}", Number().text(value))]


def applies(recipe_type, name: str, values: dict) -> bool:
    """Whether option `name` applies given the other values: a sampler option to the samplers that take it,
    Karras sigmas to the samplers that support them, an option that `needs` another to runs that set it."""
    opt = options_of(recipe_type)[name]
    if opt.needs is not None and values.get(opt.needs) is None:
        return False
    sampler = values.get("sampler")
    if sampler in SAMPLERS:
        if name == "karras":
            return SAMPLERS[sampler].karras
        if name in sampler_option_names(recipe_type):
            return name in sampler_defaults(sampler)
    return True


def sampler_option_names(recipe_type=Recipe) -> list[str]:
    """Recipe fields that some samplers take as a keyword option and others do not (clip_denoised and
    dynamic_threshold, which all take, are options of every run)."""
    takes = [set(sampler_defaults(sampler)) for sampler in SAMPLERS]
    some, every = set.union(*takes), set.intersection(*takes)
    return [name for name in options_of(recipe_type) if name in some - every]
