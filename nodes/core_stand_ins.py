"""Headless stand-ins for core's latent and conditioning nodes, so mixed workflows run in `python -m nodes run`.

Same names, inputs (order, widgets, defaults) and outputs as ComfyUI 0.8.0's nodes, and the same values out:
Empty Latent Image, Upscale Latent, Set Latent Noise Mask, Conditioning (Combine), Conditioning (Set Area),
Conditioning (Set Mask), ConditioningSetTimestepRange. They work on core LATENT and CONDITIONING values, which
need no ComfyUI model. Inside ComfyUI its own nodes run: these are only for the runner (`RUNNER_NODE_CLASSES`).
Core nodes that need ComfyUI's own models (Load Checkpoint, CLIP Text Encode, VAE Decode) are declared in
`HOSTED_ONLY`, so a workflow holding them converts and validates headless, and the runner says it needs ComfyUI.
"""

from __future__ import annotations

from typing import Any

import torch

from ..fluxion.utils import center_crop_resize
from ..foundationals.latent_diffusion.limits import MAX_RESOLUTION

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]


def _with_values(conditioning: list[list[Any]], values: dict[str, Any]) -> list[list[Any]]:
    """Every entry with `values` set in a copy of its options (core's `conditioning_set_values`)."""
    return [[entry[0], {**entry[1], **values}] for entry in conditioning]


class EmptyLatentImage:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "latent"
    DESCRIPTION = "Zero latents (B, 4, height/8, width/8)."

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple[dict[str, Any]]:
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


class LatentUpscale:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "samples": ("LATENT",),
                "upscale_method": (UPSCALE_METHODS,),
                "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
                "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
                "crop": (["disabled", "center"],),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"
    CATEGORY = "latent"
    DESCRIPTION = "Resizes latents to width x height pixels (0 keeps the aspect ratio); other keys are kept."

    def upscale(
        self, samples: dict[str, Any], upscale_method: str, width: int, height: int, crop: str
    ) -> tuple[dict[str, Any]]:
        if width == 0 and height == 0:
            return (samples,)
        if upscale_method == "bislerp":
            raise ValueError("the bislerp upscale method runs only inside ComfyUI; pick another one headless")
        latents = samples["samples"]
        if width == 0:
            height = max(64, height)
            width = max(64, round(latents.shape[-1] * height / latents.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(latents.shape[-2] * width / latents.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        if crop == "center":
            resized = center_crop_resize(latents, height // 8, width // 8, mode=upscale_method)
        else:
            resized = torch.nn.functional.interpolate(
                latents, size=(height // 8, width // 8), mode=upscale_method
            )
        return ({**samples, "samples": resized},)


class SetLatentNoiseMask:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"
    CATEGORY = "latent/inpaint"
    DESCRIPTION = "Attaches an inpainting mask (1 = repaint) to latents as noise_mask."

    def set_mask(self, samples: dict[str, Any], mask: torch.Tensor) -> tuple[dict[str, Any]]:
        return ({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},)


class ConditioningCombine:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "combine"
    CATEGORY = "conditioning"
    DESCRIPTION = "Both lists of entries in one: the sampler averages their predictions by weight."

    def combine(self, conditioning_1: list[Any], conditioning_2: list[Any]) -> tuple[list[Any]]:
        return (conditioning_1 + conditioning_2,)


class ConditioningSetArea:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        size = {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}
        offset = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "width": ("INT", size),
                "height": ("INT", size),
                "x": ("INT", offset),
                "y": ("INT", offset),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"
    DESCRIPTION = "Restricts the entries to a rectangle (pixels) with a weight."

    def append(
        self, conditioning: list[Any], width: int, height: int, x: int, y: int, strength: float
    ) -> tuple[list[Any]]:
        area = (height // 8, width // 8, y // 8, x // 8)
        return (
            _with_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),
        )


class ConditioningSetMask:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "mask": ("MASK",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                "set_cond_area": (["default", "mask bounds"],),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"
    DESCRIPTION = (
        "Weights the entries by a mask; 'mask bounds' also runs them on the mask's bounding box only."
    )

    def append(
        self, conditioning: list[Any], mask: torch.Tensor, set_cond_area: str, strength: float
    ) -> tuple[list[Any]]:
        if mask.dim() < 3:
            mask = mask[None]
        values = {"mask": mask, "set_area_to_bounds": set_cond_area != "default", "mask_strength": strength}
        return (_with_values(conditioning, values),)


class ConditioningSetTimestepRange:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "set_range"
    CATEGORY = "advanced/conditioning"
    DESCRIPTION = "The entries act only between start and end of the noise schedule (0 = noisiest)."

    def set_range(self, conditioning: list[Any], start: float, end: float) -> tuple[list[Any]]:
        return (_with_values(conditioning, {"start_percent": start, "end_percent": end}),)


CORE_STAND_INS: dict[str, type] = {
    "EmptyLatentImage": EmptyLatentImage,
    "LatentUpscale": LatentUpscale,
    "SetLatentNoiseMask": SetLatentNoiseMask,
    "ConditioningCombine": ConditioningCombine,
    "ConditioningSetArea": ConditioningSetArea,
    "ConditioningSetMask": ConditioningSetMask,
    "ConditioningSetTimestepRange": ConditioningSetTimestepRange,
}
"""Core node types the runner provides headless, by ComfyUI's node id."""


class _NeedsComfyUI:
    """A core node that needs ComfyUI's own models: declared (for the editor format and validation) but only
    runnable inside ComfyUI; the runner refuses a workflow holding one before running anything."""

    FLUXION_HOSTED_ONLY = True
    NEEDS = "ComfyUI's own models"

    def run(self, **_: Any) -> tuple[Any, ...]:
        raise RuntimeError(f"{type(self).__name__} runs only inside ComfyUI (it needs {self.NEEDS})")


class CheckpointLoaderSimple(_NeedsComfyUI):
    NEEDS = "ComfyUI's model loader"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        from .host import list_model_files

        return {"required": {"ckpt_name": (list_model_files("checkpoints"),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "run"
    CATEGORY = "loaders"


class CLIPTextEncode(_NeedsComfyUI):
    NEEDS = "ComfyUI's CLIP"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "conditioning"


class VAEDecode(_NeedsComfyUI):
    NEEDS = "ComfyUI's VAE"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "latent"


HOSTED_ONLY: dict[str, type] = {
    "CheckpointLoaderSimple": CheckpointLoaderSimple,
    "CLIPTextEncode": CLIPTextEncode,
    "VAEDecode": VAEDecode,
}
"""Core node types known headless only to say that the workflow needs ComfyUI (examples/workflows/in_comfyui)."""
