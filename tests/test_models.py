"""ADM networks, configs and presets against the original's layouts and outputs."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from explore.models.adm import EncoderUNetModel, SuperResModel, UNetModel, legacy_to_new_qkv, timestep_embedding
from explore.models.configs import (
    ClassifierConfig,
    DiffusionConfig,
    UNetConfig,
    classifier_config_from_flags,
    diffusion_config_from_flags,
    flags_from_config,
    parse_bool,
    parse_flag_args,
    superres_config_from_flags,
    unet_config_from_flags,
)
from explore.models.presets import PRESETS, get_preset

from floors import EPS32, FACTOR, FLOOR_FORWARD, tolerance

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = json.loads((FIXTURES / "official_configs.json").read_text())
ADM32 = json.loads((FIXTURES / "adm32.json").read_text())


def _official_entries():
    """(preset name, official entry, expected dropout) for every released file."""
    for key, entry in OFFICIAL.items():
        for part in key.split(" / "):
            name = part.split(" ")[0].removesuffix(".pt")
            dropout = 0.0 if name == "lsun_horse_nodropout" else entry["flags"].get("dropout")
            yield name, entry, dropout


OFFICIAL_ENTRIES = list(_official_entries())


def build(kind, cfg, device="cpu"):
    with torch.device(device):
        return EncoderUNetModel(cfg) if kind == "classifier" else UNetModel(cfg)


def randomize(module, seed=0):
    """Small random values everywhere (fresh ADM models zero their output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


TINY = UNetConfig(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, attention_ds=(2,),
                  channel_mult=(1, 2), num_heads=2)
TINY_CLASSIFIER = ClassifierConfig(image_size=16, model_channels=32, out_channels=10, num_res_blocks=1,
                                   attention_ds=(2,), channel_mult=(1, 2), num_head_channels=32)


# --- presets and flags -------------------------------------------------------------------------

def test_every_official_checkpoint_has_a_preset():
    assert sorted(name for name, _, _ in OFFICIAL_ENTRIES) == sorted(PRESETS)


@pytest.mark.parametrize("name,entry,dropout", OFFICIAL_ENTRIES, ids=[e[0] for e in OFFICIAL_ENTRIES])
def test_preset_builds_the_official_layout(name, entry, dropout):
    preset = PRESETS[name]
    expected_flags = dict(entry["flags"], **({"dropout": dropout} if dropout is not None else {}))
    assert preset.flags == expected_flags
    module = build(preset.kind, preset.model_config(), "meta")
    layout = [[k, list(v.shape)] for k, v in module.state_dict().items()]
    assert layout == entry["state_dict"]  # same keys, same order, same shapes
    assert sum(p.numel() for p in module.parameters()) == entry["num_params"]


def test_presets_know_the_readme_sampling_settings():
    scales = {"64x64_diffusion": 1.0, "128x128_diffusion": 0.5, "256x256_diffusion": 1.0,
              "256x256_diffusion_uncond": 10.0, "512x512_diffusion": 4.0}
    for name, scale in scales.items():
        hint = PRESETS[name].sampling[0]
        assert (hint.timestep_respacing, hint.classifier_scale) == ("250", scale)
        assert PRESETS[hint.classifier].kind == "classifier"
    ddim = PRESETS["128x128_diffusion"].sampling[1]
    assert (ddim.timestep_respacing, ddim.use_ddim, ddim.classifier_scale) == ("ddim25", True, 1.0)
    assert PRESETS["lsun_cat"].sampling[0].timestep_respacing == "1000"
    assert get_preset("64x64_diffusion.pt") is PRESETS["64x64_diffusion"]
    with pytest.raises(KeyError, match="did you mean"):
        get_preset("64x64_difusion")


def test_attention_order_follows_the_flags():
    assert PRESETS["64x64_diffusion"].model_config().use_new_attention_order
    others = [p for p in PRESETS.values() if p.name != "64x64_diffusion" and p.kind != "classifier"]
    assert not any(p.model_config().use_new_attention_order for p in others)


def test_flags_pasted_from_a_command_line():
    argv = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
            "--image_size 64 --learn_sigma true --noise_schedule cosine --num_channels=192 "
            "--num_head_channels 64 --num_res_blocks 3 --resblock_updown 1 --use_new_attention_order True "
            "--use_fp16 True --use_scale_shift_norm True --timestep_respacing 250 --use_ddim False")
    flags = parse_flag_args(argv)
    assert flags["num_channels"] == "192" and flags["learn_sigma"] == "true"
    assert parse_flag_args(argv.split()) == flags
    cfg = unet_config_from_flags(flags)
    assert cfg == PRESETS["64x64_diffusion"].model_config()
    assert cfg.attention_ds == (2, 4, 8) and cfg.channel_mult == (1, 2, 3, 4) and cfg.num_classes == 1000
    diffusion = diffusion_config_from_flags(flags)
    assert diffusion == DiffusionConfig(noise_schedule="cosine", learn_sigma=True, timestep_respacing="250")
    with pytest.raises(ValueError, match="needs a value"):
        parse_flag_args(["--image_size"])


def test_flag_values_are_typed_and_checked():
    assert [parse_bool(v) for v in ("True", "false", "1", "0", "yes", "F", True, 0)] == \
        [True, False, True, False, True, False, True, False]
    with pytest.raises(ValueError, match="boolean"):
        parse_bool("maybe")
    with pytest.raises(ValueError, match="--num_channels expects an integer"):
        unet_config_from_flags({"num_channels": "wide"})
    with pytest.raises(ValueError, match="did you mean --num_head_channels"):
        unet_config_from_flags({"num_head_channel": 64})
    cfg = unet_config_from_flags({"image_size": "32", "channel_mult": "1,2", "attention_resolutions": [16, 8],
                                  "num_channels": 64.0})
    assert (cfg.channel_mult, cfg.attention_ds, cfg.model_channels) == ((1.0, 2.0), (2, 4), 64)


def test_channel_mult_tables_and_unsupported_sizes():
    assert unet_config_from_flags({"image_size": 512}).channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    assert unet_config_from_flags({"image_size": 128}).channel_mult == (1, 1, 2, 3, 4)
    assert classifier_config_from_flags({"image_size": 256}).channel_mult == (1, 1, 2, 2, 4, 4)
    assert superres_config_from_flags({"large_size": 512}).channel_mult == (1, 1, 2, 2, 4, 4)
    assert superres_config_from_flags({"large_size": 64}).channel_mult == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="unsupported image size: 32"):
        unet_config_from_flags({"image_size": 32})
    with pytest.raises(ValueError, match="unsupported image size: 96"):
        classifier_config_from_flags({"image_size": 96})
    with pytest.raises(ValueError, match="unsupported large size: 128"):
        superres_config_from_flags({"large_size": 128})
    with pytest.raises(ValueError, match="beta schedule"):
        diffusion_config_from_flags({"noise_schedule": "quadratic"})


def test_configs_round_trip_through_json():
    for cfg in [*(p.model_config() for p in PRESETS.values()), TINY, TINY_CLASSIFIER, DiffusionConfig()]:
        back = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        UNetConfig.from_dict({**TINY.to_dict(), "wings": 2})


def test_flags_from_config_inverts_the_flag_functions():
    for preset in PRESETS.values():
        cfg = preset.model_config()
        build_fn = {"diffusion": unet_config_from_flags, "superres": superres_config_from_flags,
                    "classifier": classifier_config_from_flags}[preset.kind]
        assert build_fn(flags_from_config(cfg)) == cfg


# --- forward passes ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adm32():
    model = UNetModel(unet_config_from_flags(ADM32["flags"]))
    state = torch.load(FIXTURES / "adm32.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_adm32_forward_matches_the_original(adm32):
    ref = np.load(FIXTURES / "adm32_outputs.npz")
    assert [[k, list(v.shape)] for k, v in adm32.state_dict().items()] == [e[:2] for e in ADM32["state_dict"]]
    assert sum(p.numel() for p in adm32.parameters()) == ADM32["num_params"]
    with torch.no_grad():
        out = adm32(torch.from_numpy(ref["fwd_x"]), torch.from_numpy(ref["fwd_t"]))
    err = (out - torch.from_numpy(ref["fwd_out"])).abs().max().item()
    print(f"adm32 forward max abs error vs original: {err:.3g}")
    assert err < FACTOR * FLOOR_FORWARD  # the reference README's floor of this forward


def test_adm32_channels_last_and_float_timesteps(adm32):
    ref = np.load(FIXTURES / "adm32_outputs.npz")
    x, t = torch.from_numpy(ref["fwd_x"]), torch.from_numpy(ref["fwd_t"])
    model = UNetModel(adm32.cfg).eval()
    model.load_state_dict(adm32.state_dict())
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x.contiguous(memory_format=torch.channels_last), t.double())
    # channels-last convolutions sum in another order: a few times the forward's floor at most
    err = (out - torch.from_numpy(ref["fwd_out"])).abs().max().item()
    assert err < FACTOR * FLOOR_FORWARD, err


def test_timestep_embedding_matches_reference():
    ref = np.load(FIXTURES / "diffusion_outputs.npz")
    t = torch.from_numpy(ref["temb_t"])
    atol = FACTOR * EPS32  # elementwise cos / sin of values in [-1, 1]: a few ulps (no reductions)
    assert torch.allclose(timestep_embedding(t, 32), torch.from_numpy(ref["temb_dim32"]), atol=atol, rtol=0)
    assert torch.allclose(timestep_embedding(t, 33), torch.from_numpy(ref["temb_dim33"]), atol=atol, rtol=0)
    half = timestep_embedding(torch.tensor([2.5]), 8)
    freqs = torch.exp(-np.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(half[0], torch.cat([torch.cos(2.5 * freqs), torch.sin(2.5 * freqs)]), atol=atol, rtol=0)


def test_legacy_and_new_attention_order_are_a_channel_permutation():
    legacy = randomize(UNetModel(TINY))
    new = UNetModel(replace(TINY, use_new_attention_order=True)).eval()
    heads, state = TINY.num_heads, legacy.state_dict()
    for key, value in list(state.items()):
        if ".qkv." in key:
            rows = value.shape[0]
            c, d = rows // 3, rows // 3 // heads
            perm = torch.empty(rows, dtype=torch.long)
            for p in range(3):
                for h in range(heads):
                    for i in range(d):
                        perm[p * c + h * d + i] = h * 3 * d + p * d + i  # new row <- legacy row
            state[key] = value[perm]
            assert torch.equal(state[key], legacy_to_new_qkv(value, heads))
    new.load_state_dict(state)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        a, b = legacy(x, t), new(x, t)
        unpermuted = UNetModel(replace(TINY, use_new_attention_order=True)).eval()
        unpermuted.load_state_dict(legacy.state_dict())
        c = unpermuted(x, t)
        atol = tolerance(lambda: legacy(x, t))  # the permuted rows only reorder sums
    assert torch.allclose(a, b, atol=atol, rtol=0), ((a - b).abs().max(), atol)
    assert not torch.allclose(a, c, atol=1e-3)  # the order matters, so it must come from the flags


def test_fresh_model_outputs_zeros_like_the_original():
    with torch.no_grad():
        out = UNetModel(TINY).eval()(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    assert torch.count_nonzero(out) == 0


def test_class_conditional_unet_needs_labels():
    model = randomize(UNetModel(replace(TINY, num_classes=5)))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    with torch.no_grad():
        a, b = model(x, t, y=torch.tensor([0, 1])), model(x, t, y=torch.tensor([1, 1]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class labels"):
        model(x, t)
    with pytest.raises(ValueError, match="class labels"):
        randomize(UNetModel(TINY))(x, t, y=torch.tensor([0, 1]))


def test_scalar_timestep_broadcasts_over_the_batch():
    model = randomize(UNetModel(TINY))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        atol = tolerance(lambda: model(x, torch.full((3,), 250)))
        assert torch.allclose(model(x, torch.tensor(250)), model(x, torch.full((3,), 250)), atol=atol, rtol=0)


def test_tiny_super_resolution_model():
    cfg = replace(TINY, super_res=True, num_classes=4, use_scale_shift_norm=False, resblock_updown=False)
    model = randomize(SuperResModel(cfg))
    assert model.state_dict()["input_blocks.0.0.weight"].shape == (32, 6, 3, 3)
    # Without resblock_updown: strided conv down, nearest + conv up (after the attention block).
    assert {"input_blocks.2.0.op.weight", "output_blocks.1.2.conv.weight"} <= set(model.state_dict())
    x, low, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 4), torch.tensor([0, 3])
    with torch.no_grad():
        out = model(x, torch.tensor([10.5, 999.0]), low_res=low, y=y)
        other = model(x, torch.tensor([10.5, 999.0]), low_res=low.flip(-1), y=y)
        # The low-res image is upsampled bilinearly (no antialias) and concatenated after x.
        up = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
        plain = UNetModel(replace(cfg, super_res=False, in_channels=6)).eval()
        plain.load_state_dict(model.state_dict())
        atol = tolerance(lambda: model(x, torch.tensor([10.5, 999.0]), low_res=low, y=y))
        assert torch.allclose(plain(torch.cat([x, up], 1), torch.tensor([10.5, 999.0]), y=y), out, atol=atol, rtol=0)
    assert out.shape == (2, 6, 16, 16)
    assert not torch.allclose(out, other, atol=1e-4)
    with pytest.raises(ValueError, match="low_res"):
        model(x, torch.tensor([1, 2]), y=y)
    with pytest.raises(ValueError, match="super_res"):
        SuperResModel(TINY)


def test_tiny_classifier():
    model = randomize(EncoderUNetModel(TINY_CLASSIFIER))
    keys = model.state_dict()
    assert keys["out.2.positional_embedding"].shape == (64, 8 * 8 + 1)
    assert keys["out.2.c_proj.weight"].shape == (10, 64, 1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x, torch.tensor([0.25, 640.75]))
        shifted = model(x, torch.tensor([100.0, 640.75]))
        atol = tolerance(lambda: model(x, torch.tensor([0.25, 640.75])))
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last),
                                                          torch.tensor([0.25, 640.75]))
    assert logits.shape == (2, 10)
    assert not torch.allclose(logits[0], shifted[0]) and torch.allclose(logits[1], shifted[1], atol=atol, rtol=0)
    assert torch.allclose(logits, cl, atol=atol, rtol=0), ((logits - cl).abs().max(), atol)
    adaptive = EncoderUNetModel(replace(TINY_CLASSIFIER, pool="adaptive"))
    assert adaptive(x, torch.tensor([1, 2])).shape == (2, 10)


def test_fp16_torso_matches_the_original_scheme():
    model = randomize(UNetModel(TINY))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        ref = model(x, t)
        model.convert_to_fp16()
        sd = model.state_dict()
        assert sd["input_blocks.1.0.in_layers.2.weight"].dtype == torch.float16
        assert sd["input_blocks.3.1.qkv.weight"].dtype == torch.float16
        assert sd["output_blocks.0.0.skip_connection.weight"].dtype == torch.float16
        for key in ("time_embed.0.weight", "out.2.weight", "input_blocks.1.0.in_layers.0.weight",
                    "input_blocks.1.0.emb_layers.1.weight"):
            assert sd[key].dtype == torch.float32, key
        model.convert_torso(torch.bfloat16)
        out = model(x, t)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    classifier = EncoderUNetModel(TINY_CLASSIFIER).convert_to_fp16()
    assert classifier.out[2].qkv_proj.weight.dtype == torch.float32
    assert classifier.middle_block[1].qkv.weight.dtype == torch.float16
