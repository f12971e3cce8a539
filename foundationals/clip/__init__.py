"""CLIP for Stable Diffusion: byte-level BPE tokenizer, ComfyUI prompt features, text encoders."""

# Text and image encoders, their configs, loaders and SD prompt conditioning.
from .config import IMAGE_PRESETS, TEXT_PRESETS, CLIPImageConfig, CLIPTextConfig
from .image_encoder import (
    CLIPImageEncoder,
    CLIPImageHiddenState,
    load_clip_image_encoder,
    load_clip_image_encoder_from_folder,
    preprocess_images,
)
from .prompt_encoding import TextConditioning, encode_sd15_prompt, encode_sdxl_prompt, encode_text
from .text_encoder import (
    CLIPTextEncoder,
    CLIPTextHiddenState,
    load_clip_text_encoder,
    load_clip_text_encoder_from_folder,
)

__all__ = [
    "IMAGE_PRESETS",
    "TEXT_PRESETS",
    "CLIPImageConfig",
    "CLIPImageEncoder",
    "CLIPImageHiddenState",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CLIPTextHiddenState",
    "TextConditioning",
    "encode_sd15_prompt",
    "encode_sdxl_prompt",
    "encode_text",
    "load_clip_image_encoder",
    "load_clip_image_encoder_from_folder",
    "load_clip_text_encoder",
    "load_clip_text_encoder_from_folder",
    "preprocess_images",
]
