"""IP-Adapter embeds: reference images encoded once (FLUXION_IMAGE_EMBEDS: an `ImageEmbeddings`, the CLIP
embeddings before the adapter's projection), saved as safetensors into the output folder, and loaded from the
input folder (where ComfyUI keeps reference images, and ComfyUI_IPAdapter_plus its embeds), so a workflow can
prompt with them without the CLIP vision model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..foundationals.latent_diffusion.adapters.ip_adapter import ImageEmbeddings, IPAdapter
from .host import input_directory, output_directory
from .image_prompt_nodes import (
    CLIP_VISION,
    IMAGE_EMBEDS_TYPE,
    IP_ADAPTER,
    NamedModel,
    encode_reference_images,
)
from .latent_nodes import require_finite
from .runner_nodes import annotated_path, save_image_path

EMBEDS_EXTENSION = ".safetensors"


class FluxionEncodeIPAdapterEmbeds:
    """Encode reference images once into the CLIP embeds an IP-Adapter reads (to reuse, save or share)."""

    DESCRIPTION = (
        "Encodes reference images (a batch: several references) with the CLIP vision model into the embeds the "
        "IP-Adapter needs: image embeddings for base adapters, penultimate hidden states for plus ones, with "
        "their negatives (FaceID Plus: of the face crops). Feed them to Fluxion Apply IP-Adapter (embeds), "
        "Fluxion Apply IP-Adapter FaceID (embeds) or Fluxion Save IP-Adapter Embeds."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "encode"
    RETURN_TYPES = (IMAGE_EMBEDS_TYPE,)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("The reference images' embeds and their negatives, for this kind of IP-Adapter.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ipadapter": (
                    IP_ADAPTER,
                    {"tooltip": "The IP-Adapter the embeds are for (base or plus decides what is encoded)."},
                ),
                "clip_vision": (
                    CLIP_VISION,
                    {"tooltip": "The image encoder the IP-Adapter was trained with (ViT-H or bigG)."},
                ),
                "image": ("IMAGE", {"tooltip": "Reference image(s); a batch gives several references."}),
            },
            "optional": {
                "negative_image": (
                    "IMAGE",
                    {
                        "tooltip": "Optional negative reference: one for all, or one per image "
                        "(default: the encoder's empty image)."
                    },
                ),
            },
        }

    def encode(
        self,
        ipadapter: NamedModel,
        clip_vision: NamedModel,
        image: torch.Tensor,
        negative_image: torch.Tensor | None = None,
    ) -> tuple[ImageEmbeddings]:
        adapter = ipadapter.model
        if isinstance(adapter, IPAdapter) and adapter.kind == "faceid":
            raise ValueError(
                f"Fluxion Encode IP-Adapter Embeds: IP-Adapter {ipadapter.name} is an IP-Adapter FaceID: it reads "
                "insightface face embeddings only, no image to encode (Fluxion Load Face Embeds)"
            )
        return (encode_reference_images(ipadapter, clip_vision, image, negative_image),)


class FluxionSaveIPAdapterEmbeds:
    """Write embeds to the output folder as safetensors (ImageEmbeddings.save)."""

    DESCRIPTION = (
        "Saves IP-Adapter embeds into the output folder as `{prefix}_00001_.safetensors` (tensors positive and "
        "negative, their kind in the metadata). Move the file to the input folder to load it with Fluxion "
        "Load IP-Adapter Embeds."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "embeds": (IMAGE_EMBEDS_TYPE, {"tooltip": "From Fluxion Encode IP-Adapter Embeds."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "fluxion_ipadapter_embeds",
                        "tooltip": "File name prefix, inside the output folder (may hold a subfolder, "
                        "e.g. embeds/portrait).",
                    },
                ),
            }
        }

    def save(self, embeds: ImageEmbeddings, filename_prefix: str) -> dict:
        folder, stem, counter, subfolder = save_image_path(filename_prefix, output_directory())
        name = f"{stem}_{counter:05}_{EMBEDS_EXTENSION}"
        embeds.save(folder / name)
        return {"ui": {"embeds": [{"filename": name, "subfolder": subfolder, "type": "output"}]}}


def list_embeds_files() -> list[str]:
    """Embeds files (relative, '/'-separated) in the input folder, sorted."""
    folder = input_directory()
    if not folder.is_dir():
        return []
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob(f"*{EMBEDS_EXTENSION}") if path.is_file()
    )


def embeds_file_path(name: str) -> Path:
    """An embeds file in the input folder ('x.safetensors [output]' reads the output folder, as LoadImage)."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"embeds name {name!r} must be a path inside the input folder")
    path = annotated_path(name)
    if not path.is_file():
        listing = ", ".join(list_embeds_files()) or "none"
        raise FileNotFoundError(
            f"IP-Adapter embeds {name!r} not found in {path.parent}. Embeds in the input folder: {listing}"
        )
    return path


class FluxionLoadIPAdapterEmbeds:
    """Read embeds saved by Fluxion Save IP-Adapter Embeds from the input folder."""

    DESCRIPTION = (
        "Loads IP-Adapter embeds (a .safetensors file written by Fluxion Save IP-Adapter Embeds) from ComfyUI's "
        "input folder, where reference images live too (as ComfyUI_IPAdapter_plus keeps its embeds). No CLIP "
        "vision model is needed to use them."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "load"
    RETURN_TYPES = (IMAGE_EMBEDS_TYPE,)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("The saved embeds, for Fluxion Apply IP-Adapter (embeds).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "embeds_name": (
                    list_embeds_files(),
                    {"tooltip": "Embeds file (.safetensors) in the input folder."},
                )
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, embeds_name: str) -> bool | str:
        """The file must exist ('name [output]' names one in the output folder, which the list does not show)."""
        try:
            embeds_file_path(embeds_name)
        except (ValueError, FileNotFoundError) as error:
            return str(error)
        return True

    @classmethod
    def IS_CHANGED(cls, embeds_name: str) -> str:
        """The file's size and time: a re-saved file loads again."""
        stat = embeds_file_path(embeds_name).stat()
        return f"{stat.st_size}-{stat.st_mtime_ns}"

    def load(self, embeds_name: str) -> tuple[ImageEmbeddings]:
        embeds = ImageEmbeddings.load(embeds_file_path(embeds_name))
        require_finite(embeds.positive, f"the embeds in {embeds_name}")
        return (embeds,)


NODE_CLASS_MAPPINGS = {
    "FluxionEncodeIPAdapterEmbeds": FluxionEncodeIPAdapterEmbeds,
    "FluxionSaveIPAdapterEmbeds": FluxionSaveIPAdapterEmbeds,
    "FluxionLoadIPAdapterEmbeds": FluxionLoadIPAdapterEmbeds,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionEncodeIPAdapterEmbeds": "Fluxion Encode IP-Adapter Embeds",
    "FluxionSaveIPAdapterEmbeds": "Fluxion Save IP-Adapter Embeds",
    "FluxionLoadIPAdapterEmbeds": "Fluxion Load IP-Adapter Embeds",
}
