"""Multi-head attention built from layers, computed by torch's scaled_dot_product_attention."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from .basics import Identity
from .chain import Chain, Distribute, Lambda, Parallel
from .context_layers import SetContext, UseContext
from .module import Module
from .weighted import Linear


class ScaledDotProductAttention(Module):
    """Splits heads, runs `scaled_dot_product_attention`, merges heads.

    Inputs: query (B, L, H*D), key (B, S, H*D), value (B, S, H*Dv) and an optional mask of shape
    (L, S), (B, L, S) or (B, H, L, S): boolean (True = attend) or additive float.
    """

    def __init__(self, num_heads: int = 1, is_causal: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.is_causal = is_causal

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
        if query.shape[-1] % self.num_heads != 0:
            raise ValueError(f"width {query.shape[-1]} is not divisible by {self.num_heads} heads")
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)
        out = torch.nn.functional.scaled_dot_product_attention(
            self.split_heads(query),
            self.split_heads(key),
            self.split_heads(value),
            attn_mask=mask,
            is_causal=self.is_causal and mask is None,
        )
        batch, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(batch, length, -1)


class Attention(Chain):
    """Multi-head attention on (query, key, value[, mask]) inputs with separate key/value widths."""

    _tag = "ATTN"

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int = 1,
        key_embedding_dim: int | None = None,
        value_embedding_dim: int | None = None,
        inner_dim: int | None = None,
        use_bias: bool = True,
        is_causal: bool = False,
        use_mask: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.key_embedding_dim = key_embedding_dim or embedding_dim
        self.value_embedding_dim = value_embedding_dim or embedding_dim
        self.inner_dim = inner_dim or embedding_dim
        self.use_bias = use_bias
        self.is_causal = is_causal
        self.use_mask = use_mask
        projections: list[Module] = [
            Linear(self.embedding_dim, self.inner_dim, bias=use_bias, device=device, dtype=dtype),
            Linear(self.key_embedding_dim, self.inner_dim, bias=use_bias, device=device, dtype=dtype),
            Linear(self.value_embedding_dim, self.inner_dim, bias=use_bias, device=device, dtype=dtype),
        ]
        if use_mask:
            projections.append(Identity())
        super().__init__(
            Distribute(*projections),
            ScaledDotProductAttention(num_heads=num_heads, is_causal=is_causal),
            Linear(self.inner_dim, self.embedding_dim, bias=True, device=device, dtype=dtype),
        )


def _self_attention_inputs(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return x, x, x, mask


class SelfAttention(Attention):
    """Attention of a sequence on itself: input x (and a mask when `use_mask`)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int = 1,
        inner_dim: int | None = None,
        use_bias: bool = True,
        is_causal: bool = False,
        use_mask: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            inner_dim=inner_dim,
            use_bias=use_bias,
            is_causal=is_causal,
            use_mask=use_mask,
            device=device,
            dtype=dtype,
        )
        self.insert(
            0, Lambda(_self_attention_inputs) if use_mask else Parallel(Identity(), Identity(), Identity())
        )


def _image_to_tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)


class SelfAttention2d(SelfAttention):
    """Self-attention over the positions of an NCHW feature map."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        use_bias: bool = True,
        is_causal: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            embedding_dim=channels,
            num_heads=num_heads,
            use_bias=use_bias,
            is_causal=is_causal,
            device=device,
            dtype=dtype,
        )
        self.insert(0, SetContext("reshape", "image"))
        self.insert(1, Lambda(_image_to_tokens))
        self.append(Parallel(Identity(), UseContext("reshape", "image")))
        self.append(Lambda(_tokens_to_image))

    def init_context(self) -> dict[str, dict[str, Any]]:
        return {"reshape": {"image": None}}


def image_layout(image: Tensor) -> torch.memory_format:
    """`torch.channels_last` for an NHWC-strided 4-d tensor that is not also NCHW-contiguous, else contiguous."""
    if (
        image.dim() == 4
        and not image.is_contiguous()
        and image.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _tokens_to_image(tokens: Tensor, image: Tensor) -> Tensor:
    # contiguous in the image's layout (NCHW, or NHWC after `fluxion.compile.channels_last`): a strided view
    # makes the convolutions that follow reorder their weights on every call
    return tokens.transpose(1, 2).reshape(image.shape).contiguous(memory_format=image_layout(image))
