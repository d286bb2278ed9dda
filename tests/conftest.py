"""Shared fixtures for the app tests: a checkpoints folder with every model kind, the app on localhost."""
from __future__ import annotations

import os

# Before anything loads PyTorch's OpenMP runtime (libgomp reads this once, when it is loaded), and inherited by
# every process the tests start (the app server, CLI and torchrun subprocesses): idle OpenMP threads sleep
# instead of spinning. A spinning team fights any other process for the cores; on the shared 2-core machine one
# 2-thread forward of a tiny UNet took a median 433 ms (default) against 24 ms (PASSIVE) beside other jobs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# name -> (training kind, checkpoint kind); real files in checkpoints/ are used when present
MODELS = {"scenes32_base": ("base", "diffusion"), "scenes32_classifier": ("classifier", "classifier"),
          "scenes32_evaluator": ("evaluator", "evaluator"), "scenes128_upsampler": ("upsampler", "superres")}


def make_standin(folder: Path, name: str, train_kind: str, kind: str) -> Path:
    """A random-weight model of the real architecture, saved the way explore.train exports it."""
    from explore.data.scenes import CLASS_NAMES
    from explore.train import build, diffusion_config
    from explore.zoo import save_checkpoint

    torch.manual_seed(0)
    module, config = build(train_kind, len(CLASS_NAMES))
    with torch.no_grad():  # ADM zero-initialises output layers; give them small weights so outputs vary
        for p in module.parameters():
            if not p.abs().any():
                p.normal_(0, 0.02)
    meta = {"kind": kind, "model_config": config.to_dict(), "class_names": list(CLASS_NAMES),
            "training": {"steps": 0, "note": "random-weight stand-in for tests"}}
    if kind in ("diffusion", "superres", "classifier"):
        meta["diffusion_config"] = diffusion_config(train_kind).to_dict()  # as explore.train exports it
    if kind in ("diffusion", "superres"):
        meta["null_class"] = len(CLASS_NAMES)
    if kind == "superres":
        meta["small_size"] = config.image_size // 4
    return save_checkpoint(module, folder / f"{name}.safetensors", meta)


def populate(folder: Path, names=tuple(MODELS)) -> Path:
    """Link the real checkpoints that exist; create stand-ins for the rest."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        train_kind, kind = MODELS[name]
        real = ROOT / "checkpoints" / f"{name}.safetensors"
        if real.exists() and real.with_suffix(".json").exists():
            for suffix in (".safetensors", ".json"):
                target = folder / f"{name}{suffix}"
                if not target.exists():
                    target.symlink_to(real.with_suffix(suffix))
        else:
            make_standin(folder, name, train_kind, kind)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the machine is shared, and tiny models gain nothing from two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def app_checkpoints(tmp_path_factory) -> Path:
    """Every model kind the app uses (real files where they exist)."""
    return populate(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def app_context(app_checkpoints, tmp_path_factory):
    torch.set_num_threads(1)
    from explore.ui.context import AppContext
    return AppContext.create(app_checkpoints, tmp_path_factory.mktemp("outputs"), device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_url(app_checkpoints, tmp_path_factory):
    """`python app.py` in a subprocess on a free localhost port; its log goes to test-artifacts/."""
    port = _free_port()
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    env = dict(os.environ, EXPLORE_CHECKPOINTS=str(app_checkpoints), GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")), EXPLORE_THREADS="1",
               EXPLORE_OUTPUTS=str(tmp_path_factory.mktemp("runs")), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    log = open(artifacts / "app-server.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"app.py exited with {proc.returncode}; see test-artifacts/app-server.log")
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("app.py did not answer within 120 s")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
