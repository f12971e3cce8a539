"""FreeU and FreeU v2 (Si et al. 2023): reweigh the decoder's backbone and skip features, no extra UNet pass.

Before an output block concatenates its input `h` (the backbone) with its skip connection, FreeU multiplies
the first half of `h`'s channels by a backbone factor `b` and scales the skip's lowest spatial frequencies
(the 2 x 2 centre of its shifted 2-d FFT) by a skip factor `s`. FreeU v2 weighs the backbone factor by
the normalized channel mean of `h`: `h[:, :C/2] *= 1 + (b - 1) * (mean_c(h) - min) / (max - min)` (min and
max over each item's positions). The filter runs in float32.

Which output blocks get which factors:
- `"channels"` (the FreeU authors' code, ComfyUI's FreeU / FreeU_V2 nodes): by the width of `h`,
  `(b1, s1)` where `h` has 4 x the UNet's first width (1280 for SD1.5 and SDXL), `(b2, s2)` where it has 2 x;
- `"up_blocks"` (diffusers' `enable_freeu`): by decoder level, `(b1, s1)` on every output block of the
  lowest-resolution level and `(b2, s2)` on the next one.
The two differ on the blocks where a level starts (its first block still gets the previous level's width).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .....fluxion import layers as fl
from .....fluxion.adapters.adapter import Adapter
from ...model_config import UNetConfig
from ...model_patch import SamplingRun, Undo
from ...unet import ResidualConcatenator, UNet, UpBlocks

if TYPE_CHECKING:
    from ...stable_diffusion import StableDiffusion

FREEU_RULES = ("channels", "up_blocks")


def fourier_filter(x: Tensor, threshold: int, scale: float) -> Tensor:
    """Scale the `2 threshold x 2 threshold` lowest frequencies of each (B, C) plane of `x` by `scale`."""
    frequencies = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = frequencies.shape[-2:]
    mask = torch.ones(frequencies.shape, device=x.device)
    row, column = height // 2, width // 2
    mask[..., row - threshold : row + threshold, column - threshold : column + threshold] = scale
    frequencies = torch.fft.ifftshift(frequencies * mask, dim=(-2, -1))
    return torch.fft.ifftn(frequencies, dim=(-2, -1)).real.to(x.dtype)


def scale_backbone(h: Tensor, factor: float, version: int) -> Tensor:
    """`h` with its first half of channels multiplied by `factor` (v2: weighed by the normalized channel mean)."""
    half = h.shape[1] // 2
    if version == 1:
        weight: Tensor | float = factor
    else:
        mean = h.mean(1, keepdim=True)
        flat = mean.flatten(1)
        low = flat.min(dim=-1, keepdim=True).values[..., None, None]
        high = flat.max(dim=-1, keepdim=True).values[..., None, None]
        weight = (factor - 1) * ((mean - low) / (high - low)) + 1
    return torch.cat([h[:, :half] * weight, h[:, half:]], dim=1)


def backbone_widths(config: UNetConfig) -> list[int]:
    """Channels of the backbone input `h` of every output block (before its skip is concatenated)."""
    widths: list[int] = []
    previous = config.block_channels[-1]
    for level in reversed(range(len(config.block_channels))):
        for _ in range(config.layers_per_block + 1):
            widths.append(previous)
            previous = config.block_channels[level]
    return widths


def freeu_factors(
    config: UNetConfig, backbone: tuple[float, float], skip: tuple[float, float], rule: str
) -> list[tuple[float, float] | None]:
    """(backbone factor, skip factor) for every output block, or None where FreeU leaves it alone."""
    if rule not in FREEU_RULES:
        raise ValueError(f"unknown FreeU rule {rule!r}; choose one of {', '.join(FREEU_RULES)}")
    stages = [(backbone[0], skip[0]), (backbone[1], skip[1])]
    if rule == "up_blocks":
        per_level = config.layers_per_block + 1
        count = len(config.block_channels) * per_level
        return [stages[index // per_level] if index // per_level < 2 else None for index in range(count)]
    base = config.block_channels[0]
    by_width = {4 * base: stages[0], 2 * base: stages[1]}
    return [by_width.get(width) for width in backbone_widths(config)]


class FreeUSkip(fl.Chain, Adapter[ResidualConcatenator]):
    """Wraps an output block's skip concatenation: scales the backbone input, filters the skip, then concatenates."""

    def __init__(self, target: ResidualConcatenator, backbone: float, skip: float, version: int = 1) -> None:
        if version not in (1, 2):
            raise ValueError(f"FreeU version must be 1 or 2, got {version}")
        self.backbone, self.skip, self.version = backbone, skip, version
        self.index = target.index
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, x: Tensor) -> Tensor:
        residuals = self.use_context("unet")["residuals"]
        skip = residuals[self.index]
        residuals[self.index] = fourier_filter(skip, threshold=1, scale=self.skip)
        try:
            return self[0](scale_backbone(x, self.backbone, self.version))
        finally:
            residuals[self.index] = skip

    def describe(self) -> str:
        return f"FreeUSkip(v{self.version}, backbone={self.backbone:g}, skip={self.skip:g})"


def inject_freeu(
    unet: UNet,
    backbone: tuple[float, float],
    skip: tuple[float, float],
    version: int = 1,
    rule: str = "channels",
) -> list[FreeUSkip]:
    """Wrap the skip concatenation of every output block FreeU acts on; eject the returned adapters to undo."""
    factors = freeu_factors(unet.config, backbone, skip, rule)
    concatenators = list(unet.ensure_find(UpBlocks).layers(ResidualConcatenator))
    order = sorted(concatenators, key=lambda layer: -layer.index)  # output block k concatenates skip n-1-k
    adapters: list[FreeUSkip] = []
    try:
        for concatenator, factor in zip(order, factors):
            if factor is not None:
                adapters.append(FreeUSkip(concatenator, factor[0], factor[1], version).inject())
    except BaseException:
        for adapter in reversed(adapters):
            adapter.eject()
        raise
    return adapters


class FreeUPatch:
    """A `ModelPatch`: FreeU (version 1) or FreeU v2 on the UNet's decoder for the run (no extra pass)."""

    def __init__(
        self,
        b1: float = 1.1,
        b2: float = 1.2,
        s1: float = 0.9,
        s2: float = 0.2,
        version: int = 1,
        rule: str = "channels",
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"FreeU version must be 1 or 2, got {version}")
        if rule not in FREEU_RULES:
            raise ValueError(f"unknown FreeU rule {rule!r}; choose one of {', '.join(FREEU_RULES)}")
        self.backbone, self.skip, self.version, self.rule = (b1, b2), (s1, s2), version, rule

    @property
    def label(self) -> str:
        name = "FreeU" if self.version == 1 else "FreeU v2"
        (b1, b2), (s1, s2) = self.backbone, self.skip
        return f"{name} (b1 {b1:g}, b2 {b2:g}, s1 {s1:g}, s2 {s2:g}; by {self.rule})"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None:
            return lambda: None
        adapters = inject_freeu(model.unet, self.backbone, self.skip, self.version, self.rule)

        def undo() -> None:
            for adapter in reversed(adapters):
                adapter.eject()

        return undo
