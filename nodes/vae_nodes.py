"""Load a standalone VAE (models/vae) in place of a model's own."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..foundationals.latent_diffusion.autoencoder_loading import (
    AutoencoderFileError,
    is_diffusers_autoencoder_folder,
    load_autoencoder,
)
from .host import (
    ModelFileNames,
    get_torch_device,
    list_model_files,
    list_model_folders,
    model_file_path,
    model_folder_path,
    vae_dtype,
)
from .wires import MODEL_FILES, VAE, VaeWire


def vae_names() -> ModelFileNames:
    """VAE files in models/vae, then diffusers VAE folders (config.json of an AutoencoderKL) there."""
    folders = list_model_folders("vae", is_diffusers_autoencoder_folder)
    return ModelFileNames("vae", [*list_model_files("vae"), *folders])


def vae_path(name: str) -> Path:
    folder = model_folder_path("vae", name)
    if folder is not None:
        return folder
    return model_file_path("vae", name)


class FluxionLoadVAE:
    """A VAE file (vae-ft-mse-840000, sdxl-vae-fp16-fix, ...) replacing the VAE of a model's wire."""

    DESCRIPTION = (
        "Loads a standalone VAE from models/vae (single files in the original LDM layout, e.g. "
        "vae-ft-mse-840000-ema-pruned, or in the diffusers layout, e.g. sdxl_vae / sdxl-vae-fp16-fix; or a "
        "diffusers VAE folder) and gives a VAE wire that uses it instead of the input VAE (the input is unchanged)."
    )
    CATEGORY = "fluxion/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The model's VAE wire with the loaded autoencoder, for Fluxion VAE Encode / Decode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": (
                    VAE,
                    {"tooltip": "The VAE to replace (from Fluxion Load Checkpoint): same latent space."},
                ),
                "vae_name": (
                    vae_names(),
                    {"tooltip": "VAE file (.safetensors, .ckpt, .pt) or diffusers VAE folder in models/vae."},
                ),
            }
        }

    def load(self, vae: VaeWire, vae_name: str) -> tuple[VaeWire]:
        current = vae.model.autoencoder.config
        path = vae_path(vae_name)
        device = get_torch_device()

        def read(path: Path) -> object:
            return load_autoencoder(path, current.scaling_factor, device, vae_dtype(device))

        autoencoder = MODEL_FILES.get(f"vae {current.scaling_factor}", path, read)
        config = autoencoder.config  # type: ignore[attr-defined]
        if (config.latent_channels, config.downscale_factor) != (
            current.latent_channels,
            current.downscale_factor,
        ):
            raise AutoencoderFileError(
                f"VAE {vae_name!r} has {config.latent_channels} latent channels at 1/{config.downscale_factor} "
                f"scale; the model {vae.name} needs {current.latent_channels} at 1/{current.downscale_factor}"
            )
        model = replace(vae.model, autoencoder=autoencoder)  # shares the UNet and text encoders
        return (VaeWire(model, f"{vae.name} + VAE {vae_name}"),)


NODE_CLASS_MAPPINGS = {"FluxionLoadVAE": FluxionLoadVAE}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionLoadVAE": "Fluxion Load VAE"}
