"""The app's handlers without a server: streaming cadence, stopping inside the loop, results, analysis."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from explore.engine import Recipe, run
from explore.outputs import load_samples_npz, read_png_recipe, to_uint8
from explore.ui import metrics
from explore.ui.compare import Comparison, parse_scales
from explore.ui.context import AppContext
from explore.ui.form import Form
from explore.ui.sampling import Sampler, validate_respacing
from explore.ui.session import Session
from explore.ui.trajectory import Trajectory, load_file, load_latest, show_step
from explore.ui.upsample_lab import NATIVE, NULL_CLASS, SUGGEST, WHOLE, Lab

BASE, CLF, EVAL, UP = "scenes32_base", "scenes32_classifier", "scenes32_evaluator", "scenes128_upsampler"


def sample(ctx, session, respacing="10", every=3, batch=1, class_choice="forest", classifier=CLF,
           classifier_scale=0.0, cfg=1.0, sampler="ddim", progress=None):
    args = [BASE, class_choice, sampler, respacing, False, classifier, classifier_scale, cfg, "standard", 0.0, 0.0,
            5, batch, every]
    handler = Sampler(ctx)
    handler.min_preview_interval_s = handler.progress_interval_s = 0.0  # the stand-in model is fast
    run = Form(ctx).handler(handler.run, Sampler.INPUTS, precision=ctx.precision)  # as the app wires it
    gen = run(*args, session=session, progress=progress) if progress else run(*args, session=session)
    return handler, gen


def compare(ctx, *args):
    return Form(ctx).handler(Comparison(ctx).run, Comparison.INPUTS, allow_random=False, precision=ctx.precision)(*args)


def inline_image(html: str) -> np.ndarray:
    """The image of a streamed preview: an <img> carrying its PNG in a data: URL."""
    match = re.fullmatch(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="[^"]*" width="\d+" height="\d+">',
                         html)
    assert match, html[:120]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(match.group(1)))).convert("RGB"))


def test_respacing_validation_reports_count_or_problem(app_context):
    message, figure = validate_respacing(app_context, BASE, "ddim25", "ddim", False)
    assert message.startswith("Valid: 25 steps") and figure is not None
    message, _ = validate_respacing(app_context, BASE, "10,x", "ddim", False)
    assert message.startswith("**Not valid:**") and "'x'" in message
    message, _ = validate_respacing(app_context, BASE, "12", "euler", True)
    assert "12 steps (Karras noise levels" in message


def test_sampling_streams_previews_every_n_steps_then_results(app_context):
    session = Session()
    _, gen = sample(app_context, session, respacing="10", every=3, batch=2)
    outputs = list(gen)
    # one "starting" update, previews after steps 3, 6, 9 and 10, then the results
    previews = [o for o in outputs[1:-1]]
    assert [o[2].split(" ")[1] for o in previews] == ["3/10", "6/10", "9/10", "10/10"]
    frames = [inline_image(o[0]) for o in previews]
    # 2 images of the stand-in model side by side at their own size, a white pixel between them
    size = app_context.info(BASE).image_size
    assert all(f.shape == (size, 2 * size + 1, 3) and f.dtype == np.uint8 for f in frames)
    assert all(inline_image(o[1]).shape == frames[0].shape for o in previews)  # predicted x0 alike
    assert all(o[8] is None and o[9] is None and o[10] is None for o in previews)  # results come at the end
    assert len({f.tobytes() for f in frames}) == len(frames)  # distinct frames
    assert 'aria-valuenow="10"' in outputs[-1][3]  # the progress bar is full
    noise, rms, p_class, guidance = outputs[-1][4:8]
    assert len(noise) == 10 and len(rms) == 20 and len(p_class) == 20  # classifier present at scale 0
    assert ((p_class["value"] >= 0) & (p_class["value"] <= 1)).all() and guidance.empty
    status, gallery, files, command = outputs[-1][2], outputs[-1][8], outputs[-1][9], outputs[-1][10]
    assert status.startswith("Finished step 10/10") and len(gallery) == 2 and len(files) == 8
    assert command.startswith("python -m explore sample") and "--timestep_respacing 10" in command
    assert session.trajectory is not None and len(session.trajectory.steps) == 10


def test_previews_are_rate_limited_but_the_last_step_always_streams(app_context):
    handler, gen = sample(app_context, Session(), respacing="10", every=1)
    handler.min_preview_interval_s = 3600.0
    outputs = list(gen)
    previews = outputs[1:-1]
    assert [o[2].split(" ")[1] for o in previews] == ["1/10", "10/10"]
    assert outputs[-1][2].endswith("2 previews).")
    assert handler.ctx is app_context and len(outputs[-1][4]) == 10  # telemetry still has every step


def test_the_servers_precision_is_used_and_recorded(app_context):
    from dataclasses import replace
    bf16 = replace(app_context, precision="bf16")
    out = list(sample(bf16, Session(), respacing="3", every=3, cfg=2.0)[1])[-1]
    assert "--precision bf16" in out[10]
    png = [f for f in out[9] if f.endswith(".png") and "sample_00_" in f][0]
    assert Recipe.from_json(read_png_recipe(png)).precision == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        type(app_context).create(app_context.registry.root, app_context.out_root, "cpu", precision="fp8")


def test_results_reproduce_from_the_png_recipe(app_context):
    session = Session()
    _, gen = sample(app_context, session, respacing="8", every=8, batch=2, cfg=2.0)
    files = list(gen)[-1][9]
    by_suffix = {}
    for f in files:
        by_suffix.setdefault(f.rsplit(".", 1)[-1], []).append(f)
    images, labels = load_samples_npz(by_suffix["npz"][0] if "samples" in by_suffix["npz"][0] else by_suffix["npz"][1])
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [4, 4]
    single = [f for f in by_suffix["png"] if "sample_01_" in f][0]
    recipe = Recipe.from_json(read_png_recipe(single))
    assert recipe.cfg_scale == 2.0 and recipe.batch_size == 2 and recipe.respacing == "8"
    assert np.array_equal(np.asarray(Image.open(single)), images[1])
    again = to_uint8(run(recipe, app_context.registry).x)
    assert np.array_equal(again, images)  # the recipe alone reproduces the run
    for animation in by_suffix["gif"] + by_suffix["webp"]:
        with Image.open(animation) as frames:
            assert frames.n_frames == 8
    traj = Trajectory.load([f for f in by_suffix["npz"] if "trajectory" in f][0])
    assert traj.x.shape == (8, 2, 3, 32, 32) and traj.total == 8


def test_reproduce_box_runs_the_same_samples_from_the_cli(app_context, tmp_path):
    import shlex

    from explore.__main__ import main
    session = Session()
    _, gen = sample(app_context, session, respacing="6", every=6, batch=2, class_choice="random (per image)",
                    classifier_scale=1.0, cfg=1.5)
    outputs = list(gen)
    app_npz = next(f for f in outputs[-1][9] if "samples_2x32" in f and f.endswith(".npz"))
    argv = shlex.split(outputs[-1][10])
    assert argv[:4] == ["python", "-m", "explore", "sample"]
    argv[argv.index("--out_dir") + 1] = str(tmp_path)
    assert main(argv[3:]) == 0
    cli_images, cli_labels = load_samples_npz(next(tmp_path.glob("samples_2x32x32x3.npz")))
    app_images, app_labels = load_samples_npz(app_npz)
    assert np.array_equal(cli_images, app_images) and np.array_equal(cli_labels, app_labels)


def test_gpu_decorator_uses_spaces_only_when_present(monkeypatch):
    from explore.ui import gpu as gpu_module

    def handler():
        return "ran"
    monkeypatch.setattr(gpu_module, "spaces", None)
    assert gpu_module.gpu(30)(handler) is handler
    requested = []

    class FakeSpaces:
        @staticmethod
        def GPU(duration):
            requested.append(duration)
            return lambda fn: fn
    monkeypatch.setattr(gpu_module, "spaces", FakeSpaces)
    assert gpu_module.gpu(30)(handler)() == "ran" and requested == [30]


def test_stop_halts_the_computation_within_a_step(app_context):
    """The flag is raised while step 3 runs (from 'another thread'); no preview is due, yet no step 4 runs."""
    session = Session()
    calls = []

    def progress(value, **_):
        calls.append(value[0])
        if value[0] == 3:
            Sampler(app_context).stop(session)

    _, gen = sample(app_context, session, respacing="40", every=1000, progress=progress)
    outputs = list(gen)
    assert calls == [1, 2, 3]
    assert outputs[-1][2].startswith("Stopped at step 3/40")
    assert session.trajectory.stopped and list(session.trajectory.steps) == [0, 1, 2]
    # a new run clears the flag
    _, gen = sample(app_context, session, respacing="4", every=4)
    assert list(gen)[-1][2].startswith("Finished step 4/4")


def test_bad_form_values_become_readable_errors(app_context):
    import gradio as gr
    for kwargs, text in [({"respacing": "ddim999"}, "respacing"), ({"class_choice": "moon"}, "Unknown class"),
                         ({"cfg": 200.0}, "cfg_scale"), ({"classifier": "scenes32_evaluator"}, "not a noisy")]:
        _, gen = sample(app_context, Session(), **kwargs)
        with pytest.raises(gr.Error, match=text):
            next(gen)


def test_comparison_uses_one_noise_and_scores_each_cell(app_context):
    session = Session()
    outputs = list(compare(app_context, BASE, "desert", "ddim", "5", CLF, "0, 3", "1, 2", "standard", 7, 2, EVAL,
                           session))
    grid, table, _, status, bar, files, _ = outputs[-1]
    assert 'aria-valuenow="4"' in bar
    assert status.startswith("Finished 4 cells") and len(files) == 3
    assert len(outputs) == 1 + 4 + 1  # empty grid, one update per cell, final
    assert table[["classifier scale", "CFG scale"]].values.tolist() == [[0, 1], [0, 2], [3, 1], [3, 2]]
    for column in ("confidence", "accuracy"):
        assert table[column].between(0, 1).all()
    assert (table["diversity"] >= 0).all()
    images, labels = load_samples_npz([f for f in files if f.endswith(".npz")][0])
    plain = to_uint8(run(Recipe(BASE, class_label=1, sampler="ddim", respacing="5", seed=7, batch_size=2),
                         app_context.registry).x)
    assert np.array_equal(images[:2], plain) and labels.tolist() == [1] * 8  # cell (0, 0) is the plain run
    assert grid.shape[0] > 100 and grid.shape[1] > 200


def test_comparison_stops_between_cells(app_context):
    session = Session()
    gen = compare(app_context, BASE, "lake", "ddim", "5", CLF, "0", "1, 2, 3", "standard", 0, 1, EVAL, session)
    next(gen), next(gen)  # the empty grid, then the first cell
    session.request_stop("compare")
    rest = list(gen)
    assert rest[-1][3].startswith("Stopped after 1 of 3 cells")


def test_tradeoff_plot_draws_one_labelled_line_per_value_of_the_shorter_axis():
    from explore.ui.plots import tradeoff_figure

    def cell(clf, cfg):
        return {"classifier scale": clf, "CFG scale": cfg, "accuracy": 0.5, "diversity": 3.0, "saturated": 0.1}
    fig = tradeoff_figure([cell(clf, cfg) for clf in (0, 2) for cfg in (1, 2, 4)])
    assert [ax.get_xlabel() for ax in fig.axes] == ["CFG scale"] * 3
    assert [ax.get_ylabel() for ax in fig.axes] == ["class accuracy", "diversity (feature distance)",
                                                     "saturated pixels (fraction)"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["classifier scale 0", "classifier scale 2"]
    assert all(len(ax.lines) == 2 and len(ax.lines[0].get_xdata()) == 3 for ax in fig.axes)
    tall = tradeoff_figure([cell(clf, 1.0) for clf in (0, 1, 3, 10)])  # one CFG scale: classifier scale on x
    assert tall.axes[0].get_xlabel() == "classifier scale" and len(tall.axes[0].lines) == 1
    no_evaluator = tradeoff_figure([{**cell(0, 1), "accuracy": None, "diversity": None}])
    assert [ax.get_ylabel() for ax in no_evaluator.axes] == ["saturated pixels (fraction)"]


def test_parse_scales():
    assert parse_scales("0, 1.5;3 3", "x", 0, 10) == [0.0, 1.5, 3.0]
    import gradio as gr
    for bad in ("", "a", "11", "1,2,3,4,5,6,7"):
        with pytest.raises(gr.Error):
            parse_scales(bad, "x", 0, 10)


def test_trajectory_explorer_views_and_file_round_trip(app_context, tmp_path):
    session = Session()
    _, gen = sample(app_context, session, respacing="6", every=6, batch=2, classifier_scale=1.0)
    list(gen)
    slider, choice, summary, settle = load_latest(session)
    assert slider["maximum"] == 5 and choice["choices"][1] == "image 1: forest" and "6 recorded steps" in summary
    x_t, x0, eps, guide, caption, spectrum = show_step(session, 2, "image 1: forest")
    assert x_t.shape == x0.shape == eps.shape == guide.shape == (256, 256, 3)
    assert caption.startswith("Step 3 of 6") and spectrum is not None
    assert session.trajectory.guidance is not None and np.abs(session.trajectory.guidance).max() > 0
    bands = session.trajectory.analysis(1)["bands"]
    assert all(abs(v[-1] - 1) < 1e-6 for v in bands.values())  # the final prediction matches itself
    path = session.trajectory.save(tmp_path / "t.npz")
    fresh = Session()
    slider, *_, stored = load_file(fresh, str(path))
    assert stored is fresh and np.array_equal(fresh.trajectory.pred_x0, session.trajectory.pred_x0)


def test_metrics_behave_on_known_images():
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 128, np.uint8)
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    assert metrics.high_frequency_fraction(flat) == 0.0 and metrics.high_frequency_fraction(checker) > 0.99
    assert metrics.laplacian_sharpness(checker) > 1.0 > 1e-6 > metrics.laplacian_sharpness(flat)
    freqs, power = metrics.radial_power_spectrum(rng.standard_normal((4, 64, 64)))
    assert freqs[0] > 0 and freqs[-1] <= 0.5 and power.shape == (4, len(freqs))
    assert 0.7 < power.mean(0)[-5:].mean() / power.mean(0)[:5].mean() < 1.4  # white noise is flat
    # a region that stops changing at frame 2 settles there; one that changes until the end settles last
    series = np.zeros((5, 3, 2, 2), np.float32)
    series[:2, :, 0, 0] = 1.0
    series[:4, :, 1, 1] = 1.0
    settle = metrics.settle_steps(series, np.arange(5), tol=0.1)
    assert settle.tolist() == [[2, 0], [0, 4]]
    assert metrics.psnr_ssim(flat, flat + 1) == pytest.approx((10 * np.log10(255 ** 2), 1.0), abs=0.01)


def test_upsampling_lab_wild_photo_and_classes(app_context):
    lab, session = Lab(app_context), Session()
    top, update, low_view, message = lab.suggest("chelsea", None, UP, WHOLE)
    assert len(top) == 8 and update["value"] in top and low_view.shape[0] >= 256 and "Top class" in message
    outputs = list(lab.wild("coffee", None, UP, NATIVE, SUGGEST, "3", 0, session))
    original, low, cubic, up, table, status, sharp, _ = outputs[-1]
    assert original.shape == cubic.shape == up.shape == (128, 128, 3)
    assert status.startswith("Upsampled as")
    numbers = table.set_index("image")
    assert np.isfinite(numbers.loc[["bicubic", "upsampled"], ["PSNR (dB)", "SSIM"]].to_numpy(float)).all()
    assert set(session.lab["wild"]) == {"original", "bicubic", "upsampled"}
    gallery, status, _ = list(lab.wild_classes("rocket", None, UP, WHOLE, "2", 0, 2, session))[-1]
    assert len(gallery) == 2 and "PSNR" in gallery[0][1] and status.startswith("2 classes")


def test_upsampling_lab_generated_panel(app_context, tmp_path):
    lab, session = Lab(app_context), Session()
    outputs = list(lab.generated(BASE, "alpine", 0, 1, "4", UP, "3", None, 2, session))
    low, high, status, bar, sharp, files, _ = outputs[-1]
    assert "Upsampled 1 samples" in status and "alpine" in status and high.shape[0] >= 128
    images, labels = load_samples_npz([f for f in files if "samples_1x128" in f][0])
    assert images.shape == (1, 128, 128, 3) and labels.tolist() == [0]
    # an uploaded .npz without labels: the null class is used when asked for
    from explore.outputs import save_samples_npz
    upload = save_samples_npz(tmp_path / "low.npz", np.zeros((2, 32, 32, 3), np.uint8))
    outputs = list(lab.generated(BASE, NULL_CLASS, 0, 1, "4", UP, "2", str(upload), 2, session))
    assert "2 images from the uploaded file" in outputs[-1][2] and "null" in outputs[-1][2]


def test_missing_model_kinds_are_explained(tmp_path):
    from conftest import populate
    folder = populate(tmp_path / "only_base", names=("scenes32_base",))
    ctx = AppContext.create(folder, tmp_path / "out", device="cpu")
    assert ctx.missing("diffusion", "x", "y") is None
    message = ctx.missing("superres", "upsampler", "scenes128_upsampler.safetensors")
    assert "No upsampler found" in message and str(folder) in message
    import app
    demo = app.build(ctx)  # builds without an upsampler, classifier or evaluator
    texts = [getattr(block, "value", "") or "" for block in demo.blocks.values()]
    assert any("No upsampler found" in str(t) for t in texts)
    assert any("No evaluation classifier found" in str(t) for t in texts)


def test_comparison_sweeps_any_two_options_on_the_same_noise(app_context):
    session = Session()
    outputs = list(compare(app_context, BASE, "alpine", "ddim", "4", CLF, "ddim, euler", "2 0", "standard", 5, 1, EVAL,
                           session, "sampler", "seed", 2.0, 1.0, 0.0, ""))
    grid, table, _, status, _, files, _ = outputs[-1]
    assert status.startswith("Finished 4 cells, same seed")
    assert list(table.columns) == ["sampler", "seed", "confidence", "accuracy", "diversity", "saturated", "seconds"]
    assert table[["sampler", "seed"]].values.tolist() == [["ddim", 2], ["ddim", 0], ["euler", 2], ["euler", 0]]
    assert table["saturated"].between(0, 1).all()
    images, labels = load_samples_npz([f for f in files if f.endswith(".npz")][0])
    for index, (sampler, seed) in enumerate([("ddim", 2), ("ddim", 0), ("euler", 2), ("euler", 0)]):
        plain = run(Recipe(BASE, class_label=0, sampler=sampler, respacing="4", seed=seed, batch_size=1,
                           classifier=CLF, classifier_scale=2.0), app_context.registry)
        assert np.array_equal(images[index:index + 1], to_uint8(plain.x)), (sampler, seed)
    # DDIM with eta 0 and Euler walk the same grid with the same update: the same images within float rounding
    assert np.abs(images[0].astype(int) - images[2].astype(int)).max() <= 2


def test_comparison_sweeps_classes_intervals_and_steps(app_context):
    outputs = list(compare(app_context, BASE, "alpine", "ddim", "4", CLF, "desert lake", "all; 0,500", "standard", 0, 1,
                           EVAL, Session(), "class", "guidance interval", 5.0, 1.0, 0.0, ""))
    table = outputs[-1][1]
    assert table[["class", "guidance interval"]].values.tolist() == [
        ["desert", "all"], ["desert", "0,500"], ["lake", "all"], ["lake", "0,500"]]
    images, labels = load_samples_npz([f for f in outputs[-1][5] if f.endswith(".npz")][0])
    assert labels.tolist() == [1, 1, 7, 7]
    table = list(compare(app_context, BASE, "alpine", "ddim", "4", CLF, "3; 2,3", "0 1", "standard", 0, 1, None,
                         Session(), "respacing", "CFG scale"))[-1][1]
    assert table["respacing"].tolist() == ["3", "3", "2,3", "2,3"] and table["confidence"].isna().all()


@pytest.mark.parametrize("axes,values,message", [
    (("seed", "seed"), ("1", "2"), "both sweep seed"),
    (("sampler", "CFG scale"), ("ddim, plms", "1"), "plms"),
    (("respacing", "CFG scale"), ("abc", "1"), "respacing"),
    (("class", "CFG scale"), ("moon", "1"), "Unknown class"),
    (("guidance interval", "CFG scale"), ("9,1", "1"), "guidance interval"),
    (("tilt", "CFG scale"), ("1", "1"), "not one of"),
    (("CFG scale", "seed"), ("1 2 3 4 5 6 7", "1"), "at most 6"),
])
def test_comparison_refuses_bad_axes_before_sampling(app_context, axes, values, message):
    import gradio as gr
    gen = compare(app_context, BASE, "alpine", "ddim", "4", CLF, *values, "standard", 0, 1, EVAL, Session(), *axes)
    with pytest.raises(gr.Error, match=message):
        next(gen)
