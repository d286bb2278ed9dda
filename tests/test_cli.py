"""The command line: official flags pasted verbatim, the original's sample files, extras, super-res, bad input.

Most runs call explore.__main__.main in-process (the same code path, without ~4 s of import per run);
two go through `python -m explore` in a subprocess, exactly as a user runs them.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import explore.__main__ as cli
from explore.__main__ import main, recipe_from_command
from explore.engine import Recipe, run
from explore.noise import PerImageNoise, Recorder
from explore.outputs import read_png_recipe, to_uint8

import tiny_models
from tiny_models import SIZE, SMALL

ADM32 = "tests/fixtures/adm32.pt"
MODEL_FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 2 --attention_resolutions 16 "
               "--channel_mult 1,2 --learn_sigma True --resblock_updown True --use_scale_shift_norm True").split()
SAMPLE_FLAGS = "--timestep_respacing 10 --num_samples 3 --batch_size 2 --use_ddim True".split()
ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = tiny_models.save_all(tmp_path_factory.mktemp("tiny"))
    return {name: str(path) for name, path in paths.items()}


def cli_run(capsys, *argv):
    """main(argv) in-process: (exit code, stdout, non-empty stderr lines)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def load_npz(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_official_flags_pasted_verbatim_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "user"
    proc = subprocess.run([sys.executable, "-m", "explore", "sample", "--model_path", ADM32, *MODEL_FLAGS,
                           *SAMPLE_FLAGS, "--seed", "5", "--device", "cpu", "--out_dir", str(out_dir)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"saved 3 samples to {out_dir / 'samples_3x32x32x3.npz'}" in proc.stdout
    assert "sampling" in proc.stderr and "100%" in proc.stderr and "30/30" in proc.stderr  # the progress bar
    arrays = load_npz(out_dir / "samples_3x32x32x3.npz")
    assert list(arrays) == ["arr_0"]  # unconditional: no labels
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (3, 32, 32, 3)

    recipe = Recipe.from_json(read_png_recipe(out_dir / "samples_3x32x32x3.png"))
    assert recipe == Recipe(model=ADM32, sampler="ddim", respacing="10", seed=5, batch_size=3)
    with Image.open(out_dir / "samples_3x32x32x3.png") as png:
        command = png.text["command"]
        assert png.size == (2 * 128, 2 * 128)  # 2 x 2 grid, 32 px cells enlarged 4x
    assert recipe_from_command(command) == recipe and " ".join(MODEL_FLAGS) in command

    # the same seed in one batch of 3 (in-process) gives the same images: image i uses seed + i
    code, _, _ = cli_run(capsys, "sample", "--model_path", ADM32, *MODEL_FLAGS, *SAMPLE_FLAGS[:-4],
                         "--batch_size", "3", "--use_ddim", "True", "--seed", "5", "--out_dir", tmp_path / "one")
    assert code == 0
    np.testing.assert_array_equal(load_npz(tmp_path / "one" / "samples_3x32x32x3.npz")["arr_0"], arrays["arr_0"])


@pytest.mark.parametrize("extra,expected", [
    (["--timestep_respacing", "ddim999"], "error: --timestep_respacing: cannot create exactly 999 steps"),
    (["--model_path", "missing/adm.pt"], "error: model file missing/adm.pt does not exist"),
])
def test_bad_input_in_a_real_process_is_one_line_and_exit_code_2(tmp_path, extra, expected):
    proc = subprocess.run([sys.executable, "-m", "explore", "sample", "--model_path", ADM32, *MODEL_FLAGS,
                           "--num_samples", "1", *extra, "--out_dir", str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


BAD_INPUTS = [
    (["--timestep_respacing", "10,x"], "--timestep_respacing: respacing '10,x': 'x' is not a whole number"),
    (["--num_chanels", "32"], "unknown flag --num_chanels (did you mean --num_channels?)"),
    (["--seed"], "--seed needs a value"),
    (["oops"], "expected a --flag, got 'oops'"),
    (["--num_channels", "64"], "yours differ in --num_channels 64 -> 32"),
    (["--channel_mult", "1,2,2"], "adm32.pt: the weights do not fit the diffusion model built from"),
    (["--class_label", "3"], "--class_label: 'tests/fixtures/adm32.pt' is unconditional"),
    (["--cfg_scale", "3"], "--cfg_scale: 'tests/fixtures/adm32.pt' is unconditional"),
    (["--cfg_scale", "nan"], "--cfg_scale: nan is outside the accepted range"),
    (["--eta", "inf", "--sampler", "ddim"], "--eta: inf is outside the accepted range"),
    (["--sampler", "plms"], "--sampler: 'plms' is not one of ddpm, ddim"),
    (["--seed", "abc"], "--seed expects a whole number, got 'abc'"),
    (["--num_samples", "0"], "--num_samples and --batch_size must be at least 1"),
    (["--use_ddim", "maybe"], "--use_ddim expects True or False, got 'maybe'"),
    (["--device", "cuda"], "--device cuda was asked for but no CUDA GPU is available"),
    (["--device", "toaster"], "--device 'toaster' is not a device"),
    (["--noise", "missing.npz"], "--noise: missing.npz does not exist"),
    (["--precision", "fp8"], "--precision: 'fp8' is not one of fp32, bf16, fp16"),
    (["--karras", "True"], "--karras: Karras sigmas apply to euler"),
]


@pytest.mark.parametrize("extra,expected", BAD_INPUTS, ids=[" ".join(e) for e, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, capsys, extra, expected):
    code, out, err = cli_run(capsys, "sample", "--model_path", ADM32, *MODEL_FLAGS, "--timestep_respacing", "2",
                             "--num_samples", "1", *extra, "--out_dir", tmp_path)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_bad_input_for_tiny_models(tmp_path, capsys, tiny):
    cases = [
        (["sample", "--model_path", tiny["cond"], "--class_label", "4"], "--class_label: 4 is outside [0, 3]"),
        (["sample", "--model_path", tiny["cond"], "--classifier_path", tiny["classifier"],
          "--classifier_scale", "nan"], "--classifier_scale: nan is outside"),
        (["sample", "--model_path", tiny["classifier"]], "is a classifier, not a diffusion model"),
        (["sample", "--model_path", tiny["cond"], "--cfg_scale", "2", "--uncond_model_path", tiny["cond"]],
         "--uncond_model_path: "),
        (["super-res", "--model_path", tiny["cond"], "--base_samples", tmp_path],
         "is a diffusion model, not an upsampler"),
        (["super-res", "--model_path", tiny["superres"]], "--model_path and --base_samples are required"),
        (["super-res", "--model_path", tiny["superres"], "--base_samples", tmp_path / "none.npz"], "does not exist"),
        (["super-res", "--model_path", tiny["superres"], "--base_samples", tmp_path], "no images"),
        (["render"], "unknown command 'render'"),
    ]
    for argv, expected in cases:
        code, out, err = cli_run(capsys, *argv, "--timestep_respacing", "2", "--out_dir", tmp_path)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (argv, err)


def test_help_lists_the_extras(capsys):
    assert main(["--help"]) == 0 and "--cfg_scale" in capsys.readouterr().out
    assert main(["sample", "--help"]) == 0 and "--noise" in capsys.readouterr().out


# --- extras on tiny random models ------------------------------------------------------------------

def engine_uint8(recipe, registry):
    return to_uint8(run(recipe, registry).x)


def test_class_label_sampler_and_seed_match_the_engine(tmp_path, capsys, tiny):
    code, out, _ = cli_run(capsys, "sample", "--model_path", tiny["cond"], "--class_label", 2, "--sampler", "euler",
                           "--timestep_respacing", 5, "--num_samples", 3, "--batch_size", 2, "--seed", 7,
                           "--device", "cpu", "--out_dir", tmp_path)
    assert code == 0 and "saved 3 samples" in out
    arrays = load_npz(tmp_path / f"samples_3x{SIZE}x{SIZE}x3.npz")
    assert arrays["arr_1"].dtype == np.int64 and arrays["arr_1"].tolist() == [2, 2, 2]
    registry = tiny_models.registry(Path(tiny["cond"]).parent)
    expected = engine_uint8(Recipe(model="tiny_cond", class_label=2, sampler="euler", respacing="5", seed=7,
                                   batch_size=3), registry)
    np.testing.assert_array_equal(arrays["arr_0"], expected)


def test_cfg_scale_with_the_null_class_and_with_an_unconditional_model(tmp_path, capsys, tiny):
    common = ["--model_path", tiny["cond"], "--class_label", 1, "--timestep_respacing", 4, "--num_samples", 2,
              "--seed", 3, "--use_ddim", "True"]
    images = {}
    for name, extra in {"plain": [], "null": ["--cfg_scale", 3], "two": ["--cfg_scale", 3, "--uncond_model_path",
                                                                         tiny["uncond"]]}.items():
        assert cli_run(capsys, "sample", *common, *extra, "--out_dir", tmp_path / name)[0] == 0
        images[name] = load_npz(tmp_path / name / f"samples_2x{SIZE}x{SIZE}x3.npz")["arr_0"]
    registry = tiny_models.registry(Path(tiny["cond"]).parent)
    base = dict(model="tiny_cond", class_label=1, sampler="ddim", respacing="4", seed=3, batch_size=2)
    np.testing.assert_array_equal(images["null"], engine_uint8(Recipe(**base, cfg_scale=3.0), registry))
    np.testing.assert_array_equal(images["two"], engine_uint8(
        Recipe(**base, cfg_scale=3.0, uncond_model="tiny_uncond"), registry))
    assert not np.array_equal(images["plain"], images["null"]) and not np.array_equal(images["null"], images["two"])


def test_classifier_guidance_writes_labels_even_for_an_unconditional_model(tmp_path, capsys, tiny):
    code, _, _ = cli_run(capsys, "sample", "--model_path", tiny["uncond"], "--classifier_path", tiny["classifier"],
                         "--classifier_scale", 2, "--class_label", 3, "--timestep_respacing", 3, "--num_samples", 2,
                         "--out_dir", tmp_path)
    assert code == 0
    assert load_npz(tmp_path / f"samples_2x{SIZE}x{SIZE}x3.npz")["arr_1"].tolist() == [3, 3]


def test_noise_file_gives_x_T_and_optionally_every_step(tmp_path, capsys, tiny):
    common = ["--model_path", tiny["cond"], "--class_label", 0, "--timestep_respacing", 4, "--seed", 12]
    assert cli_run(capsys, "sample", *common, "--num_samples", 3, "--out_dir", tmp_path / "seeded")[0] == 0
    seeded = load_npz(tmp_path / "seeded" / f"samples_3x{SIZE}x{SIZE}x3.npz")["arr_0"]

    # x_T alone (what the seeds would draw): the per-step noise still comes from the seeds
    x_T = PerImageNoise.from_seed(12, 3, (3, SIZE, SIZE)).initial()
    np.savez(tmp_path / "x_T.npz", x_T=x_T.numpy())
    code, _, _ = cli_run(capsys, "sample", *common, "--noise", tmp_path / "x_T.npz", "--batch_size", 2,
                         "--out_dir", tmp_path / "x_T")
    assert code == 0  # the file's 3 images set the count
    np.testing.assert_array_equal(load_npz(tmp_path / "x_T" / f"samples_3x{SIZE}x{SIZE}x3.npz")["arr_0"], seeded)

    # x_T and every step recorded from other seeds: the file decides, whatever --seed says
    recorder = Recorder(PerImageNoise.from_seed(500, 2, (3, SIZE, SIZE)))
    recorder.initial()
    for s in range(4):
        recorder.step(s)
    recorder.save(tmp_path / "all.npz")
    np.save(tmp_path / "x_T.npy", recorder.x_T.numpy())
    assert cli_run(capsys, "sample", *common, "--noise", tmp_path / "all.npz", "--out_dir", tmp_path / "all")[0] == 0
    registry = tiny_models.registry(Path(tiny["cond"]).parent)
    expected = engine_uint8(Recipe(model="tiny_cond", class_label=0, respacing="4", seed=500, batch_size=2), registry)
    np.testing.assert_array_equal(load_npz(tmp_path / "all" / f"samples_2x{SIZE}x{SIZE}x3.npz")["arr_0"], expected)

    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8, 8), np.float32))
    code, _, err = cli_run(capsys, "sample", *common, "--noise", tmp_path / "small.npy", "--out_dir", tmp_path)
    assert code == 2 and err == ["error: --noise: x_T has shape [1, 3, 8, 8], this run needs [1, 3, 16, 16]"]
    code, _, err = cli_run(capsys, "sample", *common, "--noise", tmp_path / "all.npz", "--timestep_respacing", 6,
                           "--out_dir", tmp_path)
    assert code == 2 and err == ["error: --noise holds 4 steps of noise; ddpm with --timestep_respacing 6 needs 6"]
    code, _, err = cli_run(capsys, "sample", *common, "--noise", tmp_path / "x_T.npy", "--num_samples", 5,
                           "--out_dir", tmp_path)
    assert code == 2 and err == ["error: --noise holds x_T for 2 images, 5 are asked for"]


# --- super-res ---------------------------------------------------------------------------------------

LOW = np.random.default_rng(4).integers(0, 256, (3, SMALL, SMALL, 3), dtype=np.uint8)
LABELS = np.array([0, 1, 3])


@pytest.fixture
def fed(monkeypatch):
    """Records the low_res and labels the CLI hands to the engine."""
    seen = []
    real_plan = cli.plan

    def spy(recipe, registry, noise=None, low_res=None, labels=None):
        seen.append((low_res, labels))
        return real_plan(recipe, registry, noise=noise, low_res=low_res, labels=labels)
    monkeypatch.setattr(cli, "plan", spy)
    return seen


def super_res(capsys, tiny, source, out_dir, *extra):
    code, out, err = cli_run(capsys, "super-res", "--model_path", tiny["superres"], "--base_samples", source,
                             "--timestep_respacing", 3, "--batch_size", 2, "--seed", 1, *extra, "--out_dir", out_dir)
    return code, out, err, out_dir / f"samples_{len(LOW)}x{SIZE}x{SIZE}x3.npz"


def test_super_res_feeds_the_originals_low_res_and_labels(tmp_path, capsys, tiny, fed):
    np.savez(tmp_path / "nhwc.npz", LOW, LABELS)
    code, out, _, path = super_res(capsys, tiny, tmp_path / "nhwc.npz", tmp_path / "a")
    assert code == 0 and "saved 3 upsampled images" in out
    arrays = load_npz(path)
    assert list(arrays) == ["arr_0"] and arrays["arr_0"].shape == (3, SIZE, SIZE, 3)  # large size, as the original
    expected = (torch.from_numpy(LOW).float() / 127.5 - 1.0).permute(0, 3, 1, 2)  # super_res_sample.py
    assert torch.equal(torch.cat([low for low, _ in fed]), expected)
    assert torch.cat([labels for _, labels in fed]).tolist() == LABELS.tolist()

    np.savez(tmp_path / "nchw.npz", LOW.transpose(0, 3, 1, 2), LABELS)  # channels first: the same run
    assert super_res(capsys, tiny, tmp_path / "nchw.npz", tmp_path / "b")[0] == 0
    np.testing.assert_array_equal(load_npz(tmp_path / "b" / path.name)["arr_0"], arrays["arr_0"])


def test_super_res_without_labels(tmp_path, capsys, tiny, fed):
    np.savez(tmp_path / "unlabelled.npz", LOW)
    code, _, err, _ = super_res(capsys, tiny, tmp_path / "unlabelled.npz", tmp_path / "none")
    assert code == 2 and len(err) == 1 and "carry no labels" in err[0] and "--class_label" in err[0]

    code, _, _, path = super_res(capsys, tiny, tmp_path / "unlabelled.npz", tmp_path / "given", "--class_label", 2)
    assert code == 0 and load_npz(path)["arr_0"].shape == (3, SIZE, SIZE, 3)
    assert torch.cat([labels for _, labels in fed]).tolist() == [2, 2, 2]

    fed.clear()
    code, out, _, path = super_res(capsys, tiny, tmp_path / "unlabelled.npz", tmp_path / "predicted",
                                   "--classifier_path", tiny["classifier"])
    assert code == 0 and path.exists()
    predicted = torch.cat([labels for _, labels in fed]).tolist()
    assert f"labels from {tiny['classifier']}: {predicted}" in out and all(0 <= y < 4 for y in predicted)


def test_super_res_from_a_folder_of_pngs(tmp_path, capsys, tiny, fed):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(LOW):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    code, _, _, path = super_res(capsys, tiny, folder, tmp_path / "out", "--class_label", 1)
    assert code == 0 and load_npz(path)["arr_0"].shape == (3, SIZE, SIZE, 3)
    expected = (torch.from_numpy(LOW).float() / 127.5 - 1.0).permute(0, 3, 1, 2)
    assert torch.equal(torch.cat([low for low, _ in fed]), expected)


def test_super_res_refuses_inputs_it_cannot_use(tmp_path, capsys, tiny):
    np.savez(tmp_path / "big.npz", np.zeros((1, 12, 12, 3), np.uint8), np.array([0]))
    code, _, err, _ = super_res(capsys, tiny, tmp_path / "big.npz", tmp_path)
    assert code == 2 and err == ["error: --base_samples are 12x12 px but this upsampler expects 8x8 px"]
    np.savez(tmp_path / "labels.npz", LOW, np.array([0, 1, 7]))
    code, _, err, _ = super_res(capsys, tiny, tmp_path / "labels.npz", tmp_path)
    assert code == 2 and err == ["error: labels [7] are outside the upsampler's classes [0, 3]"]
    code, _, err, _ = super_res(capsys, tiny, tmp_path / "labels.npz", tmp_path, "--class_label", 9)
    assert code == 2 and err == ["error: labels [9] are outside the upsampler's classes [0, 3]"]
    np.savez(tmp_path / "evil.npz", np.array([object()], dtype=object))
    code, _, err, _ = super_res(capsys, tiny, tmp_path / "evil.npz", tmp_path)
    assert code == 2 and "pickled Python objects" in err[0]
