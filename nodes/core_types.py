"""ComfyUI's own LATENT and CONDITIONING values, as the pack's nodes read and write them.

LATENT is `{"samples": (B, 4, h, w), ...}` holding the *unscaled* VAE latent (ComfyUI scales inside the model,
`comfy/latent_formats.py`); the library works in scaled latents (`AutoEncoder.encode` multiplies by the
scaling factor, as refiners does), so the nodes convert at their boundary. `noise_mask` ((H, W), (B, H, W) or
(B, 1, H, W) at any size, 1 = repaint) and `batch_index` (which noise of the seed's sequence each item gets)
mean what they mean to core's samplers. The pack's own `fluxion_masked_image_latents` (the unscaled latents of
the image with the masked part blanked, for 9-channel inpainting models) travels beside them: core nodes copy
or ignore extra keys.

CONDITIONING is a list of `[text embedding (B, tokens, width), {key: value}]` entries. The text encoders write
`pooled_output` and, for SDXL with sizes, `width`, `height`, `crop_w`, `crop_h`, `target_width`,
`target_height` as core's CLIPTextEncodeSDXL does. The sampler reads those plus `strength`, `area`, `mask`,
`mask_strength`, `set_area_to_bounds`, `start_percent`, `end_percent` from any node, and refuses every other
key by name (a key it cannot honour is never dropped silently).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..fluxion.utils import center_crop_resize
from ..foundationals.latent_diffusion.conditioning import Conditioning, ConditioningEntry

MASKED_IMAGE_KEY = "fluxion_masked_image_latents"
SDXL_SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")
PLACEMENT_KEYS = (
    "strength",
    "area",
    "mask",
    "mask_strength",
    "set_area_to_bounds",
    "start_percent",
    "end_percent",
)
SUPPORTED_KEYS = frozenset({"pooled_output", *SDXL_SIZE_KEYS, *PLACEMENT_KEYS})
_WHY_NOT = {
    "control": "a core Apply ControlNet node adds it: apply the ControlNet to the model with Fluxion Apply "
    "ControlNet instead",
    "control_apply_to_uncond": "it belongs to a core ControlNet: use Fluxion Apply ControlNet on the model",
    "gligen": "GLIGEN is not supported",
    "hooks": "hooks (Create Hook LoRA, Set CLIP Hooks) are not supported: use the Fluxion LoRA nodes",
    "clip_start_percent": "scheduled CLIP hooks are not supported",
    "clip_end_percent": "scheduled CLIP hooks are not supported",
    "default": "default conditioning (Conditioning Set Default Combine) is not supported",
    "unclip_conditioning": "unCLIP models are not supported",
    "concat_latent_image": "concat latents (instruct-pix2pix, unCLIP-style models) are not supported",
    "concat_mask": "concat masks are not supported",
    "aesthetic_score": "the SDXL refiner is not supported",
}


def read_latents(latent: Any, scaling_factor: float, what: str = "the latent") -> Tensor:
    """The scaled latents of a LATENT (its unscaled `samples` times the autoencoder's scaling factor)."""
    if not isinstance(latent, Mapping) or not isinstance(latent.get("samples"), Tensor):
        raise ValueError(f"{what} must be a LATENT ({{'samples': tensor, ...}}), got {type(latent).__name__}")
    return latent["samples"] * scaling_factor


def write_latents(latents: Tensor, scaling_factor: float) -> Tensor:
    """Scaled latents as a LATENT's unscaled `samples` (on the CPU, as core nodes keep them)."""
    return (latents / scaling_factor).cpu()


def masked_image_latents(latent: Mapping[str, Any], latents: Tensor, scaling_factor: float) -> Tensor:
    """The scaled masked-image latents of a 9-channel inpainting model: the pack's extra key when there is one
    (resized as ComfyUI resizes concat latents when another node changed the size), else the latents themselves
    (core's VAE Encode (for Inpainting) blanks the masked part before encoding, and ComfyUI uses them so)."""
    extra = latent.get(MASKED_IMAGE_KEY)
    if extra is None:
        return latents
    extra = extra * scaling_factor
    if extra.shape[-2:] != latents.shape[-2:]:
        extra = center_crop_resize(extra.float(), latents.shape[-2], latents.shape[-1], mode="bilinear")
    return extra


def batch_indices(latent: Mapping[str, Any], batch: int) -> list[int] | None:
    """The LATENT's `batch_index` (core's Latent From Batch and friends write it), checked, or None."""
    indices = latent.get("batch_index")
    if indices is None:
        return None
    if not isinstance(indices, Sequence) or not all(isinstance(i, int) and i >= 0 for i in indices):
        raise ValueError(f"the latent's batch_index must be a list of indices >= 0, got {indices!r:.60}")
    if len(indices) != batch:
        raise ValueError(f"the latent's batch_index has {len(indices)} indices for a batch of {batch}")
    return list(indices)


def core_conditioning(conditioning: Conditioning, sizes: Mapping[str, int] | None = None) -> list[list[Any]]:
    """A library conditioning as a CONDITIONING list of one entry, with SDXL's size keys when given."""
    options: dict[str, Any] = {}
    if conditioning.pooled_text_embedding is not None:
        options["pooled_output"] = conditioning.pooled_text_embedding
    if sizes is not None:
        options.update({key: int(sizes[key]) for key in SDXL_SIZE_KEYS})
    return [[conditioning.text_embedding, options]]


def _refuse(which: str, index: int, count: int, key: str) -> ValueError:
    why = _WHY_NOT.get(key, "the Fluxion Sampler does not support it")
    return ValueError(
        f"the {which} conditioning (entry {index + 1} of {count}) has the key {key!r}, which the Fluxion Sampler "
        f"cannot honour: {why}"
    )


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r:.40}")
    return float(value)


def _area(value: Any, what: str) -> tuple[tuple[int, int, int, int] | None, tuple[float, ...] | None]:
    """ComfyUI's `area`: (height, width, y, x) in latent cells, or ("percentage", height, width, y, x)."""
    parts = list(value) if isinstance(value, list | tuple) else None
    if parts and parts[0] == "percentage" and len(parts) == 5:
        return None, tuple(_number(v, what) for v in parts[1:])
    if (
        parts is None
        or len(parts) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in parts)
    ):
        raise ValueError(
            f"{what} must be (height, width, y, x) in latent cells or ('percentage', h, w, y, x), got {value!r:.60}"
        )
    if parts[0] <= 0 or parts[1] <= 0 or parts[2] < 0 or parts[3] < 0:
        raise ValueError(f"{what} must have a positive size and offsets >= 0, got {value!r}")
    return (parts[0], parts[1], parts[2], parts[3]), None


def sdxl_time_ids(options: Mapping[str, Any], pixel_height: int, pixel_width: int, what: str) -> Tensor:
    """SDXL's time ids as ComfyUI fills them: width/height default to the latent's pixel size, crops to 0,
    the target size to width/height."""
    for key in SDXL_SIZE_KEYS:
        if key in options:
            _number(options[key], f"{what} {key}")
    width = options.get("width", pixel_width)
    height = options.get("height", pixel_height)
    values = [
        height,
        width,
        options.get("crop_h", 0),
        options.get("crop_w", 0),
        options.get("target_height", height),
        options.get("target_width", width),
    ]
    return torch.tensor([[float(v) for v in values]], dtype=torch.float32)


def conditioning_entries(
    value: Any, which: str, sdxl: bool, pixel_height: int, pixel_width: int
) -> list[ConditioningEntry]:
    """A CONDITIONING value (a list of [tensor, options]) as library entries, for a latent of that pixel size.

    A library `Conditioning` (the pack's older wire value, and library callers) is one entry acting everywhere.
    """
    if isinstance(value, Conditioning):
        return [ConditioningEntry(value)]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            f"the {which} conditioning must be a CONDITIONING (a list of [tensor, options] entries, e.g. from "
            f"CLIP Text Encode or Fluxion Text Encode), got {'an empty list' if value == [] else type(value).__name__}"
        )
    entries: list[ConditioningEntry] = []
    count = len(value)
    for index, item in enumerate(value):
        what = f"the {which} conditioning (entry {index + 1} of {count})"
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], Tensor)
            or not isinstance(item[1], Mapping)
        ):
            raise ValueError(f"{what} must be [tensor, options], got {item!r:.60}")
        text, options = item
        for key, option in options.items():
            if key not in SUPPORTED_KEYS and option is not None:
                raise _refuse(which, index, count, key)
        if text.dim() != 3:
            raise ValueError(
                f"{what} must hold a (batch, tokens, width) text embedding, got {tuple(text.shape)}"
            )
        if not torch.isfinite(text).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        pooled = options.get("pooled_output")
        if sdxl:
            if not isinstance(pooled, Tensor):
                raise ValueError(
                    f"{what} has no pooled_output: SDXL needs the pooled text embedding its text encoders write"
                )
            conditioning = Conditioning(
                text,
                pooled,
                sdxl_time_ids(options, pixel_height, pixel_width, what).expand(pooled.shape[0], 6),
            )
        else:
            conditioning = Conditioning(
                text
            )  # SD1.5 uses no pooled text or sizes (ComfyUI's model ignores them)
        area, fraction = (
            (None, None) if options.get("area") is None else _area(options["area"], f"{what} area")
        )
        mask = options.get("mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() not in (2, 3, 4)):
            raise ValueError(f"{what} mask must be a MASK tensor, got {mask!r:.60}")
        if mask is not None and not torch.isfinite(mask).all():
            raise ValueError(f"{what} mask contains NaN or infinite values")
        start = _number(options.get("start_percent", 0.0), f"{what} start_percent")
        end = _number(options.get("end_percent", 1.0), f"{what} end_percent")
        entries.append(
            ConditioningEntry(
                conditioning,
                strength=_number(options.get("strength", 1.0), f"{what} strength"),
                area=area,
                area_fraction=fraction,  # type: ignore[arg-type]
                mask=mask,
                mask_strength=_number(options.get("mask_strength", 1.0), f"{what} mask_strength"),
                area_from_mask=bool(options.get("set_area_to_bounds", False)) and mask is not None,
                start_percent=start,
                end_percent=end,
            )
        )
    return entries
