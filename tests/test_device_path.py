"""The GPU path, checked on CPU: no host-device synchronisation inside the step loop, and channels-last / reduced
precision variants that a GPU run takes give the same images as the plain path (within precision)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import floors
import tiny_models
from explore.engine import Recipe, plan
from explore.zoo import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# Tensor methods that copy a device value to the host (a sync on CUDA) when called on a tensor
SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
           torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.nonzero,
           torch.Tensor.any, torch.Tensor.all}


class HostSyncs(TorchFunctionMode):
    """Records every call that would wait for the device (a host read of a tensor's value)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save_all(directory)
    v_config = replace(tiny_models.COSINE, predict_v=True)  # the built-in family's output
    save_checkpoint(tiny_models.build()["cond"], directory / "tiny_v.safetensors",
                    {"diffusion_config": v_config, "class_names": tiny_models.NAMES, "null_class": tiny_models.CLASSES})
    return tiny_models.registry(directory)


@pytest.mark.parametrize("sampler,karras", [("ddpm", False), ("ddim", False), ("euler_a", True), ("heun", True),
                                            ("dpmpp_2m", False)])
@pytest.mark.parametrize("guidance", ["none", "cfg", "classifier"])
@pytest.mark.parametrize("model", ["tiny_cond", "tiny_v"])
def test_the_step_loop_never_reads_device_values_on_the_host(registry, sampler, karras, guidance, model):
    extra = {"cfg": {"cfg_scale": 3.0}, "classifier": {"classifier": "tiny_classifier", "classifier_scale": 2.0},
             "none": {}}[guidance]
    run = plan(Recipe(model=model, class_label=1, sampler=sampler, respacing="4", karras=karras, batch_size=3,
                      **extra), registry)
    steps = run.steps()
    first = next(steps)  # set-up (weights, grids, first noise) may read values; the loop itself may not
    with HostSyncs() as mode:
        rest = list(steps)
    assert len(rest) == len(run.grid) - 1 - first.index
    assert mode.calls == [], f"host reads inside the step loop: {sorted(set(mode.calls))}"


def test_the_detector_sees_a_host_read():
    with HostSyncs() as mode:
        x = torch.ones(2)
        float(x.sum())
        bool((x > 0).all())
    assert "__float__" in mode.calls and "__bool__" in mode.calls


def test_channels_last_inputs_give_the_same_prediction(registry):
    from explore.denoisers import ADMDenoiser, Cond
    module = registry.get("tiny_cond").module
    x = torch.randn(3, 3, tiny_models.SIZE, tiny_models.SIZE, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([10, 500, 990]), Cond(labels=torch.tensor([0, 1, 4]))
    plain = ADMDenoiser(module, learn_sigma=True)(x, t, cond)
    last = ADMDenoiser(module, learn_sigma=True, channels_last=True)(x, t, cond)
    def both(prediction):
        return torch.cat([prediction.eps, prediction.var_values])
    # channels-last kernels sum in another order: within a multiple of the forward's own thread floor
    atol = floors.tolerance(lambda: both(ADMDenoiser(module, learn_sigma=True)(x, t, cond)))
    torch.testing.assert_close(last.eps, plain.eps, atol=atol, rtol=0)
    torch.testing.assert_close(last.var_values, plain.var_values, atol=atol, rtol=0)
    assert last.eps.is_contiguous()  # samplers get ordinary tensors back
