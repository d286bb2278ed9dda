"""Command line: python -m explore {sample,super-res} [official guided-diffusion flags] [extras].

The official flags are accepted verbatim (paste MODEL_FLAGS / CLASSIFIER_FLAGS /
SAMPLE_FLAGS from the guided-diffusion README); the extras are --class_label,
--cfg_scale, --sampler, --seed, --noise, --device and a few more (see --help).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from explore.engine import PRECISIONS, Recipe, RecipeError, plan
from explore.models.configs import parse_bool, parse_flag_args
from explore.noise import RecordedNoise
from explore.outputs import (SampleFileError, from_uint8, image_grid, load_samples_npz, normalise_images,
                             save_png, save_samples_npz, to_uint8)
from explore.registry import ModelRegistry
from explore.samplers import SAMPLERS
from explore.zoo import CheckpointError

EXTRA_FLAGS = {
    # name: (type, default, help)
    "sampler": (str, None, f"one of {', '.join(SAMPLERS)} (default ddpm, or ddim with --use_ddim True)"),
    "class_label": (int, None, "class for every image (default: a class per image from its seed)"),
    "cfg_scale": (float, 1.0, "classifier-free guidance scale (1 = conditional model)"),
    "uncond_model_path": (str, None, "unconditional checkpoint for two-model CFG"),
    "guidance_method": (str, "standard", "'standard' or 'conflict' (PixelAsParam projection)"),
    "seed": (int, 0, "image i uses seed + i"),
    "noise": (str, None, ".npz/.npy with x_T (and optional per-step 'steps') to start from"),
    "device": (str, None, "cpu, cuda, cuda:1, mps (default: best available)"),
    "precision": (str, "fp32", "fp32, bf16 or fp16 for the network forward"),
    "eta": (float, None, "DDIM / Euler-ancestral noise (default 0 for ddim, 1 for euler_a)"),
    "churn": (float, 0.0, "Heun stochastic churn"),
    "karras": (str, "False", "Karras sigmas for euler / euler_a / heun / dpmpp_2m"),
    "out_dir": (str, "samples", "where the .npz and the PNG grid go"),
    "base_samples": (str, None, "super-res: an .npz (NHWC or NCHW, labels optional) or a folder of images"),
}
SCRIPT_FLAGS = {"clip_denoised": "True", "num_samples": "16", "batch_size": "16", "use_ddim": "False",
                "model_path": None, "classifier_path": None, "classifier_scale": "1.0", "timestep_respacing": "250"}


class CLIError(Exception):
    pass


def split_flags(argv: list[str]) -> tuple[dict, dict, dict]:
    """--key value pairs -> (script/extra options, architecture flags for the models)."""
    try:
        flags = parse_flag_args(argv)
    except ValueError as err:
        raise CLIError(str(err)) from None
    options = {k: flags.pop(k) for k in list(flags) if k in EXTRA_FLAGS or k in SCRIPT_FLAGS}
    for key, default in SCRIPT_FLAGS.items():
        options.setdefault(key, default)
    for key, (_, default, _) in EXTRA_FLAGS.items():
        options.setdefault(key, default)
    classifier_flags = {k: v for k, v in flags.items() if k.startswith("classifier_") or k == "image_size"}
    model_flags = {k: v for k, v in flags.items() if not k.startswith("classifier_")}
    return options, model_flags, classifier_flags


def _typed(options: dict, key: str):
    value = options[key]
    if value is None:
        return None
    kind = EXTRA_FLAGS[key][0] if key in EXTRA_FLAGS else str
    try:
        return kind(value)
    except ValueError:
        raise CLIError(f"--{key} expects {kind.__name__}, got {value!r}") from None


def _int(options, key):
    try:
        return int(options[key])
    except ValueError:
        raise CLIError(f"--{key} expects a whole number, got {options[key]!r}") from None


def make_registry(options: dict, model_flags: dict, classifier_flags: dict) -> ModelRegistry:
    device = options["device"]
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError:
            raise CLIError(f"--device {device!r} is not a device (use cpu, cuda, cuda:0, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but no CUDA GPU is available")
    flags = {}
    if options["model_path"]:
        flags[options["model_path"]] = model_flags or None
    if options["classifier_path"]:
        has_own = any(k.startswith("classifier_") for k in classifier_flags)
        flags[options["classifier_path"]] = classifier_flags if has_own else None
    return ModelRegistry(root="checkpoints", device=device, flags=flags)


def recipe_from(options: dict, batch_size: int, seed: int) -> Recipe:
    sampler = options["sampler"] or ("ddim" if parse_bool(options["use_ddim"]) else "ddpm")
    classifier = options["classifier_path"]
    return Recipe(
        model=options["model_path"], class_label=_typed(options, "class_label"), sampler=sampler,
        respacing=options["timestep_respacing"], karras=parse_bool(options["karras"]),
        cfg_scale=_typed(options, "cfg_scale"), uncond_model=options["uncond_model_path"],
        classifier=classifier, classifier_scale=float(options["classifier_scale"]) if classifier else 0.0,
        guidance_method=options["guidance_method"], eta=_typed(options, "eta"), churn=_typed(options, "churn"),
        seed=seed, batch_size=batch_size, clip_denoised=parse_bool(options["clip_denoised"]),
        precision=options["precision"])


def run_batches(options, registry, total: int, batch_size: int, desc: str, low_res=None, labels=None):
    """Sample `total` images in batches; image i always uses seed + i. Returns uint8 NHWC, labels, recipe."""
    seed = _typed(options, "seed")
    noise_file = RecordedNoise.load(options["noise"], registry.device) if options["noise"] else None
    if noise_file is not None:
        total = batch_size = len(noise_file.x_T)
    images, all_labels, recipe = [], [], None
    first = recipe_from(options, min(batch_size, total), seed)
    first.validate()
    steps_per_batch = len(plan_grid_len(first))
    bar = tqdm(total=steps_per_batch * total, desc=desc, unit="img-step", file=sys.stderr)
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        recipe = recipe_from(options, count, seed + start)
        batch_low = None if low_res is None else low_res[start:start + count]
        batch_labels = None if labels is None else labels[start:start + count]
        run = plan(recipe, registry, noise=noise_file, low_res=batch_low, labels=batch_labels)
        last = None
        for last in run.steps():
            bar.update(count)
        images.append(to_uint8(last.x))
        if run.cond.labels is not None:
            all_labels.append(run.cond.labels.cpu().numpy())
    bar.close()
    labels_out = np.concatenate(all_labels) if all_labels else None
    return np.concatenate(images), labels_out, recipe_from(options, total, seed)


def plan_grid_len(recipe: Recipe):
    from explore.schedules import space_timesteps
    return space_timesteps(1000, recipe.respacing)


def write_outputs(out_dir: Path, images: np.ndarray, labels, recipe: Recipe, class_conditional: bool) -> Path:
    n, h, w, _ = images.shape
    npz = save_samples_npz(out_dir / f"samples_{n}x{h}x{w}x3.npz", images, labels if class_conditional else None)
    scale = max(1, 128 // w)
    save_png(image_grid(images, scale=scale), out_dir / f"samples_{n}x{h}x{w}x3.png", recipe.to_json(),
             {"labels": [] if labels is None else labels.tolist()})
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
    path = write_outputs(Path(options["out_dir"]), images, labels, recipe, conditional)
    print(f"saved {len(images)} samples to {path}")
    return 0


def read_base_samples(source: str) -> tuple[np.ndarray, np.ndarray | None]:
    path = Path(source)
    if path.is_dir():
        from PIL import Image
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise CLIError(f"--base_samples: no images in folder {source}")
        arrays = []
        for f in files:
            try:
                with Image.open(f) as img:
                    arrays.append(np.asarray(img.convert("RGB")))
            except OSError as err:
                raise CLIError(f"--base_samples: cannot read {f.name} ({err})") from None
        if len({a.shape for a in arrays}) != 1:
            raise CLIError("--base_samples: all images in the folder must have the same size")
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
    small = model.loaded.metadata.get("small_size") if hasattr(model.loaded, "metadata") else None
    if small and low_res.shape[-1] != small:
        raise CLIError(f"--base_samples are {low_res.shape[-1]} px but this upsampler expects {small} px")
    if model.num_labels is not None and labels is None:
        if options["class_label"] is not None:
            labels = np.full(len(images), int(options["class_label"]))
        elif options["classifier_path"]:
            labels = predict_labels(registry, options["classifier_path"], low_res)
            print(f"labels from {options['classifier_path']}: {labels.tolist()}")
        else:
            raise CLIError("these base samples carry no labels and the upsampler is class-conditional: "
                           "give --class_label N or --classifier_path to predict them")
    label_tensor = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
    options = dict(options, classifier_path=None, class_label=None)  # the classifier only labelled the inputs
    out, labels_out, recipe = run_batches(options, registry, len(images), _int(options, "batch_size"),
                                          "upsampling", low_res=low_res, labels=label_tensor)
    path = write_outputs(Path(options["out_dir"]), out, labels_out, recipe, class_conditional=False)
    print(f"saved {len(out)} upsampled images to {path}")
    return 0


def predict_labels(registry: ModelRegistry, classifier_name: str, images: torch.Tensor) -> np.ndarray:
    """Top-1 classes of clean images (t = 0) from a classifier."""
    clf = registry.get(classifier_name)
    if clf.kind not in ("classifier", "evaluator"):
        raise CLIError(f"--classifier_path {classifier_name} is a {clf.kind}, not a classifier")
    x = images.to(registry.device)
    if x.shape[-1] != clf.image_size:
        x = torch.nn.functional.interpolate(x, size=(clf.image_size, clf.image_size), mode="area")
    with torch.no_grad():
        logits = clf.module(x) if clf.kind == "evaluator" else clf.module(x, torch.zeros(len(x), dtype=torch.int64,
                                                                                            device=x.device))
    return logits.argmax(-1).cpu().numpy()


COMMANDS = {"sample": cmd_sample, "super-res": cmd_super_res}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        print("extras:")
        for name, (_, default, text) in EXTRA_FLAGS.items():
            print(f"  --{name:<18} {text} (default {default})")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if "-h" in argv[1:] or "--help" in argv[1:]:
        return main(["--help"])
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (CLIError, RecipeError, CheckpointError, SampleFileError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
