"""Tiny SD1.5 components in diffusers/transformers and the same weights in our models.

Weights are random, re-drawn so that no layer is zero-initialised, and moved to ours through the
explicit key maps (diffusers UNet/VAE keys, transformers CLIP keys). The tokenizer for diffusers'
pipelines is transformers' CLIPTokenizer built offline from our gzipped BPE vocabulary.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig as TransformersTextConfig
from transformers import CLIPTextModel, CLIPTokenizer

from foundationals.clip.config import text_preset
from foundationals.clip.text_encoder import load_clip_text_encoder
from foundationals.clip.tokenizer import VOCABULARY_PATH, bytes_to_unicode
from foundationals.formats.diffusers import diffusers_autoencoder_key_map, diffusers_unet_key_map
from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from foundationals.latent_diffusion.model_config import (
    TINY_AUTOENCODER,
    TINY_UNET,
    AutoencoderConfig,
    UNetConfig,
)
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from foundationals.latent_diffusion.unet import UNet


def write_clip_vocabulary(folder: Path) -> Path:
    """vocab.json + merges.txt as in openai/clip-vit-large-patch14, derived from the gzipped merge list."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = (
        gzip.decompress(VOCABULARY_PATH.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    )
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    write_clip_vocabulary(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _redraw(model: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.normal_(1.0, 0.1)
            else:
                parameter.normal_(0.0, scale if parameter.dim() > 1 else 0.1)


def diffusers_unet(config: UNetConfig = TINY_UNET, seed: int = 0) -> UNet2DConditionModel:
    attention = [depth > 0 for depth in config.transformer_depth]
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        sample_size=8,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=config.context_dim,
        attention_head_dim=config.num_attention_heads,
        use_linear_projection=config.use_linear_projection,
        norm_num_groups=config.num_groups,
    )
    model = UNet2DConditionModel(**kwargs).eval()
    _redraw(model)
    return model


def diffusers_autoencoder(config: AutoencoderConfig = TINY_AUTOENCODER, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    levels = len(config.block_channels)
    model = AutoencoderKL(
        in_channels=config.image_channels,
        out_channels=config.image_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=config.block_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.num_groups,
        scaling_factor=config.scaling_factor,
    ).eval()
    _redraw(model, 0.1)
    return model


def transformers_text_encoder(seed: int = 0, context_dim: int = TINY_UNET.context_dim) -> CLIPTextModel:
    preset = text_preset("tiny")
    torch.manual_seed(seed)
    config = TransformersTextConfig(
        vocab_size=preset.vocabulary_size,
        hidden_size=context_dim,
        intermediate_size=37,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=4,
        max_position_embeddings=preset.max_sequence_length,
        hidden_act="quick_gelu",
        eos_token_id=2,
    )
    model = CLIPTextModel(config).eval()
    _redraw(model, 0.3)
    return model


def ours_from_diffusers(
    unet: UNet2DConditionModel,
    autoencoder: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet_config: UNetConfig = TINY_UNET,
) -> StableDiffusion:
    """Our StableDiffusion on the same weights (meta-built, loaded with assign)."""
    our_unet = UNet(unet_config, device="meta")
    state = unet.state_dict()
    our_unet.load_state_dict(
        {ours: state[theirs] for theirs, ours in diffusers_unet_key_map(our_unet).items()}, assign=True
    )
    our_autoencoder = LatentDiffusionAutoencoder(TINY_AUTOENCODER, device="meta")
    state = autoencoder.state_dict()
    our_autoencoder.load_state_dict(
        {ours: state[theirs] for theirs, ours in diffusers_autoencoder_key_map(our_autoencoder).items()},
        assign=True,
    )
    our_text = load_clip_text_encoder(text_encoder.state_dict(), "transformers")
    return StableDiffusion(unet=our_unet, autoencoder=our_autoencoder, text_encoder=our_text)
