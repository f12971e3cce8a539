"""The Stable Diffusion pipelines: text-to-image, image-to-image and inpainting, on a `StableDiffusion`.

Each encodes the prompts and makes its solver in the same prologue, draws the initial noise with ComfyUI's
and diffusers' convention (`torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`), runs
`StableDiffusion.sample` and decodes. The sampler node calls the same functions, so both give identical results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .limits import check_size
from .resizing import resize_mask
from .sampling import Conditioning, SizeConditioning, StepCallback
from .solvers import Solver

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion


def _prologue(
    model: StableDiffusion,
    what: str,
    batch_size: int,
    height: int,
    width: int,
    prompt: str,
    negative_prompt: str,
    solver: str,
    steps: int,
    schedule: str,
    strength: float,
    guidance_scale: float,
    size: SizeConditioning | None,
    negative_size: SizeConditioning | None,
    zero_empty_negative: bool,
) -> tuple[Conditioning, Conditioning | None, Solver]:
    """What every pipeline starts with: the size checked, both prompts encoded, the solver made."""
    check_size(batch_size, height, width, what)
    positive, negative = model.encode_prompts(
        prompt,
        negative_prompt,
        size or SizeConditioning.for_image(height, width),
        negative_size,
        zero_empty_negative,
        guidance_scale,
    )
    sampler = model.make_solver(solver, steps, schedule, strength)
    return positive, negative, sampler


def text_to_image(
    model: StableDiffusion,
    prompt: str,
    negative_prompt: str = "",
    width: int = 512,
    height: int = 512,
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 1,
    solver: str = "ddim",
    schedule: str = "normal",
    callback: StepCallback | None = None,
    size: SizeConditioning | None = None,
    negative_size: SizeConditioning | None = None,
    zero_empty_negative: bool = True,
) -> Tensor:
    """(B, 3, height, width) image in [0, 1]. SDXL options: see `encode_prompts`."""
    positive, negative, sampler = _prologue(
        model,
        "text_to_image",
        batch_size,
        height,
        width,
        prompt,
        negative_prompt,
        solver,
        steps,
        schedule,
        1.0,
        guidance_scale,
        size,
        negative_size,
        zero_empty_negative,
    )
    factor = model.autoencoder.config.downscale_factor
    shape = (batch_size, model.latent_channels, height // factor, width // factor)
    latents = model.sample(shape, positive, negative, sampler, guidance_scale, seed, callback=callback)
    return model.decode_latents(latents)


def image_to_image(
    model: StableDiffusion,
    image: Tensor,
    prompt: str,
    negative_prompt: str = "",
    strength: float = 0.75,
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 0,
    solver: str = "ddim",
    schedule: str = "normal",
    callback: StepCallback | None = None,
    size: SizeConditioning | None = None,
    negative_size: SizeConditioning | None = None,
    zero_empty_negative: bool = True,
) -> Tensor:
    """Re-draw `image` ((B, 3, H, W) in [0, 1]) with `strength` of noise (1 = ignore it)."""
    height, width = image.shape[-2:]
    positive, negative, sampler = _prologue(
        model,
        "image_to_image",
        image.shape[0],
        height,
        width,
        prompt,
        negative_prompt,
        solver,
        steps,
        schedule,
        strength,
        guidance_scale,
        size,
        negative_size,
        zero_empty_negative,
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = model.encode_image(image, generator=generator)  # a posterior sample, as diffusers' img2img
    result = model.sample(
        tuple(latents.shape),  # type: ignore[arg-type]
        positive,
        negative,
        sampler,
        guidance_scale,
        seed,
        latents,
        callback=callback,
        generator=generator,
    )
    return model.decode_latents(result)


def inpaint(
    model: StableDiffusion,
    image: Tensor,
    mask: Tensor,
    prompt: str,
    negative_prompt: str = "",
    strength: float = 1.0,
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 0,
    solver: str = "ddim",
    schedule: str = "normal",
    callback: StepCallback | None = None,
    size: SizeConditioning | None = None,
    negative_size: SizeConditioning | None = None,
    zero_empty_negative: bool = True,
) -> Tensor:
    """Repaint where `mask` ((B, 1, H, W), 1 = repaint) is set; 9-channel models or latent blending."""
    height, width = image.shape[-2:]
    positive, negative, sampler = _prologue(
        model,
        "inpaint",
        image.shape[0],
        height,
        width,
        prompt,
        negative_prompt,
        solver,
        steps,
        schedule,
        strength,
        guidance_scale,
        size,
        negative_size,
        zero_empty_negative,
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    factor = model.autoencoder.config.downscale_factor
    shape = (image.shape[0], model.latent_channels, height // factor, width // factor)
    # diffusers' order of draws: source sample (when needed), initial noise, masked-image sample
    needs_source = not model.is_inpainting_model or strength < 1.0
    latents = model.encode_image(image, generator=generator) if needs_source else None
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    masked_image_latents = None
    if model.is_inpainting_model:
        keep = (mask < 0.5).to(image.dtype)
        masked_image = image * keep + 0.5 * (1 - keep)  # masked pixels gray (0 in [-1, 1]), as diffusers
        masked_image_latents = model.encode_image(masked_image, generator=generator)
    else:  # diffusers samples the masked image's latents even for a model that ignores them
        torch.randn(shape, generator=generator, dtype=model.autoencoder.dtype)
    latent_mask = resize_mask(mask.float(), shape[-2:], "nearest")
    result = model.sample(
        shape,
        positive,
        negative,
        sampler,
        guidance_scale,
        seed,
        latents,
        inpainting_mask=latent_mask,
        masked_image_latents=masked_image_latents,
        callback=callback,
        generator=generator,
        noise=noise,
    )
    return model.decode_latents(result)
