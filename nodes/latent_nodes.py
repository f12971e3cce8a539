"""Latents: empty ones for text-to-image, and the autoencoder between ComfyUI IMAGEs and LATENTs.

LATENTs follow core's convention (unscaled `samples`, `noise_mask`; see `core_types`), so core's VAE Encode /
Decode, Empty Latent Image, Latent Upscale, Set Latent Noise Mask... work on them and on ours alike.
"""

from __future__ import annotations

from typing import Any

import torch

from ..fluxion.casting import compute_placement
from ..foundationals.latent_diffusion.limits import (  # one implementation, shared with the pipelines
    MAX_BATCH_PIXELS,  # noqa: F401  (re-exported for the nodes and tests)
    MAX_RESOLUTION,
    check_size,
)
from ..foundationals.latent_diffusion.resizing import resize_mask
from .core_types import MASKED_IMAGE_KEY, read_latents, write_latents
from .wires import VAE, VaeWire, load_autoencoder

LATENT_FACTOR = 8  # SD1.5 and SDXL autoencoders downscale by 8


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse NaN or infinite values, which would silently turn every output to NaN."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contains NaN or infinite values")


def images_to_tensor(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, 3, H, W), alpha dropped, grey expanded."""
    if images.dim() != 4:
        raise ValueError(f"expected an IMAGE batch (B, H, W, C), got shape {tuple(images.shape)}")
    channels = images.shape[-1]
    pixels = images[..., :3] if channels >= 3 else images[..., :1].expand(*images.shape[:-1], 3)
    return pixels.permute(0, 3, 1, 2).float()


def tensor_to_images(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ComfyUI IMAGE (B, H, W, 3) on the CPU."""
    return pixels.permute(0, 2, 3, 1).float().cpu().contiguous()


def crop_to_multiple(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Center-crop an IMAGE so height and width are multiples of `factor` (ComfyUI's VAE Encode crops too)."""
    height, width = images.shape[1] // factor * factor, images.shape[2] // factor * factor
    if height < 2 * factor or width < 2 * factor:  # one latent pixel is not enough for the models' norms
        raise ValueError(
            f"image of {images.shape[2]}x{images.shape[1]} pixels is too small: each side needs at least "
            f"{2 * factor} pixels"
        )
    top, left = (images.shape[1] - height) // 2, (images.shape[2] - width) // 2
    return images[:, top : top + height, left : left + width]


class FluxionEmptyLatent:
    """Blank latents to start text-to-image from."""

    DESCRIPTION = "Empty latents of the given size (a multiple of 8), the starting point of text-to-image."
    CATEGORY = "fluxion/latent"
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zero latents (B, 4, height/8, width/8), like ComfyUI's Empty Latent Image.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = {"min": 16, "max": MAX_RESOLUTION, "step": 8}
        return {
            "required": {
                "width": ("INT", dict(size, default=512, tooltip="Image width in pixels (multiple of 8).")),
                "height": ("INT", dict(size, default=512, tooltip="Image height in pixels (multiple of 8).")),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
            }
        }

    def generate(self, width: int, height: int, batch_size: int) -> tuple[dict[str, Any]]:
        check_size(batch_size, height, width, "empty latent")
        latents = torch.zeros(batch_size, 4, height // LATENT_FACTOR, width // LATENT_FACTOR)
        return ({"samples": latents},)


class FluxionVAEEncode:
    """IMAGE -> LATENT, optionally with an inpainting mask."""

    DESCRIPTION = (
        "Encodes images into a core LATENT for image-to-image. With a mask, the latent carries it as core's "
        "noise_mask (white = repaint) for inpainting: regular models keep the unmasked area, 9-channel inpainting "
        "models also get the masked image (an extra key core nodes pass along)."
    )
    CATEGORY = "fluxion/latent"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The images' latents (and the inpainting mask when given).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": (VAE, {"tooltip": "Autoencoder from Fluxion Load Checkpoint."}),
                "pixels": ("IMAGE", {"tooltip": "Images to encode; cropped to a multiple of 8 pixels."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Inpainting mask: 1 (white) where the sampler repaints."}),
            },
        }

    def encode(
        self, vae: VaeWire, pixels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[dict[str, Any]]:
        model = vae.model
        factor = model.autoencoder.config.downscale_factor
        if pixels.dim() == 4:
            check_size(pixels.shape[0], pixels.shape[1], pixels.shape[2], "image to encode")
        if mask is not None:
            require_finite(mask, "the mask")
        images = crop_to_multiple(pixels, factor)
        if not torch.isfinite(images).all():
            raise ValueError("the image contains NaN or infinite values")
        image = images_to_tensor(images).clamp(0, 1)
        scaling = model.autoencoder.scaling_factor
        load_autoencoder(model, (len(image), 4, image.shape[2] // factor, image.shape[3] // factor), False)
        result: dict[str, Any] = {"samples": write_latents(model.encode_image(image).cpu(), scaling)}
        if mask is not None:
            top, left = (pixels.shape[1] - images.shape[1]) // 2, (pixels.shape[2] - images.shape[2]) // 2
            mask = mask if mask.dim() == 3 else mask[None]
            if mask.shape[-2:] == pixels.shape[1:3]:
                mask = mask[:, top : top + images.shape[1], left : left + images.shape[2]]
            pixel_mask = resize_mask(mask.float(), image.shape[2:], "bilinear", image.shape[0]).clamp(0, 1)
            result["noise_mask"] = pixel_mask[:, 0].cpu()
            if model.is_inpainting_model:
                keep = (pixel_mask < 0.5).to(image.dtype)
                result[MASKED_IMAGE_KEY] = write_latents(
                    model.encode_image(image * keep + 0.5 * (1 - keep)), scaling
                )
        return (result,)


class FluxionVAEDecode:
    """LATENT -> IMAGE."""

    DESCRIPTION = "Decodes latents into images. Tiled decoding keeps memory flat for large images."
    CATEGORY = "fluxion/latent"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images, for Save Image / Preview Image.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": (VAE, {"tooltip": "Autoencoder from Fluxion Load Checkpoint."}),
                "samples": ("LATENT", {"tooltip": "Latents from the sampler, or any core LATENT."}),
                "tiled": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Decode in overlapping tiles (large images, little memory).",
                    },
                ),
            }
        }

    def decode(self, vae: VaeWire, samples: dict[str, Any], tiled: bool = False) -> tuple[torch.Tensor]:
        model = vae.model
        latents = read_latents(samples, model.autoencoder.scaling_factor, "samples")
        factor = model.autoencoder.config.downscale_factor
        if latents.dim() == 4:
            check_size(
                latents.shape[0], latents.shape[2] * factor, latents.shape[3] * factor, "latents to decode"
            )
        if not torch.isfinite(latents).all():
            raise ValueError("the latents contain NaN or infinite values")
        tile = (latents.shape[0], latents.shape[1], min(latents.shape[2], 64), min(latents.shape[3], 64))
        load_autoencoder(model, tile if tiled else tuple(latents.shape), decode=True)
        if tiled:
            with torch.no_grad():
                pixels = model.autoencoder.tiled_decode(latents.to(*compute_placement(model.autoencoder)))
            image = (pixels.float() / 2 + 0.5).clamp(0, 1)
        else:
            image = model.decode_latents(latents)
        return (tensor_to_images(image),)


NODE_CLASS_MAPPINGS = {
    "FluxionEmptyLatent": FluxionEmptyLatent,
    "FluxionVAEEncode": FluxionVAEEncode,
    "FluxionVAEDecode": FluxionVAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionEmptyLatent": "Fluxion Empty Latent",
    "FluxionVAEEncode": "Fluxion VAE Encode",
    "FluxionVAEDecode": "Fluxion VAE Decode",
}
