"""Standalone VAE files (models/vae): single files in the LDM or the diffusers layout, and diffusers folders.

What users put there: `vae-ft-mse-840000-ema-pruned.safetensors` / `.ckpt` (LDM keys `encoder.down.0...`,
the `.ckpt` also holds the training `loss.*` discriminator), `sdxl_vae.safetensors` and
`sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors` (diffusers keys `encoder.down_blocks.0...`), the
diffusers folder itself (`config.json` + weights), or a full checkpoint's `first_stage_model.*` part. The
architecture is read from the key shapes (all SD1.5 / SDXL VAEs share it); the scaling factor comes from
the diffusers config when there is one, else from the caller (the model whose VAE it replaces).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..formats.diffusers import autoencoder_config_from_diffusers, diffusers_autoencoder_key_map
from ..formats.ldm import LDM_AUTOENCODER_PREFIX, infer_autoencoder_config, ldm_autoencoder_key_map
from ..model_files import describe_keys, describe_model_kind, read_state_dict
from .auto_encoder import LatentDiffusionAutoencoder
from .model_config import AutoencoderConfig

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
IGNORED_PREFIXES = ("loss.", "model_ema.")
"""Training leftovers in LDM `.ckpt` VAEs: the discriminator / perceptual loss, EMA copies."""


class AutoencoderFileError(ValueError):
    """A file or folder that is not a Stable Diffusion VAE."""


def _count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}
    return max(found) + 1 if found else 0


def infer_diffusers_autoencoder_config(
    shapes: Mapping[str, tuple[int, ...]], scaling_factor: float, source: str
) -> AutoencoderConfig:
    """An autoencoder config from diffusers `AutoencoderKL` key shapes."""
    keys = list(shapes)
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    try:
        return AutoencoderConfig(
            image_channels=shapes["encoder.conv_in.weight"][1],
            latent_channels=shapes["post_quant_conv.weight"][0],
            block_channels=tuple(
                shapes[f"encoder.down_blocks.{level}.resnets.0.conv1.weight"][0] for level in range(levels)
            ),
            layers_per_block=_count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
            scaling_factor=scaling_factor,
        )
    except (KeyError, IndexError, ValueError) as error:
        raise AutoencoderFileError(
            f"{source}: the diffusers autoencoder key shapes form no SD VAE ({type(error).__name__}: {error})"
        ) from error


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise AutoencoderFileError(
        f"{folder}: a diffusers VAE folder needs config.json and one of {', '.join(WEIGHT_NAMES)}"
    )


def is_diffusers_autoencoder_folder(folder: Path) -> bool:
    """A folder with a diffusers `AutoencoderKL` config.json (and weights)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError):
        return False


def _fill(
    autoencoder: LatentDiffusionAutoencoder, tensors: dict[str, Tensor], key_map: dict[str, str], source: str
) -> None:
    missing = sorted(set(key_map) - set(tensors))
    unexpected = sorted(set(tensors) - set(key_map))
    if missing or unexpected:
        raise AutoencoderFileError(
            f"{source}: not a complete SD VAE ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]})"
        )
    expected = {key: value.shape for key, value in autoencoder.state_dict().items()}
    converted = {}
    for theirs, ours in key_map.items():
        tensor = tensors[theirs]
        if tensor.shape != expected[ours]:
            if tensor.numel() != expected[ours].numel():
                raise AutoencoderFileError(
                    f"{source}: {theirs} has shape {tuple(tensor.shape)}, expected {tuple(expected[ours])}"
                )
            tensor = tensor.reshape(expected[ours])  # attention as 1x1 convolutions (LDM files)
        converted[ours] = tensor
    autoencoder.load_state_dict(converted, strict=True, assign=True)


def load_autoencoder(
    path: str | Path,
    scaling_factor: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentDiffusionAutoencoder:
    """A standalone VAE file or diffusers folder as our autoencoder (see the module docstring)."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        if not is_diffusers_autoencoder_folder(path):
            raise AutoencoderFileError(
                f'{source}: not a diffusers VAE folder (expected config.json with "_class_name": "AutoencoderKL")'
            )
        config_json = json.loads((path / "config.json").read_text())
        tensors = read_state_dict(_weights_file(path), what="VAE", device=device, dtype=dtype)
        config = autoencoder_config_from_diffusers(config_json)
        autoencoder = LatentDiffusionAutoencoder(config, device="meta")
        _fill(autoencoder, tensors, diffusers_autoencoder_key_map(autoencoder), source)
        return autoencoder
    tensors = read_state_dict(path, what="VAE", device=device, dtype=dtype)
    keys = list(tensors)
    if any(key.startswith(LDM_AUTOENCODER_PREFIX) for key in keys):  # a full checkpoint's VAE part
        tensors = {
            k[len(LDM_AUTOENCODER_PREFIX) :]: v
            for k, v in tensors.items()
            if k.startswith(LDM_AUTOENCODER_PREFIX)
        }
    tensors = {k: v for k, v in tensors.items() if not k.startswith(IGNORED_PREFIXES)}
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    if "encoder.down.0.block.0.conv1.weight" in shapes:
        config = infer_autoencoder_config(shapes, scaling_factor, source)
        autoencoder = LatentDiffusionAutoencoder(config, device="meta")
        _fill(autoencoder, tensors, ldm_autoencoder_key_map(autoencoder), source)
        return autoencoder
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes:
        config = infer_diffusers_autoencoder_config(shapes, scaling_factor, source)
        autoencoder = LatentDiffusionAutoencoder(config, device="meta")
        _fill(autoencoder, tensors, diffusers_autoencoder_key_map(autoencoder), source)
        return autoencoder
    raise AutoencoderFileError(
        f"{source}: this looks like {describe_model_kind(keys)}, not a VAE (expected LDM keys encoder.down.0.* / "
        f"decoder.up.* or diffusers keys encoder.down_blocks.0.*; it has {describe_keys(keys)})"
    )
