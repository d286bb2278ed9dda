"""Model zoo: build ADM modules, recognise checkpoints, load and save them safely.

Released guided-diffusion `.pt` files are plain state dicts; they are read with
`torch.load(weights_only=True)` (no arbitrary unpickling) and matched strictly
against the module their preset or flags describe.  The project's own models are
`.safetensors` files that describe themselves (a sidecar `<stem>.json`, also
embedded in the safetensors header).
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .models.adm import EncoderUNetModel, SuperResModel, UNetModel
from .models.configs import (
    CHANNEL_MULT_BY_SIZE,
    DEFAULTS_BY_KIND,
    MODEL_DEFAULTS,
    SUPERRES_CHANNEL_MULT_BY_SIZE,
    ClassifierConfig,
    DiffusionConfig,
    UNetConfig,
    config_from_flags,
    diffusion_config_from_flags,
    flags_from_config,
    format_flags,
    parse_flag_args,
    resolve_flags,
)
from .models.presets import KINDS, PRESETS, Preset

ModelConfig = UNetConfig | ClassifierConfig
Shapes = Mapping[str, tuple[int, ...]]

_SHOW = 5  # keys listed per category in error messages
# Architecture details that leave every shape unchanged, so they cannot be read from weights.
_UNREADABLE = ("num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order",
               "use_fp16", "dropout")


class CheckpointError(ValueError):
    """The file cannot be used as a checkpoint (truncated, corrupt, unsafe, not a state dict)."""


class CheckpointMismatch(CheckpointError):
    """The weights do not fit the architecture the preset / flags / description asks for."""


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference plus everything needed to use it."""

    kind: str  # 'diffusion' | 'classifier' | 'superres'
    module: nn.Module  # eval mode, requires_grad False; treat as read-only
    config: Any  # UNetConfig | ClassifierConfig (or a registered family's config)
    diffusion: DiffusionConfig | None  # process it was trained for (None for classifiers)
    class_names: list[str] | None = None  # label names, when the checkpoint records them
    null_class: int | None = None  # label meaning "no class" (classifier-free guidance), if trained with one
    preset: str | None = None  # matching released checkpoint, if any
    path: str = ""  # source file
    metadata: dict = field(default_factory=dict)  # flags used, sampling hints, sidecar extras

    @property
    def num_classes(self) -> int | None:
        """Label-embedding size (diffusion models, incl. any null class) or number of logits (classifiers)."""
        return _num_classes(self.kind, self.config)


# ---------------------------------------------------------------------------
# Building and expected shapes

# kind -> (config class, module class).  The ADM kinds are built in; the project's own
# families (e.g. the evaluation classifier) register here, and need only `module.cfg`
# plus a frozen config dataclass with to_dict / from_dict.
_FAMILIES: dict[str, tuple[type, type]] = {
    "diffusion": (UNetConfig, UNetModel),
    "superres": (UNetConfig, SuperResModel),
    "classifier": (ClassifierConfig, EncoderUNetModel),
}


def register_kind(kind: str, config_cls: type, module_cls: type) -> None:
    """Let load_model / save_checkpoint handle another model family (module_cls(config), module.cfg)."""
    _FAMILIES[kind] = (config_cls, module_cls)


def _families() -> dict[str, tuple[type, type]]:
    if "evaluator" not in _FAMILIES:
        try:  # the project's evaluation classifier, when present
            from .models.evaluator import EvalClassifier, EvalClassifierConfig
        except ImportError:
            pass
        else:
            register_kind("evaluator", EvalClassifierConfig, EvalClassifier)
    return _FAMILIES


def _num_classes(kind: str, config) -> int | None:
    return config.out_channels if kind == "classifier" else getattr(config, "num_classes", None)


def kind_of(module: nn.Module) -> str:
    """'diffusion' | 'superres' | 'classifier' | a registered kind, from the module's class."""
    if isinstance(module, UNetModel):
        return "superres" if module.cfg.super_res else "diffusion"
    for kind, (_, module_cls) in _families().items():
        if type(module) is module_cls:
            return kind
    raise TypeError(f"no model kind is registered for {type(module).__name__}")


def _check_kind(kind: str, config) -> None:
    families = _families()
    if kind not in families:
        raise ValueError(f"unknown model kind {kind!r} (expected one of {list(families)})")
    if not isinstance(config, families[kind][0]) or (
            isinstance(config, UNetConfig) and config.super_res != (kind == "superres")):
        raise ValueError(f"a {kind} model cannot be built from {type(config).__name__}"
                         f"{' with super_res=True' if getattr(config, 'super_res', False) else ''}")


def build_model(kind: str, config, device: str | torch.device = "cpu") -> nn.Module:
    """Fresh module for `config` (device 'meta' builds without allocating weights)."""
    _check_kind(kind, config)
    with torch.device(device):
        return _families()[kind][1](config)


@functools.lru_cache(maxsize=64)
def _shapes_cached(kind: str, config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    module = build_model(kind, config, "meta")
    return tuple((k, tuple(v.shape)) for k, v in module.state_dict().items())


def expected_shapes(kind: str, config) -> dict[str, tuple[int, ...]]:
    """Ordered {key: shape} of the state dict `config` builds (computed on the meta device)."""
    if isinstance(config, (UNetConfig, ClassifierConfig)):  # fields that change no shape share one entry
        config = replace(config, dropout=0.0, use_fp16=False)
    return dict(_shapes_cached(kind, config))


def _could_match(preset: Preset, shapes: Shapes) -> bool:
    # Cheap filter before building: kind and base width show in the first tensor.
    cfg = preset.model_config()
    width = cfg.model_channels
    return (shapes.get("time_embed.0.weight") == (4 * width, width)
            and _infer_kind(shapes) == preset.kind)


def presets_matching_shapes(shapes: Shapes) -> list[Preset]:
    """All presets whose state dict has exactly these keys and shapes."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    return [p for p in PRESETS.values()
            if _could_match(p, shapes) and expected_shapes(p.kind, p.model_config()) == shapes]


def _preset_by_filename(name: str) -> Preset | None:
    path = Path(name)
    for p in PRESETS.values():
        if path.name.lower() in (f.lower() for f in p.files) or path.stem.lower() == p.name.lower():
            return p
    return None


def find_preset(path_or_name: str | os.PathLike, state_dict_shapes: Shapes | None = None) -> Preset | None:
    """Preset named by the file, else the first preset whose shapes equal `state_dict_shapes`.

    With shapes given, a preset found by name is returned only if the shapes fit it.
    """
    by_name = _preset_by_filename(str(path_or_name))
    if state_dict_shapes is None:
        return by_name
    shapes = {k: tuple(v) for k, v in state_dict_shapes.items()}
    if by_name is not None and expected_shapes(by_name.kind, by_name.model_config()) == shapes:
        return by_name
    matches = presets_matching_shapes(shapes)
    return matches[0] if matches else None


# ---------------------------------------------------------------------------
# Reading files

def _first_informative_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln
    return lines[0].split(". ")[0] if lines else "no details"


def _read_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        detail = _first_informative_line(err)
        if "GLOBAL" in detail:
            raise CheckpointError(
                f"{path}: refused to load: the file contains pickled Python objects, not just tensors "
                f"({detail}). Only plain state dicts are read; arbitrary objects are never unpickled.") from err
        raise CheckpointError(f"{path}: not a checkpoint the safe loader can read ({detail}).") from err
    except Exception as err:  # truncated zip, empty file, random bytes, ...
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint; the file is truncated or corrupt, or not a "
            f"checkpoint at all ({type(err).__name__}: {_first_informative_line(err)}).") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors).")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        nested = [k for k in bad if isinstance(obj[k], Mapping)]
        hint = (f"; it looks like a training checkpoint: the weights may be under {nested}, save that dict alone"
                if nested else "")
        raise CheckpointError(f"{path}: not a plain state dict: {len(bad)} entries are not tensors "
                              f"({', '.join(map(repr, bad[:_SHOW]))}){hint}.")
    return dict(obj)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as safetensors; the file is truncated or corrupt "
                              f"({type(err).__name__}: {_first_informative_line(err)}).") from err
    sidecar = path.with_suffix(".json")
    try:
        if sidecar.exists():
            return tensors, json.loads(sidecar.read_text())
        if "explore" in header:
            return tensors, json.loads(header["explore"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{sidecar if sidecar.exists() else path}: model description is not valid "
                              f"JSON ({err}).") from err
    return tensors, None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, self-description or None) from a `.pt`-style or `.safetensors` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pt(path), None


# ---------------------------------------------------------------------------
# Reading the architecture back from shapes

def _infer_kind(shapes: Shapes) -> str:
    if not any(k.startswith("output_blocks.") for k in shapes):
        return "classifier"
    first = shapes.get("input_blocks.0.0.weight", ())
    return "superres" if len(first) == 4 and first[1] == 6 else "diffusion"


def _sub_indices(shapes: Shapes, prefix: str) -> dict[int, set[str]]:
    """{i: {rest of key}} for the keys `prefix.i.rest`."""
    out: dict[int, set[str]] = {}
    for k in shapes:
        m = re.match(re.escape(prefix) + r"\.(\d+)\.(.*)", k)
        if m:
            out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return out


@dataclass(frozen=True)
class Guess:
    """Architecture read back from state-dict shapes."""

    kind: str
    config: ModelConfig  # image_size is a placeholder when size_known is False
    size_known: bool  # the image size follows from the shapes (or was given)
    verified: bool  # config reproduces every key and shape


def _scale_shift(shapes: Shapes) -> bool:
    emb = shapes.get("input_blocks.1.0.emb_layers.1.weight", (0,))[0]
    return emb == 2 * shapes.get("input_blocks.1.0.out_layers.0.weight", (0,))[0]


def _guess_unet(shapes: Shapes, kind: str, image_size: int | None) -> tuple[UNetConfig, bool] | None:
    base = shapes["time_embed.0.weight"][1]
    entries = _sub_indices(shapes, "output_blocks")
    if not entries or sorted(entries) != list(range(len(entries))):
        return None
    # The last output entry of every level but the first holds a resampler (ResBlock or Upsample).
    levels = 1 + sum(any(re.match(r"[12]\.(in_layers|conv)\.", r) for r in rest) for rest in entries.values())
    if len(entries) % levels:
        return None
    per_level = len(entries) // levels
    mult, attention = [0.0] * levels, set()
    for e, rest in entries.items():
        level = levels - 1 - e // per_level
        mult[level] = shapes[f"output_blocks.{e}.0.out_layers.0.weight"][0] / base
        if "1.qkv.weight" in rest:
            attention.add(2 ** level)
    updown = levels == 1 or any(re.match(r"[12]\.in_layers\.", r) for rest in entries.values() for r in rest)
    if image_size is None:
        table = SUPERRES_CHANNEL_MULT_BY_SIZE if kind == "superres" else CHANNEL_MULT_BY_SIZE
        sizes = [size for size, m in table.items() if tuple(map(float, m)) == tuple(mult)]
        image_size = sizes[0] if len(sizes) == 1 else None
    cfg = UNetConfig(
        image_size=image_size or 8 * 2 ** (levels - 1),
        in_channels=shapes["input_blocks.0.0.weight"][1] // (2 if kind == "superres" else 1),
        model_channels=base, out_channels=shapes["out.2.weight"][0], num_res_blocks=per_level - 1,
        attention_ds=tuple(attention), channel_mult=tuple(mult),
        num_classes=shapes["label_emb.weight"][0] if "label_emb.weight" in shapes else None,
        use_scale_shift_norm=_scale_shift(shapes), resblock_updown=updown, super_res=kind == "superres",
    )
    return cfg, image_size is not None


def _guess_classifier(shapes: Shapes, image_size: int | None) -> tuple[ClassifierConfig, bool] | None:
    base = shapes["time_embed.0.weight"][1]
    n_in = len(_sub_indices(shapes, "input_blocks"))
    if "out.2.positional_embedding" in shapes:
        pool, grid = "attention", math.isqrt(shapes["out.2.positional_embedding"][1] - 1)
        out_channels = shapes["out.2.c_proj.weight"][0]
    elif "out.3.weight" in shapes:
        pool, grid, out_channels = "adaptive", None, shapes["out.3.weight"][0]
    else:
        return None
    # input_blocks = stem + levels * depth ResBlocks + (levels - 1) downsamplers = levels * (depth + 1);
    # try each factorisation and keep the first that reproduces every shape.
    for levels in range(n_in // 2, 0, -1):
        if n_in % levels:
            continue
        depth = n_in // levels - 1
        firsts = [1 + level * (depth + 1) for level in range(levels)]
        widths = [shapes.get(f"input_blocks.{i}.0.out_layers.0.weight") for i in firsts]
        if None in widths:
            continue
        size = grid * 2 ** (levels - 1) if grid else image_size
        cfg = ClassifierConfig(
            image_size=size or 8 * 2 ** (levels - 1), in_channels=shapes["input_blocks.0.0.weight"][1],
            model_channels=base, out_channels=out_channels, num_res_blocks=depth,
            attention_ds=tuple(2 ** lv for lv, i in enumerate(firsts) if f"input_blocks.{i}.1.qkv.weight" in shapes),
            channel_mult=tuple(w[0] / base for w in widths), use_scale_shift_norm=_scale_shift(shapes),
            resblock_updown=levels == 1 or f"input_blocks.{depth + 1}.0.in_layers.0.weight" in shapes, pool=pool,
        )
        try:
            if expected_shapes("classifier", cfg) == dict(shapes):
                return cfg, size is not None
        except (ValueError, RuntimeError):
            continue
    return None


def guess_config(shapes: Shapes, image_size: int | None = None) -> Guess | None:
    """Architecture read from state-dict shapes, or None if they are not an ADM layout.

    Head counts, attention order, dropout and the noise schedule never show in shapes;
    the image size shows only through a default channel_mult or the classifier's pool.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    if "time_embed.0.weight" not in shapes or "input_blocks.0.0.weight" not in shapes:
        return None
    kind = _infer_kind(shapes)
    try:
        if kind == "classifier":
            guess = _guess_classifier(shapes, image_size)
        else:
            guess = _guess_unet(shapes, kind, image_size) if "out.2.weight" in shapes else None
    except (KeyError, IndexError, ValueError, ZeroDivisionError):
        guess = None
    if guess is None:
        return None
    cfg, size_known = guess
    try:
        verified = expected_shapes(kind, cfg) == shapes
    except (ValueError, RuntimeError):
        verified = False
    return Guess(kind, cfg, size_known, verified)


def _guessed_flags(guess: Guess) -> dict[str, Any] | None:
    try:
        flags = flags_from_config(guess.config)
    except ValueError:
        return None
    flags = {k: v for k, v in flags.items() if k not in _UNREADABLE}
    if not guess.size_known:  # spell the size-dependent flags in terms of N
        size_key = "large_size" if "large_size" in flags else "image_size"
        att_key = "classifier_attention_resolutions" if guess.kind == "classifier" else "attention_resolutions"
        flags[size_key] = "N"
        flags[att_key] = ",".join(f"N/{d}" for d in sorted(guess.config.attention_ds))
    return flags


def _user_size(user_flags: Mapping[str, Any] | None, kind: str | None) -> int | None:
    value = (user_flags or {}).get("large_size" if kind == "superres" else "image_size")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _shown(value: Any) -> str:
    return '""' if value == "" else str(value)


def describe_fit(shapes: Shapes, user_flags: Mapping[str, Any] | None = None, kind: str | None = None) -> str:
    """Which preset, or which flags, fit these shapes (for error messages)."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    matches = presets_matching_shapes(shapes)
    if matches:
        also = f" (same layout as {', '.join(p.name for p in matches[1:])})" if len(matches) > 1 else ""
        return f"These weights fit preset {matches[0].name}{also}: {matches[0].cli_flags}"
    guess = guess_config(shapes, _user_size(user_flags, kind))
    if guess is None:
        return ("These weights do not look like a guided-diffusion (ADM) state dict "
                f"(first keys: {', '.join(list(shapes)[:_SHOW])}).")
    flags = _guessed_flags(guess)
    if flags is None:
        text = f"Architecture read from the shapes ({guess.kind}, not expressible as official flags): {guess.config}"
    else:
        text = f"Flags read from the shapes ({guess.kind}): {format_flags(flags)}"
        if user_flags:
            try:
                mine = resolve_flags(user_flags, DEFAULTS_BY_KIND[guess.kind])
            except ValueError:
                mine = {}
            diff = [f"--{k} {_shown(mine[k])} -> {v}" for k, v in flags.items()
                    if k in mine and v != "N" and "N/" not in str(v) and str(mine[k]) != str(v)]
            if diff:
                text += f"; yours differ in {', '.join(diff)}"
    notes = []
    if not guess.size_known:
        notes.append("N = the image size, which the weights do not record")
    if not guess.verified:
        notes.append("partial guess: it does not reproduce every shape")
    notes.append("num_heads / num_head_channels / use_new_attention_order and the noise schedule "
                 "are never recorded in the weights")
    return f"{text}. ({'; '.join(notes)})"


def _mismatch(path: Path, source: str, kind: str, expected: Shapes, shapes: Shapes,
              user_flags: Mapping[str, Any] | None) -> CheckpointMismatch:
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]

    def first(keys, fmt=str):
        more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
        return ", ".join(fmt(k) for k in keys[:_SHOW]) + more

    lines = [f"{path.name}: the weights do not fit the {kind} model built from {source}: "
             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong-shaped keys."]
    if missing:
        lines.append(f"  missing from the file: {first(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the file: {first(unexpected)}")
    if wrong:
        lines.append("  wrong shape: " + first(
            wrong, lambda k: f"{k} {list(shapes[k])} in the file vs {list(expected[k])} in the model"))
    lines.append(describe_fit(shapes, user_flags, kind))
    return CheckpointMismatch("\n".join(lines))


# ---------------------------------------------------------------------------
# Loading

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _kind_from_flags(flags: Mapping[str, Any]) -> str | None:
    keys = {k.lstrip("-") for k in flags}
    if keys & {"large_size", "small_size"}:
        return "superres"
    model_keys = set(MODEL_DEFAULTS) - {"image_size"}
    if any(k.startswith("classifier_") for k in keys) and not keys & model_keys:
        return "classifier"
    return None


def _from_description(path: Path, desc: Mapping[str, Any]):
    try:
        kind = desc["kind"]
        if kind not in _families():
            raise ValueError(f"unknown kind {kind!r} (known: {list(_families())})")
        cfg = _families()[kind][0].from_dict(desc["model_config"])
        _check_kind(kind, cfg)
        diff = desc.get("diffusion_config")
        diffusion = DiffusionConfig.from_dict(diff) if diff else None
        n = _num_classes(kind, cfg) or 0
        if desc.get("null_class") is not None and not 0 <= desc["null_class"] < n:
            raise ValueError(f"null_class {desc['null_class']} is not one of the model's {n} classes")
        if len(desc.get("class_names") or ()) > n:
            raise ValueError(f"{len(desc['class_names'])} class names for a model with {n} classes")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid model description ({type(err).__name__}: {err}).") from err
    return kind, cfg, diffusion


def _resolve_dtype(dtype, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    if dtype is None:  # the release's own mixed precision on GPU, fp32 elsewhere
        return torch.float16 if device.type == "cuda" and getattr(cfg, "use_fp16", False) else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} (use one of {sorted(_DTYPES)})")
        return _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype} (float32, float16 or bfloat16)")
    return dtype


def load_model(path: str | os.PathLike, flags: Mapping[str, Any] | str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> LoadedModel:
    """Load a checkpoint for inference.

    The architecture comes from `flags` (official names, a dict or one pasted string; laid over
    the matching preset's flags) if given, else from the file's own description,
    else from the preset found by file name or shapes.  dtype float16/bfloat16 casts
    the torso convs as guided-diffusion's use_fp16 does; None means the release's
    fp16 torso on CUDA and fp32 elsewhere.
    """
    path = Path(path)
    device = torch.device(device)
    if isinstance(flags, str):
        flags = parse_flag_args(flags)
    state, desc = read_checkpoint(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    metadata: dict[str, Any] = {}
    class_names = null_class = None
    if desc is not None:
        class_names, null_class = desc.get("class_names"), desc.get("null_class")
        metadata.update({k: v for k, v in desc.items()
                         if k not in ("kind", "model_config", "diffusion_config", "class_names", "null_class")})

    preset = None
    if flags is not None:
        kind = _kind_from_flags(flags) or (desc or {}).get("kind") or _infer_kind(shapes)
        base: dict[str, Any] = {}
        if desc is not None:
            try:
                base = flags_from_config(_from_description(path, desc)[1])
            except ValueError:
                base = {}
        else:
            preset = find_preset(path, shapes)
            if preset is not None and preset.kind == kind:
                base = preset.flags
            else:
                preset = None
        merged = {**base, **{k.lstrip("-"): v for k, v in flags.items()}}
        config = config_from_flags(kind, merged)
        diffusion = None if kind == "classifier" else diffusion_config_from_flags(merged)
        metadata["flags"] = resolve_flags(merged, DEFAULTS_BY_KIND[kind])
        source = f"preset {preset.name} and your flags" if preset else "your flags"
    elif desc is not None:
        kind, config, diffusion = _from_description(path, desc)
        source = f"its description ({path.with_suffix('.json').name} / safetensors header)"
    else:
        preset = find_preset(path, shapes)
        if preset is None:
            by_name = _preset_by_filename(path.name)
            if by_name is not None:
                kind, source = by_name.kind, f"preset {by_name.name} (chosen by the file name)"
                raise _mismatch(path, source, kind, expected_shapes(kind, by_name.model_config()), shapes, None)
            raise CheckpointMismatch(
                f"{path.name}: no preset fits these weights and the file does not describe itself; pass the "
                f"flags it was trained with. {describe_fit(shapes)}")
        kind, config, diffusion = preset.kind, preset.model_config(), preset.diffusion_config()
        metadata["flags"] = preset.flags
        source = f"preset {preset.name}"

    expected = expected_shapes(kind, config)
    if expected != shapes:
        raise _mismatch(path, source, kind, expected, shapes, flags)

    if preset is not None:
        metadata["sampling"] = [asdict(hint) for hint in preset.sampling]
    if kind == "superres" and "flags" in metadata:
        metadata["small_size"] = metadata["flags"]["small_size"]  # the low-res size it was trained on

    # Build without allocating, then adopt the loaded (fp32) tensors as parameters.
    module = build_model(kind, config, "meta")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    module.to(device)
    if hasattr(module, "convert_torso"):  # other families are small and stay fp32
        module.convert_torso(_resolve_dtype(dtype, device, config))
    module.eval().requires_grad_(False)
    return LoadedModel(kind=kind, module=module, config=config, diffusion=diffusion, class_names=class_names,
                       null_class=null_class, preset=preset.name if preset else None, path=str(path),
                       metadata=metadata)


# ---------------------------------------------------------------------------
# Saving

def save_checkpoint(module: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None,
                    *, fp16: bool = False) -> Path:
    """Write `module` as safetensors plus a sidecar `<stem>.json` that describes it.

    `meta` may hold diffusion_config (DiffusionConfig or dict), class_names, null_class
    and any JSON-serialisable extras; kind and model_config are filled from the module.
    With fp16=True float tensors are stored as float16 (restored to float32 on load).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_checkpoint writes .safetensors files, got {path.name}")
    desc = dict(meta or {})
    if "kind" not in desc:
        desc["kind"] = kind_of(module)
    if "model_config" not in desc:
        desc["model_config"] = module.cfg
    for key in ("model_config", "diffusion_config"):
        if hasattr(desc.get(key), "to_dict"):
            desc[key] = desc[key].to_dict()
    desc["storage_dtype"] = "float16" if fp16 else "float32"
    _from_description(path, desc)  # refuse to write a description that cannot be loaded
    try:
        text = json.dumps(desc, indent=1)
    except TypeError as err:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {err}") from err

    tensors = {}
    for k, v in module.state_dict().items():
        v = v.detach().to("cpu")
        if v.is_floating_point():
            v = v.to(torch.float16 if fp16 else torch.float32)
        tensors[k] = v.contiguous().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "explore": json.dumps(desc)})
    os.replace(tmp, path)
    sidecar = path.with_suffix(".json")
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, sidecar)
    return path


__all__ = [
    "CheckpointError", "CheckpointMismatch", "Guess", "LoadedModel", "build_model", "describe_fit",
    "expected_shapes", "find_preset", "guess_config", "kind_of", "load_model", "presets_matching_shapes",
    "read_checkpoint", "register_kind", "save_checkpoint",
]
