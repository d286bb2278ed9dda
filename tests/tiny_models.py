"""Tiny random-weight models (16 px, width 32) saved as the project's own checkpoints, for engine and CLI tests."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from explore.models.adm import EncoderUNetModel, SuperResModel, UNetModel
from explore.models.configs import ClassifierConfig, DiffusionConfig, UNetConfig
from explore.registry import ModelRegistry
from explore.zoo import save_checkpoint

SIZE, SMALL = 16, 8
CLASSES = 4  # real classes; the class-conditional base model has one more label, the null class
BASE = UNetConfig(image_size=SIZE, model_channels=32, out_channels=6, num_res_blocks=1, attention_ds=(2,),
                  channel_mult=(1, 2), num_classes=CLASSES + 1, num_heads=2, use_new_attention_order=True)
UNCOND = replace(BASE, num_classes=None)
SUPERRES = UNetConfig(image_size=SIZE, model_channels=32, out_channels=6, num_res_blocks=1, attention_ds=(2,),
                      channel_mult=(1, 2), num_classes=CLASSES, num_heads=2, super_res=True)
CLASSIFIER = ClassifierConfig(image_size=SIZE, model_channels=32, out_channels=CLASSES, num_res_blocks=1,
                              attention_ds=(2,), channel_mult=(1, 2), num_head_channels=32, pool="attention")
COSINE = DiffusionConfig(noise_schedule="cosine", learn_sigma=True)
LINEAR = DiffusionConfig(noise_schedule="linear", learn_sigma=True)
NAMES = ["alpine", "desert", "ocean", "forest"]


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (also the zero-initialised output layers), scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(z / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm gains
                p.copy_(1 + 0.1 * z)
            else:
                p.copy_(0.1 * z)
    return module.eval().requires_grad_(False)


def build(seed: int = 0) -> dict[str, torch.nn.Module]:
    return {
        "cond": randomize(UNetModel(BASE), seed),
        "uncond": randomize(UNetModel(UNCOND), seed + 1),
        "classifier": randomize(EncoderUNetModel(CLASSIFIER), seed + 2),
        "superres": randomize(SuperResModel(SUPERRES), seed + 3),
    }


def save_all(directory: Path, seed: int = 0) -> dict[str, Path]:
    """tiny_cond (null class 4, cosine), tiny_uncond, tiny_classifier, tiny_sr (8 -> 16 px, linear)."""
    modules = build(seed)
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "cond": save_checkpoint(modules["cond"], directory / "tiny_cond.safetensors",
                                {"diffusion_config": COSINE, "class_names": NAMES, "null_class": CLASSES}),
        "uncond": save_checkpoint(modules["uncond"], directory / "tiny_uncond.safetensors",
                                  {"diffusion_config": COSINE}),
        "classifier": save_checkpoint(modules["classifier"], directory / "tiny_classifier.safetensors",
                                      {"class_names": NAMES}),
        "superres": save_checkpoint(modules["superres"], directory / "tiny_sr.safetensors",
                                    {"kind": "superres", "diffusion_config": LINEAR, "small_size": SMALL}),
    }


def registry(directory: Path) -> ModelRegistry:
    return ModelRegistry(root=directory, device="cpu")
