"""Full-size random SD1.5 files for the opt-in real-ComfyUI tests (core's loaders detect real architectures only).

The checkpoint is our SD1.5 (UNet, autoencoder, CLIP-L at their real sizes, torch's default init, fp16)
written in the original single-file layout by `checkpoint_export.save_single_file` (~1.7 GB). The LoRA is
kohya-named (SD1.5 kohya names use diffusers module names, see FACTS.md) with rank-4 pairs on the
attention projections of a few transformer blocks, written key by key from that naming rule.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from foundationals.clip.config import text_preset
from foundationals.clip.text_encoder import CLIPTextEncoder
from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from foundationals.latent_diffusion.checkpoint_export import save_single_file
from foundationals.latent_diffusion.model_config import SD15_AUTOENCODER, SD15_UNET
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from foundationals.latent_diffusion.unet import UNet


def write_random_sd15(path: Path, seed: int = 0) -> Path:
    """A full-size random SD1.5 single file (fp16) at `path`."""
    torch.manual_seed(seed)
    dtype = torch.float16
    model = StableDiffusion(
        unet=UNet(SD15_UNET, dtype=dtype),
        autoencoder=LatentDiffusionAutoencoder(SD15_AUTOENCODER, dtype=dtype),
        text_encoder=CLIPTextEncoder(text_preset("clip_l"), dtype=dtype),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(model, path)
    return path


# (diffusers module, input width, output width) of SD1.5's attention projections in a few blocks
_LORA_TARGETS = [
    (f"{block}_attentions_{i}_transformer_blocks_0_{attention}_{projection}", width_in, width_out)
    for block, width, count in (("down_blocks_0", 320, 2), ("mid_block", 1280, 1), ("up_blocks_3", 320, 3))
    for i in range(count)
    for attention in ("attn1", "attn2")
    for projection, width_in, width_out in (
        ("to_q", width, width),
        ("to_k", 768 if attention == "attn2" else width, width),
        ("to_v", 768 if attention == "attn2" else width, width),
        ("to_out_0", width, width),
    )
]


def write_random_sd15_lora(path: Path, seed: int = 0, rank: int = 4, scale: float = 0.2) -> Path:
    """A kohya-named SD1.5 UNet LoRA (lora_down / lora_up / alpha) on attention projections."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, width_in, width_out in _LORA_TARGETS:
        name = "lora_unet_" + module
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, width_in, generator=generator) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn(width_out, rank, generator=generator) * scale
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, str(path))
    return path


def write_random_sd15_controlnet(path: Path, seed: int = 0) -> Path:
    """A full-size random SD1.5 ControlNet in the diffusers layout (fp16), zero convolutions redrawn too.

    Written by diffusers (`ControlNetModel(...).state_dict()`); ComfyUI and our loader both read that layout.
    Weights ~N(0, 0.01) (norms ~1) keep the residuals finite through the full-size network.
    """
    from foundationals.latent_diffusion.model_config import SD15_UNET
    from tests.support.tiny_control import diffusers_controlnet, redraw

    model = diffusers_controlnet(SD15_UNET, hint_channels=(16, 32, 96, 256), seed=seed)
    redraw(model, 0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(path)
    )
    return path
