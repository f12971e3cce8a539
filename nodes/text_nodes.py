"""Encode a prompt with the model's text encoder(s), ComfyUI prompt syntax included."""

from __future__ import annotations

import torch

from ..foundationals.latent_diffusion.model_patch import patched
from ..foundationals.latent_diffusion.sampling import Conditioning, SizeConditioning
from .wires import CLIP, CONDITIONING, ClipWire, load_text_encoders

_SIZE = {"default": 1024, "min": 0, "max": 16384, "step": 8}


class FluxionTextEncode:
    """A prompt's conditioning: `(word:1.2)` emphasis, long prompts, `embedding:name`, clip skip, SDXL sizes."""

    DESCRIPTION = (
        "Encodes a prompt (positive or negative) for the sampler. ComfyUI's syntax works: (word:1.2) and (word) "
        "emphasis, \\( \\) for literal brackets, prompts past 77 tokens in chunks, embedding:name for textual "
        "inversions from models/embeddings. SDXL also takes its size and crop conditioning."
    )
    CATEGORY = "fluxion/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The text conditioning, for the sampler's positive or negative input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
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
                "width": (
                    "INT",
                    dict(_SIZE, tooltip="SDXL: original image width it conditions on (ignored by SD1.5)."),
                ),
                "height": ("INT", dict(_SIZE, tooltip="SDXL: original image height (ignored by SD1.5).")),
                "crop_w": (
                    "INT",
                    dict(_SIZE, default=0, tooltip="SDXL: crop left offset (ignored by SD1.5)."),
                ),
                "crop_h": (
                    "INT",
                    dict(_SIZE, default=0, tooltip="SDXL: crop top offset (ignored by SD1.5)."),
                ),
                "target_width": ("INT", dict(_SIZE, tooltip="SDXL: target width (ignored by SD1.5).")),
                "target_height": ("INT", dict(_SIZE, tooltip="SDXL: target height (ignored by SD1.5).")),
            }
        }

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
    ) -> tuple[Conditioning]:
        model = clip.model
        layer = (-2 if model.is_sdxl else -1) - (clip_skip - 1)
        size = SizeConditioning((height, width), (crop_h, crop_w), (target_height, target_width))
        load_text_encoders(model)
        with patched(model, clip.patches, None), torch.no_grad():
            conditioning = model.encode_prompt(text, clip_skip=layer, size=size)
        return (conditioning,)


NODE_CLASS_MAPPINGS = {"FluxionTextEncode": FluxionTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionTextEncode": "Fluxion Text Encode"}
