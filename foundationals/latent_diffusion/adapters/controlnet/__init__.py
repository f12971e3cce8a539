"""ControlNet: the model and its adapter (`model`), and reading its files (`loading`)."""

from .loading import load_controlnet
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

__all__ = [
    "CONTROL_MODES",
    "ConditionEncoder",
    "ControlMismatchError",
    "ControlNet",
    "ControlNetAdapter",
    "ControlNetBranch",
    "ControlNetConfig",
    "ControlNetPatch",
    "ControlOutputs",
    "HintEmbedding",
    "ZeroConvolution",
    "check_controlnet_fits",
    "is_step_active",
    "load_controlnet",
]
