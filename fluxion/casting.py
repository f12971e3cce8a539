"""Weights stored in one dtype, computed in another: `compute_in(module, dtype)`.

A model may be kept in a small storage dtype (e.g. float16 on a CPU, which computes poorly in float16) and run in
a compute dtype (float32). `compute_in` hooks every layer that owns floating-point weights of another dtype: for
its forward pass the layer's weights are cast to the compute dtype (a temporary copy, one layer at a time) and its
floating-point inputs too; afterwards, also when the forward raises, the stored weights are back in place. The
stored weights never change, so switching back (`compute_in(module, None)`) gives the model as it was.

Layers added later (e.g. LoRA layers injected for one run) are hooked when the module runs, or by calling
`compute_in` again. Structural copies share their leaf layers, so they compute in the same dtype.

Weights streamed from another device: `stream_weights(layer, True, device)`. A memory manager that cannot fit a
whole model on its device (ComfyUI's `--lowvram`, `--novram`, or a partial load when memory is short) leaves some
layers' weights on the offload device; such a layer gets its weights copied to the compute device (`device`, else
its input's device) for each forward pass, with the per-layer weight functions the manager attached
(`weight_function` / `bias_function` lists, ComfyUI's protocol) applied to the copies. Every `WeightedModule`
exposes this switch as `comfy_cast_weights`, the attribute ComfyUI's ModelPatcher sets on the layers it streams.
`compute_placement(module)` tells where and in which dtype a module computes, whatever its weights' storage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

_COMPUTE = "_fluxion_compute_dtype"
_LEAF = "_fluxion_cast_state"


class _LeafCast:
    """The hooks of one layer, what they do, and its stored weights while its forward runs (a stack: calls nest).

    `dtype`: the compute dtype of its floating-point tensors (None: their own). `streamed`: its tensors may live
    off the compute device and are copied to `device` (None: the input's device) for each call."""

    def __init__(self) -> None:
        self.dtype: torch.dtype | None = None
        self.streamed = False
        self.device: torch.device | None = None
        self.unannounced = False  # streamed by `set_stream_device` because its tensors were elsewhere
        self.stored: list[dict[str, Tensor]] = []
        self.handles: list[RemovableHandle] = []


def _own_floating(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [(name, tensor) for name, tensor in _own_tensors(module) if tensor.is_floating_point()]


def _own_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [
        (name, tensor)
        for name, tensor in (*module._parameters.items(), *module._buffers.items())
        if tensor is not None
    ]


def _cast_value(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast_value(item, dtype) for item in value)
    if isinstance(value, list):
        return [_cast_value(item, dtype) for item in value]
    return value


def _input_device(value: Any) -> torch.device | None:
    if isinstance(value, Tensor):
        return value.device
    if isinstance(value, (tuple, list)):
        for item in value:
            device = _input_device(item)
            if device is not None:
                return device
    return None


def _before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    state: _LeafCast = module.__dict__[_LEAF]
    device = (state.device or _input_device(args)) if state.streamed else None
    stored: dict[str, Tensor] = {}
    for name, tensor in _own_tensors(module):
        dtype = state.dtype if state.dtype is not None and tensor.is_floating_point() else tensor.dtype
        functions = module.__dict__.get(f"{name}_function") if state.streamed else None
        target = tensor
        if functions or tensor.dtype != dtype or (device is not None and tensor.device != device):
            target = tensor.to(  # a copy when functions follow: they may work in place (ComfyUI's patches do)
                device=device or tensor.device,
                dtype=dtype,
                non_blocking=tensor.is_pinned(),
                copy=bool(functions),
            )
        for function in functions or ():
            target = function(target)
        if target is not tensor:
            stored[name] = tensor
            table = module._parameters if name in module._parameters else module._buffers
            table[name] = target  # type: ignore[assignment]  # the forward reads the copy
    state.stored.append(stored)
    return args if state.dtype is None else _cast_value(args, state.dtype)


def _after(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    state: _LeafCast = module.__dict__[_LEAF]
    if state.stored:
        for name, tensor in state.stored.pop().items():
            table = module._parameters if name in module._parameters else module._buffers
            table[name] = tensor  # type: ignore[assignment]
    return output


def _leaf_state(module: nn.Module) -> _LeafCast:
    state: _LeafCast | None = module.__dict__.get(_LEAF)
    if state is None:
        state = _LeafCast()
        state.handles.append(module.register_forward_pre_hook(_before))
        state.handles.append(module.register_forward_hook(_after, always_call=True))
        module.__dict__[_LEAF] = state
    return state


def _release_leaf(module: nn.Module) -> None:
    """Remove the layer's hooks once they have nothing left to do."""
    state: _LeafCast | None = module.__dict__.get(_LEAF)
    if state is not None and state.dtype is None and not state.streamed and not state.stored:
        for handle in state.handles:
            handle.remove()
        del module.__dict__[_LEAF]


def _hook_leaf(module: nn.Module, dtype: torch.dtype) -> None:
    _leaf_state(module).dtype = dtype


def _unhook_leaf(module: nn.Module) -> None:
    state: _LeafCast | None = module.__dict__.get(_LEAF)
    if state is not None:
        state.dtype = None
        _release_leaf(module)


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


def stream_weights(layer: nn.Module, streamed: bool, device: torch.device | None = None) -> None:
    """Copy `layer`'s own weights to `device` (None: its input's device) for each forward pass, or stop."""
    if streamed:
        state = _leaf_state(layer)
        state.streamed = True
        state.device = None if device is None else torch.device(device)
        return
    state = layer.__dict__.get(_LEAF)
    if state is not None:
        state.streamed, state.device, state.unannounced = False, None, False
        _release_leaf(layer)


def is_streamed(layer: nn.Module) -> bool:
    """Whether `layer`'s weights are copied to the compute device for each forward pass."""
    state: _LeafCast | None = layer.__dict__.get(_LEAF)
    return state is not None and state.streamed


def set_stream_device(module: nn.Module, device: torch.device) -> int:
    """Make `device` the compute device of every streamed layer of `module`, and stream any layer whose tensors a
    host left elsewhere without saying so (a layer without ComfyUI's switch that did not fit); the number of
    streamed layers. A layer streamed only for that reason stops being streamed once its tensors are on `device`."""
    device = torch.device(device)
    count = 0
    for layer in module.modules():
        tensors = _own_tensors(layer)
        if not tensors:
            continue
        away = any(tensor.device != device for _, tensor in tensors)
        state: _LeafCast | None = layer.__dict__.get(_LEAF)
        if state is not None and state.streamed and state.unannounced and not away:
            stream_weights(layer, False)
            continue
        if state is None or not state.streamed:
            if not away:
                continue
            stream_weights(layer, True)
            state = _leaf_state(layer)
            state.unannounced = True
        state.device = device
        count += 1
    return count


def compute_placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype `module` computes (read from its first layer with floating-point weights): a
    streamed layer's compute device, a compute dtype set by `compute_in`, else its weights' own."""
    root_dtype: torch.dtype | None = module.__dict__.get(_COMPUTE)
    for layer in module.modules():
        floating = _own_floating(layer)
        if not floating:
            continue
        tensor = floating[0][1]
        state: _LeafCast | None = layer.__dict__.get(_LEAF)
        device = state.device if state is not None and state.streamed and state.device is not None else None
        dtype = state.dtype if state is not None and state.dtype is not None else root_dtype
        return device or tensor.device, dtype or tensor.dtype
    raise ValueError(
        f"{type(module).__name__} has no floating-point weights: it has no compute device or dtype"
    )
