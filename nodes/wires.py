"""The values that travel on the pack's own wires, and the cache of loaded checkpoints.

ComfyUI caches node outputs and one output may feed many branches, so every wire value is immutable:
a model wire is the shared, loaded `StableDiffusion` plus an ordered tuple of patches (LoRA, ControlNet,
IP-Adapter, context values...). Adding an adapter returns a new wire; nothing is applied to the shared
weights until a sampler (or a text encoder, for the CLIP wire) applies the stack for one run and
undoes it afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..foundationals.latent_diffusion.model_patch import ModelPatch, SamplingRun, Undo, patched
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from .host import get_torch_device, register_memory_release, unet_dtype, vae_dtype

MODEL = "FLUXION_MODEL"
CLIP = "FLUXION_CLIP"
VAE = "FLUXION_VAE"
CONDITIONING = "FLUXION_CONDITIONING"


@dataclass(frozen=True)
class ModelWire:
    """A loaded model and the adapters wired onto it (applied only while sampling)."""

    model: StableDiffusion = field(repr=False)
    name: str
    patches: tuple[ModelPatch, ...] = ()

    def with_patch(self, patch: ModelPatch) -> ModelWire:
        return replace(self, patches=(*self.patches, patch))

    def describe(self) -> str:
        """The model's tree with every patch of the stack applied: what a sampler will run."""
        run = SamplingRun(
            num_steps=1, first_step=0, latent_height=8, latent_width=8, batch_size=1, uses_guidance=True
        )
        header = [f"model: {self.name} ({'SDXL' if self.model.is_sdxl else 'SD1.5'})"]
        header += [f"patch {index + 1}: {patch.label}" for index, patch in enumerate(self.patches)] or [
            "no patches"
        ]
        with patched(self.model, self.patches, run):
            tree = repr(self.model.unet)
        return "\n".join([*header, "", tree])


@dataclass(frozen=True)
class ClipWire:
    """The text encoder(s) of a loaded model, and the patches that act on them (LoRA text parts)."""

    model: StableDiffusion = field(repr=False)
    name: str
    patches: tuple[ModelPatch, ...] = ()

    def with_patch(self, patch: ModelPatch) -> ClipWire:
        return replace(self, patches=(*self.patches, patch))


@dataclass(frozen=True)
class VaeWire:
    """The autoencoder of a loaded model."""

    model: StableDiffusion = field(repr=False)
    name: str


@dataclass(frozen=True)
class ContextPatch:
    """Write `value` under `key` in the UNet context `context` for the run (the old value comes back after)."""

    context: str
    key: str
    value: Any

    @property
    def label(self) -> str:
        return f"context {self.context}[{self.key!r}] = {_short(self.value)}"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        unet = model.unet
        existed = unet.provider.get_context(self.context)
        store = existed if existed is not None else {}
        missing = object()
        previous = store.get(self.key, missing)
        store[self.key] = self.value
        if existed is None:
            unet.set_context(self.context, store)

        def undo() -> None:
            if existed is None:
                unet.provider.contexts.pop(self.context, None)
            elif previous is missing:
                store.pop(self.key, None)
            else:
                store[self.key] = previous

        return undo


def parse_context_value(text: str) -> Any:
    """A context value typed in a node: JSON (numbers, lists, objects); lists of numbers become tensors."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f'value must be JSON (e.g. 0.5, [1, 2], {{"a": 1}}, "text"): {error}') from error
    if isinstance(value, list) and value and all(isinstance(item, (int, float, list)) for item in value):
        try:
            return torch.tensor(value, dtype=torch.float32)
        except (ValueError, TypeError):
            return value
    return value


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class CheckpointCache:
    """Keeps the most recently loaded checkpoint; selecting another file or a host memory release drops it."""

    def __init__(
        self, loader: Callable[[Path, torch.device, torch.dtype, torch.dtype], StableDiffusion]
    ) -> None:
        self._loader = loader
        self._key: tuple[Any, ...] | None = None
        self._model: StableDiffusion | None = None
        register_memory_release(self.clear)

    def get(self, path: Path) -> StableDiffusion:
        device = get_torch_device()
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device))
        if key != self._key or self._model is None:
            self.clear()
            self._model = self._loader(path, device, unet_dtype(device), vae_dtype(device))
            self._key = key
        return self._model

    def clear(self) -> None:
        self._key = None
        self._model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class LatestFileCache:
    """One loaded model per kind, kept until its file changes, another file is asked for, or the host frees memory."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[str, int], Any]] = {}
        register_memory_release(self._entries.clear)

    def get(self, kind: str, path: Path, load: Callable[[Path], Any]) -> Any:
        key = (str(path.resolve()), path.stat().st_mtime_ns)
        entry = self._entries.get(kind)
        if entry is None or entry[0] != key:
            self._entries.pop(kind, None)  # drop the previous file before loading the next
            entry = (key, load(path))
            self._entries[kind] = entry
        return entry[1]


MODEL_FILES = LatestFileCache()
"""Shared by the loader nodes of ControlNets, T2I-Adapters, IP-Adapters and CLIP vision encoders."""
