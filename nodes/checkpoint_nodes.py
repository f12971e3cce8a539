"""Load a Stable Diffusion checkpoint (SD1.5, SD1.5 inpainting, SDXL; detected from the file)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..foundationals.clip.textual_inversion import EmbeddingLibrary
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from .host import (
    ModelFileNames,
    list_model_files,
    list_model_folders,
    model_file_path,
    model_folder_path,
    model_search_paths,
)
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


def checkpoint_names() -> ModelFileNames:
    """Checkpoint files, then diffusers folders (model_index.json) in models/checkpoints and models/diffusers.

    Files inside a diffusers folder (its unet/vae/text_encoder weights) are not checkpoints and are left out.
    """
    folders = list_model_folders("checkpoints")
    files = [
        name for name in list_model_files("checkpoints") if not any(name.startswith(f + "/") for f in folders)
    ]
    extra = [name for name in list_model_folders("diffusers") if name not in folders and name not in files]
    return ModelFileNames("checkpoints", [*files, *folders, *extra])


def checkpoint_path(name: str) -> Path:
    """The file or diffusers folder `name` (models/checkpoints first, then models/diffusers)."""
    for kind in ("checkpoints", "diffusers"):
        folder = model_folder_path(kind, name)
        if folder is not None and (folder / "model_index.json").is_file():
            return folder
    return model_file_path("checkpoints", name)


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
                    checkpoint_names(),
                    {
                        "tooltip": "Checkpoint file (.safetensors, .ckpt) in models/checkpoints, or diffusers folder "
                        "(with model_index.json) in models/checkpoints or models/diffusers."
                    },
                )
            }
        }

    def load(self, ckpt_name: str) -> tuple[ModelWire, ClipWire, VaeWire]:
        model = _CACHE.get(checkpoint_path(ckpt_name))
        return ModelWire(model, ckpt_name), ClipWire(model, ckpt_name), VaeWire(model, ckpt_name)


NODE_CLASS_MAPPINGS = {"FluxionCheckpointLoader": FluxionCheckpointLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionCheckpointLoader": "Fluxion Load Checkpoint"}
