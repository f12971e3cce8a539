"""Stable Diffusion text conditioning from a prompt, as ComfyUI computes it (SD1.5, SDXL).

A prompt is tokenized with ComfyUI's syntax (`prompt_weighting.tokenize_prompt`: emphasis, 77-token
chunks, `embedding:name`), every chunk is encoded at the chosen layer, weighted tokens are moved away
from the encoded empty prompt (`z = (z - z_empty) * w + z_empty`) and the chunks are joined along the
sequence. Textual-inversion vectors enter the encoder as extra token embeddings: their positions get
ids past the vocabulary, which the `TokenEncoder` reads from the "clip_text" context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .prompt_weighting import EmbeddingLookup, PromptChunks, apply_token_weights, tokenize_prompt
from .text_encoder import TEXT_CONTEXT, CLIPTextEncoder, CLIPTextHiddenState
from .tokenizer import CLIPTokenizer


@dataclass(frozen=True)
class TextConditioning:
    """What a UNet is conditioned on: token embeddings (1, tokens, D) and, for SDXL, the pooled text
    embedding (1, P) of OpenCLIP bigG."""

    embeddings: Tensor
    pooled: Tensor | None = None

    def zeros_like(self) -> TextConditioning:
        """All zeros: diffusers' SDXL negative for an empty prompt (`force_zeros_for_empty_prompt`)."""
        return TextConditioning(
            torch.zeros_like(self.embeddings),
            torch.zeros_like(self.pooled) if self.pooled is not None else None,
        )


def token_ids_with_extra_embeddings(
    chunks: PromptChunks, vocabulary_size: int
) -> tuple[Tensor, Tensor | None]:
    """Token ids (chunks, L) where each textual-inversion position gets id `vocabulary_size + i`, and the
    (E, D) table of those vectors (None without any)."""
    token_ids = chunks.token_id_tensor()
    if not chunks.embeddings:
        return token_ids, None
    vectors: list[Tensor] = []
    for (chunk, position), vector in chunks.embeddings.items():
        token_ids[chunk, position] = vocabulary_size + len(vectors)
        vectors.append(vector.reshape(-1))
    return token_ids, torch.stack(vectors)


def encode_text(
    prompt: str,
    text_encoder: CLIPTextEncoder,
    tokenizer: CLIPTokenizer,
    layer: int = -1,
    final_norm: bool = True,
    pooled: bool = False,
    embeddings: EmbeddingLookup | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One encoder's conditioning of a ComfyUI prompt: hidden states of `layer` (1, chunks * L, D) with
    emphasis applied, and (with `pooled`) the pooled text embedding (1, P) of the first chunk."""
    chunks = tokenize_prompt(prompt, tokenizer, embeddings)
    token_ids, extra_embeddings = token_ids_with_extra_embeddings(chunks, text_encoder.config.vocabulary_size)
    if chunks.has_weights:  # weights are relative to the empty prompt, encoded in the same batch
        token_ids = torch.cat([token_ids, tokenize_prompt("", tokenizer).token_id_tensor()])
    encoder = CLIPTextHiddenState(text_encoder, layer=layer, final_norm=final_norm, pooled=pooled)
    encoder.set_context(TEXT_CONTEXT, {"token_ids": None, "extra_embeddings": extra_embeddings})
    with torch.no_grad():
        output = encoder(token_ids.to(text_encoder.device))
    hidden, pooled_output = output if pooled else (output, None)
    count = len(chunks.token_ids)
    empty = hidden[count] if chunks.has_weights else None
    conditioning = apply_token_weights(hidden[:count], empty, chunks.weights)
    return conditioning, pooled_output[:1] if pooled_output is not None else None


def encode_sd15_prompt(
    prompt: str,
    text_encoder: CLIPTextEncoder,
    layer: int = -1,
    embeddings: EmbeddingLookup | None = None,
    tokenizer: CLIPTokenizer | None = None,
) -> TextConditioning:
    """SD1.5 conditioning (1, 77 * chunks, 768): CLIP-L hidden state `layer` (-1 last, -2 "clip skip 2"),
    final layer norm applied, as ComfyUI's SD1 CLIP and diffusers' `encode_prompt`."""
    tokenizer = tokenizer or CLIPTokenizer.from_preset("clip_l")
    hidden, _ = encode_text(
        prompt, text_encoder, tokenizer, layer=layer, final_norm=True, embeddings=embeddings
    )
    return TextConditioning(hidden)


def encode_sdxl_prompt(
    prompt: str,
    text_encoder_l: CLIPTextEncoder,
    text_encoder_g: CLIPTextEncoder,
    layer: int = -2,
    embeddings_l: EmbeddingLookup | None = None,
    embeddings_g: EmbeddingLookup | None = None,
    tokenizer_l: CLIPTokenizer | None = None,
    tokenizer_g: CLIPTokenizer | None = None,
) -> TextConditioning:
    """SDXL conditioning: CLIP-L and bigG hidden states `layer` (penultimate, no final layer norm) joined
    to (1, 77 * chunks, 2048), and bigG's pooled text embedding (1, 1280) from its last layer."""
    tokenizer_l = tokenizer_l or CLIPTokenizer.from_preset("clip_l")
    tokenizer_g = tokenizer_g or CLIPTokenizer.from_preset("openclip_bigg")
    hidden_l, _ = encode_text(
        prompt, text_encoder_l, tokenizer_l, layer=layer, final_norm=False, embeddings=embeddings_l
    )
    hidden_g, pooled = encode_text(
        prompt,
        text_encoder_g,
        tokenizer_g,
        layer=layer,
        final_norm=False,
        pooled=True,
        embeddings=embeddings_g,
    )
    length = min(hidden_l.shape[1], hidden_g.shape[1])  # chunk counts differ if one side lacks an embedding
    return TextConditioning(torch.cat([hidden_l[:, :length], hidden_g[:, :length]], dim=-1), pooled)
