"""Load a Stable Diffusion checkpoint (SD1.5, SD1.5 inpainting, SDXL; detected from the file)."""

from __future__ import annotations

from pathlib import Path

from ..foundationals.clip.textual_inversion import EmbeddingLibrary
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from .host import list_model_files, manage, model_file_path, model_placement, model_search_paths
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
