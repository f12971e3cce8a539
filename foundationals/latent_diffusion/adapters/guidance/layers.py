"""Where attention guidance acts: the UNet's self-attention layers, named as diffusers names them.

PAG's applied layers are diffusers' module names matched as regular expressions (`"mid"`, `"down_blocks.2"`,
`"up_blocks.0.attentions.1"`...), as `pag_applied_layers`; SAG records the first self-attention of the middle
block. Each guidance wraps the attention's `ScaledDotProductAttention` slot, so LoRA on the projections,
reference-only on the whole attention and other adapters compose with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from .....fluxion import layers as fl
from .....fluxion.adapters.adapter import Adapter
from ....formats.diffusers import diffusers_unet_module_map
from ...model_config import UNetConfig
from ...unet import MiddleBlock, SelfAttentionBlock, UNet, cross_attention_blocks


@lru_cache(maxsize=8)
def self_attention_names(config: UNetConfig) -> tuple[str, ...]:
    """diffusers' module name of every self-attention (attn1), in `cross_attention_blocks` order."""
    twin = UNet(config, device="meta")
    paths = {id(module): path for path, module in twin.named_modules()}
    module_map = diffusers_unet_module_map(twin)
    names = []
    for block in cross_attention_blocks(twin, SelfAttentionBlock):
        query = module_map[f"{paths[id(block)]}.SelfAttention.Distribute.Linear_1"]
        names.append(query.removesuffix(".to_q"))
    return tuple(names)


def named_self_attention_blocks(unet: UNet) -> list[tuple[str, SelfAttentionBlock]]:
    """(diffusers name, block) of every self-attention block of `unet` (adapters may be injected)."""
    blocks: list[SelfAttentionBlock] = cross_attention_blocks(unet, SelfAttentionBlock)
    names = self_attention_names(unet.config)
    if len(names) != len(blocks):
        raise ValueError(f"the UNet has {len(blocks)} self-attention blocks, its config {len(names)}")
    return list(zip(names, blocks))


def match_self_attention_blocks(unet: UNet, patterns: Iterable[str]) -> list[tuple[str, SelfAttentionBlock]]:
    """The self-attention blocks whose diffusers name matches one of `patterns` (`re.search`), in UNet order.

    A pattern that matches nothing is an error naming the layers there are, as diffusers raises.
    """
    named = named_self_attention_blocks(unet)
    chosen: dict[str, SelfAttentionBlock] = {}
    for pattern in patterns:
        try:
            expression = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"layer pattern {pattern!r} is not a regular expression: {error}") from error
        found = [(name, block) for name, block in named if expression.search(name) is not None]
        if not found:
            available = ", ".join(name.removesuffix(".attn1") for name, _ in named)
            raise ValueError(
                f"no self-attention layer matches {pattern!r}; the UNet's are (diffusers names): {available}"
            )
        chosen.update(found)
    return [(name, block) for name, block in named if name in chosen]


def middle_self_attention(unet: UNet) -> SelfAttentionBlock:
    """The first self-attention of the middle block (diffusers' `mid_block.attentions[0].transformer_blocks[0]`)."""
    block = unet.ensure_find(MiddleBlock).find(SelfAttentionBlock)
    if block is None:
        raise ValueError("this UNet's middle block has no self-attention")
    return block


def _holds(module: fl.Module, wanted: type[fl.Module]) -> bool:
    if isinstance(module, wanted):
        return True
    return (
        isinstance(module, Adapter)
        and isinstance(module, fl.Chain)
        and any(_holds(c, wanted) for c in module)
    )


def attention_slot(block: SelfAttentionBlock) -> tuple[fl.SelfAttention, fl.Module]:
    """The block's attention and the child standing where its `ScaledDotProductAttention` is (maybe adapted)."""
    attention = block.ensure_find(fl.SelfAttention)
    for child in attention:
        if _holds(child, fl.ScaledDotProductAttention):
            return attention, child
    raise ValueError("a self-attention without a ScaledDotProductAttention")


def heads_of(attention: fl.SelfAttention) -> int:
    return attention.num_heads
