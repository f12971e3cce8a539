"""Encode a prompt with the model's text encoder(s), ComfyUI prompt syntax included, into core CONDITIONING."""

from __future__ import annotations

from typing import Any

import torch

from ..foundationals.latent_diffusion.conditioning import SizeConditioning
from ..foundationals.latent_diffusion.model_patch import patched
from .core_types import core_conditioning
from .wires import CLIP, ClipWire, load_text_encoders

_SIZE = {"default": 1024, "min": 0, "max": 16384, "step": 8}
_PROMPT_SYNTAX = (
    "ComfyUI's syntax works: (word:1.2) and (word) emphasis, \\( \\) for literal brackets, prompts past 77 tokens "
    "in chunks, embedding:name for textual inversions from models/embeddings."
)
_OUTPUT_TOOLTIP = (
    "Core CONDITIONING: for the Fluxion Sampler or KSampler-style nodes, and every core conditioning node "
    "(Combine, Set Area, Set Mask, Set Timestep Range...)."
)


def _text_inputs() -> dict[str, Any]:
    return {
        "clip": (CLIP, {"tooltip": "Text encoder(s) from Fluxion Load Checkpoint (or a LoRA node)."}),
        "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt."}),
        "clip_skip": (
            "INT",
            {
                "default": 1,
                "min": 1,
                "max": 12,
                "tooltip": "1 uses the model's usual layer (SD1.5 last, SDXL penultimate); 2 one layer earlier (A1111's clip skip 2), ...",
            },
        ),
    }


def _size_inputs(family_note: str) -> dict[str, Any]:
    return {
        "width": ("INT", dict(_SIZE, tooltip=f"SDXL: original image width it conditions on{family_note}.")),
        "height": ("INT", dict(_SIZE, tooltip=f"SDXL: original image height{family_note}.")),
        "crop_w": ("INT", dict(_SIZE, default=0, tooltip=f"SDXL: crop left offset{family_note}.")),
        "crop_h": ("INT", dict(_SIZE, default=0, tooltip=f"SDXL: crop top offset{family_note}.")),
        "target_width": ("INT", dict(_SIZE, tooltip=f"SDXL: target width{family_note}.")),
        "target_height": ("INT", dict(_SIZE, tooltip=f"SDXL: target height{family_note}.")),
    }


def encode_prompt(clip: ClipWire, text: str, clip_skip: int, sizes: dict[str, int] | None) -> list[list[Any]]:
    """A prompt as a one-entry core CONDITIONING; `sizes` (SDXL's size keys) are written for SDXL only."""
    model = clip.model
    layer = (-2 if model.is_sdxl else -1) - (clip_skip - 1)
    size = None
    if sizes is not None:
        size = SizeConditioning(
            (sizes["height"], sizes["width"]),
            (sizes["crop_h"], sizes["crop_w"]),
            (sizes["target_height"], sizes["target_width"]),
        )
    load_text_encoders(model)
    with patched(model, clip.patches, None), torch.no_grad():
        conditioning = model.encode_prompt(text, clip_skip=layer, size=size)
    return core_conditioning(conditioning, sizes if model.is_sdxl else None)


class FluxionCLIPTextEncode:
    """A prompt's core CONDITIONING: `(word:1.2)` emphasis, long prompts, `embedding:name`, clip skip."""

    DESCRIPTION = (
        "Encodes a prompt (positive or negative) into core CONDITIONING, for SD1.5 or SDXL. "
        + _PROMPT_SYNTAX
        + " On SDXL the size conditioning follows the latent, as core's CLIP Text Encode; to set it, use "
        "Fluxion CLIP Text Encode (SDXL)."
    )
    CATEGORY = "fluxion/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = (_OUTPUT_TOOLTIP,)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": _text_inputs()}

    def encode(self, clip: ClipWire, text: str, clip_skip: int = 1) -> tuple[list[list[Any]]]:
        return (encode_prompt(clip, text, clip_skip, None),)


class FluxionCLIPTextEncodeSDXL:
    """SDXL: a prompt's core CONDITIONING with its size and crop conditioning, as core's CLIPTextEncodeSDXL."""

    DESCRIPTION = (
        "Encodes a prompt for SDXL with its size and crop conditioning (the keys core's CLIP Text Encode SDXL "
        "writes). " + _PROMPT_SYNTAX
    )
    CATEGORY = "fluxion/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = (_OUTPUT_TOOLTIP,)
    SIZES_FOR_SD15 = "refused"  # the legacy node ignores them instead

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {**_text_inputs(), **_size_inputs("")}}

    def encode(
        self,
        clip: ClipWire,
        text: str,
        clip_skip: int = 1,
        width: int = 1024,
        height: int = 1024,
        crop_w: int = 0,
        crop_h: int = 0,
        target_width: int = 1024,
        target_height: int = 1024,
    ) -> tuple[list[list[Any]]]:
        if not clip.model.is_sdxl and self.SIZES_FOR_SD15 == "refused":
            raise ValueError(
                f"{clip.name} is an SD1.5 model, which has no size conditioning: use Fluxion CLIP Text Encode"
            )
        sizes = dict(
            width=width,
            height=height,
            crop_w=crop_w,
            crop_h=crop_h,
            target_width=target_width,
            target_height=target_height,
        )
        return (encode_prompt(clip, text, clip_skip, sizes),)


class FluxionTextEncode(FluxionCLIPTextEncodeSDXL):
    """The pack's first text encoder, kept so saved workflows run as before (SDXL sizes on every graph)."""

    DESCRIPTION = (
        "Legacy: kept so workflows saved with it still run unchanged. New graphs use Fluxion CLIP Text Encode "
        "(SD1.5 and SDXL) or Fluxion CLIP Text Encode (SDXL) (with its size conditioning). " + _PROMPT_SYNTAX
    )
    DEPRECATED = True
    SIZES_FOR_SD15 = "ignored"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {**_text_inputs(), **_size_inputs(" (ignored by SD1.5)")}}


NODE_CLASS_MAPPINGS = {
    "FluxionCLIPTextEncode": FluxionCLIPTextEncode,
    "FluxionCLIPTextEncodeSDXL": FluxionCLIPTextEncodeSDXL,
    "FluxionTextEncode": FluxionTextEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionCLIPTextEncode": "Fluxion CLIP Text Encode",
    "FluxionCLIPTextEncodeSDXL": "Fluxion CLIP Text Encode (SDXL)",
    "FluxionTextEncode": "Fluxion Text Encode (legacy)",
}
