"""Whole SDXL pipelines equal diffusers' on identical tiny random weights (same seed, steps, solver).

Tiny SDXL: the `tiny_sdxl` UNet, CLIP-L + a bigG-like encoder with projection, the tiny autoencoder with SDXL's
scaling factor (tests/support/tiny_sdxl.py). Images are 32x48 (height x width), so the time ids' order shows.
Measured max abs differences on [0, 1] images (torch 2.13 CPU, fp32, diffusers 0.39): txt2img DDIM 7.9e-6,
Euler 9.6e-6, DPM++ 2M Karras 8.9e-6, Euler ancestral 1.0e-5; size/crop conditioning 6.4e-6; empty negatives
(zeros / encoded) 4.9e-6 / 6.0e-6; img2img DDIM 4.6e-6, Euler ancestral 6.3e-6; inpainting by blending 1.1e-5
(DDIM), 1.5e-5 (Euler ancestral), 1.4e-5 (strength 0.7); 9-channel inpainting 4.3e-6 / 5.8e-6; weighted long
prompts 1.0e-5. Tolerance: tests/support/parity.py (`sdxl_pipelines`). The fp16 overflow fallback equals an fp32 run exactly.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from foundationals.formats.diffusers import diffusers_unet_key_map
from foundationals.latent_diffusion.auto_encoder import Decoder, Encoder, LatentDiffusionAutoencoder
from foundationals.latent_diffusion.model_config import TINY_SDXL_UNET, UNET_PRESETS
from foundationals.latent_diffusion.sampling import SizeConditioning
from foundationals.latent_diffusion.unet import UNet
from tests.support.parity import assert_parity
from tests.support.tiny_sdxl import (
    SDXL_SCHEDULER,
    TINY_SDXL_AUTOENCODER,
    diffusers_sdxl_components,
    diffusers_sdxl_unet,
    ours_from_diffusers,
    randomize,
    sdxl_unet_kwargs,
)

# diffusers 0.39 calls np.array on torch tensors the way numpy 2 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SLOW = pytest.mark.skipif(os.environ.get("FLUXION_SLOW") != "1", reason="full-size model: set FLUXION_SLOW=1")
HEIGHT, WIDTH = 32, 48


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    parts = diffusers_sdxl_components(tmp_path_factory.mktemp("tokenizers"))
    return parts, ours_from_diffusers(parts)


def scheduler(name: str):
    if name == "ddim":
        return DDIMScheduler(**SDXL_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**SDXL_SCHEDULER, use_karras_sigmas=True)
    if name == "euler_ancestral":
        return EulerAncestralDiscreteScheduler(**SDXL_SCHEDULER)
    return EulerDiscreteScheduler(**SDXL_SCHEDULER)  # SDXL base's own scheduler


def pipeline(kind, parts, solver: str, **config):
    return kind(**parts, scheduler=scheduler(solver), add_watermarker=False, **config)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.mark.parametrize(
    ("solver", "schedule"),
    [("ddim", "normal"), ("euler", "normal"), ("dpmpp_2m", "karras"), ("euler_ancestral", "normal")],
)
def test_text_to_image_equals_diffusers(components, solver, schedule):
    parts, sd = components
    expected = pipeline(StableDiffusionXLPipeline, parts, solver)(
        "a red fox in the snow",
        negative_prompt="blurry",
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=6,
        guidance_scale=6.0,
        generator=generator(42),
        output_type="pt",
    ).images
    ours = sd.text_to_image(
        "a red fox in the snow",
        "blurry",
        width=WIDTH,
        height=HEIGHT,
        steps=6,
        guidance_scale=6.0,
        seed=42,
        solver=solver,
        schedule=schedule,
    )
    assert ours.shape == expected.shape == (1, 3, HEIGHT, WIDTH)
    assert expected.std() > 0.01  # a real image, not a constant
    assert_parity("sdxl_pipelines", ours, expected)


@pytest.mark.parametrize("zero_empty_negative", [True, False])
def test_empty_negative_prompt_is_zeros_or_encoded_as_diffusers(components, zero_empty_negative):
    parts, sd = components
    reference = pipeline(
        StableDiffusionXLPipeline, parts, "ddim", force_zeros_for_empty_prompt=zero_empty_negative
    )
    expected = reference(
        "a lighthouse",
        negative_prompt=None,  # diffusers' "no negative prompt": zeros when force_zeros_for_empty_prompt
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=generator(3),
        output_type="pt",
    ).images
    ours = sd.text_to_image(
        "a lighthouse",
        "",
        width=WIDTH,
        height=HEIGHT,
        steps=4,
        guidance_scale=5.0,
        seed=3,
        zero_empty_negative=zero_empty_negative,
    )
    assert_parity("sdxl_pipelines", ours, expected)
    other = sd.text_to_image(
        "a lighthouse",
        "",
        width=WIDTH,
        height=HEIGHT,
        steps=4,
        guidance_scale=5.0,
        seed=3,
        zero_empty_negative=not zero_empty_negative,
    )
    assert max_diff(ours, other) > 1e-4  # the option matters


def test_size_and_crop_conditioning_equals_diffusers(components):
    parts, sd = components
    expected = pipeline(StableDiffusionXLPipeline, parts, "euler")(
        "a castle",
        negative_prompt="fog",
        height=HEIGHT,
        width=WIDTH,
        original_size=(512, 768),
        crops_coords_top_left=(16, 8),
        target_size=(256, 384),
        negative_original_size=(128, 128),
        negative_crops_coords_top_left=(4, 2),
        negative_target_size=(64, 96),
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=generator(5),
        output_type="pt",
    ).images
    size = SizeConditioning((512, 768), (16, 8), (256, 384))
    negative_size = SizeConditioning((128, 128), (4, 2), (64, 96))
    ours = sd.text_to_image(
        "a castle",
        "fog",
        width=WIDTH,
        height=HEIGHT,
        steps=4,
        guidance_scale=5.0,
        seed=5,
        solver="euler",
        size=size,
        negative_size=negative_size,
    )
    assert_parity("sdxl_pipelines", ours, expected)
    default = sd.text_to_image(
        "a castle", "fog", width=WIDTH, height=HEIGHT, steps=4, guidance_scale=5.0, seed=5
    )
    assert max_diff(ours, default) > 1e-4  # the time ids reach the UNet


def test_default_size_conditioning_is_the_output_size(components):
    _, sd = components
    positive, negative = sd.encode_prompts("a cat", "", SizeConditioning.for_image(HEIGHT, WIDTH))
    assert negative is not None and negative.time_ids is not None and positive.time_ids is not None
    assert positive.time_ids.tolist() == [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]]
    assert torch.equal(negative.time_ids, positive.time_ids)
    assert negative.pooled_text_embedding is not None and not negative.pooled_text_embedding.any()
    assert not negative.text_embedding.any()
    assert sd.encode_prompts("a cat", "", SizeConditioning.for_image(8, 8), guidance_scale=1.0)[1] is None


@pytest.mark.parametrize(("solver", "strength"), [("ddim", 0.6), ("euler_ancestral", 0.5)])
def test_image_to_image_equals_diffusers(components, solver, strength):
    parts, sd = components
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=generator(3))
    expected = pipeline(StableDiffusionXLImg2ImgPipeline, parts, solver)(
        "a watercolor castle",
        image=image,
        strength=strength,
        num_inference_steps=10,
        guidance_scale=5.0,
        negative_prompt="dark",
        generator=generator(7),
        output_type="pt",
    ).images
    ours = sd.image_to_image(
        image,
        "a watercolor castle",
        "dark",
        strength=strength,
        steps=10,
        guidance_scale=5.0,
        seed=7,
        solver=solver,
    )
    assert_parity("sdxl_pipelines", ours, expected)


def inpainting_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=generator(seed))
    mask = torch.zeros(1, 1, HEIGHT, WIDTH)
    mask[..., 8:24, 12:40] = 1.0
    return image, mask


@pytest.mark.parametrize(("solver", "strength"), [("ddim", 1.0), ("euler_ancestral", 1.0), ("ddim", 0.7)])
def test_inpainting_by_latent_blending_equals_diffusers(components, solver, strength):
    parts, sd = components
    image, mask = inpainting_inputs(4)
    expected = pipeline(StableDiffusionXLInpaintPipeline, parts, solver)(
        "a window",
        image=image,
        mask_image=mask,
        height=HEIGHT,
        width=WIDTH,
        strength=strength,
        num_inference_steps=8,
        guidance_scale=5.0,
        negative_prompt="bricks",
        generator=generator(9),
        output_type="pt",
    ).images
    ours = sd.inpaint(
        image,
        mask,
        "a window",
        "bricks",
        strength=strength,
        steps=8,
        guidance_scale=5.0,
        seed=9,
        solver=solver,
    )
    assert_parity("sdxl_pipelines", ours, expected)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_a_9_channel_sdxl_model_equals_diffusers(components, strength):
    parts, _ = components
    config = TINY_SDXL_UNET.with_changes(in_channels=9)
    parts = dict(parts, unet=diffusers_sdxl_unet(config, seed=5))
    sd = ours_from_diffusers(parts, config)
    assert sd.is_inpainting_model and sd.is_sdxl
    image, mask = inpainting_inputs(6)
    expected = pipeline(StableDiffusionXLInpaintPipeline, parts, "ddim")(
        "a door",
        image=image,
        mask_image=mask,
        height=HEIGHT,
        width=WIDTH,
        strength=strength,
        num_inference_steps=6,
        guidance_scale=4.0,
        generator=generator(2),
        output_type="pt",
    ).images
    ours = sd.inpaint(image, mask, "a door", strength=strength, steps=6, guidance_scale=4.0, seed=2)
    assert_parity("sdxl_pipelines", ours, expected)


def test_weighted_long_prompts_reach_the_unet_as_encoded(components):
    """Emphasis and 75-token chunks are `encode_sdxl_prompt`'s (tested against ComfyUI's rules in
    tests/foundationals/clip); the pipeline must feed exactly that conditioning to the UNet."""
    parts, sd = components
    prompt = "a (red:1.4) fox, " + ", ".join(f"detail {i}" for i in range(30))
    size = SizeConditioning.for_image(HEIGHT, WIDTH)
    positive, negative = sd.encode_prompts(prompt, "blurry", size)
    assert negative is not None and positive.pooled_text_embedding is not None
    chunks = positive.text_embedding.shape[1] // 77
    assert positive.text_embedding.shape[1] == 77 * chunks and chunks >= 2
    assert negative.pooled_text_embedding is not None
    plain = sd.encode_prompt(prompt.replace("(red:1.4)", "red"), size=size)
    assert max_diff(plain.text_embedding, positive.text_embedding) > 1e-3
    expected = pipeline(StableDiffusionXLPipeline, parts, "ddim")(
        prompt_embeds=positive.text_embedding,
        pooled_prompt_embeds=positive.pooled_text_embedding,
        negative_prompt_embeds=negative.text_embedding.repeat(1, chunks, 1),  # as ComfyUI pads it
        negative_pooled_prompt_embeds=negative.pooled_text_embedding,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=4,
        guidance_scale=6.0,
        generator=generator(11),
        output_type="pt",
    ).images
    ours = sd.text_to_image(
        prompt, "blurry", width=WIDTH, height=HEIGHT, steps=4, guidance_scale=6.0, seed=11
    )
    assert_parity("sdxl_pipelines", ours, expected)


def fp16_autoencoder_that_overflows(
    scale: float,
) -> tuple[LatentDiffusionAutoencoder, LatentDiffusionAutoencoder]:
    """A tiny fp16 autoencoder whose first convolutions (encoder and decoder) give values past fp16's 65504,
    and its exact fp32 twin: the GroupNorms after them bring fp32 results back to a normal range."""
    autoencoder = LatentDiffusionAutoencoder(TINY_SDXL_AUTOENCODER)
    randomize(autoencoder, 0.1, seed=8)
    encoder_conv_in = [
        m for m in autoencoder.ensure_find(Encoder).modules() if isinstance(m, torch.nn.Conv2d)
    ][0]
    decoder_conv_in = [
        m for m in autoencoder.ensure_find(Decoder).modules() if isinstance(m, torch.nn.Conv2d)
    ][1]
    with torch.no_grad():  # (the decoder's first convolution is the 1x1 post-quantisation one)
        for convolution in (encoder_conv_in, decoder_conv_in):
            convolution.weight.mul_(scale)
            convolution.bias.mul_(scale)
    half = LatentDiffusionAutoencoder(TINY_SDXL_AUTOENCODER, dtype=torch.float16)
    half.load_state_dict(autoencoder.state_dict())
    twin = LatentDiffusionAutoencoder(TINY_SDXL_AUTOENCODER)
    twin.load_state_dict(half.state_dict())  # the fp16-rounded weights, in fp32
    return half, twin


def test_fp16_decode_that_overflows_is_redone_in_fp32(components):
    _, sd = components
    half, twin = fp16_autoencoder_that_overflows(1e5)
    latents = torch.randn(1, 4, HEIGHT // 4, WIDTH // 4, generator=generator(1))
    with torch.no_grad():
        assert not half.decode(latents).isfinite().all()  # the overflow is real
        expected = (twin.decode(latents) / 2 + 0.5).clamp(0, 1)
    fp16 = replace(sd, autoencoder=half)
    decoded = fp16.decode_latents(latents)
    assert decoded.isfinite().all() and decoded.std() > 0.01
    assert torch.equal(decoded, expected)
    assert half.dtype == torch.float16  # the shared model is left in fp16
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=generator(2))
    with torch.no_grad():
        assert not half.encode(image * 2 - 1).isfinite().all()
        expected_latents = twin.encode(image * 2 - 1, generator=generator(4))
    assert torch.equal(fp16.encode_image(image, generator=generator(4)), expected_latents)


def test_fp16_decode_without_overflow_stays_fp16(components):
    _, sd = components
    half, _ = fp16_autoencoder_that_overflows(1.0)
    latents = torch.randn(1, 4, 8, 8, generator=generator(1))
    fp16 = replace(sd, autoencoder=half)
    with torch.no_grad():
        expected = (half.decode(latents).float() / 2 + 0.5).clamp(0, 1)
    assert torch.equal(fp16.decode_latents(latents), expected)


@SLOW
def test_full_size_sdxl_unet_call_matches_diffusers():
    """One call of the SDXL base UNet (random weights, 16x16 latents, CFG batch) built on meta in both libraries,
    sharing one set of weights. Measured max abs difference 2.1e-7 on outputs up to 0.39 (torch 2.13 CPU; 100 s,
    11.3 GB peak RSS on 2 cores)."""
    from accelerate import init_empty_weights

    config = UNET_PRESETS["sdxl_base"]
    with init_empty_weights():
        reference = UNet2DConditionModel(**sdxl_unet_kwargs(config))
    torch.manual_seed(0)
    weights = {
        key: torch.randn(tensor.shape) * (0.02 if tensor.dim() > 1 else 0.1)
        for key, tensor in reference.state_dict().items()
    }
    reference.load_state_dict(weights, assign=True)
    reference.eval()
    unet = UNet(config, device="meta")
    unet.load_state_dict(
        {ours: weights[theirs] for theirs, ours in diffusers_unet_key_map(unet).items()}, assign=True
    )
    del weights
    noise = generator(1)
    x = torch.randn(2, 4, 16, 16, generator=noise)
    text = torch.randn(2, 77, 2048, generator=noise)
    pooled = torch.randn(2, 1280, generator=noise)
    time_ids = torch.cat([SizeConditioning.for_image(128, 128).time_ids(), SizeConditioning().time_ids()])
    timestep = torch.tensor([801.0])
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    unet.set_pooled_text_embedding(pooled)
    unet.set_time_ids(time_ids)
    with torch.no_grad():
        actual = unet(x)
        expected = reference(
            x, timestep, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() < 1e-4 * max(scale, 1.0)
