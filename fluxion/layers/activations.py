"""Activation functions as layers."""

from __future__ import annotations

import torch
from torch import Tensor

from .module import Module


class Activation(Module):
    """Base of activation layers (adapters may target them by this type)."""


class SiLU(Activation):
    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x)


class ReLU(Activation):
    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.relu(x)


class Sigmoid(Activation):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)


class GeLU(Activation):
    """GELU, exact (`approximation="none"`) or with the tanh approximation (`"tanh"`)."""

    def __init__(self, approximation: str = "none") -> None:
        super().__init__()
        if approximation not in ("none", "tanh"):
            raise ValueError(f"GeLU approximation must be 'none' or 'tanh', got {approximation!r}")
        self.approximation = approximation

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(x, approximate=self.approximation)


class ApproximateGeLU(Activation):
    """The sigmoid approximation `x * sigmoid(1.702 x)` ("quick GELU" of OpenAI's CLIP)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


QuickGeLU = ApproximateGeLU


class GLU(Activation):
    """Gated linear unit: the input's last dimension splits in (value, gate); `value * activation(gate)`."""

    def __init__(self, activation: Activation) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2 != 0:
            raise ValueError(f"GLU needs an even last dimension, got {x.shape[-1]}")
        value, gate = x.chunk(2, dim=-1)
        return value * self.activation(gate)
