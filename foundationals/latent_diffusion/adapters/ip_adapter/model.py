"""IP-Adapter's image projections: CLIP image features -> text-like tokens (base: Linear + LayerNorm; plus: a perceiver resampler)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from .....fluxion import layers as fl

if TYPE_CHECKING:
    pass

PERCEIVER_HEAD_DIM = 64  # tencent-ailab's Resampler and diffusers both use 64-wide heads


# -- image projections -------------------------------------------------------------------------------------


class ImageProjection(fl.Chain):
    """IP-Adapter base: the image embedding to `num_tokens` context tokens (Linear, reshape, LayerNorm)."""

    def __init__(
        self,
        image_embedding_dim: int,
        context_dim: int,
        num_tokens: int = 4,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.num_tokens = num_tokens
        super().__init__(
            fl.Linear(image_embedding_dim, num_tokens * context_dim, device=device, dtype=dtype),
            fl.Reshape(num_tokens, context_dim),
            fl.LayerNorm(context_dim, device=device, dtype=dtype),
        )


def _query_and_memory(features: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
    return latents, torch.cat([features, latents], dim=1)


def _split_keys_values(query: Tensor, keys_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    keys, values = keys_values.chunk(2, dim=-1)
    return query, keys, values


class PerceiverAttention(fl.Chain):
    """The latents attend to the image features and to themselves (keys/values from both)."""

    def __init__(
        self,
        dim: int,
        inner_dim: int,
        num_heads: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    fl.UseContext("perceiver_resampler", "features"),
                    fl.LayerNorm(dim, device=device, dtype=dtype),
                ),
                fl.LayerNorm(dim, device=device, dtype=dtype),
            ),
            fl.Lambda(_query_and_memory),
            fl.Distribute(
                fl.Linear(dim, inner_dim, bias=False, device=device, dtype=dtype),
                fl.Linear(dim, 2 * inner_dim, bias=False, device=device, dtype=dtype),
            ),
            fl.Lambda(_split_keys_values),
            fl.ScaledDotProductAttention(num_heads),
            fl.Linear(inner_dim, dim, bias=False, device=device, dtype=dtype),
        )


class PerceiverFeedForward(fl.Residual):
    """LayerNorm then a GELU MLP (width x4, no biases), added to its input."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.LayerNorm(dim, device=device, dtype=dtype),
            fl.Linear(dim, 4 * dim, bias=False, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Linear(4 * dim, dim, bias=False, device=device, dtype=dtype),
        )


class PerceiverLayer(fl.Chain):
    """Residual perceiver attention, then the residual feed-forward."""

    def __init__(
        self,
        dim: int,
        inner_dim: int,
        num_heads: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Residual(PerceiverAttention(dim, inner_dim, num_heads, device, dtype)),
            PerceiverFeedForward(dim, device, dtype),
        )


class PerceiverResampler(fl.Chain):
    """IP-Adapter plus: `num_queries` learned latents read the image's hidden states through perceiver layers."""

    def __init__(
        self,
        embedding_dim: int,
        dim: int,
        output_dim: int,
        num_queries: int,
        inner_dim: int,
        depth: int = 4,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.num_tokens = num_queries
        heads = max(1, inner_dim // PERCEIVER_HEAD_DIM)
        super().__init__(
            fl.Linear(embedding_dim, dim, device=device, dtype=dtype),
            fl.SetContext("perceiver_resampler", "features"),
            fl.Parameter(num_queries, dim, device=device, dtype=dtype),
            *(PerceiverLayer(dim, inner_dim, heads, device, dtype) for _ in range(depth)),
            fl.Linear(dim, output_dim, device=device, dtype=dtype),
            fl.LayerNorm(output_dim, device=device, dtype=dtype),
        )

    def init_context(self) -> dict[str, dict[str, Any]]:
        return {"perceiver_resampler": {"features": None}}


# -- FaceID ---------------------------------------------------------------------------------------------------


class FaceIDProjection(fl.Chain):
    """IP-Adapter FaceID: a face identity embedding (insightface, 512-d) to `num_tokens` context tokens
    (Linear, GELU, Linear, reshape, LayerNorm; tencent-ailab's `MLPProjModel`, diffusers'
    `IPAdapterFaceIDImageProjection`)."""

    def __init__(
        self,
        face_embedding_dim: int,
        hidden_dim: int,
        context_dim: int,
        num_tokens: int = 4,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.num_tokens = num_tokens
        super().__init__(
            fl.Linear(face_embedding_dim, hidden_dim, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Linear(hidden_dim, num_tokens * context_dim, device=device, dtype=dtype),
            fl.Reshape(num_tokens, context_dim),
            fl.LayerNorm(context_dim, device=device, dtype=dtype),
        )


def _face_tokens(id_tokens: Tensor, features: Tensor) -> Tensor:
    return id_tokens


class FaceShortcut(fl.ContextModule):
    """Plus v2's shortcut: `id_tokens + scale x resampler output` (v1, scale None: the output alone)."""

    def forward(self, x: Tensor) -> Tensor:
        state = self.use_context("face_id_plus")
        scale = state["shortcut_scale"]
        return x if scale is None else state["id_tokens"] + scale * x


class FaceIDPlusProjection(fl.Chain):
    """IP-Adapter FaceID Plus (v1, v2): the FaceID projection of the face embedding gives the latents of a
    perceiver resampler reading the face crop's CLIP hidden states (tencent-ailab's `ProjModelFaceIdPlus`,
    diffusers' `IPAdapterFaceIDPlusImageProjection`). Called with (face embeddings (N, 512), hidden states
    (N, S, H)); the shortcut scale (v2) is set with `set_shortcut`."""

    def __init__(
        self,
        face_embedding_dim: int,
        hidden_dim: int,
        clip_hidden_dim: int,
        dim: int,
        output_dim: int,
        inner_dim: int,
        num_tokens: int = 4,
        depth: int = 4,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.num_tokens = num_tokens
        heads = max(1, inner_dim // PERCEIVER_HEAD_DIM)
        super().__init__(
            fl.Distribute(
                fl.Chain(
                    FaceIDProjection(face_embedding_dim, hidden_dim, dim, num_tokens, device, dtype),
                    fl.SetContext("face_id_plus", "id_tokens"),
                ),
                fl.Chain(
                    fl.Linear(clip_hidden_dim, dim, device=device, dtype=dtype),
                    fl.SetContext("perceiver_resampler", "features"),
                ),
            ),
            fl.Lambda(_face_tokens),
            *(PerceiverLayer(dim, inner_dim, heads, device, dtype) for _ in range(depth)),
            fl.Linear(dim, output_dim, device=device, dtype=dtype),
            fl.LayerNorm(output_dim, device=device, dtype=dtype),
            FaceShortcut(),
        )

    def init_context(self) -> dict[str, dict[str, Any]]:
        return {
            "perceiver_resampler": {"features": None},
            "face_id_plus": {"id_tokens": None, "shortcut_scale": None},
        }

    def set_shortcut(self, scale: float | None) -> None:
        """Plus v2: add the face tokens with the resampler's output times `scale`; None (v1): no shortcut."""
        self.use_context("face_id_plus")["shortcut_scale"] = scale

    @property
    def face_embedding_dim(self) -> int:
        return int(self.ensure_find(FaceIDProjection)[0].in_features)  # type: ignore[union-attr]

    @property
    def clip_hidden_dim(self) -> int:
        first = list(self[0])[1][0]  # type: ignore[index]
        return int(first.in_features)
