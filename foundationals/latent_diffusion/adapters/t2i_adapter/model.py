"""T2I-Adapter: a small ResNet that turns a hint image into one feature map per UNet level.

Kinds (TencentARC's originals, diffusers' `T2IAdapter` adapter types):
- "full" (`full_adapter`, SD1.5): pixel-unshuffle, 3x3 conv in, one `AdapterBlock` per level (average-pool
  down from the second on, 1x1 conv where the width changes, ResNet blocks 3x3 + ReLU + 1x1);
- "light" (`light_adapter`, SD1.5): no conv in; `LightAdapterBlock`s (1x1 in to width/4, ResNet blocks of
  two 3x3 convs, 1x1 out), every block after the first pooled down;
- "full_xl" (`full_adapter_xl`, SDXL): as "full" with a 16x unshuffle and only the third block pooled down.

Features are added where diffusers adds `down_intrablock_additional_residuals`: to the output of the last
ResNet/attention layer of each down level (before its downsampler) when the level has cross-attention,
to the level's last output (after its downsampler) when it has none; a feature left over after the
levels is added to the middle block's output when the shapes agree (SDXL). The addition changes the
flow and the stored skip connection alike, so each site is the level's last `ResidualAccumulator`,
wrapped by a `T2IFeatureAdapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from .....fluxion import layers as fl
from .....fluxion.adapters.adapter import Adapter
from .....fluxion.casting import compute_placement
from ...guidance import Halves, select_halves
from ...model_config import UNetConfig, unet_family
from ...model_patch import SamplingRun, Undo
from ...resizing import broadcast_batch, resize_hint
from ...unet import ControlResidual, CrossAttentionBlock2d, DownBlocks, ResidualAccumulator, UNet
from ..controlnet.model import ControlMismatchError, is_step_active

if TYPE_CHECKING:
    from ...stable_diffusion import StableDiffusion

T2I_KINDS = ("full", "light", "full_xl")


@dataclass(frozen=True)
class T2IAdapterConfig:
    """A T2I-Adapter: its kind, the width of each output feature, ResNet blocks per level, unshuffle factor."""

    kind: str = "full"
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    in_channels: int = 3
    unshuffle_factor: int = 8

    def __post_init__(self) -> None:
        if self.kind not in T2I_KINDS:
            raise ValueError(f"unknown T2I-Adapter kind {self.kind!r}; choose one of {', '.join(T2I_KINDS)}")

    @property
    def family(self) -> str:
        """The model family the adapter's features are laid out for."""
        return "SDXL" if self.kind == "full_xl" else "SD1.5"

    @property
    def latent_factor(self) -> int:
        """Hint pixels per latent along each side (the first feature is at latent resolution)."""
        return self.unshuffle_factor // 2 if self.kind == "full_xl" else self.unshuffle_factor


class PixelUnshuffle(fl.Module):
    """(B, C, H, W) -> (B, C * f * f, H / f, W / f)."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x, self.factor)


class AveragePool2x(fl.Module):
    """2x2 average pooling, stride 2 (odd sizes rounded up)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class AdapterResidualBlock(fl.Residual):
    """3x3 conv, ReLU, conv (1x1 in full adapters, 3x3 in light ones), plus the input."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 1,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype),
            fl.ReLU(),
            fl.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, device=device, dtype=dtype),
        )


class AdapterBlock(fl.Chain):
    """One level of a full adapter: (pool down), (1x1 conv to the new width), ResNet blocks."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int,
        down: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        layers: list[fl.Module] = [AveragePool2x()] if down else []
        if in_channels != out_channels:
            layers.append(fl.Conv2d(in_channels, out_channels, 1, device=device, dtype=dtype))
        layers += [AdapterResidualBlock(out_channels, 1, device, dtype) for _ in range(num_res_blocks)]
        super().__init__(*layers)


class LightAdapterBlock(fl.Chain):
    """One level of a light adapter: (pool down), 1x1 conv to width/4, ResNet blocks, 1x1 conv out."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int,
        down: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        inner = out_channels // 4
        super().__init__(
            *([AveragePool2x()] if down else []),
            fl.Conv2d(in_channels, inner, 1, device=device, dtype=dtype),
            *(AdapterResidualBlock(inner, 3, device, dtype) for _ in range(num_res_blocks)),
            fl.Conv2d(inner, out_channels, 1, device=device, dtype=dtype),
        )


class FeatureAccumulator(fl.SetContext):
    """Stores its input as feature `index` (context "t2i_adapter") and passes it on."""

    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__("t2i_adapter", "features", callback=self.store)

    def store(self, features: list[Tensor | None], x: Tensor) -> None:
        """Put `x` at this accumulator's place in the list of features."""
        features[self.index] = x


class T2IAdapter(fl.Chain):
    """Hint image (B, C, H, W) in [0, 1] -> a tuple of feature maps, one per UNet level (and SDXL's middle)."""

    def __init__(
        self,
        config: T2IAdapterConfig = T2IAdapterConfig(),
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.config = config
        channels, blocks = config.channels, config.num_res_blocks
        unshuffled = config.in_channels * config.unshuffle_factor**2
        layers: list[fl.Module] = [PixelUnshuffle(config.unshuffle_factor)]
        levels: list[fl.Chain] = []
        if config.kind == "light":
            previous = unshuffled
            for index, width in enumerate(channels):
                levels.append(LightAdapterBlock(previous, width, blocks, index > 0, device, dtype))
                previous = width
        else:
            layers.append(fl.Conv2d(unshuffled, channels[0], 3, padding=1, device=device, dtype=dtype))
            previous = channels[0]
            for index, width in enumerate(channels):
                down = index == 2 if config.kind == "full_xl" else index > 0
                levels.append(AdapterBlock(previous, width, blocks, down, device, dtype))
                previous = width
        for index, level in enumerate(levels):
            layers += [level, FeatureAccumulator(index)]
        layers.append(fl.UseContext("t2i_adapter", "features").compose(tuple))
        super().__init__(*layers)

    def init_context(self) -> dict[str, dict[str, Any]]:
        return {"t2i_adapter": {"features": [None] * len(self.config.channels)}}


# -- where features go in a UNet ----------------------------------------------------------------------------------


def feature_sites(unet: UNet) -> list[ResidualAccumulator]:
    """The `ResidualAccumulator` after which each level's feature is added (diffusers' intrablock places)."""
    config = unet.config
    blocks = [block for block in unet.ensure_find(DownBlocks) if isinstance(block, fl.Chain)]
    sites: list[ResidualAccumulator] = []
    index = 1  # block 0 is the input convolution
    for level, _ in enumerate(config.block_channels):
        last_layer = index + config.layers_per_block - 1
        has_downsampler = level < len(config.block_channels) - 1
        attention = any(True for _ in blocks[last_layer].layers(CrossAttentionBlock2d))
        site = last_layer + 1 if has_downsampler and not attention else last_layer
        sites.append(blocks[site].ensure_find(ResidualAccumulator))
        index = last_layer + 1 + int(has_downsampler)
    return sites


class T2IFeature(fl.Module):
    """Adds a feature map to its input while active (the middle block's only when the shapes agree)."""

    def __init__(self, index: int, feature: Tensor, only_if_same_shape: bool = False) -> None:
        super().__init__()
        self.index = index
        self._feature = feature
        self.only_if_same_shape = only_if_same_shape
        self.active = True

    @property
    def feature(self) -> Tensor:
        return self._feature

    @feature.setter
    def feature(self, feature: Tensor) -> None:
        self._feature = feature

    def forward(self, x: Tensor) -> Tensor:
        feature = self._feature
        if not self.active or (self.only_if_same_shape and feature.shape != x.shape):
            return x
        return x + feature.to(x)


class T2IFeatureAdapter(fl.Chain, Adapter[fl.Module]):
    """Wraps a skip accumulator (or the middle block's control residual): the feature is added first."""

    def __init__(self, target: ResidualAccumulator | ControlResidual, feature: T2IFeature) -> None:
        with self.setup_adapter(target):
            super().__init__(feature, target)


def check_adapter_fits(config: T2IAdapterConfig, unet: UNetConfig, what: str = "this T2I-Adapter") -> None:
    """Raise `ControlMismatchError` unless the adapter's features fit the UNet's levels."""
    family = unet_family(unet)
    if config.family != family:
        raise ControlMismatchError(
            f"{what} is for {config.family} ({config.kind} adapter); the model is {family}"
        )
    levels = unet.block_channels
    if tuple(config.channels[: len(levels)]) != tuple(levels):
        raise ControlMismatchError(
            f"{what} makes features of widths {config.channels}; the model's levels are {levels}"
        )


class T2IAdapterPatch:
    """A T2I-Adapter for one sampling run: hint (ComfyUI IMAGE), strength, start/end fraction of the steps."""

    def __init__(
        self,
        adapter: T2IAdapter,
        hint: Tensor,
        strength: float = 1.0,
        start: float = 0.0,
        end: float = 1.0,
        name: str = "T2I-Adapter",
    ) -> None:
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
        self.adapter, self.hint, self.strength = adapter, hint, strength
        self.start, self.end, self.name = start, end, name

    @property
    def label(self) -> str:
        return f"{self.name} ({self.strength:g}, steps {self.start:g}-{self.end:g})"

    def models(self) -> tuple[T2IAdapter]:
        """The adapter: brought to the run's device with the UNet (see `model_patch.patch_models`)."""
        return (self.adapter,)

    def features(self, run: SamplingRun, device: torch.device, dtype: DType) -> list[Tensor]:
        """The scaled features for the run's size and batch (both CFG halves when guided)."""
        factor = self.adapter.config.latent_factor
        hint = resize_hint(self.hint, run.latent_height * factor, run.latent_width * factor)
        hint = broadcast_batch(hint, run.batch_size)
        with torch.no_grad():
            outputs = self.adapter(hint.to(*compute_placement(self.adapter)))
        features = [(output * self.strength).to(device=device, dtype=dtype) for output in outputs]
        return [torch.cat([f, f]) for f in features] if run.uses_guidance else features

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        """Inject the features into `model.unet`; the undo ejects every wrapper."""
        unet: UNet = model.unet
        check_adapter_fits(self.adapter.config, unet.config)
        if run is None:
            return lambda: None
        features = self.features(run, *compute_placement(unet))
        targets: list[ResidualAccumulator | ControlResidual] = list(feature_sites(unet))
        layers = [T2IFeature(index, feature) for index, feature in zip(range(len(targets)), features)]
        if len(features) > len(targets):
            middle = next(c for c in unet.layers(ControlResidual) if c.index == unet.skip_connection_count)
            targets = targets[: len(layers)] + [middle]
            layers.append(T2IFeature(len(layers), features[len(layers)], only_if_same_shape=True))
        adapters = [T2IFeatureAdapter(target, layer).inject() for target, layer in zip(targets, layers)]

        def on_step(step: int) -> None:
            active = is_step_active(step, run.num_steps, self.start, self.end)
            for layer in layers:
                layer.active = active

        def follow_halves(halves: Halves) -> None:  # a guidance pass on one half of the batch
            for layer, feature in zip(layers, features):
                layer.feature = select_halves(feature, run.stored_halves, halves)

        run.on_step(on_step)
        run.on_halves(follow_halves)

        def undo() -> None:
            if on_step in run.step_hooks:
                run.step_hooks.remove(on_step)
            if follow_halves in run.halves_listeners:
                run.halves_listeners.remove(follow_halves)
            for adapter in reversed(adapters):
                adapter.eject()

        return undo
