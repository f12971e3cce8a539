"""Load a Stable Diffusion checkpoint (SD1.5, SD1.5 inpainting, SDXL; detected from the file)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..foundationals.clip.textual_inversion import EmbeddingLibrary
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from .host import list_model_files, model_file_path, model_search_paths
from .wires import CLIP, MODEL, VAE, CheckpointCache, ClipWire, ModelWire, VaeWire


def load_stable_diffusion(
    path: Path, device: torch.device, unet_dtype: torch.dtype, vae_dtype: torch.dtype
) -> StableDiffusion:
    """A checkpoint file or diffusers folder as a `StableDiffusion`, with the embeddings folder attached."""
    model = StableDiffusion.from_checkpoint(path, device=device, dtype=unet_dtype)
    model.autoencoder.to(dtype=vae_dtype)
    folders = model_search_paths("embeddings")
    model.embeddings = EmbeddingLibrary(folders, model.text_encoder.config.embedding_dim)
    if model.text_encoder_2 is not None:
        model.embeddings_2 = EmbeddingLibrary(folders, model.text_encoder_2.config.embedding_dim)
    return model


_CACHE = CheckpointCache(load_stable_diffusion)


class FluxionCheckpointLoader:
    """Load a checkpoint from ComfyUI's checkpoints folder."""

    DESCRIPTION = (
        "Loads a Stable Diffusion checkpoint (SD1.5, SD1.5 inpainting or SDXL, detected from the file; single "
        "files or diffusers folders). Weights load once and are shared by every branch: adapters wired after "
        "this node are applied only while sampling."
    )
    CATEGORY = "fluxion/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (MODEL, CLIP, VAE)
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = (
        "The denoising UNet with its (empty) adapter stack.",
        "The text encoder(s), for Fluxion Text Encode.",
        "The autoencoder, for Fluxion VAE Encode / Decode.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ckpt_name": (
                    list_model_files("checkpoints"),
                    {
                        "tooltip": "Checkpoint file (.safetensors, .ckpt) or diffusers folder in models/checkpoints."
                    },
                )
            }
        }

    def load(self, ckpt_name: str) -> tuple[ModelWire, ClipWire, VaeWire]:
        model = _CACHE.get(model_file_path("checkpoints", ckpt_name))
        return ModelWire(model, ckpt_name), ClipWire(model, ckpt_name), VaeWire(model, ckpt_name)


NODE_CLASS_MAPPINGS = {"FluxionCheckpointLoader": FluxionCheckpointLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionCheckpointLoader": "Fluxion Load Checkpoint"}
