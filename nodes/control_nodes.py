"""ControlNet, Control-LoRA, T2I-Adapter: load one, wire it onto a model with a hint image; a Canny preprocessor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..foundationals.formats.controlnet import is_control_lora
from ..foundationals.latent_diffusion.adapters.controlnet import (
    CONTROL_MODES,
    ControlLora,
    ControlLoraPatch,
    ControlMismatchError,
    ControlNet,
    ControlNetPatch,
    UnionControlNet,
    UnionControlNetPatch,
    UnionHint,
    load_control_lora,
    load_controlnet,
)
from ..foundationals.latent_diffusion.adapters.t2i_adapter import (
    T2IAdapter,
    T2IAdapterPatch,
    load_t2i_adapter,
)
from ..foundationals.latent_diffusion.canny import canny
from ..foundationals.latent_diffusion.model_patch import ModelPatch
from ..foundationals.model_files import read_header
from .host import list_model_files, manage, model_file_path, model_placement
from .latent_nodes import require_finite
from .wires import MODEL, MODEL_FILES, ModelWire

CONTROL = "FLUXION_CONTROL"


@dataclass(frozen=True)
class LoadedControl:
    """A ControlNet, a Control-LoRA or a T2I-Adapter, and the file it came from."""

    name: str
    model: ControlNet | T2IAdapter | ControlLora
    control_type: int | None = None
    """A union ControlNet's control type for its hints (Fluxion Set Union ControlNet Type); None: auto."""

    @property
    def kind(self) -> str:
        if isinstance(self.model, UnionControlNet):
            return "ControlNet Union"
        if isinstance(self.model, ControlLora):
            return "Control-LoRA"
        return "T2I-Adapter" if isinstance(self.model, T2IAdapter) else "ControlNet"


def _load_control_file(path: Path) -> ControlNet | T2IAdapter | ControlLora:
    target = path
    if path.is_dir():
        target = next((p for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".bin")), path)
    keys = read_header(target, what="ControlNet or T2I-Adapter")
    is_t2i = any(k.startswith(("body.", "adapter.body.")) for k in keys)
    role = "adapter" if is_t2i else "controlnet"
    placement = model_placement(role)  # read straight into the UNet's dtype, on the offload device
    # A Control-LoRA's ControlNet is made from the UNet of the model it is applied to, when a run starts.
    load = load_t2i_adapter if is_t2i else load_control_lora if is_control_lora(keys) else load_controlnet
    model = load(path, device=placement.offload_device, dtype=placement.dtype)
    manage(model, role, placement, path.name)
    return model


def load_control(path: Path) -> ControlNet | T2IAdapter | ControlLora:
    """A ControlNet, Control-LoRA or T2I-Adapter file (the kind is read from its keys), cached until the file
    changes."""
    return MODEL_FILES.get("control", path, _load_control_file)


class FluxionControlLoader:
    """Load a ControlNet (lllyasviel or diffusers) or a T2I-Adapter (TencentARC or diffusers)."""

    DESCRIPTION = (
        "Loads a ControlNet (1.0/1.1 single files with or without control_model., diffusers files), a "
        "Control-LoRA (Stability's SDXL control-lora files: its ControlNet is made from the model's UNet when "
        "sampling starts) or a T2I-Adapter (full, light, SDXL) from models/controlnet; the kind and architecture "
        "are read from the file."
    )
    CATEGORY = "fluxion/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (CONTROL,)
    RETURN_NAMES = ("control",)
    OUTPUT_TOOLTIPS = ("The ControlNet, Control-LoRA or T2I-Adapter, for Fluxion Apply Control.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "control_name": (
                    list_model_files("controlnet"),
                    {
                        "tooltip": "ControlNet, Control-LoRA or T2I-Adapter file in models/controlnet (or "
                        "models/t2i_adapter)."
                    },
                )
            }
        }

    def load(self, control_name: str) -> tuple[LoadedControl]:
        return (LoadedControl(control_name, load_control(model_file_path("controlnet", control_name))),)


class FluxionApplyControl:
    """Wire a ControlNet or T2I-Adapter onto a model, with its hint image, strength, window and mask."""

    DESCRIPTION = (
        "Adds a control to the model's adapter stack: the hint image (e.g. from Fluxion Canny) is resized to the "
        "generation size; strength scales the control; start/end limit it to a fraction of the steps; a mask "
        "limits it to a region (ControlNet). Stack as many as you like, ControlNets, Control-LoRAs and T2I-Adapters "
        "mixed (a Control-LoRA is a ControlNet made from this model's UNet, LoRAs before it included)."
    )
    CATEGORY = "fluxion/control"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the control in its stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to control."}),
                "control": (CONTROL, {"tooltip": "From Fluxion Load ControlNet / T2I-Adapter."}),
                "image": ("IMAGE", {"tooltip": "The hint image (edges, depth, pose, ...)."}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "How strongly the control steers the image.",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    dict(
                        fraction, default=0.0, tooltip="Fraction of the steps after which the control starts."
                    ),
                ),
                "end_percent": (
                    "FLOAT",
                    dict(
                        fraction, default=1.0, tooltip="Fraction of the steps after which the control stops."
                    ),
                ),
                "mode": (
                    list(CONTROL_MODES),
                    {
                        "default": "balanced",
                        "tooltip": "ControlNet only: balanced; prompt (prompt more important); controlnet (ControlNet more important); guess (diffusers' guess mode).",
                    },
                ),
            },
            "optional": {
                "mask": (
                    "MASK",
                    {"tooltip": "ControlNet only: apply the control only where the mask is white."},
                )
            },
        }

    def apply(
        self,
        model: ModelWire,
        control: LoadedControl,
        image: torch.Tensor,
        strength: float,
        start_percent: float,
        end_percent: float,
        mode: str,
        mask: torch.Tensor | None = None,
    ) -> tuple[ModelWire]:
        patch: ModelPatch
        name = f"{control.kind} {control.name}"
        require_finite(image, "the hint image")
        if mask is not None:
            require_finite(mask, "the mask")
        if isinstance(control.model, T2IAdapter):
            if mask is not None or mode != "balanced":
                raise ValueError("masks and control modes apply to ControlNets; this is a T2I-Adapter")
            patch = T2IAdapterPatch(control.model, image, strength, start_percent, end_percent, name=name)
        elif isinstance(control.model, UnionControlNet):  # one hint, its type from Set Union ControlNet Type
            hint = UnionHint(image, control.control_type)
            patch = UnionControlNetPatch(
                control.model, [hint], strength, start_percent, end_percent, mask, mode, name=name
            )
        elif isinstance(control.model, ControlLora):
            patch = ControlLoraPatch(
                control.model, image, strength, start_percent, end_percent, mask, mode, name=name
            )
        else:
            patch = ControlNetPatch(
                control.model, image, strength, start_percent, end_percent, mask, mode, name=name
            )
        try:  # checks that it fits this model now, before any sampling
            patch.apply(model.model, None)()
        except ControlMismatchError as error:
            raise ControlMismatchError(f"{name} does not fit the model {model.name}: {error}") from error
        return (model.with_patch(patch),)


class FluxionCanny:
    """Canny edges of an image, in pure torch: a hint for edge ControlNets and T2I-Adapters."""

    DESCRIPTION = (
        "Finds edges (Canny: blur, Sobel, thin, double threshold, hysteresis); white edges on black."
    )
    CATEGORY = "fluxion/control"
    FUNCTION = "detect"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("edges",)
    OUTPUT_TOOLTIPS = ("The edge map, for Fluxion Apply Control.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        threshold = {"min": 0.01, "max": 0.99, "step": 0.01}
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Image to find edges in."}),
                "low_threshold": (
                    "FLOAT",
                    dict(threshold, default=0.4, tooltip="Weak-edge threshold (as ComfyUI's Canny)."),
                ),
                "high_threshold": ("FLOAT", dict(threshold, default=0.8, tooltip="Strong-edge threshold.")),
            }
        }

    def detect(self, image: torch.Tensor, low_threshold: float, high_threshold: float) -> tuple[Any]:
        require_finite(image, "the image")
        return (canny(image, low_threshold, high_threshold),)


NODE_CLASS_MAPPINGS = {
    "FluxionControlLoader": FluxionControlLoader,
    "FluxionApplyControl": FluxionApplyControl,
    "FluxionCanny": FluxionCanny,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionControlLoader": "Fluxion Load ControlNet / T2I-Adapter",
    "FluxionApplyControl": "Fluxion Apply Control",
    "FluxionCanny": "Fluxion Canny",
}
