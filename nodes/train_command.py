"""`python -m nodes train CONFIG.toml`: train a LoRA from a TOML config (see examples/training/finetune-lora.toml).

Reads and checks the config, loads the checkpoint and the image folder, trains with a terminal progress bar
showing the loss, writes checkpoints and sample images when asked, and saves the kohya-format LoRA.
Exit status: 0 done, 2 bad config/dataset/checkpoint, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..foundationals.latent_diffusion.checkpoint import CheckpointError
from ..foundationals.latent_diffusion.solvers.solver import PredictionType
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from ..foundationals.training import (
    ConfigError,
    DatasetError,
    LoraTrainingConfig,
    TrainingError,
    TrainingProgress,
    load_config,
    load_image_folder,
    train_lora,
)
from . import host
from .cli import register_command, use_models_dir

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _say(line: str) -> None:
    """A line on stderr, below the progress bar (which redraws on its own line in a terminal)."""
    print(("\n" if sys.stderr.isatty() else "") + line, file=sys.stderr)


def _device(config: LoraTrainingConfig) -> torch.device:
    return host.get_torch_device() if config.model.device == "auto" else torch.device(config.model.device)


def run_training(config: LoraTrainingConfig) -> Path:
    """Train and save the LoRA a checked config describes; returns the written file."""
    checkpoint = Path(config.model.checkpoint)
    if not checkpoint.exists():
        raise ConfigError(f"[model] checkpoint {checkpoint} does not exist")
    if config.checkpointing.resume and not Path(config.checkpointing.resume).is_file():
        raise ConfigError(f"[checkpointing] resume: {config.checkpointing.resume} does not exist")
    data = config.dataset
    examples = load_image_folder(
        data.folder,
        data.resolution,
        data.buckets,
        data.bucket_step,
        data.max_aspect_ratio,
        data.caption_extension,
        data.caption_prefix,
    )
    device = _device(config)
    dtype = (
        PRECISIONS.get(config.training.mixed_precision, torch.float32)
        if device.type == "cuda"
        else torch.float32
    )
    model = StableDiffusion.from_checkpoint(checkpoint, device=device, dtype=dtype)
    model.autoencoder.to(dtype=torch.float32)
    prediction = (
        None if config.model.prediction_type == "auto" else PredictionType(config.model.prediction_type)
    )
    print(f"training on {len(examples)} images from {data.folder} ({device}, {config.training.steps} steps)")
    with host.ProgressReporter(config.training.steps, "train") as bar:

        def report(progress: TrainingProgress) -> None:
            bar.description = f"train loss {progress.loss:.4f}"
            bar.update_absolute(progress.step)
            for sample in progress.samples:
                _say(f"step {progress.step}: sample written to {sample}")
            if progress.checkpoint is not None:
                _say(f"step {progress.step}: checkpoint saved to {progress.checkpoint}")

        path, losses = train_lora(
            model,
            examples,
            config.output.file,
            config.lora,
            config.training,
            callback=report,
            checkpoint_every=config.checkpointing.every,
            checkpoint_folder=config.checkpointing.save_folder,
            resume=config.checkpointing.resume or None,
            sampling=config.sampling if config.sampling.every else None,
            prediction_type=prediction,
            save_dtype=config.output.save_dtype,
        )
    if losses:
        window = max(1, min(10, len(losses) // 2))
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        print(f"loss: first {window} steps {first:.4f}, last {window} steps {last:.4f}")
    return path


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", type=Path, help="training config (TOML), e.g. examples/training/finetune-lora.toml"
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        help="folder laid out like ComfyUI's models/, for bare checkpoint and LoRA names (default: ./models)",
    )


def train_command(args: argparse.Namespace) -> int:
    """Run the training a TOML config describes."""
    use_models_dir(args.models_dir)
    try:
        config = load_config(args.config, host.model_search_paths)
        path = run_training(config)
    except (ConfigError, DatasetError, CheckpointError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"LoRA written to {path}")
    return 0


register_command("train", "train a LoRA from a TOML config", _configure, train_command)
