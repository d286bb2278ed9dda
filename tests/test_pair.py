"""Two runs side by side (Trajectory explorer): same noise, aligned steps, where they part, stop, messages."""
from __future__ import annotations

import base64
import io
import re
from dataclasses import replace

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from explore.engine import Recipe, plan
from explore.ui.pair import VISIBLE_GREY, Curves, Pair, parting_step, settled_step, shorter_step, walk_together
from explore.ui.session import Session

BASE, CLF = "scenes32_base", "scenes32_classifier"
CELL = Recipe(BASE, class_label=1, sampler="ddim", respacing="5", classifier=CLF, classifier_scale=0.0,
              cfg_scale=0.0, seed=3, batch_size=2)


def session_with(cells: dict[str, Recipe]) -> Session:
    session = Session()
    session.sweep = dict(cells)
    return session


def play(ctx, session, a, b, image=0, progress=None):
    handler = Pair(ctx)
    handler.preview_interval_s = handler.plot_interval_s = 0.0  # every step streams
    gen = handler.play(a, b, image, session, progress=progress) if progress else handler.play(a, b, image, session)
    return list(gen)


def steps_of(recipe: Recipe, registry) -> list:
    return list(plan(recipe, registry).steps())


def test_parting_step_on_closed_form_curves():
    t = VISIBLE_GREY
    assert parting_step([0, 0.5 * t, 2 * t, 3 * t, 3 * t]) == 2  # crosses at 2 and stays above
    assert parting_step([0, 2 * t, 0.5 * t, 2 * t, 2 * t]) == 3  # crosses, falls back, crosses again: the later
    assert parting_step([0, 2 * t, 2 * t, 0.5 * t]) is None  # ends below
    assert parting_step([0.1 * t] * 6) is None and parting_step([]) is None
    assert parting_step([t, t]) is None  # at the threshold is not above it
    assert settled_step([0, 50, 95, 105, 100]) == 2  # within 10% of 100 from step 2 on
    assert settled_step([0, 0, 0]) == 0 and settled_step([]) is None


def test_shorter_run_steps_align_by_fraction():
    assert [shorter_step(i, 6, 6) for i in range(6)] == list(range(6))
    assert [shorter_step(i, 6, 3) for i in range(6)] == [0, 0, 1, 1, 2, 2]  # (i + 1) / 6 ~ (j + 1) / 3
    assert [shorter_step(i, 5, 2) for i in range(5)] == [0, 0, 0, 1, 1]  # 3/5 is nearer 1/2 than 2/2
    for longer, shorter in [(7, 3), (20, 7), (4, 1), (9, 8)]:
        aligned = [shorter_step(i, longer, shorter) for i in range(longer)]
        assert aligned[-1] == shorter - 1 and aligned == sorted(aligned)
        assert all(0 <= b - a <= 1 for a, b in zip(aligned, aligned[1:]))  # the shorter run steps forward by one


def test_identical_cells_never_part(app_context):
    session = session_with({"classifier 0, CFG 0": CELL, "again": CELL})
    outputs = play(app_context, session, "classifier 0, CFG 0", "again")
    frames, status, bar, _ = outputs[-1]
    assert len(outputs) == 1 + 5  # the intro, then every step
    assert "identical at every step" in status and 'aria-valuenow="5"' in bar
    views = [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
             for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', frames)]
    assert len(views) == 6 and views[0].shape == (32, 32, 3)
    assert not views[2].any() and not views[5].any()  # |A - B| is black everywhere
    curves = Curves(5)
    runs = [plan(replace(CELL, batch_size=1), app_context.registry).steps() for _ in range(2)]
    for a, b in walk_together(runs, [5, 5], lambda: False):
        curves.add(a, a, b)
    assert curves.x == [0.0] * 5 and curves.x0 == [0.0] * 5 and curves.parting is None


def test_classifier_scale_cells_share_noise_and_part(app_context):
    guided = replace(CELL, classifier_scale=10.0, respacing="6")
    plain = replace(CELL, respacing="6")
    session = session_with({"classifier 0, CFG 0": plain, "classifier 10, CFG 0": guided})
    handler = Pair(app_context)
    a, b = handler.recipes(session, "classifier 0, CFG 0", "classifier 10, CFG 0", 1)
    assert a.seed == b.seed == 4 and a.batch_size == 1  # image 1 of each cell: seed + 1, alone
    first_a, first_b = (steps_of(r, app_context.registry) for r in (a, b))
    # image 1 of the cell's batch is the same image alone
    batch = steps_of(plain, app_context.registry)
    assert torch.allclose(batch[-1].x[1:2], first_a[-1].x, atol=1e-5)

    runs = [plan(r, app_context.registry).steps() for r in (a, b)]
    pairs = list(walk_together(runs, [6, 6], lambda: False))
    assert len(pairs) == 6
    assert torch.equal(pairs[0][0].x, first_a[0].x) and torch.equal(pairs[0][1].x, first_b[0].x)
    assert torch.equal(pairs[-1][1].x, first_b[-1].x)

    outputs = play(app_context, session, "classifier 0, CFG 0", "classifier 10, CFG 0", image=1)
    status = outputs[-1][1]
    assert "classifier_scale 0 (A) vs 10 (B)" in status and "same start noise" in status
    assert "part visibly at step" in status and "guidance changes the image" in status, status


def test_different_step_counts_align_by_fraction(app_context):
    short, long = replace(CELL, respacing="3"), replace(CELL, respacing="6", classifier_scale=3.0)
    runs = [plan(r, app_context.registry).steps() for r in (short, long)]
    pairs = list(walk_together(runs, [3, 6], lambda: False))
    assert [(a.index, b.index) for a, b in pairs] == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    session = session_with({"steps 3": short, "steps 6": long})
    outputs = play(app_context, session, "steps 3", "steps 6")
    status = outputs[-1][1]
    assert "A has 3 steps and B 6" in status and "same fraction" in status
    assert "Finished 6 steps" in status


def test_stop_ends_within_a_step(app_context):
    session = session_with({"a": replace(CELL, respacing="20"), "b": replace(CELL, respacing="20",
                                                                             classifier_scale=3.0)})
    calls = []

    def progress(value, **_):
        calls.append(value[0])
        if value[0] == 2:
            Pair(app_context).stop(session)

    outputs = play(app_context, session, "a", "b", progress=progress)
    assert calls == [1, 2]
    assert "Stopped at step 2/20" in outputs[-1][1]
    assert len(outputs) == 1 + 2 + 1
    # a new play clears the flag
    assert "Finished 20 steps" in play(app_context, session, "a", "b")[-1][1]


def test_without_a_comparison_the_section_explains(app_context):
    handler = Pair(app_context)
    a, b, note = handler.cells(Session())
    assert a["choices"] == [] and "Guidance comparison" in note
    with pytest.raises(gr.Error, match="Guidance comparison"):
        next(handler.play("classifier 0, CFG 0", "classifier 3, CFG 0", 0, Session()))
    session = session_with({"x": CELL, "y": CELL, "z": CELL})
    a, b, _ = handler.cells(session)
    assert (a["value"], b["value"]) == ("x", "z")
    for args, text in [(("moon", "x", 0), "Run A"), (("x", ["z"], 0), "Run B"), (("x", "z", 2), "Image"),
                       (("x", "z", 0.5), "Image"), (("x", "z", "1"), "Image")]:
        with pytest.raises(gr.Error, match=text):
            next(handler.play(*args, session))
