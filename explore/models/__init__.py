"""ADM networks, their configs and the released presets."""

from .adm import EncoderUNetModel, SuperResModel, UNetModel, timestep_embedding
from .configs import (
    ClassifierConfig,
    DiffusionConfig,
    UNetConfig,
    classifier_config_from_flags,
    diffusion_config_from_flags,
    parse_flag_args,
    superres_config_from_flags,
    unet_config_from_flags,
)
from .presets import PRESETS, Preset, SamplingHint, get_preset

__all__ = [
    "PRESETS", "ClassifierConfig", "DiffusionConfig", "EncoderUNetModel", "Preset", "SamplingHint",
    "SuperResModel", "UNetConfig", "UNetModel", "get_preset",
    "classifier_config_from_flags", "diffusion_config_from_flags", "parse_flag_args",
    "superres_config_from_flags", "timestep_embedding", "unet_config_from_flags",
]
