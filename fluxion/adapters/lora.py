"""LoRA: a low-rank update `scale * up(down(x))` added to a Linear or Conv2d layer's output."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ..layers.basics import Multiply
from ..layers.chain import Chain, Sum
from ..layers.module import WeightedModule
from ..layers.weighted import Conv2d, Linear
from .adapter import Adapter

T = TypeVar("T", bound=WeightedModule)


class Lora(Chain, Generic[T]):
    """`scale * up(down(x))`; `up` starts at zero so a fresh LoRA changes nothing."""

    _tag = "LORA"

    def __init__(self, name: str, rank: int, scale: float, *layers: WeightedModule) -> None:
        self.name = name
        self.rank = rank
        super().__init__(*layers, Multiply(scale))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.down.weight, std=1 / self.rank)
        torch.nn.init.zeros_(self.up.weight)

    @property
    def down(self) -> Any:
        return self[0]

    @property
    def up(self) -> Any:
        return self[1]

    @property
    def scale(self) -> float:
        return self.ensure_find(Multiply).scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.ensure_find(Multiply).scale = value

    def load_weights(self, down_weight: Tensor, up_weight: Tensor) -> None:
        """Copy trained weights in (shapes must match this LoRA's layers)."""
        for layer, weight, role in ((self.down, down_weight, "down"), (self.up, up_weight, "up")):
            if tuple(weight.shape) != tuple(layer.weight.shape):
                raise ValueError(
                    f"LoRA {self.name!r}: {role} weight has shape {tuple(weight.shape)}, "
                    f"expected {tuple(layer.weight.shape)}"
                )
            with torch.no_grad():
                layer.weight.copy_(weight.to(device=layer.weight.device, dtype=layer.weight.dtype))

    def delta_weight(self, dtype: DType | None = None) -> Tensor:
        """The update this LoRA adds to its target's weight (`scale * up @ down`), computed in `dtype` (default:
        the LoRA's own; fusing into fp16 weights asks for float32, rounded once when added)."""
        down = self.down.weight.flatten(1).to(dtype)
        up = self.up.weight.flatten(1).to(dtype)
        return self.scale * (up @ down)

    def is_compatible(self, layer: WeightedModule) -> bool:
        raise NotImplementedError


class LinearLora(Lora[Linear]):
    def __init__(
        self,
        name: str,
        in_features: int,
        out_features: int,
        rank: int = 16,
        scale: float = 1.0,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        super().__init__(
            name,
            rank,
            scale,
            Linear(in_features, rank, bias=False, device=device, dtype=dtype),
            Linear(rank, out_features, bias=False, device=device, dtype=dtype),
        )

    def is_compatible(self, layer: WeightedModule) -> bool:
        return (
            isinstance(layer, Linear)
            and layer.in_features == self.in_features
            and layer.out_features == self.out_features
        )

    def delta_weight(self, dtype: DType | None = None) -> Tensor:
        return self.scale * (self.up.weight.to(dtype) @ self.down.weight.to(dtype))


class Conv2dLora(Lora[Conv2d]):
    """`down` has the target's kernel, stride and padding; `up` is 1x1 (kohya's "LoCon")."""

    def __init__(
        self,
        name: str,
        in_channels: int,
        out_channels: int,
        rank: int = 16,
        scale: float = 1.0,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        super().__init__(
            name,
            rank,
            scale,
            Conv2d(
                in_channels,
                rank,
                kernel_size,
                stride=stride,
                padding=padding,
                use_bias=False,
                device=device,
                dtype=dtype,
            ),
            Conv2d(rank, out_channels, 1, use_bias=False, device=device, dtype=dtype),
        )

    def is_compatible(self, layer: WeightedModule) -> bool:
        return (
            isinstance(layer, Conv2d)
            and layer.in_channels == self.in_channels
            and layer.out_channels == self.out_channels
            and tuple(layer.kernel_size) == tuple(self.down.kernel_size)
            and tuple(layer.stride) == tuple(self.down.stride)
        )

    def delta_weight(self, dtype: DType | None = None) -> Tensor:
        down = self.down.weight.to(dtype)  # (rank, in, kh, kw)
        up = self.up.weight.flatten(1).to(dtype)  # (out, rank)
        return self.scale * torch.einsum("or,rihw->oihw", up, down)


class LoraAdapter(Sum, Adapter[WeightedModule]):
    """Several named LoRAs on one Linear/Conv2d target: `target(x) + sum(lora(x))`."""

    def __init__(self, target: WeightedModule, /, *loras: Lora[Any]) -> None:
        for lora in loras:
            if not lora.is_compatible(target):
                raise ValueError(f"LoRA {lora.name!r} does not fit {target.describe()}")
        names = [lora.name for lora in loras]
        if len(set(names)) != len(names):
            raise ValueError(f"LoRA names must be unique on one target, got {names}")
        with self.setup_adapter(target):
            super().__init__(target, *loras)

    @property
    def loras(self) -> dict[str, Lora[Any]]:
        return {lora.name: lora for lora in self.iter_loras()}

    @property
    def names(self) -> list[str]:
        return list(self.loras)

    def add_lora(self, lora: Lora[Any]) -> None:
        if not lora.is_compatible(self.target):
            raise ValueError(f"LoRA {lora.name!r} does not fit {self.target.describe()}")
        if lora.name in self.loras:
            raise ValueError(f"a LoRA named {lora.name!r} is already on this layer")
        self.append(lora)

    def remove_lora(self, name: str) -> Lora[Any]:
        lora = self.loras.get(name)
        if lora is None:
            raise ValueError(f"no LoRA named {name!r} on this layer (it has {self.names})")
        self.remove(lora)
        return lora

    def iter_loras(self) -> Iterator[Lora[Any]]:
        """The LoRAs directly on this target (not those of adapters nested inside)."""
        return (child for child in self if isinstance(child, Lora))


class SingleLoraAdapter(LoraAdapter):
    """One LoRA of the given rank on a Linear or Conv2d (the seed's `SingleLoraAdapter`)."""

    def __init__(
        self, target: Linear | Conv2d, rank: int = 16, scale: float = 1.0, name: str = "lora"
    ) -> None:
        lora: Lora[Any]
        if isinstance(target, Linear):
            lora = LinearLora(
                name,
                target.in_features,
                target.out_features,
                rank,
                scale,
                device=target.device,
                dtype=target.dtype,
            )
        elif isinstance(target, Conv2d):
            lora = Conv2dLora(
                name,
                target.in_channels,
                target.out_channels,
                rank,
                scale,
                kernel_size=target.kernel_size,  # type: ignore[arg-type]
                stride=target.stride,  # type: ignore[arg-type]
                padding=target.padding,  # type: ignore[arg-type]
                device=target.device,
                dtype=target.dtype,
            )
        else:
            raise TypeError(f"SingleLoraAdapter targets a Linear or Conv2d, got {type(target).__name__}")
        super().__init__(target, lora)

    @property
    def lora(self) -> Lora[Any]:
        return next(self.iter_loras())
