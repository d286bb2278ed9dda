"""Finding presets, loading checkpoints safely, explaining mismatches, saving our own models."""

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from explore import zoo
from explore.models.adm import EncoderUNetModel, UNetModel
from explore.models.configs import ClassifierConfig, DiffusionConfig, UNetConfig, unet_config_from_flags
from explore.models.presets import PRESETS

from floors import FACTOR, FLOOR_FORWARD

FIXTURES = Path(__file__).parent / "fixtures"
ADM32 = json.loads((FIXTURES / "adm32.json").read_text())
ADM32_PT = FIXTURES / "adm32.pt"


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def fake_checkpoint(path, shapes):
    """A state dict with the right keys and shapes that costs almost no disk (stride-0 tensors)."""
    torch.save({k: torch.zeros(()).expand(s) for k, s in shapes.items()}, path)
    return path


def preset_shapes(name):
    p = PRESETS[name]
    return zoo.expected_shapes(p.kind, p.model_config())


# --- finding presets -----------------------------------------------------------------------------

def test_find_preset_by_file_name():
    for preset in PRESETS.values():
        for file in preset.files:
            assert zoo.find_preset(f"/somewhere/models/{file}") is preset
        assert zoo.find_preset(f"{preset.name}.safetensors") is preset
    assert zoo.find_preset("my_model.pt") is None


# Presets with one layout: the same shapes name the first of them.
LAYOUT_OWNER = {"lsun_bedroom": "256x256_diffusion_uncond", "lsun_cat": "256x256_diffusion_uncond",
                "lsun_horse": "256x256_diffusion_uncond", "lsun_horse_nodropout": "256x256_diffusion_uncond"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_find_preset_by_shapes(name):
    shapes = preset_shapes(name)
    assert zoo.find_preset("renamed.pt", shapes).name == LAYOUT_OWNER.get(name, name)
    assert zoo.find_preset(f"{name}.pt", shapes).name == name  # the file name decides among equals
    # The name is not trusted when the shapes say otherwise.
    other = "64x64_classifier" if name != "64x64_classifier" else "128x128_classifier"
    assert zoo.find_preset(f"{other}.pt", shapes).name == LAYOUT_OWNER.get(name, name)


def test_no_preset_for_unknown_shapes():
    shapes = dict(preset_shapes("64x64_diffusion"))
    shapes.pop("label_emb.weight")
    assert zoo.find_preset("64x64_diffusion.pt", shapes) is None
    assert zoo.presets_matching_shapes(shapes) == []


def test_shapes_alone_give_the_architecture_back_for_every_preset():
    for preset in PRESETS.values():
        guess = zoo.guess_config(preset_shapes(preset.name))
        cfg = preset.model_config()
        assert guess.verified and guess.kind == preset.kind
        # Upsamplers to 256 and 512 share one channel table, so their size stays open.
        assert guess.size_known == (preset.kind != "superres")
        cfg = replace(cfg, image_size=guess.config.image_size)
        unreadable = dict(num_heads=4, num_head_channels=-1, num_heads_upsample=-1, dropout=0.0, use_fp16=False)
        if isinstance(cfg, UNetConfig):
            unreadable["use_new_attention_order"] = False
        else:
            unreadable.pop("num_heads"), unreadable.pop("num_heads_upsample"), unreadable.pop("num_head_channels")
        assert guess.config == replace(cfg, **unreadable), preset.name


# --- loading the reference weights ---------------------------------------------------------------

def test_adm32_loads_with_pasted_flags():
    ref = np.load(FIXTURES / "adm32_outputs.npz")
    argv = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 2 --attention_resolutions 16 "
            "--channel_mult 1,2 --class_cond False --use_scale_shift_norm True --resblock_updown True "
            "--learn_sigma True --noise_schedule linear --diffusion_steps 1000")
    loaded = zoo.load_model(ADM32_PT, flags=argv)
    assert loaded.kind == "diffusion" and loaded.preset is None and loaded.class_names is None
    assert loaded.config == unet_config_from_flags(ADM32["flags"])
    assert loaded.diffusion == DiffusionConfig(learn_sigma=True)
    module = loaded.module
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())
    with torch.no_grad():
        out = module(torch.from_numpy(ref["fwd_x"]), torch.from_numpy(ref["fwd_t"]))
    # the reference README's floor of this forward (floors.py)
    assert torch.allclose(out, torch.from_numpy(ref["fwd_out"]), atol=FACTOR * FLOOR_FORWARD, rtol=0)
    assert zoo.load_model(ADM32_PT, flags=ADM32["flags"]).config == loaded.config  # typed dict works too


def test_unknown_weights_without_flags_get_flag_suggestions():
    with pytest.raises(zoo.CheckpointMismatch) as err:
        zoo.load_model(ADM32_PT)
    msg = str(err.value)
    assert "no preset fits" in msg
    for flag in ("--num_channels 32", "--num_res_blocks 1", "--channel_mult 1,2", "--class_cond False",
                 "--learn_sigma True", "--attention_resolutions N/2", "--image_size N"):
        assert flag in msg, flag


@pytest.mark.parametrize("wrong,expect", [
    ({"class_cond": "True"}, ["1 missing", "label_emb.weight", "--class_cond True -> False"]),
    ({"num_channels": "64"}, ["wrong-shaped", "time_embed.0.weight [128, 32] in the file vs [256, 64]",
                              "--num_channels 64 -> 32"]),
    ({"num_res_blocks": "2"}, ["missing", "unexpected", "--num_res_blocks 2 -> 1"]),
    ({"learn_sigma": "False"}, ["out.2.weight [6, 32, 3, 3] in the file vs [3, 32, 3, 3]",
                                "--learn_sigma False -> True"]),
])
def test_wrong_flags_are_explained(wrong, expect):
    with pytest.raises(zoo.CheckpointMismatch) as err:
        zoo.load_model(ADM32_PT, flags={**ADM32["flags"], **wrong})
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    for text in expect:
        assert text in msg, (text, msg)
    assert "--image_size 32" in msg and "--attention_resolutions 16" in msg  # sized from the given flags


def test_head_count_does_not_show_in_the_weights():
    """num_heads changes no shape, so wrong heads load silently: the flags must be right."""
    ref = np.load(FIXTURES / "adm32_outputs.npz")
    loaded = zoo.load_model(ADM32_PT, flags={**ADM32["flags"], "num_heads": 1})
    with torch.no_grad():
        out = loaded.module(torch.from_numpy(ref["fwd_x"]), torch.from_numpy(ref["fwd_t"]))
    assert not torch.allclose(out, torch.from_numpy(ref["fwd_out"]), atol=FACTOR * FLOOR_FORWARD, rtol=0)


def test_official_layout_is_recognised_and_wrong_flags_name_the_preset(tmp_path):
    path = fake_checkpoint(tmp_path / "mystery.pt", preset_shapes("128x128_diffusion"))
    loaded = zoo.load_model(path)  # no name, no flags: found by shapes
    assert loaded.preset == "128x128_diffusion" and loaded.config == PRESETS["128x128_diffusion"].model_config()
    assert loaded.diffusion.noise_schedule == "linear"
    assert loaded.metadata["sampling"][0]["classifier_scale"] == 0.5
    with pytest.raises(zoo.CheckpointMismatch) as err:
        zoo.load_model(path, flags=PRESETS["256x256_diffusion"].cli_flags)
    assert "These weights fit preset 128x128_diffusion: --attention_resolutions 32,16,8" in str(err.value)


def test_file_named_like_a_preset_with_other_weights(tmp_path):
    path = fake_checkpoint(tmp_path / "64x64_classifier.pt", preset_shapes("64x64_classifier"))
    assert zoo.load_model(path).preset == "64x64_classifier"
    shapes = dict(preset_shapes("64x64_classifier"))
    shapes["out.2.c_proj.weight"], shapes["out.2.c_proj.bias"] = (10, 512, 1), (10,)
    fake_checkpoint(path, shapes)
    with pytest.raises(zoo.CheckpointMismatch) as err:
        zoo.load_model(path)
    msg = str(err.value)
    assert "preset 64x64_classifier (chosen by the file name)" in msg
    assert "out.2.c_proj.weight [10, 512, 1] in the file vs [1000, 512, 1] in the model" in msg


def test_superres_flags_for_an_upsampler_layout(tmp_path):
    path = fake_checkpoint(tmp_path / "up.pt", preset_shapes("64_256_upsampler"))
    flags = PRESETS["64_256_upsampler"].cli_flags.replace("--small_size 64", "--small_size 32")
    loaded = zoo.load_model(path, flags=flags)
    assert loaded.kind == "superres" and loaded.config.super_res and loaded.metadata["small_size"] == 32


# --- refusing bad files ----------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"time_embed.0.weight": torch.zeros(4, 1), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil2.pt", "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f, protocol=2)
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(zoo.CheckpointError) as err:
            zoo.load_model(tmp_path / name)
        assert not isinstance(err.value, zoo.CheckpointMismatch)
        assert "refused" in str(err.value) and "never unpickled" in str(err.value)
    assert not marker.exists()


def test_truncated_and_empty_files_get_a_clear_error(tmp_path):
    data = ADM32_PT.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("cut.pt", "empty.pt"):
        with pytest.raises(zoo.CheckpointError, match="truncated or corrupt") as err:
            zoo.load_model(tmp_path / name, flags=ADM32["flags"])
        assert str(tmp_path / name) in str(err.value)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(zoo.CheckpointError, match="truncated or corrupt"):
        zoo.load_model(tmp_path / "cut.safetensors")


def test_training_checkpoint_is_not_a_state_dict(tmp_path):
    state = torch.load(ADM32_PT, map_location="cpu", weights_only=True)
    torch.save({"model": state, "step": 10}, tmp_path / "train.pt")
    with pytest.raises(zoo.CheckpointError, match=r"not a plain state dict.*under \['model'\]"):
        zoo.load_model(tmp_path / "train.pt", flags=ADM32["flags"])


# --- our own checkpoints ---------------------------------------------------------------------------

TINY = UNetConfig(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, attention_ds=(2,),
                  channel_mult=(1, 2), num_classes=5, num_heads=2, use_new_attention_order=True)


def test_safetensors_round_trip_preserves_outputs(tmp_path):
    model = randomize(UNetModel(TINY))
    names = ["alpine", "desert", "ocean", "forest"]
    meta = {"diffusion_config": DiffusionConfig(noise_schedule="cosine", learn_sigma=True),
            "class_names": names, "null_class": 4, "trained_steps": 1200}
    path = zoo.save_checkpoint(model, tmp_path / "base32.safetensors", meta)
    sidecar = json.loads((tmp_path / "base32.json").read_text())
    assert sidecar["kind"] == "diffusion" and sidecar["model_config"]["use_new_attention_order"] is True

    loaded = zoo.load_model(path)
    assert (loaded.kind, loaded.config, loaded.class_names, loaded.null_class) == ("diffusion", TINY, names, 4)
    assert loaded.diffusion.noise_schedule == "cosine" and loaded.metadata["trained_steps"] == 1200
    assert loaded.preset is None
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        assert torch.equal(model(x, t, y=y), loaded.module(x, t, y=y))

    (tmp_path / "base32.json").unlink()  # the safetensors header carries the same description
    assert zoo.load_model(path).config == TINY


def test_fp16_storage_restores_fp32(tmp_path):
    model = randomize(EncoderUNetModel(ClassifierConfig(
        image_size=16, model_channels=32, out_channels=8, num_res_blocks=1, attention_ds=(2,),
        channel_mult=(1, 2), num_head_channels=32)))
    path = zoo.save_checkpoint(model, tmp_path / "clf.safetensors", {}, fp16=True)
    assert os.path.getsize(path) < sum(p.numel() for p in model.parameters()) * 2 + 10_000
    loaded = zoo.load_model(path)
    assert loaded.kind == "classifier" and loaded.diffusion is None and loaded.num_classes == 8
    for (k, a), b in zip(model.state_dict().items(), loaded.module.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b), k


def test_custom_pt_is_read_back_from_its_shapes(tmp_path):
    cfg = replace(TINY, num_classes=1000, channel_mult=(1, 2, 3, 4), image_size=64, attention_ds=(2, 4),
                  resblock_updown=False, use_new_attention_order=False)
    torch.save(UNetModel(cfg).state_dict(), tmp_path / "custom.pt")
    with pytest.raises(zoo.CheckpointMismatch) as err:
        zoo.load_model(tmp_path / "custom.pt")
    assert ("--image_size 64 --num_channels 32 --num_res_blocks 1 --attention_resolutions 32,16 "
            "--class_cond True --learn_sigma True --use_scale_shift_norm True --resblock_updown False") in str(err.value)
    state, description = zoo.read_checkpoint(tmp_path / "custom.pt")
    guess = zoo.guess_config({k: v.shape for k, v in state.items()})
    assert description is None
    assert guess.verified and guess.config == replace(cfg, num_heads=4)


def test_dtype_on_load(tmp_path):
    fp32 = zoo.load_model(ADM32_PT, flags=ADM32["flags"])
    bf16 = zoo.load_model(ADM32_PT, flags=ADM32["flags"], dtype="bf16")
    assert fp32.module.torso_dtype == torch.float32  # CPU default
    assert bf16.module.torso_dtype == torch.bfloat16 and bf16.module.time_embed[0].weight.dtype == torch.float32
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([100])
    with torch.no_grad():
        assert (fp32.module(x, t) - bf16.module(x, t)).abs().max() < 0.1
    with pytest.raises(ValueError, match="unsupported dtype"):
        zoo.load_model(ADM32_PT, flags=ADM32["flags"], dtype="int8")


def test_build_model_checks_kind_and_config():
    with pytest.raises(ValueError, match="cannot be built"):
        zoo.build_model("classifier", TINY)
    with pytest.raises(ValueError, match="cannot be built"):
        zoo.build_model("superres", TINY)
    module = zoo.build_model("superres", replace(TINY, super_res=True), device="meta")
    assert module.input_blocks[0][0].weight.shape[1] == 6 and zoo.kind_of(module) == "superres"


def test_other_model_families_can_register(tmp_path):
    from dataclasses import asdict, dataclass

    @dataclass(frozen=True)
    class NetConfig:
        width: int
        num_classes: int

        def to_dict(self):
            return asdict(self)

        @classmethod
        def from_dict(cls, d):
            return cls(**d)

    class Net(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.body = torch.nn.Linear(cfg.width, cfg.num_classes)

    zoo.register_kind("test_net", NetConfig, Net)
    net = randomize(Net(NetConfig(width=4, num_classes=3)))
    path = zoo.save_checkpoint(net, tmp_path / "net.safetensors", {"class_names": ["a", "b", "c"]})
    loaded = zoo.load_model(path, dtype="bf16")
    assert loaded.kind == "test_net" and loaded.num_classes == 3 and loaded.class_names == ["a", "b", "c"]
    assert torch.equal(loaded.module.body.weight, net.body.weight)  # other families stay fp32
    bad = json.loads((tmp_path / "net.json").read_text())
    (tmp_path / "net.json").write_text(json.dumps({**bad, "kind": "unheard_of"}))
    with pytest.raises(zoo.CheckpointError, match="unknown kind 'unheard_of'"):
        zoo.load_model(path)
