"""The sampler: applies the model's adapter stack, denoises, and restores the model."""

from __future__ import annotations

from typing import Any

import torch

from ..foundationals.latent_diffusion.adapters.t2i_adapter import T2IAdapterPatch
from ..foundationals.latent_diffusion.model_config import unet_family
from ..foundationals.latent_diffusion.model_patch import SamplingRun, patched
from ..foundationals.latent_diffusion.resizing import resize_mask
from ..foundationals.latent_diffusion.sampling import Conditioning, draw_noise
from ..foundationals.latent_diffusion.solvers import SCHEDULES, SOLVERS
from ..foundationals.latent_diffusion.tiling import TiledDiffusionPatch
from .core_types import (
    batch_indices,
    conditioning_entries,
    masked_image_latents,
    read_latents,
    write_latents,
)
from .host import ProgressReporter, throw_if_interrupted
from .latent_nodes import check_size, require_finite
from .previews import x0_preview
from .wires import MODEL, ModelWire, load_for_sampling


def check_conditioning(model: ModelWire, conditioning: Any, which: str) -> None:
    """Refuse conditioning made by another family's text encoder(s) before anything runs."""
    sd = model.model
    family = unet_family(sd.unet.config)
    context = sd.unet.config.context_dim
    if isinstance(conditioning, Conditioning):
        texts = [conditioning.text_embedding]
    elif isinstance(conditioning, list | tuple):
        texts = [entry[0] for entry in conditioning if isinstance(entry, list | tuple) and entry]
    else:
        return  # not a CONDITIONING at all: `conditioning_entries` says what was expected
    for index, text in enumerate(texts):
        width = int(text.shape[-1]) if isinstance(text, torch.Tensor) else None
        if width is not None and width != context:
            place = f" (entry {index + 1} of {len(texts)})" if len(texts) > 1 else ""
            raise ValueError(
                f"the {which} conditioning{place} ({width}-wide text) was not made for the model {model.name} "
                f"({family}, {context}-wide text context): encode the prompt with this model's clip output "
                "(Fluxion CLIP Text Encode, or core CLIP Text Encode with this model's CLIP)"
            )


def _noise_mask(latent: dict[str, Any], batch: int, height: int, width: int) -> torch.Tensor | None:
    mask = latent.get("noise_mask")
    if mask is None:
        return None
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dim() not in (2, 3, 4)
        or (mask.dim() == 4 and mask.shape[1] != 1)
    ):
        raise ValueError(
            f"the latent's noise_mask must be a (B, 1, H, W), (B, H, W) or (H, W) mask, got {mask!r:.60}"
        )
    require_finite(mask, "the latents' noise mask")
    return resize_mask(mask.float(), (height, width), "bilinear", batch).clamp(0, 1)


def sample_latents(
    model: ModelWire,
    positive: Any,
    negative: Any,
    latent: dict[str, Any],
    seed: int,
    steps: int,
    cfg: float,
    solver: str,
    schedule: str,
    denoise: float,
    progress: ProgressReporter | None = None,
) -> torch.Tensor:
    """What the sampler node computes, for callers without a node (tests compare it with the pipelines).

    `latent` is a core LATENT (unscaled `samples`, `noise_mask`, `batch_index`); `positive` / `negative` are core
    CONDITIONING lists (or library `Conditioning`s). Returns the LATENT's new unscaled `samples`.
    """
    sd = model.model
    scaling = sd.autoencoder.scaling_factor
    samples = read_latents(latent, scaling, "the latent_image")
    if samples.dim() != 4 or samples.shape[1] != sd.latent_channels:
        raise ValueError(
            f"latents of shape {tuple(samples.shape)} do not fit this model (expected (B, {sd.latent_channels}, h, w))"
        )
    batch, _, height, width = samples.shape
    factor = sd.autoencoder.config.downscale_factor
    check_size(batch, height * factor, width * factor, "latents to sample")
    if not torch.isfinite(samples).all():
        raise ValueError("the latents contain NaN or infinite values")
    check_conditioning(model, positive, "positive")
    check_conditioning(model, negative, "negative")
    positive_entries = conditioning_entries(positive, "positive", sd.is_sdxl, height * factor, width * factor)
    negative_entries = conditioning_entries(negative, "negative", sd.is_sdxl, height * factor, width * factor)
    cropping = any(
        entry.area is not None or entry.area_fraction is not None or entry.area_from_mask
        for entry in (*positive_entries, *negative_entries)
    )
    t2i = [patch.label for patch in model.patches if isinstance(patch, T2IAdapterPatch)]
    if cropping and t2i:
        raise ValueError(
            f"conditioning with an area runs the UNet on a crop, which the T2I-Adapter ({', '.join(t2i)}) cannot "
            "follow: use conditioning masks without bounds, or a ControlNet"
        )
    tiled = any(isinstance(patch, TiledDiffusionPatch) for patch in model.patches)
    if tiled and t2i:
        raise ValueError(
            f"tiled sampling (Fluxion Tiled Diffusion) runs the UNet on tiles, which the T2I-Adapter "
            f"({', '.join(t2i)}) cannot follow: use a ControlNet (its hint is cut per tile), or sample untiled"
        )
    indices = batch_indices(latent, batch)
    latent_mask = _noise_mask(latent, batch, height, width)
    if latent_mask is not None and not latent_mask.any() and not sd.is_inpainting_model:
        latent_mask = None  # nothing to repaint: behave as plain image-to-image
    if sd.is_inpainting_model and latent_mask is None:
        raise ValueError(
            f"{model.name} is an inpainting model (9 input channels): its latent needs a noise_mask (Fluxion VAE "
            "Encode's mask input, or core VAE Encode (for Inpainting) / Set Latent Noise Mask)"
        )
    masked = masked_image_latents(latent, samples, scaling) if sd.is_inpainting_model else None
    load_for_sampling(model, tuple(samples.shape), cfg > 1.0)  # the UNet and its patches' models, together
    sampler = sd.make_solver(solver, steps, schedule, denoise)
    if sampler.first_inference_step >= sampler.num_inference_steps:
        return latent["samples"]  # nothing to denoise: the input as it is (ComfyUI at denoise 0)
    # Full-strength text-to-image starts from pure noise, as diffusers' txt2img pipeline does.
    image_latents = None if (denoise >= 1.0 and latent_mask is None) else samples
    if sd.is_inpainting_model and denoise >= 1.0:
        image_latents = None
    generator = noise = None
    if (
        indices is not None
    ):  # each item gets the noise of its index in the seed's sequence, as ComfyUI draws it
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = draw_noise(tuple(samples.shape), generator, indices)
    run = SamplingRun(
        num_steps=sampler.num_inference_steps,  # a schedule may drop repeated levels (ComfyUI's beta)
        first_step=sampler.first_inference_step,
        latent_height=height,
        latent_width=width,
        batch_size=batch,
        uses_guidance=cfg > 1.0,
    )

    preview = x0_preview(sampler, cfg, sd.is_sdxl) if progress is not None else None
    if preview is not None:  # KSampler's previews: the predicted x0, by the host's --preview-method
        run.on_step(preview.on_step)
        run.prediction_hooks.append(preview.on_prediction)

    def on_step(done: int, total: int, current: torch.Tensor) -> None:
        throw_if_interrupted()
        if progress is not None:
            progress.total = total  # img2img runs fewer steps than the schedule has
            progress.update_absolute(done, preview=None if preview is None else preview.image())

    throw_if_interrupted()
    with patched(sd, model.patches, run):
        result = sd.sample(
            tuple(samples.shape),  # type: ignore[arg-type]
            positive_entries,
            negative_entries,
            sampler,
            cfg,
            seed,
            image_latents,
            inpainting_mask=latent_mask,
            masked_image_latents=masked,
            callback=on_step,
            generator=generator,
            noise=noise,
            run=run,
        )
    return write_latents(result, scaling)


class FluxionSampler:
    """Denoise latents with a solver, classifier-free guidance and the model's adapter stack."""

    DESCRIPTION = (
        "Samples latents: applies the adapters wired onto the model (LoRA, ControlNet, IP-Adapter, context "
        "values...), runs the solver and restores the model afterwards, also when cancelled. The initial noise is "
        "torch.randn(shape, generator=Generator('cpu').manual_seed(seed)), as ComfyUI and diffusers draw it."
    )
    CATEGORY = "fluxion/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised LATENT, for Fluxion or core VAE Decode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model and its adapter stack."}),
                "positive": (
                    "CONDITIONING",
                    {
                        "tooltip": "What the image should show: core CONDITIONING from any node (Fluxion or core CLIP "
                        "Text Encode, Conditioning Combine / Set Area / Set Mask / Set Timestep Range...)."
                    },
                ),
                "negative": (
                    "CONDITIONING",
                    {"tooltip": "What the image should avoid: core CONDITIONING from any node."},
                ),
                "latent_image": (
                    "LATENT",
                    {
                        "tooltip": "Empty latents (text-to-image) or encoded images (image-to-image, inpainting)."
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "Seed of the initial noise.",
                    },
                ),
                "steps": (
                    "INT",
                    {"default": 20, "min": 1, "max": 1000, "tooltip": "Number of solver steps."},
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 7.5,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Classifier-free guidance scale; 1 or less disables guidance (one UNet pass per step).",
                    },
                ),
                "solver": (
                    list(SOLVERS),
                    {
                        "default": "dpmpp_2m",
                        "tooltip": "The solver (sampler) moving the latents from noise to image, by ComfyUI's "
                        "names. heun, dpmpp_2s_ancestral and dpmpp_sde run the model twice per step.",
                    },
                ),
                "schedule": (
                    list(SCHEDULES),
                    {
                        "default": "karras",
                        "tooltip": "Timestep schedule: normal (leading), trailing, linspace space the training "
                        "timesteps (every solver); karras, exponential, sgm_uniform, simple, beta and "
                        "align_your_steps (the SD1.5 or SDXL table) set the noise levels (not ddim, ddpm, lcm).",
                    },
                ),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "How much of the schedule to run: 1 redraws everything, lower keeps more of the input latents.",
                    },
                ),
            }
        }

    def sample(
        self,
        model: ModelWire,
        positive: Any,
        negative: Any,
        latent_image: dict[str, Any],
        seed: int,
        steps: int,
        cfg: float,
        solver: str,
        schedule: str,
        denoise: float,
    ) -> tuple[dict[str, Any]]:
        with ProgressReporter(steps, "Fluxion sampling") as progress:
            latents = sample_latents(
                model, positive, negative, latent_image, seed, steps, cfg, solver, schedule, denoise, progress
            )
        result = dict(
            latent_image
        )  # the other keys (noise_mask, batch_index...) stay, as core's KSampler keeps them
        result["samples"] = latents
        return (result,)


NODE_CLASS_MAPPINGS = {"FluxionSampler": FluxionSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionSampler": "Fluxion Sampler"}
