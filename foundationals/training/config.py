"""LoRA training settings: one dataclass per TOML section, read strictly (unknown keys and bad values are errors).

A config file has the sections `[model]`, `[lora]`, `[dataset]`, `[training]`, `[checkpointing]`,
`[sampling]` and `[output]`; every key has a default except `model.checkpoint`, `dataset.folder` and
`output.file`. Relative paths are resolved against the config file's folder; given the models folders, a bare
file name (no folder part) for `model.checkpoint` or `output.file` names a file in checkpoints/ or loras/.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
SAVE_DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the section and key."""


@dataclass
class ModelOptions:
    """`[model]`: the checkpoint to train on (single file or diffusers folder)."""

    checkpoint: str = ""
    prediction_type: str = "auto"  # auto: epsilon (v_prediction for v-models must be said here)
    device: str = "auto"  # auto: CUDA when available, else CPU


@dataclass
class LoraOptions:
    """`[lora]`: rank, alpha and the layers that get a LoRA (module names, matched at the end of paths)."""

    rank: int = 16
    alpha: float = 16.0
    unet_targets: list[str] = field(default_factory=lambda: list(UNET_ATTENTION_TARGETS))
    text_encoder: bool = False
    text_encoder_targets: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_ATTENTION_TARGETS))


@dataclass
class DatasetOptions:
    """`[dataset]`: a folder of images with same-named caption files, resized into aspect-ratio buckets."""

    folder: str = ""
    resolution: int = 512
    buckets: bool = True
    bucket_step: int = 64
    max_aspect_ratio: float = 2.0
    caption_extension: str = ".txt"
    caption_prefix: str = ""  # e.g. a trigger phrase, put before every caption


@dataclass
class TrainingOptions:
    """`[training]`: optimizer steps, batch, AdamW, accumulation, precision, seed."""

    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 1e-4
    text_encoder_learning_rate: float = 5e-5
    weight_decay: float = 1e-2
    gradient_accumulation: int = 1
    seed: int = 0
    mixed_precision: str = "no"  # bf16/fp16 autocast, CUDA only
    gradient_checkpointing: bool = False  # CUDA only


@dataclass
class CheckpointOptions:
    """`[checkpointing]`: save LoRA + optimizer + RNG states every N steps; resume from one."""

    every: int = 0  # 0: never
    save_folder: str = "checkpoints"
    resume: str = ""  # a checkpoint file to continue from


@dataclass
class SamplingOptions:
    """`[sampling]`: images drawn with the LoRA every N steps, to watch training."""

    every: int = 0  # 0: never
    prompts: list[str] = field(default_factory=list)
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    folder: str = "samples"


@dataclass
class OutputOptions:
    """`[output]`: the kohya-format LoRA file written at the end."""

    file: str = ""
    save_dtype: str = "float16"


@dataclass
class LoraTrainingConfig:
    """A whole training run, as read from a TOML file."""

    model: ModelOptions = field(default_factory=ModelOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    checkpointing: CheckpointOptions = field(default_factory=CheckpointOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    output: OutputOptions = field(default_factory=OutputOptions)


_SECTION_TYPES: dict[str, type] = {
    "model": ModelOptions,
    "lora": LoraOptions,
    "dataset": DatasetOptions,
    "training": TrainingOptions,
    "checkpointing": CheckpointOptions,
    "sampling": SamplingOptions,
    "output": OutputOptions,
}


def _check_value(section: str, key: str, value: Any, annotation: Any) -> Any:
    where = f"[{section}] {key}"
    origin = typing.get_origin(annotation)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return list(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {annotation!r}")  # pragma: no cover


def _section(name: str, values: Any) -> Any:
    cls = _SECTION_TYPES[name]
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{name}] must be a table of keys, got {values!r}")
    hints = typing.get_type_hints(cls, vars(sys.modules[__name__]))
    allowed = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"[{name}] has unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        checked[key] = _check_value(name, key, value, hints[key])
    return cls(**checked)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: LoraTrainingConfig) -> LoraTrainingConfig:
    """Check value ranges and choices across sections; returns `config`."""
    lora, data, train = config.lora, config.dataset, config.training
    _require(lora.rank >= 1, f"[lora] rank must be at least 1, got {lora.rank}")
    _require(lora.alpha > 0, f"[lora] alpha must be positive, got {lora.alpha}")
    _require(
        bool(lora.unet_targets) or lora.text_encoder, "[lora] unet_targets is empty and text_encoder is off"
    )
    _require(data.resolution >= 8, f"[dataset] resolution must be at least 8, got {data.resolution}")
    _require(data.bucket_step >= 8, f"[dataset] bucket_step must be at least 8, got {data.bucket_step}")
    _require(
        data.max_aspect_ratio >= 1.0, f"[dataset] max_aspect_ratio must be >= 1, got {data.max_aspect_ratio}"
    )
    for key in ("steps", "batch_size", "gradient_accumulation"):
        value = getattr(train, key)
        _require(value >= 1, f"[training] {key} must be at least 1, got {value}")
    _require(train.learning_rate > 0, f"[training] learning_rate must be positive, got {train.learning_rate}")
    _require(train.weight_decay >= 0, f"[training] weight_decay must be >= 0, got {train.weight_decay}")
    _require(
        train.mixed_precision in MIXED_PRECISIONS,
        f"[training] mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {train.mixed_precision!r}",
    )
    _require(
        config.model.prediction_type in PREDICTION_TYPES,
        f"[model] prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {config.model.prediction_type!r}",
    )
    _require(
        config.checkpointing.every >= 0,
        f"[checkpointing] every must be >= 0, got {config.checkpointing.every}",
    )
    _require(config.sampling.every >= 0, f"[sampling] every must be >= 0, got {config.sampling.every}")
    _require(
        config.sampling.every == 0 or bool(config.sampling.prompts),
        "[sampling] every is set but prompts is empty",
    )
    _require(
        config.output.save_dtype in SAVE_DTYPES,
        f"[output] save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {config.output.save_dtype!r}",
    )
    return config


ModelFolders = Callable[[str], Sequence[Path]]
"""The folders holding models of a kind ("checkpoints", "diffusers", "loras"), as ComfyUI's models/ has them."""


def is_bare_name(path: str) -> bool:
    """A file name with no folder part: `model.safetensors`, not `./model.safetensors` or `a/model.safetensors`."""
    return bool(path) and Path(path).name == path and "/" not in path and "\\" not in path


def _find_checkpoint(name: str, model_folders: ModelFolders) -> str:
    folders = [*model_folders("checkpoints"), *model_folders("diffusers")]
    for folder in folders:
        if (folder / name).exists():
            return str(folder / name)
    searched = ", ".join(str(f) if f.is_dir() else f"{f} (no such folder)" for f in folders)
    roots = {folder.parent for folder in folders if folder.parent.is_dir()}  # the models folders themselves
    elsewhere = sorted(p for root in roots for p in root.rglob("*") if p.name == name)[:3]
    where = f"; it is at {' and '.join(map(str, elsewhere))}: move it into {folders[0]}" if elsewhere else ""
    raise ConfigError(
        f"[model] checkpoint {name!r} is not in {searched}{where} (a bare file name is looked up in the "
        f"models folder; write './{name}' for a file beside the config)"
    )


def parse_config(
    values: Mapping[str, Any],
    base_folder: str | Path | None = None,
    model_folders: ModelFolders | None = None,
) -> LoraTrainingConfig:
    """A checked config from parsed TOML; relative paths are made relative to `base_folder`, except bare names
    of the checkpoint and output LoRA, found in / written to `model_folders` (when given)."""
    unknown = [name for name in values if name not in _SECTION_TYPES]
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; allowed sections: {', '.join(_SECTION_TYPES)}")
    sections = {name: _section(name, values.get(name, {})) for name in _SECTION_TYPES}
    config = LoraTrainingConfig(**sections)
    _require(
        bool(config.model.checkpoint),
        "[model] checkpoint is required (a checkpoint file or diffusers folder)",
    )
    _require(
        bool(config.dataset.folder), "[dataset] folder is required (a folder of images and .txt captions)"
    )
    _require(bool(config.output.file), "[output] file is required (the .safetensors LoRA to write)")
    if model_folders is not None:
        if is_bare_name(config.model.checkpoint):
            config.model.checkpoint = _find_checkpoint(config.model.checkpoint, model_folders)
        if is_bare_name(config.output.file):
            config.output.file = str(model_folders("loras")[0] / config.output.file)
    if base_folder is not None:
        base = Path(base_folder)

        def resolve(path: str) -> str:
            return path if not path or Path(path).is_absolute() else str(base / path)

        config.model.checkpoint = resolve(config.model.checkpoint)
        config.dataset.folder = resolve(config.dataset.folder)
        config.checkpointing.save_folder = resolve(config.checkpointing.save_folder)
        config.checkpointing.resume = resolve(config.checkpointing.resume)
        config.sampling.folder = resolve(config.sampling.folder)
        config.output.file = resolve(config.output.file)
    return validate(config)


def load_config(path: str | Path, model_folders: ModelFolders | None = None) -> LoraTrainingConfig:
    """Read and check a TOML training config (Python 3.11's `tomllib`); see `parse_config` for `model_folders`."""
    path = Path(path)
    try:
        import tomllib
    except ImportError as error:  # pragma: no cover - Python 3.10
        raise ConfigError("reading TOML configs needs Python 3.11 or later (tomllib)") from error
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from error
    try:
        return parse_config(values, path.parent, model_folders)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


__all__ = [
    "CheckpointOptions",
    "ConfigError",
    "DatasetOptions",
    "LoraOptions",
    "LoraTrainingConfig",
    "ModelFolders",
    "ModelOptions",
    "OutputOptions",
    "SamplingOptions",
    "TrainingOptions",
    "load_config",
    "parse_config",
    "validate",
]
