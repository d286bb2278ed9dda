"""Two runs side by side: two cells of the last comparison played step by step together on the same noise, and
the step at which their images part visibly (where in the trajectory does guidance change the image?)."""
from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator

import gradio as gr
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from explore.engine import Recipe, plan
from explore.outputs import to_uint8
from explore.samplers import Step
from explore.ui import images, plots, progress as progress_bar
from explore.ui.context import AppContext
from explore.ui.session import Session, ensure

GREY = 127.5  # grey levels (of 255) per unit of the images' [-1, 1] range: every difference is reported in these
VISIBLE_GREY = 8.0  # RMS difference above which two images look different: 8 of 255 grey levels (0.063 in [-1, 1])
SETTLED_FRACTION = 0.1  # settled: from that step on the x0 difference's RMS stays within 10% of its last value
DIFF_SPAN_GREY = 64.0  # difference views: black = equal, white = this many grey levels apart or more
NO_SWEEP = ("No comparison yet: run a sweep on the **Guidance comparison** tab first; any two of its cells can then "
            "be played here side by side.")


# --- the analysis -------------------------------------------------------------------------------

def shorter_step(index: int, longer: int, shorter: int) -> int:
    """The step of a `shorter`-step run at the same fraction of the run as step `index` of a `longer` one (both
    counted as finished fractions: the last step matches the last step)."""
    return min(shorter - 1, max(0, math.floor((index + 1) * shorter / longer + 0.5) - 1))


def parting_step(rms: list[float], threshold: float = VISIBLE_GREY) -> int | None:
    """The first step from which the difference stays above `threshold` up to the last step; None if it ends
    at or below it."""
    start = None
    for index in range(len(rms) - 1, -1, -1):
        if rms[index] <= threshold:
            break
        start = index
    return start


def settled_step(rms: list[float], fraction: float = SETTLED_FRACTION) -> int | None:
    """The first step from which the difference stays within `fraction` of its last value; None when empty."""
    if not rms:
        return None
    final, start = rms[-1], len(rms) - 1
    for index in range(len(rms) - 1, -1, -1):
        if abs(rms[index] - final) > fraction * final:
            break
        start = index
    return start


def rms_grey(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference of two images in [-1, 1], in grey levels of 255."""
    return float((a.float() - b.float()).pow(2).mean().sqrt()) * GREY


def noise_level(sigma: float) -> float:
    """A step's VE noise level sigma -> the noise std of the VP x_t, sqrt(1 - abar)."""
    return sigma / math.sqrt(1.0 + sigma ** 2)


@dataclass
class Curves:
    """Per step of the longer run: its timestep and noise level, and the RMS differences A - B (grey levels)."""

    total: int
    timesteps: list[float] = field(default_factory=list)
    noise: list[float] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    x0: list[float] = field(default_factory=list)

    def add(self, lead: Step, a: Step, b: Step) -> None:
        self.timesteps.append(lead.timestep)
        self.noise.append(noise_level(lead.sigma))
        self.x.append(rms_grey(a.x, b.x))
        self.x0.append(rms_grey(a.pred_x0.clamp(-1, 1), b.pred_x0.clamp(-1, 1)))  # as shown

    @property
    def parting(self) -> int | None:
        return parting_step(self.x0)

    @property
    def settled(self) -> int | None:
        return settled_step(self.x0)


def walk_together(runs: list[Iterator[Step]], totals: list[int], should_stop: Callable[[], bool]):
    """(step of A, step of B) at each step of the longer run; the shorter run advances to the step at the same
    fraction of its run. Ends when either run ends, or before the second run's step once a stop is asked."""
    lead = 0 if totals[0] >= totals[1] else 1
    other = 1 - lead
    current: list[Step | None] = [None, None]
    for step in runs[lead]:
        current[lead] = step
        target = shorter_step(step.index, totals[lead], totals[other])
        while current[other] is None or current[other].index < target:
            if should_stop():
                return
            following = next(runs[other], None)
            if following is None:
                return
            current[other] = following
        yield current[0], current[1]


# --- what the page shows --------------------------------------------------------------------------

def _view(x: torch.Tensor, alt: str) -> str:
    return images.inline_png(to_uint8(x[:1])[0], alt)


def _difference_view(a: torch.Tensor, b: torch.Tensor, alt: str) -> str:
    """Per pixel, the RMS over colour channels of A - B: black = equal, white = DIFF_SPAN_GREY or more."""
    grey = (a[:1].float() - b[:1].float()).pow(2).mean(1, keepdim=True).sqrt() * GREY / DIFF_SPAN_GREY
    return _view(grey.clamp(0, 1).expand(-1, 3, -1, -1) * 2 - 1, alt)


def frames_html(a: Step, b: Step) -> str:
    """x_t and predicted x0 of A and B and where they differ, small inline PNGs the page enlarges."""
    x0_a, x0_b = a.pred_x0.clamp(-1, 1), b.pred_x0.clamp(-1, 1)
    span = f"black = equal, white = {DIFF_SPAN_GREY:g}+ grey levels"
    cells = [(_view(a.x, "x_t of A"), f"x_t · A (step {a.index + 1}/{a.total})"),
             (_view(b.x, "x_t of B"), f"x_t · B (step {b.index + 1}/{b.total})"),
             (_difference_view(a.x, b.x, "x_t: |A - B|"), f"x_t |A − B| ({span})"),
             (_view(x0_a, "predicted x0 of A"), "predicted x0 · A"),
             (_view(x0_b, "predicted x0 of B"), "predicted x0 · B"),
             (_difference_view(x0_a, x0_b, "predicted x0: |A - B|"), f"predicted x0 |A − B| ({span})")]
    figures = "".join(f'<div class="pair-cell">{img}<div class="pair-caption">{html.escape(caption)}</div></div>'
                      for img, caption in cells)
    return f'<div class="pair-grid">{figures}</div>'


def parting_figure(curves: Curves, lead: str) -> Figure:
    """Both RMS differences against step, the visibility threshold, the parting and settled steps, noise level."""
    fig, (ax,) = plots._figure(7.6, 2.9)
    steps = list(range(1, len(curves.x) + 1))
    ax.plot(steps, curves.x, color="tab:blue", lw=1.5, label="x_t")
    ax.plot(steps, curves.x0, color="tab:orange", lw=1.5, label="predicted x0")
    ax.axhline(VISIBLE_GREY, color="0.4", ls=":", lw=1, label=f"visible ({VISIBLE_GREY:g})")
    if curves.parting is not None:
        ax.axvline(curves.parting + 1, color="tab:red", lw=1.2, label=f"part at step {curves.parting + 1}")
        if curves.settled is not None and curves.settled > curves.parting:
            ax.axvline(curves.settled + 1, color="tab:green", ls="--", lw=1.2,
                       label=f"settled at step {curves.settled + 1}")
    ax.set(xlabel=f"step (of {curves.total}{lead})", ylabel="RMS of A − B (grey levels)",
           xlim=(0.5, curves.total + 0.5))
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    noise = ax.twinx()
    noise.plot(steps, curves.noise, color="0.6", ls="--", lw=1, label="noise level sqrt(1 − ᾱ) (right)")
    noise.set_ylim(0, 1.05)
    noise.set_ylabel("noise level sqrt(1 − ᾱ)", color="0.4")
    handles = ax.get_legend_handles_labels()[0] + noise.get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside right upper", fontsize=8, frameon=False)
    return fig


def differences(a: Recipe, b: Recipe) -> str:
    """The options in which two recipes differ, e.g. 'classifier_scale 0 (A) vs 10 (B)'."""
    def shown(value):
        return f"{value:g}" if isinstance(value, float) else str(value)
    parts = [f"{f.name} {shown(getattr(a, f.name))} (A) vs {shown(getattr(b, f.name))} (B)"
             for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return "; ".join(parts) or "nothing: the same recipe"


def answer(curves: Curves, what: str) -> str:
    """Where the two runs part, in words."""
    parted, settled = curves.parting, curves.settled
    if not curves.x0:
        return "No step ran."
    if parted is None:
        if max(curves.x0) == 0 and max(curves.x) == 0:
            return "A and B are identical at every step."
        return (f"A and B never part visibly: their predicted x0 end {curves.x0[-1]:.1f} grey levels RMS apart "
                f"(at most {max(curves.x0):.1f}; visible above {VISIBLE_GREY:g}).")
    text = (f"A and B part visibly at step {parted + 1}/{curves.total} (t = {curves.timesteps[parted]:.0f}, noise "
            f"level sqrt(1 − ᾱ) = {curves.noise[parted]:.2f}): from there on {what} changes the image "
            f"(predicted x0 more than {VISIBLE_GREY:g} grey levels RMS apart up to the end).")
    if settled is not None and settled > parted:
        text += (f" From step {settled + 1} on the difference barely changes (it stays within "
                 f"{SETTLED_FRACTION:.0%} of its last value, {curves.x0[-1]:.1f} grey levels).")
    return text


# --- the handler -----------------------------------------------------------------------------------

class Pair:
    """The Trajectory explorer's side-by-side section: two cells played together, stoppable within a step."""

    preview_interval_s = 0.2  # frames stream at most this often (and at the end)
    plot_interval_s = 1.0  # the figure is redrawn at most this often (and at the end)

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def stop(self, session: Session) -> None:
        """Ask the playing pair of this session to end after its current step."""
        ensure(session).request_stop("pair")

    def cells(self, session: Session):
        """Run A and Run B choices from the session's last comparison (first and last cell), and a note."""
        names = list(ensure(session).sweep)
        if not names:
            return gr.update(choices=[], value=None), gr.update(choices=[], value=None), NO_SWEEP
        per_cell = next(iter(ensure(session).sweep.values())).batch_size
        note = (f"{len(names)} cells of the last comparison, {per_cell} image{'s' * (per_cell > 1)} each: pick two "
                "and an image, then play them together on the same noise.")
        return (gr.update(choices=names, value=names[0]), gr.update(choices=names, value=names[-1]), note)

    def recipes(self, session: Session, run_a, run_b, image) -> tuple[Recipe, Recipe]:
        """The two cells' recipes for one image: image k of a cell rerun alone from its own seed (seed + k), which
        is the same image (bit for bit on CPU, where each network sees a fixed number of rows per image)."""
        sweep = session.sweep
        if not sweep:
            raise gr.Error(NO_SWEEP.replace("**", ""))
        for label, name in (("Run A", run_a), ("Run B", run_b)):
            if not isinstance(name, str) or name not in sweep:
                raise gr.Error(f"{label}: {str(name)[:60]!r} is not a cell of the last comparison; "
                               f"choose one of: {', '.join(list(sweep)[:12])}")
        a, b = sweep[run_a], sweep[run_b]
        image = 0 if image is None else image
        if isinstance(image, bool) or not isinstance(image, (int, float)) or not float(image).is_integer() \
                or not 0 <= image < min(a.batch_size, b.batch_size):
            raise gr.Error(f"Image: {image!r:.40} is not a whole number in [0, {min(a.batch_size, b.batch_size) - 1}]")
        return tuple(replace(r, batch_size=1, seed=r.seed + int(image)) for r in (a, b))

    def play(self, run_a, run_b, image, session: Session, progress=gr.Progress()):
        """Play both cells step by step together; stream x_t, predicted x0 and their differences, then say where
        they part."""
        session = ensure(session)
        recipes = self.recipes(session, run_a, run_b, image)
        plans = [plan(recipe, self.ctx.registry) for recipe in recipes]  # both checked before either runs
        totals = [len(p.grid) for p in plans]
        curves = Curves(max(totals))
        intro = self._intro(recipes, totals, image)
        session.start("pair")
        should_stop = session.should_stop("pair")
        runs = [p.steps(should_stop=should_stop) for p in plans]
        yield gr.update(), f"{intro}\n\nPlaying {curves.total} steps…", progress_bar.bar(0, curves.total), \
            plots.message_figure("The differences appear as the runs play.")
        lead_name = "" if totals[0] == totals[1] else f", run {'AB'[totals[1] > totals[0]]}"
        last_frame = last_plot = last_progress = float("-inf")
        pair = None
        try:
            for pair in walk_together(runs, totals, should_stop):
                lead = pair[0] if totals[0] >= totals[1] else pair[1]
                curves.add(lead, *pair)
                now, final = time.perf_counter(), len(curves.x) == curves.total
                if final or now - last_progress >= self.preview_interval_s:
                    progress((len(curves.x), curves.total), desc="playing", unit="steps")
                    last_progress = now
                if not final and now - last_frame >= self.preview_interval_s:  # the final frame follows the loop
                    figure = gr.update()
                    if now - last_plot >= self.plot_interval_s:
                        figure, last_plot = parting_figure(curves, lead_name), now
                    last_frame = now
                    yield frames_html(*pair), self._status(intro, curves), \
                        progress_bar.bar(len(curves.x), curves.total), figure
        finally:
            for run in runs:
                run.close()
        if pair is None:
            yield gr.update(), f"{intro}\n\nStopped before the first step.", progress_bar.bar(0, curves.total), \
                gr.update()
            return
        done = len(curves.x)
        ending = (f"Stopped at step {done}/{curves.total}; so far: " if done < curves.total
                  else f"Finished {curves.total} steps. ")
        yield frames_html(*pair), f"{intro}\n\n**{ending}{answer(curves, self._what(recipes))}**", \
            progress_bar.bar(done, curves.total), parting_figure(curves, lead_name)

    @staticmethod
    def _what(recipes: tuple[Recipe, Recipe]) -> str:
        names = [f.name for f in fields(recipes[0]) if getattr(recipes[0], f.name) != getattr(recipes[1], f.name)]
        if names and all("guidance" in n or n.startswith(("classifier", "cfg")) for n in names):
            return "guidance"
        return f"the change of {' and '.join(names)}" if names else "nothing"

    @staticmethod
    def _intro(recipes: tuple[Recipe, Recipe], totals: list[int], image) -> str:
        a, b = recipes
        noise = (f"same start noise and per-step noise (seed {a.seed}, image {int(image or 0)} of each cell)"
                 if a.seed == b.seed else "different seeds, so different noise")
        text = f"A and B differ in {differences(a, b)}; {noise}."
        if totals[0] != totals[1]:
            longer, shorter = ("A", "B") if totals[0] > totals[1] else ("B", "A")
            text += (f" A has {totals[0]} steps and B {totals[1]}: each step of {longer} is shown with the step of "
                     f"{shorter} at the same fraction of its run.")
        return text

    @staticmethod
    def _status(intro: str, curves: Curves) -> str:
        return (f"{intro}\n\nStep {len(curves.x)}/{curves.total} · t = {curves.timesteps[-1]:.0f} · RMS of A − B: "
                f"x_t {curves.x[-1]:.1f}, predicted x0 {curves.x0[-1]:.1f} grey levels "
                f"(visible above {VISIBLE_GREY:g}).")
