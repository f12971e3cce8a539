"""LoRA training on Stable Diffusion models: image-folder datasets, the trainer, TOML configs."""

from .config import (
    CheckpointOptions,
    ConfigError,
    DatasetOptions,
    LoraOptions,
    LoraTrainingConfig,
    ModelOptions,
    OutputOptions,
    SamplingOptions,
    TrainingOptions,
    load_config,
    parse_config,
)
from .dataset import DatasetError, TrainingExample, examples_from_tensor, load_image_folder
from .lora_trainer import LoraTrainer, TrainingError, TrainingProgress, kohya_names, train_lora

__all__ = [
    "CheckpointOptions",
    "ConfigError",
    "DatasetError",
    "DatasetOptions",
    "LoraOptions",
    "LoraTrainer",
    "LoraTrainingConfig",
    "ModelOptions",
    "OutputOptions",
    "SamplingOptions",
    "TrainingError",
    "TrainingExample",
    "TrainingOptions",
    "TrainingProgress",
    "examples_from_tensor",
    "kohya_names",
    "load_config",
    "load_image_folder",
    "parse_config",
    "train_lora",
]
