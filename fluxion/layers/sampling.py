"""Resampling layers: interpolation, strided-conv downsampling and nearest+conv upsampling."""

from __future__ import annotations

from typing import Any

import torch
from torch import Size, Tensor
from torch import device as Device
from torch import dtype as DType

from .basics import Identity, Pad
from .chain import Chain, Parallel
from .context_layers import SetContext, UseContext
from .module import Module
from .weighted import Conv2d


class Interpolate(Module):
    """Resize an NCHW tensor to the spatial `shape` given as second input."""

    def __init__(self, mode: str = "nearest", antialias: bool = False) -> None:
        super().__init__()
        self.mode = mode
        self.antialias = antialias

    def forward(self, x: Tensor, shape: Size | tuple[int, int]) -> Tensor:
        return torch.nn.functional.interpolate(
            x, size=tuple(shape[-2:]), mode=self.mode, antialias=self.antialias
        )


def _push_shape(shapes: list[Size], x: Tensor) -> None:
    shapes.append(x.shape[2:])


def _pop_shape(shapes: list[Size]) -> Size:
    return shapes.pop()


class Downsample(Chain):
    """Strided 3x3 convolution; remembers the input size so an `Upsample` can restore it exactly.

    `padding=0` pads right and bottom by one first (as SD's autoencoder does).
    """

    def __init__(
        self,
        channels: int,
        scale_factor: int = 2,
        padding: int = 1,
        register_shape: bool = True,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.channels = channels
        self.scale_factor = scale_factor
        self.padding = padding
        self.register_shape = register_shape
        layers: list[Module] = []
        if register_shape:
            layers.append(SetContext("sampling", "shapes", callback=_push_shape))
        if padding == 0:
            layers.append(Pad((0, 1, 0, 1)))
        layers.append(
            Conv2d(channels, channels, 3, stride=scale_factor, padding=padding, device=device, dtype=dtype)
        )
        super().__init__(*layers)

    def init_context(self) -> dict[str, dict[str, Any]]:
        return {"sampling": {"shapes": []}} if self.register_shape else {}


class Upsample(Chain):
    """Nearest-neighbour upsampling then a 3x3 convolution.

    With `upsample_factor=None` the target size is the one the matching `Downsample` saw;
    otherwise the input is scaled by `upsample_factor`.
    """

    def __init__(
        self,
        channels: int,
        upsample_factor: int | None = None,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.channels = channels
        self.upsample_factor = upsample_factor
        target_size: Module = (
            UseContext("sampling", "shapes").compose(_pop_shape)
            if upsample_factor is None
            else _ScaledSize(upsample_factor)
        )
        super().__init__(
            Parallel(Identity(), target_size),
            Interpolate(),
            Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype),
        )


class _ScaledSize(Module):
    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Size:
        return Size((x.shape[2] * self.factor, x.shape[3] * self.factor))
