"""The Adapter API and the LoRA family."""

from .adapter import Adapter
from .lora import Conv2dLora, LinearLora, Lora, LoraAdapter, SingleLoraAdapter

__all__ = ["Adapter", "Conv2dLora", "LinearLora", "Lora", "LoraAdapter", "SingleLoraAdapter"]
