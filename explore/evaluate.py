"""Evaluate the built-in model family and write its model card: python -m explore.evaluate

Samples the base model over classifier-free and classifier-guidance scales
(fixed seeds, balanced classes) and grades the samples with the separate
evaluation classifier against real renders from held-out seeds: accuracy on the
requested class, Frechet distance and k-NN precision / recall in its feature
space, and within-class diversity. Upsamples held-out 32 px renders to 128 px and
compares them with the true 128 px renders (PSNR / SSIM), next to bicubic.
Writes <out>/README.md (the card) and <out>/model_card.json (every number).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from explore import metrics
from explore.data import scenes
from explore.engine import Recipe, plan
from explore.machine import describe
from explore.outputs import from_uint8, image_grid, to_uint8
from explore.registry import ModelRegistry
from explore.samplers import SAMPLERS
from explore.schedules import space_timesteps

BASE, CLASSIFIER = "scenes32_base", "scenes32_classifier"
EVALUATOR, UPSAMPLER = "scenes32_evaluator", "scenes128_upsampler"
MODELS = (BASE, CLASSIFIER, EVALUATOR, UPSAMPLER)
TRAIN_KIND = {BASE: "base", CLASSIFIER: "classifier", EVALUATOR: "evaluator", UPSAMPLER: "upsampler"}

# Bars the card states as met / not met.
ACCURACY_BAR = 0.90  # evaluation accuracy at CFG scale ACCURACY_BAR_SCALE
ACCURACY_BAR_SCALE = 3.0
PSNR_BAR_DB = 1.0  # upsampler PSNR minus bicubic PSNR
# The trade-off: as the guidance scale grows these rise (+1) or fall (-1).
TRADE_OFF = {"accuracy": +1, "precision": +1, "diversity": -1, "recall": -1}


@dataclass(frozen=True)
class EvalSettings:
    """Everything that determines the numbers in the card."""

    samples: int = 256  # generated images per guidance setting (classes balanced: image i has class i mod C)
    batch: int = 64  # sampling batch size (results do not depend on it: image i always uses seed + i)
    sampler: str = "ddim"  # base-model sampler
    respacing: str = "50"  # base-model timestep respacing
    cfg_scales: tuple[float, ...] = (0.0, 1.0, 3.0, 5.0)  # eps_u + s (eps_c - eps_u)
    classifier_scales: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0)  # from the unconditional model (CFG 0)
    samplers: tuple[str, ...] = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m")  # classifier guidance each
    sampler_samples: int = 48  # images per (sampler, scale) setting
    guard: float = 0.995  # dynamic-thresholding percentile of the guarded row at the largest classifier scale
    seed: int = 0  # image i of every setting starts from seed + i
    real_seed: int = 10_000  # held-out scenes (training draws default_rng([0, step]))
    k: int = 3  # neighbourhood size of precision / recall
    sr_samples: int = 64  # held-out scenes for the upsampler
    sr_batch: int = 16
    sr_sampler: str = "ddim"
    sr_respacing: str = "50"  # measured slightly better than 25 or 10 steps in probes
    sr_seed: int = 20_000  # held-out scenes for the upsampler; its noise uses the same seeds
    precision: str = "fp32"  # network forward precision: fp32, bf16 or fp16
    quick: bool = False  # smoke-test sizes; the numbers mean little


QUICK = dict(samples=16, batch=16, respacing="10", sampler_samples=8, sr_samples=4, sr_batch=4, sr_respacing="5",
             quick=True)
SATURATION_BAR = 0.05  # classifier guidance: saturated-pixel fraction at most this much above the unguided run's
STEADY = 2  # "rises steadily": no scale's accuracy below the previous one's by more than this many images' share


# --- sampling and features ------------------------------------------------------------------------

def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) % num_classes


def real_renders(seed: int, labels: torch.Tensor, size: int = 32) -> np.ndarray:
    """uint8 NHWC renders of held-out scenes with the given labels (one rng per call, as render_batch)."""
    images, _ = scenes.render_batch(seed, len(labels), size, labels=labels.numpy())
    return images


def sample_base(registry: ModelRegistry, settings: EvalSettings, labels: torch.Tensor, cfg_scale: float,
                classifier_scale: float, bar: tqdm | None = None, sampler: str | None = None,
                dynamic_threshold: float = 0.0) -> np.ndarray:
    """uint8 NHWC samples of the base model; image i has label labels[i] and seed settings.seed + i."""
    out = []
    for start in range(0, len(labels), settings.batch):
        batch = labels[start:start + settings.batch]
        recipe = Recipe(model=BASE, sampler=sampler or settings.sampler, respacing=settings.respacing,
                        cfg_scale=cfg_scale, classifier=CLASSIFIER if classifier_scale else None,
                        classifier_scale=classifier_scale, dynamic_threshold=dynamic_threshold,
                        seed=settings.seed + start, batch_size=len(batch), precision=settings.precision)
        last = None
        for last in plan(recipe, registry, labels=batch).steps():
            if bar is not None:
                bar.update(len(batch))
        out.append(to_uint8(last.x))
    return np.concatenate(out)


@torch.no_grad()
def evaluator_outputs(evaluator: torch.nn.Module, images: np.ndarray, device, batch: int = 256):
    """(features [N, D], logits [N, C]) of uint8 NHWC images."""
    feats, logits = [], []
    for start in range(0, len(images), batch):
        x = from_uint8(images[start:start + batch]).to(device)
        f = evaluator.features(x)
        feats.append(f.float().cpu())
        logits.append(evaluator.head(f).float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def grade(features: np.ndarray, logits: np.ndarray, images: np.ndarray, labels: np.ndarray,
          real_features: np.ndarray, k: int) -> dict:
    """Every sweep metric of one set of images against the real reference features."""
    correct = logits.argmax(1) == labels
    precision, recall = metrics.precision_recall(real_features, features, k)
    return {
        "accuracy": float(correct.mean()),
        "per_class_accuracy": [float(correct[labels == c].mean()) if np.any(labels == c) else float("nan")
                               for c in range(logits.shape[1])],
        "frechet_distance": metrics.frechet_distance_features(real_features, features),
        "precision": precision,
        "recall": recall,
        "diversity": metrics.diversity(features, labels),
        "pixel_std": metrics.pixel_std(images, labels),
        "saturated": metrics.saturated_fraction(images),
        "grain": metrics.grain(images),
    }


# --- the three parts of the card ----------------------------------------------------------------

def model_facts(registry: ModelRegistry, names=MODELS) -> tuple[dict, dict]:
    """({name: facts} of the checkpoints that load, {name: why not} of the others)."""
    facts, missing = {}, {}
    files = registry.available()
    for name in names:
        if name not in files:
            missing[name] = (f"{name} not found in {registry.root}/ (train and export it: python -m explore.train "
                             f"{TRAIN_KIND[name]} --export {registry.root}/{name}.safetensors)")
            continue
        try:
            entry = registry.get(name)
        except Exception as err:  # a corrupt or mismatched file is reported, not fatal
            missing[name] = f"{name} could not be loaded: {err}"
            continue
        diffusion = entry.diffusion
        facts[name] = {
            "kind": entry.kind,
            "parameters": sum(p.numel() for p in entry.module.parameters()),
            "file_mb": round(files[name].stat().st_size / 2 ** 20, 2),
            "image_size": entry.image_size,
            "classes": entry.class_names,
            "training": entry.loaded.metadata.get("training"),
            "diffusion": None if diffusion is None else {"steps": diffusion.steps,
                                                         "noise_schedule": diffusion.noise_schedule,
                                                         "prediction": "v" if diffusion.predict_v else "eps"},
        }
    return facts, missing


def guidance_sweep(registry: ModelRegistry, settings: EvalSettings, with_classifier: bool) -> dict:
    """Sample every guidance setting and grade it; also grade a second set of real renders as the ceiling."""
    device = registry.device
    evaluator = registry.get(EVALUATOR).module
    num_classes = registry.get(BASE).num_labels
    labels = balanced_labels(settings.samples, num_classes)
    labels_np = labels.numpy()

    real = real_renders(settings.real_seed, labels)
    real_features, _ = evaluator_outputs(evaluator, real, device)
    held_out = real_renders(settings.real_seed + 1, labels)
    real_row = {"guidance": "real", "scale": None, "cfg_scale": None, "classifier_scale": None,
                "seed": settings.real_seed + 1, "samples": len(held_out),
                **grade(*evaluator_outputs(evaluator, held_out, device), held_out, labels_np, real_features,
                        settings.k)}

    # (cfg_scale, classifier_scale) of every setting; classifier guidance runs on the unconditional model, where
    # it has something to do (the conditional model is right about the class without it).
    wanted = [("cfg", s, s, 0.0) for s in settings.cfg_scales]
    if with_classifier:
        wanted += [("classifier", s, 0.0, s) for s in settings.classifier_scales]
    unique = sorted({(c, g) for _, _, c, g in wanted})
    steps = len(space_timesteps(registry.get(BASE).diffusion.steps, settings.respacing))
    bar = tqdm(total=len(unique) * settings.samples * steps, desc="guidance sweep", unit="img-step",
               dynamic_ncols=True, file=sys.stderr)
    graded, grids = {}, {}
    for cfg_scale, classifier_scale in unique:
        bar.set_postfix(cfg=cfg_scale, classifier=classifier_scale)
        tick = time.time()
        images = sample_base(registry, settings, labels, cfg_scale, classifier_scale, bar)
        seconds = time.time() - tick
        graded[cfg_scale, classifier_scale] = {
            **grade(*evaluator_outputs(evaluator, images, device), images, labels_np, real_features, settings.k),
            "seconds": round(seconds, 1), "img_steps_per_s": round(len(images) * steps / seconds, 1)}
        grids[cfg_scale, classifier_scale] = images[:num_classes]
    bar.close()

    rows = {"cfg": [], "classifier": []}
    for family, scale, cfg_scale, classifier_scale in wanted:
        rows[family].append({"guidance": family, "scale": scale, "cfg_scale": cfg_scale,
                             "classifier_scale": classifier_scale, "seed": settings.seed,
                             "samples": settings.samples, **graded[cfg_scale, classifier_scale]})
    return {"real": real_row, "cfg": rows["cfg"], "classifier": rows["classifier"], "steps": steps,
            "grids": grids, "real_grid": held_out[:num_classes], "real_features": real_features,
            "class_names": registry.get(BASE).class_names or list(scenes.CLASS_NAMES[:num_classes])}


def sampler_sweep(registry: ModelRegistry, settings: EvalSettings, real_features: np.ndarray) -> dict:
    """Classifier guidance from the unconditional model (CFG 0) with every sampler, graded like the main sweep
    (against its `real_features`); the largest scale once more with dynamic thresholding (settings.guard)."""
    device = registry.device
    evaluator = registry.get(EVALUATOR).module
    num_classes = registry.get(BASE).num_labels
    labels = balanced_labels(settings.sampler_samples, num_classes)
    settings_list = [(sampler, scale, 0.0) for sampler in settings.samplers for scale in settings.classifier_scales]
    settings_list += [(sampler, max(settings.classifier_scales), settings.guard) for sampler in settings.samplers]
    steps = len(space_timesteps(registry.get(BASE).diffusion.steps, settings.respacing))
    bar = tqdm(total=len(settings_list) * len(labels) * steps, desc="samplers", unit="img-step", dynamic_ncols=True,
               file=sys.stderr)
    rows, grids = [], {}
    for sampler, scale, guard in settings_list:
        bar.set_postfix(sampler=sampler, classifier=scale, guard=guard)
        tick = time.time()
        images = sample_base(registry, settings, labels, 0.0, scale, bar, sampler=sampler, dynamic_threshold=guard)
        graded = grade(*evaluator_outputs(evaluator, images, device), images, labels.numpy(), real_features,
                       settings.k)
        rows.append({"sampler": sampler, "scale": scale, "guard": guard, "samples": len(images),
                     "seconds": round(time.time() - tick, 1), **graded})
        grids[sampler, scale, guard] = images[:num_classes]
    bar.close()
    return {"rows": rows, "grids": grids, "steps": steps}


def sampler_bar(sampler: str, rows: list[dict], samples: int) -> dict:
    """From the unconditional model: accuracy rises steadily with the classifier scale, diversity falls, and the
    saturated-pixel fraction stays within SATURATION_BAR of the unguided run's (at the largest scale, with
    dynamic thresholding where the plain run does not)."""
    plain = sorted((r for r in rows if r["sampler"] == sampler and not r["guard"]), key=lambda r: r["scale"])
    guarded = next((r for r in rows if r["sampler"] == sampler and r["guard"]), None)
    accuracy = [r["accuracy"] for r in plain]
    steady = all(b >= a - STEADY / samples for a, b in zip(accuracy, accuracy[1:])) and accuracy[-1] > accuracy[0]
    diversity_falls = plain[-1]["diversity"] < plain[0]["diversity"]
    limit = plain[0]["saturated"] + SATURATION_BAR
    plain_ok = all(r["saturated"] <= limit for r in plain)
    guard_ok = guarded is not None and all(r["saturated"] <= limit for r in plain[:-1]) \
        and guarded["saturated"] <= limit
    measured = (f"scale {plain[0]['scale']:g} -> {plain[-1]['scale']:g}: accuracy "
                + " -> ".join(f"{a:.0%}" for a in accuracy)
                + f", diversity {plain[0]['diversity']:.3f} -> {plain[-1]['diversity']:.3f}, saturated "
                + " -> ".join(f"{r['saturated']:.1%}" for r in plain))
    if guarded is not None:
        measured += (f"; scale {guarded['scale']:g} with dynamic thresholding {guarded['guard']:g}: accuracy "
                     f"{guarded['accuracy']:.0%}, saturated {guarded['saturated']:.1%}")
    how = "" if plain_ok else (" (with dynamic thresholding at the largest scale)" if guard_ok else "")
    return {"name": f"classifier guidance from the unconditional model, {sampler}: accuracy rises steadily, diversity "
                    f"falls, saturated pixels within {SATURATION_BAR:.0%} of the unguided run",
            "measured": measured + how, "met": steady and diversity_falls and (plain_ok or guard_ok)}


def evaluate_upsampler(registry: ModelRegistry, settings: EvalSettings, with_evaluator: bool) -> dict:
    """PSNR / SSIM of the upsampler and of bicubic against true renders of held-out scenes."""
    model = registry.get(UPSAMPLER)
    large = model.image_size
    small = model.loaded.metadata.get("small_size") or large // 4
    num_classes = model.num_labels or len(scenes.CLASS_NAMES)
    labels = balanced_labels(settings.sr_samples, num_classes)
    rng = np.random.default_rng(settings.sr_seed)
    params = scenes.sample_params(rng, labels.numpy())
    low = (scenes.render(params, small) * 255 + 0.5).astype(np.uint8)
    truth = (scenes.render(params, large) * 255 + 0.5).astype(np.uint8)
    bicubic = np.stack([np.asarray(Image.fromarray(im).resize((large, large), Image.BICUBIC)) for im in low])

    steps = len(space_timesteps(model.diffusion.steps, settings.sr_respacing))
    bar = tqdm(total=len(low) * steps, desc="upsampler", unit="img-step", dynamic_ncols=True, file=sys.stderr)
    low_res, out, first_x0 = from_uint8(low), [], []
    tick = time.time()
    for start in range(0, len(low), settings.sr_batch):
        stop = start + settings.sr_batch
        recipe = Recipe(model=UPSAMPLER, sampler=settings.sr_sampler, respacing=settings.sr_respacing,
                        seed=settings.sr_seed + start, batch_size=len(low_res[start:stop]),
                        precision=settings.precision)
        last = None
        for last in plan(recipe, registry, low_res=low_res[start:stop],
                         labels=labels[start:stop] if model.num_labels is not None else None).steps():
            if last.index == 0:  # from pure noise: the network's estimate of E[x0 | low-res, class]
                first_x0.append(to_uint8(last.pred_x0))
            bar.update(len(low_res[start:stop]))
        out.append(to_uint8(last.x))
    bar.close()
    seconds = time.time() - tick
    upsampled = np.concatenate(out)

    result = {"samples": len(low), "seed": settings.sr_seed, "small_size": small, "large_size": large,
              "sampler": settings.sr_sampler, "respacing": settings.sr_respacing, "steps": steps,
              "seconds": round(seconds, 1), "img_steps_per_s": round(len(low) * steps / seconds, 2)}
    for name, images in [("upsampler", upsampled), ("first_step_x0", np.concatenate(first_x0)),
                         ("bicubic", bicubic)]:
        psnr, ssim = metrics.psnr(truth, images), metrics.ssim(truth, images)
        result[name] = {"psnr": float(psnr.mean()), "psnr_std": float(psnr.std()),
                        "ssim": float(ssim.mean()), "ssim_std": float(ssim.std())}
    result["psnr_gain_db"] = result["upsampler"]["psnr"] - result["bicubic"]["psnr"]
    result["first_step_x0_gain_db"] = result["first_step_x0"]["psnr"] - result["bicubic"]["psnr"]
    if with_evaluator:  # does the upsampler keep the class? (the evaluator sees 32 px area-downscales)
        evaluator = registry.get(EVALUATOR).module
        for name, images in [("upsampler", upsampled), ("bicubic", bicubic), ("truth", truth)]:
            _, logits = evaluator_outputs(evaluator, images, registry.device, batch=32)
            result.setdefault("evaluator_accuracy", {})[name] = float((logits.argmax(1) == labels.numpy()).mean())
    result["examples"] = (low[:4], bicubic[:4], upsampled[:4], truth[:4])
    return result


# --- bars ------------------------------------------------------------------------------------------

def trade_off(rows: list[dict]) -> dict:
    """Does every TRADE_OFF metric move the expected way from the smallest to the largest scale?"""
    rows = sorted(rows, key=lambda r: r["scale"])
    lo, hi = rows[0], rows[-1]
    # a metric already at its bound at both ends (accuracy 100% without guidance) cannot move: saturated,
    # which the card says, rather than counting it as moving the wrong way
    bound = {m: (1.0 if sign > 0 else 0.0) for m, sign in TRADE_OFF.items()}
    saturated = [m for m in TRADE_OFF if lo[m] == hi[m] == bound[m]]
    moves = {m: (hi[m] - lo[m]) * sign > 0 or m in saturated for m, sign in TRADE_OFF.items()}
    monotone = {m: all((b[m] - a[m]) * sign >= 0 for a, b in zip(rows, rows[1:])) for m, sign in TRADE_OFF.items()}
    return {"met": all(moves.values()), "moves": moves, "monotone": monotone, "saturated": saturated,
            "from": {m: lo[m] for m in TRADE_OFF}, "to": {m: hi[m] for m in TRADE_OFF},
            "scales": [lo["scale"], hi["scale"]]}


def bars(sweep: dict | None, upsampler: dict | None, missing: dict, samplers: dict | None = None,
         samples: int = 0) -> list[dict]:
    """Each bar: name, measured (text), met (True / False / None = not evaluated), reason when not evaluated."""
    out = []

    def not_evaluated(name, reason):
        out.append({"name": name, "measured": "-", "met": None, "reason": reason})

    name = f"evaluation accuracy at CFG {ACCURACY_BAR_SCALE:g} >= {ACCURACY_BAR:.0%}"
    row = next((r for r in (sweep or {}).get("cfg", []) if r["scale"] == ACCURACY_BAR_SCALE), None)
    if row is None:
        not_evaluated(name, _why(sweep, missing) or f"CFG scale {ACCURACY_BAR_SCALE:g} was not sampled")
    else:
        out.append({"name": name, "measured": f"{row['accuracy']:.1%}", "met": row["accuracy"] >= ACCURACY_BAR})

    for family, label in [("cfg", "CFG"), ("classifier", "classifier guidance")]:
        name = (f"trade-off ({label}): accuracy and precision rise, diversity and recall fall as the scale grows")
        rows = (sweep or {}).get(family, [])
        if len(rows) < 2:
            reason = _why(sweep, missing) or (_needs(missing, CLASSIFIER) if family == "classifier" else None)
            not_evaluated(name, reason or "fewer than two scales were sampled")
            continue
        t = trade_off(rows)
        measured = ", ".join(f"{m} {_fmt(m, t['from'][m])} -> {_fmt(m, t['to'][m])}"
                             + (" (saturated: at its bound at both scales)" if m in t["saturated"] else "")
                             for m in TRADE_OFF)
        out.append({"name": name, "measured": f"scale {t['scales'][0]:g} -> {t['scales'][1]:g}: {measured}",
                    "met": t["met"], "detail": t})

    name = f"upsampler beats bicubic by >= {PSNR_BAR_DB:g} dB PSNR"
    if upsampler is None:
        not_evaluated(name, _needs(missing, UPSAMPLER) or "the upsampler was not evaluated")
    else:
        gain = upsampler["psnr_gain_db"]
        measured = f"{gain:+.2f} dB ({upsampler['upsampler']['psnr']:.2f} vs {upsampler['bicubic']['psnr']:.2f} dB)"
        if "first_step_x0_gain_db" in upsampler:
            measured += (f"; the network's one-evaluation estimate (x0 predicted at the first step) "
                         f"{upsampler['first_step_x0_gain_db']:+.2f} dB")
        out.append({"name": name + " (samples)", "measured": measured, "met": gain >= PSNR_BAR_DB})
    if samplers is not None:
        out += [sampler_bar(name, samplers["rows"], samples) for name in dict.fromkeys(r["sampler"]
                                                                                      for r in samplers["rows"])]
    return out


def _needs(missing: dict, *names: str) -> str | None:
    absent = [n for n in names if n in missing]
    return f"needs {' and '.join(absent)}, see above" if absent else None


def _why(sweep, missing) -> str | None:
    if sweep is not None:
        return None
    return _needs(missing, BASE, EVALUATOR) or "the guidance sweep did not run"


# --- the card ---------------------------------------------------------------------------------------

GUIDANCE_LABELS = {"real": "real renders", "cfg": "CFG", "classifier": "classifier"}
FORMATS = {"saturated": "{:.1%}", "grain": "{:.1f}", "accuracy": "{:.1%}", "per_class": "{:.0%}", "frechet_distance": "{:.2f}", "precision": "{:.3f}",
           "recall": "{:.3f}", "diversity": "{:.3f}", "pixel_std": "{:.4f}"}


def _fmt(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return FORMATS.get(metric, "{:.3g}").format(value)


def render_card(report: dict) -> str:
    s = report["settings"]
    m = report["machine"]
    lines = ["# Built-in model family: procedural scenes", "",
             "Generated by `" + report["command"] + f"` on {report['date']} "
             f"({report['seconds'] / 60:.1f} minutes). Every number below comes from that run; "
             "`model_card.json` beside this file holds them all. Re-run the command to refresh the card.", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['torch_threads']} PyTorch threads, "
             f"device {report['device']}, {m['platform']}, Python {m['python']}, torch {m['torch']}"
             + (f", GPU {m['gpu']}" if "gpu" in m else "") + "."]
    if s["quick"]:
        lines += ["", "**Quick mode:** a smoke test with very few samples and sampling steps; these numbers "
                  "say nothing about the models."]
    if report["missing"]:
        lines += ["", "Not evaluated:"] + [f"- {why}" for why in report["missing"].values()]

    lines += ["", "## Bars", "", "| bar | measured | status |", "|---|---|---|"]
    for bar in report["bars"]:
        status = {True: "**met**", False: "**not met**", None: "not evaluated"}[bar["met"]]
        if bar["met"] is None:
            status += f" ({bar['reason']})"
        lines.append(f"| {bar['name']} | {bar['measured']} | {status} |")
    lines += ["", f"The trade-off bar compares the smallest with the largest scale for each of "
              f"{', '.join(TRADE_OFF)}; the sweep tables show every scale."]

    lines += ["", "## Models", "", "| model | kind | parameters | output | training steps | batch | images seen | "
              "training minutes | data | seed |", "|---|---|---:|---|---:|---:|---:|---:|---|---:|"]
    staged = []
    for name, f in report["models"].items():
        t = f.get("training") or {}
        diffusion = f.get("diffusion")
        if f["kind"] == "classifier":  # a noisy classifier reads x_t of the base's process
            output = f"logits of {diffusion['noise_schedule']} x_t" if diffusion else "logits"
        else:
            output = f"{diffusion['noise_schedule']}, {diffusion.get('prediction', 'eps')}" if diffusion else "logits"
        lines.append(f"| {name} | {f['kind']} | {f['parameters']:,} | {output} | {t.get('steps', '-')} | "
                     f"{t.get('batch_size', '-')} | {t.get('images_seen', '-')} | {t.get('cpu_minutes', '-')} | "
                     f"{t.get('data', '-')} | {t.get('seed', '-')} |")
        if len(t.get("stages") or ()) > 1:
            staged.append(f"{name}: " + ", then ".join(f"{st['steps']} steps predicting {st['prediction']} "
                                                        f"({st['minutes']} min)" for st in t["stages"]))
    if staged:
        lines += ["", "Trained in stages (a later stage starts from the earlier weights): " + "; ".join(staged) + "."]
    lines += ["", "Training minutes are the training script's wall-clock time per step, summed over its runs "
              "(which need not have been on the machine this card ran on); they include time the job shared its "
              "machine with other work."]

    sweep = report["guidance_sweep"]
    if sweep is not None:
        lines += ["", "## Base model: guidance sweep", "",
                  f"`{BASE}` sampled with {s['sampler']}, respacing \"{s['respacing']}\" ({sweep['steps']} steps), "
                  f"precision {s['precision']}, {s['samples']} images per setting (balanced: image i asks for class "
                  f"i mod {len(sweep['class_names'])}, starts from seed {s['seed']} + i; the same seeds in every "
                  f"setting). CFG scale s means eps_u + s (eps_c - eps_u) (0 = unconditional, 1 = conditional); "
                  f"classifier guidance uses `{CLASSIFIER}` from the unconditional model (CFG 0), where it has "
                  f"something to do, so its scale 0 is the CFG 0 sample set.", "",
                  f"Graded by `{EVALUATOR}` (never used for guidance) against {s['samples']} real renders of "
                  f"held-out scenes (seed {s['real_seed']}; training draws from default_rng([0, step])). Accuracy: "
                  f"the evaluator's top-1 class equals the requested one. FD: Frechet distance of Gaussians fitted "
                  f"to evaluator features. Precision / recall: k = {s['k']} nearest-neighbour balls (Kynkaanniemi et "
                  f"al. 2019). Diversity: mean pairwise feature distance within a class, averaged over classes. "
                  f"Pixel std: per-pixel standard deviation within a class ([0, 1] units). Saturated: the fraction "
                  f"of pixels with a channel at 0 or 255. Grain: mean absolute difference of neighbouring pixels "
                  f"(0-255), which noise left by the sampler raises above the real renders'. The first row grades "
                  f"another {s['samples']} real renders (seed {s['real_seed'] + 1}): what a perfect model scores.",
                  "", "| guidance | scale | accuracy | FD | precision | recall | diversity | pixel std | saturated | "
                  "grain |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in [sweep["real"]] + sweep["cfg"] + sweep["classifier"]:
            scale = "-" if row["scale"] is None else f"{row['scale']:g}"
            lines.append(f"| {GUIDANCE_LABELS[row['guidance']]} | {scale} | " + " | ".join(
                _fmt(k, row.get(k)) for k in ("accuracy", "frechet_distance", "precision", "recall", "diversity",
                                              "pixel_std", "saturated", "grain")) + " |")
        names = sweep["class_names"]
        lines += ["", "Accuracy per class:", "", "| guidance | scale | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for row in [sweep["real"]] + sweep["cfg"] + sweep["classifier"]:
            scale = "-" if row["scale"] is None else f"{row['scale']:g}"
            lines.append(f"| {GUIDANCE_LABELS[row['guidance']]} | {scale} | "
                         + " | ".join(_fmt("per_class", a) for a in row["per_class_accuracy"]) + " |")
        if report.get("samples_png"):
            lines += ["", f"![first sample of every class per setting]({report['samples_png']})", "",
                      "Rows: the settings above (real renders first), columns: classes."]

    per_sampler = report.get("sampler_sweep")
    if per_sampler is not None:
        lines += ["", "## Classifier guidance from the unconditional model, per sampler", "",
                  f"`{BASE}` at CFG 0 (the unconditional model: its null label) guided by `{CLASSIFIER}`, "
                  f"respacing \"{s['respacing']}\" ({per_sampler['steps']} steps), {s['sampler_samples']} images "
                  f"per setting (image i asks for class i mod {len(sweep['class_names']) if sweep else 8} and "
                  f"starts from seed {s['seed']} + i in every setting), graded as above. The last row of each "
                  f"sampler repeats its largest scale with dynamic thresholding (Saharia et al. 2022) at the "
                  f"{s['guard']:g} percentile. Heun evaluates the networks twice per step.", "",
                  "| sampler | scale | dynamic thresholding | accuracy | diversity | saturated | grain | FD | seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in per_sampler["rows"]:
            lines.append(f"| {row['sampler']} | {row['scale']:g} | {row['guard'] or '-'} | "
                         f"{_fmt('accuracy', row['accuracy'])} | {_fmt('diversity', row['diversity'])} | "
                         f"{row['saturated']:.1%} | {row['grain']:.1f} | "
                         f"{_fmt('frechet_distance', row['frechet_distance'])} | "
                         f"{row['seconds']:g} |")
        if report.get("samplers_png"):
            lines += ["", f"![first sample of every class per sampler and scale]({report['samplers_png']})", "",
                      "Rows: the settings of the table, in its order; columns: classes."]

    up = report["upsampler"]
    if up is not None:
        lines += ["", "## Upsampler", "",
                  f"`{UPSAMPLER}` upsamples {up['samples']} held-out scenes (seed {up['seed']}, balanced classes) "
                  f"from their {up['small_size']} px render to {up['large_size']} px with {up['sampler']}, "
                  f"respacing \"{up['respacing']}\" ({up['steps']} steps), conditioned on the true class; compared "
                  f"with the true {up['large_size']} px render of the same scene (PSNR in dB and SSIM, skimage, "
                  f"mean +- std over images), next to PIL bicubic upscaling of the same {up['small_size']} px render.",
                  "", "| method | PSNR (dB) | SSIM |", "|---|---:|---:|"]
        labels = {"upsampler": f"upsampler samples ({up['sampler']}, {up['steps']} steps)",
                  "first_step_x0": "upsampler, x0 predicted at the first step (one network evaluation)",
                  "bicubic": "bicubic"}
        for name, label in labels.items():
            if name not in up:
                continue
            r = up[name]
            lines.append(f"| {label} | {r['psnr']:.2f} +- {r['psnr_std']:.2f} | "
                         f"{r['ssim']:.3f} +- {r['ssim_std']:.3f} |")
        if "first_step_x0" in up:
            lines += ["", "The first step's predicted x0 (from pure noise) is the network's estimate of the mean of "
                      "all 128 px scenes that fit the input, the PSNR-optimal answer; a sample instead draws one "
                      "of them, with fine detail the 32 px input does not determine, and pays for that detail in "
                      "PSNR wherever it differs from the truth (the perception-distortion trade-off, Blau & "
                      "Michaeli 2018)."]
        if "evaluator_accuracy" in up:
            acc = up["evaluator_accuracy"]
            lines += ["", "Evaluation-classifier accuracy on the 128 px images (area-downscaled to 32 px): "
                      + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()) + "."]
        if report.get("upsampler_png"):
            lines += ["", f"![upsampler examples]({report['upsampler_png']})", "",
                      "Columns: 32 px input (nearest), bicubic, upsampler, true 128 px render."]

    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) else value} |"
              for k, value in s.items()]
    lines += ["", "Timing: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["timing"].items()) + ".", ""]
    return "\n".join(lines)


def _sample_grid(sweep: dict) -> Image.Image:
    rows = [sweep["real_grid"]] + [sweep["grids"][r["cfg_scale"], r["classifier_scale"]]
                                   for r in sweep["cfg"] + sweep["classifier"]]
    return image_grid(np.concatenate(rows), columns=len(rows[0]), scale=2)


def _samplers_grid(per_sampler: dict) -> Image.Image:
    rows = [per_sampler["grids"][r["sampler"], r["scale"], r["guard"]] for r in per_sampler["rows"]]
    return image_grid(np.concatenate(rows), columns=len(rows[0]), scale=2)


def _upsampler_grid(up: dict) -> Image.Image:
    low, bicubic, upsampled, truth = up["examples"]
    nearest = np.repeat(np.repeat(low, truth.shape[1] // low.shape[1], 1), truth.shape[2] // low.shape[2], 2)
    rows = np.stack([nearest, bicubic, upsampled, truth], axis=1).reshape(-1, *truth.shape[1:])
    return image_grid(rows, columns=4)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


# --- entry points -----------------------------------------------------------------------------------

def evaluate(checkpoints: Path, out: Path, settings: EvalSettings, command: str,
             device: str | torch.device | None = None) -> dict:
    """Run every part whose models exist, write <out>/README.md and <out>/model_card.json, return the report."""
    started = time.time()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    registry = ModelRegistry(checkpoints, device=device)
    models, missing = model_facts(registry)
    for name, facts in models.items():  # the references are renders of the procedural scenes
        if name != CLASSIFIER and (facts["training"] or {}).get("data", "scenes") != "scenes":
            missing[name] = (f"{name} was trained on {facts['training']['data']}, not the procedural scenes, "
                             "so renders of held-out scenes are no reference for it")
    for why in missing.values():
        print("skipping:", why, file=sys.stderr)
    timing = {}

    sweep = None
    if BASE not in missing and EVALUATOR not in missing:
        tick = time.time()
        sweep = guidance_sweep(registry, settings, with_classifier=CLASSIFIER not in missing)
        timing["guidance sweep"] = time.time() - tick
    per_sampler = None
    if sweep is not None and CLASSIFIER not in missing and settings.samplers:
        tick = time.time()
        per_sampler = sampler_sweep(registry, settings, sweep["real_features"])
        timing["per-sampler sweep"] = time.time() - tick
    up = None
    if UPSAMPLER not in missing:
        tick = time.time()
        up = evaluate_upsampler(registry, settings, with_evaluator=EVALUATOR not in missing)
        timing["upsampler"] = time.time() - tick

    out.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "date": date, "machine": describe(), "device": str(registry.device),
              "settings": asdict(settings), "models": models, "missing": missing}
    if sweep is not None:
        _sample_grid(sweep).save(out / "model_card_samples.png")
        report["samples_png"] = "model_card_samples.png"
    if per_sampler is not None:
        _samplers_grid(per_sampler).save(out / "model_card_samplers.png")
        report["samplers_png"] = "model_card_samplers.png"
    if up is not None:
        _upsampler_grid(up).save(out / "model_card_upsampler.png")
        report["upsampler_png"] = "model_card_upsampler.png"
    report["guidance_sweep"] = None if sweep is None else {
        k: v for k, v in sweep.items() if k not in ("grids", "real_grid", "real_features")}
    report["upsampler"] = None if up is None else {k: v for k, v in up.items() if k != "examples"}
    report["sampler_sweep"] = None if per_sampler is None else {k: v for k, v in per_sampler.items() if k != "grids"}
    report["bars"] = bars(sweep, up, missing, per_sampler, settings.sampler_samples)
    report["timing"] = timing
    report["seconds"] = time.time() - started
    report = _jsonable(report)
    (out / "model_card.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "README.md").write_text(render_card(report))
    return report


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one scale")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = EvalSettings()
    parser = argparse.ArgumentParser(prog="python -m explore.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="folder with the models")
    parser.add_argument("--out", type=Path, help="where README.md and model_card.json go (default: --checkpoints)")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (%s)" % ", ".join(
        f"{k}={v}" for k, v in QUICK.items() if k != "quick"))
    parser.add_argument("--samples", type=int, help=f"images per guidance setting (default {defaults.samples})")
    parser.add_argument("--batch", type=int, help=f"sampling batch (default {defaults.batch})")
    parser.add_argument("--sampler", help=f"base sampler (default {defaults.sampler})")
    parser.add_argument("--respacing", help=f"base respacing (default {defaults.respacing})")
    parser.add_argument("--cfg_scales", type=_scales, help="comma-separated (default 0,1,3,5)")
    parser.add_argument("--classifier_scales", type=_scales, help="comma-separated, from the unconditional model "
                        "(default 0,1,3,10)")
    parser.add_argument("--samplers", type=lambda text: tuple(v.strip() for v in text.split(",") if v.strip()),
                        help="samplers of the per-sampler classifier-guidance sweep, comma-separated (default: all; "
                        "'' skips it)")
    parser.add_argument("--sampler_samples", type=int,
                        help=f"images per per-sampler setting (default {defaults.sampler_samples})")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--sr_samples", type=int, help=f"held-out scenes to upsample (default {defaults.sr_samples})")
    parser.add_argument("--sr_batch", type=int)
    parser.add_argument("--sr_sampler")
    parser.add_argument("--sr_respacing", help=f"upsampler respacing (default {defaults.sr_respacing})")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: PyTorch's choice)")
    args = parser.parse_args(argv)

    settings = replace(defaults, **QUICK) if args.quick else defaults
    overrides = {k: getattr(args, k) for k in ("samples", "batch", "sampler", "respacing", "cfg_scales",
                                                 "classifier_scales", "samplers", "sampler_samples", "seed",
                                                 "sr_samples", "sr_batch", "sr_sampler", "sr_respacing", "precision")
                 if getattr(args, k) is not None}
    settings = replace(settings, **overrides)
    if settings.samples <= settings.k or settings.batch < 1 or settings.sr_samples < 1 or settings.sr_batch < 1:
        parser.error(f"--samples must exceed k={settings.k}; batch sizes and --sr_samples must be >= 1")
    if settings.samplers and settings.sampler_samples <= settings.k:
        parser.error(f"--sampler_samples must exceed k={settings.k}")
    unknown = [name for name in settings.samplers if name not in SAMPLERS]
    if unknown:
        parser.error(f"--samplers: unknown {', '.join(unknown)} (choose from {', '.join(SAMPLERS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "explore.evaluate", *argv])
    report = evaluate(args.checkpoints, args.out or args.checkpoints, settings, command, args.device)
    out = args.out or args.checkpoints
    print(f"wrote {out / 'README.md'} and {out / 'model_card.json'}")
    for bar in report["bars"]:
        status = {True: "met", False: "NOT MET", None: "not evaluated"}[bar["met"]]
        print(f"  {status:>13}: {bar['name']} ({bar['measured']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
