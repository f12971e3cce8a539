"""Weights stored in one dtype, computed in another: `compute_in(module, dtype)`.

A model may be kept in a small storage dtype (e.g. float16 on a CPU, which computes poorly in float16) and run in
a compute dtype (float32). `compute_in` hooks every layer that owns floating-point weights of another dtype: for
its forward pass the layer's weights are cast to the compute dtype (a temporary copy, one layer at a time) and its
floating-point inputs too; afterwards, also when the forward raises, the stored weights are back in place. The
stored weights never change, so switching back (`compute_in(module, None)`) gives the model as it was.

Layers added later (e.g. LoRA layers injected for one run) are hooked when the module runs, or by calling
`compute_in` again. Structural copies share their leaf layers, so they compute in the same dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

_COMPUTE = "_fluxion_compute_dtype"
_LEAF = "_fluxion_cast_state"


class _LeafCast:
    """The hooks and the stored weights of one layer while its forward runs (a stack: calls may nest)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.stored: list[dict[str, Tensor]] = []
        self.handles: list[RemovableHandle] = []


def _own_floating(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [
        (name, tensor)
        for name, tensor in (*module._parameters.items(), *module._buffers.items())
        if tensor is not None and tensor.is_floating_point()
    ]


def _cast_value(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast_value(item, dtype) for item in value)
    if isinstance(value, list):
        return [_cast_value(item, dtype) for item in value]
    return value


def _before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    state: _LeafCast = module.__dict__[_LEAF]
    stored: dict[str, Tensor] = {}
    for name, tensor in _own_floating(module):
        if tensor.dtype != state.dtype:
            stored[name] = tensor
            table = module._parameters if name in module._parameters else module._buffers
            table[name] = tensor.to(state.dtype)  # the forward reads the cast copy
    state.stored.append(stored)
    return _cast_value(args, state.dtype)


def _after(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    state: _LeafCast = module.__dict__[_LEAF]
    if state.stored:
        for name, tensor in state.stored.pop().items():
            table = module._parameters if name in module._parameters else module._buffers
            table[name] = tensor
    return output


def _hook_leaf(module: nn.Module, dtype: torch.dtype) -> None:
    state: _LeafCast | None = module.__dict__.get(_LEAF)
    if state is not None:
        state.dtype = dtype
        return
    state = _LeafCast(dtype)
    state.handles.append(module.register_forward_pre_hook(_before))
    state.handles.append(module.register_forward_hook(_after, always_call=True))
    module.__dict__[_LEAF] = state


def _unhook_leaf(module: nn.Module) -> None:
    state: _LeafCast | None = module.__dict__.pop(_LEAF, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()


def _cover(module: nn.Module, *_: Any) -> None:
    """Hook every layer of `module` holding floating-point weights of another dtype than its compute dtype."""
    dtype: torch.dtype | None = module.__dict__.get(_COMPUTE)
    if dtype is None:
        return
    for layer in module.modules():
        if any(tensor.dtype != dtype for _, tensor in _own_floating(layer)):
            _hook_leaf(layer, dtype)


def compute_in(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Run `module` in `dtype` whatever dtype its weights are stored in (None: in their own dtype again)."""
    previous = module.__dict__.get(_COMPUTE)
    if dtype is None:
        module.__dict__.pop(_COMPUTE, None)
        handle = module.__dict__.pop("_fluxion_cover_handle", None)
        if handle is not None:
            handle.remove()
        for layer in module.modules():
            _unhook_leaf(layer)
        return
    module.__dict__[_COMPUTE] = dtype
    if previous is None:
        module.__dict__["_fluxion_cover_handle"] = module.register_forward_pre_hook(_cover)
    _cover(module)


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype `module` computes in when `compute_in` set one, else None (its weights' own dtype)."""
    return module.__dict__.get(_COMPUTE)


def cover_new_layers(module: nn.Module) -> None:
    """Hook the layers added to `module` since `compute_in` (e.g. injected adapters), when it has a compute dtype
    and its root is not what runs (a structural view of it is)."""
    _cover(module)
