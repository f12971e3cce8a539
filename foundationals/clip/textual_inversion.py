"""Textual-inversion embedding files, found by name as ComfyUI's `embedding:name` does.

Layouts read (each as `.safetensors`, or `.pt`/`.bin` through `torch.load(weights_only=True)`):
- SD1.5, A1111 webui: `{"string_to_param": {"*": Tensor[N, 768]}, "name": ..., "step": ...}`;
- SD1.5 `emb_params: Tensor[N, 768]` (common `.safetensors` conversions);
- SDXL: `clip_l: Tensor[N, 768]` and `clip_g: Tensor[N, 1280]`, one per text encoder;
- diffusers' `learned_embeds`: one `{"<token>": Tensor[768]}`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
ENCODER_KEYS = {768: "clip_l", 1280: "clip_g"}  # SDXL files hold one tensor per text encoder
ENCODER_NAMES = {
    768: "CLIP ViT-L/14 (SD1.5, SDXL's first encoder)",
    1024: "OpenCLIP ViT-H/14 (SD2)",
    1280: "OpenCLIP ViT-bigG/14 (SDXL's second encoder)",
}

logger = logging.getLogger(__name__)


class TextualInversionError(ValueError):
    """An embedding file that cannot be read, or holds no vectors for the requested encoder."""


def read_embedding_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an embedding file by dotted name (A1111's nested `string_to_param` flattened)."""
    try:
        if path.suffix.lower() == ".safetensors":
            content: object = load_file(path, device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TextualInversionError(f"{path}: cannot read it as an embedding file ({error})") from error
    if not isinstance(content, dict):
        raise TextualInversionError(f"{path}: holds a {type(content).__name__}, expected a dict of tensors")

    tensors: dict[str, torch.Tensor] = {}

    def collect(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value.detach()
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(f"{prefix}.{key}" if prefix else str(key), item)

    collect("", content)
    return tensors


def _describe(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{key} {list(t.shape)}" for key, t in tensors.items()) or "no tensors"


def load_textual_inversion(path: str | Path, width: int) -> torch.Tensor:
    """Vectors [N, width] of an embedding file for the text encoder of that width (768, 1280...)."""
    path = Path(path)
    tensors = read_embedding_tensors(path)
    a1111 = [key for key in tensors if key.startswith("string_to_param.")]
    if a1111:
        key = a1111[0]
    elif ENCODER_KEYS.get(width) in tensors:
        key = ENCODER_KEYS[width]
    elif "emb_params" in tensors:
        key = "emb_params"
    elif len(tensors) == 1:
        key = next(iter(tensors))
    else:
        key = None
    vectors = tensors[key] if key is not None else None
    if vectors is None or vectors.dim() not in (1, 2) or vectors.shape[-1] != width:
        encoder = ENCODER_NAMES.get(width, f"{width}-wide")
        hint = f" (key {ENCODER_KEYS[width]!r} in SDXL files)" if width in ENCODER_KEYS else ""
        widths = sorted({t.shape[-1] for t in tensors.values() if t.dim() in (1, 2)})
        raise TextualInversionError(
            f"{path}: this textual inversion holds {_describe(tensors)}"
            + (f" (vectors {', '.join(map(str, widths))} wide)" if widths else "")
            + f"; the {encoder} text encoder needs {width}-wide vectors{hint}"
        )
    return vectors.reshape(-1, width).float()


def find_embedding_file(name: str, folders: Sequence[str | Path]) -> Path | None:
    """The file `name` names in `folders` or their subfolders, with or without its extension, as ComfyUI looks it up.

    Names that would leave a folder (`../x`, absolute paths) are not looked up.
    """
    for folder in folders:
        root = Path(os.path.abspath(folder))
        if not root.is_dir():
            continue
        subfolders = [
            root,
            *sorted(Path(d) for d, _, _ in os.walk(root, followlinks=True) if Path(d) != root),
        ]
        for directory in subfolders:
            candidate = Path(os.path.abspath(directory / name))
            if not candidate.is_relative_to(directory):
                continue
            for path in (
                candidate,
                *(candidate.with_name(candidate.name + ext) for ext in EMBEDDING_EXTENSIONS),
            ):
                if path.is_file():
                    return path
    return None


class EmbeddingLibrary:
    """Embeddings by name from folders for one text encoder width; usable as `tokenize_prompt(embeddings=...)`."""

    def __init__(self, folders: str | Path | Sequence[str | Path], width: int) -> None:
        self.folders = [folders] if isinstance(folders, str | Path) else list(folders)
        self.width = width
        self._loaded: dict[Path, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor | None:
        """Vectors [N, width] of the named embedding, or None with a warning (missing or wrong file)."""
        path = find_embedding_file(name, self.folders)
        if path is None:
            logger.warning("embedding %r not found in %s", name, ", ".join(map(str, self.folders)))
            return None
        if path not in self._loaded:
            try:
                self._loaded[path] = load_textual_inversion(path, self.width)
            except TextualInversionError as error:
                logger.warning("embedding %r ignored: %s", name, error)
                return None
        return self._loaded[path]
