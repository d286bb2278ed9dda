"""Figures (matplotlib's object API, no pyplot state, so handlers may run in parallel threads)."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from explore.samplers import Grid


def _figure(width: float = 6.0, height: float = 3.0, cols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, list(axes)


def message_figure(text: str, width: float = 6.0, height: float = 2.2) -> Figure:
    fig, (ax,) = _figure(width, height)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="0.3")
    return fig


def respacing_figure(grid: Grid, title: str) -> Figure:
    """Which of the model's timesteps a run visits, drawn on its noise-level curve sqrt(1 - abar_t)."""
    base = grid.base
    t_all = np.arange(len(base))
    noise = np.sqrt(1.0 - base.alphas_cumprod)
    times = grid.times
    sigmas = grid.sigmas[:-1]
    kept = sigmas / np.sqrt(1.0 + sigmas ** 2)  # VE sigma -> VP noise std
    fig, (ax,) = _figure(6.0, 2.6)
    ax.plot(t_all, noise, color="0.6", lw=1.5, label="noise level of x_t")
    ax.scatter(times, kept, s=12 if len(times) <= 100 else 4, color="tab:red", zorder=3,
               label=f"{len(times)} visited")
    ax.vlines(times, -0.06, -0.01, color="tab:red", lw=0.6)
    ax.set(xlabel="timestep t (of the model's 1000)", ylabel="sqrt(1 - ᾱ_t)", xlim=(-10, len(base) + 10),
           ylim=(-0.08, 1.05), title=title)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return fig


TRADEOFF_PANELS = (("accuracy", "class accuracy", (-0.05, 1.05)), ("diversity", "diversity (feature distance)", None),
                   ("saturated", "saturated pixels (fraction)", (-0.05, 1.05)))


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def tradeoff_figure(points: list[dict], axes: tuple[str, str] = ("CFG scale", "classifier scale")) -> Figure:
    """The sweep's trade-off: accuracy, diversity and saturated pixels, each against one swept option (a numeric
    one with the most values; named values such as samplers sit side by side), one labelled line per value of
    the other."""
    first, second = axes
    values = {name: list(dict.fromkeys(p[name] for p in points)) for name in axes}
    swap = len(values[second]) > len(values[first])
    if _numeric(values[first]) != _numeric(values[second]):
        swap = _numeric(values[second])
    if swap:
        first, second = second, first
    panels = [(key, label, limits) for key, label, limits in TRADEOFF_PANELS
              if any(p.get(key) is not None for p in points)]
    if not panels:
        return message_figure("No numbers yet: they appear as the cells finish.", 8.4, 2.8)
    fig, axs = _figure(8.4, 2.8, cols=len(panels))
    numeric_x = _numeric(values[first])
    position = {v: (v if numeric_x else i) for i, v in enumerate(values[first])}
    series = sorted(values[second]) if _numeric(values[second]) else values[second]
    colours = colormaps["viridis"](np.linspace(0, 0.85, max(len(series), 1)))
    for ax, (key, label, limits) in zip(axs, panels):
        for colour, value in zip(colours, series):
            mine = sorted((position[p[first]], p[key]) for p in points if p[second] == value and p.get(key) is not None)
            if mine:
                name = f"{value:g}" if isinstance(value, float) else value
                ax.plot(*zip(*mine), "o-", color=colour, lw=1.5, ms=4, label=f"{second} {name}")
        ax.set(xlabel=first, ylabel=label)
        if not numeric_x:
            ax.set_xticks(range(len(values[first])), [str(v) for v in values[first]], rotation=30, fontsize=8)
        if limits:
            ax.set_ylim(*limits)
    handles, labels = axs[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def spectrum_figure(freqs: np.ndarray, spectra: np.ndarray, steps: np.ndarray, current: int,
                    bands: dict[str, np.ndarray], total: int) -> Figure:
    """Left: radially averaged power spectrum of predicted x0 at every recorded step; right: band settling."""
    fig, (left, right) = _figure(8.0, 3.0, cols=2)
    cmap = colormaps["viridis"]
    tiny = max(float(spectra[spectra > 0].min()) if (spectra > 0).any() else 1e-12, 1e-12)
    for i in range(len(steps)):
        left.semilogy(freqs, np.maximum(spectra[i], tiny), color=cmap(i / max(1, len(steps) - 1)), lw=0.7, alpha=0.6)
    left.semilogy(freqs, np.maximum(spectra[current], tiny), color="tab:red", lw=2,
                  label=f"step {steps[current] + 1}/{total}")
    left.set(xlabel="spatial frequency (cycles / pixel)", ylabel="power",
             title="Power spectrum of predicted x0 (dark = early)")
    left.legend(fontsize=8, frameon=False)
    for name, values in bands.items():
        right.plot(steps + 1, values, lw=1.5, label=f"{name} detail")
    right.axvline(steps[current] + 1, color="tab:red", lw=1)
    right.set(xlabel="step", ylabel="similarity to final", ylim=(-0.1, 1.05), xlim=(0, total + 1),
              title="When each scale settles")
    right.legend(fontsize=8, frameon=False, loc="lower right")
    return fig


def settle_figure(final: np.ndarray, settle: np.ndarray, total: int, tol: float) -> Figure:
    """The final image beside a map of the step at which each region of its prediction settled."""
    fig, (a, b) = _figure(6.4, 3.0, cols=2)
    a.imshow(final, interpolation="nearest")
    a.set_title("final image")
    a.axis("off")
    shown = b.imshow(settle + 1, cmap="magma_r", vmin=1, vmax=total, interpolation="nearest")
    b.set_title(f"step where each region settled\n(|x0 - final| < {tol:g} from then on)", fontsize=9)
    b.axis("off")
    fig.colorbar(shown, ax=b, label="step", shrink=0.85)
    return fig


def sharpness_figure(lab: dict[str, dict[str, dict[str, float]]]) -> Figure:
    """High-frequency energy and Laplacian sharpness of each image kind, for the two lab panels."""
    if not lab:
        return message_figure("Run either panel to measure sharpness.", 7.0, 2.0)
    fig, axes = _figure(8.0, 3.0, cols=2)
    names, values_hf, values_lap, colors = [], [], [], []
    palette = {"generated": "tab:orange", "wild": "tab:blue"}
    for panel in ("generated", "wild"):
        for kind, numbers in lab.get(panel, {}).items():
            names.append(f"{panel}\n{kind}")
            values_hf.append(numbers["hf"])
            values_lap.append(numbers["laplacian"])
            colors.append(palette[panel])
    for ax, values, title in [(axes[0], values_hf, "energy above 0.25 cycles/px"),
                              (axes[1], values_lap, "mean |Laplacian| (sharpness)")]:
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), names, fontsize=7)
        ax.set_title(title, fontsize=10)
    return fig
