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


@dataclass(frozen=True)
class FaceEmbeddings:
    """What an IP-Adapter FaceID reads: face identity embeddings (N, 512, insightface's, computed elsewhere) and,
    for FaceID Plus, the CLIP penultimate hidden states of the N face crops (with their negatives).

    The negative face embedding is zero (as tencent-ailab's and diffusers' FaceID pipelines use).
    """

    face: Tensor
    clip: ImageEmbeddings | None = None

    def __post_init__(self) -> None:
        if self.face.dim() != 2:
            raise ValueError(f"face embeddings are (N, D), got {tuple(self.face.shape)}")
        if self.clip is not None:
            if self.clip.kind != PENULTIMATE:
                raise ValueError(f"FaceID Plus reads {PENULTIMATE} of the face crops, got {self.clip.kind}")
            if self.clip.positive.shape[0] not in (1, self.face.shape[0]):
                raise ValueError(
                    f"{self.clip.positive.shape[0]} face crops for {self.face.shape[0]} face embeddings: give "
                    "one crop, or one per face embedding"
                )
