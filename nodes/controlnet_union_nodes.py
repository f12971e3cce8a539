"""ControlNet Union / ProMax: the control type of a union ControlNet's hints (as core's SetUnionControlNetType), and
several hints fused in one pass of the ControlNet (diffusers' multi-condition union call)."""

from __future__ import annotations

import dataclasses

import torch

from ..foundationals.latent_diffusion.adapters.controlnet import (
    CONTROL_MODES,
    UNION_CONTROL_TYPES,
    ControlMismatchError,
    UnionControlNet,
    UnionControlNetPatch,
    UnionHint,
    control_type_index,
)
from .control_nodes import CONTROL, LoadedControl
from .latent_nodes import require_finite
from .wires import MODEL, ModelWire

TYPE_CHOICES = ["auto", *UNION_CONTROL_TYPES]
"""Core's SetUnionControlNetType list: auto, then the types in the order of their indices."""


def require_union(control: LoadedControl, node: str) -> UnionControlNet:
    """The union ControlNet of `control`, or a ValueError naming the file and what it is."""
    if not isinstance(control.model, UnionControlNet):
        raise ValueError(
            f"{node} needs a ControlNet Union / ProMax (a diffusers file with control_add_embedding.* and "
            f"task_embedding, e.g. xinsir's diffusion_pytorch_model_promax.safetensors); {control.name} is a "
            f"{control.kind} without control types"
        )
    return control.model


def union_type(control: LoadedControl, model: UnionControlNet, name: str) -> int | None:
    """The index of control type `name` (None: auto), checked against the types the file knows."""
    index = control_type_index(name)
    try:
        model.check_types([index])
    except ValueError as error:
        raise ValueError(f"{control.name}: {error}") from error
    return index


class FluxionSetUnionControlNetType:
    """Choose the control type a union ControlNet gives its hint (ComfyUI's SetUnionControlNetType)."""

    DESCRIPTION = (
        "Sets which kind of hint a ControlNet Union / ProMax reads (openpose, depth, canny, ...), as ComfyUI's "
        "SetUnionControlNetType: every Fluxion Apply Control with the returned control uses that type. auto: no "
        "type (the plain hint path). tile and repaint need the ProMax file. Apply the same union ControlNet "
        "several times with different types to combine hints, as in ComfyUI."
    )
    CATEGORY = "fluxion/control"
    FUNCTION = "set_type"
    RETURN_TYPES = (CONTROL,)
    RETURN_NAMES = ("control",)
    OUTPUT_TOOLTIPS = ("The union ControlNet with its control type, for Fluxion Apply Control.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "control": (
                    CONTROL,
                    {"tooltip": "A ControlNet Union / ProMax from Fluxion Load ControlNet."},
                ),
                "type": (
                    TYPE_CHOICES,
                    {"default": "auto", "tooltip": "The kind of hint image (core's union control types)."},
                ),
            }
        }

    def set_type(self, control: LoadedControl, type: str) -> tuple[LoadedControl]:
        model = require_union(control, "Fluxion Set Union ControlNet Type")
        return (dataclasses.replace(control, control_type=union_type(control, model, type)),)


class FluxionApplyUnionControlNet:
    """Up to three hints, each with its control type and weight, fused in one pass of a union ControlNet."""

    DESCRIPTION = (
        "Adds a ControlNet Union / ProMax with several hints to the model's stack, fused by its union transformer "
        "in one pass (diffusers' multi-condition call): each hint has its control type and a weight that scales "
        "its part; strength scales the whole control. One hint alone is the same as Fluxion Set Union ControlNet "
        "Type + Fluxion Apply Control."
    )
    CATEGORY = "fluxion/control"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the union control in its stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        weight = {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}
        types = list(UNION_CONTROL_TYPES)
        canny = UNION_CONTROL_TYPES[3]
        optional: dict = {}
        for number in (2, 3):
            optional[f"image_{number}"] = ("IMAGE", {"tooltip": f"Hint {number} (optional)."})
            optional[f"type_{number}"] = (types, {"default": canny, "tooltip": f"The kind of hint {number}."})
            optional[f"weight_{number}"] = (
                "FLOAT",
                dict(weight, tooltip=f"How strongly hint {number} counts."),
            )
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The SDXL model to control."}),
                "control": (
                    CONTROL,
                    {"tooltip": "A ControlNet Union / ProMax from Fluxion Load ControlNet."},
                ),
                "image_1": ("IMAGE", {"tooltip": "The first hint image (edges, depth, pose, ...)."}),
                "type_1": (types, {"default": canny, "tooltip": "The kind of the first hint."}),
                "weight_1": ("FLOAT", dict(weight, tooltip="How strongly the first hint counts.")),
                "strength": (
                    "FLOAT",
                    dict(weight, tooltip="How strongly the whole control steers the image."),
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
                        "tooltip": "balanced; prompt (prompt more important); controlnet (ControlNet more important); guess (diffusers' guess mode).",
                    },
                ),
            },
            "optional": {
                **optional,
                "mask": ("MASK", {"tooltip": "Apply the control only where the mask is white."}),
            },
        }

    def apply(
        self,
        model: ModelWire,
        control: LoadedControl,
        image_1: torch.Tensor,
        type_1: str,
        weight_1: float,
        strength: float,
        start_percent: float,
        end_percent: float,
        mode: str,
        image_2: torch.Tensor | None = None,
        type_2: str = UNION_CONTROL_TYPES[3],
        weight_2: float = 1.0,
        image_3: torch.Tensor | None = None,
        type_3: str = UNION_CONTROL_TYPES[3],
        weight_3: float = 1.0,
        mask: torch.Tensor | None = None,
    ) -> tuple[ModelWire]:
        union = require_union(control, "Fluxion Apply Union ControlNet")
        hints: list[UnionHint] = []
        for number, image, name, weight in (
            (1, image_1, type_1, weight_1),
            (2, image_2, type_2, weight_2),
            (3, image_3, type_3, weight_3),
        ):
            if image is not None:
                require_finite(image, f"hint image {number}")
                hints.append(UnionHint(image, union_type(control, union, name), weight))
        if mask is not None:
            require_finite(mask, "the mask")
        if len(hints) == 1:  # one hint: its weight is a strength, as diffusers' single-hint call
            hints = [UnionHint(hints[0].image, hints[0].control_type)]
            strength *= weight_1
        name = f"{control.kind} {control.name}"
        patch = UnionControlNetPatch(
            union, hints, strength, start_percent, end_percent, mask, mode, name=name
        )
        try:  # checks that it fits this model now, before any sampling
            patch.apply(model.model, None)()
        except ControlMismatchError as error:
            raise ControlMismatchError(f"{name} does not fit the model {model.name}: {error}") from error
        return (model.with_patch(patch),)


NODE_CLASS_MAPPINGS = {
    "FluxionSetUnionControlNetType": FluxionSetUnionControlNetType,
    "FluxionApplyUnionControlNet": FluxionApplyUnionControlNet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionSetUnionControlNetType": "Fluxion Set Union ControlNet Type",
    "FluxionApplyUnionControlNet": "Fluxion Apply Union ControlNet",
}
