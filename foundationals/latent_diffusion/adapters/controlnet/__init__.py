"""ControlNet: the model and its adapter (`model`), ControlNet Union / ProMax (`union`), Control-LoRA
(`control_lora`), reading their files (`loading`)."""

from .control_lora import ControlLora, ControlLoraPatch, base_tensors
from .loading import load_control_lora, load_controlnet, union_controlnet_tensors
from .model import (
    CONTROL_MODES,
    ConditionEncoder,
    ControlMismatchError,
    ControlNet,
    ControlNetAdapter,
    ControlNetBranch,
    ControlNetConfig,
    ControlNetPatch,
    ControlOutputs,
    HintEmbedding,
    ZeroConvolution,
    check_controlnet_fits,
    is_step_active,
)
from .union import (
    UNION_CONTROL_TYPES,
    UnionControlNet,
    UnionControlNetBranch,
    UnionControlNetConfig,
    UnionControlNetPatch,
    UnionHint,
    control_type_index,
)

__all__ = [
    "CONTROL_MODES",
    "UNION_CONTROL_TYPES",
    "ConditionEncoder",
    "ControlLora",
    "ControlLoraPatch",
    "ControlMismatchError",
    "ControlNet",
    "ControlNetAdapter",
    "ControlNetBranch",
    "ControlNetConfig",
    "ControlNetPatch",
    "ControlOutputs",
    "HintEmbedding",
    "UnionControlNet",
    "UnionControlNetBranch",
    "UnionControlNetConfig",
    "UnionControlNetPatch",
    "UnionHint",
    "ZeroConvolution",
    "base_tensors",
    "check_controlnet_fits",
    "control_type_index",
    "is_step_active",
    "load_control_lora",
    "load_controlnet",
    "union_controlnet_tensors",
]
