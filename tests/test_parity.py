"""The engine reproduces guided-diffusion's adm32 runs (shared/reference) step by step and whole."""
import numpy as np
import pytest
import torch

from explore.denoisers import ADMDenoiser, Cond
from explore.noise import BatchNoise, RecordedNoise
from explore.samplers import Grid, sample_ddim, sample_ddpm
from explore.zoo import load_model

from floors import FACTOR, FLOOR_DDIM_LOOP, FLOOR_FORWARD, FLOOR_P10_LOOP, FLOOR_STEP

REF = np.load("tests/fixtures/adm32_outputs.npz")
# Each bound below is FACTOR (10, floors.py: "a different but correct operator order can cost a few times the
# floor") x a float floor of the computation that ../shared/reference/README.md measured (floors.py)
FLAGS = "--image_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 2 --attention_resolutions 16 " \
        "--channel_mult 1,2 --learn_sigma True --resblock_updown True --use_scale_shift_norm True"


@pytest.fixture(scope="module")
def adm32():
    loaded = load_model("tests/fixtures/adm32.pt", flags=FLAGS)
    return ADMDenoiser(loaded.module, learn_sigma=True, class_cond=False), loaded


def ref(name):
    return torch.from_numpy(REF[name])


def report(name, err):
    print(f"parity {name}: max abs error {err:.3g}")


def test_forward(adm32):
    _, loaded = adm32
    with torch.no_grad():
        out = loaded.module(ref("fwd_x"), ref("fwd_t"))
    err = (out - ref("fwd_out")).abs().max().item()
    report("forward", err)
    assert err < FACTOR * FLOOR_FORWARD


def test_timestep_maps(adm32):
    assert Grid.make("linear", "ddim10").schedule.timesteps.tolist() == REF["timestep_map_ddim10"].tolist()
    assert Grid.make("linear", "10").schedule.timesteps.tolist() == REF["timestep_map_10"].tolist()


@pytest.mark.parametrize("sampler,respacing,prefix", [(sample_ddpm, "10", "p10"), (sample_ddim, "ddim10", "ddim10")],
                         ids=["ancestral", "ddim"])
def test_steps_replayed_from_stored_inputs(adm32, sampler, respacing, prefix):
    """Each step from the stored input with the stored noise: the sample and pred_x0.

    pred_x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps amplifies eps's float error by
    sqrt(1/abar) (~156 at t=999 on the linear schedule), so its error divided by that is an eps error,
    bounded by the forward floor; x is bounded by the single-step floor.
    """
    denoiser, _ = adm32
    grid = Grid.make("linear", respacing)
    samples, worst_x, worst_x0 = ref(f"{prefix}_samples"), 0.0, 0.0
    for s in range(10):
        x_in = ref("x_T") if s == 0 else samples[s - 1]
        step = next(sampler(denoiser, x_in, grid.from_step(s), Cond(), RecordedNoise(x_in, ref("p10_noise"))))
        amplification = grid.schedule.sqrt_recip_alphas_cumprod[9 - s]
        worst_x = max(worst_x, (step.x - samples[s]).abs().max().item())
        worst_x0 = max(worst_x0, (step.pred_x0 - ref(f"{prefix}_pred_xstart")[s]).abs().max().item() / amplification)
    report(f"{prefix} step-by-step x", worst_x)
    report(f"{prefix} step-by-step pred_x0 / sqrt(1/abar)", worst_x0)
    assert worst_x < FACTOR * FLOOR_STEP and worst_x0 < FACTOR * FLOOR_FORWARD


def test_ancestral_whole_loop_with_seeded_noise(adm32):
    denoiser, _ = adm32
    grid = Grid.make("linear", "10")
    noise = BatchNoise(int(REF["p10_seed"][0]), (2, 3, 32, 32), x_T=ref("x_T"))
    steps = list(sample_ddpm(denoiser, noise.initial(), grid, Cond(), noise))
    err = max((st.x - ref("p10_samples")[i]).abs().max().item() for i, st in enumerate(steps))
    report("ancestral whole loop", err)
    assert err < FACTOR * FLOOR_P10_LOOP


def test_ddim_whole_loop(adm32):
    """x against the loop's floor; pred_x0 / sqrt(1/abar) (an x-sized error, see the step replay) too."""
    denoiser, _ = adm32
    grid = Grid.make("linear", "ddim10")
    noise = BatchNoise(int(REF["ddim10_seed"][0]), (2, 3, 32, 32), x_T=ref("x_T"))
    steps = list(sample_ddim(denoiser, noise.initial(), grid, Cond(), noise))
    err = max((st.x - ref("ddim10_samples")[i]).abs().max().item() for i, st in enumerate(steps))
    err_x0 = max((st.pred_x0 - ref("ddim10_pred_xstart")[i]).abs().max().item()
                 / grid.schedule.sqrt_recip_alphas_cumprod[9 - i] for i, st in enumerate(steps))
    report("ddim whole loop", err)
    report("ddim pred_x0 / sqrt(1/abar)", err_x0)
    assert err < FACTOR * FLOOR_DDIM_LOOP and err_x0 < FACTOR * FLOOR_DDIM_LOOP
