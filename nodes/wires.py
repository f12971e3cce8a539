"""The values that travel on the pack's own wires, and the cache of loaded checkpoints.

ComfyUI caches node outputs and one output may feed many branches, so every wire value is immutable:
a model wire is the shared, loaded `StableDiffusion` plus an ordered tuple of patches (LoRA, ControlNet,
IP-Adapter, context values...). Adding an adapter returns a new wire; nothing is applied to the shared
weights until a sampler (or a text encoder, for the CLIP wire) applies the stack for one run and
undoes it afterwards.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..foundationals.latent_diffusion.model_patch import ModelPatch, SamplingRun, Undo, patch_models, patched
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from .host import MODEL_ROLES, is_hosted, load_models, model_placement, sampling_memory, vae_memory

MODEL = "FLUXION_MODEL"
CLIP = "FLUXION_CLIP"
VAE = "FLUXION_VAE"


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


def text_encoders(model: StableDiffusion) -> list[torch.nn.Module]:
    """The text encoder(s) of a model (CLIP-L, and OpenCLIP bigG for SDXL)."""
    return [model.text_encoder] + ([model.text_encoder_2] if model.text_encoder_2 is not None else [])


def load_text_encoders(model: StableDiffusion) -> None:
    """Bring the text encoder(s) to their device before encoding (the host unloads them when it needs room)."""
    load_models(text_encoders(model), role="text_encoder")


def load_autoencoder(model: StableDiffusion, latent_shape: tuple[int, ...], decode: bool) -> None:
    """Bring the VAE to its device with room to decode (or encode the image of) `latent_shape` latents."""
    autoencoder = model.autoencoder
    load_models([autoencoder], vae_memory(latent_shape, autoencoder.dtype, decode), role="vae")


def load_for_sampling(wire: ModelWire, latent_shape: tuple[int, ...], guided: bool) -> None:
    """Bring the UNet and the models its patches run (ControlNets, T2I-Adapters, IP-Adapters) to their device
    together, with room for one UNet pass over `latent_shape` (doubled with guidance)."""
    sd = wire.model
    batch = latent_shape[0] * (2 if guided else 1)
    memory = sampling_memory((batch, *latent_shape[1:]), sd.unet.dtype, sd.is_sdxl)
    load_models([sd.unet, *patch_models(wire.patches)], memory, role="unet")


class _Held:
    """Holds a value strongly (headless) or weakly (hosted: ComfyUI's output cache owns the wires)."""

    def __init__(self, value: Any, weak: bool) -> None:
        self._strong = None if weak else value
        self._weak = weakref.ref(value) if weak else None

    def get(self) -> Any:
        return self._strong if self._weak is None else self._weak()


class CheckpointCache:
    """The most recently loaded checkpoint, shared by every wire made from it (one copy of the weights).

    Its models are managed by the host (`host.manage`): ComfyUI's "Unload models" moves them to the offload
    device and the next run loads them back. Hosted the cache holds the model weakly: when ComfyUI's output
    cache drops the wires (POST /free with free_memory), the weights go. Selecting another file drops the
    previous one first.
    """

    def __init__(self, loader: Callable[[Path], StableDiffusion]) -> None:
        self._loader = loader
        self._key: tuple[Any, ...] | None = None
        self._held: _Held | None = None

    def get(self, path: Path) -> StableDiffusion:
        stat = path.stat()
        placements = tuple(model_placement(role) for role in ("unet", "text_encoder", "vae"))
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, placements)
        model = self._held.get() if self._held is not None and key == self._key else None
        if model is None:
            self.clear()
            model = self._loader(path)
            self._key, self._held = key, _Held(model, weak=is_hosted())
        return model

    def clear(self) -> None:
        self._key = None
        self._held = None


class LatestFileCache:
    """One loaded model per kind, kept until its file changes or another file is asked for (held weakly when
    hosted, as `CheckpointCache`)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[object, ...], _Held]] = {}

    def get(self, kind: str, path: Path, load: Callable[[Path], Any]) -> Any:
        # the placements are part of the key: another device or dtype (ComfyUI's flags, the CPU dtype) loads again
        placements = tuple(model_placement(role) for role in MODEL_ROLES)
        key = (str(path.resolve()), path.stat().st_mtime_ns, placements)
        entry = self._entries.get(kind)
        value = entry[1].get() if entry is not None and entry[0] == key else None
        if value is None:
            self._entries.pop(kind, None)  # drop the previous file before loading the next
            value = load(path)
            self._entries[kind] = (key, _Held(value, weak=is_hosted()))
        return value


MODEL_FILES = LatestFileCache()
"""Shared by the loader nodes of ControlNets, T2I-Adapters, IP-Adapters and CLIP vision encoders."""
