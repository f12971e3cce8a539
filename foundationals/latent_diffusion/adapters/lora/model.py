"""LoRA layers beyond fluxion's low-rank ones (LoCon-Tucker, LoHa/LoKr/full deltas, DoRA), and the schedule gate.

`build_lora` picks the layer for one file entry; `ScheduleGate` lets a LoRA act on part of the steps only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import dtype as DType

from .....fluxion import layers as fl
from .....fluxion.adapters.lora import Conv2dLora, LinearLora, Lora
from ....formats.lora import LoraWeights, compute_delta
from ..regional import RegionGate

LORA_SCHEDULE_CONTEXT = "lora_schedule"  # {"progress": fraction of sampling done, 0..1} in a model's tree


def set_lora_progress(model: fl.Chain, progress: float | None) -> None:
    """Tell scheduled LoRAs in `model` how far sampling is (None: every LoRA on)."""
    model.set_context(LORA_SCHEDULE_CONTEXT, {"progress": progress})


class ScheduleGate(fl.ContextModule):
    """Passes a LoRA's output while the tree's sampling progress is in [start, end), else zeros."""

    def __init__(self, start: float, end: float) -> None:
        super().__init__()
        self.start, self.end = start, end

    def forward(self, x: Tensor) -> Tensor:
        parent = self.parent
        context = parent.provider.get_context(LORA_SCHEDULE_CONTEXT) if parent is not None else None
        progress = context.get("progress") if context else None
        return x if progress is None or self.start <= progress < self.end else torch.zeros_like(x)


# -- LoRA layers beyond fluxion's plain LinearLora / Conv2dLora ----------------------------------------


def _conv_settings(target: fl.WeightedModule) -> dict[str, Any]:
    if isinstance(target, torch.nn.Conv2d):
        return {
            "stride": target.stride,
            "padding": target.padding,
            "dilation": target.dilation,
            "groups": target.groups,
        }
    return {}


def _apply_weight(x: Tensor, weight: Tensor, conv: Mapping[str, Any]) -> Tensor:
    """`x` through a bias-free layer of `weight` (linear, or conv with the target's settings)."""
    return F.conv2d(x, weight, **conv) if conv else F.linear(x, weight)


class TuckerConv2dLora(Lora[fl.Conv2d]):
    """LoCon with a Tucker core: 1x1 `down`, k×k `mid` (the target's stride/padding), 1x1 `up`."""

    def __init__(
        self, name: str, target: fl.Conv2d, down: Tensor, mid: Tensor, up: Tensor, scale: float
    ) -> None:
        self.in_channels, self.out_channels = target.in_channels, target.out_channels
        options = {"device": target.device, "dtype": target.dtype, "use_bias": False}
        super().__init__(
            name,
            down.shape[0],
            scale,
            fl.Conv2d(target.in_channels, down.shape[0], 1, **options),  # type: ignore[arg-type]
            fl.Conv2d(
                mid.shape[1],
                mid.shape[0],
                target.kernel_size,  # type: ignore[arg-type]
                stride=target.stride,  # type: ignore[arg-type]
                padding=target.padding,  # type: ignore[arg-type]
                **options,  # type: ignore[arg-type]
            ),
            fl.Conv2d(up.shape[1], target.out_channels, 1, **options),  # type: ignore[arg-type]
        )
        with torch.no_grad():
            for layer, weight in zip(self[:3], (down, mid, up)):
                layer.weight.copy_(weight.reshape(layer.weight.shape))  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Weights always come from a file."""

    @property
    def mid(self) -> Any:
        return self[1]

    @property
    def up(self) -> Any:
        return self[2]

    def is_compatible(self, layer: fl.WeightedModule) -> bool:
        return (
            isinstance(layer, fl.Conv2d)
            and layer.in_channels == self.in_channels
            and layer.out_channels == self.out_channels
            and tuple(layer.kernel_size) == tuple(self.mid.kernel_size)
        )

    def delta_weight(self, dtype: DType | None = None) -> Tensor:
        core, up, down = (
            w.to(dtype) for w in (self.mid.weight, self.up.weight.flatten(1), self.down.weight.flatten(1))
        )
        return self.scale * torch.einsum("abhw,oa,bi->oihw", core, up, down)


class WeightFactors(fl.WeightedModule):
    """The stored factors of a LoHa/LoKr/full delta; `delta()` rebuilds ΔW in the target's shape."""

    def __init__(self, method: str, tensors: Mapping[str, Tensor], target: fl.WeightedModule) -> None:
        super().__init__()
        self.method = method
        self.shape = tuple(target.weight.shape)
        self._conv = _conv_settings(target)
        for role, tensor in tensors.items():
            weight = tensor.to(device=target.device, dtype=target.dtype)
            self.register_parameter(role, torch.nn.Parameter(weight, requires_grad=False))

    def delta(self, dtype: DType | None = None) -> Tensor:
        factors = {role: tensor.to(dtype) for role, tensor in self.named_parameters(recurse=False)}
        return compute_delta(self.method, factors, self.shape)

    def forward(self, x: Tensor) -> Tensor:
        return _apply_weight(x, self.delta(), self._conv)


class DeltaLora(Lora[fl.WeightedModule]):
    """A LoRA whose update is a full ΔW rebuilt from factors each call (LoHa, LoKr, full diff)."""

    def __init__(self, name: str, target: fl.WeightedModule, weights: LoraWeights, scale: float) -> None:
        self.shape = tuple(target.weight.shape)
        factors = WeightFactors(weights.method, weights.tensors, target)
        factors.delta()  # fails now, not at sampling time, when the factors don't fit the layer
        super().__init__(name, weights.rank or 0, scale, factors)

    def reset_parameters(self) -> None:
        """Weights always come from a file."""

    def is_compatible(self, layer: fl.WeightedModule) -> bool:
        return tuple(layer.weight.shape) == self.shape

    def delta_weight(self, dtype: DType | None = None) -> Tensor:
        return self.scale * self[0].delta(dtype)  # type: ignore[operator]


class DoraLora(Lora[fl.WeightedModule]):
    """DoRA: `m ⊙ (W + sΔW) / ‖W + sΔW‖`, applied as the difference to `W` (norm per output, or per input).

    `scale` is the user strength `s`; the inner LoRA carries alpha/rank.
    """

    def __init__(
        self, name: str, target: fl.WeightedModule, inner: Lora[Any], magnitude: Tensor, scale: float
    ) -> None:
        self._target_layer = [target]  # not a child: the adapter already holds the target
        self._conv = _conv_settings(target)
        weight = target.weight
        if magnitude.numel() == weight.shape[0]:
            self.norm_dim = 0  # one magnitude per output channel (peft, LyCORIS wd_on_out)
        elif weight.dim() >= 2 and magnitude.numel() == weight.shape[1]:
            self.norm_dim = 1  # one per input channel (early LyCORIS DoRA)
        else:
            raise ValueError(
                f"DoRA magnitude of {magnitude.numel()} values fits neither side of {tuple(weight.shape)}"
            )
        shape = [1] * weight.dim()
        shape[self.norm_dim] = magnitude.numel()
        parameter = fl.Parameter(*shape, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            parameter.weight.copy_(magnitude.reshape(shape))
        super().__init__(name, inner.rank, scale, inner, parameter)

    def reset_parameters(self) -> None:
        """Weights always come from a file."""

    @property
    def inner(self) -> Lora[Any]:
        return self[0]  # type: ignore[return-value]

    @property
    def scale(self) -> float:
        return self[2].scale  # type: ignore[union-attr]

    @scale.setter
    def scale(self, value: float) -> None:
        self[2].scale = value  # type: ignore[union-attr]

    def is_compatible(self, layer: fl.WeightedModule) -> bool:
        return layer is self._target_layer[0]

    def delta_weight(self, dtype: DType | None = None) -> Tensor:
        inner = self.inner.delta_weight(dtype)
        weight = self._target_layer[0].weight.to(device=inner.device, dtype=inner.dtype)
        adapted = weight + self.scale * inner.reshape(weight.shape)
        other = [dim for dim in range(weight.dim()) if dim != self.norm_dim]
        norm = adapted.norm(dim=other, keepdim=True)
        return self[1].weight.to(inner.dtype) * adapted / norm - weight  # type: ignore[union-attr]

    def forward(self, x: Tensor) -> Tensor:
        output = _apply_weight(x, self.delta_weight().to(x.dtype), self._conv)
        for gate in (self.find(ScheduleGate), self.find(RegionGate)):
            if gate is not None:
                output = gate(output)
        return output


def _as_target_shape(tensor: Tensor, target: fl.WeightedModule, role: str) -> Tensor:
    """A 1x1-conv LoRA factor on a Linear (or a 2-D factor on a 1x1 conv): same numbers, target form."""
    if isinstance(target, fl.Linear) and tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
        return tensor.flatten(1)
    if isinstance(target, fl.Conv2d) and tensor.dim() == 2:
        return tensor[:, :, None, None]
    return tensor


def build_lora(name: str, target: fl.WeightedModule, weights: LoraWeights, strength: float) -> Lora[Any]:
    """The fluxion LoRA layer for one normalized entry on our `target` (raises if it doesn't fit)."""
    if weights.dora_scale is not None:
        inner = build_lora(name, target, LoraWeights(**{**weights.__dict__, "dora_scale": None}), 1.0)
        return DoraLora(name, target, inner, weights.dora_scale, strength)
    scale = strength * weights.scale
    if weights.method != "lora":
        return DeltaLora(name, target, weights, scale)
    options = {"device": target.device, "dtype": target.dtype}
    down = _as_target_shape(weights.down, target, "down")
    up = _as_target_shape(weights.up, target, "up")
    rank = down.shape[0]
    lora: Lora[Any]
    if weights.mid is not None:
        if not isinstance(target, fl.Conv2d):
            raise ValueError(f"a LoCon Tucker core needs a Conv2d, {name!r} targets {target.describe()}")
        lora = TuckerConv2dLora(name, target, down, weights.mid, up, scale)
    elif isinstance(target, fl.Linear):
        lora = LinearLora(name, target.in_features, target.out_features, rank, scale, **options)  # type: ignore[arg-type]
    elif isinstance(target, fl.Conv2d):
        kernel = tuple(down.shape[2:])
        lora = Conv2dLora(
            name,
            target.in_channels,
            target.out_channels,
            rank,
            scale,
            kernel_size=kernel,  # type: ignore[arg-type]
            stride=target.stride if kernel != (1, 1) else 1,  # type: ignore[arg-type]
            padding=target.padding if kernel != (1, 1) else 0,  # type: ignore[arg-type]
            **options,  # type: ignore[arg-type]
        )
        if kernel == (1, 1) and tuple(target.kernel_size) != (1, 1):
            raise ValueError(f"a 1x1 LoRA does not fit {target.describe()}")
    else:
        raise ValueError(f"LoRA needs a Linear or Conv2d, got {target.describe()}")
    if not lora.is_compatible(target):
        raise ValueError(
            f"LoRA {name!r} (down {tuple(down.shape)}, up {tuple(up.shape)}) does not fit {target.describe()}"
        )
    lora.load_weights(down, up)
    return lora


# -- The manager --------------------------------------------------------------------------------------
