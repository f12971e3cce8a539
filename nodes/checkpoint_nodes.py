"""Load a Stable Diffusion checkpoint (SD1.5, SD1.5 inpainting, SDXL; detected from the file)."""

from __future__ import annotations

from pathlib import Path

from ..foundationals.clip.textual_inversion import EmbeddingLibrary
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from .host import (
    ModelFileNames,
    list_model_files,
    list_model_folders,
    manage,
    model_file_path,
    model_folder_path,
    model_placement,
    model_search_paths,
)
from .wires import CLIP, MODEL, VAE, CheckpointCache, ClipWire, ModelWire, VaeWire, text_encoders


def load_stable_diffusion(path: Path) -> StableDiffusion:
    """A checkpoint file or diffusers folder as a `StableDiffusion`, with the embeddings folder attached.

    Each part is read once, straight into the device and dtype the host gives its role (UNet, text encoders,
    VAE: ComfyUI's `unet_dtype`, `text_encoder_dtype`, `vae_dtype`), on its offload device when hosted, and is
    managed by the host from then on (`host.manage`).
    """
    unet, text, vae = (model_placement(role) for role in ("unet", "text_encoder", "vae"))
    placement = {
        "unet": (unet.offload_device, unet.dtype),
        "text_encoders": (text.offload_device, text.dtype),
        "autoencoder": (vae.offload_device, vae.dtype),
    }
    model = StableDiffusion.from_checkpoint(
        path, device=unet.offload_device, dtype=unet.dtype, placement=placement
    )
    manage(model.unet, "unet", unet, f"{path.name} UNet")
    manage(model.autoencoder, "vae", vae, f"{path.name} VAE")
    for index, encoder in enumerate(text_encoders(model), start=1):
        manage(encoder, "text_encoder", text, f"{path.name} text encoder {index}")
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
