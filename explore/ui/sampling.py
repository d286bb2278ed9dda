"""Live sampling: a recipe from the form, previews streamed while the one step iterator runs, results."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import gradio as gr
import torch
import numpy as np
import pandas as pd
from PIL import Image

from explore.engine import Recipe, plan
from explore.outputs import image_grid, save_png, save_samples_npz, to_uint8
from explore.recipe import options_of
from explore.samplers import SAMPLERS, Step
from explore.schedules import Grid, RespacingError
from explore.ui import images, plots, progress as progress_bar
from explore.ui.context import AppContext, class_choices
from explore.ui.session import Session, ensure
from explore.ui.trajectory import TrajectoryRecorder
from explore.validate import whole

MAX_ANIMATION_FRAMES = 60
# The Live sampling API's parameters as it first took them (recipe fields and the run's own); options the page shows
# that came later follow them, so that positional API calls written before those keep working.
FIRST_INPUTS = ("model", "class_label", "sampler", "respacing", "karras", "classifier", "classifier_scale",
                "cfg_scale", "guidance_method", "eta", "churn", "seed", "batch_size", "preview_every")
TELEMETRY = ("noise", "rms", "p_class", "guidance")


# --- small events -------------------------------------------------------------------------------

def validate_respacing(ctx: AppContext, model: str, respacing: str, sampler: str, karras: bool):
    """Check the respacing text as it is typed; plot the kept timesteps on the model's noise curve."""
    if not model:
        return "Choose a model first.", plots.message_figure("No model.")
    ctx.info(model)  # an unknown name becomes a gr.Error
    diffusion = ctx.registry.get(model).diffusion
    if diffusion is None:
        return f"**Not valid:** {model} is not a diffusion model", gr.update()
    use_karras = bool(karras) and sampler in SAMPLERS and SAMPLERS[sampler].karras
    try:
        grid = Grid.make(diffusion.noise_schedule, str(respacing).strip(), diffusion.steps, use_karras)
    except RespacingError as err:
        return f"**Not valid:** {err}", gr.update()
    if len(grid) > ctx.registry.caps.steps:
        return (f"**Not valid:** {len(grid)} steps; at most {ctx.registry.caps.steps} per run here", gr.update())
    kind = "Karras noise levels" if use_karras else "timesteps"
    message = f"Valid: {len(grid)} steps ({kind}; {diffusion.noise_schedule} schedule of {diffusion.steps})"
    if not str(respacing).strip():
        message += "; empty means every step"
    return message, plots.respacing_figure(grid, f"{len(grid)} of {diffusion.steps} steps kept")


def model_changed(ctx: AppContext, model: str):
    """Class choices, whether CFG applies, and the guidance classifiers that fit the model."""
    if not model:
        return gr.update(), gr.update(), gr.update()
    info = ctx.info(model)
    fitting = [name for name in ctx.names("classifier") if ctx.info(name).image_size == info.image_size
               and (info.num_labels is None or ctx.info(name).num_labels == info.num_labels)]
    # an unconditional model can still be steered to a class by a classifier: offer its classes
    choices = class_choices(ctx.info(fitting[0]) if info.num_labels is None and fitting else info)
    cfg_ok = info.null_class is not None
    return (gr.update(choices=choices, value=choices[0]),
            gr.update(interactive=True) if cfg_ok else gr.update(interactive=False, value=1.0),
            gr.update(choices=["none", *fitting], value=fitting[0] if fitting else "none"))


# --- the run --------------------------------------------------------------------------------------

class Telemetry:
    """Per-step numbers kept as device tensors in the loop (no host sync); turned into tables at previews.

    The guidance plot shows, per step, how large each guidance term's change of x is against the denoising
    change (the step's drift without the guidance terms): its mean over the batch, one line per method."""

    GUIDANCE = {"classifier": "classifier guidance", "cfg": "classifier-free guidance"}

    REFRESH_S = 0.5  # the plots are redrawn at most this often (and at the end): each redraw ships every row

    def __init__(self, batch: int):
        self.batch = batch
        self.pending: list[tuple[int, float, dict]] = []
        self.rows: dict[str, list[tuple[int, float, str]]] = {name: [] for name in TELEMETRY}
        self._frames: list[pd.DataFrame] | None = None
        self._built_at = float("-inf")

    def add(self, step: Step) -> None:
        values = {"rms": step.x.detach().flatten(1).float().pow(2).mean(1).sqrt()}
        if "log_prob" in step.stats:
            values["p_class"] = step.stats["log_prob"].detach().float().exp()
        terms = {"classifier": step.guidance, "cfg": step.cfg_guidance}
        if step.drift is not None and any(term is not None for term in terms.values()):
            denoising = step.drift - sum(term for term in terms.values() if term is not None)
            scale = denoising.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            for name, term in terms.items():
                if term is not None:
                    values[name] = (term.flatten(1).norm(dim=1) / scale).mean(0, keepdim=True)
        self.pending.append((step.index + 1, step.sigma, values))

    def _flush(self) -> None:
        for s, sigma, values in self.pending:
            self.rows["noise"].append((s, sigma / (1.0 + sigma ** 2) ** 0.5, "sqrt(1 - ᾱ)"))
            for name, tensor in values.items():
                numbers = tensor.tolist()
                if name in self.GUIDANCE:
                    self.rows["guidance"].append((s, numbers[0], self.GUIDANCE[name]))
                else:
                    self.rows[name].extend((s, v, f"image {i}") for i, v in enumerate(numbers))
        self.pending.clear()

    def frames(self, final: bool = True) -> list[pd.DataFrame]:
        """The tables so far; between refreshes the previous tables again (Gradio then sends no change)."""
        now = time.perf_counter()
        if final or self._frames is None or now - self._built_at >= self.REFRESH_S:
            self._flush()
            # while running, an empty table would fix the plot's axes and series before its first value (guidance
            # may start mid-run, with a guidance interval): a plot gets no table until it has rows
            self._frames = [pd.DataFrame(self.rows[name], columns=["step", "value", "series"])
                            if self.rows[name] or final else None for name in TELEMETRY]
            self._built_at = now
        return self._frames


class Sampler:
    """The Live sampling tab's run: one generator handler per request, stoppable within a step."""

    INPUTS = (*FIRST_INPUTS, *[name for name, opt in options_of(Recipe).items()
                               if opt.widget and name not in FIRST_INPUTS], "session")  # the API's parameters

    # Each streamed preview is a message, and on 2 cores every message slows the run by several ms: the server's
    # event loop and the client take CPU from the sampling threads. Previews come every N steps but at most this
    # often, to keep their cost near 5% of a run (python -m explore.bench measures it); the final step always
    # streams, and every step is recorded for the trajectory explorer whatever is shown.
    min_preview_interval_s = 0.2
    progress_interval_s = 0.5  # gr.Progress updates (for API clients; the page shows its own bar) are messages too

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def stop(self, session: Session) -> None:
        """Ask the running sampler loop of this session to end after its current step."""
        ensure(session).request_stop("sample")

    def check_respacing(self, model: str, respacing: str, sampler: str, karras: bool):
        """Validate the respacing text; plot the kept timesteps on the noise-level curve."""
        return validate_respacing(self.ctx, model, respacing, sampler, karras)

    def model_options(self, model: str):
        """Class choices, whether CFG applies, and the fitting guidance classifiers of a model."""
        return model_changed(self.ctx, model)

    def run(self, recipe: Recipe, preview_every, session: Session, progress=gr.Progress()):
        """Sample, streaming x_t | predicted x0 previews and telemetry every N steps; then the results."""
        session = ensure(session)
        every = whole("preview_every", 1 if preview_every is None else preview_every, 1, 10_000)
        session.start("sample")
        run = plan(recipe, self.ctx.registry)
        total = len(run.grid)
        recorder = TrajectoryRecorder(total, recipe.batch_size, run.shape)
        telemetry = Telemetry(recipe.batch_size)
        started = time.perf_counter()
        last: Step | None = None
        previews, last_preview, last_progress = 0, float("-inf"), float("-inf")
        yield self._outputs(status=f"Sampling {total} steps…", bar=progress_bar.bar(0, total), session=session,
                            running=True)
        for step in run.steps(should_stop=session.should_stop("sample")):
            last = step
            recorder.add(step)
            telemetry.add(step)
            now, final = time.perf_counter(), step.index + 1 == total
            if final or now - last_progress >= self.progress_interval_s:
                progress((step.index + 1, total), desc="sampling", unit="steps")
                last_progress = now
            due = (step.index + 1) % every == 0 and now - last_preview >= self.min_preview_interval_s
            if due or final:
                previews, last_preview = previews + 1, now
                elapsed = now - started
                status = (f"Step {step.index + 1}/{total} · t = {step.timestep:.0f} · {elapsed:.1f} s · "
                          f"{(step.index + 1) / max(elapsed, 1e-9):.1f} steps/s")
                yield self._outputs(preview(step.x, "x_t"), preview(step.pred_x0, "predicted x0"), status,
                                    telemetry.frames(final),
                                    bar=progress_bar.bar(step.index + 1, total), session=session, running=True)
        elapsed = time.perf_counter() - started
        if last is None:
            yield self._outputs(status="Stopped before the first step.", session=session)
            return
        stopped = last.index + 1 < total
        labels = None if run.cond.labels is None else run.cond.labels.cpu().numpy()
        session.trajectory = recorder.finish(recipe.to_json(), labels, run.class_names, stopped)
        gallery, files, command = self.write_results(recipe, last, labels, run.class_names, session.trajectory,
                                                     stopped)
        status = (f"{'Stopped at' if stopped else 'Finished'} step {last.index + 1}/{total} in {elapsed:.1f} s "
                  f"({(last.index + 1) / max(elapsed, 1e-9):.1f} steps/s, {previews} previews).")
        if stopped:
            status += " The results below are the partly denoised samples at that step."
        yield self._outputs(preview(last.x, "x_t"), preview(last.pred_x0, "predicted x0"), status,
                            telemetry.frames(), gallery, files, command, session,
                            bar=progress_bar.bar(last.index + 1, total))

    @staticmethod
    def _outputs(x_t=None, x0=None, status="", telemetry=None, gallery=None, files=None, command=None,
                 session=None, bar=None, running=False):
        """One yield of the handler. While running, the results are empty (None), not kept: Gradio rebuilds
        a component for every gr.update(), even an empty one, which costs milliseconds per preview."""
        keep = gr.update()
        result = None if running else keep
        return (keep if x_t is None else x_t, keep if x0 is None else x0, status, keep if bar is None else bar,
                *(telemetry if telemetry is not None else [keep] * len(TELEMETRY)),
                result if gallery is None else gallery, result if files is None else files,
                result if command is None else command, session)

    def write_results(self, recipe: Recipe, last: Step, labels, class_names, trajectory, stopped: bool):
        """PNGs with the recipe, the .npz in the original format, the animation, the trajectory file."""
        out = self.ctx.new_run_dir("sample")
        samples = to_uint8(last.x)
        n, h, w, _ = samples.shape
        recipe_json = recipe.to_json()
        gallery, files = [], []
        for i, img in enumerate(samples):
            name = "unconditional" if labels is None else (class_names[labels[i]] if class_names else str(labels[i]))
            extra = {"image_index": i, "image_seed": recipe.seed + i, "label": None if labels is None else
                     int(labels[i]), "class_name": name, "stopped_at_step": last.index + 1 if stopped else None}
            path = save_png(Image.fromarray(img), out / f"sample_{i:02d}_{name}.png", recipe_json, extra)
            files.append(path)
            gallery.append((images.enlarge(img, 128), f"{i}: {name} (seed {recipe.seed + i})"))
        grid_path = save_png(image_grid(samples, scale=max(1, 128 // w)), out / f"samples_{n}x{h}x{w}x3.png",
                             recipe_json, {"labels": [] if labels is None else labels.tolist()})
        npz = save_samples_npz(out / f"samples_{n}x{h}x{w}x3.npz", samples, labels)
        files = [grid_path, npz, *files]
        if trajectory is not None:
            files.extend(write_trajectory_animation(trajectory, out / name) for name in ("trajectory.gif",
                                                                                           "trajectory.webp"))
            files.append(trajectory.save(out / "trajectory.npz"))
        (out / "recipe.json").write_text(json.dumps(json.loads(recipe_json), indent=1) + "\n")
        files.append(out / "recipe.json")
        cli = replace(recipe, model=self.ctx.cli_model(recipe.model),
                      classifier=self.ctx.cli_model(recipe.classifier))
        return gallery, [str(f) for f in files], cli.cli_command()


def preview(x, alt: str) -> str:
    """A batch as one grid at the images' own resolution, inline in HTML (the page enlarges it with pixelated
    CSS): a small PNG in the streamed message itself, no file for Gradio to cache and the browser to fetch."""
    return images.inline_png(images.batch_view(x, min_width=0), alt)


def write_trajectory_animation(traj, path: Path) -> Path:
    """x_t | predicted x0, side by side, for (up to MAX_ANIMATION_FRAMES) recorded steps."""
    count = len(traj.steps)
    picks = np.unique(np.linspace(0, count - 1, min(count, MAX_ANIMATION_FRAMES)).round().astype(int))
    frames = []
    for pos in picks:
        left = images.batch_view(traj.x[pos], 128)
        right = images.batch_view(traj.pred_x0[pos], 128)
        gap = np.full((left.shape[0], 4, 3), 255, np.uint8)
        frames.append(np.concatenate([left, gap, right], axis=1))
    return images.write_animation(frames, path)
