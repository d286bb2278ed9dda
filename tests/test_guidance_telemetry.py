"""The guidance telemetry's terms are what they claim: how much each guidance method changed x in a step, and the
step's whole deterministic change (drift), checked on samplers whose step is linear in eps (no x0 clamp)."""
import pytest
import torch

from explore.denoisers import ADMDenoiser, Cond, FixedBatch
from explore.guidance import ClassifierFreeGuidance, ClassifierGuidance, GuidanceInterval
from explore.noise import PerImageNoise
from explore.samplers import SAMPLERS
from explore.schedules import Grid

import tiny_models
from floors import EPS32, FACTOR
from tiny_models import CLASSES, SIZE

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = torch.tensor([1, 3])


@pytest.fixture(scope="module")
def networks():
    modules = tiny_models.build()
    return {"cond": ADMDenoiser(modules["cond"], learn_sigma=True),
            "classifier": FixedBatch(modules["classifier"], 1)}


def steps(denoiser, sampler, respacing="ddim4", **options):
    grid = Grid.make("cosine", respacing)
    noise = PerImageNoise.from_seed(5, len(LABELS), (3, SIZE, SIZE))
    return list(SAMPLERS[sampler](denoiser, noise.initial(), grid, Cond(labels=LABELS), noise, clip_denoised=False,
                                  **options))


def close(a, b, what, *operands):
    """a == b up to FACTOR x the rounding of the largest operand the two went through."""
    tolerance = FACTOR * EPS32 * max(1.0, *(float(t.abs().max()) for t in (a, b, *operands)))
    assert float((a - b).abs().max()) <= tolerance, (what, float((a - b).abs().max()), tolerance)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m"])
def test_the_cfg_term_is_the_change_classifier_free_guidance_made_to_the_first_step(networks, sampler):
    guided = steps(ClassifierFreeGuidance(networks["cond"], 3.0, null_class=CLASSES), sampler)[0]
    conditional = steps(networks["cond"], sampler)[0]  # CFG at scale 1 is the conditional model
    assert guided.cfg_guidance is not None and guided.cfg_guidance.abs().max() > 0 and conditional.cfg_guidance is None
    operands = (guided.x, conditional.x, guided.pred_x0, conditional.pred_x0)
    close(guided.x - conditional.x, guided.cfg_guidance, "x", *operands)
    close(guided.drift - conditional.drift, guided.cfg_guidance, "drift", *operands)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_the_drift_of_a_deterministic_sampler_is_its_whole_change_of_x(networks, sampler):
    trajectory = steps(ClassifierGuidance(networks["cond"], networks["classifier"], 5.0), sampler)
    x_T = PerImageNoise.from_seed(5, len(LABELS), (3, SIZE, SIZE)).initial()
    for before, step in zip([x_T, *[s.x for s in trajectory]], trajectory):
        close(step.x - before, step.drift, f"step {step.index}", step.x, before, step.pred_x0)
        assert step.guidance.abs().max() > 0


def test_ddim_and_euler_report_the_same_terms_on_the_same_grid(networks):
    denoiser = ClassifierGuidance(ClassifierFreeGuidance(networks["cond"], 2.0, null_class=CLASSES),
                                  networks["classifier"], 5.0)
    for a, b in zip(steps(denoiser, "ddim"), steps(denoiser, "euler"), strict=True):
        for name in ("x", "guidance", "cfg_guidance", "drift"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-4, msg=name)


def test_heun_averages_guidance_terms_when_an_interval_ends_inside_its_step(networks):
    guided = ClassifierGuidance(ClassifierFreeGuidance(networks["cond"], 2.0, null_class=CLASSES),
                                networks["classifier"], 5.0)
    grid = Grid.make("cosine", "ddim4")
    first, second = grid.times[0], grid.times[1]
    interval = GuidanceInterval(guided, networks["cond"], first, first)  # guides the first evaluation only
    only_first = steps(interval, "heun")[0]
    everywhere = steps(guided, "heun")[0]
    assert second < first
    # the step's terms average an evaluation with guidance and one without: half of a full step's own first half
    assert only_first.cfg_guidance is not None and only_first.guidance is not None
    assert float(only_first.cfg_guidance.abs().max()) < float(everywhere.cfg_guidance.abs().max())
