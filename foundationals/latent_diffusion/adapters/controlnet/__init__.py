"""ControlNet: the model and its adapter (`model`), Control-LoRA (`control_lora`), reading their files (`loading`)."""

from .control_lora import ControlLora, ControlLoraPatch, base_tensors
from .loading import load_control_lora, load_controlnet
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
    "ZeroConvolution",
    "base_tensors",
    "check_controlnet_fits",
    "is_step_active",
    "load_control_lora",
    "load_controlnet",
]
