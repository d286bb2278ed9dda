"""classify(): clean images through the evaluation classifier, or a noisy classifier at t = 0, at its size."""
import pytest
import torch
import torch.nn.functional as F

from explore.classify import classify
from explore.models.evaluator import EvalClassifier, EvalClassifierConfig
from explore.zoo import save_checkpoint

import tiny_models
from tiny_models import CLASSES, SIZE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save_all(directory)
    evaluator = tiny_models.randomize(EvalClassifier(EvalClassifierConfig(num_classes=CLASSES)), 4)
    save_checkpoint(evaluator, directory / "tiny_eval.safetensors", {"class_names": tiny_models.NAMES})
    return tiny_models.registry(directory)


def images(size, n=3):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1


@pytest.mark.parametrize("size,mode", [(SIZE, None), (2 * SIZE, "area"), (SIZE // 2, "bilinear")])
def test_a_noisy_classifier_is_asked_at_t0_at_its_own_size(registry, size, mode):
    entry = registry.get("tiny_classifier")
    x = images(size)
    seen = classify(entry, x)
    resized = x if mode is None else F.interpolate(x, size=(SIZE, SIZE), mode=mode)
    expected = torch.softmax(entry.module(resized, torch.zeros(len(x), dtype=torch.int64)), -1)
    torch.testing.assert_close(seen.probs, expected, atol=0, rtol=0)
    assert seen.features is None


def test_an_evaluator_gives_probabilities_and_its_features(registry):
    entry = registry.get("tiny_eval")
    x = images(64)
    seen = classify(entry, x)
    with torch.no_grad():
        torch.testing.assert_close(seen.probs, torch.softmax(entry.module(x), -1), atol=0, rtol=0)
        torch.testing.assert_close(seen.features, entry.module.features(x), atol=0, rtol=0)
    torch.testing.assert_close(seen.probs.sum(-1), torch.ones(len(x)))


def test_a_diffusion_model_is_refused(registry):
    with pytest.raises(ValueError, match="not a classifier"):
        classify(registry.get("tiny_cond"), images(SIZE))
