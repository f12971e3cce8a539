"""Layers with weights: linear, convolutions, normalisations, embeddings."""

from __future__ import annotations

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from .activations import Activation, ReLU
from .chain import Chain
from .module import Module, WeightedModule


class Linear(torch.nn.Linear, WeightedModule):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def basic_attributes(self) -> dict[str, object]:
        return {"in_features": self.in_features, "out_features": self.out_features}


class MultiLinear(Chain):
    """An MLP: `num_layers` Linear layers with `activation` between them."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        inner_dim: int,
        num_layers: int,
        activation: type[Activation] = ReLU,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        layers: list[Module] = []
        for index in range(num_layers):
            layers.append(
                Linear(
                    input_dim if index == 0 else inner_dim,
                    output_dim if index == num_layers - 1 else inner_dim,
                    device=device,
                    dtype=dtype,
                )
            )
            if index < num_layers - 1:
                layers.append(activation())
        super().__init__(*layers)


class Conv2d(torch.nn.Conv2d, WeightedModule):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        groups: int = 1,
        use_bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=use_bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.use_bias = use_bias

    def basic_attributes(self) -> dict[str, object]:
        attributes: dict[str, object] = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
        }
        if self.stride != (1, 1):
            attributes["stride"] = self.stride
        if self.padding not in ((0, 0), 0):
            attributes["padding"] = self.padding
        return attributes


class ConvTranspose2d(torch.nn.ConvTranspose2d, WeightedModule):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        output_padding: int | tuple[int, int] = 0,
        groups: int = 1,
        use_bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            bias=use_bias,
            dilation=dilation,
            device=device,
            dtype=dtype,
        )
        self.use_bias = use_bias

    def basic_attributes(self) -> dict[str, object]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
        }


class LayerNorm(torch.nn.LayerNorm, WeightedModule):
    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype
        )

    def basic_attributes(self) -> dict[str, object]:
        return {"normalized_shape": self.normalized_shape, "eps": self.eps}


class LayerNorm2d(WeightedModule):
    """LayerNorm over the channels of an NCHW tensor, at every position."""

    def __init__(
        self, channels: int, eps: float = 1e-6, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))
        self.channels = channels
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        normalized = (x - mean) / torch.sqrt(variance + self.eps)
        return self.weight[:, None, None] * normalized + self.bias[:, None, None]


class GroupNorm(torch.nn.GroupNorm, WeightedModule):
    def __init__(
        self,
        channels: int,
        num_groups: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            num_groups=num_groups, num_channels=channels, eps=eps, affine=affine, device=device, dtype=dtype
        )
        self.channels = channels

    def basic_attributes(self) -> dict[str, object]:
        return {"channels": self.channels, "num_groups": self.num_groups, "eps": self.eps}


class Embedding(torch.nn.Embedding, WeightedModule):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        # On the meta device there is nothing to initialise; torch's `normal_` there goes through its Python
        # decompositions and imports torch._dynamo (~2 s, most of a single-file load's time).
        weight = None
        if device is not None and torch.device(device).type == "meta":
            weight = torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype)
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype, _weight=weight)
        self.bias = None  # what memory managers read of every layer they may stream (ComfyUI's Embedding too)

    def basic_attributes(self) -> dict[str, object]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim}
