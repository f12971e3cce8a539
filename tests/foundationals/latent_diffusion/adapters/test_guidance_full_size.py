"""PAG and FreeU on the full-size SD1.5 UNet (860M parameters, random weights shared with diffusers' UNet).

One UNet call each, batch 2 on a 16x16 latent (fp32 CPU): FreeU against `enable_freeu`, PAG's perturbed pass
against diffusers' `PAGIdentitySelfAttnProcessor2_0` on the same layers. Tolerance: tests/support/parity.py
(`guidance_full`). Both share one model pair (built once, ~15 s); each test takes ~16 s more on 2 shared
cores, so they are opt-in: `FLUXION_SLOW=1`.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

from foundationals.latent_diffusion.adapters.guidance import PerturbedAttentionGuidance, inject_freeu
from foundationals.latent_diffusion.model_config import UNET_PRESETS
from tests.foundationals.latent_diffusion.test_unet import conditioning, reference_and_ours, run_both
from tests.support.parity import assert_parity

pytestmark = pytest.mark.skipif(
    os.environ.get("FLUXION_SLOW") != "1", reason="full-size model: set FLUXION_SLOW=1"
)


@pytest.fixture(scope="module")
def pair():
    reference, unet = reference_and_ours(UNET_PRESETS["sd15"])
    yield reference, unet
    del reference, unet
    gc.collect()


def test_full_size_freeu_equals_diffusers(pair):
    reference, unet = pair
    inputs = conditioning(unet.config, 2, 16, 16)
    plain = run_both(reference, unet, inputs)[1]
    reference.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    adapters = inject_freeu(unet, (1.3, 1.4), (0.9, 0.2), version=1, rule="up_blocks")
    try:
        expected, actual = run_both(reference, unet, inputs)
    finally:
        reference.disable_freeu()
        for adapter in reversed(adapters):
            adapter.eject()
    assert (actual - plain).abs().max() > 1e-3
    assert_parity("guidance_full", actual, expected)


def test_full_size_pag_perturbed_pass_equals_diffusers(pair):
    reference, unet = pair
    inputs = conditioning(unet.config, 1, 16, 16)
    layers = ["mid", "up_blocks.1.attentions.0"]
    processors = reference.attn_processors
    perturbed = {
        name: PAGIdentitySelfAttnProcessor2_0()
        if name.endswith("attn1.processor")
        and any(key in name for key in ("mid_block", "up_blocks.1.attentions.0"))
        else processor
        for name, processor in processors.items()
    }
    twice = {key: torch.cat([value, value]) for key, value in inputs.items()}
    plain = run_both(reference, unet, inputs)[1]
    reference.set_attn_processor(perturbed)  # the second half of the batch is perturbed
    guidance = PerturbedAttentionGuidance(unet, layers)
    try:
        expected = run_both(reference, unet, twice)[0]
        guidance.set_perturbed(True)
        unet.set_timestep(inputs["timestep"])
        unet.set_clip_text_embedding(inputs["text"])
        with torch.no_grad():
            actual = unet(inputs["x"])
    finally:
        guidance.eject()
        reference.set_attn_processor(processors)
    assert (actual - plain).abs().max() > 1e-3
    assert_parity("guidance_full", [plain, actual], list(expected.chunk(2)))
