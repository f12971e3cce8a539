"""The opt-in torch.compile path: compiled UNet blocks give the eager outputs, also after adapters come and go.

Tiny UNet. The default run uses dynamo with the `aot_eager` backend (guards, recompiles and graphs as with
inductor, no C++ code generation: ~20 s here); the inductor run (C++ kernels, minutes on a 2-core CPU) is
opt-in with FLUXION_SLOW=1. Measured max abs differences to eager: 0 (aot_eager), 5e-8 (inductor).
"""

from __future__ import annotations

import os

import pytest
import torch

from fluxion import layers as fl
from fluxion.adapters.lora import SingleLoraAdapter
from fluxion.compile import channels_last, compiled_modules, uncompile
from foundationals.latent_diffusion.model_config import TINY_UNET
from foundationals.latent_diffusion.unet import HEAVY_BLOCKS, ResidualBlock, UNet, compile_unet

BACKENDS = [
    "aot_eager",
    pytest.param(
        "inductor",
        marks=pytest.mark.skipif(
            os.environ.get("FLUXION_SLOW") != "1", reason="inductor compile takes minutes: set FLUXION_SLOW=1"
        ),
    ),
]


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(TINY_UNET)
    for parameter in unet.parameters():
        parameter.data.normal_(0, 0.05 if parameter.dim() > 1 else 0.1)
    return unet


def output_projection(unet: UNet) -> tuple[fl.Linear, fl.Chain]:
    attention = next(unet.layers(fl.Attention))
    linear = list(attention)[-1]
    assert isinstance(linear, fl.Linear)
    return linear, attention


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_unet_equals_eager_through_inject_eject_and_weight_changes(backend):
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 7, TINY_UNET.context_dim, generator=generator)

    def step() -> torch.Tensor:
        unet.set_timestep(torch.tensor([500.0]))
        unet.set_clip_text_embedding(text)
        with torch.no_grad():
            return unet(x)

    def eager() -> torch.Tensor:
        uncompile(unet)
        try:
            return step()
        finally:
            compile_unet(unet, backend=backend)

    torch._dynamo.reset()
    plain = step()
    compiled = compile_unet(unet, backend=backend)
    assert compiled and all(isinstance(module, HEAVY_BLOCKS) for module in compiled)
    assert (step() - plain).abs().max().item() <= 1e-5

    linear, attention = output_projection(unet)
    adapter = SingleLoraAdapter(linear, rank=4)
    for parameter in adapter.lora.parameters():
        parameter.data.normal_(0, 2.0)
    adapter.inject(attention)
    adapted = step()
    expected = eager()
    assert (expected - plain).abs().max().item() > 1e-3  # the LoRA changes the output
    assert (adapted - expected).abs().max().item() <= 1e-5

    adapter.eject()
    assert (step() - plain).abs().max().item() <= 1e-5

    convolution = next(next(unet.layers(ResidualBlock)).layers(fl.Conv2d))
    with torch.no_grad():  # in-place weight changes (as LoRA fuse/unfuse do) are seen: weights are not frozen
        convolution.weight.normal_(0, 1.0)
    changed = step()
    assert (changed - plain).abs().max().item() > 1e-3
    assert (changed - eager()).abs().max().item() <= 1e-5

    uncompile(unet)
    assert compiled_modules(unet) == []


def test_channels_last_weights_give_the_same_outputs_and_go_back():
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 7, TINY_UNET.context_dim, generator=generator)
    unet.set_timestep(torch.tensor([500.0]))
    unet.set_clip_text_embedding(text)
    before = {key: value.clone() for key, value in unet.state_dict().items()}
    parameters = list(unet.parameters())
    with torch.no_grad():
        plain = unet(x)
        assert channels_last(unet) > 0
        assert list(unet.parameters()) == parameters  # same Parameter objects, new layout
        nhwc = unet(x)
        assert channels_last(unet, enabled=False) > 0
        back = unet(x)
    assert (nhwc - plain).abs().max().item() <= 1e-5
    assert torch.equal(back, plain)
    assert all(value.is_contiguous() for value in unet.state_dict().values())
    assert all(torch.equal(value, before[key]) for key, value in unet.state_dict().items())
