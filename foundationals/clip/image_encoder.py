"""CLIP ViT image encoders (ViT-H/14, ViT-bigG/14, ...) for IP-Adapter, and ComfyUI-image preprocessing.

`CLIPImageEncoder(config)` maps normalized pixels (B, 3, S, S) to image embeddings (B, P): the class
token after the last layer, post layer norm and projection, as transformers'
`CLIPVisionModelWithProjection.image_embeds`. `CLIPImageHiddenState` is a view (weights shared) that
outputs a layer's hidden states (IP-Adapter "plus" reads the penultimate) without running later layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ...fluxion import layers as fl
from ..formats.clip import (
    IMAGE_LAYOUTS,
    IMAGE_PATCH_EMBEDDING,
    IMAGE_POSITION_EMBEDDING,
    IMAGE_PROJECTION,
    TEXT_FEEDFORWARD,
    convert_clip_state_dict,
    count_layers,
    detect_layout,
    read_diffusers_component,
)
from .config import IMAGE_PRESETS, CLIPImageConfig
from .text_encoder import (
    PositionalEncoder,
    TransformerLayer,
    check_config_shapes,
    resolve_layer_index,
    transformer_layer_names,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClassToken(fl.WeightedModule):
    """The learned class token, one per image of the batch: (B, 1, D)."""

    def __init__(
        self, embedding_dim: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.weight = torch.nn.Parameter(torch.randn(embedding_dim, device=device, dtype=dtype))
        self.bias = (
            None  # read by memory managers that stream layers (see `WeightedModule.comfy_cast_weights`)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.expand(x.shape[0], 1, self.embedding_dim)


class PatchEncoder(fl.Chain):
    """Non-overlapping patches to vectors: (B, 3, S, S) to (B, (S / p)^2, D)."""

    def __init__(
        self,
        patch_size: int,
        embedding_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Conv2d(
                3, embedding_dim, patch_size, stride=patch_size, use_bias=False, device=device, dtype=dtype
            ),
            fl.Flatten(2),
            fl.Transpose(1, 2),
        )


class ImageEmbedding(fl.Chain):
    """Class token then patch vectors, plus position vectors."""

    def __init__(
        self, config: CLIPImageConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Converter(),
            fl.Concatenate(
                ClassToken(config.embedding_dim, device=device, dtype=dtype),
                PatchEncoder(config.patch_size, config.embedding_dim, device=device, dtype=dtype),
                dim=1,
            ),
            fl.Residual(
                PositionalEncoder(config.num_patches + 1, config.embedding_dim, device=device, dtype=dtype)
            ),
        )


class ImageProjection(fl.Chain):
    """Hidden states to the image embedding: class token, post layer norm, projection."""

    def __init__(
        self, config: CLIPImageConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Slicing(dim=1, start=0, end=1),
            fl.Squeeze(1),
            fl.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps, device=device, dtype=dtype),
            fl.Linear(config.embedding_dim, config.projection_dim, bias=False, device=device, dtype=dtype),
        )


class CLIPImageEncoder(fl.Chain):
    """Normalized pixels (B, 3, S, S) to image embeddings (B, P) (see `preprocess_images`)."""

    def __init__(
        self,
        config: CLIPImageConfig | None = None,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.config = config = config or CLIPImageConfig()
        super().__init__(
            ImageEmbedding(config, device=device, dtype=dtype),
            fl.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps, device=device, dtype=dtype),
            *(
                TransformerLayer(
                    config.embedding_dim,
                    config.num_heads,
                    config.feedforward_dim,
                    config.activation,
                    is_causal=False,
                    layer_norm_eps=config.layer_norm_eps,
                    device=device,
                    dtype=dtype,
                )
                for _ in range(config.num_layers)
            ),
            ImageProjection(config, device=device, dtype=dtype),
        )


class CLIPImageHiddenState(fl.Chain):
    """A view of a `CLIPImageEncoder` (weights shared) outputting hidden state `layer` (B, 1 + patches, D),
    indexed as transformers' `hidden_states` (-2: penultimate, IP-Adapter plus), without later layers.

    With `image_embeds`, it runs every layer and outputs `(hidden, image embeddings)`.
    """

    def __init__(self, encoder: CLIPImageEncoder, layer: int = -2, image_embeds: bool = False) -> None:
        self.layer = layer
        self.image_embeds = image_embeds
        children = [child.structural_copy() for child in encoder]
        first = next(i for i, child in enumerate(children) if isinstance(child, TransformerLayer))
        layers = [child for child in children if isinstance(child, TransformerLayer)]
        run = resolve_layer_index(layer, len(layers))
        if not image_embeds:
            super().__init__(*children[:first], *layers[:run])
            return
        projection = next(child for child in children if isinstance(child, ImageProjection))
        super().__init__(
            *children[:first], *layers[:run], fl.Parallel(fl.Identity(), fl.Chain(*layers[run:], projection))
        )


def _quantize(pixels: Tensor) -> Tensor:
    """Round to 8-bit levels, clamped to 0..1, as an 8-bit image stores them."""
    return (pixels.clamp(0, 1) * 255).round() / 255


def preprocess_images(
    images: Tensor,
    size: int = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> Tensor:
    """ComfyUI `IMAGE` (B, H, W, C) in 0..1 to CLIP pixels (B, 3, size, size), as CLIPImageProcessor.

    As the processor does with Pillow: 8-bit pixels; shortest side resized to `size` (the long side's
    length truncated) with antialiased bicubic, width then height, each pass stored in 8 bits; center
    crop; normalization with CLIP's mean and std.
    """
    if images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected a ComfyUI IMAGE (B, H, W, C) with 1, 3 or 4 channels, got {tuple(images.shape)}"
        )
    pixels = images[..., :3] if images.shape[-1] >= 3 else images.expand(*images.shape[:3], 3)
    pixels = _quantize(pixels.permute(0, 3, 1, 2).float())
    height, width = pixels.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_height, new_width = (size, new_long) if height <= width else (new_long, size)
    if new_width != width:
        pixels = _quantize(
            torch.nn.functional.interpolate(pixels, size=(height, new_width), mode="bicubic", antialias=True)
        )
    if new_height != height:
        pixels = _quantize(
            torch.nn.functional.interpolate(
                pixels, size=(new_height, new_width), mode="bicubic", antialias=True
            )
        )
    top, left = (new_height - size) // 2, (new_width - size) // 2
    pixels = pixels[..., top : top + size, left : left + size]
    mean_tensor = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean_tensor) / std_tensor


def _image_shape(tensors: Mapping[str, Tensor], num_layers: int) -> dict[str, Any]:
    """The config fields that the weights' shapes give."""
    embedding_dim, _, patch_size, _ = tensors[IMAGE_PATCH_EMBEDDING].shape
    positions = tensors[IMAGE_POSITION_EMBEDDING].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ValueError(f"{positions} image positions are not a square grid plus the class token")
    feedforward_dim = tensors[TEXT_FEEDFORWARD.format(layer=transformer_layer_names(num_layers)[0])].shape[0]
    return dict(
        embedding_dim=int(embedding_dim),
        num_layers=num_layers,
        feedforward_dim=int(feedforward_dim),
        patch_size=int(patch_size),
        image_size=int(grid * patch_size),
        projection_dim=int(tensors[IMAGE_PROJECTION].shape[0]),
    )


def _image_config(shape: Mapping[str, Any], config_json: Mapping[str, Any]) -> CLIPImageConfig:
    """Heads and activation from config.json, else from the preset of that shape."""
    embedding_dim, num_layers, feedforward_dim = (
        shape[k] for k in ("embedding_dim", "num_layers", "feedforward_dim")
    )
    if "num_attention_heads" in config_json:
        return CLIPImageConfig(
            num_heads=int(config_json["num_attention_heads"]),
            activation=str(config_json.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(config_json.get("layer_norm_eps", 1e-5)),
            **shape,
        )
    for preset in IMAGE_PRESETS.values():
        if (preset.embedding_dim, preset.num_layers, preset.feedforward_dim) == (
            embedding_dim,
            num_layers,
            feedforward_dim,
        ):
            return replace(preset, **shape)
    raise ValueError(
        f"a CLIP image encoder {embedding_dim} wide with {num_layers} layers (feed-forward {feedforward_dim}) "
        f"matches no preset ({', '.join(IMAGE_PRESETS)}): its head count and activation cannot be read from "
        "its shapes; pass config=CLIPImageConfig(...)"
    )


def load_clip_image_encoder(
    state_dict: Mapping[str, Tensor],
    layout: str = "auto",
    config: CLIPImageConfig | None = None,
    config_json: Mapping[str, Any] | None = None,
    device: Device | str | None = None,
    dtype: DType | None = None,
) -> CLIPImageEncoder:
    """A `CLIPImageEncoder` from a state dict in one of `IMAGE_LAYOUTS` ("auto": detected), built on the
    meta device and loaded with `assign=True`. The config comes from the shapes, plus heads and activation
    from `config_json` (transformers' config.json) or the preset of that shape, unless `config` is given."""
    if layout == "auto":
        key_layout = detect_layout(state_dict, IMAGE_LAYOUTS, "CLIP image encoder")
    elif layout in IMAGE_LAYOUTS:
        key_layout = IMAGE_LAYOUTS[layout]
    else:
        raise ValueError(f"unknown CLIP image layout {layout!r}; known: auto, {', '.join(IMAGE_LAYOUTS)}")
    num_layers = count_layers(state_dict, key_layout)
    tensors = convert_clip_state_dict(state_dict, key_layout, transformer_layer_names(num_layers))
    if IMAGE_PROJECTION not in tensors:
        raise ValueError(
            f"{key_layout.description}: no image projection ({key_layout.prefix + key_layout.projection}); "
            "IP-Adapter needs CLIPVisionModelWithProjection weights"
        )
    shape = _image_shape(tensors, num_layers)
    config = (
        check_config_shapes(config, shape, key_layout.description)
        if config
        else _image_config(shape, config_json or {})
    )
    if device is not None or dtype is not None:
        tensors = {key: value.to(device=device, dtype=dtype) for key, value in tensors.items()}
    encoder = CLIPImageEncoder(config, device="meta")
    encoder.load_state_dict(tensors, strict=True, assign=True)
    return encoder


def load_clip_image_encoder_from_folder(
    folder: str | Path, device: Device | str | None = None, dtype: DType | None = None
) -> CLIPImageEncoder:
    """A `CLIPImageEncoder` from a transformers/diffusers folder (e.g. IP-Adapter's `image_encoder/`)."""
    state_dict, config_json = read_diffusers_component(folder)
    layout = "transformers" if IMAGE_LAYOUTS["transformers"].signature in state_dict else "transformers5"
    return load_clip_image_encoder(state_dict, layout, config_json=config_json, device=device, dtype=dtype)
