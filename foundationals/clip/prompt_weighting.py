"""ComfyUI's prompt syntax for CLIP text encoders: emphasis weights, `embedding:name` words,
77-token chunks for long prompts, and the weighting of the encoded tokens.

Semantics follow ComfyUI's `comfy/sd1_clip.py` (`token_weights`, `SDTokenizer.tokenize_with_weights`,
`ClipTokenWeightEncoder.encode_token_weights`):
- `(text)` multiplies the weight by 1.1; nesting multiplies: `((text))` is 1.1 * 1.1.
- `(text:1.5)` sets the weight to 1.5 (it replaces, it does not multiply: `((text:1.5))` is 1.5),
  and its inner groups multiply from there: `((text):1.5)` is 1.5 * 1.1. The weight is what follows
  the last `:` (not at the start) when Python's `float()` accepts it; else the colon is text.
- `[text]` is NOT emphasis in ComfyUI (that is A1111's syntax): brackets stay in the text and
  are tokenized as such. `\\(` and `\\)` are literal parentheses. An unclosed `(` stays in the text;
  a stray `)` leaves the nesting count negative, as in ComfyUI.
- Each weighted segment is tokenized on its own, so `(red)dish` is `red` + `dish`, not `reddish`.
  Segments go through our `CLIPTokenizer` (open_clip's clean-up); ComfyUI calls transformers'
  tokenizer, which gives other ids only for HTML entities (it does not unescape them twice).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .tokenizer import CLIPTokenizer

EMPHASIS_FACTOR = 1.1
EMBEDDING_PREFIX = "embedding:"
MAX_WORD_LENGTH = 8  # a group this long may be split across chunks; a shorter one moves whole
EMBEDDING_PLACEHOLDER_ID = 0  # token id left where an embedding vector is spliced in (never the end id)
_ESCAPED = {"\\(": "\ue000", "\\)": "\ue001"}  # escaped parentheses hidden from the parser

logger = logging.getLogger(__name__)

EmbeddingLookup = Callable[[str], torch.Tensor | None]


def _split_top_level(text: str) -> list[str]:
    """Split at top-level parentheses: "a (b (c)) d" -> ["a ", "(b (c))", " d"] (ComfyUI's depth rules)."""
    pieces: list[str] = []
    current, depth = "", 0
    for character in text:
        if character == "(":
            if depth == 0 and current:
                pieces.append(current)
                current = ""
            current += character
            depth += 1
        elif character == ")":
            depth -= 1
            current += character
            if depth == 0:
                pieces.append(current)
                current = ""
        else:
            current += character
    return [*pieces, current] if current else pieces


def _parse(text: str, weight: float) -> list[tuple[str, float]]:
    segments: list[tuple[str, float]] = []
    for piece in _split_top_level(text):
        if not (len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")"):
            segments.append((piece, weight))
            continue
        inner, inner_weight = piece[1:-1], weight * EMPHASIS_FACTOR
        colon = inner.rfind(":")
        if colon > 0:
            try:
                inner, inner_weight = inner[:colon], float(inner[colon + 1 :])
            except ValueError:
                pass
        segments += _parse(inner, inner_weight)
    return segments


def parse_prompt_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) segments with ComfyUI's emphasis rules (see module docstring)."""
    for escaped, hidden in _ESCAPED.items():
        text = text.replace(escaped, hidden)
    segments = _parse(text, weight)
    return [(segment.replace("\ue000", "(").replace("\ue001", ")"), w) for segment, w in segments]


def split_embedding_words(segment: str) -> list[str]:
    """Cut a segment before each " embedding:" / "\\nembedding:", as ComfyUI does; empty pieces are dropped."""
    first, *others = re.split(f"[ \n]{re.escape(EMBEDDING_PREFIX)}", segment)
    return [piece for piece in [first, *(EMBEDDING_PREFIX + other for other in others)] if piece]


@dataclass
class PromptChunks:
    """A tokenized prompt: `token_ids` and `weights` are [chunks][sequence_length]; `embeddings` maps
    (chunk, position) to the textual-inversion vector that replaces that position's token embedding."""

    token_ids: list[list[int]]
    weights: list[list[float]]
    embeddings: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def has_weights(self) -> bool:
        """Whether any token is weighted, i.e. whether the empty prompt must be encoded too."""
        return any(w != 1.0 for chunk in self.weights for w in chunk)

    def token_id_tensor(self) -> torch.Tensor:
        """LongTensor [chunks, sequence_length]."""
        return torch.tensor(self.token_ids, dtype=torch.long)


Token = int | torch.Tensor  # a vocabulary id or a textual-inversion vector


def _embedding_tokens(word: str, lookup: EmbeddingLookup) -> tuple[list[torch.Tensor], str]:
    """Vectors of `embedding:name rest` and the text left to tokenize (ComfyUI's `_try_get_embedding`)."""
    name, *rest = word[len(EMBEDDING_PREFIX) :].strip("\n").split() or [""]
    leftover = " ".join(rest)
    vectors = lookup(name) if name else None
    stripped = name.strip(",")
    if vectors is None and stripped != name:
        vectors = lookup(stripped) if stripped else None
        leftover = f"{name[len(stripped) :]} {leftover}"
    if vectors is None:
        logger.warning("embedding:%s does not exist, ignoring it", name)
        return [], leftover
    return list(vectors.reshape(-1, vectors.shape[-1])), leftover


def _token_groups(
    text: str, tokenizer: CLIPTokenizer, lookup: EmbeddingLookup | None
) -> list[list[tuple[Token, float]]]:
    """Words (or embeddings) of the prompt as groups of (token, weight), the unit chunking keeps together."""
    groups: list[list[tuple[Token, float]]] = []
    for segment, weight in parse_prompt_weights(text):
        for word in split_embedding_words(segment):
            if lookup is not None and word.startswith(EMBEDDING_PREFIX):
                vectors, word = _embedding_tokens(word, lookup)
                if vectors:
                    groups.append([(v, weight) for v in vectors])
                if not word:
                    continue
            groups.append([(t, weight) for t in tokenizer.tokenize(word)])
    return groups


def tokenize_prompt(
    text: str, tokenizer: CLIPTokenizer, embeddings: EmbeddingLookup | None = None
) -> PromptChunks:
    """Tokenize a ComfyUI prompt into chunks of start + 75 tokens + end (+ padding), with weights.

    As ComfyUI's `tokenize_with_weights`: groups (a weighted segment's words, or one embedding)
    fill a chunk in order; a group that does not fit moves whole to the next chunk, unless it has
    `MAX_WORD_LENGTH` (8) tokens or more, in which case it fills the chunk and continues in the next.
    Each chunk is `[start, tokens..., end]` padded with `tokenizer.pad_token_id` to
    `tokenizer.sequence_length`; special and pad tokens have weight 1.0. `embedding:name` words use
    `embeddings(name)` (vectors [N, D] or None: a warning, and the word is dropped); without a lookup
    they are plain text, as in ComfyUI without an embeddings folder.
    """
    room = tokenizer.sequence_length - 2
    chunks: list[list[tuple[Token, float]]] = [[]]
    for group in _token_groups(text, tokenizer, embeddings):
        while group:
            free = room - len(chunks[-1])
            if len(group) <= free:
                chunks[-1] += group
                break
            if len(group) >= MAX_WORD_LENGTH or not chunks[-1]:
                chunks[-1] += group[:free]
                group = group[free:]
            chunks.append([])

    result = PromptChunks(token_ids=[], weights=[])
    for index, chunk in enumerate(chunks):
        padding = [(tokenizer.pad_token_id, 1.0)] * (room - len(chunk))
        full = [(tokenizer.start_token_id, 1.0), *chunk, (tokenizer.end_token_id, 1.0), *padding]
        for position, (token, _) in enumerate(full):
            if isinstance(token, torch.Tensor):
                result.embeddings[(index, position)] = token
        result.token_ids.append([t if isinstance(t, int) else EMBEDDING_PLACEHOLDER_ID for t, _ in full])
        result.weights.append([w for _, w in full])
    return result


def splice_embeddings(token_embeddings: torch.Tensor, chunks: PromptChunks) -> torch.Tensor:
    """Copy of token embeddings [chunks, L, D] with the textual-inversion vectors put at their positions."""
    if not chunks.embeddings:
        return token_embeddings
    spliced = token_embeddings.clone()
    for (chunk, position), vector in chunks.embeddings.items():
        if vector.shape[-1] != spliced.shape[-1]:
            raise ValueError(
                f"embedding vector of width {vector.shape[-1]} for a {spliced.shape[-1]}-wide encoder"
            )
        spliced[chunk, position] = vector.to(spliced)
    return spliced


def apply_token_weights(
    hidden: torch.Tensor, empty: torch.Tensor | None, weights: torch.Tensor | Sequence[Sequence[float]]
) -> torch.Tensor:
    """Weight encoded tokens as ComfyUI does and join the chunks: [chunks, L, D] -> [1, chunks * L, D].

    For every token whose weight w != 1: `z = (z - z_empty) * w + z_empty`, where `z_empty` is the
    same position of the encoded empty prompt `empty` [L, D] (start, end, padding); other tokens
    are left as they are. `empty` may be None only when no weight differs from 1.
    """
    w = torch.as_tensor(weights, dtype=hidden.dtype, device=hidden.device)
    if w.shape != hidden.shape[:2]:
        raise ValueError(
            f"weights of shape {tuple(w.shape)} for hidden states of shape {tuple(hidden.shape)}"
        )
    weighted = w != 1.0
    if weighted.any():
        if empty is None:
            raise ValueError("weighted tokens need the encoded empty prompt (`empty`)")
        empty = empty.to(hidden)
        hidden = torch.where(weighted[..., None], (hidden - empty) * w[..., None] + empty, hidden)
    return hidden.reshape(1, -1, hidden.shape[-1])
