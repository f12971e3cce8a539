"""The sampler: applies the model's adapter stack, denoises, and restores the model."""

from __future__ import annotations

from typing import Any

import torch

from ..foundationals.latent_diffusion.model_config import unet_family
from ..foundationals.latent_diffusion.model_patch import SamplingRun, patched
from ..foundationals.latent_diffusion.resizing import resize_mask
from ..foundationals.latent_diffusion.sampling import Conditioning
from ..foundationals.latent_diffusion.solvers import SCHEDULES, SOLVERS, make_solver
from .host import ProgressReporter, throw_if_interrupted
from .latent_nodes import check_size, require_finite
from .previews import x0_preview
from .wires import CONDITIONING, MODEL, ModelWire, load_for_sampling


def check_conditioning(model: ModelWire, conditioning: Conditioning, which: str) -> None:
    """Refuse conditioning made by another family's text encoder(s) before anything runs."""
    sd = model.model
    family = unet_family(sd.unet.config)
    context = sd.unet.config.context_dim
    width = int(conditioning.text_embedding.shape[-1])
    sdxl_like = conditioning.pooled_text_embedding is not None
    if width != context or sdxl_like != sd.is_sdxl:
        made_by = "SDXL-style (pooled text and size)" if sdxl_like else "SD1.5-style"
        raise ValueError(
            f"the {which} conditioning ({made_by}, {width}-wide) was not made for the model {model.name} "
            f"({family}, {context}-wide text context): encode the prompt with this model's clip output "
            "(Fluxion Text Encode)"
        )


def sample_latents(
    model: ModelWire,
    positive: Conditioning,
    negative: Conditioning,
    latent: dict[str, Any],
    seed: int,
    steps: int,
    cfg: float,
    solver: str,
    schedule: str,
    denoise: float,
    progress: ProgressReporter | None = None,
) -> torch.Tensor:
    """What the sampler node computes, for callers without a node (tests compare it with the pipelines)."""
    sd = model.model
    latents = latent["samples"]
    if latents.dim() != 4 or latents.shape[1] != sd.latent_channels:
        raise ValueError(
            f"latents of shape {tuple(latents.shape)} do not fit this model (expected (B, {sd.latent_channels}, h, w))"
        )
    batch, _, height, width = latents.shape
    factor = sd.autoencoder.config.downscale_factor
    check_size(batch, height * factor, width * factor, "latents to sample")
    if not torch.isfinite(latents).all():
        raise ValueError("the latents contain NaN or infinite values")
    check_conditioning(model, positive, "positive")
    check_conditioning(model, negative, "negative")
    mask = latent.get("noise_mask")
    if mask is not None:
        require_finite(mask, "the latents' noise mask")
    latent_mask = (
        None if mask is None else resize_mask(mask.float(), (height, width), "bilinear", batch).clamp(0, 1)
    )
    if latent_mask is not None and not latent_mask.any() and not sd.is_inpainting_model:
        latent_mask = None  # nothing to repaint: behave as plain image-to-image
    masked_image_latents = latent.get("fluxion_masked_image_latents")
    if sd.is_inpainting_model and latent_mask is None:
        raise ValueError(
            f"{model.name} is an inpainting model (9 input channels): encode the image with a mask "
            "(Fluxion VAE Encode's mask input)"
        )
    if sd.is_inpainting_model and masked_image_latents is None:
        raise ValueError(
            f"{model.name} is an inpainting model: it needs latents encoded by Fluxion VAE Encode from this "
            "model's VAE, with a mask"
        )
    load_for_sampling(model, tuple(latents.shape), cfg > 1.0)  # the UNet and its patches' models, together
    sampler = make_solver(solver, steps, schedule, denoise, sd.prediction_type, device=sd.device)
    # Full-strength text-to-image starts from pure noise, as diffusers' txt2img pipeline does.
    image_latents = None if (denoise >= 1.0 and latent_mask is None) else latents
    if sd.is_inpainting_model and denoise >= 1.0:
        image_latents = None
    run = SamplingRun(
        num_steps=steps,
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
        return sd.sample(
            tuple(latents.shape),  # type: ignore[arg-type]
            positive,
            negative,
            sampler,
            cfg,
            seed,
            image_latents,
            inpainting_mask=latent_mask,
            masked_image_latents=masked_image_latents,
            callback=on_step,
            run=run,
        ).cpu()


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
    OUTPUT_TOOLTIPS = ("The denoised latents, for Fluxion VAE Decode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model and its adapter stack."}),
                "positive": (CONDITIONING, {"tooltip": "What the image should show (Fluxion Text Encode)."}),
                "negative": (CONDITIONING, {"tooltip": "What the image should avoid (Fluxion Text Encode)."}),
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
                        "tooltip": "The solver (sampler) moving the latents from noise to image.",
                    },
                ),
                "schedule": (
                    list(SCHEDULES),
                    {
                        "default": "karras",
                        "tooltip": "Timestep schedule: normal (leading), karras (sigma-based solvers), trailing, linspace.",
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
        positive: Conditioning,
        negative: Conditioning,
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
        result = {
            key: value
            for key, value in latent_image.items()
            if key not in ("noise_mask", "fluxion_masked_image_latents")
        }
        result["samples"] = latents
        return (result,)


NODE_CLASS_MAPPINGS = {"FluxionSampler": FluxionSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionSampler": "Fluxion Sampler"}
