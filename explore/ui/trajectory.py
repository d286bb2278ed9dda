"""Trajectory explorer: record every step of a run cheaply, then scrub through it and analyse it."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from explore.outputs import SampleFileError
from explore.samplers import Step
from explore.ui import images, metrics, plots
from explore.ui.session import Session, ensure

BUDGET_BYTES = 128 * 2 ** 20  # recorded tensors per run (float16); longer runs record every k-th step
MAX_UPLOAD_BYTES = 512 * 2 ** 20


class TrajectoryRecorder:
    """Keeps x, predicted x0, predicted noise and the guidance term of (every k-th) step as float16 on the CPU."""

    def __init__(self, total: int, batch: int, shape: tuple[int, int, int], budget: int = BUDGET_BYTES):
        per_step = 4 * batch * int(np.prod(shape)) * 2
        self.stride = max(1, math.ceil(total * per_step / budget))
        self.total = total
        self.steps, self.timesteps, self.sigmas = [], [], []
        self.x, self.pred_x0, self.eps, self.guidance = [], [], [], []

    def add(self, step: Step) -> None:
        if step.index % self.stride and step.index != step.total - 1:
            return
        self.steps.append(step.index)
        self.timesteps.append(step.timestep)
        self.sigmas.append(step.sigma)
        # kept on the run's device until the end: a per-step copy to the host would stall a GPU
        for store, value in ((self.x, step.x), (self.pred_x0, step.pred_x0), (self.eps, step.eps)):
            store.append(value.detach().to(torch.float16))
        self.guidance.append(None if step.guidance is None else step.guidance.detach().to(torch.float16))

    def finish(self, recipe_json: str, labels: np.ndarray | None, class_names: list[str] | None,
               stopped: bool) -> "Trajectory | None":
        if not self.steps:
            return None
        guidance = None
        if any(g is not None for g in self.guidance):
            guidance = torch.stack([torch.zeros_like(self.x[i]) if g is None else g
                                    for i, g in enumerate(self.guidance)]).cpu().numpy()
        return Trajectory(
            recipe_json=recipe_json, total=self.total, steps=np.asarray(self.steps, dtype=np.int64),
            timesteps=np.asarray(self.timesteps, dtype=np.float64), sigmas=np.asarray(self.sigmas, dtype=np.float64),
            x=torch.stack(self.x).cpu().numpy(), pred_x0=torch.stack(self.pred_x0).cpu().numpy(),
            eps=torch.stack(self.eps).cpu().numpy(), guidance=guidance,
            labels=None if labels is None else np.asarray(labels, dtype=np.int64),
            class_names=list(class_names) if class_names else None, stopped=stopped)


@dataclass
class Trajectory:
    """Recorded steps of one run: arrays [S, B, 3, H, W] (float16) indexed by recorded position."""

    recipe_json: str
    total: int  # loop steps of the full run
    steps: np.ndarray  # loop index of each recorded position [S]
    timesteps: np.ndarray
    sigmas: np.ndarray
    x: np.ndarray
    pred_x0: np.ndarray
    eps: np.ndarray
    guidance: np.ndarray | None
    labels: np.ndarray | None
    class_names: list[str] | None
    stopped: bool = False
    _analysis: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return self.x.shape[1]

    def label_name(self, i: int) -> str:
        if self.labels is None:
            return "unconditional"
        label = int(self.labels[i])
        return self.class_names[label] if self.class_names and label < len(self.class_names) else str(label)

    def save(self, path: str | Path) -> Path:
        arrays = {"x": self.x, "pred_x0": self.pred_x0, "eps": self.eps, "steps": self.steps,
                  "timesteps": self.timesteps, "sigmas": self.sigmas, "total": np.int64(self.total),
                  "recipe": np.str_(self.recipe_json), "stopped": np.bool_(self.stopped)}
        if self.guidance is not None:
            arrays["guidance"] = self.guidance
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.class_names:
            arrays["class_names"] = np.array(self.class_names, dtype=np.str_)
        np.savez_compressed(path, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        """Read a trajectory file written by `save` (never unpickles)."""
        path = Path(path)
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise SampleFileError(f"{path.name} is larger than {MAX_UPLOAD_BYTES // 2 ** 20} MiB")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"x", "pred_x0", "eps", "steps"} - set(data.files)
                if missing:
                    raise SampleFileError(f"not a trajectory file (missing {', '.join(sorted(missing))})")
                x = data["x"]
                if x.ndim != 5 or x.shape[2] != 3 or x.dtype.kind != "f":
                    raise SampleFileError(f"'x' must be float [steps, batch, 3, H, W], got {x.dtype} {list(x.shape)}")
                arrays = {k: data[k] for k in ("pred_x0", "eps") }
                for k, v in arrays.items():
                    if v.shape != x.shape:
                        raise SampleFileError(f"'{k}' has shape {list(v.shape)}, expected {list(x.shape)}")
                steps = data["steps"].astype(np.int64)
                if steps.shape != (len(x),):
                    raise SampleFileError("'steps' must hold one loop index per recorded step")
                guidance = data["guidance"] if "guidance" in data.files else None
                if guidance is not None and guidance.shape != x.shape:
                    raise SampleFileError(f"'guidance' has shape {list(guidance.shape)}, expected {list(x.shape)}")
                if "labels" in data.files and (data["labels"].dtype.kind not in "iu"
                                               or data["labels"].shape != (x.shape[1],)):
                    raise SampleFileError(f"'labels' must be {x.shape[1]} whole numbers, one per image")
                return cls(
                    recipe_json=str(data["recipe"]) if "recipe" in data.files else "{}",
                    total=int(data["total"]) if "total" in data.files else int(steps[-1]) + 1,
                    steps=steps,
                    timesteps=data["timesteps"] if "timesteps" in data.files else np.zeros(len(x)),
                    sigmas=data["sigmas"] if "sigmas" in data.files else np.zeros(len(x)),
                    x=x, guidance=guidance, **arrays,
                    labels=data["labels"] if "labels" in data.files else None,
                    class_names=[str(c) for c in data["class_names"]] if "class_names" in data.files else None,
                    stopped=bool(data["stopped"]) if "stopped" in data.files else False)
        except SampleFileError:
            raise
        except (OSError, EOFError, KeyError, TypeError, IndexError, ValueError) as err:
            raise SampleFileError(f"{path.name}: cannot be read as a trajectory ({err})") from None

    def analysis(self, i: int) -> dict:
        """Spectra, band settling of predicted x0 for image i (computed once, then cached)."""
        if i not in self._analysis:
            x0 = self.pred_x0[:, i].astype(np.float32)
            gray = metrics.luma(x0)
            freqs, spectra = metrics.radial_power_spectrum(gray)
            self._analysis[i] = {"freqs": freqs, "spectra": spectra,
                                 "bands": metrics.band_similarity(gray, gray[-1])}
        return self._analysis[i]

    def summary(self) -> str:
        recipe = json.loads(self.recipe_json or "{}")
        every = "" if len(self.steps) == self.total else f", every {int(self.steps[1] - self.steps[0])}th step kept"
        ended = f"stopped at step {int(self.steps[-1]) + 1}" if self.stopped else "finished"
        return (f"**{recipe.get('model', 'run')}**, {recipe.get('sampler', '?')} {recipe.get('respacing', '')}: "
                f"{len(self.steps)} recorded steps of {self.total}{every}; {ended}. Batch of {self.batch}.")


# --- handlers -----------------------------------------------------------------------------------

IMAGE_CHOICE = "image {}: {}"


def _choices(traj: Trajectory) -> list[str]:
    return [IMAGE_CHOICE.format(i, traj.label_name(i)) for i in range(traj.batch)]


def _image_index(traj: Trajectory, choice) -> int:
    if choice in (None, ""):
        return 0
    text = str(choice)
    try:
        index = int(text.split(":")[0].replace("image", "").strip()) if text.startswith("image") else int(text)
    except ValueError:
        raise gr.Error(f"image: {choice!r:.60} is not one of the run's images 0..{traj.batch - 1}") from None
    if not 0 <= index < traj.batch:
        raise gr.Error(f"image {index} is outside this run's batch of {traj.batch}")
    return index


def _loaded_outputs(traj: Trajectory | None, tol: float = 0.1):
    if traj is None:
        return (gr.update(maximum=1, value=0), gr.update(choices=[], value=None),
                "No run yet: sample one on the **Live sampling** tab (or load a trajectory file).",
                plots.message_figure("No trajectory loaded."))
    choices = _choices(traj)
    return (gr.update(minimum=0, maximum=max(1, len(traj.steps) - 1), value=len(traj.steps) - 1, step=1),
            gr.update(choices=choices, value=choices[0]), traj.summary(), settle_map(traj, 0, tol))


def load_latest(session: Session, tol: float = 0.1):
    """Show the session's last run: slider range, image choice, summary, settle map."""
    return _loaded_outputs(ensure(session).trajectory, tol)


def load_file(session: Session, file, tol: float = 0.1):
    """Load a trajectory .npz (as written by a run's download) into the session."""
    session = ensure(session)
    if file is None:
        raise gr.Error("Choose a trajectory .npz file first.")
    session.trajectory = Trajectory.load(getattr(file, "name", file))
    return (*_loaded_outputs(session.trajectory, tol), session)


def settle_map(traj: Trajectory, i: int, tol: float = 0.1):
    x0 = traj.pred_x0[:, i].astype(np.float32)
    patch = max(1, x0.shape[-1] // 32)
    settle = metrics.settle_steps(x0, traj.steps, tol=tol, patch=patch)
    final = images.to_uint8(torch.from_numpy(traj.x[-1, i:i + 1].astype(np.float32)))[0]
    return plots.settle_figure(final, settle, traj.total, tol)


def show_step(session: Session, position: float, choice, tol: float = 0.1):
    """x_t, predicted x0, predicted noise, guidance term and spectra at one recorded step."""
    traj = ensure(session).trajectory
    if traj is None:
        raise gr.Error("No run to explore yet: sample one on the Live sampling tab first.")
    i = _image_index(traj, choice)
    pos = int(min(max(0, round(float(position or 0))), len(traj.steps) - 1))
    view = images.batch_view
    x_t = view(traj.x[pos, i:i + 1])
    x0 = view(traj.pred_x0[pos, i:i + 1])
    eps = images.enlarge(images.noise_view(traj.eps[pos, i]))
    if traj.guidance is None:
        guide, peak = images.placeholder(eps.shape[0], "no guidance\nin this run"), 0.0
    else:
        guide, peak = images.signed_view(traj.guidance[pos, i])
        guide = images.enlarge(guide)
    info = traj.analysis(i)
    step = int(traj.steps[pos])
    caption = (f"Step {step + 1} of {traj.total} (t = {traj.timesteps[pos]:.1f}, σ = {traj.sigmas[pos]:.3g}); "
               f"image {i} ({traj.label_name(i)}). Noise shown at ±3σ; guidance term scaled by its peak "
               f"|g| = {peak:.3g}.")
    spectrum = plots.spectrum_figure(info["freqs"], info["spectra"], traj.steps, pos, info["bands"], traj.total)
    return x_t, x0, eps, guide, caption, spectrum


def settle_for(session: Session, choice, tol: float = 0.1):
    traj = ensure(session).trajectory
    if traj is None:
        return plots.message_figure("No trajectory loaded.")
    return settle_map(traj, _image_index(traj, choice), float(tol))
