"""Schedules, respacing and q_sample against the original guided-diffusion outputs."""
import numpy as np
import pytest
import torch

from explore.schedules import RespacingError, Schedule, named_betas, space_timesteps

REF = np.load("tests/fixtures/diffusion_outputs.npz")
SPECS = sorted({k[len("respace_"):-len("_use_timesteps")] for k in REF.files if k.endswith("_use_timesteps")})


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_arrays_match_original(name):
    sched = Schedule.named(name, 1000)
    for field in ["betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                  "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]:
        np.testing.assert_allclose(getattr(sched, field), REF[f"sched_{name}_{field}"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("key", SPECS)
def test_respacing_lists_and_betas_match_original(key):
    spec = key.replace("_", ",")
    assert space_timesteps(1000, spec) == REF[f"respace_{key}_use_timesteps"].tolist()
    for name in ["linear", "cosine"]:
        sched = Schedule.named(name).respace(spec)
        np.testing.assert_array_equal(sched.timesteps, REF[f"respace_{key}_use_timesteps"])
        np.testing.assert_allclose(sched.betas, REF[f"respace_{key}_{name}_betas"], rtol=1e-12)
        np.testing.assert_allclose(sched.alphas_cumprod, REF[f"respace_{key}_{name}_alphas_cumprod"], rtol=1e-12)


def test_readme_examples():
    assert space_timesteps(1000, "250")[:4] == [0, 4, 8, 12]
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    ts = space_timesteps(1000, "10,15,20")
    assert len(ts) == 45 and ts[9:11] == [333, 334]


def test_round_half_even_cases_differ_from_naive():
    ts = space_timesteps(1000, "25")
    assert 166 in ts and 832 in ts and 167 not in ts and 833 not in ts


@pytest.mark.parametrize("spec,message", [
    ("ddim999", "cannot create exactly 999 steps"),
    ("ddim0", "cannot create exactly 0 steps"),
    ("1001", "cannot divide section of 1000 steps into 1001"),
    ("600,600", "cannot divide section of 500 steps into 600"),
    ("abc", "not a whole number"),
    ("10,,5", "not a whole number"),
    ("0", "at least 1"),
])
def test_impossible_specs_raise_clear_errors(spec, message):
    with pytest.raises(RespacingError, match=message):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_matches_original(name):
    x0, noise, t = (torch.from_numpy(REF[k]) for k in ["qsample_x_start", "qsample_noise", "qsample_t"])
    out = Schedule.named(name).q_sample(x0, t, noise)
    torch.testing.assert_close(out, torch.from_numpy(REF[f"qsample_{name}_out"]), atol=1e-6, rtol=0)
    respaced = Schedule.named(name).respace("10")
    out = respaced.q_sample(x0, torch.tensor([0, 3, 6, 9]), noise)
    torch.testing.assert_close(out, torch.from_numpy(REF[f"qsample_{name}_respaced10_out"]), atol=1e-6, rtol=0)


def test_linear_betas_scale_with_step_count():
    betas = named_betas("linear", 100)
    assert betas[0] == pytest.approx(1e-3) and betas[-1] == pytest.approx(0.2)


def test_timestep_for_sigma_inverts_schedule():
    sched = Schedule.named("cosine")
    t = sched.timestep_for_sigma(sched.sigmas[[0, 10, 500, 999]])
    np.testing.assert_allclose(t, [0, 10, 500, 999], atol=1e-6)
