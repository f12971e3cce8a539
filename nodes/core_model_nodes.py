"""Bridges to ComfyUI's own model types: a Fluxion model as a core MODEL, core models adopted as Fluxion wires.

Both need ComfyUI (they make or read `comfy.model_patcher.ModelPatcher`s): the ComfyUI glue lives in
`comfy_models`, imported here only inside the node functions, once `host.is_hosted()` says ComfyUI is the
host. Headless, the nodes refuse with a clear error.
"""

from __future__ import annotations

from typing import Any

from ..foundationals.latent_diffusion.tiling import TiledDiffusionPatch
from .host import is_hosted
from .wires import CLIP, MODEL, VAE, ClipWire, ModelWire, VaeWire

CORE_MODEL, CORE_CLIP, CORE_VAE = "MODEL", "CLIP", "VAE"


def _require_comfyui(node: str) -> None:
    if not is_hosted():
        raise RuntimeError(
            f"{node} makes or reads ComfyUI's own model types: it runs inside ComfyUI only (not headless)"
        )


class FluxionToCoreModel:
    """A Fluxion model (with its adapter stack) as a core MODEL for KSampler and other packs' samplers."""

    DESCRIPTION = (
        "Turns a Fluxion model and its adapter stack (LoRA, ControlNet, T2I, IP-Adapter, reference-only, "
        "regional, context values) into a core MODEL: KSampler, SamplerCustomAdvanced and other packs' samplers "
        "run it. The stack is applied for each sampling run and undone after it. The weights are shared, not "
        "copied. Core ControlNets (Apply ControlNet) act on it too; core T2I-Adapters and core LoRAs do not "
        "(use the Fluxion nodes before this one)."
    )
    CATEGORY = "fluxion/core"
    FUNCTION = "convert"
    RETURN_TYPES = (CORE_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The core MODEL over the Fluxion UNet; its adapters act while a core sampler runs.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": (MODEL, {"tooltip": "The Fluxion model and its adapter stack."})}}

    def convert(self, model: ModelWire) -> tuple[Any]:
        tiled = [patch.label for patch in model.patches if isinstance(patch, TiledDiffusionPatch)]
        if tiled:  # before the host check: the refusal reads the same headless
            raise ValueError(
                f"the model {model.name} samples in tiles ({tiled[0]}), which core samplers do not run: sample it "
                "with Fluxion Sampler or Fluxion Hires Fix, or put Fluxion Tiled Diffusion out of this branch"
            )
        _require_comfyui("Fluxion To Core Model")
        from .comfy_models import core_model

        return (core_model(model),)


class FluxionAdoptCoreModel:
    """Core MODEL / CLIP / VAE (from Load Checkpoint) as Fluxion wires over the same tensors."""

    DESCRIPTION = (
        "Gives Fluxion model, clip and vae wires over the weights of core models (e.g. from core Load "
        "Checkpoint): the same tensors, no copy and no second load, so Fluxion adapters and the Fluxion sampler "
        "can work on a core-loaded checkpoint (SD1.5 or SDXL). Core patches on the inputs (core LoRAs) are not "
        "carried over: wire Fluxion LoRAs after this node."
    )
    CATEGORY = "fluxion/core"
    FUNCTION = "adopt"
    RETURN_TYPES = (MODEL, CLIP, VAE)
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = (
        "The Fluxion model over the core UNet's weights.",
        "The Fluxion text encoder(s) over the core CLIP's weights.",
        "The Fluxion autoencoder over the core VAE's weights.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (
                    CORE_MODEL,
                    {"tooltip": "A core MODEL (SD1.5 or SDXL UNet), e.g. from Load Checkpoint."},
                ),
                "clip": (CORE_CLIP, {"tooltip": "The core CLIP of the same checkpoint."}),
                "vae": (CORE_VAE, {"tooltip": "The core VAE of the same checkpoint."}),
            }
        }

    def adopt(self, model: Any, clip: Any, vae: Any) -> tuple[ModelWire, ClipWire, VaeWire]:
        _require_comfyui("Fluxion Adopt Core Model")
        from .comfy_models import adopt_core_models, adopted_patches

        sd, name = adopt_core_models(model, clip, vae)
        model_patches, clip_patches = adopted_patches(model, clip)
        return ModelWire(sd, name, model_patches), ClipWire(sd, name, clip_patches), VaeWire(sd, name)


NODE_CLASS_MAPPINGS = {
    "FluxionToCoreModel": FluxionToCoreModel,
    "FluxionAdoptCoreModel": FluxionAdoptCoreModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionToCoreModel": "Fluxion To Core Model",
    "FluxionAdoptCoreModel": "Fluxion Adopt Core Model",
}
