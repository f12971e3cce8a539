"""Headless stand-ins for ComfyUI's LoadImage, ImageBatch, SaveImage and PreviewImage (and, from
`core_stand_ins`, its latent and conditioning nodes).

Same names, inputs and outputs as ComfyUI's own nodes, so a workflow made in the editor runs
unchanged in `python -m nodes run`. They are only for the runner: inside ComfyUI its own nodes
are used, so these are not in NODE_CLASS_MAPPINGS. Saved PNGs carry the `prompt` (API JSON) and
every `extra_pnginfo` entry (the editor `workflow`) as tEXt chunks, as ComfyUI writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from ..fluxion.utils import center_crop_resize as crop_resize
from .core_stand_ins import CORE_STAND_INS, HOSTED_ONLY
from .host import input_directory, output_directory, temp_directory


def annotated_path(name: str) -> Path:
    """Resolve an image name as ComfyUI does: 'x.png [output]' / '[temp]' / '[input]' or the input dir."""
    for suffix, folder in (
        ("[output]", output_directory),
        ("[input]", input_directory),
        ("[temp]", temp_directory),
    ):
        if name.endswith(suffix):
            return folder() / name[: -len(suffix)].rstrip()
    return input_directory() / name


def _filename_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "width": str(width),
        "height": str(height),
        "year": str(now.tm_year),
        "month": f"{now.tm_mon:02}",
        "day": f"{now.tm_mday:02}",
        "hour": f"{now.tm_hour:02}",
        "minute": f"{now.tm_min:02}",
        "second": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", value)
    return prefix


def save_image_path(prefix: str, root: Path, width: int = 0, height: int = 0) -> tuple[Path, str, int, str]:
    """Folder, file stem, first free counter and subfolder for `prefix`, as ComfyUI numbers files."""
    prefix = _filename_vars(prefix, width, height) if "%" in prefix else prefix
    normalized = os.path.normpath(prefix)
    subfolder, stem = os.path.dirname(normalized), os.path.basename(normalized)
    root = root.resolve()
    folder = (root / subfolder).resolve()
    if folder != root and root not in folder.parents:
        raise ValueError(f"filename_prefix {prefix!r} would save outside the output folder {root}")
    folder.mkdir(parents=True, exist_ok=True)
    numbered = re.compile(re.escape(stem) + r"_(\d+)_", re.IGNORECASE)
    counters = [int(m.group(1)) for f in os.listdir(folder) if (m := numbered.match(f))]
    return folder, stem, max(counters, default=0) + 1, subfolder


def png_metadata(prompt: Any, extra_pnginfo: dict[str, Any] | None) -> PngInfo:
    """tEXt chunks as ComfyUI writes them: `prompt`, then each extra_pnginfo key, JSON-encoded."""
    metadata = PngInfo()
    if prompt is not None:
        metadata.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        metadata.add_text(key, json.dumps(value))
    return metadata


class SaveImage:
    def __init__(self) -> None:
        self.output_dir = output_directory()
        self.type = "output"
        self.prefix_append = ""
        self.compress_level = 4

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "ComfyUI",
                        "tooltip": "The prefix for the file to save. It may include %width%, %height%, "
                        "%year%, %month%, %day%, %hour%, %minute% and %second%.",
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to the output directory."

    def save_images(
        self,
        images: torch.Tensor,
        filename_prefix: str = "ComfyUI",
        prompt: Any = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write each image of the batch as `{prefix}_{counter:05}_.png` with the workflow embedded."""
        filename_prefix += self.prefix_append
        height, width = images[0].shape[0], images[0].shape[1]
        folder, stem, counter, subfolder = save_image_path(filename_prefix, self.output_dir, width, height)
        metadata = png_metadata(prompt, extra_pnginfo)
        results = []
        for batch_number, image in enumerate(images):
            pixels = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
            file = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            Image.fromarray(pixels).save(folder / file, pnginfo=metadata, compress_level=self.compress_level)
            results.append({"filename": file, "subfolder": subfolder, "type": self.type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    def __init__(self) -> None:
        self.output_dir = temp_directory()
        self.type = "temp"
        self.prefix_append = "_temp_" + "".join(random.choices(string.ascii_lowercase, k=5))
        self.compress_level = 1

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"images": ("IMAGE",)},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    DESCRIPTION = "Saves the input images to the temporary directory for a look."


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        folder = input_directory()
        files = sorted(f.name for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
        return {"required": {"image": (files, {"image_upload": True})}}

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    DESCRIPTION = "Loads an image from the input directory; the mask is the inverted alpha channel."

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames of the file as IMAGE (B,H,W,3) and MASK (B,H,W); frames of another size are skipped."""
        opened = Image.open(annotated_path(image))
        frames: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        for frame in ImageSequence.Iterator(opened):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda value: value * (1 / 255))
            rgb = frame.convert("RGB")
            if frames and rgb.size != (frames[0].shape[2], frames[0].shape[1]):
                continue
            frames.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])
            if "A" in frame.getbands():
                alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
                masks.append(1.0 - torch.from_numpy(alpha)[None])
            else:
                masks.append(torch.zeros((1, 64, 64), dtype=torch.float32))
        if len(frames) > 1 and opened.format != "MPO":
            return torch.cat(frames), torch.cat(masks)
        return frames[0], masks[0]

    @classmethod
    def IS_CHANGED(cls, image: str) -> str:
        """Hash of the file, so an edited image re-runs the graph."""
        return hashlib.sha256(annotated_path(image).read_bytes()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        """The file must exist (it may live in a subfolder the choice list does not show)."""
        if not isinstance(image, str):
            return f"expected an image file name (a STRING), got {image!r:.40} ({type(image).__name__})"
        if not annotated_path(image).is_file():
            return f"Invalid image file: {image} (looked in {input_directory()})"
        return True


def center_crop_resize(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) to `width` x `height`: centre-cropped to that aspect, then bilinear (ComfyUI's
    `common_upscale(..., "bilinear", "center")`)."""
    return crop_resize(images.movedim(-1, 1), height, width, mode="bilinear").movedim(1, -1)


class ImageBatch:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "batch"
    CATEGORY = "image"
    DESCRIPTION = "One batch of both inputs; image2 is resized (centre crop, bilinear) to image1's size."

    def batch(self, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
        if image1.shape[1:] != image2.shape[1:]:
            image2 = center_crop_resize(image2, image1.shape[2], image1.shape[1])
        return (torch.cat((image1, image2), dim=0),)


RUNNER_NODE_CLASSES: dict[str, type] = {
    "LoadImage": LoadImage,
    "ImageBatch": ImageBatch,
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    **CORE_STAND_INS,
    **HOSTED_ONLY,
}
