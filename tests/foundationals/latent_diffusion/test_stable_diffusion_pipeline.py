"""Whole SD1.5 pipelines equal diffusers' on identical tiny random weights (same seed, steps, solver).

Measured max abs differences on [0, 1] images (torch 2.13 CPU, fp32): txt2img DDIM / DPM++ 2M Karras /
Euler ~1e-6; img2img ~1e-6; inpainting (latent blending) ~1e-6. Tolerance: tests/support/parity.py (`sd15_pipelines`).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from foundationals.latent_diffusion.model_config import TINY_UNET
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


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    unet, vae, text = diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder()
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer), ours_from_diffusers(
        unet, vae, text
    )


def scheduler(name: str):
    if name == "ddim":
        return DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**SD15_SCHEDULER, use_karras_sigmas=True)
    return EulerDiscreteScheduler(**SD15_SCHEDULER)  # diffusers' Euler default spacing: linspace


def pipeline(kind, components, solver):
    return kind(
        **components[0],
        scheduler=scheduler(solver),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(
    ("solver", "schedule"), [("ddim", "normal"), ("dpmpp_2m", "karras"), ("euler", "linspace")]
)
def test_text_to_image_equals_diffusers(components, solver, schedule):
    reference = pipeline(StableDiffusionPipeline, components, solver)
    expected = reference(
        "a red fox in the snow",
        negative_prompt="blurry",
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(42),
        output_type="pt",
    ).images
    ours = components[1].text_to_image(
        "a red fox in the snow",
        "blurry",
        width=32,
        height=32,
        steps=6,
        guidance_scale=6.0,
        seed=42,
        solver=solver,
        schedule=schedule,
    )
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    assert expected.std() > 0.01  # a real image, not a constant
    assert_parity("sd15_pipelines", ours, expected)


def test_different_seeds_and_prompts_change_the_image(components):
    sd = components[1]
    a = sd.text_to_image("a cat", width=32, height=32, steps=2, seed=1)
    assert max_diff(a, sd.text_to_image("a cat", width=32, height=32, steps=2, seed=2)) > 1e-3
    assert max_diff(a, sd.text_to_image("a dog", width=32, height=32, steps=2, seed=1)) > 1e-5
    assert torch.equal(a, sd.text_to_image("a cat", width=32, height=32, steps=2, seed=1))


def test_image_to_image_equals_diffusers(components):
    torch.manual_seed(3)
    image = torch.rand(1, 3, 32, 32)
    reference = pipeline(StableDiffusionImg2ImgPipeline, components, "ddim")
    expected = reference(
        "a watercolor castle",
        image=image,
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        negative_prompt="",
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pt",
    ).images
    ours = components[1].image_to_image(
        image, "a watercolor castle", strength=0.6, steps=10, guidance_scale=5.0, seed=7, solver="ddim"
    )
    assert_parity("sd15_pipelines", ours, expected)


def test_inpainting_by_latent_blending_equals_diffusers(components):
    torch.manual_seed(4)
    image = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    reference = pipeline(StableDiffusionInpaintPipeline, components, "ddim")
    expected = reference(
        "a window",
        image=image,
        mask_image=mask,
        height=32,
        width=32,
        strength=1.0,
        num_inference_steps=8,
        guidance_scale=5.0,
        negative_prompt="",
        generator=torch.Generator("cpu").manual_seed(9),
        output_type="pt",
    ).images
    ours = components[1].inpaint(image, mask, "a window", steps=8, guidance_scale=5.0, seed=9, solver="ddim")
    assert_parity("sd15_pipelines", ours, expected)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_a_9_channel_model_equals_diffusers(components, tmp_path, strength):
    config = TINY_UNET.with_changes(in_channels=9)
    unet = diffusers_unet(config, seed=5)
    parts = dict(components[0], unet=unet)
    ours = ours_from_diffusers(unet, parts["vae"], parts["text_encoder"], unet_config=config)
    assert ours.is_inpainting_model
    torch.manual_seed(6)
    image = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1.0
    reference = StableDiffusionInpaintPipeline(
        **parts,
        scheduler=scheduler("ddim"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    expected = reference(
        "a door",
        image=image,
        mask_image=mask,
        height=32,
        width=32,
        strength=strength,
        num_inference_steps=6,
        guidance_scale=4.0,
        negative_prompt="",
        generator=torch.Generator("cpu").manual_seed(2),
        output_type="pt",
    ).images
    result = ours.inpaint(
        image, mask, "a door", strength=strength, steps=6, guidance_scale=4.0, seed=2, solver="ddim"
    )
    assert_parity("sd15_pipelines", result, expected)
    with pytest.raises(ValueError, match="inpainting model"):
        ours.text_to_image("a door", width=32, height=32, steps=1)
