"""Write a `StableDiffusion` as an original single file (LDM/SGM layout), the format users share.

The inverse of `checkpoint.load_single_file`: UNet under `model.diffusion_model.*`, autoencoder under
`first_stage_model.*`, CLIP-L under `cond_stage_model.transformer.*` (SD1.5) or
`conditioner.embedders.0.transformer.*` and OpenCLIP bigG under `conditioner.embedders.1.model.*` (SDXL),
plus the empty `v_pred` / `ztsnr` marker tensors of a v-prediction / zero-terminal-SNR model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..clip.text_encoder import CLIPTextEncoder, transformer_layer_names
from ..formats.clip import TEXT_LAYOUTS, export_clip_state_dict
from ..formats.ldm import (
    LDM_AUTOENCODER_PREFIX,
    LDM_UNET_PREFIX,
    V_PREDICTION_MARKER,
    ZERO_TERMINAL_SNR_MARKER,
    ldm_autoencoder_key_map,
    ldm_unet_key_map,
)
from ..model_files import describe_keys
from .solvers import PredictionType
from .stable_diffusion import StableDiffusion


def _text_encoder_tensors(encoder: CLIPTextEncoder, layout: str) -> dict[str, Tensor]:
    return export_clip_state_dict(
        encoder.state_dict(), TEXT_LAYOUTS[layout], transformer_layer_names(encoder.config.num_layers)
    )


def _is_autoencoder_attention_weight(key: str) -> bool:
    """`*.attn_1.{q,k,v,proj_out}.weight`: Linear in our autoencoder, 1x1 Conv2d in LDM files (and core's VAE)."""
    parts = key.split(".")
    return (
        len(parts) >= 3
        and parts[-3] == "attn_1"
        and parts[-2] in ("q", "k", "v", "proj_out")
        and parts[-1] == "weight"
    )


def single_file_state_dict(model: StableDiffusion) -> dict[str, Tensor]:
    """Every tensor of `model` under its original single-file key."""
    unet_state, autoencoder_state = model.unet.state_dict(), model.autoencoder.state_dict()
    tensors = {
        LDM_UNET_PREFIX + theirs: unet_state[ours] for theirs, ours in ldm_unet_key_map(model.unet).items()
    }
    for theirs, ours in ldm_autoencoder_key_map(model.autoencoder).items():
        tensor = autoencoder_state[ours]
        if _is_autoencoder_attention_weight(theirs) and tensor.dim() == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # LDM files store them as 1x1 convolutions
        tensors[LDM_AUTOENCODER_PREFIX + theirs] = tensor
    if model.text_encoder_2 is None:
        tensors.update(_text_encoder_tensors(model.text_encoder, "sd15"))
    else:
        tensors.update(_text_encoder_tensors(model.text_encoder, "sdxl_clip_l"))
        tensors.update(_text_encoder_tensors(model.text_encoder_2, "sdxl_clip_g"))
    # how to sample it: the empty marker tensors ComfyUI writes and reads
    if model.prediction_type == PredictionType.V_PREDICTION:
        tensors[V_PREDICTION_MARKER] = torch.tensor([])
    elif model.prediction_type != PredictionType.EPSILON:
        raise ValueError(f"a single file cannot say the prediction type {model.prediction_type.value!r}")
    if model.zero_terminal_snr:
        tensors[ZERO_TERMINAL_SNR_MARKER] = torch.tensor([])
    return tensors


def save_single_file(model: StableDiffusion, path: str | Path) -> None:
    """Write `model` as an original-layout `.safetensors` checkpoint."""
    from ...fluxion.utils import save_to_safetensors

    tensors = single_file_state_dict(model)
    save_to_safetensors(path, tensors, metadata={"format": "pt", "fluxion_keys": describe_keys(tensors)})
