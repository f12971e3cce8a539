"""Image prompts through IP-Adapter (SD1.5 base/plus, SDXL): the IP-Adapter and CLIP vision loaders and the apply node.

The apply node takes reference images (with the CLIP vision model) or embeds encoded before
(`ip_adapter_embeds_nodes`). Reference-only control is in `reference_only_nodes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..foundationals.clip.image_encoder import CLIPImageEncoder, load_clip_image_encoder
from ..foundationals.latent_diffusion.adapters.ip_adapter import (
    IMAGE_EMBEDS,
    PENULTIMATE,
    WEIGHT_TYPES,
    ImageEmbeddings,
    IPAdapter,
    IPAdapterPatch,
    block_weights,
    load_ip_adapter,
)
from ..foundationals.latent_diffusion.model_config import unet_family
from ..foundationals.model_files import read_state_dict
from .host import list_model_files, load_models, manage, model_file_path, model_placement
from .latent_nodes import require_finite
from .wires import MODEL, MODEL_FILES, ModelWire

IP_ADAPTER = "FLUXION_IPADAPTER"
CLIP_VISION = "FLUXION_CLIP_VISION"
IMAGE_EMBEDS_TYPE = "FLUXION_IMAGE_EMBEDS"
KIND_NAMES = {
    IMAGE_EMBEDS: "image embeddings (for base IP-Adapters)",
    PENULTIMATE: "penultimate hidden states (for plus IP-Adapters)",
}


def _load_image_encoder(path: Path) -> CLIPImageEncoder:
    """A CLIP vision file, read into ComfyUI's text-encoder dtype on the offload device (as core places its
    CLIP vision models), managed by the host."""
    placement = model_placement("clip_vision")
    encoder = load_clip_image_encoder(
        read_state_dict(path, what="CLIP vision encoder"),
        device=placement.offload_device,
        dtype=placement.dtype,
    )
    manage(encoder, "clip_vision", placement, path.name)
    return encoder


def _load_ip_adapter(path: Path) -> IPAdapter:
    """An IP-Adapter file in the UNet's dtype on the offload device, its weights managed by the host."""
    placement = model_placement("adapter")
    adapter = load_ip_adapter(path, device=placement.offload_device, dtype=placement.dtype)
    manage(adapter.weights, "adapter", placement, path.name)
    return adapter


@dataclass(frozen=True)
class NamedModel:
    """A loaded model and its file name (shown in the model inspector)."""

    name: str
    model: IPAdapter | CLIPImageEncoder


class FluxionIPAdapterLoader:
    """Load an IP-Adapter file (tencent-ailab .bin/.safetensors or diffusers layout)."""

    DESCRIPTION = (
        "Loads an IP-Adapter (SD1.5 or SDXL; base, plus, FaceID, FaceID Plus v1/v2) from models/ipadapter. "
        "FaceID files go to Fluxion Apply IP-Adapter FaceID, the others to Fluxion Apply IP-Adapter."
    )
    CATEGORY = "fluxion/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (IP_ADAPTER,)
    RETURN_NAMES = ("ipadapter",)
    OUTPUT_TOOLTIPS = ("The IP-Adapter, for Fluxion Apply IP-Adapter (FaceID: Apply IP-Adapter FaceID).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ipadapter_name": (
                    list_model_files("ipadapter"),
                    {"tooltip": "IP-Adapter file in models/ipadapter."},
                )
            }
        }

    def load(self, ipadapter_name: str) -> tuple[NamedModel]:
        path = model_file_path("ipadapter", ipadapter_name)
        return (NamedModel(ipadapter_name, MODEL_FILES.get("ipadapter", path, _load_ip_adapter)),)


class FluxionCLIPVisionLoader:
    """Load a CLIP vision encoder (ViT-H/14 or ViT-bigG/14) for IP-Adapters."""

    DESCRIPTION = "Loads a CLIP image encoder (transformers or open_clip layout) from models/clip_vision."
    CATEGORY = "fluxion/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The image encoder, for Fluxion Apply IP-Adapter.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_name": (
                    list_model_files("clip_vision"),
                    {"tooltip": "Image encoder file in models/clip_vision."},
                )
            }
        }

    def load(self, clip_name: str) -> tuple[NamedModel]:
        path = model_file_path("clip_vision", clip_name)
        return (NamedModel(clip_name, MODEL_FILES.get("clip_vision", path, _load_image_encoder)),)


def parse_weights(
    text: str, count: int, name: str = "image_weights", items: str = "reference image(s)"
) -> list[float] | None:
    """'1, 0.5' -> [1.0, 0.5] (one per reference image, or face); empty -> None (all 1)."""
    if not text.strip():
        return None
    try:
        weights = [float(item) for item in text.replace(";", ",").split(",") if item.strip()]
    except ValueError as error:
        raise ValueError(f"{name} must be numbers separated by commas, got {text!r}") from error
    if len(weights) != count:
        raise ValueError(f"{name} has {len(weights)} values for {count} {items}")
    return weights


def check_model(model: ModelWire, ipadapter: NamedModel) -> None:
    """Refuse an IP-Adapter of another family than the model, naming both."""
    adapter = ipadapter.model
    assert isinstance(adapter, IPAdapter)
    try:
        adapter.check_unet(model.model.unet)
    except ValueError as error:
        family = unet_family(model.model.unet.config)
        raise ValueError(
            f"IP-Adapter {ipadapter.name} does not fit the model {model.name} ({family}): {error}"
        ) from error


def encode_reference_images(
    ipadapter: NamedModel,
    clip_vision: NamedModel,
    image: torch.Tensor,
    negative_image: torch.Tensor | None = None,
) -> ImageEmbeddings:
    """The CLIP embeddings `ipadapter` needs of reference images (B, H, W, C), one per image, with negatives.

    One negative image serves every reference; otherwise there is one negative per reference image.
    """
    adapter, encoder = ipadapter.model, clip_vision.model
    assert isinstance(adapter, IPAdapter) and isinstance(encoder, CLIPImageEncoder)
    require_finite(image, "the image")
    if negative_image is not None:
        require_finite(negative_image, "the negative image")
        if negative_image.shape[0] not in (1, image.shape[0]):
            raise ValueError(
                f"{negative_image.shape[0]} negative images for {image.shape[0]} reference images: "
                "give one negative image, or one per reference image"
            )
    try:
        adapter.check_image_encoder(encoder)
    except ValueError as error:
        raise ValueError(
            f"IP-Adapter {ipadapter.name} does not fit the CLIP vision encoder {clip_vision.name}: {error}"
        ) from error
    load_models([encoder], role="clip_vision")
    with torch.no_grad():
        embeddings = adapter.encode_images(encoder, image, negative_image)
    positive, negative = embeddings.positive.cpu(), embeddings.negative.cpu()  # wires keep theirs off the GPU
    embeddings = ImageEmbeddings(positive, negative, embeddings.kind)
    if negative.shape[0] != positive.shape[0]:  # one negative for every reference (concat needs as many)
        negative = negative.expand_as(positive).contiguous()
        embeddings = ImageEmbeddings(positive, negative, embeddings.kind)
    return embeddings


def check_embeds(ipadapter: NamedModel, embeds: ImageEmbeddings) -> None:
    """Refuse embeds of the wrong kind (base vs plus) or width for this IP-Adapter, naming both."""
    adapter = ipadapter.model
    assert isinstance(adapter, IPAdapter)
    expected = IMAGE_EMBEDS if adapter.kind == "base" else PENULTIMATE
    if embeds.kind != expected:
        raise ValueError(
            f"IP-Adapter {ipadapter.name} is a {adapter.kind} IP-Adapter and needs {KIND_NAMES[expected]}; "
            f"the embeds hold {KIND_NAMES.get(embeds.kind, embeds.kind)}. Encode them with Fluxion Encode "
            "IP-Adapter Embeds and this IP-Adapter"
        )
    width = int(embeds.positive.shape[-1])
    if width != adapter.image_input_dim:
        raise ValueError(
            f"IP-Adapter {ipadapter.name} needs {adapter.image_input_dim}-d embeds; these are {width}-d "
            f"({tuple(embeds.positive.shape)}): they were encoded with another CLIP vision model than this "
            "IP-Adapter's"
        )
    if embeds.negative.shape != embeds.positive.shape:
        raise ValueError(
            f"the embeds' negatives {tuple(embeds.negative.shape)} do not match their positives "
            f"{tuple(embeds.positive.shape)}: one negative per reference image is needed"
        )
    require_finite(embeds.positive, "the embeds")
    require_finite(embeds.negative, "the negative embeds")


def check_block_weights(
    model: ModelWire,
    weight: float,
    weight_type: str,
    weight_composition: float,
    layer_weights: str,
    node: str = "Fluxion Apply IP-Adapter",
) -> None:
    """Refuse an unknown weight type or a per-block list that does not fit the model, naming the input."""
    try:
        block_weights(model.model.unet.config, weight, weight_type, weight_composition, layer_weights)
    except ValueError as error:
        raise ValueError(f"{node} (model {model.name}): {error}") from error


def refuse_faceid(ipadapter: NamedModel, node: str) -> None:
    """FaceID files read face embeddings: refuse one where reference images are read, naming it."""
    adapter = ipadapter.model
    if isinstance(adapter, IPAdapter) and adapter.is_faceid:
        raise ValueError(
            f"{node}: IP-Adapter {ipadapter.name} is an IP-Adapter {adapter.kind_name}: it reads insightface "
            "face embeddings, not reference images. Use Fluxion Apply IP-Adapter FaceID (with Fluxion Load "
            "Face Embeds)"
        )


class FluxionApplyIPAdapter:
    """Prompt with images: the IP-Adapter's image tokens join the text in cross-attention."""

    DESCRIPTION = (
        "Adds an IP-Adapter to the model's stack: the reference images (a batch) are encoded by the CLIP vision "
        "model, or precomputed embeds are used, and steer the generation with `weight`. Several images combine "
        "by concat or average, each with its own weight; start/end limit it to a fraction of the steps; a mask "
        "limits it to a region; weight_type and layer_weights weight the UNet's blocks (style transfer, "
        "composition, curves). Connect either image (with clip_vision) or embeds."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the IP-Adapter in its stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to add the IP-Adapter to."}),
                "ipadapter": (IP_ADAPTER, {"tooltip": "From Fluxion Load IP-Adapter."}),
                "weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -1.0,
                        "max": 5.0,
                        "step": 0.05,
                        "tooltip": "Scale of the image attention (0 = off).",
                    },
                ),
                "combine": (
                    ["concat", "average"],
                    {"default": "concat", "tooltip": "How several reference images combine."},
                ),
                "image_weights": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional weight per reference image, e.g. '1, 0.5' (empty: all 1).",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    dict(fraction, default=0.0, tooltip="Fraction of the steps after which it starts."),
                ),
                "end_percent": (
                    "FLOAT",
                    dict(fraction, default=1.0, tooltip="Fraction of the steps after which it stops."),
                ),
            },
            "optional": {
                "clip_vision": (
                    CLIP_VISION,
                    {
                        "tooltip": "The image encoder the IP-Adapter was trained with (ViT-H or bigG); "
                        "needed with image, not with embeds."
                    },
                ),
                "image": (
                    "IMAGE",
                    {"tooltip": "Reference image(s); a batch gives several references. Or connect embeds."},
                ),
                "negative_image": (
                    "IMAGE",
                    {"tooltip": "Optional negative reference (default: the encoder's empty image)."},
                ),
                "mask": (
                    "MASK",
                    {
                        "tooltip": "Apply the image prompt only where the mask is white: outside it each step predicts as without the adapter (one more UNet pass per step)."
                    },
                ),
                "embeds": (
                    IMAGE_EMBEDS_TYPE,
                    {
                        "tooltip": "Precomputed reference embeds (Fluxion Encode / Load IP-Adapter Embeds), "
                        "instead of image and clip_vision."
                    },
                ),
                "outside_mask": (
                    ["blend", "keep"],
                    {
                        "default": "blend",
                        "tooltip": "With a mask. blend: every step predicts as without the adapter outside the "
                        "mask, the image stays coherent across its edge. keep: the outside ends exactly as the "
                        "image without the adapter (one more UNet pass per step).",
                    },
                ),
                "weight_type": (
                    list(WEIGHT_TYPES),
                    {
                        "default": "linear",
                        "tooltip": "How the weight spreads over the UNet's attention blocks (ComfyUI_IPAdapter_plus' "
                        "types). linear: the same everywhere; ease in/out, in-out, reverse in-out: a curve from "
                        "the first to the last block; weak input/middle/output, strong middle: 0.2x there; style "
                        "transfer / composition (InstantStyle: SDXL up_blocks.0.attentions.1 / "
                        "down_blocks.2.attentions.1) and their strong, combined and precise variants: only those "
                        "blocks.",
                    },
                ),
                "weight_composition": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -1.0,
                        "max": 5.0,
                        "step": 0.05,
                        "tooltip": "With weight_type 'style and composition': the weight of the composition "
                        "block(s) (weight is the style blocks').",
                    },
                ),
                "layer_weights": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional weight per attention block, times weight: 'block:weight' pairs "
                        "(block numbers in run order, SD1.5 0-15, SDXL 0-10, or diffusers names such as "
                        "up_blocks.0.attentions.1; unnamed blocks off) or one comma-separated weight per block. "
                        "Replaces weight_type (the precise types keep their swap).",
                    },
                ),
            },
        }

    def apply(
        self,
        model: ModelWire,
        ipadapter: NamedModel,
        clip_vision: NamedModel | None = None,
        image: torch.Tensor | None = None,
        weight: float = 1.0,
        combine: str = "concat",
        image_weights: str = "",
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        negative_image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        embeds: ImageEmbeddings | None = None,
        outside_mask: str = "blend",
        weight_type: str = "linear",
        weight_composition: float = 1.0,
        layer_weights: str = "",
    ) -> tuple[ModelWire]:
        if outside_mask not in ("blend", "keep"):
            raise ValueError(f"outside_mask must be blend or keep, got {outside_mask!r}")
        refuse_faceid(ipadapter, "Fluxion Apply IP-Adapter")
        check_block_weights(model, weight, weight_type, weight_composition, layer_weights)
        if mask is not None:
            require_finite(mask, "the mask")
        check_model(model, ipadapter)
        if embeds is not None:
            if image is not None:
                raise ValueError(
                    "Fluxion Apply IP-Adapter got both image and embeds: connect one of them "
                    "(embeds already hold their reference images)"
                )
            if negative_image is not None:
                raise ValueError(
                    "negative_image does nothing with embeds (their negatives are inside): connect it to "
                    "Fluxion Encode IP-Adapter Embeds instead"
                )
            check_embeds(ipadapter, embeds)
        elif image is not None:
            if clip_vision is None:
                raise ValueError(
                    "Fluxion Apply IP-Adapter needs clip_vision (Fluxion Load CLIP Vision) to encode image"
                )
            embeds = encode_reference_images(ipadapter, clip_vision, image, negative_image)
        else:
            raise ValueError(
                "Fluxion Apply IP-Adapter needs reference images: connect image (with clip_vision) or embeds "
                "(from Fluxion Encode IP-Adapter Embeds or Fluxion Load IP-Adapter Embeds)"
            )
        adapter = ipadapter.model
        assert isinstance(adapter, IPAdapter)
        load_models([adapter.weights], role="adapter")  # its image projection makes the tokens now
        with torch.no_grad():
            patch = IPAdapterPatch(
                adapter,
                embeds,
                scale=weight,
                weights=parse_weights(image_weights, embeds.positive.shape[0]),
                combine=combine,
                start=start_percent,
                end=end_percent,
                mask=mask,
                keep_outside=outside_mask == "keep",
                weight_type=weight_type,
                weight_composition=weight_composition,
                layer_weights=layer_weights,
            )
        return (model.with_patch(patch),)


NODE_CLASS_MAPPINGS = {
    "FluxionIPAdapterLoader": FluxionIPAdapterLoader,
    "FluxionCLIPVisionLoader": FluxionCLIPVisionLoader,
    "FluxionApplyIPAdapter": FluxionApplyIPAdapter,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionIPAdapterLoader": "Fluxion Load IP-Adapter",
    "FluxionCLIPVisionLoader": "Fluxion Load CLIP Vision",
    "FluxionApplyIPAdapter": "Fluxion Apply IP-Adapter",
}
