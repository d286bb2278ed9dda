"""Command line: python -m explore {sample,super-res} [official guided-diffusion flags] [extras].

The official flags are accepted verbatim (paste MODEL_FLAGS / CLASSIFIER_FLAGS /
SAMPLE_FLAGS from the guided-diffusion README); the extras (--class_label, --cfg_scale,
--sampler, --seed, --noise, --device, ...) and every official flag are listed below.
Writes samples_NxHxWx3.npz (arr_0 uint8 NHWC, arr_1 labels for class-conditional
runs) and a PNG grid that carries the recipe. Bad input: `error: ...` and exit code 2.
"""
from __future__ import annotations

import difflib
import os
import shlex
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from explore.classify import classify
from explore.engine import SeededStepNoise, plan
from explore.models.configs import (CLASSIFIER_DEFAULTS, MODEL_DEFAULTS, SCRIPT_DEFAULTS, SUPERRES_DEFAULTS,
                                    parse_flag_args)
from explore.noise import RecordedNoise
from explore.outputs import (SampleFileError, from_uint8, image_grid, load_samples_npz, normalise_images,
                             save_png, save_samples_npz, to_uint8)
from explore.registry import ModelRegistry
from explore.recipe import (AS_RECIPE, Flag, Kind, Number, Option, Recipe, RecipeError, Whole, applies,
                            defaults_of, options_of, sampler_option_names)
from explore.samplers import SAMPLERS, sampler_defaults
from explore.zoo import CheckpointError

SCRIPT_OPTIONS = {
    # the command line's own flags, not part of a recipe: name: (default, help)
    "batch_size": ("16", "images per batch (official flag); an image does not depend on the batch it is drawn in"),
    "use_ddim": ("False", "official flag: True means --sampler ddim"),
    "noise": (None, ".npz/.npy with x_T [N, 3, H, W] (and optional per-step 'steps' [K, N, 3, H, W]); "
                    "without steps the per-step noise comes from the seeds"),
    "device": (None, "cpu, cuda, cuda:1 or mps (default: CUDA, else MPS, else the CPU)"),
    "out_dir": ("samples", "where the .npz and the PNG grid go"),
    "base_samples": (None, "super-res: an .npz (NHWC or NCHW, labels optional) or a folder of images"),
}
ARCHITECTURE_FLAGS = {  # official guided-diffusion flags that describe a checkpoint's network
    "model architecture": MODEL_DEFAULTS, "classifier architecture": CLASSIFIER_DEFAULTS,
    "super-resolution architecture": SUPERRES_DEFAULTS}
OFFICIAL_FLAGS = {**SCRIPT_DEFAULTS, **CLASSIFIER_DEFAULTS, **SUPERRES_DEFAULTS, **MODEL_DEFAULTS}
GIVEN = "_given"  # options key: the flags that were on the command line (not defaults)


class CLIError(Exception):
    pass


def run_flags(recipe_type=Recipe) -> dict[str, tuple[str, Option]]:
    """Command-line flag -> (recipe field, its Option)."""
    return {flag: (name, opt) for name, opt in options_of(recipe_type).items() for flag in opt.flags}


def cli_defaults(recipe_type=Recipe) -> dict:
    """Every flag the command line reads for itself (not for the networks), with its default."""
    recipe_defaults = defaults_of(recipe_type)
    out = {opt.flag: recipe_defaults.get(name) if opt.cli_default is AS_RECIPE else opt.cli_default
           for name, opt in options_of(recipe_type).items()}
    return {**out, **{name: default for name, (default, _) in SCRIPT_OPTIONS.items()}}


def known_flags(recipe_type=Recipe) -> list[str]:
    return sorted({*OFFICIAL_FLAGS, *run_flags(recipe_type), *SCRIPT_OPTIONS})


def split_flags(argv: list[str], recipe_type=Recipe) -> tuple[dict, dict, dict]:
    """--key value pairs -> (run and command-line options, architecture flags for the models, for the classifier)."""
    try:
        flags = parse_flag_args(argv)
    except ValueError as err:
        raise CLIError(str(err)) from None
    known = known_flags(recipe_type)
    unknown = [k for k in flags if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"--{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
        raise CLIError(f"unknown flag{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; see --help")
    defaults = cli_defaults(recipe_type)
    aliases = {flag: opt.flag for flag, (_, opt) in run_flags(recipe_type).items()}
    options = {aliases.get(k, k): flags.pop(k) for k in list(flags) if k in defaults or k in aliases}
    options[GIVEN] = frozenset(options)
    for key, default in defaults.items():
        options.setdefault(key, default)
    classifier_flags = {k: v for k, v in flags.items() if k.startswith("classifier_") or k == "image_size"}
    model_flags = {k: v for k, v in flags.items() if not k.startswith("classifier_")}
    return options, model_flags, classifier_flags


def _typed(options: dict, key: str, kind: Kind = Kind()):
    """A flag's value read by its kind (text from the command line; defaults are already typed)."""
    value = options[key]
    if not isinstance(value, str):
        return value
    try:
        return kind.from_text(value)
    except ValueError:
        raise CLIError(f"--{key} expects {kind.what}, got {value!r}") from None


def _int(options, key):
    return _typed(options, key, Whole())


def _bool(options, key):
    return _typed(options, key, Flag())


def make_registry(options: dict, model_flags: dict, classifier_flags: dict) -> ModelRegistry:
    device = options["device"]
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError:
            raise CLIError(f"--device {device!r} is not a device (use cpu, cuda, cuda:0, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but no CUDA GPU is available")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CLIError("--device mps was asked for but MPS is not available")
        if device.type not in ("cpu", "cuda", "mps"):
            raise CLIError(f"--device {options['device']!r} is not supported (use cpu, cuda, cuda:0, mps)")
    flags = {}
    if options["model_path"]:
        flags[options["model_path"]] = model_flags or None
    if options["classifier_path"]:
        has_own = any(k.startswith("classifier_") for k in classifier_flags)
        flags[options["classifier_path"]] = classifier_flags if has_own else None
    return ModelRegistry(root="checkpoints", device=device, flags=flags)


def recipe_from(options: dict, batch_size: int, seed: int, recipe_type=Recipe) -> Recipe:
    """The recipe of `batch_size` images from seed `seed` that the command line's options describe."""
    values, defaults = {"batch_size": batch_size, "seed": seed}, defaults_of(recipe_type)
    for name, opt in options_of(recipe_type).items():
        if name not in values:
            needed = opt.needs is None or values.get(opt.needs) is not None
            values[name] = _typed(options, opt.flag, opt.kind) if needed else defaults[name]
    if values["sampler"] is None:
        values["sampler"] = "ddim" if _bool(options, "use_ddim") else "ddpm"
    return recipe_type(**values)


def recipe_from_command(command: str | list[str], recipe_type=Recipe) -> Recipe:
    """The Recipe a `python -m explore sample ...` command line describes (inverse of Recipe.cli_command)."""
    tokens = shlex.split(command) if isinstance(command, str) else list(command)
    if "sample" in tokens:
        tokens = tokens[tokens.index("sample") + 1:]
    options, _, _ = split_flags(tokens, recipe_type)
    if not options["model_path"]:
        raise CLIError("--model_path is required")
    return recipe_from(options, _int(options, "num_samples"), _int(options, "seed"), recipe_type)


def load_noise(options: dict, device) -> RecordedNoise | None:
    """The --noise file (x_T and optional per-step noise), checked; None without --noise."""
    source = options["noise"]
    if not source:
        return None
    path = Path(source)
    if not path.is_file():
        raise CLIError(f"--noise: {source} does not exist")
    try:
        noise = RecordedNoise.load(path, device)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CLIError(f"--noise: {path.name} cannot be used ({err})") from None
    if noise.x_T.shape[1] != 3:
        raise CLIError(f"--noise: x_T must be [N, 3, H, W], got {list(noise.x_T.shape)}")
    if noise.steps is not None and (noise.steps.ndim != 5 or noise.steps.shape[1:] != noise.x_T.shape):
        raise CLIError(f"--noise: 'steps' must be [K, {', '.join(map(str, noise.x_T.shape))}], "
                       f"got {list(noise.steps.shape)}")
    return noise


def _noise_slice(noise: RecordedNoise, start: int, count: int, seed: int):
    x_T = noise.x_T[start:start + count]
    if noise.steps is None:
        return SeededStepNoise(x_T, seed, noise.device)
    return RecordedNoise(x_T, noise.steps[:, start:start + count], noise.device)


def run_batches(options, registry, total: int, batch_size: int, desc: str, low_res=None, labels=None):
    """Sample `total` images in batches; image i always uses seed + i. Returns uint8 NHWC, labels, recipe."""
    seed = _int(options, "seed")
    noise_file = load_noise(options, registry.device)
    if noise_file is not None:
        available = len(noise_file.x_T)
        if "num_samples" not in options.get(GIVEN, ()) and low_res is None:
            total = available
        if total > available:
            raise CLIError(f"--noise holds x_T for {available} images, {total} are asked for")

    def make_plan(start: int):
        count = min(batch_size, total - start)
        recipe = recipe_from(options, count, seed + start)
        noise = None if noise_file is None else _noise_slice(noise_file, start, count, seed + start)
        batch_low = None if low_res is None else low_res[start:start + count]
        batch_labels = None if labels is None else labels[start:start + count]
        return plan(recipe, registry, noise=noise, low_res=batch_low, labels=batch_labels)

    run = make_plan(0)  # bad input fails here, before the progress bar appears
    if noise_file is not None and noise_file.steps is not None and len(noise_file.steps) < len(run.grid) \
            and SAMPLERS[run.recipe.sampler].draws_noise(run.recipe.sampler_options()):
        raise CLIError(f"--noise holds {len(noise_file.steps)} steps of noise; {run.recipe.sampler} with "
                       f"--timestep_respacing {run.recipe.respacing} needs {len(run.grid)}")
    images, all_labels = [], []
    bar = tqdm(total=len(run.grid) * total, desc=desc, unit="img-step", file=sys.stderr)
    try:
        for start in range(0, total, batch_size):
            if start:
                run = make_plan(start)
            last = None
            for last in run.steps():
                bar.update(run.recipe.batch_size)
            images.append(to_uint8(last.x))
            if run.cond.labels is not None:
                all_labels.append(run.cond.labels.cpu().numpy())
    finally:
        bar.close()
    labels_out = np.concatenate(all_labels) if all_labels else None
    return np.concatenate(images), labels_out, recipe_from(options, total, seed)


def write_outputs(out_dir: Path, images: np.ndarray, labels, recipe: Recipe, class_conditional: bool,
                  extra: dict | None = None) -> Path:
    """samples_NxHxWx3.npz as the original scripts write it, and a PNG grid carrying the recipe."""
    n, h, w, _ = images.shape
    npz = save_samples_npz(out_dir / f"samples_{n}x{h}x{w}x3.npz", images, labels if class_conditional else None)
    scale = max(1, 128 // w)
    texts = {"labels": [] if labels is None else labels.tolist(), **(extra or {})}
    save_png(image_grid(images, scale=scale), out_dir / f"samples_{n}x{h}x{w}x3.png", recipe.to_json(), texts)
    return npz


def cmd_sample(argv: list[str]) -> int:
    options, model_flags, classifier_flags = split_flags(argv)
    if not options["model_path"]:
        raise CLIError("--model_path is required (a checkpoint file, or a model name in checkpoints/)")
    registry = make_registry(options, model_flags, classifier_flags)
    total, batch = _int(options, "num_samples"), _int(options, "batch_size")
    if total < 1 or batch < 1:
        raise CLIError("--num_samples and --batch_size must be at least 1")
    images, labels, recipe = run_batches(options, registry, total, batch, "sampling")
    conditional = registry.get(recipe.model).num_labels is not None or bool(recipe.classifier)
    extra = {"command": recipe.cli_command(options["out_dir"], model_flags)}
    if options["noise"]:
        extra["noise"] = options["noise"]
    path = write_outputs(Path(options["out_dir"]), images, labels, recipe, conditional, extra)
    print(f"saved {len(images)} samples to {path}")
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_base_samples(source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 NHWC images (and labels or None) from an .npz sample file or a folder of images."""
    path = Path(source)
    if path.is_dir():
        from explore.uploads import UploadError, read_image
        from explore.validate import LIMITS
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CLIError(f"--base_samples: no images ({', '.join(IMAGE_SUFFIXES)}) in folder {source}")
        arrays = []
        for f in files:
            try:
                arrays.append(read_image(f, LIMITS, "--base_samples").pixels)
            except UploadError as err:
                raise CLIError(str(err)) from None
        sizes = sorted({a.shape[:2] for a in arrays})
        if len(sizes) != 1:
            raise CLIError(f"--base_samples: all images in the folder must have the same size, found {sizes}")
        return normalise_images(np.stack(arrays), source), None
    if not path.is_file():
        raise CLIError(f"--base_samples: {source} does not exist")
    return load_samples_npz(path)


def cmd_super_res(argv: list[str]) -> int:
    options, model_flags, classifier_flags = split_flags(argv)
    if not options["model_path"] or not options["base_samples"]:
        raise CLIError("--model_path and --base_samples are required")
    registry = make_registry(options, model_flags, classifier_flags)
    model = registry.get(options["model_path"])
    if model.kind != "superres":
        raise CLIError(f"--model_path {options['model_path']} is a {model.kind} model, not an upsampler")
    images, labels = read_base_samples(options["base_samples"])
    low_res = from_uint8(images)
    small = model.loaded.metadata.get("small_size")
    if small and tuple(low_res.shape[-2:]) != (small, small):
        raise CLIError(f"--base_samples are {low_res.shape[-1]}x{low_res.shape[-2]} px but this upsampler "
                       f"expects {small}x{small} px")
    class_label = _int(options, "class_label")
    if model.num_labels is None:
        labels = None
    elif class_label is not None:
        labels = np.full(len(images), class_label)
    elif labels is None:
        if options["classifier_path"]:
            labels = predict_labels(registry, options["classifier_path"], low_res)
            print(f"labels from {options['classifier_path']}: {labels.tolist()}")
        else:
            raise CLIError("these base samples carry no labels and the upsampler is class-conditional: "
                           "give --class_label N or --classifier_path to predict them")
    limit = model.loaded.num_classes  # label-embedding size: the null class (if any) upsamples without a class
    if labels is not None and not ((labels >= 0) & (labels < limit)).all():
        bad = sorted({int(y) for y in labels if not 0 <= y < limit})
        null = f", {model.null_class} = the null class" if model.null_class is not None else ""
        raise CLIError(f"labels {bad} are outside the upsampler's classes [0, {model.num_labels - 1}]{null}")
    label_tensor = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
    options = dict(options, classifier_path=None, class_label=None)  # the classifier only labelled the inputs
    out, labels_out, recipe = run_batches(options, registry, len(images), _int(options, "batch_size"),
                                          "upsampling", low_res=low_res, labels=label_tensor)
    path = write_outputs(Path(options["out_dir"]), out, labels_out, recipe, class_conditional=False,
                         extra={"base_samples": options["base_samples"]})
    print(f"saved {len(out)} upsampled images to {path}")
    return 0


def predict_labels(registry: ModelRegistry, classifier_name: str, images: torch.Tensor) -> np.ndarray:
    """Top-1 classes of clean images (t = 0) from a classifier."""
    clf = registry.get(classifier_name)
    if clf.kind not in ("classifier", "evaluator"):
        raise CLIError(f"--classifier_path {classifier_name} is a {clf.kind}, not a classifier")
    return classify(clf, images).probs.argmax(-1).cpu().numpy()


COMMANDS = {"sample": cmd_sample, "super-res": cmd_super_res}


def help_text(recipe_type=Recipe) -> str:
    """Every flag, grouped, with its default: the run options from the recipe's definitions, the command line's
    own, and the official architecture flags."""
    groups: dict[str, list[tuple[str, str]]] = {"run options (written into every image's recipe)": [],
                                                "guidance": [], "command line": []}
    defaults = cli_defaults(recipe_type)
    for name, opt in options_of(recipe_type).items():
        default = defaults[opt.flag]
        text = opt.help + _applies_text(recipe_type, name, opt)
        if name == "sampler":
            text += " (default ddpm, or ddim with --use_ddim True)"
        elif name == "model":
            text += " (required)"
        elif default is not None and name not in sampler_option_names(recipe_type) and name != "karras":
            text += f" (default {opt.kind.text(default) or repr('')})"
        names = " / ".join(f"--{flag}" for flag in opt.flags)
        groups["guidance" if opt.group == "guidance" else "run options (written into every image's recipe)"].append(
            (names, text))
    for name, (default, text) in SCRIPT_OPTIONS.items():
        groups["command line"].append((f"--{name}", text + ("" if default is None else f" (default {default})")))
    lines = [__doc__.strip(), ""]
    for title, rows in groups.items():
        lines.append(f"{title}:")
        lines += [f"  {flag:<22} {text}" for flag, text in rows]
        lines.append("")
    lines.append("official architecture flags (checkpoints recognised by name or that describe themselves need "
                 "none), with their defaults:")
    for title, table in ARCHITECTURE_FLAGS.items():
        lines.append(f"  {title}:")
        row = ""
        for flag in (f"--{k} {v if v != '' else repr('')}" for k, v in table.items() if k not in defaults):
            if row and len(row) + len(flag) > 106:
                lines.append("    " + row)
                row = ""
            row += ("  " if row else "") + flag
        lines.append("    " + row)
    return "\n".join(lines)


def _applies_text(recipe_type, name: str, opt: Option) -> str:
    """Where the option applies (recipe.applies), as --help says it."""
    if opt.needs:
        return f" (with --{options_of(recipe_type)[opt.needs].flag})"
    takers = [sampler for sampler in SAMPLERS if applies(recipe_type, name, {"sampler": sampler})]
    if len(takers) == len(SAMPLERS):
        return ""
    if name in sampler_option_names(recipe_type):  # with each sampler's own default
        takers = [f"{sampler} (default {Number().text(sampler_defaults(sampler)[name])})" for sampler in takers]
    return "; for " + ", ".join(takers)


def print_help(file=None) -> None:
    print(help_text(), file=file or sys.stdout)


# Recipe fields as the command line spells them, for error messages (a recipe's batch is one --batch_size chunk).
RECIPE_FIELD_FLAGS = {**{name: opt.flag for name, opt in options_of(Recipe).items()}, "batch_size": "batch_size"}


def one_line(err: BaseException) -> str:
    """An error as one line (multi-line explanations joined); recipe fields named by their flags."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip()) or type(err).__name__
    if isinstance(err, RecipeError):
        field, sep, rest = text.partition(": ")
        if sep and field.isidentifier() and field not in ("low_res", "labels", "recipe"):
            text = f"--{RECIPE_FIELD_FLAGS.get(field, field)}: {rest}"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "-h" in argv[1:] or "--help" in argv[1:]:
        print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CLIError, RecipeError, CheckpointError, SampleFileError, ValueError, KeyError, OSError,
            RuntimeError) as err:
        if os.environ.get("EXPLORE_TRACEBACK"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
