"""Load a Stable Diffusion checkpoint (SD1.5, SD1.5 inpainting, SDXL; detected from the file)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..foundationals.clip.textual_inversion import EmbeddingLibrary
from ..foundationals.latent_diffusion.checkpoint import load_checkpoint
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from .host import list_model_files, model_file_path, model_search_paths
from .wires import CLIP, MODEL, VAE, CheckpointCache, ClipWire, ModelWire, VaeWire


def load_stable_diffusion(
    path: Path, device: torch.device, unet_dtype: torch.dtype, vae_dtype: torch.dtype
) -> StableDiffusion:
    """A checkpoint file or diffusers folder as a `StableDiffusion`, with the embeddings folder attached."""
    checkpoint = load_checkpoint(path, device=device, dtype=unet_dtype)
    if checkpoint.autoencoder is None or "clip_l" not in checkpoint.text_encoders:
        raise ValueError(
            f"{path.name}: the checkpoint has no autoencoder or no text encoder; a full SD checkpoint was expected"
        )
    autoencoder = checkpoint.autoencoder.to(dtype=vae_dtype)
    text_encoder_2 = checkpoint.text_encoders.get("clip_g")
    folders = model_search_paths("embeddings")
    return StableDiffusion(
        unet=checkpoint.unet,
        autoencoder=autoencoder,
        text_encoder=checkpoint.text_encoders["clip_l"],  # type: ignore[arg-type]
        text_encoder_2=text_encoder_2,  # type: ignore[arg-type]
        embeddings=EmbeddingLibrary(folders, 768),
        embeddings_2=EmbeddingLibrary(folders, 1280) if text_encoder_2 is not None else None,
    )


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
