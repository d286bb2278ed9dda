"""Guidance wrappers compose in either order: classifier guidance inside classifier-free guidance gives the same
steps as outside it (the order engine.plan() uses), on every CFG path, through the real samplers."""
import pytest
import torch

from explore.denoisers import ADMDenoiser, Cond, FixedBatch
from explore.guidance import ClassifierFreeGuidance, ClassifierGuidance
from explore.noise import PerImageNoise
from explore.samplers import SAMPLERS
from explore.schedules import Grid

import tiny_models
from tiny_models import CLASSES, SIZE

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = torch.tensor([1, 3])
CLASSIFIER_SCALE = 4.0


@pytest.fixture(scope="module")
def networks():
    modules = tiny_models.build()
    # The classifier sees B rows outside CFG and 2B inside (both stacked halves); one row per call keeps
    # each row's bits independent of that, as plan() evaluates it on CPU.
    return {"cond": ADMDenoiser(modules["cond"], learn_sigma=True),
            "uncond": ADMDenoiser(modules["uncond"], learn_sigma=True, class_cond=False),
            "classifier": FixedBatch(modules["classifier"], 1)}


def steps(denoiser, sampler):
    grid = Grid.make("cosine", "4")
    noise = PerImageNoise.from_seed(5, len(LABELS), (3, SIZE, SIZE))
    return list(SAMPLERS[sampler](denoiser, noise.initial(), grid, Cond(labels=LABELS), noise))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])  # mean shift; score form (VP and VE)
@pytest.mark.parametrize("path", ["null class", "two models"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("method", ["standard", "conflict"])
def test_classifier_guidance_inside_cfg_equals_outside(networks, sampler, path, cfg_scale, method):
    two = {"uncond_denoiser": networks["uncond"]} if path == "two models" else {"null_class": CLASSES}

    def classifier_guided(denoiser):
        return ClassifierGuidance(denoiser, networks["classifier"], CLASSIFIER_SCALE, method)

    outside = steps(classifier_guided(ClassifierFreeGuidance(networks["cond"], cfg_scale, **two)), sampler)
    inside = steps(ClassifierFreeGuidance(classifier_guided(networks["cond"]), cfg_scale, **two), sampler)
    for a, b in zip(outside, inside, strict=True):
        assert a.guidance is not None and a.guidance.abs().max() > 0  # the classifier did steer
        for name in ("x", "pred_x0", "eps", "guidance"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=0, rtol=0, msg=name)
        assert b.stats.keys() == a.stats.keys()
        assert ("cfg_delta_norm" in a.stats) == (cfg_scale == 3.0)
        for key in a.stats:
            torch.testing.assert_close(b.stats[key], a.stats[key], atol=0, rtol=0, msg=key)


def test_inside_cfg_the_classifier_aims_at_the_requested_class_not_the_null_label(networks):
    """At scale 0 the network sees the null label; the classifier's log p is still that of LABELS."""
    seen = []

    def classifier(x, t):
        logits = networks["classifier"](x, t)
        seen.append(logits)
        return logits

    den = ClassifierFreeGuidance(ClassifierGuidance(networks["cond"], classifier, 1.0), 0.0, null_class=CLASSES)
    x, t = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    pred = den(x, t, Cond(labels=LABELS))
    expected = torch.log_softmax(seen[0].float(), -1)[torch.arange(2), LABELS]
    torch.testing.assert_close(pred.stats["log_prob"], expected.detach(), atol=0, rtol=0)
