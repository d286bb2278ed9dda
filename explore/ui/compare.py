"""Guidance comparison: one seed, one recorded noise, an X/Y sweep of CFG and classifier scales."""
from __future__ import annotations

import math
import re
import time
from dataclasses import replace

import gradio as gr
import numpy as np
import pandas as pd
import torch

from explore.classify import classify
from explore.engine import Recipe, plan
from explore.metrics import saturated_fraction
from explore.noise import PerImageNoise, Recorder
from explore.outputs import save_png, save_samples_npz, to_uint8
from explore.ui import images, plots, progress as progress_bar
from explore.ui.context import AppContext, class_choices, optional
from explore.ui.session import Session, ensure

MAX_VALUES = 6  # per axis
COLUMNS = ["classifier scale", "CFG scale", "confidence", "accuracy", "diversity", "seconds"]


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
            raise gr.Error(f"{name}: {part!r} is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise gr.Error(f"{name}: {part} is outside [{low:g}, {high:g}]")
        values.append(value)
    if len(values) > MAX_VALUES:
        raise gr.Error(f"{name}: at most {MAX_VALUES} values (got {len(values)})")
    return list(dict.fromkeys(values))


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


class Comparison:
    """The Guidance comparison tab: cells filled one by one, stoppable within a step."""

    # the API's parameters in order: recipe fields (batch_size = images per cell) and the sweep's own
    INPUTS = ("model", "class_label", "sampler", "respacing", "classifier", "classifier_scales", "cfg_scales",
              "guidance_method", "seed", "batch_size", "evaluator", "session")

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def stop(self, session: Session) -> None:
        """Ask the running sweep of this session to end after its current step."""
        ensure(session).request_stop("compare")

    def model_options(self, model: str):
        """The requested-class choices of a model."""
        names = class_choices(self.ctx.info(model))[1:]
        return gr.update(choices=names, value=names[0] if names else None)

    def run(self, base: Recipe, classifier_scales, cfg_scales, evaluator, session: Session, progress=gr.Progress()):
        """Sweep classifier scales (rows) x CFG scales (columns) on the same seed and noise."""
        session = ensure(session)
        info = self.ctx.info(base.model)
        if info.num_labels is None:
            raise gr.Error(f"{base.model} is unconditional; the comparison needs a class-conditional model.")
        label, per_cell, evaluator = base.class_label, base.batch_size, optional(evaluator)
        if evaluator is not None and self.ctx.info(evaluator).kind != "evaluator":
            raise gr.Error(f"{evaluator} is not an evaluation classifier.")
        rows = parse_scales(classifier_scales, "classifier scales", 0.0, 1000.0) if base.classifier else [0.0]
        cols = parse_scales(cfg_scales, "CFG scales", 0.0, 100.0) if info.null_class is not None else [1.0]

        session.start("compare")
        source = recorder = Recorder(PerImageNoise.from_seed(base.seed, per_cell, (3, info.image_size, info.image_size),
                                                 self.ctx.registry.device))
        cells, notes, table, points, samples = {}, {}, [], [], {}
        row_names = [f"classifier {r:g}" for r in rows]
        col_names = [f"CFG {c:g}" for c in cols]
        cell_size = None
        total_cells = len(rows) * len(cols)
        note = "" if evaluator else " (no evaluator: numbers unavailable)"
        yield self._view(cells, notes, row_names, col_names, (96, 96), table, points,
                         f"Computing {total_cells} cells{note}…", session)
        done = 0
        for i, cls_scale in enumerate(rows):
            for j, cfg in enumerate(cols):
                run = plan(replace(base, classifier_scale=cls_scale, cfg_scale=cfg), self.ctx.registry, noise=source)
                started, last = time.perf_counter(), None
                for last in run.steps(should_stop=session.should_stop("compare")):
                    progress((done * len(run.grid) + last.index + 1, total_cells * len(run.grid)),
                             desc=f"cell {done + 1}/{total_cells}")
                if session.stop["compare"] or last is None:
                    yield self._view(cells, notes, row_names, col_names, cell_size or (96, 96), table, points,
                                     f"Stopped after {done} of {total_cells} cells.", session)
                    return
                if done == 0:  # every later cell replays the first cell's x_T and per-step noise
                    source = recorder.replay()
                seconds = time.perf_counter() - started
                x = last.x.clamp(-1, 1)
                samples[(i, j)] = to_uint8(x)
                numbers = evaluate(self.ctx, evaluator, x, label)
                tiled = images.tile(samples[(i, j)], columns=min(per_cell, 4), pad=1)
                scale = max(1, min(128 // tiled.shape[0], 384 // tiled.shape[1]))
                cells[(i, j)] = images.enlarge(tiled, tiled.shape[1] * scale)
                cell_size = cells[(i, j)].shape[:2]
                if numbers["confidence"] is not None:
                    notes[(i, j)] = f"p={numbers['confidence']:.2f} acc={numbers['accuracy']:.2f}"
                table.append([cls_scale, cfg, *(None if numbers[k] is None else round(numbers[k], 3)
                                                for k in ("confidence", "accuracy", "diversity")), round(seconds, 2)])
                points.append({**numbers, "saturated": saturated_fraction(samples[(i, j)]),
                               "classifier scale": cls_scale, "CFG scale": cfg})
                done += 1
                yield self._view(cells, notes, row_names, col_names, cell_size, table, points,
                                 f"Cell {done}/{total_cells} done (classifier {cls_scale:g}, CFG {cfg:g}, "
                                 f"{seconds:.1f} s){note}.", session)
        files = self._write(base, rows, cols, samples, label, cells, notes, row_names, col_names, cell_size, table)
        yield self._view(cells, notes, row_names, col_names, cell_size, table, points,
                         f"Finished {total_cells} cells, same seed {base.seed} and the same noise in each{note}.",
                         session, files)

    def _view(self, cells, notes, rows, cols, cell_size, table, points, status, session, files=None):
        grid = images.labelled_grid(cells, rows, cols, notes, cell_size, "rows: classifier scale", "columns: CFG scale")
        frame = pd.DataFrame(table, columns=COLUMNS)
        bar = progress_bar.bar(len(table), len(rows) * len(cols))
        return (grid, frame, plots.tradeoff_figure(points), status, bar, gr.update() if files is None else files,
                session)

    def _write(self, base, rows, cols, samples, label, cells, notes, row_names, col_names, cell_size, table):
        out = self.ctx.new_run_dir("compare")
        grid = images.labelled_grid(cells, row_names, col_names, notes, cell_size, "rows: classifier scale",
                                    "columns: CFG scale")
        sweep = {"classifier_scales": rows, "cfg_scales": cols, "cells": "row-major, classifier scale x CFG scale"}
        from PIL import Image
        png = save_png(Image.fromarray(grid), out / "comparison.png", base.to_json(), {"sweep": sweep})
        stacked = np.concatenate([samples[(i, j)] for i in range(len(rows)) for j in range(len(cols))])
        npz = save_samples_npz(out / f"comparison_{len(stacked)}x{stacked.shape[1]}x{stacked.shape[2]}x3.npz",
                               stacked, np.full(len(stacked), label))
        csv = out / "comparison.csv"
        pd.DataFrame(table, columns=COLUMNS).to_csv(csv, index=False)
        return [str(png), str(npz), str(csv)]
