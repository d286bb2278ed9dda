"""Presets for the checkpoints released with guided-diffusion (openai/guided-diffusion README).

Each preset keeps the README's flag string (what users paste) as its source of
truth; `Preset.flags` completes it with script_util's defaults.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .configs import (
    DEFAULTS_BY_KIND,
    ClassifierConfig,
    DiffusionConfig,
    UNetConfig,
    config_from_flags,
    diffusion_config_from_flags,
    parse_flag_args,
    resolve_flags,
)

KINDS = tuple(DEFAULTS_BY_KIND)  # ("diffusion", "classifier", "superres")


@dataclass(frozen=True)
class SamplingHint:
    """Sampling settings the README uses with a checkpoint."""

    timestep_respacing: str  # e.g. "250", "ddim25"
    use_ddim: bool = False  # DDIM (eta 0) instead of ancestral sampling
    classifier: str | None = None  # preset name of the guiding classifier
    classifier_scale: float | None = None  # classifier guidance scale


@dataclass(frozen=True)
class Preset:
    """A released checkpoint: file name(s), kind, README flags and recommended sampling."""

    name: str  # e.g. "64x64_diffusion"
    files: tuple[str, ...]  # released file names
    kind: str  # 'diffusion' | 'classifier' | 'superres'
    cli_flags: str  # the README's MODEL_FLAGS / classifier flags, as pasted
    sampling: tuple[SamplingHint, ...] = ()  # first entry = the README's main recipe
    description: str = ""

    @property
    def flags(self) -> dict:
        """Complete official flags (script_util defaults overlaid with cli_flags)."""
        return resolve_flags(parse_flag_args(self.cli_flags), DEFAULTS_BY_KIND[self.kind])

    def model_config(self) -> UNetConfig | ClassifierConfig:
        return config_from_flags(self.kind, self.flags)

    def diffusion_config(self) -> DiffusionConfig | None:
        """The diffusion the model was trained for (None for classifiers, which follow the diffusion model)."""
        return None if self.kind == "classifier" else diffusion_config_from_flags(self.flags)


def _imagenet(size: int, flags: str, hints: tuple[SamplingHint, ...], what: str) -> Preset:
    return Preset(f"{size}x{size}_diffusion", (f"{size}x{size}_diffusion.pt",), "diffusion", flags, hints,
                  f"ImageNet {size}x{size}, {what}")


def _guided(size: int, scale: float, respacing: str = "250", ddim: bool = False) -> SamplingHint:
    return SamplingHint(respacing, use_ddim=ddim, classifier=f"{size}x{size}_classifier", classifier_scale=scale)


def _classifier(size: int, depth: int) -> Preset:
    flags = (f"--image_size {size} --classifier_attention_resolutions 32,16,8 --classifier_depth {depth} "
             "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
             "--classifier_use_scale_shift_norm True")
    return Preset(f"{size}x{size}_classifier", (f"{size}x{size}_classifier.pt",), "classifier", flags,
                  description=f"noisy ImageNet classifier for {size}x{size} (guidance)")


_LSUN_FLAGS = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout {dropout} "
               "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
               "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
               "--use_scale_shift_norm True")


def _lsun(name: str, dropout: str, what: str) -> Preset:
    return Preset(name, (f"{name}.pt",), "diffusion", _LSUN_FLAGS.format(dropout=dropout),
                  (SamplingHint("1000"),), f"LSUN {what} 256x256, unconditional")


# MODEL_FLAGS as printed in the README (alphabetical there too).
_PRESET_LIST = [
    _imagenet(64, "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                  "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
                  "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_new_attention_order True "
                  "--use_fp16 True --use_scale_shift_norm True",
              (_guided(64, 1.0),), "class-conditional"),
    _imagenet(128, "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
                   "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
                   "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
              (_guided(128, 0.5), _guided(128, 1.0, "ddim25", ddim=True)), "class-conditional"),
    _imagenet(256, "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
                   "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
                   "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
              (_guided(256, 1.0),), "class-conditional"),
    Preset("256x256_diffusion_uncond", ("256x256_diffusion_uncond.pt",), "diffusion",
           "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
           "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
           "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
           (_guided(256, 10.0),), "ImageNet 256x256, unconditional (guided by the classifier)"),
    _imagenet(512, "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
                   "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
                   "--num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True",
              (_guided(512, 4.0),), "class-conditional"),
    _lsun("lsun_bedroom", "0.1", "bedroom"),
    _lsun("lsun_cat", "0.1", "cat"),
    _lsun("lsun_horse", "0.1", "horse"),
    _lsun("lsun_horse_nodropout", "0.0", "horse (trained without dropout)"),
    _classifier(64, 4),
    _classifier(128, 2),
    _classifier(256, 2),
    _classifier(512, 2),
    Preset("64_256_upsampler", ("64_256_upsampler.pt",), "superres",
           "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256 "
           "--small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 "
           "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
           (SamplingHint("250"),), "ImageNet 64 -> 256 upsampler, class-conditional"),
    Preset("128_512_upsampler", ("128_512_upsampler.pt",), "superres",
           "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 "
           "--small_size 128 --learn_sigma True --noise_schedule linear --num_channels 192 "
           "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
           "--use_scale_shift_norm True",
           (SamplingHint("250"),), "ImageNet 128 -> 512 upsampler, class-conditional"),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    """Preset by name or released file name; KeyError with suggestions otherwise."""
    key = name.lower()
    for p in _PRESET_LIST:
        if key == p.name.lower() or key in (f.lower() for f in p.files):
            return p
    close = difflib.get_close_matches(name, PRESETS, n=3)
    raise KeyError(f"no preset named {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
