"""Recipe -> iterator of Steps. The UI, the CLI and the tests all drive this one iterator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from explore.denoisers import ADMDenoiser, Cond, Denoiser, FixedBatch
from explore.guidance import ClassifierFreeGuidance, ClassifierGuidance, GuidanceInterval
from explore.noise import NoiseSource, PerImageNoise
from explore.recipe import PRECISIONS, Recipe, RecipeError, interval_bounds
from explore.samplers import SAMPLERS, Step
from explore.schedules import Grid, RespacingError, Schedule

__all__ = ["FixedBatch", "PRECISIONS", "Plan", "Recipe", "RecipeError", "SeededStepNoise", "iterate", "plan", "run"]

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
        for step in sampler(self.denoiser, x_T, self.grid, self.cond, self.noise, **self.recipe.sampler_options()):
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
    main = _diffusion_model(recipe, registry)
    device = registry.device
    if batch_invariant is None:
        batch_invariant = device.type == "cpu"
    classifier = _guidance_classifier(recipe, registry, main)
    labels = _labels(recipe, main, classifier, labels)
    networks = _Networks(PRECISIONS[recipe.precision], device, batch_invariant)
    denoiser = _with_cfg(recipe, registry, main, networks.denoiser(main, _stacked_cfg(recipe)), networks)
    if classifier is not None:
        network, precision = networks.classifier(classifier)
        denoiser = ClassifierGuidance(denoiser, network, recipe.classifier_scale, recipe.guidance_method, precision)
    interval = interval_bounds(recipe.guidance_interval)
    if interval is not None and (recipe.cfg_scale != 1.0 or classifier is not None):
        denoiser = GuidanceInterval(denoiser, networks.denoiser(main), *interval)  # outside: the plain model
    shape = (3, main.image_size, main.image_size)
    cond = Cond(labels=None if labels is None else labels.to(device), low_res=_low_res(recipe, main, low_res, device))
    return Plan(recipe, denoiser, _grid(recipe, main.diffusion), cond, _noise(recipe, noise, shape, device), shape,
                main.class_names, networks.eval_batch(_stacked_cfg(recipe)))


def _diffusion_model(recipe: Recipe, registry):
    main = registry.get(recipe.model)
    if main.kind not in ("diffusion", "superres"):
        raise RecipeError(f"model: {recipe.model!r} is a {main.kind}, not a diffusion model")
    diffusion = main.diffusion
    if diffusion is None:
        raise RecipeError(f"model: {recipe.model!r} does not record the diffusion process it was trained for")
    if diffusion.predict_xstart or diffusion.rescale_timesteps:
        raise RecipeError(f"model: {recipe.model!r} predicts x0 or rescales timesteps; only epsilon- or "
                          "v-prediction models with original timesteps (every guided-diffusion release) are supported")
    return main


def _guidance_classifier(recipe: Recipe, registry, main):
    """The recipe's noisy classifier (checked against the model), or None."""
    if recipe.classifier is None:
        if recipe.classifier_scale != 0:
            raise RecipeError("classifier_scale: no classifier is selected, so the scale must be 0")
        return None
    classifier = registry.get(recipe.classifier)
    if classifier.kind != "classifier":
        raise RecipeError(f"classifier: {recipe.classifier!r} is a {classifier.kind}, not a noisy classifier")
    if classifier.image_size != main.image_size:
        raise RecipeError(f"classifier: {recipe.classifier!r} takes {classifier.image_size} px images, "
                          f"the model makes {main.image_size} px")
    return classifier


def _labels(recipe: Recipe, main, classifier, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Per-image class labels: given, the recipe's class, or drawn per image; None when nothing uses them."""
    num_classes = main.num_labels if main.num_labels is not None or classifier is None else classifier.num_labels
    if recipe.class_label is not None and num_classes is None:
        raise RecipeError(f"class_label: {recipe.model!r} is unconditional and no classifier is selected; "
                          "leave class_label unset")
    if labels is None:
        return None if num_classes is None else labels_for(recipe, num_classes)
    labels = torch.as_tensor(labels)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or labels.shape != (recipe.batch_size,):
        raise RecipeError(f"labels: expected {recipe.batch_size} whole numbers, got {labels.dtype} "
                          f"shape {list(labels.shape)}")
    labels = labels.to(torch.int64)
    limit = main.num_classes if main.num_labels is not None else num_classes  # given labels may be the null class
    if limit is not None and len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < limit):
        null = f" ({main.null_class} is the null class)" if main.null_class is not None else ""
        raise RecipeError(f"labels: {labels.tolist()} are not all in [0, {limit - 1}]{null}")
    return None if num_classes is None else labels  # an unconditional model without a classifier has no use for them


def _stacked_cfg(recipe: Recipe) -> bool:
    """Whether CFG runs [cond; uncond] rows through one network (scales 0 and 1 need one of them only)."""
    return recipe.cfg_scale not in (0.0, 1.0) and not recipe.uncond_model


@dataclass(frozen=True)
class _Networks:
    """How a run places its networks: the precision policy and the fixed evaluation batch, written once."""

    precision: torch.dtype | None
    device: torch.device
    batch_invariant: bool

    def eval_batch(self, stacked: bool) -> int | None:
        return (2 if stacked else 1) if self.batch_invariant else None

    def _placed(self, loaded, rows: int | None):
        """(module, autocast dtype, channels_last). CPU bf16: a bf16 torso, channels-last (oneDNN's AMX/AVX-512
        bf16 convolutions), norms and head in fp32; elsewhere autocast to the recipe's precision."""
        module, precision, channels_last = loaded.module, self.precision, self.device.type == "cuda"
        if self.device.type == "cpu" and precision == torch.bfloat16 and hasattr(module, "convert_torso"):
            module, precision, channels_last = loaded.torso_in(torch.bfloat16), None, True
        return (FixedBatch(module, rows) if rows else module), precision, channels_last

    def denoiser(self, loaded, stacked: bool = False) -> ADMDenoiser:
        network, precision, channels_last = self._placed(loaded, self.eval_batch(stacked))
        diffusion = loaded.diffusion
        v_schedule = Schedule.named(diffusion.noise_schedule, diffusion.steps) if diffusion.predict_v else None
        return ADMDenoiser(network, diffusion.learn_sigma, class_cond=loaded.num_labels is not None,
                           precision=precision, channels_last=channels_last, v_schedule=v_schedule,
                           low_res_skip=diffusion.low_res_skip, fixed_small=diffusion.sigma_small)

    def classifier(self, loaded) -> tuple[torch.nn.Module, torch.dtype | None]:
        network, precision, _ = self._placed(loaded, self.eval_batch(False))
        return network, precision


def _with_cfg(recipe: Recipe, registry, main, denoiser: Denoiser, networks: _Networks) -> Denoiser:
    """The model's denoiser, wrapped in classifier-free guidance unless the scale is 1."""
    if recipe.cfg_scale == 1.0:
        return denoiser
    if main.num_labels is None:
        raise RecipeError(f"cfg_scale: {recipe.model!r} is unconditional; classifier-free guidance needs a "
                          "class-conditional model (set cfg_scale to 1)")
    if recipe.uncond_model:
        uncond = registry.get(recipe.uncond_model)
        if uncond.num_labels is not None or uncond.kind != main.kind:
            raise RecipeError(f"uncond_model: {recipe.uncond_model!r} must be an unconditional {main.kind} model")
        same_process = uncond.diffusion is not None and (uncond.diffusion.steps, uncond.diffusion.noise_schedule) \
            == (main.diffusion.steps, main.diffusion.noise_schedule)
        if uncond.image_size != main.image_size or not same_process:
            raise RecipeError(f"uncond_model: {recipe.uncond_model!r} must have the image size and diffusion "
                              f"process of {recipe.model!r}")
        return ClassifierFreeGuidance(denoiser, recipe.cfg_scale, uncond_denoiser=networks.denoiser(uncond),
                                      rescale=recipe.cfg_rescale)
    if main.null_class is None:
        raise RecipeError(f"cfg_scale: {recipe.model!r} was not trained with a null label; name an "
                          "unconditional model of the same size (uncond_model) or set cfg_scale to 1")
    return ClassifierFreeGuidance(denoiser, recipe.cfg_scale, null_class=main.null_class, rescale=recipe.cfg_rescale)


def _low_res(recipe: Recipe, main, low_res: torch.Tensor | None, device) -> torch.Tensor | None:
    if main.kind != "superres":
        if low_res is not None:
            raise RecipeError(f"low_res: {recipe.model!r} is not a super-resolution model")
        return None
    if low_res is None:
        raise RecipeError("low_res: a super-resolution model needs low-resolution input images")
    if low_res.ndim != 4 or low_res.shape[:2] != (recipe.batch_size, 3):
        raise RecipeError(f"low_res: expected [{recipe.batch_size}, 3, h, w] images, got {list(low_res.shape)}")
    return low_res.to(device=device, dtype=torch.float32)


def _grid(recipe: Recipe, diffusion) -> Grid:
    try:
        return Grid.make(diffusion.noise_schedule, recipe.respacing, diffusion.steps, recipe.karras)
    except RespacingError as err:
        raise RecipeError(f"respacing: {err}") from None


def _noise(recipe: Recipe, noise: NoiseSource | None, shape: tuple[int, int, int], device) -> NoiseSource:
    if noise is None:
        return PerImageNoise.from_seed(recipe.seed, recipe.batch_size, shape, device)
    x_T = getattr(noise, "x_T", None)
    if isinstance(x_T, torch.Tensor) and tuple(x_T.shape) != (recipe.batch_size, *shape):
        raise RecipeError(f"noise: x_T has shape {list(x_T.shape)}, this run needs {[recipe.batch_size, *shape]}")
    return noise


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
