"""Guided Diffusion Explorer: `python app.py` (layout and event wiring only; handlers live in explore/ui)."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from explore.data.wild import WILD_PHOTO_NAMES  # noqa: E402
from explore.recipe import sampler_option_names  # noqa: E402
from explore.ui import memory, plots, progress, trajectory  # noqa: E402
from explore.ui.compare import AXES, DEFAULT_AXES, NUMBERS as CELL_NUMBERS, Comparison  # noqa: E402
from explore.ui.context import AppContext, class_choices  # noqa: E402
from explore.ui.cancel import stoppable  # noqa: E402
from explore.ui.compute import on_compute_thread  # noqa: E402
from explore.ui.gpu import gpu  # noqa: E402
from explore.ui.inputs import Dropdown, Image, Number, Radio, Slider  # noqa: E402  (field-named input checks)
from explore.ui.form import Form, page_errors  # noqa: E402
from explore.ui.sampling import Sampler  # noqa: E402
from explore.ui.session import new_session  # noqa: E402
from explore.ui.upsample_lab import METRIC_COLUMNS, NATIVE, WHOLE, Lab, lab_class_choices  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CSS_PATH = os.path.join(HERE, "assets", "style.css")
HEAVY = {"concurrency_id": "model", "concurrency_limit": 1}  # one model computation at a time (one GPU)
LIGHT = {"concurrency_limit": 4}


def streaming(trigger, task: str, handler, inputs, outputs, **kwargs):
    """A generator handler run on the compute thread that stops within a step when its request is cancelled or its
    tab closed (cancel.py)."""
    if os.environ.get("EXPLORE_STREAMING") == "plain":  # set only by python -m explore.bench, to compare with
        return trigger(handler, inputs, outputs, **kwargs)  # the handler as Gradio streams any generator
    return trigger(stoppable(task, handler), inputs, outputs, **kwargs)


def _prefer(names: list[str], wanted: str) -> str | None:
    return wanted if wanted in names else (names[0] if names else None)


def sampling_tab(ctx: AppContext, session: gr.State):
    models = ctx.names("diffusion")
    if not models:
        gr.Markdown(ctx.missing("diffusion", "diffusion model", "scenes32_base.safetensors"))
        return None
    model0 = _prefer(models, "scenes32_base")
    info0 = ctx.info(model0)
    classifiers = [n for n in ctx.names("classifier") if ctx.info(n).image_size == info0.image_size]
    form = Form(ctx)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            model = form.widget("model", choices=models, value=model0)
            class_choice = form.widget("class_label", choices=class_choices(info0), value=class_choices(info0)[0])
            with gr.Row():
                sampler = form.widget("sampler", value="ddim", min_width=120)
                respacing = form.widget("respacing", value="50", min_width=140, elem_id="sample-respacing")
            respacing_msg = gr.Markdown(elem_id="respacing-msg")
            karras = form.widget("karras")
            with gr.Row():
                for name in sampler_option_names():
                    form.widget(name, min_width=120)
            with gr.Group():
                classifier = form.widget("classifier", choices=["none", *classifiers],
                                         value=classifiers[0] if classifiers else "none")
                form.widget("classifier_scale")
                cfg_scale = form.widget("cfg_scale", interactive=info0.null_class is not None)
                form.widget("cfg_rescale")
                form.widget("dynamic_threshold", elem_id="sample-dynamic-threshold")
                form.widget("guidance_interval", elem_id="sample-guidance-interval")
                form.widget("guidance_method")
            with gr.Row():
                form.widget("seed", min_width=100)
                form.widget("batch_size", value=2, min_width=120, elem_id="sample-batch")
            preview_every = Slider(1, 50, 5, step=1, label="Preview every N steps", elem_id="sample-every",
                                   info=f"at most {1 / Sampler.min_preview_interval_s:.0f} previews a second; "
                                   "every step is kept for the trajectory")
            with gr.Row():
                run = gr.Button("Run", variant="primary", elem_id="sample-run")
                stop = gr.Button("Stop", variant="stop", elem_id="sample-stop")
            respacing_plot = gr.Plot(label="Kept timesteps on the noise-level curve", format="png",
                                     elem_id="respacing-plot", show_label=False)
        with gr.Column(scale=2, min_width=320):
            status = gr.Markdown("Press **Run** to sample.", elem_id="sample-status")
            bar = gr.HTML(progress.bar(0, 1), elem_id="sample-progress", padding=False)
            with gr.Row():
                x_t = gr.HTML(label="x_t", show_label=True, container=True, elem_id="preview-xt",
                              elem_classes=["pixelated"], min_width=160, js_on_load=None)
                x0 = gr.HTML(label="predicted x0", show_label=True, container=True, elem_id="preview-x0",
                             elem_classes=["pixelated"], min_width=160, js_on_load=None)
            with gr.Row():
                tele = [gr.LinePlot(None, x="step", y="value", color="series", title=title, height=170,
                                    min_width=200, show_label=False)
                        for title in ("noise level sqrt(1 - ᾱ)", "RMS of x_t",
                                                                    "classifier p(class | x_t)",
                                                                    "guidance / denoising change of x")]
            gallery = gr.Gallery(label="Samples", columns=6, fit_columns=False, elem_id="sample-gallery",
                                 elem_classes=["pixelated"],
                                 format="png", object_fit="contain")
            files = gr.File(label="Downloads: PNGs with the recipe, .npz, trajectory animation and arrays",
                            file_count="multiple", elem_id="sample-files", height=160)
            command = gr.Code(label="Reproduce on the command line", language="shell", elem_id="reproduce",
                              interactive=False, lines=2, max_lines=6, wrap_lines=True)
    gr.Examples(_sampling_examples(ctx, model0, classifiers),
                inputs=[form.components[name] for name in ("model", "class_label", "sampler", "respacing",
                                                           "classifier", "classifier_scale", "cfg_scale",
                                                           "guidance_method")],
                label="Examples", cache_examples=False)

    sampler_h = Sampler(ctx)
    run_fn, inputs = form.event(sampler_h.run, Sampler.INPUTS, {"preview_every": preview_every, "session": session},
                                precision=ctx.precision)
    outputs = [x_t, x0, status, bar, *tele, gallery, files, command, session]
    event = streaming(run.click, "sample", gpu(300)(run_fn), inputs, outputs, api_name="sample",
                      show_progress="hidden", **HEAVY)
    stop.click(sampler_h.stop, [session], None, api_name="stop_sample", queue=False)
    check = [model, respacing, sampler, karras]
    respacing.change(sampler_h.check_respacing, check, [respacing_msg, respacing_plot],
                     api_name="validate_respacing", show_progress="hidden", trigger_mode="always_last", **LIGHT)
    sampler.change(form.sampler_changed, [sampler], form.sampler_outputs(), api_name="sampler_options",
                   show_progress="hidden", **LIGHT) \
        .then(sampler_h.check_respacing, check, [respacing_msg, respacing_plot],
              api_name="validate_respacing_sampler", show_progress="hidden", **LIGHT)
    karras.input(sampler_h.check_respacing, check, [respacing_msg, respacing_plot],
                 api_name="validate_respacing_karras", show_progress="hidden", **LIGHT)
    model.change(sampler_h.model_options, [model], [class_choice, cfg_scale, classifier],
                 api_name="model_options", show_progress="hidden", **LIGHT) \
        .then(sampler_h.check_respacing, check, [respacing_msg, respacing_plot],
              api_name="validate_respacing_model", show_progress="hidden", **LIGHT)
    return event, sampler_h, check, (respacing_msg, respacing_plot)


def _sampling_examples(ctx: AppContext, model: str, classifiers: list[str]) -> list[list]:
    info = ctx.info(model)
    names = class_choices(info)
    pick = (lambda i: names[min(i, len(names) - 1)])
    clf = classifiers[0] if classifiers else "none"
    return [
        [model, pick(3), "ddim", "50", "none", 0.0, 1.0, "standard"],
        [model, pick(4), "ddim", "ddim25", "none", 0.0, 3.0, "standard"],
        [model, pick(7), "euler_a", "30", clf, 2.0 if classifiers else 0.0, 1.0, "conflict"],
        [model, pick(1), "dpmpp_2m", "20", clf, 0.0, 2.0, "standard"],
    ]


def compare_tab(ctx: AppContext, session: gr.State):
    models = [n for n in ctx.names("diffusion") if ctx.info(n).num_labels is not None]
    if not models:
        gr.Markdown(ctx.missing("diffusion", "class-conditional diffusion model", "scenes32_base.safetensors"))
        return
    model0 = _prefer(models, "scenes32_base")
    info0 = ctx.info(model0)
    classifiers = [n for n in ctx.names("classifier") if ctx.info(n).image_size == info0.image_size]
    evaluators = ctx.names("evaluator")
    if not evaluators:
        gr.Markdown(ctx.missing("evaluator", "evaluation classifier", "scenes32_evaluator.safetensors")
                    + " The grid still fills, without per-cell numbers.")
    form = Form(ctx)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            model = form.widget("model", choices=models, value=model0)
            names = class_choices(info0)[1:]
            class_choice = form.widget("class_label", choices=names, value=names[0], label="Requested class")
            form.widget("classifier", choices=["none", *classifiers], value=classifiers[0] if classifiers else "none")
            with gr.Row():
                row_axis = Dropdown(list(AXES), value=DEFAULT_AXES[0], label="Rows sweep", min_width=120,
                                    elem_id="compare-row-axis")
                row_values = gr.Textbox("0, 1, 3, 10", label="Row values", min_width=120, elem_id="compare-clf-scales",
                                        info="commas or spaces between values; ';' for steps and intervals")
            with gr.Row():
                column_axis = Dropdown(list(AXES), value=DEFAULT_AXES[1], label="Columns sweep", min_width=120,
                                       elem_id="compare-column-axis")
                column_values = gr.Textbox("0, 1, 3", label="Column values", min_width=120,
                                           elem_id="compare-cfg-scales", info="CFG 0 is the unconditional model")
            with gr.Row():
                run = gr.Button("Run sweep", variant="primary", elem_id="compare-run")
                stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
            gr.Markdown("Every other option is the same in each cell:", elem_classes=["compare-note"])
            with gr.Row():
                form.widget("sampler", value="ddim", min_width=120)
                form.widget("respacing", value="15", min_width=120, elem_id="compare-respacing", info=None)
            with gr.Row():
                form.widget("batch_size", maximum=8, value=4, label="Images per cell", min_width=120,
                            elem_id="compare-per-cell")
                form.widget("seed", min_width=100)
            with gr.Accordion("Guidance where not swept", open=False):
                form.widget("classifier_scale", value=3.0)
                form.widget("cfg_scale", value=0.0)
                form.widget("guidance_method")
                form.widget("cfg_rescale")
                form.widget("dynamic_threshold")
                form.widget("guidance_interval")
            evaluator = Dropdown(["none", *evaluators], value=evaluators[0] if evaluators else "none",
                                 label="Evaluation classifier (never used for guidance)")
        with gr.Column(scale=2, min_width=320):
            status = gr.Markdown("Same seed, same start noise and per-step noise in every cell; rows and columns "
                                 "sweep two options. From the unconditional model (CFG 0) classifier guidance has "
                                 "something to show: accuracy rises with its scale.", elem_id="compare-status")
            bar = gr.HTML(progress.bar(0, 1), elem_id="compare-progress", padding=False)
            grid = gr.Image(label="Sweep", format="png", interactive=False, elem_id="compare-grid",
                            show_label=False, elem_classes=["pixelated", "one-to-one"])
            table = gr.Dataframe(headers=[*DEFAULT_AXES, *CELL_NUMBERS],
                                 label="Per cell: evaluation classifier's confidence and accuracy for the requested "
                                       "class, diversity (mean feature distance), saturated pixels, seconds",
                                 elem_id="compare-table", interactive=False)
            tradeoff = gr.Plot(label="Trade-off", format="png", elem_id="compare-tradeoff", show_label=False)
            files = gr.File(label="Downloads", file_count="multiple")
    handler = Comparison(ctx)
    run_fn, inputs = form.event(handler.run, Comparison.INPUTS,
                                {"row_values": row_values, "column_values": column_values, "evaluator": evaluator,
                                 "row_axis": row_axis, "column_axis": column_axis, "session": session},
                                allow_random=False, precision=ctx.precision)
    streaming(run.click, "compare", gpu(600)(run_fn), inputs, [grid, table, tradeoff, status, bar, files, session],
              api_name="compare", show_progress="hidden", **HEAVY)
    stop.click(handler.stop, [session], None, api_name="stop_compare", queue=False)
    model.change(handler.model_options, [model], [class_choice], api_name="compare_model_options",
                 show_progress="hidden",
                 **LIGHT)
    row_axis.change(handler.axis_changed, [row_axis], [row_values], show_progress="hidden", queue=False)
    column_axis.change(handler.axis_changed, [column_axis], [column_values], show_progress="hidden", queue=False)


def trajectory_tab(ctx: AppContext, session: gr.State):
    from explore.ui import pair  # here, not at the top: the other tabs' imports are edited elsewhere
    info = gr.Markdown("No run yet: sample one on the **Live sampling** tab (or load a trajectory file).",
                       elem_id="trajectory-info")
    with gr.Row():
        load = gr.Button("Show the latest run", elem_id="trajectory-load", scale=1)
        upload = gr.File(label="…or load a trajectory .npz", file_types=[".npz"], scale=2, height=90)
    with gr.Row():
        step = Slider(0, 1, 0, step=1, label="Recorded step", elem_id="trajectory-step", scale=3)
        image_choice = Dropdown([], label="Image", scale=1, min_width=140)
    with gr.Row():
        views = [gr.Image(label=label, format="png", interactive=False, elem_classes=["pixelated"], min_width=140)
                 for label in ("x_t (after this step)", "predicted x0", "predicted noise", "guidance term")]
    caption = gr.Markdown()
    spectrum = gr.Plot(label="Power spectrum of predicted x0", format="png", elem_id="trajectory-spectrum",
                       show_label=False)
    with gr.Row():
        tol = Slider(0.02, 0.5, 0.1, step=0.02, label="Settled when |x0 - final| stays below", scale=1)
        settle = gr.Plot(label="When each region settled", format="png", scale=2, elem_id="trajectory-settle",
                         show_label=False)

    loaded = [step, image_choice, info, settle]
    shown = [*views, caption, spectrum]
    show = dict(fn=trajectory.show_step, inputs=[session, step, image_choice], outputs=shown,
                show_progress="hidden", **LIGHT)
    load.click(trajectory.load_latest, [session, tol], loaded, api_name="trajectory_load", **LIGHT) \
        .success(**show, api_name="trajectory_show_loaded")
    upload.upload(page_errors(trajectory.load_file), [session, upload, tol], [*loaded, session],
                  api_name="trajectory_upload", **LIGHT).success(**show, api_name="trajectory_show_uploaded")
    step.input(**show, api_name="trajectory_step", trigger_mode="always_last")
    image_choice.input(**show, api_name="trajectory_image") \
        .then(trajectory.settle_for, [session, image_choice, tol], [settle], api_name="trajectory_settle_image",
              **LIGHT)
    tol.release(trajectory.settle_for, [session, image_choice, tol], [settle], api_name="trajectory_settle",
                **LIGHT)

    with gr.Accordion("Two runs side by side", open=False, elem_id="pair") as pair_section:
        pair_info = gr.Markdown(pair.NO_SWEEP, elem_id="pair-info")
        with gr.Row():
            run_a = Dropdown([], label="Run A", allow_custom_value=True, elem_id="pair-a", scale=2)
            run_b = Dropdown([], label="Run B", allow_custom_value=True, elem_id="pair-b", scale=2)
            pair_image = Number(0, label="Image of each cell", precision=0, minimum=0, elem_id="pair-image",
                                scale=1, min_width=120)
        with gr.Row():
            refresh = gr.Button("Refresh from the last comparison", elem_id="pair-refresh")
            play = gr.Button("Play side by side", variant="primary", elem_id="pair-play")
            pair_stop = gr.Button("Stop", variant="stop", elem_id="pair-stop")
        pair_status = gr.Markdown(elem_id="pair-status")
        pair_bar = gr.HTML(progress.bar(0, 1), elem_id="pair-progress", padding=False)
        frames = gr.HTML(elem_id="pair-frames", elem_classes=["pixelated"], js_on_load=None)
        parting = gr.Plot(label="Where A and B part", format="png", elem_id="pair-plot", show_label=False)
    pairing = pair.Pair(ctx)
    cells = dict(fn=pairing.cells, inputs=[session], outputs=[run_a, run_b, pair_info], show_progress="hidden",
                 **LIGHT)
    refresh.click(**cells, api_name="pair_cells")
    pair_section.expand(**cells, api_name="pair_cells_on_open")
    streaming(play.click, "pair", gpu(300)(page_errors(pairing.play)), [run_a, run_b, pair_image, session],
              [frames, pair_status, pair_bar, parting], api_name="pair_play", show_progress="hidden", **HEAVY)
    pair_stop.click(pairing.stop, [session], None, api_name="pair_stop", queue=False)
    return loaded, show, tol


def upsample_tab(ctx: AppContext, session: gr.State):
    upsamplers = ctx.names("superres")
    if not upsamplers:
        gr.Markdown(ctx.missing("superres", "upsampler", "scenes128_upsampler.safetensors"))
        return
    up0 = _prefer(upsamplers, "scenes128_upsampler")
    lab = Lab(ctx)
    small0 = ctx.registry.get(up0).loaded.metadata.get("small_size") or ctx.info(up0).image_size // 4
    bases = [n for n in ctx.names("diffusion") if ctx.info(n).image_size == small0]
    choices = lab_class_choices(ctx, up0)
    with gr.Row():
        upsampler = Dropdown(upsamplers, value=up0, label="Upsampler", scale=2)
        up_respacing = gr.Textbox("20", label="Upsampler respacing (DDIM)", scale=1, elem_id="up-respacing")
        seed = Number(0, precision=0, minimum=0, label="Seed", scale=1)
        stop = gr.Button("Stop", variant="stop", elem_id="upsample-stop", scale=1)
    with gr.Row(equal_height=False):
        with gr.Column(min_width=320):
            gr.Markdown("### Generated\nLow-res samples from the base model (or your `.npz`) → upsampled.")
            if not bases:
                gr.Markdown(f"No base model makes {small0} px images; upload an `.npz` of low-res samples.")
            with gr.Row():
                base = Dropdown(["none", *bases], value=bases[0] if bases else "none", label="Base model")
                gen_class = Dropdown(choices, value=choices[0], label="Class")
            with gr.Row():
                count = Slider(1, 8, 2, step=1, label="Images", elem_id="gen-count")
                base_respacing = gr.Textbox("25", label="Base respacing (DDIM)", elem_id="gen-respacing")
            npz = gr.File(label="…or upload low-res samples (.npz)", file_types=[".npz"], height=90)
            if small0 == 32:
                gr.Examples([[os.path.join(HERE, "assets", "examples", "rendered_scenes_4x32x32x3.npz")]], [npz],
                            label="Example: four rendered 32 px scenes (true low-res images, not samples)")
            preview_every = Slider(1, 50, 5, step=1, label="Preview every N steps")
            gen_run = gr.Button("Generate and upsample", variant="primary", elem_id="gen-run")
            gen_status = gr.Markdown(elem_id="gen-status")
            gen_bar = gr.HTML(progress.bar(0, 1), elem_id="gen-progress", padding=False)
            with gr.Row():
                gen_low = gr.Image(label="low-res (nearest, enlarged)", format="png", interactive=False,
                                   elem_classes=["pixelated"], elem_id="gen-low")
                gen_high = gr.Image(label="upsampled", format="png", interactive=False,
                                    elem_classes=["pixelated"], elem_id="gen-high")
            gen_files = gr.File(label="Downloads", file_count="multiple")
        with gr.Column(min_width=320):
            gr.Markdown("### In the wild\nReal photo → centre crop → downscaled → upsampled, "
                        "beside the original and bicubic.")
            with gr.Row():
                photo = Dropdown(list(WILD_PHOTO_NAMES), value="astronaut", label="Bundled photo")
                mode = Radio([WHOLE, NATIVE], value=WHOLE, label="Crop")
            upload = Image(label="…or upload a photo", type="filepath", sources=["upload"], height=160)
            with gr.Row():
                suggest = gr.Button("Suggest classes", elem_id="wild-suggest")
                wild_class = Dropdown(choices, value=choices[0], label="Class for the upsampler")
            top = gr.Label(label="Classifier's top classes", num_top_classes=3, elem_id="wild-top")
            suggest_msg = gr.Markdown()
            wild_run = gr.Button("Upsample photo", variant="primary", elem_id="wild-run")
            wild_status = gr.Markdown(elem_id="wild-status")
            with gr.Row():
                original = gr.Image(label="original crop", format="png", interactive=False, elem_id="wild-original",
                                    elem_classes=["pixelated"], min_width=120)
                low = gr.Image(label="model input (enlarged)", format="png", interactive=False,
                               elem_classes=["pixelated"], elem_id="wild-low", min_width=120)
            with gr.Row():
                cubic = gr.Image(label="bicubic", format="png", interactive=False, elem_classes=["pixelated"],
                                 elem_id="wild-bicubic", min_width=120)
                high = gr.Image(label="upsampled", format="png", interactive=False, elem_classes=["pixelated"],
                                elem_id="wild-high", min_width=120)
            numbers = gr.Dataframe(headers=METRIC_COLUMNS, label="Against the original", interactive=False,
                                   elem_id="wild-metrics")
            with gr.Row():
                n_classes = Slider(2, 8, 4, step=1, label="Classes", elem_id="wild-n-classes")
                classes_run = gr.Button("Upsample under several classes", elem_id="wild-classes-run")
            classes_status = gr.Markdown()
            classes_gallery = gr.Gallery(label="One photo, one noise, several classes", columns=4, format="png",
                                         elem_id="wild-classes", elem_classes=["pixelated"])
    sharp = gr.Plot(plots.sharpness_figure({}), label="Sharpness: generated vs wild", format="png",
                    elem_id="lab-sharpness", show_label=False)

    streaming(gen_run.click, "upsample", gpu(300)(page_errors(lab.generated)),
              [base, gen_class, seed, count, base_respacing, upsampler, up_respacing, npz, preview_every, session],
              [gen_low, gen_high, gen_status, gen_bar, sharp, gen_files, session],
              api_name="upsample_generated", show_progress="hidden", **HEAVY)
    suggest.click(on_compute_thread(gpu(60)(page_errors(lab.suggest))), [photo, upload, upsampler, mode],
                  [top, wild_class, low, suggest_msg],
                  api_name="suggest_classes", show_progress="minimal", **HEAVY)
    streaming(wild_run.click, "upsample", gpu(300)(page_errors(lab.wild)),
              [photo, upload, upsampler, mode, wild_class, up_respacing, seed, session],
              [original, low, cubic, high, numbers, wild_status, sharp, session], api_name="upsample_wild",
              show_progress="full", show_progress_on=[wild_status], **HEAVY)
    streaming(classes_run.click, "upsample", gpu(600)(page_errors(lab.wild_classes)),
              [photo, upload, upsampler, mode, up_respacing, seed, n_classes, session],
              [classes_gallery, classes_status, session], api_name="upsample_wild_classes",
              show_progress="full", show_progress_on=[classes_status], **HEAVY)
    stop.click(lab.stop, [session], None, api_name="stop_upsample", queue=False)
    upsampler.change(lab.upsampler_options, [upsampler], [wild_class, gen_class], api_name="upsampler_options",
                     show_progress="hidden", **LIGHT)


def models_tab(ctx: AppContext):
    rows = []
    for info in ctx.registry.infos():
        entry = ctx.registry.get(info.name)
        training = entry.loaded.metadata.get("training", {})
        rows.append([info.name, info.kind, info.image_size, info.num_labels or "", entry.loaded.preset or "",
                     training.get("steps", "")])
    gr.Markdown(f"Models found in `{ctx.registry.root}` (file stems; official ADM checkpoints appear here "
                "when their files are present).")
    gr.Dataframe(rows, headers=["name", "kind", "size", "classes", "preset", "training steps"], interactive=False)


def build(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="Guided Diffusion Explorer") as demo:
        gr.Markdown("# Guided Diffusion Explorer\nWatch guided diffusion models sample, compare guidance on one "
                    "seed, scrub through a trajectory, and see an upsampler on generated images and real photos.")
        session = gr.State(new_session)
        with gr.Tabs():
            with gr.Tab("Live sampling", id="sample"):
                wired = sampling_tab(ctx, session)
            with gr.Tab("Guidance comparison", id="compare"):
                compare_tab(ctx, session)
            with gr.Tab("Trajectory explorer", id="trajectory"):
                loaded, show, tol = trajectory_tab(ctx, session)
            with gr.Tab("Upsampling lab", id="upsample"):
                upsample_tab(ctx, session)
            with gr.Tab("Models", id="models"):
                models_tab(ctx)
        if wired is not None:
            event, sampler_h, check, respacing_outputs = wired
            event.success(trajectory.load_latest, [session, tol], loaded, api_name="trajectory_after_run", **LIGHT) \
                .success(**show, api_name="trajectory_show_after_run")
            demo.load(sampler_h.check_respacing, check, list(respacing_outputs),
                      api_name="validate_respacing_on_load", show_progress="hidden")
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoints", help="model folder (default $EXPLORE_CHECKPOINTS or ./checkpoints)")
    parser.add_argument("--outputs", help="where runs are written (default $EXPLORE_OUTPUTS or a temp folder)")
    parser.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--host", default=None, help="server name (default $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="network precision of every run (default $EXPLORE_PRECISION or fp32; bf16 is the fast "
                        "path on CPUs with AVX-512 BF16 / AMX)")
    args = parser.parse_args(argv)
    if os.environ.get("EXPLORE_THREADS"):
        torch.set_num_threads(int(os.environ["EXPLORE_THREADS"]))
    memory.limit_arenas(2)  # with release_memory() after each run: less heap left behind by many threads
    checkpoints = args.checkpoints or os.environ.get("EXPLORE_CHECKPOINTS") or os.path.join(HERE, "checkpoints")
    ctx = AppContext.create(checkpoints, args.outputs, args.device, args.precision)
    demo = build(ctx)
    with open(CSS_PATH) as f:
        css = f.read()
    queue_size = int(os.environ.get("EXPLORE_QUEUE_SIZE", "32"))  # waiting requests; more get a polite 'busy'
    demo.queue(max_size=queue_size, default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, css=css, theme=gr.themes.Soft(),
        footer_links=["api", "gradio"], allowed_paths=[str(ctx.out_root)], show_error=True)


if __name__ == "__main__":
    main()
