"""The compile patch (the Fluxion Compile node): compiled runs equal eager ones, also with a LoRA injected after
the compile, and the UNet is eager again after the run (a branch without the patch runs eagerly).

Tiny SD1.5, txt2img with CFG, dynamo with the `aot_eager` backend (the same guards, graphs and recompiles as
inductor without C++ code generation: seconds instead of minutes here). Measured max abs difference to eager: 0;
tolerance 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from fluxion import layers as fl
from fluxion.adapters.lora import SingleLoraAdapter
from fluxion.compile import compiled_modules
from foundationals.latent_diffusion.compile_patch import CompilePatch
from foundationals.latent_diffusion.model_patch import SamplingRun
from tests.support.guided import guided_text_to_image
from tests.support.tiny_sd import (
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)

TOLERANCE = 1e-5


class OutputProjectionLora:
    """A test `ModelPatch`: a rank-4 LoRA (strong random weights) on the first attention's output projection."""

    label = "test LoRA"

    def apply(self, model, run: SamplingRun | None):
        attention = next(model.unet.layers(fl.Attention))
        linear = list(attention)[-1]
        adapter = SingleLoraAdapter(linear, rank=4)
        generator = torch.Generator().manual_seed(9)
        for parameter in adapter.lora.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 2.0
        adapter.inject(attention)
        return adapter.eject


@pytest.fixture(scope="module")
def sd():
    return ours_from_diffusers(diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder())


def run(sd, patches) -> torch.Tensor:
    return guided_text_to_image(sd, patches, "a red fox", "blurry", steps=2, guidance_scale=6.0, seed=3)


def test_compiled_runs_equal_eager_and_follow_adapters_injected_after_the_compile(sd):
    torch._dynamo.reset()
    compile_patch = CompilePatch(backend="aot_eager")
    eager = run(sd, [])
    compiled = run(sd, [compile_patch])
    assert compiled_modules(sd.unet) == []  # eager again after the run
    assert (compiled - eager).abs().max().item() <= TOLERANCE

    eager_lora = run(sd, [OutputProjectionLora()])
    assert (eager_lora - eager).abs().max().item() > 1e-3  # the LoRA changes the image
    compiled_lora = run(sd, [compile_patch, OutputProjectionLora()])
    assert (compiled_lora - eager_lora).abs().max().item() <= TOLERANCE
    # the LoRA gone again, the compiled blocks follow back (recompiled or reused graphs, never stale)
    assert (run(sd, [compile_patch]) - eager).abs().max().item() <= TOLERANCE
    assert compiled_modules(sd.unet) == []


def test_bad_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        CompilePatch(backend="nope")
