"""Resizing of masks and hint images to the grid a model works on: one function each, the interpolation named by the caller.

- "nearest": a hard mask stays hard (the inpainting latent mask).
- "bilinear": smooth, as ComfyUI resizes a MASK to latents (also the IP-Adapter mask on each attention grid).
- "area": the average of each pixel patch (a ControlNet's mask on its residuals).
- "antialiased": the area average when the size divides evenly, else antialiased bilinear (region masks: a
  latent cell is 0 only when its whole patch is outside the mask).
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from ...fluxion.utils import center_crop_resize

MaskInterpolation = Literal["nearest", "bilinear", "area", "antialiased"]


def broadcast_batch(tensor: Tensor, batch_size: int) -> Tensor:
    """Repeat a batch cyclically to `batch_size` items (ComfyUI's broadcast of hints and masks)."""
    if tensor.shape[0] == batch_size:
        return tensor
    repeats = math.ceil(batch_size / tensor.shape[0])
    return tensor.repeat(repeats, *([1] * (tensor.dim() - 1)))[:batch_size]


def resize_mask(
    mask: Tensor, size: tuple[int, int], interpolation: MaskInterpolation, batch_size: int | None = None
) -> Tensor:
    """A mask (H, W), (B, H, W) or (B, 1, H, W) as (B, 1, *size), resized by `interpolation`; its batch
    repeated cyclically to `batch_size` when given. The dtype is the caller's (convert before calling)."""
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() == 3:
        mask = mask[:, None]
    size = (int(size[0]), int(size[1]))
    if tuple(mask.shape[-2:]) != size:
        if interpolation == "antialiased":
            if mask.shape[-2] % size[0] == 0 and mask.shape[-1] % size[1] == 0:
                mask = F.adaptive_avg_pool2d(mask, size)
            else:
                mask = F.interpolate(mask, size=size, mode="bilinear", antialias=True)
        elif interpolation == "bilinear":
            mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
        else:
            mask = F.interpolate(mask, size=size, mode=interpolation)
    return mask if batch_size is None else broadcast_batch(mask, batch_size)


def resize_hint(image: Tensor, height: int, width: int) -> Tensor:
    """ComfyUI IMAGE (B,H,W,C in [0, 1]) -> (B,C,height,width): center crop to the aspect ratio, nearest-exact resize.

    The same as ComfyUI's `common_upscale(hint, width, height, "nearest-exact", "center")`.
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4:
        raise ValueError(f"a hint image must be (B, H, W, C), got shape {tuple(image.shape)}")
    return center_crop_resize(image.movedim(-1, 1), height, width, mode="nearest-exact")
