"""ControlNet: the model and its adapter (`model`), ControlNet Union / ProMax (`union`), reading files (`loading`)."""

from .loading import load_controlnet, union_controlnet_tensors
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
    "check_controlnet_fits",
    "control_type_index",
    "is_step_active",
    "load_controlnet",
    "union_controlnet_tensors",
]
