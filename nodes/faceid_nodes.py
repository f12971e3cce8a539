"""IP-Adapter FaceID / FaceID Plus (v1, v2): face embeddings (loaded from a file, or computed with insightface
where it is installed) and the apply node.

FaceID reads insightface's 512-d identity embedding of a face. insightface and its ONNX models are no
dependency of the pack: compute the embedding once elsewhere (`FaceAnalysis(...).get(image)[0].normed_embedding`,
saved with `numpy.save`) and put the file in ComfyUI's input folder (Fluxion Load Face Embeds), or, where
insightface is installed, use Fluxion Face Embeds (insightface), which says clearly when it is not. FaceID Plus
also reads the CLIP vision hidden states of the face crop (the image input, or embeds encoded before). The LoRA
each FaceID release ships (`ip-adapter-faceid*_lora.safetensors`) is applied by the apply node's `lora_name`
through the pack's LoRA loader, on the same model; chaining Fluxion Load LoRA before the node does the same.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..foundationals.formats.ip_adapter import FACE_EMBEDDING_SUFFIXES, read_face_embeddings
from ..foundationals.latent_diffusion.adapters.ip_adapter import (
    PENULTIMATE,
    WEIGHT_TYPES,
    FaceEmbeddings,
    ImageEmbeddings,
    IPAdapter,
    IPAdapterPatch,
)
from .host import input_directory, list_model_files, load_models, models_root
from .image_prompt_nodes import (
    CLIP_VISION,
    IMAGE_EMBEDS_TYPE,
    IP_ADAPTER,
    NamedModel,
    check_block_weights,
    check_model,
    encode_reference_images,
    parse_weights,
)
from .latent_nodes import require_finite
from .lora_nodes import NO_LORA, LoraPatch, read_lora
from .runner_nodes import annotated_path
from .wires import MODEL, ModelWire

FACE_EMBEDS = "FLUXION_FACE_EMBEDS"
APPLY_FACEID = "Fluxion Apply IP-Adapter FaceID"
INSIGHTFACE_HINT = (
    "compute the embedding with insightface (FaceAnalysis 'antelopev2' or 'buffalo_l': "
    "faces[0].normed_embedding) and save it with numpy.save into the input folder"
)


def list_face_embeds_files() -> list[str]:
    """Face-embedding files (.npy, .safetensors, .pt, ...; relative, '/'-separated) in the input folder."""
    folder = input_directory()
    if not folder.is_dir():
        return []
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.suffix.lower() in FACE_EMBEDDING_SUFFIXES and path.is_file()
    )


def face_embeds_file_path(name: str) -> Path:
    """A face-embedding file in the input folder ('x.npy [output]' reads the output folder, as LoadImage)."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"face embeds name {name!r} must be a path inside the input folder")
    path = annotated_path(name)
    if not path.is_file():
        listing = ", ".join(list_face_embeds_files()) or "none"
        raise FileNotFoundError(
            f"face embeds {name!r} not found in {path.parent} ({INSIGHTFACE_HINT}). Face-embedding files in "
            f"the input folder: {listing}"
        )
    return path


class FluxionLoadFaceEmbeds:
    """Read insightface face embeddings (computed elsewhere) from the input folder."""

    DESCRIPTION = (
        "Loads face identity embeddings for IP-Adapter FaceID from ComfyUI's input folder: a .npy, .safetensors "
        "or .pt file holding one 512-d insightface embedding (D,), or several (N, D) / (N, 1, D) (several faces "
        "of one person combine in the apply node). insightface is not needed here: compute the embedding once "
        "with it (FaceAnalysis(...).get(image)[0].normed_embedding, numpy.save) and reuse the file."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "load"
    RETURN_TYPES = (FACE_EMBEDS,)
    RETURN_NAMES = ("face_embeds",)
    OUTPUT_TOOLTIPS = ("The face embeddings, for Fluxion Apply IP-Adapter FaceID.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "face_embeds_name": (
                    list_face_embeds_files(),
                    {
                        "tooltip": "Face-embedding file in the input folder (.npy, .safetensors, .pt): "
                        "insightface's 512-d normed_embedding, one row per face."
                    },
                )
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, face_embeds_name: str) -> bool | str:
        """The file must exist ('name [output]' names one in the output folder, which the list does not show)."""
        try:
            face_embeds_file_path(face_embeds_name)
        except (ValueError, FileNotFoundError) as error:
            return str(error)
        return True

    @classmethod
    def IS_CHANGED(cls, face_embeds_name: str) -> str:
        """The file's size and time: a re-written file loads again."""
        stat = face_embeds_file_path(face_embeds_name).stat()
        return f"{stat.st_size}-{stat.st_mtime_ns}"

    def load(self, face_embeds_name: str) -> tuple[FaceEmbeddings]:
        face = read_face_embeddings(face_embeds_file_path(face_embeds_name))
        require_finite(face, f"the face embeddings in {face_embeds_name}")
        return (FaceEmbeddings(face),)


INSIGHTFACE_MODELS = ("buffalo_l", "antelopev2")
INSIGHTFACE_PROVIDERS = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider"}
FACE_CROP_SIZE = 224


def import_insightface() -> Any:
    """insightface, or a clear error: it is optional (not in the pack's requirements)."""
    try:
        return importlib.import_module("insightface.app")
    except ImportError as error:
        raise RuntimeError(
            "Fluxion Face Embeds (insightface) needs the optional insightface package, which is not installed "
            f"({error}). Install it in ComfyUI's Python (pip install insightface onnxruntime) with its model pack in "
            f"{models_root() / 'insightface' / 'models'}, or compute the embedding elsewhere, save it with "
            "numpy.save into the input folder and use Fluxion Load Face Embeds"
        ) from error


class FluxionInsightFaceEmbeds:
    """Face embeddings (and aligned face crops) of images with insightface, when it is installed."""

    DESCRIPTION = (
        "Finds the largest face of each image with insightface (optional: pip install insightface onnxruntime; "
        "model packs in models/insightface/models) and gives its 512-d identity embedding, and the aligned face "
        "crop for FaceID Plus. Without insightface the node says so: use Fluxion Load Face Embeds with an "
        "embedding computed elsewhere."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "embed"
    RETURN_TYPES = (FACE_EMBEDS, "IMAGE")
    RETURN_NAMES = ("face_embeds", "face_crop")
    OUTPUT_TOOLTIPS = (
        "One face embedding per image, for Fluxion Apply IP-Adapter FaceID.",
        "The aligned face crops (224 x 224), for FaceID Plus' image input.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Images with a face each (a batch gives several faces)."}),
                "model_name": (
                    list(INSIGHTFACE_MODELS),
                    {
                        "default": "buffalo_l",
                        "tooltip": "insightface model pack (FaceID was trained on buffalo_l).",
                    },
                ),
                "provider": (
                    list(INSIGHTFACE_PROVIDERS),
                    {"default": "CPU", "tooltip": "onnxruntime provider insightface runs on."},
                ),
            }
        }

    def embed(
        self, image: torch.Tensor, model_name: str, provider: str
    ) -> tuple[FaceEmbeddings, torch.Tensor]:
        if model_name not in INSIGHTFACE_MODELS or provider not in INSIGHTFACE_PROVIDERS:
            raise ValueError(
                f"model_name must be one of {', '.join(INSIGHTFACE_MODELS)} and provider one of "
                f"{', '.join(INSIGHTFACE_PROVIDERS)}, got {model_name!r}, {provider!r}"
            )
        require_finite(image, "the image")
        app_module = import_insightface()
        face_align = importlib.import_module("insightface.utils.face_align")
        analysis = app_module.FaceAnalysis(
            name=model_name,
            root=str(models_root() / "insightface"),
            providers=[INSIGHTFACE_PROVIDERS[provider]],
        )
        analysis.prepare(ctx_id=0, det_size=(640, 640))
        embeddings, crops = [], []
        for index, picture in enumerate(image):
            bgr = (picture[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()[..., ::-1].copy()
            faces = analysis.get(bgr)
            if not faces:
                raise ValueError(
                    f"Fluxion Face Embeds (insightface): no face found in image {index} of the batch"
                )
            face = max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
            embeddings.append(torch.from_numpy(np.asarray(face.normed_embedding, dtype=np.float32)))
            crop = face_align.norm_crop(bgr, landmark=face.kps, image_size=FACE_CROP_SIZE)
            crops.append(torch.from_numpy(np.ascontiguousarray(crop[..., ::-1])).float() / 255)
        return FaceEmbeddings(torch.stack(embeddings)), torch.stack(crops)


def check_faceid(ipadapter: NamedModel) -> IPAdapter:
    """The FaceID adapter of `ipadapter`; another kind is refused, naming the file and the node to use."""
    adapter = ipadapter.model
    if not isinstance(adapter, IPAdapter):
        raise ValueError(
            f"{APPLY_FACEID}: {ipadapter.name} is not an IP-Adapter (connect Fluxion Load IP-Adapter)"
        )
    if not adapter.is_faceid:
        raise ValueError(
            f"{APPLY_FACEID}: IP-Adapter {ipadapter.name} is a {adapter.kind_name} IP-Adapter, it reads reference "
            "images, not face embeddings: use Fluxion Apply IP-Adapter with it, or load an IP-Adapter FaceID "
            "file (ip-adapter-faceid_sd15.bin, ip-adapter-faceid-plusv2_sd15.bin, ...)"
        )
    return adapter


def _face_crops(
    ipadapter: NamedModel,
    adapter: IPAdapter,
    clip_vision: NamedModel | None,
    image: torch.Tensor | None,
    embeds: ImageEmbeddings | None,
) -> ImageEmbeddings:
    """FaceID Plus' CLIP hidden states of the face crop(s): encoded now (image, clip_vision) or before (embeds)."""
    if embeds is not None:
        if image is not None:
            raise ValueError(
                f"{APPLY_FACEID} got both image and embeds for the face crop: connect one of them (embeds already "
                "hold the encoded crop)"
            )
        width = int(embeds.positive.shape[-1])
        if embeds.kind != PENULTIMATE or width != adapter.clip_hidden_dim:
            raise ValueError(
                f"{APPLY_FACEID}: IP-Adapter {ipadapter.name} ({adapter.kind_name}) reads {adapter.clip_hidden_dim}-d "
                f"penultimate hidden states of the face crop; the embeds hold {width}-d {embeds.kind}: encode the "
                "crop with Fluxion Encode IP-Adapter Embeds and this FaceID Plus file"
            )
        require_finite(embeds.positive, "the embeds")
        require_finite(embeds.negative, "the negative embeds")
        return embeds
    if image is None or clip_vision is None:
        raise ValueError(
            f"{APPLY_FACEID}: IP-Adapter {ipadapter.name} is a {adapter.kind_name}: it also reads the face crop, "
            "connect image (the face crop) and clip_vision (the ViT-H image encoder), or embeds of the crop"
        )
    return encode_reference_images(ipadapter, clip_vision, image)


class FluxionApplyIPAdapterFaceID:
    """Prompt with a face: IP-Adapter FaceID's tokens of an insightface embedding join the text."""

    DESCRIPTION = (
        "Adds an IP-Adapter FaceID (FaceID, FaceID Plus, FaceID Plus v2; SD1.5 or SDXL) to the model's stack: "
        "the face embeddings (Fluxion Load Face Embeds) steer the identity with `weight`. FaceID Plus also "
        "reads the face crop (image, with clip_vision); v2's weight_faceidv2 weights its face shortcut. The LoRA "
        "of the FaceID release goes in lora_name (or chain Fluxion Load LoRA before this node). start/end, "
        "mask and weight_type act as on Fluxion Apply IP-Adapter."
    )
    CATEGORY = "fluxion/image prompt"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the FaceID IP-Adapter (and its LoRA) in its stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        scale = {"min": -1.0, "max": 5.0, "step": 0.05}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to add the FaceID IP-Adapter to."}),
                "ipadapter": (
                    IP_ADAPTER,
                    {
                        "tooltip": "An IP-Adapter FaceID file from Fluxion Load IP-Adapter (ip-adapter-faceid*)."
                    },
                ),
                "face_embeds": (FACE_EMBEDS, {"tooltip": "From Fluxion Load Face Embeds."}),
                "weight": (
                    "FLOAT",
                    dict(scale, default=1.0, tooltip="Scale of the face attention (0 = off)."),
                ),
                "weight_faceidv2": (
                    "FLOAT",
                    dict(
                        scale,
                        default=1.0,
                        tooltip="FaceID Plus v2 only: weight of the CLIP (face crop) tokens added to the face "
                        "tokens (the v2 shortcut; ComfyUI_IPAdapter_plus' weight_faceidv2). Ignored by FaceID "
                        "and Plus v1.",
                    ),
                ),
                "weight_type": (
                    list(WEIGHT_TYPES),
                    {
                        "default": "linear",
                        "tooltip": "How the weight spreads over the UNet's attention blocks, as on Fluxion "
                        "Apply IP-Adapter (linear: the same everywhere).",
                    },
                ),
                "combine": (
                    ["concat", "average"],
                    {"default": "concat", "tooltip": "How several face embeddings combine."},
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
                        "tooltip": "FaceID Plus: the image encoder it was trained with (ViT-H), to encode image."
                    },
                ),
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "FaceID Plus: the aligned face crop(s) (one, or one per face embedding; "
                        "Fluxion Face Embeds (insightface) gives them); not used by FaceID."
                    },
                ),
                "lora_name": (
                    [NO_LORA, *list_model_files("loras")],
                    {
                        "default": NO_LORA,
                        "tooltip": "The LoRA of this FaceID release (ip-adapter-faceid*_lora.safetensors in "
                        "models/loras), added to the model's UNet before the adapter. None: no LoRA (or "
                        "chain Fluxion Load LoRA before this node).",
                    },
                ),
                "lora_strength": (
                    "FLOAT",
                    {
                        "default": 0.6,
                        "min": -2.0,
                        "max": 2.0,
                        "step": 0.05,
                        "tooltip": "Strength of lora_name on the UNet (ComfyUI_IPAdapter_plus suggests about 0.6).",
                    },
                ),
                "face_weights": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional weight per face embedding, e.g. '1, 0.5' (empty: all 1).",
                    },
                ),
                "mask": (
                    "MASK",
                    {"tooltip": "Apply the face prompt only where the mask is white."},
                ),
                "outside_mask": (
                    ["blend", "keep"],
                    {
                        "default": "blend",
                        "tooltip": "With a mask, as on Fluxion Apply IP-Adapter. blend: the outside predicts "
                        "as without the adapter each step; keep: the outside ends exactly as without it (one more "
                        "UNet pass per step).",
                    },
                ),
                "weight_composition": (
                    "FLOAT",
                    dict(
                        scale,
                        default=1.0,
                        tooltip="With weight_type 'style and composition': the composition block(s)' weight.",
                    ),
                ),
                "layer_weights": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional weight per attention block, as on Fluxion Apply IP-Adapter "
                        "('block:weight' pairs or one weight per block; replaces weight_type).",
                    },
                ),
                "embeds": (
                    IMAGE_EMBEDS_TYPE,
                    {
                        "tooltip": "FaceID Plus: the face crop(s) encoded beforehand (Fluxion Encode / Load "
                        "IP-Adapter Embeds with this FaceID Plus file), instead of image and clip_vision."
                    },
                ),
            },
        }

    def apply(
        self,
        model: ModelWire,
        ipadapter: NamedModel,
        face_embeds: FaceEmbeddings,
        weight: float = 1.0,
        weight_faceidv2: float = 1.0,
        weight_type: str = "linear",
        combine: str = "concat",
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        clip_vision: NamedModel | None = None,
        image: torch.Tensor | None = None,
        lora_name: str = NO_LORA,
        lora_strength: float = 0.6,
        face_weights: str = "",
        mask: torch.Tensor | None = None,
        outside_mask: str = "blend",
        weight_composition: float = 1.0,
        layer_weights: str = "",
        embeds: ImageEmbeddings | None = None,
    ) -> tuple[ModelWire]:
        adapter = check_faceid(ipadapter)
        if outside_mask not in ("blend", "keep"):
            raise ValueError(f"outside_mask must be blend or keep, got {outside_mask!r}")
        if not isinstance(face_embeds, FaceEmbeddings):
            raise ValueError(f"{APPLY_FACEID}: face_embeds must come from Fluxion Load Face Embeds")
        check_block_weights(model, weight, weight_type, weight_composition, layer_weights, node=APPLY_FACEID)
        check_model(model, ipadapter)
        if mask is not None:
            require_finite(mask, "the mask")
        require_finite(face_embeds.face, "the face embeddings")
        count = int(face_embeds.face.shape[0])
        weights = parse_weights(face_weights, count, name="face_weights", items="face embedding(s)")
        embeddings = FaceEmbeddings(face_embeds.face)
        if adapter.kind == "faceid_plus":
            crops = _face_crops(ipadapter, adapter, clip_vision, image, embeds)
            if crops.positive.shape[0] not in (1, count):
                raise ValueError(
                    f"{APPLY_FACEID}: {crops.positive.shape[0]} face crops for {count} face embeddings: give one "
                    "crop, or one per face embedding"
                )
            embeddings = FaceEmbeddings(face_embeds.face, crops)
        elif image is not None or embeds is not None:
            raise ValueError(
                f"{APPLY_FACEID}: IP-Adapter {ipadapter.name} is a FaceID (not Plus): it reads the face "
                "embeddings only; disconnect image / embeds, or load a FaceID Plus file"
            )
        lora = None
        if lora_name != NO_LORA and lora_strength != 0.0:
            lora_file, _report = read_lora(model, lora_name)  # checked before the model gets anything
            lora = LoraPatch(lora_name, lora_file, for_text=False, strength=lora_strength, fuse=True)
        load_models([adapter.weights], role="adapter")  # its projection makes the tokens now
        with torch.no_grad():
            patch = IPAdapterPatch(
                adapter,
                embeddings,
                scale=weight,
                weights=weights,
                combine=combine,
                start=start_percent,
                end=end_percent,
                mask=mask,
                keep_outside=outside_mask == "keep",
                weight_type=weight_type,
                weight_composition=weight_composition,
                layer_weights=layer_weights,
                faceid_v2=weight_faceidv2,
            )
        if lora is not None:
            model = model.with_patch(lora)
        return (model.with_patch(patch),)


NODE_CLASS_MAPPINGS = {
    "FluxionLoadFaceEmbeds": FluxionLoadFaceEmbeds,
    "FluxionInsightFaceEmbeds": FluxionInsightFaceEmbeds,
    "FluxionApplyIPAdapterFaceID": FluxionApplyIPAdapterFaceID,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionLoadFaceEmbeds": "Fluxion Load Face Embeds",
    "FluxionInsightFaceEmbeds": "Fluxion Face Embeds (insightface)",
    "FluxionApplyIPAdapterFaceID": APPLY_FACEID,
}
