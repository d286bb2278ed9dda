"""The evaluation classifier: trained on clean images only and never used for guidance.

Its penultimate features serve for feature-space distances (Frechet distance,
precision / recall), so guidance is not graded by the model it optimises against.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EvalClassifierConfig:
    num_classes: int  # number of classes
    width: int = 32  # channels of the first stage (doubled at each of the three stages)
    feature_dim: int = 128  # size of the feature vector used for distances

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalClassifierConfig":
        return cls(**d)


def _stage(ch_in: int, ch_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch_in, ch_out, 3, padding=1), nn.GroupNorm(8, ch_out), nn.SiLU(),
                         nn.Conv2d(ch_out, ch_out, 3, padding=1), nn.GroupNorm(8, ch_out), nn.SiLU())


class EvalClassifier(nn.Module):
    """A small VGG-style CNN: three conv stages, global average pool, feature layer, logits."""

    def __init__(self, cfg: EvalClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.stages = nn.ModuleList([_stage(3, w), _stage(w, 2 * w), _stage(2 * w, 4 * w)])
        self.feature = nn.Linear(4 * w, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1] (any size; resized to 32x32)."""
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="area")
        h = x
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.stages) - 1:
                h = F.avg_pool2d(h, 2)
        return F.silu(self.feature(h.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
