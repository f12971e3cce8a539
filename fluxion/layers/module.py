"""Module bases: plain, weighted (owns parameters) and context-aware (knows its parent Chain)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ..casting import compute_placement, is_streamed, stream_weights

if TYPE_CHECKING:
    from .chain import Chain

T = TypeVar("T", bound="Module")

# Attribute types shown in a module's one-line description (`Linear(in_features=4, ...)`).
_BASIC_TYPES = (int, float, str, bool, tuple, torch.Size, type(None))


class Module(torch.nn.Module):
    """Base of every fluxion layer: a torch Module with a readable one-line description."""

    _parameters: dict[str, Any]
    _buffers: dict[str, Any]
    _tag: str = "MODULE"

    def __getattr__(self, name: str) -> Any:
        return super().__getattr__(name)

    def load_from_safetensors(self: T, tensors_path: str | Path, strict: bool = True) -> T:
        """Load weights saved by `save_to_safetensors` (or any file with this module's state-dict keys)."""
        from ..utils import load_from_safetensors

        self.load_state_dict(load_from_safetensors(tensors_path), strict=strict)
        return self

    def to(self: T, device: Device | str | None = None, dtype: DType | None = None) -> T:  # type: ignore[override]
        return super().to(device=device, dtype=dtype)  # type: ignore[return-value]

    def basic_attributes(self) -> dict[str, Any]:
        """Public attributes of simple types, shown in the module's description."""
        return {
            key: value
            for key, value in self.__dict__.items()
            if not key.startswith("_") and key != "training" and isinstance(value, _BASIC_TYPES)
        }

    def description_parts(self) -> list[str]:
        """The `key=value` parts shown in this layer's one-line description."""
        return [f"{key}={value}" for key, value in self.basic_attributes().items()]

    def describe(self) -> str:
        """One line: class name and the attributes that define this layer."""
        return f"{type(self).__name__}({', '.join(self.description_parts())})"

    def structural_copy(self: T) -> T:
        """Leaf modules are shared by structural copies (weights are never copied)."""
        return self

    def get_path(self, parent: Chain | None = None, top: Module | None = None) -> str:
        """Dotted place of this module in its tree, e.g. `ViT.Chain_1.Residual_1.Attention`."""
        name = type(self).__name__
        if parent is None and self.__dict__.get("_parent"):
            parent = self.__dict__["_parent"][0]
        if parent is None or parent is top:
            return name
        for key, child in parent._modules.items():
            if child is self:
                return f"{parent.get_path(parent.parent, top)}.{key}"
        return f"{parent.get_path(parent.parent, top)}.{name}"

    def extra_repr(self) -> str:
        return ", ".join(self.description_parts())


class ContextModule(Module):
    """A module that knows its parent Chain, so it can read the tree's contexts."""

    _parent: list[Chain]
    _can_refresh_parent: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parent = []

    @property
    def parent(self) -> Chain | None:
        """The Chain holding this module, or None when it is a root."""
        return self._parent[0] if self._parent else None

    @property
    def ensure_parent(self) -> Chain:
        parent = self.parent
        if parent is None:
            raise ValueError(f"{type(self).__name__} has no parent Chain")
        return parent

    def _set_parent(self, parent: Chain | None) -> None:
        if not self._can_refresh_parent:
            return
        self._parent = [parent] if parent is not None else []

    def get_parents(self) -> list[Chain]:
        """All ancestors, nearest first."""
        parents: list[Chain] = []
        node = self.parent
        while node is not None:
            parents.append(node)
            node = node.parent
        return parents

    def use_context(self, context_name: str) -> dict[str, Any]:
        """The named context of the tree this module belongs to."""
        return self.ensure_parent.use_context(context_name)

    def structural_copy(self: T) -> T:
        clone = object.__new__(type(self))
        clone.__dict__ = self.__dict__.copy()
        clone._parameters = dict(self._parameters)
        clone._buffers = dict(self._buffers)
        clone._modules = dict(self._modules)
        clone._parent = []  # type: ignore[attr-defined]
        return clone


class WeightedModule(Module):
    """A module that owns parameters; exposes the device and dtype it computes in (its parameters' own, unless
    `fluxion.casting` streams them from another device or computes them in another dtype)."""

    @property
    def device(self) -> Device:
        return compute_placement(self)[0]

    @property
    def dtype(self) -> DType:
        return compute_placement(self)[1]

    @property
    def comfy_cast_weights(self) -> bool:
        """Whether this layer's weights are streamed to the compute device for each call (`casting.stream_weights`).

        The name is the one a host's memory manager sets: ComfyUI's ModelPatcher turns it on for the layers it
        leaves on the offload device (`--lowvram`, `--novram`, partial loads) and off when it loads them. It
        reads `weight` and `bias` of such layers (None when absent): a layer without both has no switch."""
        if "weight" not in self._parameters or not ("bias" in self._parameters or "bias" in self.__dict__):
            raise AttributeError(f"{type(self).__name__} has no weight and bias: no comfy_cast_weights")
        return is_streamed(self)

    @comfy_cast_weights.setter
    def comfy_cast_weights(self, streamed: bool) -> None:
        stream_weights(self, bool(streamed))

    def description_parts(self) -> list[str]:
        shapes = [f"{name}={tuple(param.shape)}" for name, param in self.named_parameters(recurse=False)]
        return super().description_parts() + shapes


def tensor_summary(value: Any) -> str:
    """Shape, dtype, device of a tensor, with min/max/mean when it lives on the CPU (else a short repr).

    A tensor on any other device is described by its layout only: its statistics would allocate
    on that device and wait for it, and error messages are built when it may be out of memory.
    """
    if isinstance(value, Tensor):
        text = f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device}"
        if value.device.type == "cpu" and value.numel() > 0 and not value.is_complex():
            data = value.detach()  # no float copy: min/max in the tensor's dtype, mean accumulated in fp32
            try:
                low, high, mean = data.min().item(), data.max().item(), data.mean(dtype=torch.float32).item()
                text += f", min={low:.4g}, max={high:.4g}, mean={mean:.4g}"
            except RuntimeError:  # layouts without reductions (sparse, ...): a summary never fails
                pass
        return text + ")"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(tensor_summary(item) for item in value) + ")"
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."
