"""Image prompts: IP-Adapter (SD1.5 base/plus, SDXL) with a CLIP vision encoder, and reference-only control."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..foundationals.clip.image_encoder import CLIPImageEncoder, load_clip_image_encoder
from ..foundationals.latent_diffusion.controlnet import unet_family
from ..foundationals.latent_diffusion.ip_adapter import IPAdapter, IPAdapterPatch, load_ip_adapter
from ..foundationals.latent_diffusion.reference_only import ReferenceOnlyPatch
from ..foundationals.model_files import read_state_dict
from .host import list_model_files, model_file_path
from .latent_nodes import crop_to_multiple, images_to_tensor, require_finite
from .wires import MODEL, MODEL_FILES, VAE, ModelWire, VaeWire

IP_ADAPTER = "FLUXION_IPADAPTER"
CLIP_VISION = "FLUXION_CLIP_VISION"


def _load_image_encoder(path: Path) -> CLIPImageEncoder:
    return load_clip_image_encoder(read_state_dict(path, what="CLIP vision encoder"))


@dataclass(frozen=True)
class NamedModel:
    """A loaded model and its file name (shown in the model inspector)."""

    name: str
    model: IPAdapter | CLIPImageEncoder


class FluxionIPAdapterLoader:
    """Load an IP-Adapter file (tencent-ailab .bin/.safetensors or diffusers layout)."""

    DESCRIPTION = "Loads an IP-Adapter (SD1.5 base or plus, SDXL) from models/ipadapter."
    CATEGORY = "fluxion/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (IP_ADAPTER,)
    RETURN_NAMES = ("ipadapter",)
    OUTPUT_TOOLTIPS = ("The IP-Adapter, for Fluxion Apply IP-Adapter.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ipadapter_name": (
                    list_model_files("ipadapter"),
                    {"tooltip": "IP-Adapter file in models/ipadapter."},
                )
            }
        }

    def load(self, ipadapter_name: str) -> tuple[NamedModel]:
        path = model_file_path("ipadapter", ipadapter_name)
        return (NamedModel(ipadapter_name, MODEL_FILES.get("ipadapter", path, load_ip_adapter)),)


class FluxionCLIPVisionLoader:
    """Load a CLIP vision encoder (ViT-H/14 or ViT-bigG/14) for IP-Adapters."""

    DESCRIPTION = "Loads a CLIP image encoder (transformers or open_clip layout) from models/clip_vision."
    CATEGORY = "fluxion/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The image encoder, for Fluxion Apply IP-Adapter.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_name": (
                    list_model_files("clip_vision"),
                    {"tooltip": "Image encoder file in models/clip_vision."},
                )
            }
        }

    def load(self, clip_name: str) -> tuple[NamedModel]:
        path = model_file_path("clip_vision", clip_name)
        return (NamedModel(clip_name, MODEL_FILES.get("clip_vision", path, _load_image_encoder)),)


def parse_weights(text: str, count: int) -> list[float] | None:
    """'1, 0.5' -> [1.0, 0.5] (one per reference image); empty -> None (all 1)."""
    if not text.strip():
        return None
    try:
        weights = [float(item) for item in text.replace(";", ",").split(",") if item.strip()]
    except ValueError as error:
        raise ValueError(f"image_weights must be numbers separated by commas, got {text!r}") from error
    if len(weights) != count:
        raise ValueError(f"image_weights has {len(weights)} values for {count} reference image(s)")
    return weights


class FluxionApplyIPAdapter:
    """Prompt with images: the IP-Adapter's image tokens join the text in cross-attention."""

    DESCRIPTION = (
        "Adds an IP-Adapter to the model's stack: the reference images (a batch) are encoded by the CLIP vision "
        "model and steer the generation with `weight`. Several images combine by concat or average, each with "
        "its own weight; start/end limit it to a fraction of the steps; a mask limits it to a region."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the IP-Adapter in its stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to add the IP-Adapter to."}),
                "ipadapter": (IP_ADAPTER, {"tooltip": "From Fluxion Load IP-Adapter."}),
                "clip_vision": (
                    CLIP_VISION,
                    {"tooltip": "The image encoder the IP-Adapter was trained with (ViT-H or bigG)."},
                ),
                "image": ("IMAGE", {"tooltip": "Reference image(s); a batch gives several references."}),
                "weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -1.0,
                        "max": 5.0,
                        "step": 0.05,
                        "tooltip": "Scale of the image attention (0 = off).",
                    },
                ),
                "combine": (
                    ["concat", "average"],
                    {"default": "concat", "tooltip": "How several reference images combine."},
                ),
                "image_weights": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional weight per reference image, e.g. '1, 0.5' (empty: all 1).",
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
                "negative_image": (
                    "IMAGE",
                    {"tooltip": "Optional negative reference (default: the encoder's empty image)."},
                ),
                "mask": ("MASK", {"tooltip": "Apply the image prompt only where the mask is white."}),
            },
        }

    def apply(
        self,
        model: ModelWire,
        ipadapter: NamedModel,
        clip_vision: NamedModel,
        image: torch.Tensor,
        weight: float,
        combine: str,
        image_weights: str,
        start_percent: float,
        end_percent: float,
        negative_image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[ModelWire]:
        adapter, encoder = ipadapter.model, clip_vision.model
        assert isinstance(adapter, IPAdapter) and isinstance(encoder, CLIPImageEncoder)
        for tensor, what in (
            (image, "the image"),
            (negative_image, "the negative image"),
            (mask, "the mask"),
        ):
            if tensor is not None:
                require_finite(tensor, what)
        try:
            adapter.check_unet(model.model.unet)
        except ValueError as error:
            family = unet_family(model.model.unet.config)
            raise ValueError(
                f"IP-Adapter {ipadapter.name} does not fit the model {model.name} ({family}): {error}"
            ) from error
        try:
            adapter.check_image_encoder(encoder)
        except ValueError as error:
            raise ValueError(
                f"IP-Adapter {ipadapter.name} does not fit the CLIP vision encoder {clip_vision.name}: {error}"
            ) from error
        with torch.no_grad():
            patch = IPAdapterPatch.from_images(
                adapter,
                encoder,
                image,
                negative_image,
                scale=weight,
                weights=parse_weights(image_weights, image.shape[0]),
                combine=combine,
                start=start_percent,
                end=end_percent,
                mask=mask,
            )
        return (model.with_patch(patch),)


class FluxionReferenceOnly:
    """Reference-only control: the generation attends to a reference image's features (no extra model)."""

    DESCRIPTION = (
        "Makes the generation follow a reference image's content and style: the reference's latents, noised to "
        "each step, run through the UNet and its self-attention features are shared with the generation."
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
                        tooltip="Share of attention blocks that look at the reference (0 = off).",
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
            }
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
    ) -> tuple[ModelWire]:
        sd = vae.model
        require_finite(image, "the reference image")
        pixels = images_to_tensor(crop_to_multiple(image, sd.autoencoder.config.downscale_factor))
        latents = sd.encode_image(pixels[:1])
        patch = ReferenceOnlyPatch(latents, strength, style_fidelity, start_percent, end_percent)
        return (model.with_patch(patch),)


NODE_CLASS_MAPPINGS = {
    "FluxionIPAdapterLoader": FluxionIPAdapterLoader,
    "FluxionCLIPVisionLoader": FluxionCLIPVisionLoader,
    "FluxionApplyIPAdapter": FluxionApplyIPAdapter,
    "FluxionReferenceOnly": FluxionReferenceOnly,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionIPAdapterLoader": "Fluxion Load IP-Adapter",
    "FluxionCLIPVisionLoader": "Fluxion Load CLIP Vision",
    "FluxionApplyIPAdapter": "Fluxion Apply IP-Adapter",
    "FluxionReferenceOnly": "Fluxion Reference-Only",
}
