"""gradio_client drives every api_name of the running app (one client = one session, so state carries over)."""
from __future__ import annotations

import os
import time

import pytest

from explore.outputs import load_samples_npz, read_png_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # else Client() looks up huggingface.co even for localhost

BASE, CLF, EVAL, UP = "scenes32_base", "scenes32_classifier", "scenes32_evaluator", "scenes128_upsampler"
ENDPOINTS = {
    "/sample", "/stop_sample", "/validate_respacing", "/sampler_options", "/validate_respacing_sampler",
    "/validate_respacing_karras", "/model_options", "/validate_respacing_model", "/validate_respacing_on_load",
    "/compare", "/stop_compare", "/compare_model_options",
    "/trajectory_load", "/trajectory_show_loaded", "/trajectory_upload", "/trajectory_show_uploaded",
    "/trajectory_step", "/trajectory_image", "/trajectory_settle_image", "/trajectory_settle",
    "/trajectory_after_run", "/trajectory_show_after_run",
    "/upsample_generated", "/suggest_classes", "/upsample_wild", "/upsample_wild_classes", "/stop_upsample",
    "/upsampler_options", "/new_session",
    "/pair_cells", "/pair_cells_on_open", "/pair_play", "/pair_stop",
}


@pytest.fixture(scope="module")
def client(app_url, tmp_path_factory):
    from gradio_client import Client
    return Client(app_url, verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("downloads")))


def call(client, name, *args):
    return client.predict(*args, api_name=name)


def sample_args(respacing="10", every=2, batch=1):
    return [BASE, "forest", "ddim", respacing, False, CLF, 0.0, 1.0, "standard", 0.0, 0.0, 3, batch, every]


def first_output(job, timeout=60.0):
    deadline = time.time() + timeout
    while not job.outputs():
        assert time.time() < deadline, "no output streamed"
        time.sleep(0.05)


def test_every_event_has_an_api_name(client):
    named = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert ENDPOINTS <= named, f"missing: {sorted(ENDPOINTS - named)}"
    assert not client.view_api(return_format="dict", print_info=False)["unnamed_endpoints"]


def test_small_events(client):
    message, _ = call(client, "/validate_respacing", BASE, "ddim25", "ddim", False)
    assert message.startswith("Valid: 25 steps")
    for name in ("/validate_respacing_sampler", "/validate_respacing_karras", "/validate_respacing_model",
                 "/validate_respacing_on_load"):
        message, _ = call(client, name, BASE, "7", "heun", True)
        assert "7 steps (Karras" in message
    assert "Not valid" in call(client, "/validate_respacing", BASE, "0", "ddim", False)[0]
    eta, churn, karras = call(client, "/sampler_options", "heun")
    assert churn["visible"] is True and eta["visible"] is False
    classes, cfg, classifier = call(client, "/model_options", BASE)
    assert "forest" in [c[0] for c in classes["choices"]] and classifier["value"] == CLF
    assert "alpine" in [c[0] for c in call(client, "/compare_model_options", BASE)["choices"]]
    wild_class, gen_class = call(client, "/upsampler_options", UP)
    assert wild_class["value"] == gen_class["value"] and wild_class["value"].startswith("auto")
    call(client, "/new_session")


def test_sample_streams_then_explorer(client, tmp_path):
    job = client.submit(*sample_args("10", every=2, batch=2), api_name="/sample")
    outputs = list(job)
    statuses = [o[2] for o in outputs]
    # a preview every 2 steps, at most 5 a second: which of them stream depends on the machine's speed
    shown = [int(s.split("/")[0].removeprefix("Step ")) for s in statuses if s.startswith("Step ")]
    assert 1 <= len(shown) <= 5 and all(step % 2 == 0 for step in shown) and shown[-1] == 10, statuses
    assert statuses[-1].startswith("Finished step 10/10")
    previews = {o[0] for o in outputs if isinstance(o[0], str)}
    assert previews and all(p.startswith('<img src="data:image/png;base64,') for p in previews)
    files = outputs[-1][9]
    paths = [str(f) for f in files]
    png = next(p for p in paths if p.endswith("sample_00_forest.png"))
    assert '"respacing": "10"' in read_png_recipe(png)
    images, labels = load_samples_npz(next(p for p in paths if "samples_2x32" in p and p.endswith(".npz")))
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [4, 4]
    assert outputs[-1][10].startswith("python -m explore sample")

    for name in ("/trajectory_after_run", "/trajectory_load"):
        slider, choice, summary, _ = call(client, name, 0.1)
        assert slider["maximum"] == 9 and "10 recorded steps" in summary
    for name in ("/trajectory_show_after_run", "/trajectory_show_loaded", "/trajectory_step", "/trajectory_image"):
        *views, caption, _ = call(client, name, 4, "image 1: forest")
        assert len(views) == 4 and all(views) and caption.startswith("Step 5 of 10")
    for name in ("/trajectory_settle_image", "/trajectory_settle"):
        assert call(client, name, "image 0: forest", 0.2) is not None
    from gradio_client import handle_file
    trajectory_file = next(p for p in paths if p.endswith("trajectory.npz"))
    slider, choice, summary, _ = call(client, "/trajectory_upload", handle_file(trajectory_file), 0.1)
    assert slider["maximum"] == 9
    assert call(client, "/trajectory_show_uploaded", 0, "image 0: forest")[4].startswith("Step 1 of 10")


def test_stop_sample_ends_the_run_early(client):
    job = client.submit(*sample_args("400", every=1), api_name="/sample")
    first_output(job)
    call(client, "/stop_sample")
    status = job.result()[2]
    assert status.startswith("Stopped at step"), status
    assert int(status.split("step ")[1].split("/")[0]) < 400


def test_compare_and_stop(client):
    grid, table, _, status, _, files = call(client, "/compare", BASE, "night_sky", "ddim", "4", CLF, "0, 2", "1, 3",
                                         "standard", 1, 2, EVAL)
    assert status.startswith("Finished 4 cells") and len(table["data"]) == 4 and len(files) == 3
    job = client.submit(BASE, "lake", "ddim", "100", CLF, "0, 1, 2", "1, 2", "standard", 0, 1, EVAL,
                        api_name="/compare")
    first_output(job)
    call(client, "/stop_compare")
    assert job.result()[3].startswith("Stopped after")


def test_upsampling_endpoints(client):
    top, choice, low, message = call(client, "/suggest_classes", "chelsea", None, UP, "native pixels")
    assert "Top class" in message and choice["value"] in [c["label"] for c in top["confidences"]]
    original, low, cubic, high, table, status, _ = call(client, "/upsample_wild", "astronaut", None, UP,
                                                        "whole photo, resized", "forest", "3", 0)
    assert status == "Upsampled as **forest**." and len(table["data"]) == 3 and all([original, low, cubic, high])
    gallery, status = call(client, "/upsample_wild_classes", "coffee", None, UP, "whole photo, resized", "2", 0, 2)
    assert len(gallery) == 2 and status.startswith("2 classes")
    low, high, status, _, _, files = call(client, "/upsample_generated", BASE, "desert", 0, 1, "3", UP, "2", None, 1)
    assert "Upsampled 1 samples" in status and len(files) == 3
    job = client.submit(BASE, "desert", 0, 1, "3", UP, "200", None, 1, api_name="/upsample_generated")
    first_output(job)
    deadline = time.time() + 60
    while not any(str(o[2]).startswith("Upsampling: step") for o in job.outputs()):
        assert time.time() < deadline
        time.sleep(0.05)
    call(client, "/stop_upsample")
    assert job.result()[2].startswith("Stopped at upsampling step")

