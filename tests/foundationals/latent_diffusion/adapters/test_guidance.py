"""Guidance adapters on SD1.5 equal diffusers' implementations on identical tiny random weights.

FreeU (`UNet2DConditionModel.enable_freeu`), rescaled CFG (`guidance_rescale`), CFG cutoff
(`SDCFGCutoffCallback`), PAG (`StableDiffusionPAGPipeline`: scale, adaptive scale, applied layers, with
`guidance_rescale`) and SAG (`StableDiffusionSAGPipeline`), whole txt2img runs compared on [0, 1] images (DDIM;
fp32 CPU). Measured max abs differences: see tests/support/parity.py (`guidance_sd15`), which holds the
tolerance. The diffusers UNet's FreeU is switched off again after its test (the fixture is shared).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    StableDiffusionSAGPipeline,
)
from diffusers.pipelines.pag.pipeline_pag_sd import StableDiffusionPAGPipeline

from foundationals.latent_diffusion.adapters.guidance import (
    CFGCutoffPatch,
    FreeUPatch,
    PAGPatch,
    RescaleCFGPatch,
    SAGPatch,
)
from tests.support.guided import guided_text_to_image
from tests.support.parity import assert_parity
from tests.support.tiny_sd import (
    clip_tokenizer,
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)

SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    num_train_timesteps=1000,
)
PROMPT, NEGATIVE, STEPS, CFG, SEED = "a red fox in the snow", "blurry", 6, 6.0, 42


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    unet, vae, text = diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder()
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    parts = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer)
    return parts, ours_from_diffusers(unet, vae, text)


def reference(kind, parts, solver: str = "ddim", **config):
    scheduler = (
        DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
        if solver == "ddim"
        else DPMSolverMultistepScheduler(**SD15_SCHEDULER, use_karras_sigmas=True)
    )
    return kind(
        **parts,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **config,
    )


def diffusers_image(pipe, **options) -> torch.Tensor:
    options = dict(
        dict(
            negative_prompt=NEGATIVE,
            height=32,
            width=32,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="pt",
        ),
        **options,
    )
    return pipe(PROMPT, **options).images


def ours(sd, patches, **options) -> torch.Tensor:
    options = dict(dict(steps=STEPS, guidance_scale=CFG, seed=SEED), **options)
    return guided_text_to_image(sd, patches, PROMPT, NEGATIVE, **options)


def plain(components) -> torch.Tensor:
    return ours(components[1], [])


def test_freeu_equals_diffusers_enable_freeu(components):
    parts, sd = components
    factors = dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    parts["unet"].enable_freeu(**factors)
    try:
        expected = diffusers_image(reference(StableDiffusionPipeline, parts))
    finally:
        parts["unet"].disable_freeu()
    result = ours(sd, [FreeUPatch(**factors, rule="up_blocks")])
    assert (result - plain(components)).abs().max() > 1e-3  # FreeU changes the image
    assert_parity("guidance_sd15", result, expected)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_rescaled_cfg_equals_diffusers_guidance_rescale(components, solver):
    parts, sd = components
    expected = diffusers_image(reference(StableDiffusionPipeline, parts, solver), guidance_rescale=0.7)
    schedule = "normal" if solver == "ddim" else "karras"
    result = ours(sd, [RescaleCFGPatch(0.7)], solver=solver, schedule=schedule)
    assert_parity("guidance_sd15", result, expected)


@pytest.mark.parametrize("ratio", [0.0, 0.4, 1.0])
def test_cfg_cutoff_equals_diffusers_cutoff_callback(components, ratio):
    parts, sd = components
    callback = SDCFGCutoffCallback(cutoff_step_ratio=ratio)
    expected = diffusers_image(reference(StableDiffusionPipeline, parts), callback_on_step_end=callback)
    result = ours(sd, [CFGCutoffPatch(ratio)])
    assert_parity("guidance_sd15", result, expected)


@pytest.mark.parametrize(
    ("layers", "scale", "adaptive"),
    [(["mid"], 3.0, 0.0), (["down_blocks.1", "up_blocks.1.attentions.0"], 2.0, 0.0), (["mid"], 3.0, 0.004)],
)
def test_pag_equals_diffusers_pag_pipeline(components, layers, scale, adaptive):
    parts, sd = components
    pipe = reference(StableDiffusionPAGPipeline, parts, pag_applied_layers=layers)
    expected = diffusers_image(pipe, pag_scale=scale, pag_adaptive_scale=adaptive)
    result = ours(sd, [PAGPatch(scale, layers, adaptive_scale=adaptive)])
    assert (result - plain(components)).abs().max() > 1e-3
    assert_parity("guidance_sd15", result, expected)


def test_pag_without_cfg_and_with_rescale_equals_diffusers(components):
    parts, sd = components
    pipe = reference(StableDiffusionPAGPipeline, parts, pag_applied_layers=["mid"])
    expected = diffusers_image(pipe, pag_scale=2.5, guidance_scale=1.0)
    assert_parity("guidance_sd15", ours(sd, [PAGPatch(2.5)], guidance_scale=1.0), expected)
    pipe = reference(StableDiffusionPAGPipeline, parts, pag_applied_layers=["mid"])
    expected = diffusers_image(pipe, pag_scale=2.5, guidance_rescale=0.5)
    assert_parity("guidance_sd15", ours(sd, [PAGPatch(2.5), RescaleCFGPatch(0.5)]), expected)


@pytest.mark.parametrize("guidance_scale", [CFG, 1.0])
def test_sag_equals_diffusers_sag_pipeline(components, guidance_scale):
    parts, sd = components
    pipe = reference(StableDiffusionSAGPipeline, parts)
    expected = diffusers_image(pipe, sag_scale=0.75, guidance_scale=guidance_scale)
    result = ours(sd, [SAGPatch(0.75, blur_sigma=1.0)], guidance_scale=guidance_scale)
    assert (result - ours(sd, [], guidance_scale=guidance_scale)).abs().max() > 1e-3
    assert_parity("guidance_sd15", result, expected)
