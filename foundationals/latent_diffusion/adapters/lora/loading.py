"""LoRA files: read one, and map the canonical module paths of `formats.lora` onto our UNet and text encoders."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from ....clip.text_encoder import CLIPTextEncoder, transformer_layer_names
from ....formats.clip import TEXT_PROJECTION, TRANSFORMERS_LAYER_KEYS
from ....formats.diffusers import diffusers_unet_module_map
from ....formats.lora import (
    TEXT_ENCODER_2,
    LoraNamespace,
    UNetLayout,
)
from ...unet import UNet


def load_lora_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of a LoRA file (`.ckpt/.pt/.bin` via `weights_only=True`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path.name}: expected a dict of tensors, got {type(state).__name__}")
    return {key: value for key, value in state.items() if isinstance(value, Tensor)}, {}


def lora_namespace(
    name: str,
    block_channels: tuple[int, ...],
    transformer_depth: tuple[int, ...],
    middle_transformer_depth: int,
    layers_per_block: int,
    has_add_embedding: bool,
    text_encoder_layers: Mapping[str, int],
) -> LoraNamespace:
    """A LoRA namespace for a model built from these config values (e.g. a UNetConfig's)."""
    layout = UNetLayout(
        tuple(block_channels),
        tuple(transformer_depth),
        middle_transformer_depth,
        layers_per_block,
        has_add_embedding,
    )
    projected = (TEXT_ENCODER_2,) if TEXT_ENCODER_2 in text_encoder_layers else ()
    return LoraNamespace(name, layout, dict(text_encoder_layers), projected)


_UNET_MODULE_MAPS: WeakKeyDictionary[UNet, dict[str, str]] = WeakKeyDictionary()


def unet_lora_module_map(unet: UNet) -> dict[str, str]:
    """Canonical (diffusers) module path → our module path, for every Linear/Conv2d of `unet`.

    Read once per UNet and kept: the key tables look layers up by name, and an injected adapter renames
    the layers around it, so a map read later (another LoRA stack, a LoRA after an IP-Adapter) would
    miss them. Paths are resolved on the tree as it was (see `_resolve`).
    """
    mapping = _UNET_MODULE_MAPS.get(unet)
    if mapping is None:
        mapping = {theirs: ours for ours, theirs in diffusers_unet_module_map(unet).items()}
        _UNET_MODULE_MAPS[unet] = mapping
    return dict(mapping)


def text_encoder_lora_module_map(encoder: CLIPTextEncoder) -> dict[str, str]:
    """Canonical (transformers) module path → our module path, for every Linear of `encoder`."""
    mapping = {}
    for index, layer in enumerate(transformer_layer_names(encoder.config.num_layers)):
        for theirs, ours in TRANSFORMERS_LAYER_KEYS.items():
            if theirs.endswith(".weight") and isinstance(ours, str) and "layer_norm" not in theirs:
                module = theirs.removesuffix(".weight")
                mapping[f"text_model.encoder.layers.{index}.{module}"] = ours.format(
                    layer=layer
                ).removesuffix(".weight")
    if encoder.config.projection_dim is not None:
        mapping["text_projection"] = TEXT_PROJECTION.removesuffix(".weight")
    return mapping
