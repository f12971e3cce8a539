"""Parameter-free layers: identity, shape operations, a learned constant and dtype/device conversion."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from .module import ContextModule, Module, WeightedModule


class Identity(Module):
    def forward(self, x: Any) -> Any:
        return x


class Reshape(Module):
    """Reshape everything but the batch dimension."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


class Flatten(Module):
    def __init__(self, start_dim: int = 0, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(self.start_dim, self.end_dim)


class Unflatten(Module):
    def __init__(self, dim: int, sizes: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        self.dim = dim
        self.sizes = tuple(sizes)

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(self.dim, self.sizes)


class Transpose(Module):
    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0 = dim0
        self.dim1 = dim1

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(self.dim0, self.dim1)


class Permute(Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class Squeeze(Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.squeeze(self.dim)


class Unsqueeze(Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(self.dim)


class Slicing(Module):
    """`x[..., start:end:step, ...]` along `dim`."""

    def __init__(self, dim: int = 0, start: int = 0, end: int | None = None, step: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.start = start
        self.end = end
        self.step = step

    def forward(self, x: Tensor) -> Tensor:
        return x[(slice(None),) * (self.dim % x.dim()) + (slice(self.start, self.end, self.step),)]


class Chunk(Module):
    """Split into `chunks` pieces along `dim`; returns a tuple."""

    def __init__(self, chunks: int, dim: int = 0) -> None:
        super().__init__()
        self.chunks = chunks
        self.dim = dim

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.chunk(self.chunks, self.dim)


class Unbind(Module):
    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.unbind(self.dim)


class Pad(Module):
    """`torch.nn.functional.pad` with fixed padding (last dimension first)."""

    def __init__(self, padding: tuple[int, ...], mode: str = "constant", value: float = 0.0) -> None:
        super().__init__()
        self.padding = tuple(padding)
        self.mode = mode
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "constant":
            return torch.nn.functional.pad(x, self.padding, mode="constant", value=self.value)
        return torch.nn.functional.pad(x, self.padding, mode=self.mode)


class Parameter(WeightedModule):
    """A learned tensor of shape `dims`, returned for every item of the input's batch."""

    def __init__(
        self,
        *dims: int,
        requires_grad: bool = True,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.weight = torch.nn.Parameter(
            torch.randn(*dims, device=device, dtype=dtype), requires_grad=requires_grad
        )
        self.bias = (
            None  # read by memory managers that stream layers (see `WeightedModule.comfy_cast_weights`)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.expand(x.shape[0], *self.dims)


class Converter(ContextModule):
    """Moves its tensor inputs to the parent Chain's device and/or dtype.

    AssertionError, as in refiners, when it has no parent or the parent has no weights to read them from.
    """

    def __init__(self, set_device: bool = True, set_dtype: bool = True) -> None:
        super().__init__()
        self.set_device = set_device
        self.set_dtype = set_dtype

    def forward(self, *inputs: Any) -> Any:
        parent = self.parent
        if parent is None:
            raise AssertionError(
                "module does not have a parent (a Converter takes its parent Chain's device/dtype)"
            )
        device = parent.device if self.set_device else None
        if self.set_device and device is None:
            raise AssertionError(f"parent has no device ({type(parent).__name__} holds no weighted layer)")
        dtype = parent.dtype if self.set_dtype else None
        if self.set_dtype and dtype is None:
            raise AssertionError(f"parent has no dtype ({type(parent).__name__} holds no weighted layer)")
        converted = tuple(
            x.to(device=device, dtype=dtype if x.is_floating_point() else None)
            if isinstance(x, Tensor)
            else x
            for x in inputs
        )
        return converted[0] if len(converted) == 1 else converted


class Multiply(Module):
    """`scale * x + bias` with fixed numbers."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.bias
