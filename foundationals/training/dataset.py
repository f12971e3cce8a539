"""Training images with captions, resized and cropped into aspect-ratio buckets, and the batch order of an epoch.

A folder holds images (`.png`, `.jpg`, `.jpeg`, `.webp`, `.bmp`) and, beside each, a caption file of the
same name (`photo.png` + `photo.txt`; no caption file means an empty caption). Each image goes to the bucket
(a height x width of about `resolution**2` pixels, multiples of `bucket_step`) whose aspect ratio is
nearest its own, is resized to cover it and center-cropped. Batches hold images of one bucket only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the folder or file."""


@dataclass(frozen=True)
class TrainingExample:
    """One training image at its bucket size, its caption, and SDXL's size/crop conditioning."""

    image: Tensor  # (3, H, W) in [0, 1]
    caption: str
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    source: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """(height, width): the bucket."""
        return int(self.image.shape[1]), int(self.image.shape[2])


def aspect_buckets(resolution: int, step: int = 64, max_aspect_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) sizes of at most `resolution**2` pixels, multiples of `step`, ratio within the limit."""
    area = resolution * resolution
    buckets = set()
    for width in range(step, int(resolution * max_aspect_ratio) + step, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect_ratio:
            buckets.add((height, width))
    square = max(resolution // step * step, step)
    buckets.add((square, square))
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to `height` x `width` (larger area on ties)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[1] / b[0]) - ratio), 9), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Resize `image` to cover the bucket, center-crop it: (3, H, W) in [0, 1] and the crop's (top, left)."""
    height, width = bucket
    scale = max(height / image.height, width / image.width)
    resized_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(resized_size, Image.Resampling.BICUBIC) if resized_size != image.size else image
    top, left = (resized.height - height) // 2, (resized.width - width) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1), (top, left)


def make_example(
    image: Image.Image, caption: str, buckets: Sequence[tuple[int, int]], source: str = ""
) -> TrainingExample:
    """A training example from a PIL image (converted to RGB) put in its nearest bucket."""
    rgb = image.convert("RGB")
    bucket = nearest_bucket(rgb.height, rgb.width, buckets)
    pixels, crop = fit_to_bucket(rgb, bucket)
    return TrainingExample(pixels, caption, (rgb.height, rgb.width), crop, source)


def dataset_buckets(
    resolution: int, use_buckets: bool = True, step: int = 64, max_aspect_ratio: float = 2.0
) -> list[tuple[int, int]]:
    """The buckets of a dataset: aspect-ratio buckets, or one square of `resolution` (rounded to `step`)."""
    if use_buckets:
        return aspect_buckets(resolution, step, max_aspect_ratio)
    square = max(resolution // step * step, step)
    return [(square, square)]


def load_image_folder(
    folder: str | Path,
    resolution: int = 512,
    use_buckets: bool = True,
    bucket_step: int = 64,
    max_aspect_ratio: float = 2.0,
    caption_extension: str = ".txt",
    caption_prefix: str = "",
) -> list[TrainingExample]:
    """Every image of `folder` (sorted by name) with its caption, bucketed; unreadable files are errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist or is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DatasetError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    buckets = dataset_buckets(resolution, use_buckets, bucket_step, max_aspect_ratio)
    examples = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.convert("RGB")
        except Exception as error:
            raise DatasetError(f"{path}: cannot be read as an image ({error})") from error
        caption_path = path.with_suffix(caption_extension)
        caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""
        caption = f"{caption_prefix}{caption}" if caption_prefix else caption
        examples.append(make_example(image, caption, buckets, path.name))
    return examples


def examples_from_tensor(
    images: Tensor, captions: Sequence[str], buckets: Sequence[tuple[int, int]]
) -> list[TrainingExample]:
    """Examples from a (B, H, W, C) image batch in [0, 1] (ComfyUI's IMAGE) and one caption per image."""
    if images.dim() != 4 or images.shape[-1] not in (3, 4):
        raise DatasetError(f"expected images of shape (B, H, W, 3), got {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise DatasetError(f"{images.shape[0]} images but {len(captions)} captions")
    examples = []
    for index, (image, caption) in enumerate(zip(images, captions)):
        array = (image[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        examples.append(make_example(Image.fromarray(array, mode="RGB"), caption, buckets, f"image {index}"))
    return examples


def epoch_batches(
    examples: Sequence[TrainingExample], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches of example indices: shuffled within each bucket, then the batches shuffled."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, example in enumerate(examples):
        by_bucket.setdefault(example.size, []).append(index)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        batches.extend(order[start : start + batch_size] for start in range(0, len(order), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "TrainingExample",
    "aspect_buckets",
    "dataset_buckets",
    "epoch_batches",
    "examples_from_tensor",
    "fit_to_bucket",
    "load_image_folder",
    "make_example",
    "nearest_bucket",
]
