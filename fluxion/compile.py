"""Opt-in speed paths: `torch.compile` of a Chain's heavy blocks, and channels-last convolution weights.

`compile_blocks(root, (BlockType, ...))` compiles every block of those types in place
(`nn.Module.compile`: the module keeps its place in the tree, its parameters and its state dict).
Blocks of one type and structure share one compiled graph (regional compilation). Dynamo guards on
each block's structure, so injecting or ejecting an adapter inside a compiled block makes the next
call recompile that block (or, past `torch._dynamo.config.recompile_limit`, which `compile_blocks`
raises to twice the number of blocks plus 8, run it eagerly): the output is always the eager one's. A block wrapped by an adapter keeps its compiled call.
`uncompile(root)` goes back to eager everywhere.

Weights are not frozen into the graphs: in-place weight changes (LoRA fuse / unfuse) are seen.

`channels_last(root)` stores every 4-d weight channels-last (NHWC), so convolutions run on NHWC
activations without reordering their weights on every call, and spatial attention reads its tokens
without a copy; `channels_last(root, False)` goes back. It copies those weights (they stop sharing
storage with a memory-mapped file or another model), and safetensors cannot save NHWC tensors as they
are: go back first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .layers.module import Module


def _blocks(root: torch.nn.Module, block_types: tuple[type[Module], ...]) -> Iterator[torch.nn.Module]:
    for module in root.modules():
        if isinstance(module, block_types):
            yield module


def compile_blocks(
    root: torch.nn.Module, block_types: tuple[type[Module], ...] | None = None, **options: Any
) -> list[torch.nn.Module]:
    """Compile (in place) every module of `block_types` in `root`, or `root` itself when None.

    `options` go to `torch.compile` (e.g. `backend="inductor"`, `mode`, `dynamic`). Returns the
    compiled modules. Calling it again recompiles them with the new options.
    """
    targets = [root] if block_types is None else list(_blocks(root, block_types))
    # Blocks of one class share their forward's code object, and dynamo keeps `recompile_limit` graphs per
    # code object (default 8; past it, the rest run eagerly): leave room for one graph per block, plus
    # the recompiles adapters cause.
    limit = 2 * len(targets) + 8
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    for module in targets:
        module.compile(**options)
    return targets


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compiled_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `root` (itself included) that run a compiled call."""
    return [module for module in root.modules() if is_compiled(module)]


def uncompile(root: torch.nn.Module) -> None:
    """Every module of `root` back to its eager call."""
    for module in compiled_modules(root):
        module._compiled_call_impl = None


def channels_last(root: torch.nn.Module, enabled: bool = True) -> int:
    """Store `root`'s 4-d parameters channels-last (or back to contiguous NCHW); returns how many changed.

    The values do not change, only the memory layout, in place (the Parameter objects stay the same, so
    adapters and LoRA managers holding them keep working). Inputs may stay NCHW: the first convolution
    with an NHWC weight gives NHWC activations; outputs come back NHWC-strided (same values).
    """
    layout = torch.channels_last if enabled else torch.contiguous_format
    changed = 0
    with torch.no_grad():
        for parameter in root.parameters():
            if parameter.dim() == 4 and not parameter.is_contiguous(memory_format=layout):
                parameter.data = parameter.data.contiguous(memory_format=layout)
                changed += 1
    return changed
