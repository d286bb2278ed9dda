"""Recipe -> iterator of Steps. The UI, the CLI and the tests all drive this one iterator."""
from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator

import numpy as np
import torch

from explore.denoisers import ADMDenoiser, Cond, Denoiser
from explore.guidance import ClassifierFreeGuidance, ClassifierGuidance
from explore.noise import NoiseSource, PerImageNoise
from explore.samplers import SAMPLER_OPTIONS, SAMPLERS, Grid, Step
from explore.schedules import RespacingError, space_timesteps

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SEED = 2 ** 63 - 1


class RecipeError(ValueError):
    """A recipe value that cannot be used; the message names the field and what is accepted."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a run; written into every image it produces."""

    model: str  # model name in the registry (file stem in checkpoints/, or a path)
    class_label: int | None = None  # class for every image; None = a class per image drawn from its seed
    sampler: str = "ddpm"  # one of SAMPLERS
    respacing: str = "250"  # timestep respacing: "250", "ddim25", "10,15,20"
    karras: bool = False  # Karras sigmas instead of the respaced grid (euler, euler_a, heun, dpmpp_2m)
    cfg_scale: float = 1.0  # classifier-free guidance; 1 = conditional model, 0 = unconditional
    uncond_model: str | None = None  # unconditional model for two-model CFG (else the null class)
    classifier: str | None = None  # noisy classifier for classifier guidance
    classifier_scale: float = 0.0  # classifier-guidance scale
    guidance_method: str = "standard"  # "standard" or "conflict" (PixelAsParam projection)
    eta: float | None = None  # DDIM / Euler-ancestral noise; None = the sampler's default (0 / 1)
    churn: float = 0.0  # Heun stochastic churn (S_churn)
    seed: int = 0  # image i uses seed + i
    batch_size: int = 1
    clip_denoised: bool = True
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" for the network forward

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown recipe fields {unknown}")
        return cls(**data)

    def validate(self) -> None:
        """Check values that do not need the model; raise RecipeError naming the field."""
        if self.sampler not in SAMPLERS:
            raise RecipeError(f"sampler: {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        try:
            space_timesteps(1000, self.respacing)
        except RespacingError as err:
            raise RecipeError(f"respacing: {err}") from None
        for name, low, high in [("cfg_scale", 0.0, 100.0), ("classifier_scale", 0.0, 1000.0),
                                ("eta", 0.0, 1.0), ("churn", 0.0, 1000.0)]:
            value = getattr(self, name)
            if value is None and name == "eta":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
                raise RecipeError(f"{name}: {value!r} is outside the accepted range [{low:g}, {high:g}]")
        if self.guidance_method not in ("standard", "conflict"):
            raise RecipeError(f"guidance_method: {self.guidance_method!r} is not 'standard' or 'conflict'")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED - 10_000:
            raise RecipeError(f"seed: {self.seed!r} must be a whole number in [0, {MAX_SEED - 10_000}]")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RecipeError(f"batch_size: {self.batch_size!r} must be a whole number >= 1")
        if self.precision not in PRECISIONS:
            raise RecipeError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.karras and self.sampler in ("ddpm", "ddim"):
            raise RecipeError(f"karras: Karras sigmas apply to euler, euler_a, heun and dpmpp_2m, not {self.sampler}")

    def sampler_options(self) -> dict:
        return {name: getattr(self, name) for name in SAMPLER_OPTIONS[self.sampler] if getattr(self, name) is not None}

    def cli_command(self, out_dir: str = "samples") -> str:
        """The equivalent `python -m explore sample` command line."""
        args = ["python", "-m", "explore", "sample", "--model_path", self.model,
                "--sampler", self.sampler, "--timestep_respacing", self.respacing,
                "--seed", str(self.seed), "--batch_size", str(self.batch_size),
                "--num_samples", str(self.batch_size), "--cfg_scale", f"{self.cfg_scale:g}"]
        if self.class_label is not None:
            args += ["--class_label", str(self.class_label)]
        if self.karras:
            args += ["--karras", "True"]
        if self.uncond_model:
            args += ["--uncond_model_path", self.uncond_model]
        if self.classifier:
            args += ["--classifier_path", self.classifier, "--classifier_scale", f"{self.classifier_scale:g}",
                     "--guidance_method", self.guidance_method]
        for name, value in self.sampler_options().items():
            args += [f"--{name}", f"{value:g}"]
        if not self.clip_denoised:
            args += ["--clip_denoised", "False"]
        if self.precision != "fp32":
            args += ["--precision", self.precision]
        args += ["--out_dir", out_dir]
        return shlex.join(args)


@dataclass
class Plan:
    """A recipe resolved against loaded models: everything the sampler loop needs."""

    recipe: Recipe
    denoiser: Denoiser
    grid: Grid
    cond: Cond
    noise: NoiseSource
    shape: tuple[int, int, int]
    class_names: list[str] | None

    def steps(self, should_stop: Callable[[], bool] | None = None) -> Iterator[Step]:
        sampler = SAMPLERS[self.recipe.sampler]
        x_T = self.noise.initial()
        with torch.no_grad():
            for step in sampler(self.denoiser, x_T, self.grid, self.cond, self.noise,
                                clip_denoised=self.recipe.clip_denoised, **self.recipe.sampler_options()):
                yield step
                if should_stop is not None and should_stop():
                    return


def labels_for(recipe: Recipe, num_classes: int) -> torch.Tensor:
    """Per-image labels: the recipe's class, or one drawn from each image's seed (batch independent)."""
    if recipe.class_label is not None:
        if not 0 <= recipe.class_label < num_classes:
            raise RecipeError(f"class_label: {recipe.class_label} is outside [0, {num_classes - 1}]")
        return torch.full((recipe.batch_size,), recipe.class_label, dtype=torch.int64)
    return torch.tensor([np.random.default_rng([recipe.seed + i, 7]).integers(num_classes)
                         for i in range(recipe.batch_size)], dtype=torch.int64)


def plan(recipe: Recipe, registry, noise: NoiseSource | None = None,
         low_res: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> Plan:
    """Resolve a recipe: load (cached) models, wrap guidance, build the grid and the noise."""
    recipe.validate()
    main = registry.get(recipe.model)
    if main.kind not in ("diffusion", "superres"):
        raise RecipeError(f"model: {recipe.model!r} is a {main.kind}, not a diffusion model")
    device = registry.device
    precision = PRECISIONS[recipe.precision]
    denoiser: Denoiser = _adm(main, precision, device)
    num_classes = main.num_labels
    classifier = registry.get(recipe.classifier) if recipe.classifier else None
    if classifier is not None and classifier.kind != "classifier":
        raise RecipeError(f"classifier: {recipe.classifier!r} is a {classifier.kind}, not a classifier")
    if num_classes is None and classifier is not None:
        num_classes = classifier.num_labels
    if labels is None and num_classes is not None:
        labels = labels_for(recipe, num_classes)
    if labels is not None:
        labels = labels.to(device)

    if recipe.cfg_scale != 1.0:
        if main.num_labels is None:
            raise RecipeError(f"cfg_scale: {recipe.model!r} is unconditional; classifier-free guidance needs a "
                              "class-conditional model (set cfg_scale to 1)")
        if recipe.uncond_model:
            uncond = registry.get(recipe.uncond_model)
            if uncond.num_labels is not None or uncond.kind != main.kind:
                raise RecipeError(f"uncond_model: {recipe.uncond_model!r} must be an unconditional {main.kind} model")
            denoiser = ClassifierFreeGuidance(denoiser, recipe.cfg_scale, uncond_denoiser=_adm(uncond, precision, device))
        elif main.null_class is not None:
            denoiser = ClassifierFreeGuidance(denoiser, recipe.cfg_scale, null_class=main.null_class)
        else:
            raise RecipeError(f"cfg_scale: {recipe.model!r} was not trained with a null label; name an "
                              "unconditional model of the same size (uncond_model) or set cfg_scale to 1")
    if classifier is not None:
        denoiser = ClassifierGuidance(denoiser, classifier.module, recipe.classifier_scale,
                                      recipe.guidance_method, precision)
    elif recipe.classifier_scale != 0:
        raise RecipeError("classifier_scale: no classifier is selected, so the scale must be 0")

    diffusion = main.diffusion
    grid = Grid.make(diffusion.noise_schedule, recipe.respacing, diffusion.steps, recipe.karras)
    cond = Cond(labels=labels, low_res=None if low_res is None else low_res.to(device))
    if main.kind == "superres" and low_res is None:
        raise RecipeError("low_res: a super-resolution model needs low-resolution input images")
    size = main.image_size
    shape = (3, size, size)
    if noise is None:
        noise = PerImageNoise.from_seed(recipe.seed, recipe.batch_size, shape, device)
    return Plan(recipe, denoiser, grid, cond, noise, shape, main.class_names)


def _adm(loaded, precision, device) -> ADMDenoiser:
    return ADMDenoiser(loaded.module, loaded.diffusion.learn_sigma, class_cond=loaded.num_labels is not None,
                       precision=precision, channels_last=device.type == "cuda")


def iterate(recipe: Recipe, registry, noise: NoiseSource | None = None, low_res: torch.Tensor | None = None,
            labels: torch.Tensor | None = None, should_stop: Callable[[], bool] | None = None) -> Iterator[Step]:
    """Steps of one run."""
    return plan(recipe, registry, noise, low_res, labels).steps(should_stop)


def run(recipe: Recipe, registry, **kwargs) -> Step:
    """Run to the end; the final Step's x is the image batch in [-1, 1]."""
    last = None
    for last in iterate(recipe, registry, **kwargs):
        pass
    return last
