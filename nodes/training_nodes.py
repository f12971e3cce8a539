"""Train a LoRA inside a workflow, on the loaded checkpoint, and save it to the loras folder."""

from __future__ import annotations

import re
from typing import Any

import torch

from ..foundationals.training import LoraOptions, LoraTrainer, TrainingOptions, TrainingProgress
from ..foundationals.training.dataset import dataset_buckets, examples_from_tensor
from .host import ProgressReporter, load_models, model_search_paths, throw_if_interrupted
from .wires import CLIP, MODEL, ClipWire, ModelWire, text_encoders

_SAFE_NAME = re.compile(r"^[\w\-. ]+$")


def split_captions(captions: str, count: int) -> list[str]:
    """One caption per line for `count` images, or one line for all of them (blank lines ignored)."""
    lines = [line.strip() for line in captions.splitlines() if line.strip()]
    if len(lines) <= 1:
        return [lines[0] if lines else ""] * count
    if len(lines) != count:
        raise ValueError(f"{len(lines)} caption lines for {count} images: give one per image, or one for all")
    return lines


def lora_file_name(name: str) -> str:
    """`name` as a file name in the loras folder (`.safetensors` added; no folders)."""
    name = name.strip()
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    if not _SAFE_NAME.match(name) or name.startswith("."):
        raise ValueError(f"LoRA name {name!r}: use letters, digits, spaces, '-', '_' and '.' only")
    return name


class FluxionTrainLora:
    """Train a LoRA on the loaded model from a batch of images and captions."""

    DESCRIPTION = (
        "Trains a LoRA (UNet attention, optionally the text encoders) on the images with their captions, "
        "starting from the loaded checkpoint, and saves it in kohya format to the loras folder, where "
        "Fluxion Load LoRA, ComfyUI's LoRA loader and diffusers can read it. The shared model is left "
        "exactly as it was. Adapters wired onto the inputs are not applied: training starts from the checkpoint."
    )
    CATEGORY = "fluxion/training"
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("File name of the trained LoRA in the loras folder (for Fluxion Load LoRA).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The checkpoint to train on (from Fluxion Load Checkpoint)."}),
                "clip": (
                    CLIP,
                    {"tooltip": "Its text encoders (same checkpoint), which encode the captions."},
                ),
                "images": (
                    "IMAGE",
                    {"tooltip": "Training images; resized and center-cropped to the resolution."},
                ),
                "captions": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "One caption per image, one per line; or a single line used for every image.",
                    },
                ),
                "rank": (
                    "INT",
                    {"default": 16, "min": 1, "max": 256, "tooltip": "LoRA rank (size of the update)."},
                ),
                "steps": ("INT", {"default": 500, "min": 1, "max": 100000, "tooltip": "Optimizer steps."}),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": 1e-4,
                        "min": 1e-7,
                        "max": 1.0,
                        "step": 1e-5,
                        "tooltip": "AdamW learning rate.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2**32 - 1,
                        "tooltip": "Seeds LoRA init, order, timesteps, noise.",
                    },
                ),
                "lora_name": (
                    "STRING",
                    {"default": "fluxion_trained_lora", "tooltip": "File name to write in the loras folder."},
                ),
            },
            "optional": {
                "alpha": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1024.0,
                        "tooltip": "LoRA alpha (scale alpha/rank); 0 = rank.",
                    },
                ),
                "resolution": (
                    "INT",
                    {
                        "default": 512,
                        "min": 64,
                        "max": 2048,
                        "step": 64,
                        "tooltip": "Training size (pixels per side).",
                    },
                ),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per step."}),
                "train_text_encoder": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Also train LoRAs on the text encoders' attention."},
                ),
            },
        }

    def train(
        self,
        model: ModelWire,
        clip: ClipWire,
        images: torch.Tensor,
        captions: str,
        rank: int,
        steps: int,
        learning_rate: float,
        seed: int,
        lora_name: str,
        alpha: float = 0.0,
        resolution: int = 512,
        batch_size: int = 1,
        train_text_encoder: bool = False,
    ) -> dict[str, Any]:
        if clip.model is not model.model:
            raise ValueError("model and clip come from different checkpoints: wire both from one loader")
        file_name = lora_file_name(lora_name)
        buckets = dataset_buckets(resolution, step=64)
        examples = examples_from_tensor(images, split_captions(captions, images.shape[0]), buckets)
        lora = LoraOptions(rank=rank, alpha=float(alpha or rank), text_encoder=train_text_encoder)
        options = TrainingOptions(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
        path = model_search_paths("loras")[0] / file_name
        with ProgressReporter(steps, "Fluxion Train LoRA") as progress:

            def report(state: TrainingProgress) -> None:
                progress.update_absolute(state.step)
                throw_if_interrupted()

            sd = model.model
            load_models([sd.unet, sd.autoencoder, *text_encoders(sd)], role="unet")  # all train together
            with LoraTrainer(sd, examples, lora, options) as trainer:
                throw_if_interrupted()
                trainer.train(callback=report)
                trainer.save_lora(path, torch.float16, {"ss_output_name": path.stem})
        return {"ui": {"text": [file_name]}, "result": (file_name,)}


NODE_CLASS_MAPPINGS = {"FluxionTrainLora": FluxionTrainLora}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionTrainLora": "Fluxion Train LoRA"}
