"""Training the built-in family: a few steps of every kind, exact resumption, export, image folders.

The real configs are monkeypatched to width-32, one- or two-level networks so each run takes a second or two.
"""
from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from explore import train
from explore.models.configs import ClassifierConfig, UNetConfig
from explore.registry import ModelRegistry

KINDS = ["base", "classifier", "upsampler", "evaluator"]


def tiny_base(num_classes: int, size: int = 32) -> UNetConfig:
    return UNetConfig(image_size=size, model_channels=32, out_channels=3, num_res_blocks=1, attention_ds=(),
                      channel_mult=(1, 1, 1), num_classes=num_classes + 1, num_head_channels=32)


def tiny_classifier(num_classes: int, size: int = 32) -> ClassifierConfig:
    return ClassifierConfig(image_size=size, model_channels=32, out_channels=num_classes, num_res_blocks=1,
                            attention_ds=(), channel_mult=(1, 2), num_head_channels=32)


def tiny_upsampler(num_classes: int, large_size: int = 128) -> UNetConfig:
    # Three levels: the middle block always has attention, so it must not run at full resolution.
    return UNetConfig(image_size=large_size, model_channels=32, out_channels=3, num_res_blocks=1, attention_ds=(),
                      channel_mult=(1, 1, 1), num_classes=num_classes + 1, num_head_channels=32, super_res=True)


@contextlib.contextmanager
def tiny_family():
    """explore.train builds tiny networks of every kind inside this block."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "base_config", tiny_base)
        mp.setattr(train, "classifier_config", tiny_classifier)
        mp.setattr(train, "upsampler_config", tiny_upsampler)
        yield


@pytest.fixture(autouse=True)
def _tiny():
    torch.set_num_threads(1)
    with tiny_family():
        yield


def spec(kind, run_dir, **kw):
    defaults = dict(batch=4, steps=3, crop=16, save_every_s=1e9)
    return train.TrainSpec(kind=kind, run_dir=Path(run_dir), **{**defaults, **kw})


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max {float((a[k] - b[k]).abs().max()):.3g})"


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_a_few_steps(tmp_path, kind):
    trainer = train.Trainer(spec(kind, tmp_path))
    before = weights(trainer.model)
    trainer.train()
    assert trainer.step == 3 and trainer.seconds > 0
    assert torch.isfinite(trainer.loss(0))
    changed = [k for k, v in weights(trainer.model).items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "no parameter moved"
    assert (tmp_path / "state.pt").exists()
    assert json.loads((tmp_path / "progress.json").read_text()) == {"kind": kind, "step": 3, "minutes": 0.0}


def state_of(trainer):
    return weights(trainer.model), weights(trainer.ema), trainer.opt.state_dict()


def assert_same_state(a, b):
    assert_same(a[0], b[0], "model")
    assert_same(a[1], b[1], "ema")
    sa, sb = a[2]["state"], b[2]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert_same(sa[i], sb[i], f"optimizer state {i}")
    assert a[2]["param_groups"] == b[2]["param_groups"]


@pytest.mark.parametrize("kind,bf16", [("base", True), ("base", False), ("upsampler", True), ("classifier", True),
                                       ("evaluator", False)])
def test_an_interrupted_run_resumes_exactly(tmp_path, kind, bf16):
    whole = train.Trainer(spec(kind, tmp_path / "whole", steps=4, bf16=bf16))
    whole.train()

    first = train.Trainer(spec(kind, tmp_path / "parts", steps=4, bf16=bf16, minutes=1e-9))
    first.train()  # the time limit stops it after one step, and it saves
    assert first.step == 1
    resumed = train.Trainer(spec(kind, tmp_path / "parts", steps=4, bf16=bf16))
    assert resumed.step == 1
    assert_same_state(state_of(resumed), state_of(first))
    resumed.train()
    assert resumed.step == 4
    assert_same_state(state_of(resumed), state_of(whole))


def test_sigterm_stops_after_the_current_step_and_saves(tmp_path):
    trainer = train.Trainer(spec("base", tmp_path, steps=5))
    loss = trainer.loss

    def loss_then_term(step):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return loss(step)

    trainer.loss = loss_then_term
    previous = signal.getsignal(signal.SIGTERM)
    trainer.train()
    assert trainer.step == 2
    assert signal.getsignal(signal.SIGTERM) == previous
    assert train.Trainer(spec("base", tmp_path, steps=5)).step == 2


def test_the_data_stream_is_a_function_of_seed_and_step():
    data = train.Data("scenes", seed=0)
    x1, y1 = data.images(7, 4)
    x2, y2 = train.Data("scenes", seed=0).images(7, 4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(data.images(8, 4)[0], x1)
    assert not torch.equal(train.Data("scenes", seed=1).images(7, 4)[0], x1)
    hr, lr, labels = data.pairs(3, 2, 16, 4)
    assert hr.shape == (2, 3, 16, 16) and lr.shape == (2, 3, 4, 4) and labels.shape == (2,)
    # The same scenes: the low-res crop is close to a box-downscale of the high-res one.
    assert (torch.nn.functional.avg_pool2d(hr, 4) - lr).abs().mean() < 0.05


@pytest.mark.parametrize("kind,expected", [("base", "diffusion"), ("classifier", "classifier"),
                                           ("upsampler", "superres"), ("evaluator", "evaluator")])
def test_export_loads_through_the_registry(tmp_path, kind, expected):
    trainer = train.Trainer(spec(kind, tmp_path / "run", steps=2))
    trainer.train()
    path = trainer.export(tmp_path / "ckpt" / f"tiny_{kind}.safetensors")
    assert path.exists() and path.with_suffix(".json").exists()
    registry = ModelRegistry(tmp_path / "ckpt", device="cpu")
    entry = registry.get(f"tiny_{kind}")
    assert entry.kind == expected
    assert entry.class_names == list(train.Data("scenes", 0).class_names)
    assert entry.num_labels == 8
    meta = entry.loaded.metadata["training"]
    assert meta["steps"] == 2 and meta["images_seen"] == 8 and meta["data"] == "scenes"
    assert entry.null_class == (8 if expected in ("diffusion", "superres") else None)
    if expected == "superres":
        assert entry.loaded.metadata["small_size"] == 32
    assert_same(weights(entry.module), weights(trainer.ema), "exported EMA weights")


def make_image_folder(root: Path, classes=("cats", "dogs"), per_class=3, size=40) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size, size, 3), 60 + 120 * c, np.uint8) + rng.integers(0, 40, (size, size, 3),
                                                                                    dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_base_trains_from_an_image_folder_and_exports_its_classes(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    trainer = train.Trainer(spec("base", tmp_path / "run", data=str(folder), steps=2))
    assert trainer.data.class_names == ["cats", "dogs"]
    assert trainer.config.num_classes == 3  # two classes and the null class
    x, labels = trainer.data.images(0, 4)
    assert x.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1}
    trainer.train()
    assert trainer.step == 2
    trainer.export(tmp_path / "ckpt" / "folder_base.safetensors")
    entry = ModelRegistry(tmp_path / "ckpt", device="cpu").get("folder_base")
    assert entry.class_names == ["cats", "dogs"] and entry.null_class == 2 and entry.num_labels == 2
    assert entry.loaded.metadata["training"]["data"] == str(folder)


def test_command_line_trains_resumes_and_exports(tmp_path, capsys):
    run = tmp_path / "run"
    out = tmp_path / "ckpt" / "cli_base.safetensors"
    train.main(["base", "--run_dir", str(run), "--steps", "2", "--batch", "2", "--no_bf16"])
    assert "new run" in capsys.readouterr().out
    train.main(["base", "--run_dir", str(run), "--steps", "3", "--batch", "2", "--no_bf16", "--export", str(out)])
    assert "resuming at step 2" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["training"]["steps"] == 3
    train.main(["base", "--run_dir", str(run), "--export_only", "--export", str(out)])
    assert "at step 3" in capsys.readouterr().out


def test_initial_weights_are_a_function_of_the_seed(tmp_path):
    torch.manual_seed(123)  # whatever the global RNG holds
    a = weights(train.Trainer(spec("base", tmp_path / "a", seed=5)).model)
    torch.rand(10)
    b = weights(train.Trainer(spec("base", tmp_path / "b", seed=5)).model)
    c = weights(train.Trainer(spec("base", tmp_path / "c", seed=6)).model)
    assert_same(a, b, "same seed")
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].abs().sum() > 0)


def test_diffusion_models_learn_v_by_default_and_sample_through_the_engine(tmp_path):
    from explore.engine import Recipe, run
    trainer = train.Trainer(spec("base", tmp_path / "run", steps=1))
    trainer.train()
    trainer.export(tmp_path / "ckpt" / "tiny_v.safetensors")
    registry = ModelRegistry(tmp_path / "ckpt", device="cpu")
    assert registry.get("tiny_v").diffusion.predict_v
    final = run(Recipe(model="tiny_v", respacing="3", class_label=1, cfg_scale=2.0, batch_size=1), registry)
    assert final.x.shape == (1, 3, 32, 32) and torch.isfinite(final.x).all()


def test_v_target_is_sqrt_abar_eps_minus_sqrt_one_minus_abar_x0(tmp_path, monkeypatch):
    # A network that outputs exactly the target has zero loss; the eps target is the noise itself.
    seen = {}

    def capture(self, x_t, t, y=None, **kw):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    for prediction in ("v", "eps"):
        trainer = train.Trainer(spec("base", tmp_path / prediction, prediction=prediction))
        monkeypatch.setattr(type(trainer.model), "forward", capture)
        loss = trainer.loss(0)
        x0, _ = trainer.data.images(0, 4)
        a, b = trainer.sqrt_abar[seen["t"]].view(-1, 1, 1, 1), trainer.sqrt_1m_abar[seen["t"]].view(-1, 1, 1, 1)
        noise = (seen["x_t"] - a * x0) / b
        target = a * noise - b * x0 if prediction == "v" else noise
        torch.testing.assert_close(loss, (target ** 2).mean(), rtol=1e-4, atol=1e-6)
        monkeypatch.undo()


def test_a_new_run_can_start_from_another_runs_weights_and_records_both(tmp_path):
    first = train.Trainer(spec("base", tmp_path / "eps", steps=2, prediction="eps"))
    first.train()
    with pytest.raises(ValueError, match="--prediction eps"):
        train.Trainer(spec("base", tmp_path / "eps", steps=3, prediction="v"))
    second = train.Trainer(spec("base", tmp_path / "v", steps=1, init_from=tmp_path / "eps" / "state.pt"))
    assert second.step == 0
    assert_same(weights(second.model), weights(first.model), "initial weights")
    second.train()
    second.export(tmp_path / "ckpt" / "tuned.safetensors")
    meta = json.loads((tmp_path / "ckpt" / "tuned.json").read_text())["training"]
    assert meta["steps"] == 3 and [s["prediction"] for s in meta["stages"]] == ["eps", "v"]
    assert [s["steps"] for s in meta["stages"]] == [2, 1]
    resumed = train.Trainer(spec("base", tmp_path / "v", steps=2, init_from=tmp_path / "eps" / "state.pt"))
    assert resumed.step == 1 and len(resumed.earlier) == 1  # an existing state wins over init_from


def test_upsampler_learns_the_residual_over_bicubic_by_default(tmp_path, monkeypatch):
    from explore.denoisers import upsampled
    seen = {}

    def capture(self, x_t, t, y=None, low_res=None, **kw):
        seen.update(x_t=x_t, t=t, low_res=low_res)
        return torch.zeros_like(x_t)

    trainer = train.Trainer(spec("upsampler", tmp_path / "up"))
    assert trainer.diffusion.predict_v and trainer.diffusion.low_res_skip
    monkeypatch.setattr(type(trainer.model), "forward", capture)
    loss = trainer.loss(0)
    x0, low_res, _ = trainer.data.pairs(0, 4, 16, 4)
    a, b = trainer.sqrt_abar[seen["t"]].view(-1, 1, 1, 1), trainer.sqrt_1m_abar[seen["t"]].view(-1, 1, 1, 1)
    noise = (seen["x_t"] - a * x0) / b
    target = a * noise - b * (x0 - upsampled(low_res, x0.shape[-2:]))
    torch.testing.assert_close(loss, (target ** 2).mean(), rtol=1e-4, atol=1e-6)
    monkeypatch.undo()
    trainer.train()
    trainer.export(tmp_path / "ckpt" / "tiny_up.safetensors")
    registry = ModelRegistry(tmp_path / "ckpt", device="cpu")
    assert registry.get("tiny_up").diffusion.low_res_skip
    from explore.engine import Recipe, run
    low = torch.rand(3, 3, 32, 32) * 2 - 1
    final = run(Recipe(model="tiny_up", respacing="2", batch_size=3, class_label=2), registry, low_res=low)
    assert final.x.shape == (3, 3, 128, 128) and torch.isfinite(final.x).all()
    no_skip = train.Trainer(spec("upsampler", tmp_path / "plain", low_res_skip=False))
    assert no_skip.diffusion.predict_v and not no_skip.diffusion.low_res_skip
