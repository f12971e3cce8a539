"""LoRA on the SD models: the layer kinds (`model`), reading files onto our modules (`loading`), the stack (`manager`)."""

from .loading import load_lora_state_dict, lora_namespace, text_encoder_lora_module_map, unet_lora_module_map
from .manager import LoraLoadReport, LoraMismatchError, SDLoraManager, model_family
from .model import LORA_SCHEDULE_CONTEXT, DeltaLora, DoraLora, TuckerConv2dLora, set_lora_progress

__all__ = [
    "LORA_SCHEDULE_CONTEXT",
    "DeltaLora",
    "DoraLora",
    "LoraLoadReport",
    "LoraMismatchError",
    "SDLoraManager",
    "TuckerConv2dLora",
    "load_lora_state_dict",
    "lora_namespace",
    "model_family",
    "set_lora_progress",
    "text_encoder_lora_module_map",
    "unet_lora_module_map",
]
