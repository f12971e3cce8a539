"""Tiny Control-LoRA files in Stability's layout, and the ControlNet they stand for, derived by hand.

The base UNet is the tiny SDXL one with diffusers' weights; its original (LDM) tensors come from diffusers' own
LDM -> diffusers conversion run in reverse (`tiny_sdxl.original_unet_tensors`), not from our key tables. A
Control-LoRA file (as control-lora-canny-rank128.safetensors) holds:
- the `lora_controlnet` marker;
- the ControlNet's own layers in full, under lllyasviel names: `input_hint_block.{0,2,...,14}` (ComfyUI's
  hint encoder widths 16, 32, 96, 256), `zero_convs.N.0`, `middle_block_out.0`;
- for the UNet's encoder (`time_embed`, `label_emb`, `input_blocks`, `middle_block`): every bias and norm in
  full (new values), every weight of 2+ dims as a low-rank pair `.up` (out, rank[, 1, 1]) / `.down`
  (rank, in[, k, k]), except `FULL_WEIGHTS`, stored in full.

`merged_controlnet` is the plain lllyasviel ControlNet those stand for, computed here from the definition
(ComfyUI's `ControlLoraOps`): UNet weight + up.flatten(1) @ down.flatten(1), reshaped; full tensors replace.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from foundationals.formats.diffusers import diffusers_unet_key_map
from foundationals.latent_diffusion.model_config import TINY_SDXL_UNET, UNetConfig
from foundationals.latent_diffusion.unet import UNet
from tests.support.tiny_sdxl import diffusers_sdxl_unet, original_unet_tensors

COMFY_HINT_CHANNELS = (16, 32, 96, 256)  # ComfyUI's cldm hint encoder (fixed widths): hints 8x the latents
ENCODER_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
FULL_WEIGHTS = ("input_blocks.0.0.weight", "label_emb.0.2.weight")
"""Weights stored in full (the file's value replaces the UNet's), as some layers are in real files."""


def tiny_sdxl_base(seed: int = 0, config: UNetConfig = TINY_SDXL_UNET) -> tuple[UNet, dict[str, Tensor]]:
    """Our tiny SDXL UNet on diffusers' random weights, and the same weights under LDM names (no prefix)."""
    reference = diffusers_sdxl_unet(config, seed=seed)
    unet = UNet(config, device="meta")
    state = reference.state_dict()
    unet.load_state_dict(
        {ours: state[theirs] for theirs, ours in diffusers_unet_key_map(unet).items()}, assign=True
    )
    prefix = "model.diffusion_model."
    ldm = {key[len(prefix) :]: tensor for key, tensor in original_unet_tensors(reference, config).items()}
    return unet, ldm


def _hint_and_outputs(ldm_unet: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """The ControlNet's own layers under lllyasviel names, random (zero convs too, so the control shows)."""
    width = ldm_unet["input_blocks.0.0.weight"].shape[0]
    widths = COMFY_HINT_CHANNELS
    convs = [(3, widths[0])]
    for a, b in zip(widths, widths[1:]):
        convs += [(a, a), (a, b)]
    convs.append((widths[-1], width))
    tensors: dict[str, Tensor] = {}
    for index, (cin, cout) in enumerate(convs):
        tensors[f"input_hint_block.{2 * index}.weight"] = (
            torch.randn(cout, cin, 3, 3, generator=generator) * 0.1
        )
        tensors[f"input_hint_block.{2 * index}.bias"] = torch.randn(cout, generator=generator) * 0.05
    blocks = sorted({int(key.split(".")[1]) for key in ldm_unet if key.startswith("input_blocks.")})
    for block in blocks:
        channels = _block_out_channels(ldm_unet, block)
        tensors[f"zero_convs.{block}.0.weight"] = (
            torch.randn(channels, channels, 1, 1, generator=generator) * 0.1
        )
        tensors[f"zero_convs.{block}.0.bias"] = torch.randn(channels, generator=generator) * 0.05
    middle = ldm_unet["middle_block.2.out_layers.3.weight"].shape[0]
    tensors["middle_block_out.0.weight"] = torch.randn(middle, middle, 1, 1, generator=generator) * 0.1
    tensors["middle_block_out.0.bias"] = torch.randn(middle, generator=generator) * 0.05
    return tensors


def _block_out_channels(ldm_unet: Mapping[str, Tensor], block: int) -> int:
    for name in (f"input_blocks.{block}.0.out_layers.3.weight", f"input_blocks.{block}.0.op.weight"):
        if name in ldm_unet:
            return ldm_unet[name].shape[0]
    return ldm_unet[f"input_blocks.{block}.0.weight"].shape[0]


def stability_control_lora(ldm_unet: Mapping[str, Tensor], rank: int = 4, seed: int = 7) -> dict[str, Tensor]:
    """A Control-LoRA file's tensors for the UNet `ldm_unet` (LDM names, no prefix); see the module doc."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {"lora_controlnet": torch.tensor([])}
    for key, base in ldm_unet.items():
        if not key.startswith(ENCODER_PREFIXES):
            continue
        module = key.rpartition(".")[0]
        if base.dim() >= 2 and key not in FULL_WEIGHTS:
            out_channels, in_channels, *kernel = base.shape
            r = min(rank, out_channels, in_channels)
            tensors[f"{module}.up"] = (
                torch.randn(out_channels, r, *[1] * len(kernel), generator=generator) * 0.1
            )
            tensors[f"{module}.down"] = torch.randn(r, in_channels, *kernel, generator=generator) * 0.1
        else:
            tensors[key] = base + torch.randn(base.shape, generator=generator) * 0.02
    tensors.update(_hint_and_outputs(ldm_unet, generator))
    return tensors


def merged_controlnet(
    ldm_unet: Mapping[str, Tensor], control_lora: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The lllyasviel ControlNet (no prefix) a Control-LoRA stands for on `ldm_unet`: see the module doc."""
    merged: dict[str, Tensor] = {}
    for key, base in ldm_unet.items():
        if not key.startswith(ENCODER_PREFIXES):
            continue
        module = key.rpartition(".")[0]
        weight = control_lora.get(key, base)
        if key.endswith(".weight") and f"{module}.up" in control_lora:
            up, down = control_lora[f"{module}.up"], control_lora[f"{module}.down"]
            weight = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        merged[key] = weight
    for key, tensor in control_lora.items():
        if key.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")):
            merged[key] = tensor
    return merged
