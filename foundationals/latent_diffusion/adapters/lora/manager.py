"""LoRAs on SD models: load any file format, stack named LoRAs with their own strengths, fuse/unfuse.

A file is first normalized (`formats.lora`) into canonical module paths, then each path is
placed on one of our layers through a module map (canonical path → our module path). Plain LoRAs
run as fluxion `LinearLora`/`Conv2dLora` (low-rank path); LoCon-Tucker as a 3-conv chain; LoHa,
LoKr and full diffs as a weight delta computed from their factors; DoRA re-normalizes the
adapted weight. `fuse()` merges every delta into the base weights; `unfuse()` puts the saved
originals back, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .....fluxion import layers as fl
from .....fluxion.adapters.adapter import Adapter
from .....fluxion.adapters.lora import Lora, LoraAdapter
from .....fluxion.layers.chain import generate_unique_names
from ....clip.text_encoder import CLIPTextEncoder
from ....formats.lora import (
    SD15,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    LoraFile,
    LoraNamespace,
    normalize_lora,
)
from ...model_config import unet_family
from ...unet import UNet
from ..regional import RegionGate
from .loading import load_lora_state_dict, lora_namespace, text_encoder_lora_module_map, unet_lora_module_map
from .model import DoraLora, ScheduleGate, build_lora


class LoraMismatchError(ValueError):
    """A LoRA file of which nothing fits the model (wrong base model, or not a LoRA)."""


def model_family(unet: UNet) -> str:
    """SD1.5, SD2.x or SDXL (the name error messages use)."""
    return unet_family(unet.config)


@dataclass
class LoraLoadReport:
    """What one `add_loras` did: layers placed per component, and every key left out with why."""

    name: str
    source: str
    applied: list[str] = field(default_factory=list)  # "component:canonical module"
    not_applied: list[str] = field(default_factory=list)

    @property
    def applied_count(self) -> int:
        return len(self.applied)

    def __str__(self) -> str:
        lines = [f"LoRA {self.name!r} ({self.source}): {len(self.applied)} layers applied"]
        if self.not_applied:
            lines.append(f"{len(self.not_applied)} not applied:")
            lines.extend(f"  {item}" for item in self.not_applied)
        return "\n".join(lines)


@dataclass
class _Site:
    """One of our layers that carries LoRAs."""

    component: str
    layer: fl.WeightedModule
    root: fl.Chain
    adapter: LoraAdapter | None = None
    original: Tensor | None = None  # the base weight, kept while fused


@dataclass
class _Entry:
    site: _Site
    lora: Lora[Any]
    base_scale: float  # alpha/rank, or 1 for DoRA (its inner LoRA holds alpha/rank)


def _parents(root: fl.Chain) -> dict[int, fl.Chain]:
    """id(module) → the Chain holding it, for every module of `root`'s tree (one walk)."""
    return {id(child): chain for chain in root.modules() if isinstance(chain, fl.Chain) for child in chain}


def _find_parent(root: fl.Chain, module: fl.Module, parents: dict[int, fl.Chain] | None = None) -> fl.Chain:
    """The Chain holding `module`, from `parents` (see `_parents`) when given, else by walking `root`."""
    parent = parents.get(id(module)) if parents is not None else None
    if parent is not None and any(child is module for child in parent):
        return parent
    parent = root.find_parent(module)
    if parent is None:
        raise ValueError(f"{module.describe()} is not in {type(root).__name__}")
    return parent


def _unwrapped(module: fl.Module) -> fl.Module:
    while isinstance(module, Adapter):
        module = module.target
    return module


def _resolve(path: str, root: fl.Chain) -> fl.Module:
    """The module at `path`, named as in `root`'s tree without adapters.

    An injected adapter takes its target's place and renames its siblings (`Linear_1` → `LoraAdapter`,
    `Linear_2` → `Linear_1`): paths are read on the tree as it was, so a second manager (or a LoRA
    applied after an IP-Adapter) finds the same layers as the first.
    """
    module: Any = root
    for part in path.split("."):
        if isinstance(module, fl.Chain):
            module = generate_unique_names(_unwrapped(child) for child in module)[part]
        else:
            module = getattr(module, part)
    return module


class SDLoraManager:
    """Named LoRAs on the UNet and text encoders of one SD model: add, remove, rescale, fuse.

    `models` maps components (`unet`, `text_encoder`, `text_encoder_2`) to our Chains;
    `module_maps` maps, per component, canonical module paths to our module paths (the part of our
    state-dict keys before `.weight`). Both are read once, before any adapter is injected.

    Fusing keeps each original weight on `backup_device` (the CPU by default, as ComfyUI keeps its backups
    on the offload device: the GPU holds one copy of each weight) and adds the LoRA deltas computed in
    float32, rounded to the weight's dtype once.
    """

    def __init__(
        self,
        models: Mapping[str, fl.Chain],
        module_maps: Mapping[str, Mapping[str, str]],
        namespace: LoraNamespace = SD15,
        backup_device: torch.device | str = "cpu",
    ) -> None:
        self.models = dict(models)
        self.namespace = namespace
        self.backup_device = torch.device(backup_device)
        self.targets: dict[str, dict[str, fl.WeightedModule]] = {}
        for component, mapping in module_maps.items():
            root = self.models[component]
            resolved = {canonical: _resolve(ours, root) for canonical, ours in mapping.items()}
            self.targets[component] = {
                canonical: module
                for canonical, module in resolved.items()
                if isinstance(module, (fl.Linear, fl.Conv2d))
            }
        self._sites: dict[tuple[str, str], _Site] = {}
        self._entries: dict[str, list[_Entry]] = {}
        self._scales: dict[str, tuple[float, float]] = {}
        self.fused = False

    @classmethod
    def for_models(
        cls,
        unet: UNet,
        text_encoder: CLIPTextEncoder | None = None,
        text_encoder_2: CLIPTextEncoder | None = None,
        backup_device: torch.device | str = "cpu",
    ) -> SDLoraManager:
        """A manager for our UNet and text encoders, placing LoRAs through their diffusers/transformers key maps
        (`backup_device`: where fusing keeps the original weights)."""
        models: dict[str, fl.Chain] = {UNET: unet}
        maps: dict[str, dict[str, str]] = {UNET: unet_lora_module_map(unet)}
        layers: dict[str, int] = {}
        for component, encoder in ((TEXT_ENCODER, text_encoder), (TEXT_ENCODER_2, text_encoder_2)):
            if encoder is not None:
                models[component] = encoder
                maps[component] = text_encoder_lora_module_map(encoder)
                layers[component] = encoder.config.num_layers
        config = unet.config
        namespace = lora_namespace(
            model_family(unet),
            config.block_channels,
            config.transformer_depth,
            config.middle_transformer_depth,
            config.layers_per_block,
            config.addition_embedding == "text_time",
            layers,
        )
        return cls(models, maps, namespace, backup_device)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def scales(self, name: str) -> tuple[float, float]:
        """(unet, text encoder) strengths of a LoRA."""
        return self._scales[self._known(name)]

    def _known(self, name: str) -> str:
        if name not in self._entries:
            raise ValueError(f"no LoRA named {name!r} (loaded: {self.names})")
        return name

    def add_loras(
        self,
        name: str,
        weights: LoraFile | Mapping[str, Tensor] | str | Path,
        unet_scale: float = 1.0,
        text_encoder_scale: float = 1.0,
        source: str | None = None,
        strict: bool = False,
    ) -> LoraLoadReport:
        """Place a LoRA (file path, state dict, or normalized file) on the model under `name`.

        Raises `LoraMismatchError` when none of it fits; with `strict`, when any key is left out.
        Nothing stays behind when it raises.
        """
        if name in self._entries:
            raise ValueError(f"a LoRA named {name!r} is already loaded")
        if isinstance(weights, (str, Path)):
            source = source or Path(weights).name
            state_dict, metadata = load_lora_state_dict(weights)
            lora_file = normalize_lora(state_dict, self.namespace, metadata)
        elif isinstance(weights, LoraFile):
            lora_file = weights
        else:
            lora_file = normalize_lora(weights, self.namespace)
        report = LoraLoadReport(name, source or name)
        report.not_applied.extend(
            f"{key}: no such layer in {self.namespace.name}" for key in lora_file.unmatched
        )
        built: list[tuple[tuple[str, str], fl.WeightedModule, Lora[Any], float]] = []
        for entry in lora_file.weights:
            target = self.targets.get(entry.component, {}).get(entry.module)
            place = f"{entry.component}:{entry.module}"
            if target is None:
                why = (
                    "no such component in this model"
                    if entry.component not in self.targets
                    else "no such layer"
                )
                report.not_applied.append(f"{entry.source or place}: {why}")
                continue
            strength = unet_scale if entry.component == UNET else text_encoder_scale
            try:
                lora = build_lora(name, target, entry, strength)
            except ValueError as error:
                report.not_applied.append(f"{entry.source or place}: {error}")
                continue
            base = 1.0 if isinstance(lora, DoraLora) else entry.scale
            built.append(((entry.component, entry.module), target, lora, base))
            report.applied.append(place)
        if not built:
            hint = lora_file.family_hint or "an unknown base model"
            raise LoraMismatchError(
                f"LoRA {report.source!r} targets {hint}; the model is {self.namespace.name}: "
                f"none of its {len(lora_file.weights) + len(lora_file.unmatched)} entries fit"
                + (f" (e.g. {report.not_applied[0]})" if report.not_applied else "")
            )
        if strict and report.not_applied:
            raise LoraMismatchError(f"{report}")
        entries: list[_Entry] = []
        parents: dict[str, dict[int, fl.Chain]] = {}
        try:
            for key, target, lora, base in built:
                if key not in self._sites and key[0] not in parents:
                    parents[key[0]] = _parents(self.models[key[0]])
                site = self._site(key, target, parents.get(key[0]))
                entries.append(_Entry(site, lora, base))
                assert site.adapter is not None
                site.adapter.add_lora(lora)
        except Exception:
            self._drop(entries)
            raise
        self._entries[name] = entries
        self._scales[name] = (unet_scale, text_encoder_scale)
        if self.fused:
            self._refuse({id(entry.site): entry.site for entry in entries}.values())
        return report

    def _site(
        self, key: tuple[str, str], target: fl.WeightedModule, parents: dict[int, fl.Chain] | None = None
    ) -> _Site:
        site = self._sites.get(key)
        if site is None:
            root = self.models[key[0]]
            site = _Site(key[0], target, root)
            site.adapter = LoraAdapter(target)
            if not self.fused:
                site.adapter.inject(_find_parent(root, target, parents))
            self._sites[key] = site
        return site

    def _drop(self, entries: Iterable[_Entry]) -> None:
        """Take LoRAs off their layers; a layer left with none gets its base weight and place back."""
        touched: dict[int, _Site] = {}
        for entry in entries:
            assert entry.site.adapter is not None
            entry.site.adapter.remove_lora(entry.lora.name)
            touched[id(entry.site)] = entry.site
        for site in touched.values():
            assert site.adapter is not None
            if site.adapter.names:
                continue
            if site.original is not None:
                with torch.no_grad():
                    site.layer.weight.copy_(site.original)
                site.original = None
            if site.adapter.parent is not None:
                site.adapter.eject()
            del self._sites[next(key for key, value in self._sites.items() if value is site)]
        if self.fused:
            self._refuse(site for site in touched.values() if site.adapter is not None and site.adapter.names)

    def remove_loras(self, name: str) -> None:
        """Take a LoRA off every layer it was on."""
        self._drop(self._entries.pop(self._known(name)))
        del self._scales[name]

    def set_scale(self, name: str, unet: float | None = None, text_encoder: float | None = None) -> None:
        """Change a LoRA's strengths (None keeps one as it is)."""
        old_unet, old_text = self._scales[self._known(name)]
        unet = old_unet if unet is None else unet
        text_encoder = old_text if text_encoder is None else text_encoder
        for entry in self._entries[name]:
            entry.lora.scale = entry.base_scale * (unet if entry.site.component == UNET else text_encoder)
        self._scales[name] = (unet, text_encoder)
        if self.fused:
            self._refuse({id(entry.site): entry.site for entry in self._entries[name]}.values())

    def set_schedule(self, name: str, start: float = 0.0, end: float = 1.0) -> None:
        """Make a LoRA act only while sampling progress (see `set_lora_progress`) is in [start, end)."""
        if self.fused:
            raise ValueError("unfuse() before scheduling a LoRA: fused weights cannot switch per step")
        for entry in self._entries[self._known(name)]:
            gate = entry.lora.find(ScheduleGate)
            if gate is not None:
                entry.lora.remove(gate)
            if (start, end) != (0.0, 1.0):
                entry.lora.append(ScheduleGate(start, end))

    def set_region(self, name: str, region: str | None) -> None:
        """Make a LoRA act only in the UNet passes of `region` (see `regional`), masked there; None: everywhere.

        Only the UNet's layers are gated: a text encoder has no image region.
        """
        if self.fused:
            raise ValueError("unfuse() before making a LoRA regional: fused weights cannot switch per pass")
        for entry in self._entries[self._known(name)]:
            gate = entry.lora.find(RegionGate)
            if gate is not None:
                entry.lora.remove(gate)
            if region is not None and entry.site.component == UNET:
                entry.lora.append(RegionGate(region))

    def fuse(self) -> None:
        """Merge every LoRA into its layer's weight (originals kept) and take the adapters out."""
        if self.fused:
            return
        for entries in self._entries.values():
            for entry in entries:
                if entry.lora.find(ScheduleGate) is not None:
                    raise ValueError("scheduled LoRAs cannot be fused (their weights switch per step)")
                if entry.lora.find(RegionGate) is not None:
                    raise ValueError("regional LoRAs cannot be fused (their weights switch per pass)")
        for site in self._sites.values():
            assert site.adapter is not None
            site.adapter.eject()
        self.fused = True
        self._refuse(self._sites.values())

    def unfuse(self) -> None:
        """Put the original weights back, bit for bit, and the adapters in again."""
        if not self.fused:
            return
        for site in self._sites.values():
            assert site.adapter is not None and site.original is not None
            with torch.no_grad():
                site.layer.weight.copy_(site.original)
            site.original = None
            site.adapter.inject(_find_parent(site.root, site.layer))
        self.fused = False

    def _refuse(self, sites: Iterable[_Site]) -> None:
        """While fused: rewrite these layers' weights as original + the sum of their LoRAs' deltas.

        The original goes to `backup_device` (kept bit for bit); the deltas are summed in float32 on the
        weight's device and the result is rounded to the weight's dtype once."""
        for site in sites:
            assert site.adapter is not None
            weight = site.layer.weight
            with torch.no_grad():
                if site.original is None:
                    site.original = weight.detach().to(self.backup_device, copy=True)
                else:
                    weight.copy_(site.original)  # DoRA reads the base weight
                delta = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
                for lora in site.adapter.iter_loras():
                    delta += lora.delta_weight(torch.float32).reshape(weight.shape).to(weight.device)
                weight.copy_(weight.float() + delta)

    def clear(self) -> None:
        """Remove every LoRA (fused or not): the model is back to its base weights and structure."""
        for name in list(self._entries):
            self.remove_loras(name)
