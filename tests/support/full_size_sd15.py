"""A full-size SD1.5 single file with random weights: ComfyUI's loaders detect only real architectures.

Built on the meta device and filled tensor by tensor (fp16, about 2 GB on disk), then written in the original
LDM layout by `checkpoint_export.save_single_file`. Weights are drawn so that activations stay in range: std
0.02 for matrices and kernels, norm weights about 1, small biases; the autoencoder decodes to mid-grey images
with texture rather than clipped ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from foundationals.clip.config import text_preset
from foundationals.clip.text_encoder import CLIPTextEncoder
from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from foundationals.latent_diffusion.checkpoint_export import save_single_file
from foundationals.latent_diffusion.model_config import SD15_AUTOENCODER, SD15_UNET
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from foundationals.latent_diffusion.unet import UNet


def _random_like(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if "Norm" in name and name.endswith("weight"):
        values = 1.0 + 0.05 * values
    elif len(shape) > 1:
        values = 0.02 * values
    else:
        values = 0.01 * values
    return values.to(torch.float16)


def write_random_sd15(path: Path, seed: int = 0) -> Path:
    """Write a random full-size SD1.5 checkpoint to `path` (kept if it is already there)."""
    if path.is_file():
        return path
    model = StableDiffusion(
        UNet(SD15_UNET, device="meta"),
        LatentDiffusionAutoencoder(SD15_AUTOENCODER, device="meta"),
        CLIPTextEncoder(text_preset("clip_l"), device="meta"),
    )
    generator = torch.Generator().manual_seed(seed)
    for module in (model.unet, model.autoencoder, model.text_encoder):
        state = {name: _random_like(name, t.shape, generator) for name, t in module.state_dict().items()}
        module.load_state_dict(state, assign=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_single_file(model, partial)
    partial.rename(path)
    return path
