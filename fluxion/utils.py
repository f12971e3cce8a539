"""Weight I/O (safetensors), image <-> tensor conversion, seeding and small tensor helpers."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from .layers.module import tensor_summary

no_grad = torch.no_grad


def load_from_safetensors(
    path: str | Path,
    device: Device | str = "cpu",
    dtype: DType | None = None,
    keys: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Read tensors (all, or only `keys`) from a safetensors file, memory-mapped, onto `device`/`dtype`.

    Floating-point tensors are converted to `dtype` when given; integer tensors keep theirs.
    """
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as file:  # type: ignore[no-untyped-call]
        for key in keys if keys is not None else file.keys():
            tensor = file.get_tensor(key)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[key] = tensor
    return tensors


def load_metadata_from_safetensors(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file (empty when it has none)."""
    with safe_open(str(path), framework="pt") as file:  # type: ignore[no-untyped-call]
        return dict(file.metadata() or {})


def save_to_safetensors(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors (made contiguous, shared storage split) with optional string metadata."""
    save_file(
        {key: value.detach().contiguous() for key, value in tensors.items()}, str(path), metadata=metadata
    )


def manual_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def image_to_tensor(
    image: Image.Image, device: Device | str | None = None, dtype: DType | None = None
) -> Tensor:
    """A PIL image as a (1, C, H, W) tensor in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)


def tensor_to_image(tensor: Tensor) -> Image.Image:
    """A (1, C, H, W) tensor in [0, 1] as a PIL image (C = 1, 3 or 4)."""
    if tensor.dim() != 4 or tensor.shape[0] != 1:
        raise ValueError(f"expected a (1, C, H, W) tensor, got shape {tuple(tensor.shape)}")
    channels = tensor.shape[1]
    if channels not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels, got {channels}")
    array = (
        (tensor[0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    )
    return Image.fromarray(
        array[:, :, 0] if channels == 1 else array, mode={1: "L", 3: "RGB", 4: "RGBA"}[channels]
    )


def normalize(tensor: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """Per-channel `(x - mean) / std` on a (..., C, H, W) tensor."""
    shape = (-1, 1, 1)
    mean_t = torch.tensor(mean, device=tensor.device, dtype=tensor.dtype).view(shape)
    std_t = torch.tensor(std, device=tensor.device, dtype=tensor.dtype).view(shape)
    return (tensor - mean_t) / std_t


def interpolate(x: Tensor, size: tuple[int, int] | torch.Size, mode: str = "nearest") -> Tensor:
    """Resize a (B, C, H, W) tensor (or (C, H, W)) to `size`."""
    batched = x.dim() == 4
    out = torch.nn.functional.interpolate(x if batched else x.unsqueeze(0), size=tuple(size), mode=mode)
    return out if batched else out.squeeze(0)


def center_crop_resize(pixels: Tensor, height: int, width: int, mode: str = "bilinear") -> Tensor:
    """(B, C, H, W) → (B, C, height, width): centre-cropped to the new aspect ratio, then resized with `mode`.

    The same as ComfyUI's `common_upscale(samples, width, height, mode, "center")`.
    """
    old_height, old_width = pixels.shape[-2:]
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    pixels = pixels.narrow(-2, y, old_height - 2 * y).narrow(-1, x, old_width - 2 * x)
    if pixels.shape[-2:] == (height, width):
        return pixels.contiguous()
    return torch.nn.functional.interpolate(pixels, size=(height, width), mode=mode)


def summarize_tensor(tensor: Any) -> str:
    """Shape, dtype, device (and min/max/mean for a CPU tensor), for logs and error messages."""
    return tensor_summary(tensor)
