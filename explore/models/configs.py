"""Model and diffusion configs, and the official guided-diffusion flags at the edge.

The dataclasses describe architectures directly (downsample factors, channel
multipliers, class count).  The ``*_from_flags`` functions accept the flag names
and defaults of guided-diffusion's ``script_util.py`` (as pasted from its README),
so ``--attention_resolutions 32,16,8 --class_cond True ...`` means what it means
there.
"""

from __future__ import annotations

import difflib
import shlex
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

NUM_IMAGENET_CLASSES = 1000

# Channel multipliers chosen by image size when `channel_mult` is "" (create_model, create_classifier).
CHANNEL_MULT_BY_SIZE = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
# sr_create_model chooses by large_size with its own table.
SUPERRES_CHANNEL_MULT_BY_SIZE = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
}


class _JSONConfig:
    """`to_dict` / `from_dict` for JSON round trips (tuples <-> lists)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown} (known: {names})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _normalise_levels(cfg) -> None:
    # Frozen dataclasses: normalise sequence fields once, so equal configs compare equal.
    object.__setattr__(cfg, "attention_ds", tuple(sorted({int(d) for d in cfg.attention_ds})))
    object.__setattr__(cfg, "channel_mult", tuple(float(m) for m in cfg.channel_mult))
    if not cfg.channel_mult:
        raise ValueError("channel_mult must name at least one level")


@dataclass(frozen=True, kw_only=True)
class UNetConfig(_JSONConfig):
    """ADM UNet (guided_diffusion.unet.UNetModel / SuperResModel)."""

    image_size: int  # training resolution (the network itself is fully convolutional)
    in_channels: int = 3  # image channels; super-res models see 2x this (x and upsampled low_res)
    model_channels: int  # base width (flag num_channels); time embedding is 4x this
    out_channels: int  # 6 with learned sigma (eps, v), else 3
    num_res_blocks: int  # ResBlocks per level on the way down (one more per level on the way up)
    attention_ds: tuple[int, ...]  # downsample factors (image_size // resolution) that get attention
    dropout: float = 0.0  # dropout inside ResBlocks (inactive in eval mode)
    channel_mult: tuple[float, ...]  # width of level i = int(channel_mult[i] * model_channels)
    num_classes: int | None = None  # label embedding size; None = unconditional
    use_scale_shift_norm: bool = True  # FiLM the second GroupNorm with the embedding (else add)
    resblock_updown: bool = True  # resample with ResBlocks (else strided conv / upsample+conv)
    num_heads: int = 4  # attention heads, used when num_head_channels == -1
    num_head_channels: int = -1  # channels per head; overrides num_heads when != -1
    num_heads_upsample: int = -1  # heads in the output blocks; -1 = num_heads
    use_new_attention_order: bool = False  # qkv layout: split q/k/v then heads (else heads then q/k/v)
    use_fp16: bool = False  # released with an fp16 torso (see UNetModel.convert_to_fp16)
    super_res: bool = False  # SuperResModel: forward takes low_res, input conv has 2*in_channels

    def __post_init__(self):
        _normalise_levels(self)


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig(_JSONConfig):
    """Noisy ImageNet classifier (guided_diffusion.unet.EncoderUNetModel)."""

    image_size: int  # input resolution; fixes the attention-pool grid (image_size // final ds)
    in_channels: int = 3  # image channels
    model_channels: int  # base width (flag classifier_width)
    out_channels: int = NUM_IMAGENET_CLASSES  # number of logits
    num_res_blocks: int  # ResBlocks per level (flag classifier_depth)
    attention_ds: tuple[int, ...]  # downsample factors that get attention
    channel_mult: tuple[float, ...]  # per-level width multipliers
    dropout: float = 0.0  # dropout inside ResBlocks
    use_scale_shift_norm: bool = True  # FiLM the second GroupNorm with the embedding
    resblock_updown: bool = True  # downsample with ResBlocks (else strided conv)
    num_head_channels: int = 64  # channels per attention head (hard-wired 64 by create_classifier)
    pool: str = "attention"  # 'attention' (AttentionPool2d, all releases) or 'adaptive' (mean + 1x1 conv)
    use_fp16: bool = False  # fp16 torso
    # Built-in classifiers: the noise schedule ('linear' or 'cosine', signal_gate_steps long) whose sqrt(abar_t)
    # multiplies the logits, so log p(y | x_t) and its gradient fade with the signal as the true ones do.
    # None (every release): logits as the network gives them.
    signal_gate: str | None = None
    signal_gate_steps: int = 1000

    def __post_init__(self):
        _normalise_levels(self)
        if self.pool not in ("attention", "adaptive"):
            raise ValueError(f"unsupported classifier pool {self.pool!r} (supported: 'attention', 'adaptive')")
        if self.signal_gate not in (None, "linear", "cosine"):
            raise ValueError(f"unsupported signal_gate {self.signal_gate!r} (supported: None, 'linear', 'cosine')")


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig(_JSONConfig):
    """Gaussian diffusion process the model was trained for (create_gaussian_diffusion)."""

    steps: int = 1000  # training timesteps T (flag diffusion_steps)
    noise_schedule: str = "linear"  # 'linear' or 'cosine' beta schedule
    learn_sigma: bool = False  # model outputs v for a learned-range variance (6 channels)
    sigma_small: bool = False  # without learn_sigma: the posterior variance (FIXED_SMALL), else beta (FIXED_LARGE)
    predict_xstart: bool = False  # model predicts x0 instead of epsilon
    predict_v: bool = False  # model predicts v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022); built-in only
    low_res_skip: bool = False  # super-res, v only: x0 = bicubic(low_res) + the network's x0 (built-in only)
    timestep_respacing: str = ""  # default respacing ("" = all steps, "250", "ddim25", "10,15,20")
    rescale_timesteps: bool = False  # feed t * 1000 / T instead of t (False for every release)

    def __post_init__(self):
        if self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown beta schedule: {self.noise_schedule!r} (expected 'linear' or 'cosine')")
        if self.steps < 1:
            raise ValueError(f"diffusion steps must be positive, got {self.steps}")
        if self.predict_v and self.predict_xstart:
            raise ValueError("a model predicts x0 or v, not both")
        if self.low_res_skip and not self.predict_v:
            raise ValueError("low_res_skip needs predict_v")


# ---------------------------------------------------------------------------
# Official flags (script_util.py defaults)

DIFFUSION_DEFAULTS: dict[str, Any] = dict(
    learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
    use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
)
MODEL_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False, **DIFFUSION_DEFAULTS,
)
CLASSIFIER_DEFAULTS: dict[str, Any] = dict(
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention",
)
SUPERRES_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in MODEL_DEFAULTS.items()
       if k not in ("image_size", "channel_mult", "use_new_attention_order")},
    "large_size": 256, "small_size": 64,
}
# Flags of the sampling scripts: recognised (so pasted command lines work) but not architecture.
SCRIPT_DEFAULTS: dict[str, Any] = dict(
    clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="",
    classifier_path="", classifier_scale=1.0, base_samples="",
)
_ALL_DEFAULTS = {**SCRIPT_DEFAULTS, **CLASSIFIER_DEFAULTS, **SUPERRES_DEFAULTS, **MODEL_DEFAULTS}


def parse_bool(value: Any) -> bool:
    """Booleans as the original's str2bool reads them (True/False, yes/no, 1/0, ...)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"expected a boolean (True/False), got {value!r}")


def _coerce(name: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            return parse_bool(value)
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value.strip()) if isinstance(value, str) else int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except ValueError:
        kind = {bool: "a boolean", int: "an integer", float: "a number"}[type(default)]
        raise ValueError(f"--{name} expects {kind}, got {value!r}") from None
    # String flags; lists like (32, 16, 8) or a lone 16 become "32,16,8" / "16".
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value).strip()


def resolve_flags(flags: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with `flags` (typed), keeping only the keys of `defaults`.

    Flags of the other official scripts are ignored; unknown names raise ValueError.
    """
    flags = {k.lstrip("-").replace("-", "_"): v for k, v in (flags or {}).items()}
    unknown = sorted(k for k in flags if k not in _ALL_DEFAULTS)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, _ALL_DEFAULTS, n=1)
            hints.append(f"--{k}" + (f" (did you mean --{close[0]}?)" if close else ""))
        raise ValueError("unknown flag(s): " + ", ".join(hints))
    return {k: _coerce(k, flags[k], d) if k in flags else d for k, d in defaults.items()}


def parse_flag_args(argv: Sequence[str] | str) -> dict[str, str]:
    """`--key value` / `--key=value` tokens (or one shell string) -> {key: value-string}."""
    tokens = shlex.split(argv) if isinstance(argv, str) else list(argv)
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"expected a --flag, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"--{key} needs a value")
            i += 1
            value = tokens[i]
        out[key.replace("-", "_")] = value
        i += 1
    return out


def format_flags(flags: Mapping[str, Any]) -> str:
    """{key: value} -> '--key value ...' (the README's spelling)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:g}" if v != int(v) else f"{v:.1f}"
        return str(v)
    return " ".join(f"--{k} {fmt(v)}" for k, v in flags.items())


def _channel_mult(text: str, image_size: int, table: Mapping[int, tuple], what: str) -> tuple[float, ...]:
    if text:
        return tuple(float(m) for m in text.split(","))
    if image_size not in table:
        raise ValueError(f"unsupported {what}: {image_size}")
    return table[image_size]


def _attention_ds(resolutions: str, image_size: int) -> tuple[int, ...]:
    return tuple(image_size // int(r) for r in resolutions.split(",") if r.strip())


def _unet_config(f: Mapping[str, Any], size: int, channel_mult: tuple[float, ...], **extra) -> UNetConfig:
    """The UNetConfig fields create_model and sr_create_model share, from resolved flags."""
    return UNetConfig(
        image_size=size,
        in_channels=3,
        model_channels=f["num_channels"],
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=f["num_res_blocks"],
        attention_ds=_attention_ds(f["attention_resolutions"], size),
        dropout=f["dropout"],
        channel_mult=channel_mult,
        num_classes=NUM_IMAGENET_CLASSES if f["class_cond"] else None,
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_fp16=f["use_fp16"],
        **extra,
    )


def unet_config_from_flags(flags: Mapping[str, Any] | None = None) -> UNetConfig:
    """UNetConfig as create_model builds it from the official flags."""
    f = resolve_flags(flags, MODEL_DEFAULTS)
    size = f["image_size"]
    return _unet_config(f, size, _channel_mult(f["channel_mult"], size, CHANNEL_MULT_BY_SIZE, "image size"),
                        use_new_attention_order=f["use_new_attention_order"])


def superres_config_from_flags(flags: Mapping[str, Any] | None = None) -> UNetConfig:
    """UNetConfig (super_res=True) as sr_create_model builds it; small_size is not architecture."""
    f = resolve_flags(flags, SUPERRES_DEFAULTS)
    size = f["large_size"]
    # sr_create_model has no use_new_attention_order argument: always the legacy order
    return _unet_config(f, size, _channel_mult("", size, SUPERRES_CHANNEL_MULT_BY_SIZE, "large size"),
                        use_new_attention_order=False, super_res=True)


def classifier_config_from_flags(flags: Mapping[str, Any] | None = None) -> ClassifierConfig:
    """ClassifierConfig as create_classifier builds it (1000 classes, 64-channel heads)."""
    f = resolve_flags(flags, CLASSIFIER_DEFAULTS)
    size = f["image_size"]
    return ClassifierConfig(
        image_size=size,
        model_channels=f["classifier_width"],
        num_res_blocks=f["classifier_depth"],
        attention_ds=_attention_ds(f["classifier_attention_resolutions"], size),
        channel_mult=_channel_mult("", size, CHANNEL_MULT_BY_SIZE, "image size"),
        use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
        resblock_updown=f["classifier_resblock_updown"],
        pool=f["classifier_pool"],
        use_fp16=f["classifier_use_fp16"],
    )


def diffusion_config_from_flags(flags: Mapping[str, Any] | None = None) -> DiffusionConfig:
    """DiffusionConfig from the official diffusion flags (use_kl etc. are training-only)."""
    f = resolve_flags(flags, DIFFUSION_DEFAULTS)
    return DiffusionConfig(
        steps=f["diffusion_steps"],
        noise_schedule=f["noise_schedule"],
        learn_sigma=f["learn_sigma"],
        predict_xstart=f["predict_xstart"],
        timestep_respacing=f["timestep_respacing"],
        rescale_timesteps=f["rescale_timesteps"],
    )


DEFAULTS_BY_KIND: dict[str, dict[str, Any]] = {
    "diffusion": MODEL_DEFAULTS, "classifier": CLASSIFIER_DEFAULTS, "superres": SUPERRES_DEFAULTS}


def config_from_flags(kind: str, flags: Mapping[str, Any] | None = None) -> UNetConfig | ClassifierConfig:
    """Architecture of a 'diffusion', 'superres' or 'classifier' model from official flags."""
    build = {"diffusion": unet_config_from_flags, "superres": superres_config_from_flags,
             "classifier": classifier_config_from_flags}
    if kind not in build:
        raise ValueError(f"unknown model kind {kind!r} (expected one of {list(build)})")
    return build[kind](flags)


def _mult_text(mult: tuple[float, ...]) -> str:
    return ",".join(f"{m:g}" for m in mult)


def flags_from_config(cfg: UNetConfig | ClassifierConfig) -> dict[str, Any]:
    """Official architecture flags that rebuild `cfg` (inverse of the *_from_flags functions).

    Raises ValueError for configs the flags cannot express (e.g. 10 classes).
    """
    resolutions = ",".join(str(cfg.image_size // d) for d in sorted(cfg.attention_ds))
    if isinstance(cfg, ClassifierConfig):
        if CHANNEL_MULT_BY_SIZE.get(cfg.image_size) != cfg.channel_mult or cfg.num_head_channels != 64 \
                or cfg.out_channels != NUM_IMAGENET_CLASSES or cfg.in_channels != 3:
            raise ValueError("this classifier cannot be described by create_classifier's flags")
        return dict(
            image_size=cfg.image_size, classifier_width=cfg.model_channels,
            classifier_depth=cfg.num_res_blocks, classifier_attention_resolutions=resolutions,
            classifier_use_scale_shift_norm=cfg.use_scale_shift_norm,
            classifier_resblock_updown=cfg.resblock_updown, classifier_pool=cfg.pool,
            classifier_use_fp16=cfg.use_fp16,
        )
    if cfg.num_classes not in (None, NUM_IMAGENET_CLASSES) or cfg.out_channels not in (3, 6) \
            or cfg.in_channels != 3:
        raise ValueError("this UNet cannot be described by the official flags")
    if cfg.super_res:
        if SUPERRES_CHANNEL_MULT_BY_SIZE.get(cfg.image_size) != cfg.channel_mult:
            raise ValueError("this super-res UNet cannot be described by sr_create_model's flags")
        head = dict(large_size=cfg.image_size)
    else:
        default = CHANNEL_MULT_BY_SIZE.get(cfg.image_size)
        head = dict(image_size=cfg.image_size)
        if default != cfg.channel_mult:
            if any(m != int(m) for m in cfg.channel_mult):
                raise ValueError("the channel_mult flag takes integers only")
            head["channel_mult"] = _mult_text(cfg.channel_mult)
    out = dict(
        **head, num_channels=cfg.model_channels, num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=resolutions, class_cond=cfg.num_classes is not None,
        learn_sigma=cfg.out_channels == 6, use_scale_shift_norm=cfg.use_scale_shift_norm,
        resblock_updown=cfg.resblock_updown,
    )
    if cfg.num_head_channels != -1:
        out["num_head_channels"] = cfg.num_head_channels
    else:
        out["num_heads"] = cfg.num_heads
    if cfg.num_heads_upsample != -1:
        out["num_heads_upsample"] = cfg.num_heads_upsample
    if cfg.use_new_attention_order:
        out["use_new_attention_order"] = True
    if cfg.dropout:
        out["dropout"] = cfg.dropout
    out["use_fp16"] = cfg.use_fp16
    return out
