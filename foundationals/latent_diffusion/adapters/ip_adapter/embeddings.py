"""CLIP embeddings of reference images, kept to prompt an IP-Adapter later without the image encoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ....formats.ip_adapter import read_image_embeddings, write_image_embeddings

IMAGE_EMBEDS, PENULTIMATE = "image_embeds", "penultimate_hidden_states"


@dataclass(frozen=True)
class ImageEmbeddings:
    """CLIP embeddings of reference images and their negatives, before any IP-Adapter projection.

    `positive`/`negative`: (N, D) image embeddings (base adapters) or (N, S, D) penultimate hidden states (plus).
    """

    positive: Tensor
    negative: Tensor
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in (IMAGE_EMBEDS, PENULTIMATE):
            raise ValueError(f"kind must be {IMAGE_EMBEDS!r} or {PENULTIMATE!r}, got {self.kind!r}")

    def save(self, path: str | Path) -> None:
        """Write a safetensors file: tensors "positive", "negative"; metadata format and kind."""
        write_image_embeddings(path, self.positive, self.negative, self.kind)

    @staticmethod
    def load(path: str | Path) -> ImageEmbeddings:
        """Read a file written by `save`."""
        return ImageEmbeddings(*read_image_embeddings(path))
