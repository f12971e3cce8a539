"""Key maps between diffusers' `UNet2DConditionModel` / `AutoencoderKL` and our UNet and autoencoder.

`diffusers_unet_key_map(unet)` and `diffusers_autoencoder_key_map(autoencoder)` return
`{diffusers key: our state-dict key}` for every tensor of the given (possibly meta-device) model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from torch.nn import Module

from ...fluxion import layers as fl
from ..latent_diffusion.model_config import AutoencoderConfig, UNetConfig
from .ldm import (
    CheckpointError,
    add_block,
    expand_module_map,
    find_block,
    is_block,
    spatial_transformer_table,
)

UNET_RESIDUAL_BLOCK = {
    "Chain.GroupNorm_1": "norm1",
    "Chain.Conv2d_1": "conv1",
    "Chain.RangeAdapter2d.Chain.Linear": "time_emb_proj",
    "Chain.GroupNorm_2": "norm2",
    "Chain.Conv2d_2": "conv2",
    "Conv2d": "conv_shortcut",
}
AUTOENCODER_RESIDUAL_BLOCK = {
    "Chain.GroupNorm_1": "norm1",
    "Chain.Conv2d_1": "conv1",
    "Chain.GroupNorm_2": "norm2",
    "Chain.Conv2d_2": "conv2",
    "Conv2d": "conv_shortcut",
}
AUTOENCODER_ATTENTION = {
    "GroupNorm": "group_norm",
    "SelfAttention2d.Distribute.Linear_1": "to_q",
    "SelfAttention2d.Distribute.Linear_2": "to_k",
    "SelfAttention2d.Distribute.Linear_3": "to_v",
    "SelfAttention2d.Linear": "to_out.0",
}


def diffusers_encoder_module_map(model: fl.Chain, config: UNetConfig) -> dict[str, str]:
    """The encoder half a UNet and a ControlNet share: timestep (and SDXL) embedding, down blocks, middle block."""
    mapping = {
        "TimestepEncoder.RangeEncoder.Linear_1": "time_embedding.linear_1",
        "TimestepEncoder.RangeEncoder.Linear_2": "time_embedding.linear_2",
    }
    if config.addition_embedding == "text_time":
        mapping["TimestepEncoder.TextTimeEmbedding.RangeEncoder.Linear_1"] = "add_embedding.linear_1"
        mapping["TimestepEncoder.TextTimeEmbedding.RangeEncoder.Linear_2"] = "add_embedding.linear_2"
    for index, (block_name, block) in enumerate(model.DownBlocks.named_children()):
        if index == 0:
            mapping[f"DownBlocks.{block_name}.Conv2d"] = "conv_in"
            continue
        level, layer = divmod(index - 1, config.layers_per_block + 1)
        theirs = f"down_blocks.{level}"
        for name, child in block.named_children():
            add_unet_child(mapping, f"DownBlocks.{block_name}.{name}", theirs, layer, child, "downsamplers")
    resnet = 0
    for name, child in model.MiddleBlock.named_children():
        if is_block(child, "ResidualBlock"):
            add_block(
                mapping, f"MiddleBlock.{name}", f"mid_block.resnets.{resnet}", UNET_RESIDUAL_BLOCK, child
            )
            resnet += 1
        elif is_block(child, "CrossAttentionBlock2d"):
            table = spatial_transformer_table(child)
            add_block(mapping, f"MiddleBlock.{name}", "mid_block.attentions.0", table, child)
    return mapping


def diffusers_unet_module_map(unet: fl.Chain) -> dict[str, str]:
    """Our module paths -> diffusers `UNet2DConditionModel` module paths."""
    config = unet.config
    mapping = diffusers_encoder_module_map(unet, config)
    mapping["OutputBlock.GroupNorm"] = "conv_norm_out"
    mapping["OutputBlock.Conv2d"] = "conv_out"
    for index, (block_name, block) in enumerate(unet.UpBlocks.named_children()):
        level, layer = divmod(index, config.layers_per_block + 1)
        for name, child in block.named_children():
            add_unet_child(
                mapping, f"UpBlocks.{block_name}.{name}", f"up_blocks.{level}", layer, child, "upsamplers"
            )
    return mapping


def add_unet_child(
    mapping: dict[str, str], ours: str, theirs: str, layer: int, child: fl.Module, samplers: str
) -> None:
    if is_block(child, "ResidualBlock"):
        add_block(mapping, ours, f"{theirs}.resnets.{layer}", UNET_RESIDUAL_BLOCK, child)
    elif is_block(child, "CrossAttentionBlock2d"):
        add_block(mapping, ours, f"{theirs}.attentions.{layer}", spatial_transformer_table(child), child)
    elif isinstance(child, (fl.Downsample, fl.Upsample)):
        mapping[f"{ours}.Conv2d"] = f"{theirs}.{samplers}.0.conv"


def diffusers_unet_key_map(unet: fl.Chain) -> dict[str, str]:
    """`{diffusers UNet2DConditionModel key: our key}` for every tensor of `unet`."""
    return expand_module_map(unet, diffusers_unet_module_map(unet))


def diffusers_autoencoder_module_map(autoencoder: fl.Chain) -> dict[str, str]:
    """Our module paths -> diffusers `AutoencoderKL` module paths."""
    mapping: dict[str, str] = {}
    levels = len(autoencoder.config.block_channels)
    children = list(find_block(autoencoder, "Encoder").named_children())
    mapping[f"Encoder.{children[0][0]}"] = "encoder.conv_in"
    for level, (name, chain) in enumerate(children[1 : 1 + levels]):
        _add_autoencoder_level(
            mapping, f"Encoder.{name}", f"encoder.down_blocks.{level}", chain, "downsamplers"
        )
    _add_autoencoder_middle(
        mapping, f"Encoder.{children[1 + levels][0]}", "encoder.mid_block", children[1 + levels][1]
    )
    mapping[f"Encoder.{children[2 + levels][0]}.GroupNorm"] = "encoder.conv_norm_out"
    mapping[f"Encoder.{children[2 + levels][0]}.Conv2d"] = "encoder.conv_out"
    mapping[f"Encoder.{children[3 + levels][0]}"] = "quant_conv"

    children = list(find_block(autoencoder, "Decoder").named_children())
    mapping[f"Decoder.{children[0][0]}"] = "post_quant_conv"
    mapping[f"Decoder.{children[1][0]}"] = "decoder.conv_in"
    _add_autoencoder_middle(mapping, f"Decoder.{children[2][0]}", "decoder.mid_block", children[2][1])
    for level, (name, chain) in enumerate(children[3 : 3 + levels]):
        _add_autoencoder_level(mapping, f"Decoder.{name}", f"decoder.up_blocks.{level}", chain, "upsamplers")
    mapping[f"Decoder.{children[3 + levels][0]}.GroupNorm"] = "decoder.conv_norm_out"
    mapping[f"Decoder.{children[3 + levels][0]}.Conv2d"] = "decoder.conv_out"
    return mapping


def _add_autoencoder_level(
    mapping: dict[str, str], ours: str, theirs: str, level: Module, samplers: str
) -> None:
    resnet = 0
    for name, child in level.named_children():
        if is_block(child, "ResidualBlock"):
            add_block(
                mapping, f"{ours}.{name}", f"{theirs}.resnets.{resnet}", AUTOENCODER_RESIDUAL_BLOCK, child
            )
            resnet += 1
        elif isinstance(child, (fl.Downsample, fl.Upsample)):
            mapping[f"{ours}.{name}.Conv2d"] = f"{theirs}.{samplers}.0.conv"


def _add_autoencoder_middle(mapping: dict[str, str], ours: str, theirs: str, middle: Module) -> None:
    resnet = 0
    for name, child in middle.named_children():
        if is_block(child, "AttentionBlock2d"):
            add_block(mapping, f"{ours}.{name}", f"{theirs}.attentions.0", AUTOENCODER_ATTENTION, child)
        elif is_block(child, "ResidualBlock"):
            add_block(
                mapping, f"{ours}.{name}", f"{theirs}.resnets.{resnet}", AUTOENCODER_RESIDUAL_BLOCK, child
            )
            resnet += 1


def diffusers_autoencoder_key_map(autoencoder: fl.Chain) -> dict[str, str]:
    """`{diffusers AutoencoderKL key: our key}` for every tensor of `autoencoder`."""
    return expand_module_map(autoencoder, diffusers_autoencoder_module_map(autoencoder))


# -- configs from config.json --------------------------------------------------------------------------------


def unet_config_from_diffusers(config: Mapping[str, Any], source: str = "config.json") -> UNetConfig:
    """Our UNet config from a diffusers `UNet2DConditionModel` config.json; `CheckpointError` if it gives none."""
    try:
        result = _unet_config_from_diffusers(config, source)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        raise CheckpointError(
            f"{source}: not a usable diffusers UNet config ({type(error).__name__}: {error})"
        ) from error
    for option in fields(result):  # sizes must be positive ints (depths may be 0): no bools, strings, floats
        value = getattr(result, option.name)
        if option.name in ("use_linear_projection", "addition_embedding") or (
            option.name == "attention_head_dim" and value is None
        ):
            continue
        values = value if isinstance(value, tuple) else (value,)
        minimum = 0 if "depth" in option.name else 1
        if not values or not all(type(v) is int and v >= minimum for v in values):
            raise CheckpointError(f"{source}: UNet option {option.name}={value!r} is not a valid size")
    return result


def _unet_config_from_diffusers(config: Mapping[str, Any], source: str) -> UNetConfig:
    for name, allowed in (
        ("class_embed_type", None),
        ("encoder_hid_dim_type", None),
        ("time_cond_proj_dim", None),
    ):
        if config.get(name, allowed) != allowed:
            raise CheckpointError(f"{source}: unsupported UNet option {name}={config[name]!r}")
    if (
        config.get("resnet_time_scale_shift", "default") != "default"
        or config.get("upcast_attention") is True
    ):
        raise CheckpointError(
            f"{source}: unsupported UNet options (time scale shift / upcast attention: SD2-like)"
        )
    channels = tuple(config["block_out_channels"])
    levels = len(channels)
    attention = [block.startswith("CrossAttn") for block in config["down_block_types"]]
    per_block = config.get("transformer_layers_per_block", 1)
    depths = [per_block] * levels if isinstance(per_block, int) else list(per_block)
    heads = config.get("num_attention_heads") or config.get(
        "attention_head_dim", 8
    )  # diffusers' naming quirk
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    head_widths = {width // count for width, count in zip(channels, heads)}
    if len(set(heads)) > 1 and len(head_widths) > 1:
        raise CheckpointError(
            f"{source}: heads {heads} are neither the same count nor the same width per level"
        )
    context = config.get("cross_attention_dim", 768)
    head_fields: dict[str, Any] = (
        {"num_attention_heads": heads[0]}
        if len(set(heads)) == 1
        else {"attention_head_dim": head_widths.pop()}
    )
    result = UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        block_channels=channels,
        layers_per_block=config.get("layers_per_block", 2),
        transformer_depth=tuple(depth if on else 0 for depth, on in zip(depths, attention)),
        middle_transformer_depth=depths[-1],
        context_dim=context if isinstance(context, int) else context[0],
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        num_groups=config.get("norm_num_groups", 32),
        **head_fields,
    )
    embed_type = config.get("addition_embed_type")
    if embed_type == "text_time":
        time_dim = config["addition_time_embed_dim"]
        pooled = config["projection_class_embeddings_input_dim"] - result.time_ids_count * time_dim
        result = result.with_changes(
            addition_embedding="text_time", time_id_embedding_dim=time_dim, pooled_text_dim=pooled
        )
    elif embed_type is not None:
        raise CheckpointError(f"{source}: unsupported addition_embed_type {embed_type!r}")
    return result


def autoencoder_config_from_diffusers(config: Mapping[str, Any]) -> AutoencoderConfig:
    """Our autoencoder config from a diffusers `AutoencoderKL` config.json."""
    return AutoencoderConfig(
        image_channels=config.get("in_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_channels=tuple(config["block_out_channels"]),
        layers_per_block=config.get("layers_per_block", 2),
        num_groups=config.get("norm_num_groups", 32),
        scaling_factor=config.get("scaling_factor", 0.18215),
    )
