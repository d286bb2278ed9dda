"""What a classifier says about clean images: the evaluation classifier, or a noisy classifier at t = 0."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from explore.registry import Entry


@dataclass(frozen=True)
class Classified:
    """A classifier's view of a batch of images."""

    probs: Tensor  # float32 [N, classes] softmax probabilities, on the classifier's device
    features: Tensor | None  # [N, D] penultimate features of an evaluator (for distances); None for classifiers


def classify(entry: Entry, images: Tensor) -> Classified:
    """Class probabilities of images [N, 3, H, W] in [-1, 1] from a registry entry of kind evaluator or classifier.

    Images are resized to the classifier's size (area when shrinking, bilinear when enlarging); a noisy classifier
    is asked at t = 0.
    """
    if entry.kind not in ("evaluator", "classifier"):
        raise ValueError(f"{entry.name} is a {entry.kind} model, not a classifier")
    module = entry.module
    x = images.to(next(module.parameters()).device)
    size = entry.image_size
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")
    with torch.no_grad():
        if entry.kind == "evaluator":
            features = module.features(x)
            logits = module.head(features)
        else:
            features, logits = None, module(x, torch.zeros(len(x), dtype=torch.int64, device=x.device))
    return Classified(torch.softmax(logits.float(), -1), features)
