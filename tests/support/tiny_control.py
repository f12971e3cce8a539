"""Tiny diffusers ControlNets and T2I-Adapters with random weights, and the same weights in our models."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, T2IAdapter

from foundationals.formats.controlnet import diffusers_controlnet_key_map
from foundationals.latent_diffusion.adapters.controlnet import ControlNet, ControlNetConfig
from foundationals.latent_diffusion.model_config import TINY_SDXL_UNET, TINY_UNET, UNetConfig

TINY_HINT_CHANNELS = (8, 16, 16)  # two stride-2 stages: hints 4x the latents, as the tiny autoencoder


def redraw(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Random weights everywhere (zero convs included), norms near 1."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.normal_(1.0, 0.1)
            else:
                parameter.normal_(0.0, scale if parameter.dim() > 1 else 0.1)


def diffusers_controlnet(
    config: UNetConfig = TINY_UNET, hint_channels: tuple[int, ...] = TINY_HINT_CHANNELS, seed: int = 0
) -> ControlNetModel:
    attention = [depth > 0 for depth in config.transformer_depth]
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        in_channels=config.in_channels,
        block_out_channels=config.block_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        cross_attention_dim=config.context_dim,
        use_linear_projection=config.use_linear_projection,
        norm_num_groups=config.num_groups,
        conditioning_embedding_out_channels=hint_channels,
        transformer_layers_per_block=[max(d, 1) for d in config.transformer_depth[:-1]]
        + [config.middle_transformer_depth],
    )
    if config.attention_head_dim is not None:
        kwargs["attention_head_dim"] = [max(w // config.attention_head_dim, 1) for w in config.block_channels]
    else:
        kwargs["attention_head_dim"] = config.num_attention_heads
    if config.addition_embedding == "text_time":
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=config.time_id_embedding_dim,
            projection_class_embeddings_input_dim=config.addition_embedding_dim,
        )
    model = ControlNetModel(**kwargs).eval()
    redraw(model)
    return model


def diffusers_union_controlnet(
    config: UNetConfig = TINY_SDXL_UNET,
    num_control_type: int = 8,
    hint_channels: tuple[int, ...] = TINY_HINT_CHANNELS,
    seed: int = 0,
) -> ControlNetUnionModel:
    """A tiny diffusers `ControlNetUnionModel` (8 control types: ProMax; 6: the first union release)."""
    plain = diffusers_controlnet(config, hint_channels, seed)
    names = inspect.signature(ControlNetUnionModel.__init__).parameters
    kwargs = {key: value for key, value in plain.config.items() if key in names}
    width = config.block_channels[0]
    torch.manual_seed(seed)
    model = ControlNetUnionModel(
        **kwargs, num_control_type=num_control_type, num_trans_channel=width, num_proj_channel=width
    ).eval()
    redraw(model)
    return model


def ours_from_diffusers_controlnet(
    reference: ControlNetModel,
    config: UNetConfig = TINY_UNET,
    hint_channels: tuple[int, ...] = TINY_HINT_CHANNELS,
) -> ControlNet:
    controlnet = ControlNet(ControlNetConfig(config, 3, hint_channels), device="meta")
    state = reference.state_dict()
    controlnet.load_state_dict(
        {ours: state[theirs] for theirs, ours in diffusers_controlnet_key_map(controlnet).items()},
        assign=True,
    )
    return controlnet


def diffusers_t2i_adapter(
    channels: tuple[int, ...],
    adapter_type: str = "full_adapter",
    downscale_factor: int = 4,
    seed: int = 0,
    num_res_blocks: int = 2,
) -> T2IAdapter:
    torch.manual_seed(seed)
    model = T2IAdapter(
        in_channels=3,
        channels=list(channels),
        num_res_blocks=num_res_blocks,
        downscale_factor=downscale_factor,
        adapter_type=adapter_type,
    ).eval()
    redraw(model, 0.1)
    return model
