"""Upsampling lab: generated low-res samples and real photos through the same upsampler, measured."""
from __future__ import annotations

import time

import gradio as gr
import numpy as np
import pandas as pd
import torch
from PIL import Image

from explore.classify import classify
from explore.data.wild import WILD_PHOTO_NAMES, as_rgb_uint8, center_crop, downscale, wild_photo
from explore.engine import Recipe, plan
from explore.noise import PerImageNoise
from explore.outputs import from_uint8, load_samples_npz, save_png, save_samples_npz, to_uint8
from explore.ui import images, metrics, plots, progress as progress_bar
from explore.ui.context import AppContext, class_index, class_names, optional
from explore.ui.form import page_errors
from explore.ui.session import Session, ensure
from explore.uploads import read_image
from explore.validate import MAX_SEED, whole

WHOLE = "whole photo, resized"
NATIVE = "native pixels"
NULL_CLASS = "none (null class)"
SUGGEST = "auto: the images' labels, else the classifier's top class"
MAX_BATCH = 16
MAX_PHOTO_PIXELS = 40_000_000
METRIC_COLUMNS = ["image", "PSNR (dB)", "SSIM", "high-freq energy", "sharpness"]


def upsampler_sizes(ctx: AppContext, upsampler: str) -> tuple[int, int]:
    """(input size, output size) of a super-resolution model."""
    entry = ctx.registry.get(upsampler)
    if entry.kind != "superres":
        raise gr.Error(f"{upsampler} is a {entry.kind} model, not an upsampler.")
    out = entry.image_size
    small = int(entry.loaded.metadata.get("small_size") or out // 4)
    return small, out


def lab_class_choices(ctx: AppContext, upsampler: str | None) -> list[str]:
    if not upsampler:
        return [NULL_CLASS]
    info = ctx.info(upsampler)
    if info.num_labels is None:
        return [NULL_CLASS]
    return [SUGGEST, *class_names(info), *([NULL_CLASS] if info.null_class is not None else [])]


def sharpness(image: np.ndarray) -> dict[str, float]:
    return {"hf": metrics.high_frequency_fraction(image), "laplacian": metrics.laplacian_sharpness(image)}


def bicubic(low: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC))


class Lab:
    """Handlers of the Upsampling lab tab."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    # --- shared ---------------------------------------------------------------------------------

    def stop(self, session: Session) -> None:
        """Ask the running upsampling of this session to end after its current step."""
        ensure(session).request_stop("upsample")

    def upsampler_options(self, upsampler: str):
        """Class choices of an upsampler for the photo (suggested first) and for generated images."""
        names = lab_class_choices(self.ctx, upsampler)
        return gr.update(choices=names, value=names[0]), gr.update(choices=names, value=names[0])

    def classify(self, low: np.ndarray, upsampler: str) -> np.ndarray | None:
        """Class probabilities [N, classes] of low-res uint8 NHWC images: the evaluator, else the noisy
        classifier at t = 0, else None. Only models with the upsampler's classes are asked."""
        want = self.ctx.info(upsampler).num_labels
        for kind in ("evaluator", "classifier"):
            for name in self.ctx.names(kind):
                entry = self.ctx.registry.get(name)
                if entry.num_labels != want:
                    continue
                return classify(entry, from_uint8(low)).probs.cpu().numpy()
        return None

    def labels_for(self, upsampler: str, choice, low: np.ndarray, given: np.ndarray | None = None) -> np.ndarray | None:
        """Labels for the upsampler: given ones, the chosen class, the classifier's top class, or the null class."""
        info = self.ctx.info(upsampler)
        if info.num_labels is None:
            return None
        if choice == NULL_CLASS:
            if info.null_class is None:
                raise gr.Error(f"{upsampler} has no null class; pick a class.")
            return np.full(len(low), info.null_class)
        if choice in (None, "", SUGGEST):
            if given is not None:
                return given
            probs = self.classify(low, upsampler)
            if probs is None:
                if info.null_class is not None:
                    return np.full(len(low), info.null_class)
                raise gr.Error("No classifier can suggest a class; pick one.")
            return probs.argmax(-1)
        return np.full(len(low), class_index(info, choice, allow_random=False))

    def _upsample(self, upsampler: str, low: np.ndarray, labels: np.ndarray | None, respacing: str, seeds: list[int],
                  session: Session, progress, every: int, desc: str):
        """Run the upsampler on uint8 NHWC low-res images; yields (step, finished) at previews and at the end."""
        small, out = upsampler_sizes(self.ctx, upsampler)
        if low.shape[1:3] != (small, small):
            raise gr.Error(f"{upsampler} takes {small}x{small} inputs; these are {low.shape[1]}x{low.shape[2]}.")
        recipe = Recipe(model=upsampler, sampler="ddim", respacing=str(respacing).strip(), seed=int(seeds[0]),
                        batch_size=len(low), precision=self.ctx.precision)
        device = self.ctx.registry.device
        noise = PerImageNoise(seeds, (3, out, out), device)
        label_tensor = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        run = plan(recipe, self.ctx.registry, noise=noise, low_res=from_uint8(low), labels=label_tensor)
        total, last = len(run.grid), None
        for last in run.steps(should_stop=session.should_stop("upsample")):
            progress((last.index + 1, total), desc=desc, unit="steps")
            if (last.index + 1) % every == 0 and last.index + 1 < total:
                yield last, False
        if last is not None:
            yield last, True

    # --- Generated panel ------------------------------------------------------------------------

    def generated(self, base_model, class_choice, seed, count, base_respacing, upsampler, up_respacing, upload,
                  preview_every, session: Session, progress=gr.Progress()):
        """Low-res samples from the base model (or an uploaded .npz) -> upsampled, with sharpness numbers."""
        session = ensure(session)
        upsampler = optional(upsampler)
        if upsampler is None:
            raise gr.Error("No upsampler selected.")
        small, out = upsampler_sizes(self.ctx, upsampler)
        session.start("upsample")
        keep = gr.update()
        given = None
        seed = whole("seed", seed, 0, MAX_SEED)
        if upload is not None:
            low, given = load_samples_npz(getattr(upload, "name", upload), self.ctx.registry.caps.upload_bytes)
            source = f"{min(len(low), MAX_BATCH)} images from the uploaded file"
            if len(low) > MAX_BATCH:
                gr.Warning(f"The file holds {len(low)} images; the first {MAX_BATCH} are upsampled.")
                source += f" (the first {MAX_BATCH} of {len(low)})"
            low = low[:MAX_BATCH]
            given = None if given is None else given[:MAX_BATCH]
            if low.shape[1:3] != (small, small):
                source += f", resized from {low.shape[1]}x{low.shape[2]} to {small}x{small} px"
                low = np.stack([np.asarray(Image.fromarray(im).resize((small, small), Image.Resampling.BOX))
                                for im in low])
        else:
            base_model = optional(base_model)
            if base_model is None:
                raise gr.Error(f"No base model makes {small}x{small} images; upload an .npz instead.")
            info = self.ctx.info(base_model)
            if info.image_size != small:
                raise gr.Error(f"{base_model} makes {info.image_size} px images; {upsampler} takes {small} px.")
            count = whole("number of images", count, 1, min(MAX_BATCH, self.ctx.registry.caps.batch))
            label = None if class_choice in (SUGGEST, NULL_CLASS, None, "") else class_index(info, class_choice)
            recipe = Recipe(model=base_model, class_label=label, sampler="ddim", respacing=str(base_respacing).strip(),
                            seed=int(seed), batch_size=count, precision=self.ctx.precision)
            run = plan(recipe, self.ctx.registry)
            last = None
            for last in run.steps(should_stop=session.should_stop("upsample")):
                progress((last.index + 1, len(run.grid)), desc="base model", unit="steps")
            if session.stop["upsample"] or last is None:
                yield keep, keep, "Stopped while sampling the base images.", keep, keep, keep, session
                return
            low = to_uint8(last.x)
            given = run.cond.labels.cpu().numpy() if run.cond.labels is not None else None
            source = f"{count} samples from {base_model}"
        factor = out // low.shape[1]  # nearest-neighbour, so the grid lines up with the upsampled one
        low_view = images.enlarge(images.tile(low.repeat(factor, 1).repeat(factor, 2), pad=2), out)
        yield low_view, keep, f"Upsampling {source}…", progress_bar.bar(0, 1), keep, keep, session
        labels = self.labels_for(upsampler, class_choice, low, given)
        seeds = [int(seed) + i for i in range(len(low))]
        started = time.perf_counter()
        every = whole("preview_every", 5 if preview_every is None else preview_every, 1, 10_000)
        for step, finished in self._upsample(upsampler, low, labels, up_respacing, seeds, session, progress, every,
                                             "upsampling"):
            if not finished:
                preview = images.enlarge(images.tile(to_uint8(step.pred_x0), pad=2), out)
                yield (keep, preview, f"Upsampling: step {step.index + 1}/{step.total}",
                       progress_bar.bar(step.index + 1, step.total), keep, keep, session)
                continue
            if step.index + 1 < step.total:
                yield (keep, keep, f"Stopped at upsampling step {step.index + 1}/{step.total}.",
                       progress_bar.bar(step.index + 1, step.total), keep, keep, session)
                return
            high = to_uint8(step.x)
            session.lab["generated"] = {
                "low-res + bicubic": _mean(sharpness(bicubic(im, out)) for im in low),
                "upsampled": _mean(sharpness(im) for im in high)}
            files = self._write_generated(low, high, labels, step)
            status = (f"Upsampled {source} in {time.perf_counter() - started:.1f} s "
                      f"(classes: {self._names(upsampler, labels)}).")
            yield (low_view, images.enlarge(images.tile(high, pad=2), out), status,
                   progress_bar.bar(step.total, step.total), plots.sharpness_figure(session.lab), files, session)

    def _names(self, upsampler, labels) -> str:
        if labels is None:
            return "unconditional"
        info = self.ctx.info(upsampler)
        names = class_names(info)
        return ", ".join(names[int(l)] if int(l) < len(names) else "null" for l in labels)

    def _write_generated(self, low, high, labels, step) -> list[str]:
        out = self.ctx.new_run_dir("upsample")
        n, h, w, _ = high.shape
        low_npz = save_samples_npz(out / f"low_res_{n}x{low.shape[1]}x{low.shape[2]}x3.npz", low, labels)
        high_npz = save_samples_npz(out / f"samples_{n}x{h}x{w}x3.npz", high, labels)
        png = save_png(Image.fromarray(images.tile(high, pad=2)), out / "upsampled.png",
                       extra={"labels": [] if labels is None else [int(l) for l in labels]})
        return [str(high_npz), str(low_npz), str(png)]

    # --- In the wild panel ----------------------------------------------------------------------

    @page_errors  # a photo's problems are the page's messages, whichever handler reads it
    def photo(self, name: str | None, upload, upsampler: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """(the original at the upsampler's output size, the downscaled input) of a bundled or uploaded photo."""
        small, out = upsampler_sizes(self.ctx, upsampler)
        if isinstance(upload, np.ndarray):
            img = as_rgb_uint8(upload)
            if img.shape[0] * img.shape[1] > MAX_PHOTO_PIXELS:
                raise gr.Error("The uploaded photo is too large (over 40 megapixels).")
        elif upload is not None:  # a file path: read safely (caps checked before decoding)
            photo = read_image(getattr(upload, "name", upload), self.ctx.registry.caps)
            for note in photo.notes:
                gr.Warning(f"Uploaded photo: {note}.")
            img = photo.pixels
        else:
            if name not in WILD_PHOTO_NAMES:
                raise gr.Error(f"Unknown photo {name!r}; choose one of {', '.join(WILD_PHOTO_NAMES)}.")
            img = wild_photo(name)
        if min(img.shape[:2]) < out:
            raise gr.Error(f"photo: {img.shape[1]}x{img.shape[0]} px is smaller than the upsampler's output; "
                           f"it needs at least {out}x{out} px.")
        if mode == NATIVE:
            crop = np.ascontiguousarray(center_crop(img, out))
        else:  # shrink so the short side equals the output size, then take the centred square
            h, w = img.shape[:2]
            scale = out / min(h, w)
            size = (max(out, round(w * scale)), max(out, round(h * scale)))
            resized = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
            crop = np.ascontiguousarray(center_crop(resized, out))
        return crop, downscale(crop, out // small)

    def suggest(self, name, upload, upsampler, mode):
        """The classifier's top classes for the downscaled photo; the dropdown is set to the first."""
        upsampler = optional(upsampler)
        if upsampler is None:
            raise gr.Error("No upsampler selected.")
        _, low = self.photo(name, upload, upsampler, mode)
        probs = self.classify(low[None], upsampler)
        low_view = images.enlarge(low, 256)
        if probs is None:
            return {}, gr.update(), low_view, "No classifier is available to suggest a class; pick one."
        names = class_names(self.ctx.info(upsampler))
        top = {names[i]: float(p) for i, p in enumerate(probs[0])}
        best = names[int(probs[0].argmax())]
        return top, gr.update(value=best), low_view, f"Top class: **{best}** ({probs[0].max():.0%})."

    def wild(self, name, upload, upsampler, mode, class_choice, respacing, seed, session: Session,
             progress=gr.Progress()):
        """Photo -> centre crop -> downscaled -> upsampled, beside the original and bicubic, with PSNR / SSIM."""
        session = ensure(session)
        upsampler = optional(upsampler)
        if upsampler is None:
            raise gr.Error("No upsampler selected.")
        small, out = upsampler_sizes(self.ctx, upsampler)
        seed = whole("seed", seed, 0, MAX_SEED)
        session.start("upsample")
        original, low = self.photo(name, upload, upsampler, mode)
        labels = self.labels_for(upsampler, class_choice, low[None])
        cubic = bicubic(low, out)
        low_view = images.enlarge(low, out)
        keep = gr.update()
        yield original, low_view, cubic, keep, keep, "Upsampling the photo…", keep, session
        for step, finished in self._upsample(upsampler, low[None], labels, respacing, [int(seed)], session,
                                             progress, 5, "upsampling"):
            if not finished:
                yield (keep, keep, keep, images.batch_view(step.pred_x0, out), keep,
                       f"Upsampling: step {step.index + 1}/{step.total}", keep, session)
                continue
            if step.index + 1 < step.total:
                yield keep, keep, keep, keep, keep, f"Stopped at step {step.index + 1}/{step.total}.", keep, session
                return
            up = to_uint8(step.x)[0]
            rows = []
            for label, img in (("bicubic", cubic), ("upsampled", up), ("original", original)):
                psnr, ssim = metrics.psnr_ssim(original, img) if label != "original" else (None, None)
                numbers = sharpness(img)
                rows.append([label, None if psnr is None else round(psnr, 2), None if ssim is None else round(ssim, 4),
                             round(numbers["hf"], 4), round(numbers["laplacian"], 4)])
            session.lab["wild"] = {"original": sharpness(original), "bicubic": sharpness(cubic),
                                   "upsampled": sharpness(up)}
            status = f"Upsampled as **{self._names(upsampler, labels)}**."
            yield (original, low_view, cubic, up, pd.DataFrame(rows, columns=METRIC_COLUMNS), status,
                   plots.sharpness_figure(session.lab), session)

    def wild_classes(self, name, upload, upsampler, mode, respacing, seed, count, session: Session,
                     progress=gr.Progress()):
        """The same photo and the same noise, upsampled under several classes (the classifier's top ones first)."""
        session = ensure(session)
        upsampler = optional(upsampler)
        if upsampler is None:
            raise gr.Error("No upsampler selected.")
        info = self.ctx.info(upsampler)
        if info.num_labels is None:
            raise gr.Error(f"{upsampler} is not class-conditional.")
        seed = whole("seed", seed, 0, MAX_SEED)
        session.start("upsample")
        original, low = self.photo(name, upload, upsampler, mode)
        probs = self.classify(low[None], upsampler)
        order = list(np.argsort(-probs[0])) if probs is not None else list(range(info.num_labels))
        count = whole("classes", count, 1, min(info.num_labels, MAX_BATCH))
        labels = np.array(order[:count])
        names = class_names(info)
        batch = np.repeat(low[None], count, axis=0)
        seeds = [int(seed)] * count  # one noise for every class
        gallery = []
        yield gr.update(), f"Upsampling under {count} classes…", session
        for step, finished in self._upsample(upsampler, batch, labels, respacing, seeds, session, progress,
                                             max(1, 10 ** 9), "upsampling under several classes"):
            if step.index + 1 < step.total:
                yield gr.update(), f"Stopped at step {step.index + 1}/{step.total}.", session
                return
            for img, label in zip(to_uint8(step.x), labels):
                psnr, ssim = metrics.psnr_ssim(original, img)
                p = f", p={probs[0][label]:.2f}" if probs is not None else ""
                gallery.append((img, f"{names[label]}{p}: PSNR {psnr:.1f} dB, SSIM {ssim:.3f}"))
        yield gallery, f"{count} classes, same photo and same noise.", session


def _mean(items) -> dict[str, float]:
    items = list(items)
    return {key: float(np.mean([d[key] for d in items])) for key in items[0]}
