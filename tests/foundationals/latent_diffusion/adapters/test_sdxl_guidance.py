"""Guidance adapters on SDXL equal diffusers on identical tiny random weights (32x48 images, DDIM, fp32 CPU).

FreeU (`enable_freeu`), rescaled CFG (`guidance_rescale`), CFG cutoff (`SDXLCFGCutoffCallback`) and PAG
(`StableDiffusionXLPAGPipeline`) against diffusers' SDXL pipelines. diffusers has no SDXL SAG pipeline: the
reference is `StableDiffusionSAGPipeline`'s own loop written out around the SDXL UNet (its attention store
processor, `pred_x0`, `pred_epsilon` and `sag_masking` methods, SDXL's added conditioning). Tolerance:
tests/support/parity.py (`guidance_sdxl`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.callbacks import SDXLCFGCutoffCallback
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    CrossAttnStoreProcessor,
    StableDiffusionSAGPipeline,
)
from diffusers.pipelines.pag.pipeline_pag_sd_xl import StableDiffusionXLPAGPipeline

from foundationals.latent_diffusion.adapters.guidance import (
    CFGCutoffPatch,
    FreeUPatch,
    PAGPatch,
    RescaleCFGPatch,
    SAGPatch,
)
from tests.support.guided import guided_text_to_image
from tests.support.parity import assert_parity
from tests.support.tiny_sdxl import SDXL_SCHEDULER, diffusers_sdxl_components, ours_from_diffusers

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

PROMPT, NEGATIVE, STEPS, CFG, SEED, HEIGHT, WIDTH = "a lighthouse at dusk", "blurry", 5, 5.0, 7, 32, 48


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    parts = diffusers_sdxl_components(tmp_path_factory.mktemp("tokenizers"))
    return parts, ours_from_diffusers(parts)


def ddim() -> DDIMScheduler:
    return DDIMScheduler(**SDXL_SCHEDULER, clip_sample=False, set_alpha_to_one=False)


def diffusers_image(kind, parts, config=None, **options) -> torch.Tensor:
    pipe = kind(**parts, scheduler=ddim(), add_watermarker=False, **(config or {}))
    defaults = dict(
        negative_prompt=NEGATIVE,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pt",
    )
    return pipe(PROMPT, **dict(defaults, **options)).images


def ours(sd, patches, **options) -> torch.Tensor:
    defaults = dict(width=WIDTH, height=HEIGHT, steps=STEPS, guidance_scale=CFG, seed=SEED)
    return guided_text_to_image(sd, patches, PROMPT, NEGATIVE, **dict(defaults, **options))


def test_freeu_equals_diffusers(components):
    parts, sd = components
    factors = dict(b1=1.2, b2=1.3, s1=0.8, s2=0.4)
    parts["unet"].enable_freeu(**factors)
    try:
        expected = diffusers_image(StableDiffusionXLPipeline, parts)
    finally:
        parts["unet"].disable_freeu()
    result = ours(sd, [FreeUPatch(**factors, rule="up_blocks")])
    assert (result - ours(sd, [])).abs().max() > 1e-3
    assert_parity("guidance_sdxl", result, expected)


def test_rescaled_cfg_and_cutoff_equal_diffusers(components):
    parts, sd = components
    expected = diffusers_image(StableDiffusionXLPipeline, parts, guidance_rescale=0.7)
    assert_parity("guidance_sdxl", ours(sd, [RescaleCFGPatch(0.7)]), expected)
    callback = SDXLCFGCutoffCallback(cutoff_step_ratio=0.5)
    expected = diffusers_image(StableDiffusionXLPipeline, parts, callback_on_step_end=callback)
    assert_parity("guidance_sdxl", ours(sd, [CFGCutoffPatch(0.5)]), expected)


@pytest.mark.parametrize("layers", [["mid"], ["down_blocks.2.attentions.0", "up_blocks.0"]])
def test_pag_equals_diffusers_sdxl_pag_pipeline(components, layers):
    parts, sd = components
    config = dict(pag_applied_layers=layers)
    expected = diffusers_image(StableDiffusionXLPAGPipeline, parts, config, pag_scale=3.0)
    assert_parity("guidance_sdxl", ours(sd, [PAGPatch(3.0, layers)]), expected)


def diffusers_sdxl_sag(parts, scale: float) -> torch.Tensor:
    """StableDiffusionSAGPipeline's denoising loop, with SDXL's conditioning, on diffusers' SDXL UNet."""
    pipe = StableDiffusionXLPipeline(**parts, scheduler=ddim(), add_watermarker=False)
    device = torch.device("cpu")
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, device=device, do_classifier_free_guidance=True, negative_prompt=NEGATIVE
    )
    size = (HEIGHT, WIDTH)
    time_ids = pipe._get_add_time_ids(
        size, (0, 0), size, dtype=positive.dtype, text_encoder_projection_dim=int(pooled.shape[-1])
    )
    scheduler, unet = pipe.scheduler, parts["unet"]
    scheduler.set_timesteps(STEPS, device=device)
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = pipe.prepare_latents(1, 4, HEIGHT, WIDTH, positive.dtype, device, generator)
    helper = SimpleNamespace(unet=unet, scheduler=scheduler)  # what the SAG methods read from their pipeline
    store, processors = CrossAttnStoreProcessor(), unet.attn_processors
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor = store
    grid: list[torch.Size] = []
    hook = unet.mid_block.attentions[0].register_forward_hook(
        lambda module, inputs, output: grid.append(output[0].shape[-2:])
    )
    try:
        with torch.no_grad():
            for t in scheduler.timesteps:
                both = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                added = {
                    "text_embeds": torch.cat([negative_pooled, pooled]),
                    "time_ids": time_ids.repeat(2, 1),
                }
                prediction = unet(
                    both, t, encoder_hidden_states=torch.cat([negative, positive]), added_cond_kwargs=added
                ).sample
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + CFG * (conditional - unconditional)
                clean = StableDiffusionSAGPipeline.pred_x0(helper, latents, unconditional, t)
                noise = StableDiffusionSAGPipeline.pred_epsilon(helper, latents, unconditional, t)
                attention = store.attention_probs.chunk(2)[0]
                degraded = StableDiffusionSAGPipeline.sag_masking(
                    helper, clean, attention, grid[-1], t, noise
                )
                added = {"text_embeds": negative_pooled, "time_ids": time_ids}
                degraded_prediction = unet(
                    degraded, t, encoder_hidden_states=negative, added_cond_kwargs=added
                ).sample
                prediction += scale * (unconditional - degraded_prediction)
                latents = scheduler.step(prediction, t, latents).prev_sample
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    finally:
        hook.remove()
        unet.set_attn_processor(processors)
    return (image / 2 + 0.5).clamp(0, 1)


def test_sag_equals_diffusers_sag_loop_on_sdxl(components):
    parts, sd = components
    expected = diffusers_sdxl_sag(parts, 0.8)
    result = ours(sd, [SAGPatch(0.8, blur_sigma=1.0)])
    assert (result - ours(sd, [])).abs().max() > 1e-3
    assert_parity("guidance_sdxl", result, expected)
