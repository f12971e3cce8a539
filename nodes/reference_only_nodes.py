"""Reference-only control: the generation shares a reference image's self-attention features (no extra model)."""

from __future__ import annotations

import torch

from ..foundationals.latent_diffusion.adapters.reference_only import ATTN, MODES, ReferenceOnlyPatch
from .latent_nodes import crop_to_multiple, images_to_tensor, require_finite
from .wires import MODEL, VAE, ModelWire, VaeWire, load_autoencoder


class FluxionReferenceOnly:
    """Reference-only control: the generation attends to a reference image's features (no extra model)."""

    DESCRIPTION = (
        "Makes the generation follow a reference image's content and style: the reference's latents, noised to "
        "each step, run through the UNet and its self-attention features are shared with the generation "
        "(mode attn), or the generation's block features take the reference's per-channel mean and std "
        "(mode adain), or both (attn+adain), as Advanced-ControlNet's Reference."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with reference-only control in its stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to control."}),
                "vae": (VAE, {"tooltip": "Autoencoder, to encode the reference image."}),
                "image": (
                    "IMAGE",
                    {"tooltip": "The reference image (same size as the generation works best)."},
                ),
                "strength": (
                    "FLOAT",
                    dict(
                        fraction,
                        default=1.0,
                        tooltip="Share of blocks that use the reference (0 = off; the ref_weight of "
                        "Advanced-ControlNet).",
                    ),
                ),
                "style_fidelity": (
                    "FLOAT",
                    dict(fraction, default=0.5, tooltip="0 favours the prompt, 1 the reference's style."),
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
                "mode": (
                    list(MODES),
                    {
                        "default": ATTN,
                        "tooltip": "attn: share self-attention features (reference_attn); adain: match the "
                        "reference's feature mean/std in the UNet blocks (reference_adain); attn+adain: both.",
                    },
                ),
                "adain_strength": (
                    "FLOAT",
                    dict(
                        fraction,
                        default=1.0,
                        tooltip="AdaIN modes: blend of the renormalised features with the plain ones (1 = full).",
                    ),
                ),
            },
        }

    def apply(
        self,
        model: ModelWire,
        vae: VaeWire,
        image: torch.Tensor,
        strength: float,
        style_fidelity: float,
        start_percent: float,
        end_percent: float,
        mode: str = ATTN,
        adain_strength: float = 1.0,
    ) -> tuple[ModelWire]:
        if mode not in MODES:
            raise ValueError(f"Fluxion Reference-Only: mode must be one of {', '.join(MODES)}, got {mode!r}")
        sd = vae.model
        require_finite(image, "the reference image")
        pixels = images_to_tensor(crop_to_multiple(image, sd.autoencoder.config.downscale_factor))
        factor = sd.autoencoder.config.downscale_factor
        load_autoencoder(sd, (1, 4, pixels.shape[2] // factor, pixels.shape[3] // factor), decode=False)
        latents = sd.encode_image(pixels[:1])
        patch = ReferenceOnlyPatch(
            latents,
            strength,
            style_fidelity,
            start_percent,
            end_percent,
            mode=mode,
            adain_strength=adain_strength,
        )
        return (model.with_patch(patch),)


NODE_CLASS_MAPPINGS = {"FluxionReferenceOnly": FluxionReferenceOnly}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionReferenceOnly": "Fluxion Reference-Only"}
