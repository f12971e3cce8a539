"""CLIP text encoder (OpenAI CLIP-L, OpenCLIP bigG, ...) as a declarative Chain, and the views SD reads it by.

`CLIPTextEncoder(config)` maps token ids to the final hidden states (final layer norm applied) and,
when the config has a projection, also to the pooled text embedding, as transformers'
`CLIPTextModel(WithProjection)`. Stable Diffusion reads other layers ("clip skip"): `CLIPTextHiddenState`
is a structural view of an encoder (weights shared, nothing copied) that runs only the layers it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ...fluxion import layers as fl
from ..formats.clip import (
    TEXT_FEEDFORWARD,
    TEXT_LAYOUTS,
    TEXT_POSITION_EMBEDDING,
    TEXT_PROJECTION,
    TEXT_TOKEN_EMBEDDING,
    convert_clip_state_dict,
    count_layers,
    detect_layout,
    read_diffusers_component,
)
from .config import TEXT_PRESETS, CLIPTextConfig

T = TypeVar("T")

TEXT_CONTEXT = "clip_text"  # context of a text encoder's tree: "token_ids", "extra_embeddings"


def activation_layer(name: str) -> fl.Activation:
    """The activation layer of a CLIP config's `activation` name."""
    if name == "quick_gelu":
        return fl.QuickGeLU()
    if name == "gelu":
        return fl.GeLU()
    raise ValueError(f"unknown CLIP activation {name!r} (expected 'quick_gelu' or 'gelu')")


class FeedForward(fl.Chain):
    """The transformer's MLP: widen, activate, narrow."""

    def __init__(
        self,
        embedding_dim: int,
        feedforward_dim: int,
        activation: str,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Linear(embedding_dim, feedforward_dim, device=device, dtype=dtype),
            activation_layer(activation),
            fl.Linear(feedforward_dim, embedding_dim, device=device, dtype=dtype),
        )


class TransformerLayer(fl.Chain):
    """Pre-norm transformer block: `x + attention(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        feedforward_dim: int,
        activation: str,
        is_causal: bool,
        layer_norm_eps: float = 1e-5,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Residual(
                fl.LayerNorm(embedding_dim, eps=layer_norm_eps, device=device, dtype=dtype),
                fl.SelfAttention(
                    embedding_dim, num_heads=num_heads, is_causal=is_causal, device=device, dtype=dtype
                ),
            ),
            fl.Residual(
                fl.LayerNorm(embedding_dim, eps=layer_norm_eps, device=device, dtype=dtype),
                FeedForward(embedding_dim, feedforward_dim, activation, device=device, dtype=dtype),
            ),
        )


class PositionalEncoder(fl.Embedding):
    """Learned position embeddings of a (B, L, ...) input's L positions, broadcast over the batch."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        length = x.shape[1]
        if length > self.num_embeddings:
            raise ValueError(f"sequence of {length} positions for {self.num_embeddings} position embeddings")
        return self.weight[:length]


class ExtendableEmbedding(fl.Embedding):
    """A vocabulary embedding that also reads ids past the vocabulary from extra rows given per call."""

    def forward(self, token_ids: Tensor, extra_embeddings: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if extra_embeddings is None:
            return super().forward(token_ids)
        vocabulary_size = self.num_embeddings
        in_vocabulary = token_ids < vocabulary_size
        known = super().forward(token_ids.clamp(max=vocabulary_size - 1))
        extra_index = (token_ids - vocabulary_size).clamp(min=0)
        if bool((extra_index >= extra_embeddings.shape[0]).any()):
            raise IndexError(
                f"token id {int(token_ids.max())} is past the vocabulary ({vocabulary_size}) "
                f"and its {extra_embeddings.shape[0]} extra embeddings"
            )
        extra = extra_embeddings.to(known)[extra_index]
        return torch.where(in_vocabulary[..., None], known, extra)


class TokenEncoder(fl.Chain):
    """Token ids to vectors; ids from `vocabulary_size` on index the context's `extra_embeddings`
    (textual inversion): id `vocabulary_size + i` is row i of that (E, D) table."""

    def __init__(
        self,
        vocabulary_size: int,
        embedding_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Parallel(fl.Identity(), fl.UseContext(TEXT_CONTEXT, "extra_embeddings")),
            ExtendableEmbedding(vocabulary_size, embedding_dim, device=device, dtype=dtype),
        )


class TextEmbedding(fl.Sum):
    """Token vectors plus position vectors."""

    def __init__(
        self, config: CLIPTextConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            TokenEncoder(config.vocabulary_size, config.embedding_dim, device=device, dtype=dtype),
            PositionalEncoder(config.max_sequence_length, config.embedding_dim, device=device, dtype=dtype),
        )


class EndTokenPooling(fl.Module):
    """Each sequence's hidden state at its end token: the highest vocabulary id (CLIP's argmax rule).

    Ids past the vocabulary (textual-inversion vectors) never count as the end token.
    """

    def __init__(self, vocabulary_size: int) -> None:
        super().__init__()
        self.vocabulary_size = vocabulary_size

    def forward(self, hidden_states: Tensor, token_ids: Tensor) -> Tensor:
        ids = torch.where(token_ids < self.vocabulary_size, token_ids, 0).to(hidden_states.device)
        return hidden_states[
            torch.arange(hidden_states.shape[0], device=hidden_states.device), ids.argmax(-1)
        ]


class PooledTextProjection(fl.Chain):
    """Final hidden states to the text embedding: end token's state times the text projection."""

    def __init__(
        self,
        config: CLIPTextConfig,
        projection_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Parallel(fl.Identity(), fl.UseContext(TEXT_CONTEXT, "token_ids")),
            EndTokenPooling(config.vocabulary_size),
            fl.Linear(config.embedding_dim, projection_dim, bias=False, device=device, dtype=dtype),
        )


class TextProjection(fl.Parallel):
    """(hidden states, pooled text embedding): keeps the hidden states beside their projection."""

    def __init__(
        self,
        config: CLIPTextConfig,
        projection_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Identity(), PooledTextProjection(config, projection_dim, device=device, dtype=dtype)
        )


class CLIPTextEncoder(fl.Chain):
    """Token ids (B, L) to final hidden states (B, L, D), final layer norm applied (transformers'
    `last_hidden_state`); with a projection in the config, to `(hidden states, text embeddings (B, P))`.

    Set `extra_embeddings` (an (E, D) tensor, or None) in the "clip_text" context to give ids
    `vocabulary_size + i` their vectors (textual inversion).
    """

    def __init__(
        self,
        config: CLIPTextConfig | None = None,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.config = config = config or CLIPTextConfig()
        layers = [
            TransformerLayer(
                config.embedding_dim,
                config.num_heads,
                config.feedforward_dim,
                config.activation,
                is_causal=True,
                layer_norm_eps=config.layer_norm_eps,
                device=device,
                dtype=dtype,
            )
            for _ in range(config.num_layers)
        ]
        projection = (
            [TextProjection(config, config.projection_dim, device=device, dtype=dtype)]
            if config.projection_dim is not None
            else []
        )
        super().__init__(
            fl.SetContext(TEXT_CONTEXT, "token_ids"),
            TextEmbedding(config, device=device, dtype=dtype),
            *layers,
            fl.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps, device=device, dtype=dtype),
            *projection,
        )

    def init_context(self) -> dict[str, dict[str, Any]]:
        return {TEXT_CONTEXT: {"token_ids": None, "extra_embeddings": None}}


def resolve_layer_index(layer: int, num_layers: int) -> int:
    """Number of transformer layers to run for hidden state `layer`, indexed as transformers'
    `hidden_states` tuple: 0 is the embeddings, k the output of layer k, -1 the last, -2 the one before."""
    count = num_layers + 1
    if not -count <= layer < count:
        raise ValueError(
            f"layer {layer} out of range for {num_layers} layers (from {-count} to {num_layers})"
        )
    return layer % count


class CLIPTextHiddenState(fl.Chain):
    """A view of a `CLIPTextEncoder` (weights shared) that outputs hidden state `layer` and runs no
    layer after it, unless the pooled text embedding (which needs them all) is asked for too.

    `layer` indexes transformers' `hidden_states` (-1 last, -2 penultimate: ComfyUI's "CLIP Set Last
    Layer"); `final_norm` applies the final layer norm to it (SD1.5 does, SDXL does not). With
    `pooled`, the output is `(hidden, text_embeds)`, the pooled embedding always from the last layer.
    """

    def __init__(
        self, encoder: CLIPTextEncoder, layer: int = -1, final_norm: bool = True, pooled: bool = False
    ) -> None:
        self.layer = layer
        self.final_norm = final_norm
        self.pooled = pooled
        children = [child.structural_copy() for child in encoder]
        first = next(i for i, child in enumerate(children) if isinstance(child, TransformerLayer))
        layers = [child for child in children if isinstance(child, TransformerLayer)]
        head = children[:first]
        norm = next(child for child in children if isinstance(child, fl.LayerNorm))
        run = resolve_layer_index(layer, len(layers))
        if not pooled:
            super().__init__(*head, *layers[:run], *([norm] if final_norm else []))
            return
        projection = next((child for child in children if isinstance(child, TextProjection)), None)
        if projection is None:
            raise ValueError(
                "pooled=True needs a text encoder with a text projection (config.projection_dim)"
            )
        pooling = projection.ensure_find(PooledTextProjection).structural_copy()
        super().__init__(
            *head,
            *layers[:run],
            fl.Parallel(norm if final_norm else fl.Identity(), fl.Chain(*layers[run:], norm, pooling)),
        )

    def init_context(self) -> dict[str, dict[str, Any]]:
        return {TEXT_CONTEXT: {"token_ids": None, "extra_embeddings": None}}


def transformer_layer_names(num_layers: int) -> list[str]:
    """Keys of `num_layers` TransformerLayer siblings (fluxion names repeated classes `Name_1`, `Name_2`, ...)."""
    return (
        [f"TransformerLayer_{n}" for n in range(1, num_layers + 1)]
        if num_layers > 1
        else ["TransformerLayer"]
    )


def check_config_shapes(config: T, shape: Mapping[str, Any], description: str) -> T:
    """`config` when its fields equal the `shape` read from the weights, else a clear error."""
    wrong = {
        name: (getattr(config, name), found)
        for name, found in shape.items()
        if getattr(config, name) != found
    }
    if wrong:
        details = ", ".join(
            f"{name}={given} (the weights have {found})" for name, (given, found) in wrong.items()
        )
        raise ValueError(f"the given config does not fit these {description} weights: {details}")
    return config


def _text_shape(tensors: Mapping[str, Tensor], num_layers: int) -> dict[str, Any]:
    """The config fields that the weights' shapes give."""
    vocabulary_size, embedding_dim = tensors[TEXT_TOKEN_EMBEDDING].shape
    feedforward_dim = tensors[TEXT_FEEDFORWARD.format(layer=transformer_layer_names(num_layers)[0])].shape[0]
    projection = tensors.get(TEXT_PROJECTION)
    return dict(
        embedding_dim=int(embedding_dim),
        num_layers=num_layers,
        feedforward_dim=int(feedforward_dim),
        vocabulary_size=int(vocabulary_size),
        max_sequence_length=int(tensors[TEXT_POSITION_EMBEDDING].shape[0]),
        projection_dim=int(projection.shape[0]) if projection is not None else None,
    )


def _text_config(shape: Mapping[str, Any], config_json: Mapping[str, Any]) -> CLIPTextConfig:
    """Heads and activation from config.json, else from the preset of that shape."""
    embedding_dim, num_layers, feedforward_dim = (
        shape[k] for k in ("embedding_dim", "num_layers", "feedforward_dim")
    )
    if "num_attention_heads" in config_json:
        return CLIPTextConfig(
            num_heads=int(config_json["num_attention_heads"]),
            activation=str(config_json.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(config_json.get("layer_norm_eps", 1e-5)),
            **shape,
        )
    for preset in TEXT_PRESETS.values():
        if (preset.embedding_dim, preset.num_layers, preset.feedforward_dim) == (
            embedding_dim,
            num_layers,
            feedforward_dim,
        ):
            return replace(preset, **shape)
    raise ValueError(
        f"a CLIP text encoder {embedding_dim} wide with {num_layers} layers (feed-forward {feedforward_dim}) "
        f"matches no preset ({', '.join(TEXT_PRESETS)}): its head count and activation cannot be read from "
        "its shapes; pass config=CLIPTextConfig(...)"
    )


def load_clip_text_encoder(
    state_dict: Mapping[str, Tensor],
    layout: str = "auto",
    config: CLIPTextConfig | None = None,
    config_json: Mapping[str, Any] | None = None,
    device: Device | str | None = None,
    dtype: DType | None = None,
) -> CLIPTextEncoder:
    """A `CLIPTextEncoder` from a state dict in one of `TEXT_LAYOUTS` ("auto": detected), built on the meta
    device and loaded with `assign=True`. The config comes from the shapes, plus heads and activation from
    `config_json` (transformers' config.json) or the preset of that shape, unless `config` is given."""
    if layout == "auto":
        key_layout = detect_layout(state_dict, TEXT_LAYOUTS, "CLIP text encoder")
    elif layout in TEXT_LAYOUTS:
        key_layout = TEXT_LAYOUTS[layout]
    else:
        raise ValueError(f"unknown CLIP text layout {layout!r}; known: auto, {', '.join(TEXT_LAYOUTS)}")
    num_layers = count_layers(state_dict, key_layout)
    tensors = convert_clip_state_dict(state_dict, key_layout, transformer_layer_names(num_layers))
    shape = _text_shape(tensors, num_layers)
    config = (
        check_config_shapes(config, shape, key_layout.description)
        if config
        else _text_config(shape, config_json or {})
    )
    if device is not None or dtype is not None:
        tensors = {key: value.to(device=device, dtype=dtype) for key, value in tensors.items()}
    encoder = CLIPTextEncoder(config, device="meta")
    encoder.load_state_dict(tensors, strict=True, assign=True)
    return encoder


def load_clip_text_encoder_from_folder(
    folder: str | Path, device: Device | str | None = None, dtype: DType | None = None
) -> CLIPTextEncoder:
    """A `CLIPTextEncoder` from a transformers/diffusers folder (`text_encoder/`, `text_encoder_2/`)."""
    state_dict, config_json = read_diffusers_component(folder)
    layout = "transformers" if TEXT_LAYOUTS["transformers"].signature in state_dict else "transformers5"
    return load_clip_text_encoder(state_dict, layout, config_json=config_json, device=device, dtype=dtype)
