"""`python -m explore.evaluate --quick` end to end on tiny random-weight stand-ins of the built-in family."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from explore import evaluate, train
from explore.registry import ModelRegistry
from test_train import tiny_family


def wake(module: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised output layers small random weights, so samples depend on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    with tiny_family():
        for name, kind in evaluate.TRAIN_KIND.items():
            trainer = train.Trainer(train.TrainSpec(kind=kind, run_dir=root / "runs" / kind))
            wake(trainer.ema)
            trainer.export(root / f"{name}.safetensors")
    return root


@pytest.fixture(scope="module")
def quick_run(checkpoints, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("card")
    assert evaluate.main(["--checkpoints", str(checkpoints), "--out", str(out), "--quick", "--device", "cpu",
                          "--respacing", "3", "--sr_respacing", "2"]) == 0
    return out, json.loads((out / "model_card.json").read_text()), (out / "README.md").read_text()


def test_quick_run_writes_the_card_and_the_json(quick_run, checkpoints):
    out, report, card = quick_run
    assert (out / "model_card_samples.png").exists() and (out / "model_card_upsampler.png").exists()
    assert report["command"] == (f"python -m explore.evaluate --checkpoints {checkpoints} --out {out} "
                                 "--quick --device cpu --respacing 3 --sr_respacing 2")
    assert f"`{report['command']}`" in card and report["date"] in card and report["machine"]["cpu"] in card
    assert report["settings"]["quick"] and "Quick mode" in card
    assert report["missing"] == {}
    assert set(report["models"]) == set(evaluate.MODELS)
    for name, facts in report["models"].items():
        assert facts["training"]["steps"] == 0 and facts["parameters"] > 0
        output = (f"{facts['diffusion']['noise_schedule']}, {facts['diffusion']['prediction']}"
                  if facts["diffusion"] else "logits")
        if facts["kind"] == "classifier":
            output = f"logits of {facts['diffusion']['noise_schedule']} x_t"
        assert f"| {name} | {facts['kind']} | {facts['parameters']:,} | {output} | 0 |" in card


def test_quick_run_sweeps_every_scale_with_balanced_classes(quick_run):
    _, report, card = quick_run
    sweep = report["guidance_sweep"]
    assert [r["scale"] for r in sweep["cfg"]] == [0, 1, 3, 5]
    assert [r["scale"] for r in sweep["classifier"]] == [0, 1, 3, 10]
    assert [r["cfg_scale"] for r in sweep["classifier"]] == [0, 0, 0, 0]  # from the unconditional model
    for row in [sweep["real"]] + sweep["cfg"] + sweep["classifier"]:
        assert row["samples"] == 16 and len(row["per_class_accuracy"]) == 8
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["frechet_distance"] >= 0 and row["diversity"] > 0
        # Two images per class: the overall accuracy is the mean of the per-class ones.
        assert row["accuracy"] == pytest.approx(np.mean(row["per_class_accuracy"]))
    cfg0, cls0 = sweep["cfg"][0], sweep["classifier"][0]
    assert {k: v for k, v in cfg0.items() if k not in ("guidance", "scale", "classifier_scale")} == \
           {k: v for k, v in cls0.items() if k not in ("guidance", "scale", "classifier_scale")}
    cfg3 = sweep["cfg"][2]
    assert f"| CFG | 3 | {cfg3['accuracy']:.1%} | {cfg3['frechet_distance']:.2f} |" in card


def test_quick_run_compares_the_upsampler_with_bicubic(quick_run):
    _, report, card = quick_run
    up = report["upsampler"]
    assert up["samples"] == 4 and up["small_size"] == 32 and up["large_size"] == 128
    assert up["psnr_gain_db"] == pytest.approx(up["upsampler"]["psnr"] - up["bicubic"]["psnr"])
    assert up["bicubic"]["psnr"] > 15 and 0 < up["bicubic"]["ssim"] <= 1
    assert f"| bicubic | {up['bicubic']['psnr']:.2f}" in card


def test_bars_are_computed_and_stated(quick_run):
    _, report, card = quick_run
    bars = {b["name"]: b for b in report["bars"]}
    assert len(bars) == 4 + 6 and all(b["met"] in (True, False) for b in bars.values())
    accuracy = bars["evaluation accuracy at CFG 3 >= 90%"]
    assert accuracy["met"] == (report["guidance_sweep"]["cfg"][2]["accuracy"] >= 0.9)
    psnr = next(b for name, b in bars.items() if "bicubic" in name)
    assert psnr["met"] == (report["upsampler"]["psnr_gain_db"] >= 1.0)
    for bar in bars.values():
        assert f"| {bar['name']} | {bar['measured']} | **{'met' if bar['met'] else 'not met'}** |" in card


def test_quick_run_sweeps_classifier_guidance_with_every_sampler(quick_run):
    out, report, card = quick_run
    rows = report["sampler_sweep"]["rows"]
    samplers = ["ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m"]
    assert [(r["sampler"], r["scale"], r["guard"]) for r in rows] == \
        [(s, scale, 0) for s in samplers for scale in (0, 1, 3, 10)] + [(s, 10, 0.995) for s in samplers]
    assert all(r["samples"] == 8 and 0 <= r["saturated"] <= 1 for r in rows)
    assert (out / "model_card_samplers.png").exists() and "## Classifier guidance from the unconditional model" in card
    ddim = [r for r in rows if r["sampler"] == "ddim"]
    assert f"| ddim | 10 | 0.995 | {ddim[-1]['accuracy']:.1%} |" in card


def test_sampler_bar_rule():
    def row(scale, accuracy, diversity, saturated, guard=0.0):
        return {"sampler": "ddim", "scale": scale, "guard": guard, "accuracy": accuracy, "diversity": diversity,
                "saturated": saturated}
    rows = [row(0, 0.1, 9, 0.01), row(1, 0.5, 8, 0.02), row(3, 0.9, 6, 0.03), row(10, 1.0, 4, 0.05)]
    assert evaluate.sampler_bar("ddim", rows, 48)["met"]
    rows[2]["accuracy"] = 0.46  # a drop within two images' share (of 48) is noise; more is no steady rise
    assert evaluate.sampler_bar("ddim", rows, 48)["met"]
    rows[2]["accuracy"] = 0.44
    assert not evaluate.sampler_bar("ddim", rows, 48)["met"]
    rows[2]["accuracy"] = 0.9
    rows[3]["saturated"] = 0.30  # blobs at the largest scale ...
    assert not evaluate.sampler_bar("ddim", rows, 48)["met"]
    bar = evaluate.sampler_bar("ddim", rows + [row(10, 1.0, 4, 0.02, guard=0.995)], 48)
    assert bar["met"] and "with dynamic thresholding" in bar["measured"]  # ... that the guard removes
    rows[3]["saturated"], rows[3]["diversity"] = 0.05, 9.5  # diversity must fall
    assert not evaluate.sampler_bar("ddim", rows, 48)["met"]


def test_trade_off_rule():
    rows = [{"scale": s, "accuracy": a, "precision": p, "diversity": d, "recall": r}
            for s, a, p, d, r in [(0, 0.2, 0.5, 9.0, 0.8), (3, 0.95, 0.7, 6.0, 0.5), (1, 0.6, 0.4, 8.0, 0.7)]]
    t = evaluate.trade_off(rows)
    assert t["met"] and t["scales"] == [0, 3]
    assert t["monotone"] == {"accuracy": True, "precision": False, "diversity": True, "recall": True}
    rows[1]["recall"] = 0.9  # recall rises with the scale: no trade-off
    assert not evaluate.trade_off(rows)["met"]
    rows[1]["recall"] = 0.5
    for row in rows:  # accuracy 100% at every scale cannot rise: saturated, not a failure
        row["accuracy"] = 1.0
    t = evaluate.trade_off(rows)
    assert t["met"] and t["saturated"] == ["accuracy"]
    rows[0]["accuracy"] = 0.99  # rising to 100% is a rise; falling from 100% is not
    assert evaluate.trade_off(rows)["met"]
    rows[0]["accuracy"], rows[1]["accuracy"] = 1.0, 0.98
    assert not evaluate.trade_off(rows)["met"]


def test_missing_models_are_skipped_with_a_reason(checkpoints, tmp_path, capsys):
    root = tmp_path / "ckpt"
    root.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(checkpoints / f"{evaluate.BASE}{suffix}", root)
    assert evaluate.main(["--checkpoints", str(root), "--quick", "--device", "cpu"]) == 0
    report = json.loads((root / "model_card.json").read_text())
    card = (root / "README.md").read_text()
    assert set(report["missing"]) == {evaluate.CLASSIFIER, evaluate.EVALUATOR, evaluate.UPSAMPLER}
    assert report["guidance_sweep"] is None and report["upsampler"] is None
    assert all(b["met"] is None for b in report["bars"])
    assert "scenes32_evaluator not found" in card and "not evaluated" in card
    assert "skipping: scenes128_upsampler not found" in capsys.readouterr().err


def test_samples_do_not_depend_on_the_batch_size(checkpoints):
    registry = ModelRegistry(checkpoints, device="cpu")
    labels = evaluate.balanced_labels(5, 8)
    settings = evaluate.EvalSettings(samples=5, respacing="3")
    whole = evaluate.sample_base(registry, replace(settings, batch=5), labels, 3.0, 0.0)
    split = evaluate.sample_base(registry, replace(settings, batch=2), labels, 3.0, 0.0)
    assert whole.shape == (5, 32, 32, 3) and whole.dtype == np.uint8
    assert np.array_equal(whole, split)


def test_held_out_renders_are_balanced_and_fixed_by_their_seed():
    labels = evaluate.balanced_labels(16, 8)
    assert np.bincount(labels.numpy()).tolist() == [2] * 8
    real = evaluate.real_renders(10_000, labels)
    assert real.shape == (16, 32, 32, 3) and real.dtype == np.uint8
    assert np.array_equal(real, evaluate.real_renders(10_000, labels))
    assert not np.array_equal(real, evaluate.real_renders(10_001, labels))


def test_models_not_trained_on_the_scenes_are_not_graded_against_them(checkpoints, tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    for name in (evaluate.BASE, evaluate.EVALUATOR):
        shutil.copy(checkpoints / f"{name}.safetensors", root)
        desc = json.loads((checkpoints / f"{name}.json").read_text())
        if name == evaluate.BASE:
            desc["training"]["data"] = "photos/"
        (root / f"{name}.json").write_text(json.dumps(desc))
    report = evaluate.evaluate(root, root, evaluate.EvalSettings(samples=8), "test", "cpu")
    assert "trained on photos/" in report["missing"][evaluate.BASE]
    assert report["models"][evaluate.BASE]["training"]["data"] == "photos/"
    assert report["guidance_sweep"] is None
