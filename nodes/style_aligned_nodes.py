"""StyleAligned: the images of a batch share one style through shared self-attention (no extra model)."""

from __future__ import annotations

from typing import Any

from ..foundationals.latent_diffusion.adapters.style_aligned import StyleAlignedPatch
from .core_types import read_latents
from .wires import MODEL, ModelWire


class FluxionStyleAligned:
    """StyleAligned (shared attention with AdaIN on queries and keys) on a model."""

    DESCRIPTION = (
        "StyleAligned: every image of the batch attends to the style reference's self-attention tokens, with its "
        "queries and keys renormalised (AdaIN) to the reference's, so a batch shares one style. The reference is "
        "the batch's first image (per positive / negative half), or the optional reference LATENT, noised to "
        "each step's noise level and run through the model first (one more UNet pass per step)."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with StyleAligned in its stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to patch."}),
                "scale": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 2.0,
                        "step": 0.01,
                        "tooltip": "Multiplies the reference's keys and values the other images attend to "
                        "(refiners' scale; 1 = as the paper).",
                    },
                ),
                "adain_queries": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "AdaIN the queries to the reference's."},
                ),
                "adain_keys": ("BOOLEAN", {"default": True, "tooltip": "AdaIN the keys to the reference's."}),
                "adain_values": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "AdaIN the values too (the community node's q+k+v)."},
                ),
                "share_reference": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Off: the batch's reference image attends only to itself (its output is the "
                        "plain model's). On: it goes through the shared attention too (refiners' path, the same "
                        "up to rounding).",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    dict(fraction, default=0.0, tooltip="Fraction of the steps after which it starts."),
                ),
                "end_percent": (
                    "FLOAT",
                    dict(fraction, default=1.0, tooltip="Fraction of the steps after which it stops."),
                ),
            },
            "optional": {
                "reference": (
                    "LATENT",
                    {
                        "tooltip": "Optional style reference (one latent, e.g. VAE Encode of an image): noised to "
                        "each step and shared with every image of the batch. Without it, image 0 of the batch "
                        "is the reference."
                    },
                ),
            },
        }

    def apply(
        self,
        model: ModelWire,
        scale: float,
        adain_queries: bool,
        adain_keys: bool,
        adain_values: bool,
        share_reference: bool,
        start_percent: float,
        end_percent: float,
        reference: dict[str, Any] | None = None,
    ) -> tuple[ModelWire]:
        latents = None
        if reference is not None:
            sd = model.model
            latents = read_latents(
                reference, sd.autoencoder.scaling_factor, "Fluxion StyleAligned: the reference"
            )
            if latents.dim() != 4 or latents.shape[1] != sd.latent_channels:
                raise ValueError(
                    f"Fluxion StyleAligned: the reference latent has shape {tuple(latents.shape)}, expected "
                    f"(1, {sd.latent_channels}, h, w) for this model"
                )
            if latents.shape[0] != 1:
                raise ValueError(
                    f"Fluxion StyleAligned: the reference LATENT holds {latents.shape[0]} latents, expected one "
                    "(pick one with Latent From Batch)"
                )
            if sd.unet.config.in_channels != sd.latent_channels:
                raise ValueError(
                    "Fluxion StyleAligned: a reference latent needs a plain model; this one is an inpainting "
                    "model (use the batch's first image as the reference instead)"
                )
        patch = StyleAlignedPatch(
            latents,
            scale,
            adain_queries,
            adain_keys,
            adain_values,
            share_reference,
            start_percent,
            end_percent,
        )
        return (model.with_patch(patch),)


NODE_CLASS_MAPPINGS = {"FluxionStyleAligned": FluxionStyleAligned}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionStyleAligned": "Fluxion StyleAligned"}
