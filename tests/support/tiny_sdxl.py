"""Tiny SDXL components in diffusers/transformers, the same weights in our models, and SDXL single files.

The UNet is the `tiny_sdxl` preset (context 48 = CLIP-L 32 + bigG-like 16, pooled text 40); the autoencoder is
the tiny one with SDXL's scaling factor. Weights are random and re-drawn so that no layer is zero-initialised.
The tokenizers are transformers' CLIPTokenizer built offline from our BPE vocabulary; the second one pads with
"!" (id 0) as SDXL's `tokenizer_2` (so test prompts avoid "!").

Single files are laid out in the original (SGM) layout by running diffusers' own LDM -> diffusers conversions
in reverse: every element of every original tensor gets a unique id, the conversion moves (renames, splits,
transposes) the ids, and where each id lands says which element of which diffusers tensor goes there.
The original names are the loader's LDM tables for the UNet/autoencoder (as in test_checkpoint_loading.py)
and open_clip's module names written out here for bigG; the fixture only exists if diffusers consumes every
element and fills every diffusers tensor exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from torch import Tensor
from transformers import CLIPTextConfig as TransformersTextConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from foundationals.clip.config import CLIPTextConfig, text_preset
from foundationals.clip.text_encoder import load_clip_text_encoder
from foundationals.formats.diffusers import diffusers_autoencoder_key_map, diffusers_unet_key_map
from foundationals.formats.ldm import ldm_autoencoder_key_map, ldm_unet_key_map
from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from foundationals.latent_diffusion.model_config import (
    TINY_AUTOENCODER,
    TINY_SDXL_UNET,
    AutoencoderConfig,
    UNetConfig,
)
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from foundationals.latent_diffusion.unet import UNet
from tests.support.tiny_sd import write_clip_vocabulary

TINY_SDXL_AUTOENCODER = TINY_AUTOENCODER.with_changes(scaling_factor=0.13025)
# The two text encoders: CLIP-L-like (quick_gelu) and bigG-like (gelu, text projection); presets, so that a
# single file of them loads by shape alone.
TINY_CLIP_L = text_preset("tiny")
TINY_BIGG = text_preset("tiny_bigg")
TINY_SDXL_TEXT_CONFIGS: dict[str, CLIPTextConfig] = {"clip_l": TINY_CLIP_L, "clip_g": TINY_BIGG}
# SDXL base's scheduler config (diffusers' stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json).
SDXL_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    num_train_timesteps=1000,
    timestep_spacing="leading",
)


def randomize(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Re-draw every parameter (norm weights around 1) so that every layer shows in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.normal_(1.0, 0.1)
            else:
                parameter.normal_(0.0, scale if parameter.dim() > 1 else 0.1)


def sdxl_unet_kwargs(config: UNetConfig) -> dict[str, Any]:
    """diffusers' UNet2DConditionModel config of an SDXL-like UNet config (text_time addition embedding)."""
    attention = [depth > 0 for depth in config.transformer_depth]
    heads: Any = (
        [width // config.attention_head_dim for width in config.block_channels]
        if config.attention_head_dim
        else config.num_attention_heads
    )
    return dict(
        sample_size=16,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        transformer_layers_per_block=[max(d, 1) for d in config.transformer_depth[:-1]]
        + [config.middle_transformer_depth],
        cross_attention_dim=config.context_dim,
        attention_head_dim=heads,  # diffusers' historical name for the number of heads
        use_linear_projection=config.use_linear_projection,
        norm_num_groups=config.num_groups,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.time_id_embedding_dim,
        projection_class_embeddings_input_dim=config.addition_embedding_dim,
    )


def diffusers_sdxl_unet(config: UNetConfig = TINY_SDXL_UNET, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**sdxl_unet_kwargs(config)).eval()
    randomize(model, seed=seed)
    return model


def diffusers_sdxl_autoencoder(
    config: AutoencoderConfig = TINY_SDXL_AUTOENCODER, seed: int = 1
) -> AutoencoderKL:
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
        force_upcast=True,
    ).eval()
    randomize(model, 0.1, seed=seed)
    return model


def transformers_text_encoders(seed: int = 2) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """CLIP-L (quick_gelu) and a bigG-like encoder (gelu, text projection), both with CLIP's vocabulary."""

    def config(ours: CLIPTextConfig) -> TransformersTextConfig:
        return TransformersTextConfig(
            vocab_size=ours.vocabulary_size,
            hidden_size=ours.embedding_dim,
            intermediate_size=ours.feedforward_dim,
            num_hidden_layers=ours.num_layers,
            num_attention_heads=ours.num_heads,
            max_position_embeddings=ours.max_sequence_length,
            hidden_act=ours.activation,
            projection_dim=ours.projection_dim or ours.embedding_dim,
            eos_token_id=2,  # CLIP's original pooling: the position of the highest token id
        )

    clip_l = CLIPTextModel(config(TINY_CLIP_L)).eval()
    randomize(clip_l, 0.3, seed=seed)
    bigg = CLIPTextModelWithProjection(config(TINY_BIGG)).eval()
    randomize(bigg, 0.3, seed=seed + 1)
    return clip_l, bigg


def sdxl_tokenizers(folder: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two tokenizers: the second pads with "!" (id 0), as open_clip does."""
    write_clip_vocabulary(folder)
    files = (str(folder / "vocab.json"), str(folder / "merges.txt"))
    return (
        CLIPTokenizer(*files, model_max_length=77),
        CLIPTokenizer(*files, model_max_length=77, pad_token="!"),
    )


def diffusers_sdxl_components(folder: Path, unet_config: UNetConfig = TINY_SDXL_UNET) -> dict[str, Any]:
    """The keyword arguments of diffusers' SDXL pipelines (without scheduler), on tiny random weights."""
    text_encoder, text_encoder_2 = transformers_text_encoders()
    tokenizer, tokenizer_2 = sdxl_tokenizers(folder)
    return dict(
        unet=diffusers_sdxl_unet(unet_config),
        vae=diffusers_sdxl_autoencoder(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
    )


def ours_from_diffusers(
    components: Mapping[str, Any], unet_config: UNetConfig = TINY_SDXL_UNET
) -> StableDiffusion:
    """Our SDXL StableDiffusion on the same weights, through the diffusers/transformers key maps."""
    unet = UNet(unet_config, device="meta")
    state = components["unet"].state_dict()
    unet.load_state_dict(
        {ours: state[theirs] for theirs, ours in diffusers_unet_key_map(unet).items()}, assign=True
    )
    autoencoder = LatentDiffusionAutoencoder(TINY_SDXL_AUTOENCODER, device="meta")
    state = components["vae"].state_dict()
    autoencoder.load_state_dict(
        {ours: state[theirs] for theirs, ours in diffusers_autoencoder_key_map(autoencoder).items()},
        assign=True,
    )
    encoders = [
        load_clip_text_encoder(
            components[name].state_dict(), "transformers", config_json=components[name].config.to_dict()
        )
        for name in ("text_encoder", "text_encoder_2")
    ]
    return StableDiffusion(
        unet=unet, autoencoder=autoencoder, text_encoder=encoders[0], text_encoder_2=encoders[1]
    )


# -- SDXL single files in the original layout ----------------------------------------------------------------


def original_layout(
    shapes: Mapping[str, tuple[int, ...]],
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    state: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """`state` (diffusers/transformers keys) laid out under the original keys `shapes`, by where `convert`
    (diffusers' original -> diffusers conversion) moves each element."""
    probes: dict[str, Tensor] = {}
    offset = 0
    for key, shape in shapes.items():
        count = int(torch.Size(shape).numel())
        probes[key] = torch.arange(offset, offset + count, dtype=torch.float64).reshape(shape)
        offset += count
    landed = convert(probes)
    assert set(landed) == set(state), f"not the reference's keys: {sorted(set(landed) ^ set(state))[:5]}"
    flat = torch.full((offset,), float("nan"), dtype=torch.float32)
    filled = torch.zeros(offset, dtype=torch.int64)
    for key, ids in landed.items():
        assert ids.shape == state[key].shape, f"{key}: conversion gives {tuple(ids.shape)}"
        index = ids.flatten().long()
        flat[index] = state[key].flatten().float()
        filled.index_add_(0, index, torch.ones_like(index))
    assert bool((filled == 1).all()), "diffusers' conversion dropped or duplicated elements"
    result: dict[str, Tensor] = {}
    start = 0
    for key, shape in shapes.items():
        count = int(torch.Size(shape).numel())
        result[key] = flat[start : start + count].reshape(shape).clone()
        start += count
    return result


def original_unet_tensors(reference: UNet2DConditionModel, config: UNetConfig) -> dict[str, Tensor]:
    """`model.diffusion_model.*` from diffusers' UNet (SD1.5 or SDXL)."""
    unet = UNet(config, device="meta")
    ours = {key: tuple(tensor.shape) for key, tensor in unet.state_dict().items()}
    shapes = {f"model.diffusion_model.{theirs}": ours[key] for theirs, key in ldm_unet_key_map(unet).items()}
    diffusers_config = {
        "layers_per_block": config.layers_per_block,
        "addition_embed_type": config.addition_embedding,
    }
    return original_layout(
        shapes, lambda probes: convert_ldm_unet_checkpoint(probes, diffusers_config), reference.state_dict()
    )


def original_autoencoder_tensors(reference: AutoencoderKL, config: AutoencoderConfig) -> dict[str, Tensor]:
    """`first_stage_model.*` from diffusers' AutoencoderKL (attention stored as 1x1 convolutions)."""
    autoencoder = LatentDiffusionAutoencoder(config, device="meta")
    ours = {key: tuple(tensor.shape) for key, tensor in autoencoder.state_dict().items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for theirs, key in ldm_autoencoder_key_map(autoencoder).items():
        shape = ours[key]
        if ".attn_1." in theirs and theirs.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            shape = (*shape, 1, 1)
        shapes[f"first_stage_model.{theirs}"] = shape
    levels = ["DownEncoderBlock2D"] * len(config.block_channels)
    vae_config = {"down_block_types": levels, "up_block_types": levels}
    return original_layout(
        shapes, lambda probes: convert_ldm_vae_checkpoint(probes, vae_config), reference.state_dict()
    )


def original_clip_l_tensors(reference: CLIPTextModel) -> dict[str, Tensor]:
    """`conditioner.embedders.0.transformer.text_model.*`: transformers' names under SGM's prefix."""
    prefix = "conditioner.embedders.0.transformer."
    state = reference.state_dict()
    shapes = {prefix + key: tuple(tensor.shape) for key, tensor in state.items()}
    return original_layout(shapes, lambda probes: convert_ldm_clip_checkpoint(probes), state)


def original_bigg_tensors(reference: CLIPTextModelWithProjection) -> dict[str, Tensor]:
    """`conditioner.embedders.1.model.*` in open_clip's layout (fused attention input projection,
    `text_projection` stored (width, projection)), as the SDXL release files hold them."""
    config = reference.config
    width, feedforward = config.hidden_size, config.intermediate_size
    prefix = "conditioner.embedders.1.model."
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (config.vocab_size, width),
        "positional_embedding": (config.max_position_embeddings, width),
    }
    for i in range(config.num_hidden_layers):
        block = f"transformer.resblocks.{i}."
        shapes |= {
            block + "ln_1.weight": (width,),
            block + "ln_1.bias": (width,),
            block + "attn.in_proj_weight": (3 * width, width),
            block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width),
            block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,),
            block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (feedforward, width),
            block + "mlp.c_fc.bias": (feedforward,),
            block + "mlp.c_proj.weight": (width, feedforward),
            block + "mlp.c_proj.bias": (width,),
        }
    shapes |= {
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, config.projection_dim),
    }
    return original_layout(
        {prefix + key: shape for key, shape in shapes.items()},
        lambda probes: convert_open_clip_checkpoint(reference, probes, prefix=prefix),
        reference.state_dict(),
    )


def sdxl_single_file_tensors(
    components: Mapping[str, Any], unet_config: UNetConfig = TINY_SDXL_UNET
) -> dict[str, Tensor]:
    """A whole SDXL checkpoint (UNet, autoencoder, CLIP-L, bigG) in the original layout."""
    return {
        **original_unet_tensors(components["unet"], unet_config),
        **original_autoencoder_tensors(components["vae"], TINY_SDXL_AUTOENCODER),
        **original_clip_l_tensors(components["text_encoder"]),
        **original_bigg_tensors(components["text_encoder_2"]),
    }
