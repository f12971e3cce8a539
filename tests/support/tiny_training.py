"""Tiny training fixtures: a synthetic captioned image folder, and diffusers/transformers twins of our tiny models.

The twins are built from OUR weights through the explicit key maps (diffusers UNet keys, transformers CLIP
keys): the other direction from `tiny_sd.py`, so a LoRA trained on our model can be loaded by diffusers'
`load_lora_weights` onto exactly the same base weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig as TransformersTextConfig
from transformers import CLIPTextModel

from foundationals.clip.text_encoder import CLIPTextEncoder, transformer_layer_names
from foundationals.formats.clip import TRANSFORMERS_LAYER_KEYS, TRANSFORMERS_TEXT_KEYS
from foundationals.formats.diffusers import diffusers_unet_key_map
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from foundationals.latent_diffusion.unet import UNet
from tests.support.tiny_sd import diffusers_unet

CAPTIONS = ("red stripes", "blue rings", "green checks", "yellow dots")


def write_tiny_dataset(folder: Path, size: int = 64) -> Path:
    """Four synthetic patterns (PNG) with caption files, plus one 2:1 image without a caption."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    patterns = (
        np.stack([np.sin(x * 20) * 0.5 + 0.5, x * 0, x * 0 + 0.2], -1),
        np.stack([x * 0, x * 0 + 0.1, np.sin(((x - 0.5) ** 2 + (y - 0.5) ** 2) * 80) * 0.5 + 0.5], -1),
        np.stack([x * 0, ((x * 8).astype(int) + (y * 8).astype(int)) % 2 * 1.0, x * 0], -1),
        np.stack([np.cos(x * 30) * np.cos(y * 30) * 0.5 + 0.5] * 2 + [x * 0], -1),
    )
    for index, (pattern, caption) in enumerate(zip(patterns, CAPTIONS)):
        Image.fromarray((pattern * 255).astype(np.uint8)).save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def diffusers_unet_from_ours(unet: UNet) -> UNet2DConditionModel:
    """diffusers' UNet2DConditionModel of the same (SD1.5-like) config holding our UNet's weights."""
    reference = diffusers_unet(unet.config)
    ours = unet.state_dict()
    reference.load_state_dict(
        {theirs: ours[mine].clone() for theirs, mine in diffusers_unet_key_map(unet).items()}, strict=True
    )
    return reference.eval()


def transformers_text_encoder_from_ours(encoder: CLIPTextEncoder) -> CLIPTextModel:
    """transformers' CLIPTextModel holding our text encoder's weights (key map read backwards)."""
    config = encoder.config
    reference = CLIPTextModel(
        TransformersTextConfig(
            vocab_size=config.vocabulary_size,
            hidden_size=config.embedding_dim,
            intermediate_size=config.feedforward_dim,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            max_position_embeddings=config.max_sequence_length,
            hidden_act=config.activation,
            layer_norm_eps=config.layer_norm_eps,
        )
    ).eval()
    ours = encoder.state_dict()
    state = {f"text_model.{theirs}": ours[mine] for theirs, mine in TRANSFORMERS_TEXT_KEYS.items()}  # type: ignore[index]
    for index, layer in enumerate(transformer_layer_names(config.num_layers)):
        for theirs, mine in TRANSFORMERS_LAYER_KEYS.items():
            state[f"text_model.encoder.layers.{index}.{theirs}"] = ours[str(mine).format(layer=layer)]
    missing, unexpected = reference.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    assert not unexpected and all("position_ids" in key for key in missing), (missing, unexpected)
    return reference


def diffusers_pipeline_from_ours(model: StableDiffusion) -> StableDiffusionPipeline:
    """A diffusers SD pipeline whose UNet and text encoder hold our model's weights (VAE unused, tiny)."""
    return StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4),
        text_encoder=transformers_text_encoder_from_ours(model.text_encoder),
        tokenizer=None,
        unet=diffusers_unet_from_ours(model.unet),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def unet_inputs(
    seed: int = 3, batch: int = 2, size: int = 8, context_dim: int = 32
) -> tuple[torch.Tensor, ...]:
    """Latents, timesteps and text embeddings for comparing UNets."""
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, size, size, generator=generator),
        torch.tensor([999.0, 250.0][:batch]),
        torch.randn(batch, 77, context_dim, generator=generator),
    )
