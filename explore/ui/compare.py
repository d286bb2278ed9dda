"""Guidance comparison: an X/Y sweep of any two run options, every cell from the same seed and noise."""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace

import gradio as gr
import numpy as np
import pandas as pd
import torch

from explore.classify import classify
from explore.engine import Recipe, plan
from explore.metrics import saturated_fraction
from explore.outputs import save_png, save_samples_npz, to_uint8
from explore.recipe import Number, options_of
from explore.ui import images, plots, progress as progress_bar
from explore.ui.context import AppContext, class_choices, class_index, class_names, optional
from explore.ui.session import Session, ensure

MAX_VALUES = 6  # per axis
NUMBERS = ["confidence", "accuracy", "diversity", "saturated", "seconds"]  # per cell, after the two axis values
PROGRESS_EVERY_S = 0.5  # progress messages at most this often
PLOT_EVERY_S = 8.0  # the trade-off plot is redrawn at most this often while cells fill (and at the end)
GRID_WIDTH = 760  # px the grid is drawn to fit, cells enlarged by a whole factor (the page shows it 1:1)


@dataclass(frozen=True)
class Axis:
    """A run option the comparison can sweep along its rows or columns."""

    label: str  # the table's column and the plot's axis
    field: str  # the Recipe field it sets
    heading: str  # a row's or column's heading is f"{heading} {value}"
    example: str
    separators: str = r"[,\s;]+"  # between values in the text box

    @property
    def numeric(self) -> bool:
        return self.field in ("classifier_scale", "cfg_scale", "cfg_rescale", "dynamic_threshold", "seed")


_LIST = r"[;\s]+"  # for values that hold commas themselves
AXES = {axis.label: axis for axis in [
    Axis("classifier scale", "classifier_scale", "classifier", "0, 1, 3, 10"),
    Axis("CFG scale", "cfg_scale", "CFG", "0, 1, 3"),
    Axis("sampler", "sampler", "", "ddpm, ddim, euler, euler_a, heun, dpmpp_2m"),
    Axis("respacing", "respacing", "steps", "10; 25; ddim25; 10,15,20", _LIST),
    Axis("seed", "seed", "seed", "0, 1, 2"),
    Axis("class", "class_label", "", "alpine, desert"),
    Axis("guidance method", "guidance_method", "", "standard, conflict"),
    Axis("guidance interval", "guidance_interval", "t in", "all; 0,600; 600,999", _LIST),
    Axis("CFG rescale", "cfg_rescale", "rescale", "0, 0.7"),
    Axis("dynamic threshold", "dynamic_threshold", "threshold", "0, 0.995"),
]}
DEFAULT_AXES = ("classifier scale", "CFG scale")


def parse_scales(text: str, name: str, low: float, high: float) -> list[float]:
    """'0, 1.5, 3' -> [0.0, 1.5, 3.0]; a gr.Error names the field otherwise."""
    parts = [p for p in re.split(r"[,\s;]+", str(text or "").strip()) if p]
    if not parts:
        raise gr.Error(f"{name}: give at least one value, e.g. '1, 2, 4'")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise gr.Error(f"{name}: {part[:40]!r} is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise gr.Error(f"{name}: {part[:40]} is outside [{low:g}, {high:g}]")
        values.append(value)
    if len(values) > MAX_VALUES:
        raise gr.Error(f"{name}: at most {MAX_VALUES} values (got {len(values)})")
    return list(dict.fromkeys(values))


def axis_values(ctx: AppContext, axis: Axis, text, classes) -> list:
    """The values typed for `axis`, each checked as the recipe checks that option; a gr.Error otherwise."""
    kind = options_of(Recipe)[axis.field].kind
    if isinstance(kind, Number):
        return parse_scales(text, f"{axis.label} values", kind.low, kind.high)
    parts = [p for p in re.split(axis.separators, str(text or "").strip()) if p]
    if not parts:
        raise gr.Error(f"{axis.label} values: give at least one, e.g. '{axis.example}'")
    if len(parts) > MAX_VALUES:
        raise gr.Error(f"{axis.label} values: at most {MAX_VALUES} (got {len(parts)})")
    values = []
    for part in parts:
        if axis.field == "class_label":
            values.append(class_index(classes, part, allow_random=False))
        elif axis.field == "guidance_interval" and part.lower() == "all":
            values.append("")
        else:
            values.append(kind.parse(axis.label, part, ctx.registry.caps))
    return list(dict.fromkeys(values))


def shown(axis: Axis, value, classes) -> str:
    """A value as the grid's headings and the table show it."""
    if axis.field == "class_label":
        return class_names(classes)[value]
    if axis.field == "guidance_interval":
        return value or "all"
    return f"{value:g}" if isinstance(value, float) else str(value)


def evaluate(ctx: AppContext, evaluator: str | None, x: torch.Tensor, label: int) -> dict:
    """Evaluation-classifier numbers for one cell: confidence in the requested class, accuracy, diversity."""
    if evaluator is None:
        return {"confidence": None, "accuracy": None, "diversity": None}
    classified = classify(ctx.registry.get(evaluator), x)
    probs, features = classified.probs, classified.features
    confidence = float(probs[:, label].mean())
    accuracy = float((probs.argmax(-1) == label).float().mean())
    diversity = float(torch.pdist(features.float()).mean()) if len(x) > 1 else None
    return {"confidence": confidence, "accuracy": accuracy, "diversity": diversity}


def cell_scale(per_cell: int, size: int, columns: int, side: int = 130) -> tuple[int, int]:
    """(images per tile row, whole enlargement) that fits `columns` cells into GRID_WIDTH, at most 4x."""
    across = math.ceil(math.sqrt(per_cell))
    tile_w = across * size + across - 1
    return across, max(1, min(4, (GRID_WIDTH - side) // (columns * (tile_w + 8)) if columns else 4))


class Comparison:
    """The Guidance comparison tab: cells filled one by one, stoppable within a step."""

    # the API's parameters in order: recipe fields (batch_size = images per cell) and the sweep's own
    INPUTS = ("model", "class_label", "sampler", "respacing", "classifier", "row_values", "column_values",
              "guidance_method", "seed", "batch_size", "evaluator", "session", "row_axis", "column_axis",
              "classifier_scale", "cfg_scale", "cfg_rescale", "guidance_interval", "dynamic_threshold")

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def stop(self, session: Session) -> None:
        """Ask the running sweep of this session to end after its current step."""
        ensure(session).request_stop("compare")

    def model_options(self, model: str):
        """The requested-class choices of a model."""
        names = class_choices(self.ctx.info(model))[1:]
        return gr.update(choices=names, value=names[0] if names else None)

    def axis_changed(self, axis: str):
        """An axis's example values, when another axis is chosen."""
        return gr.update(value=AXES[axis].example if axis in AXES else "")

    def _axes(self, base: Recipe, row_axis, column_axis, row_values, column_values) -> tuple[Axis, list, Axis, list]:
        names = (row_axis or DEFAULT_AXES[0], column_axis or DEFAULT_AXES[1])
        for name in names:
            if name not in AXES:
                raise gr.Error(f"axis: {str(name)[:40]!r} is not one of {', '.join(AXES)}")
        if names[0] == names[1]:
            raise gr.Error(f"rows and columns both sweep {names[0]}; choose two different options")
        info = self.ctx.info(base.model)
        if "classifier scale" in names and base.classifier is None:
            raise gr.Error("classifier scale: choose a guidance classifier to sweep its scale")
        if {"CFG scale", "CFG rescale"} & set(names) and info.null_class is None:
            raise gr.Error(f"CFG: {base.model} has no null class, so it has no classifier-free guidance to sweep")
        rows, cols = (axis_values(self.ctx, AXES[name], text, info)
                      for name, text in zip(names, (row_values, column_values)))
        return AXES[names[0]], rows, AXES[names[1]], cols

    def run(self, base: Recipe, row_values, column_values, evaluator, session: Session, row_axis=None,
            column_axis=None, progress=gr.Progress()):
        """Sweep two options (rows x columns; by default classifier scale x CFG scale) on the same seed and noise."""
        session = ensure(session)
        info = self.ctx.info(base.model)
        if info.num_labels is None:
            raise gr.Error(f"{base.model} is unconditional; the comparison needs a class-conditional model.")
        per_cell, evaluator = base.batch_size, optional(evaluator)
        if evaluator is not None and self.ctx.info(evaluator).kind != "evaluator":
            raise gr.Error(f"{evaluator} is not an evaluation classifier.")
        row_axis, rows, col_axis, cols = self._axes(base, row_axis, column_axis, row_values, column_values)
        recipes = {(i, j): replace(base, **{row_axis.field: r, col_axis.field: c})
                   for i, r in enumerate(rows) for j, c in enumerate(cols)}
        plans = {key: plan(recipe, self.ctx.registry) for key, recipe in recipes.items()}  # every cell checked first

        session.start("compare")
        sweep = Sweep(row_axis, col_axis, rows, cols, info, per_cell, info.image_size)
        session.sweep = {f"{sweep.row_names[i]}, {sweep.col_names[j]}": recipe for (i, j), recipe in recipes.items()}
        note = "" if evaluator else " (no evaluator: numbers unavailable)"
        total_steps = sum(len(p.grid) for p in plans.values())
        yield self._view(sweep, f"Computing {len(plans)} cells{note}…", session)
        done_steps, reported = 0, float("-inf")
        for key, cell in plans.items():
            started, last = time.perf_counter(), None
            for last in cell.steps(should_stop=session.should_stop("compare")):
                if time.perf_counter() - reported >= PROGRESS_EVERY_S:  # each message costs the run CPU time
                    reported = time.perf_counter()
                    progress((done_steps + last.index + 1, total_steps),
                             desc=f"cell {len(sweep.table) + 1}/{len(plans)}")
            if session.stop["compare"] or last is None:
                yield self._view(sweep, f"Stopped after {len(sweep.table)} of {len(plans)} cells.", session,
                                 plot=True)
                return
            done_steps += len(cell.grid)
            seconds = time.perf_counter() - started
            x = last.x.clamp(-1, 1)
            label = cell.recipe.class_label
            sweep.add(key, to_uint8(x), evaluate(self.ctx, evaluator, x, label), seconds)
            yield self._view(sweep, f"Cell {len(sweep.table)}/{len(plans)} done ({sweep.row_names[key[0]]}, "
                             f"{sweep.col_names[key[1]]}, {seconds:.1f} s){note}.", session)
        files = self._write(base, sweep, rows, cols, [recipes[key].class_label for key in plans])
        same = "seed" if row_axis.field == "seed" or col_axis.field == "seed" else f"seed {base.seed}"
        yield self._view(sweep, f"Finished {len(plans)} cells, same {same} and the same noise in each{note}.",
                         session, files, plot=True)

    def _view(self, sweep: "Sweep", status: str, session, files=None, plot: bool = False):
        """The outputs; the trade-off plot is redrawn at most every PLOT_EVERY_S (and when `plot`): drawing it
        takes longer than a cell's image and table."""
        bar = progress_bar.bar(len(sweep.table), len(sweep.row_names) * len(sweep.col_names))
        figure = gr.update()
        if plot or time.perf_counter() - sweep.plotted_at >= PLOT_EVERY_S:
            figure, sweep.plotted_at = plots.tradeoff_figure(sweep.points, sweep.axis_labels), time.perf_counter()
        return (sweep.grid(), sweep.frame(), figure, status, bar, gr.update() if files is None else files, session)

    def _write(self, base, sweep: "Sweep", rows, cols, labels):
        out = self.ctx.new_run_dir("compare")
        meta = {"rows": {"option": sweep.row_axis.field, "values": rows},
                "columns": {"option": sweep.col_axis.field, "values": cols}, "cells": "row-major"}
        from PIL import Image
        png = save_png(Image.fromarray(sweep.grid()), out / "comparison.png", base.to_json(), {"sweep": meta})
        keys = sorted(sweep.samples)
        stacked = np.concatenate([sweep.samples[key] for key in keys])
        per_cell = [len(sweep.samples[key]) for key in keys]
        npz = save_samples_npz(out / f"comparison_{len(stacked)}x{stacked.shape[1]}x{stacked.shape[2]}x3.npz",
                               stacked, np.repeat(np.asarray(labels), per_cell))
        csv = out / "comparison.csv"
        sweep.frame().to_csv(csv, index=False)
        return [str(png), str(npz), str(csv)]


class Sweep:
    """What a comparison has produced so far: cell images, notes, the table and the plot's points."""

    def __init__(self, row_axis: Axis, col_axis: Axis, row_values: list, col_values: list, classes,
                 per_cell: int, image_size: int):
        self.row_axis, self.col_axis = row_axis, col_axis
        # the table's values: numbers for numeric axes, else as shown
        self.row_values = [v if row_axis.numeric else shown(row_axis, v, classes) for v in row_values]
        self.col_values = [v if col_axis.numeric else shown(col_axis, v, classes) for v in col_values]
        self.row_names = [f"{row_axis.heading} {shown(row_axis, v, classes)}".strip() for v in row_values]
        self.col_names = [f"{col_axis.heading} {shown(col_axis, v, classes)}".strip() for v in col_values]
        self.across, self.scale = cell_scale(per_cell, image_size, len(col_values))
        down = math.ceil(per_cell / self.across)
        width = min(per_cell, self.across)
        self.cell_size = ((down * (image_size + 1) - 1) * self.scale, (width * (image_size + 1) - 1) * self.scale)
        self.cells, self.notes, self.samples, self.table, self.points = {}, {}, {}, [], []
        self.plotted_at = float("-inf")

    @property
    def axis_labels(self) -> tuple[str, str]:
        return self.col_axis.label, self.row_axis.label

    def add(self, key: tuple[int, int], samples: np.ndarray, numbers: dict, seconds: float) -> None:
        self.samples[key] = samples
        tiled = images.tile(samples, columns=min(len(samples), self.across), pad=1)
        self.cells[key] = tiled.repeat(self.scale, 0).repeat(self.scale, 1)
        if numbers["confidence"] is not None:
            self.notes[key] = f"p={numbers['confidence']:.2f} acc={numbers['accuracy']:.2f}"
        values = {**numbers, "saturated": saturated_fraction(samples), "seconds": seconds}
        row, col = self.row_values[key[0]], self.col_values[key[1]]
        self.table.append([row, col, *(None if values[k] is None else round(values[k], 3) for k in NUMBERS)])
        self.points.append({**values, self.row_axis.label: row, self.col_axis.label: col})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.table, columns=[self.row_axis.label, self.col_axis.label, *NUMBERS])

    def grid(self) -> np.ndarray:
        return images.labelled_grid(self.cells, self.row_names, self.col_names, self.notes, self.cell_size,
                                    f"rows: {self.row_axis.label}", f"columns: {self.col_axis.label}")
