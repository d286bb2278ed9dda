"""Recipe -> iterator of Steps. The UI, the CLI and the tests all drive this one iterator."""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator

import numpy as np
import torch

from explore.denoisers import ADMDenoiser, Cond, Denoiser, Prediction
from explore.guidance import ClassifierFreeGuidance, ClassifierGuidance
from explore.noise import NoiseSource, PerImageNoise
from explore.samplers import SAMPLER_OPTIONS, SAMPLERS, Grid, Step
from explore import validate as check
from explore.schedules import RespacingError, Schedule
from explore.validate import LIMITS, MAX_CLASSES, MAX_SEED, Caps, InputError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# accepted ranges of the recipe's numbers
RANGES = {"cfg_scale": (0.0, 100.0), "classifier_scale": (0.0, 1000.0), "eta": (0.0, 1.0), "churn": (0.0, 1000.0)}


class RecipeError(InputError):
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
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"recipe: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown recipe fields {unknown}")
        if "model" not in data:
            raise RecipeError("model: the recipe names no model")
        return cls(**data)

    def validate(self, caps: Caps | None = None) -> None:
        """Check values that do not need the model against `caps` (default: LIMITS); raise RecipeError naming
        the field and the accepted range."""
        try:
            self._validate(caps or LIMITS)
        except RecipeError:
            raise
        except InputError as err:
            raise RecipeError(str(err)) from None

    def _validate(self, caps: Caps) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise RecipeError(f"model: {self.model!r} must be a model name or a checkpoint path")
        if self.class_label is not None:
            check.whole("class_label", self.class_label, 0, MAX_CLASSES)
            if not _is_int(self.class_label):
                raise RecipeError(f"class_label: {self.class_label!r} must be a whole number >= 0 (or None)")
        check.choice("sampler", self.sampler, list(SAMPLERS))
        check.respacing(self.respacing, 1000, caps.steps)
        for name, (low, high) in RANGES.items():
            if getattr(self, name) is not None or name != "eta":
                check.number(name, getattr(self, name), low, high)
        check.choice("guidance_method", self.guidance_method, ["standard", "conflict"])
        for name, low, high in (("seed", 0, MAX_SEED), ("batch_size", 1, caps.batch)):
            if not _is_int(getattr(self, name)):  # a recipe holds exact ints; the edges convert
                raise RecipeError(f"{name}: {getattr(self, name)!r} must be a whole number in [{low}, {high}]")
            check.whole(name, getattr(self, name), low, high)
        for name in ("karras", "clip_denoised"):
            check.flag(name, getattr(self, name))
        for name in ("uncond_model", "classifier"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise RecipeError(f"{name}: {value!r} must be a model name, a checkpoint path or None")
        check.choice("precision", self.precision, list(PRECISIONS))
        if self.karras and self.sampler in ("ddpm", "ddim"):
            raise RecipeError(f"karras: Karras sigmas apply to euler, euler_a, heun and dpmpp_2m, not {self.sampler}")

    def sampler_options(self) -> dict:
        return {name: getattr(self, name) for name in SAMPLER_OPTIONS[self.sampler] if getattr(self, name) is not None}

    def cli_command(self, out_dir: str = "samples", model_flags: dict | str | None = None) -> str:
        """The equivalent `python -m explore sample` command line (parse it back with explore.__main__.recipe_from_command).

        `model_flags` (official architecture flags) are added for checkpoints that do not describe themselves.
        """
        args = ["python", "-m", "explore", "sample", "--model_path", self.model]
        if isinstance(model_flags, str):
            args += shlex.split(model_flags)
        else:
            for name, value in (model_flags or {}).items():
                args += [f"--{name.lstrip('-')}", _flag_text(value)]
        args += ["--sampler", self.sampler, "--timestep_respacing", self.respacing,
                 "--seed", str(self.seed), "--batch_size", str(self.batch_size),
                 "--num_samples", str(self.batch_size), "--cfg_scale", _flag_text(self.cfg_scale)]
        if self.class_label is not None:
            args += ["--class_label", str(self.class_label)]
        if self.karras:
            args += ["--karras", "True"]
        if self.uncond_model:
            args += ["--uncond_model_path", self.uncond_model]
        if self.classifier:
            args += ["--classifier_path", self.classifier, "--classifier_scale", _flag_text(self.classifier_scale)]
        if self.guidance_method != "standard":
            args += ["--guidance_method", self.guidance_method]
        if self.eta is not None:
            args += ["--eta", _flag_text(self.eta)]
        if self.churn != 0:
            args += ["--churn", _flag_text(self.churn)]
        if not self.clip_denoised:
            args += ["--clip_denoised", "False"]
        if self.precision != "fp32":
            args += ["--precision", self.precision]
        args += ["--out_dir", out_dir]
        return shlex.join(args)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag_text(value) -> str:
    """A flag value that reads back to the same number (repr of floats is exact)."""
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


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
    eval_batch: int | None = None  # evaluate the networks in chunks of exactly this many images (None: as given)

    @torch.no_grad()  # on a generator function: grad is off only while the generator runs, not in the caller
    def steps(self, should_stop: Callable[[], bool] | None = None) -> Iterator[Step]:
        """One Step per sampler iteration; stops early when should_stop() returns True after a step."""
        sampler = SAMPLERS[self.recipe.sampler]
        x_T = self.noise.initial()
        expected = (self.recipe.batch_size, *self.shape)
        if tuple(x_T.shape) != expected:
            raise RecipeError(f"noise: x_T has shape {list(x_T.shape)}, this run needs {list(expected)}")
        log = os.environ.get("EXPLORE_STEP_LOG")  # tests: one line per computed step, to see work after a cancel
        for step in sampler(self.denoiser, x_T, self.grid, self.cond, self.noise,
                            clip_denoised=self.recipe.clip_denoised, **self.recipe.sampler_options()):
            if log:
                with open(log, "a") as f:
                    f.write(f"{time.time():.6f} {step.index}\n")
            yield step
            if should_stop is not None and should_stop():
                return


class FixedBatch(torch.nn.Module):
    """A network evaluated in chunks of exactly `size` rows, the last chunk padded by repeating its last row.

    CPU kernels choose their summation order by batch size (a GEMV for one row, other blockings for 6 or 16),
    so an image's bits would depend on the batch it was drawn in; at one fixed evaluation size they do not.
    Rows never mix inside these networks, so each output row depends on its own input row alone. Wrapping
    the networks (not the guidance) keeps CFG's stacked [cond, uncond] pair of one image in one chunk.
    """

    def __init__(self, network: torch.nn.Module, size: int = 2):
        super().__init__()
        self.network, self.size = network, size

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        n = x.shape[0]
        if n == self.size:
            return self.network(x, t, **kwargs)
        outputs = []
        for start in range(0, n, self.size):
            if start + self.size <= n:  # a full chunk: views, no copies
                index = slice(start, start + self.size)
            else:  # the last chunk, padded by repeating its last row
                index = torch.arange(start, start + self.size, device=x.device).clamp_max(n - 1)
            chunk = {k: None if v is None else v[index] for k, v in kwargs.items()}
            out = self.network(x[index], t[index] if t.ndim else t, **chunk)
            outputs.append(out[:min(self.size, n - start)])
        return torch.cat(outputs)


def labels_for(recipe: Recipe, num_classes: int) -> torch.Tensor:
    """Per-image labels: the recipe's class, or one drawn from each image's seed (batch independent)."""
    if recipe.class_label is not None:
        if not 0 <= recipe.class_label < num_classes:
            raise RecipeError(f"class_label: {recipe.class_label} is outside [0, {num_classes - 1}]")
        return torch.full((recipe.batch_size,), recipe.class_label, dtype=torch.int64)
    return torch.tensor([np.random.default_rng([recipe.seed + i, 7]).integers(num_classes)
                         for i in range(recipe.batch_size)], dtype=torch.int64)


class SeededStepNoise:
    """Given start noise x_T; the per-step noise of image i comes from seed + i exactly as in PerImageNoise.

    So a run started from a stored x_T that equals the seeded one reproduces the seeded run.
    """

    def __init__(self, x_T: torch.Tensor, seed: int, device: torch.device | str = "cpu"):
        self.x_T, self.device = x_T, torch.device(device)
        self._seeded = PerImageNoise.from_seed(seed, len(x_T), tuple(x_T.shape[1:]), device)
        self._seeded.initial()  # skip each generator's own x_T draw

    def initial(self) -> torch.Tensor:
        return self.x_T.to(self.device)

    def step(self, s: int) -> torch.Tensor:
        return self._seeded.step(s)


def plan(recipe: Recipe, registry, noise: NoiseSource | None = None,
         low_res: torch.Tensor | None = None, labels: torch.Tensor | None = None,
         batch_invariant: bool | None = None) -> Plan:
    """Resolve a recipe: load (cached) models, wrap guidance, build the grid and the noise.

    `labels` (int64 [batch_size]) override the recipe's class; `low_res` ([batch_size, 3, h, w] in [-1, 1])
    conditions a super-resolution model; `noise` replaces the seeded noise (e.g. a RecordedNoise).
    `batch_invariant` evaluates each network in chunks of a fixed number of rows (the rows it sees per image:
    two with classifier-free guidance on one network, [cond, uncond], else one), so image i of a run is
    bit-identical whatever the batch size; None = on CPU (whose kernels are deterministic), not on GPUs.
    The recipe is checked against the registry's caps (a shared server's are smaller than the command line's).
    """
    recipe.validate(getattr(registry, "caps", None))
    main = registry.get(recipe.model)
    if main.kind not in ("diffusion", "superres"):
        raise RecipeError(f"model: {recipe.model!r} is a {main.kind}, not a diffusion model")
    diffusion = main.diffusion
    if diffusion is None:
        raise RecipeError(f"model: {recipe.model!r} does not record the diffusion process it was trained for")
    if diffusion.predict_xstart or diffusion.rescale_timesteps:
        raise RecipeError(f"model: {recipe.model!r} predicts x0 or rescales timesteps; only epsilon- or "
                          "v-prediction models with original timesteps (every guided-diffusion release) are supported")
    device = registry.device
    precision = PRECISIONS[recipe.precision]
    if batch_invariant is None:
        batch_invariant = device.type == "cpu"
    # [cond; uncond] rows through one network (scales 0 and 1 need one of them only)
    stacked_cfg = recipe.cfg_scale not in (0.0, 1.0) and not recipe.uncond_model
    eval_batch = (2 if stacked_cfg else 1) if batch_invariant else None
    single_rows = 1 if batch_invariant else None  # networks that see one row per image
    denoiser: Denoiser = _adm(main, precision, device, eval_batch)
    size = main.image_size
    shape = (3, size, size)
    num_classes = main.num_labels
    classifier = registry.get(recipe.classifier) if recipe.classifier else None
    if classifier is not None:
        if classifier.kind != "classifier":
            raise RecipeError(f"classifier: {recipe.classifier!r} is a {classifier.kind}, not a noisy classifier")
        if classifier.image_size != size:
            raise RecipeError(f"classifier: {recipe.classifier!r} takes {classifier.image_size} px images, "
                              f"the model makes {size} px")
        if num_classes is None:
            num_classes = classifier.num_labels
    if recipe.class_label is not None and num_classes is None:
        raise RecipeError(f"class_label: {recipe.model!r} is unconditional and no classifier is selected; "
                          "leave class_label unset")
    if labels is None and num_classes is not None:
        labels = labels_for(recipe, num_classes)
    elif labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or labels.shape != (recipe.batch_size,):
            raise RecipeError(f"labels: expected {recipe.batch_size} whole numbers, got {labels.dtype} "
                              f"shape {list(labels.shape)}")
        labels = labels.to(torch.int64)
        limit = main.num_classes if main.num_labels is not None else num_classes  # given labels may be the null class
        if limit is not None and len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < limit):
            null = f" ({main.null_class} is the null class)" if main.null_class is not None else ""
            raise RecipeError(f"labels: {labels.tolist()} are not all in [0, {limit - 1}]{null}")
        if num_classes is None:
            labels = None  # an unconditional model without a classifier has no use for them
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
            same_process = uncond.diffusion is not None and (uncond.diffusion.steps, uncond.diffusion.noise_schedule) \
                == (diffusion.steps, diffusion.noise_schedule)
            if uncond.image_size != size or not same_process:
                raise RecipeError(f"uncond_model: {recipe.uncond_model!r} must have the image size and diffusion "
                                  f"process of {recipe.model!r}")
            denoiser = ClassifierFreeGuidance(denoiser, recipe.cfg_scale, uncond_denoiser=_adm(uncond, precision, device,
                                                                                           single_rows))
        elif main.null_class is not None:
            denoiser = ClassifierFreeGuidance(denoiser, recipe.cfg_scale, null_class=main.null_class)
        else:
            raise RecipeError(f"cfg_scale: {recipe.model!r} was not trained with a null label; name an "
                              "unconditional model of the same size (uncond_model) or set cfg_scale to 1")
    if classifier is not None:
        classifier_net, classifier_precision = classifier.module, precision
        if device.type == "cpu" and precision == torch.bfloat16 and hasattr(classifier_net, "convert_torso"):
            classifier_net, classifier_precision = classifier.torso_in(torch.bfloat16), None  # as _adm does
        if single_rows:
            classifier_net = FixedBatch(classifier_net, single_rows)
        denoiser = ClassifierGuidance(denoiser, classifier_net, recipe.classifier_scale,
                                      recipe.guidance_method, classifier_precision)
    elif recipe.classifier_scale != 0:
        raise RecipeError("classifier_scale: no classifier is selected, so the scale must be 0")

    if main.kind == "superres":
        if low_res is None:
            raise RecipeError("low_res: a super-resolution model needs low-resolution input images")
        if low_res.ndim != 4 or low_res.shape[:2] != (recipe.batch_size, 3):
            raise RecipeError(f"low_res: expected [{recipe.batch_size}, 3, h, w] images, got {list(low_res.shape)}")
        low_res = low_res.to(device=device, dtype=torch.float32)
    elif low_res is not None:
        raise RecipeError(f"low_res: {recipe.model!r} is not a super-resolution model")
    try:
        grid = Grid.make(diffusion.noise_schedule, recipe.respacing, diffusion.steps, recipe.karras)
    except RespacingError as err:
        raise RecipeError(f"respacing: {err}") from None
    cond = Cond(labels=labels, low_res=low_res)
    if noise is None:
        noise = PerImageNoise.from_seed(recipe.seed, recipe.batch_size, shape, device)
    x_T = getattr(noise, "x_T", None)
    if isinstance(x_T, torch.Tensor) and tuple(x_T.shape) != (recipe.batch_size, *shape):
        raise RecipeError(f"noise: x_T has shape {list(x_T.shape)}, this run needs {[recipe.batch_size, *shape]}")
    return Plan(recipe, denoiser, grid, cond, noise, shape, main.class_names, eval_batch)


def _adm(loaded, precision, device, eval_batch: int | None) -> ADMDenoiser:
    module, channels_last = loaded.module, device.type == "cuda"
    if device.type == "cpu" and precision == torch.bfloat16 and hasattr(module, "convert_torso"):
        # CPU bf16: a bf16 torso, channels-last (oneDNN's AMX/AVX-512 bf16 convs), norms and head in fp32
        module, precision, channels_last = loaded.torso_in(torch.bfloat16), None, True
    network = FixedBatch(module, eval_batch) if eval_batch else module
    diffusion = loaded.diffusion
    v_schedule = Schedule.named(diffusion.noise_schedule, diffusion.steps) if diffusion.predict_v else None
    return ADMDenoiser(network, diffusion.learn_sigma, class_cond=loaded.num_labels is not None,
                       precision=precision, channels_last=channels_last, v_schedule=v_schedule,
                       low_res_skip=diffusion.low_res_skip)


def iterate(recipe: Recipe, registry, noise: NoiseSource | None = None, low_res: torch.Tensor | None = None,
            labels: torch.Tensor | None = None, should_stop: Callable[[], bool] | None = None,
            batch_invariant: bool | None = None) -> Iterator[Step]:
    """Steps of one run."""
    return plan(recipe, registry, noise, low_res, labels, batch_invariant).steps(should_stop)


def run(recipe: Recipe, registry, **kwargs) -> Step:
    """Run to the end; the final Step's x is the image batch in [-1, 1]."""
    last = None
    for last in iterate(recipe, registry, **kwargs):
        pass
    return last
