"""CLIP's byte-level BPE tokenizer, token for token the same as OpenAI CLIP / open_clip.

Runtime needs only the standard library and torch: the pre-tokenizer's Unicode classes
(`\\p{L}`, `\\p{N}` in the reference, which uses the `regex` package) are rebuilt with
`unicodedata`, and `ftfy` (the reference's text fixer) is used when it is installed. Without it,
`fix_text_without_ftfy` does what ftfy does except its mojibake repair, so ids differ only on
text that ftfy would re-decode (e.g. "cafÃ©", read by ftfy as "café").

Padding differs between the encoders Stable Diffusion uses (see `PAD_TOKEN_IDS`):
- SD1.5's CLIP ViT-L/14 (transformers `CLIPTokenizer`, as diffusers and the original LDM code
  call it with `padding="max_length"`) pads with the end token 49407.
- SDXL's OpenCLIP ViT-bigG/14 pads with 0: `open_clip.tokenize` in the original `sgm` code,
  diffusers' SDXL `tokenizer_2` (its `pad_token` is `"!"`, whose id is 0) and ComfyUI's
  `SDXLClipGTokenizer` (`pad_with_end=False`) all agree. SDXL's CLIP-L still pads with 49407.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

VOCABULARY_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
START_TOKEN_ID = 49406
END_TOKEN_ID = 49407
SEQUENCE_LENGTH = 77
MERGE_COUNT = 49152 - 256 - 2  # merge lines used by CLIP, after the file's header line
START_TEXT, END_TEXT = "<start_of_text>", "<end_of_text>"  # open_clip's names, matched in the text

PAD_TOKEN_IDS: dict[str, int] = {
    "clip_l": END_TOKEN_ID,  # SD1.5 and SDXL CLIP ViT-L/14 (transformers, diffusers, LDM, ComfyUI)
    "openclip_bigg": 0,  # SDXL OpenCLIP ViT-bigG/14 (open_clip, sgm, diffusers tokenizer_2, ComfyUI)
}


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, so BPE works on strings without whitespace or controls."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }


def unicode_category_class(category_initial: str) -> str:
    """Body of a `re` character class holding every code point whose Unicode category starts so."""
    ranges: list[tuple[int, int]] = []
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code))[0] != category_initial:
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


# Unicode White_Space, i.e. `\\s` of the `regex` package (Python's `re` adds U+001C..U+001F).
WHITESPACE_CLASS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _caseless_class() -> str:
    """Non-letters whose case variants are letters or numbers (U+0345 only): no alternative of the
    reference pattern, compiled case-insensitively with `regex`, matches them, so they are dropped."""

    def letter_or_number(s: str) -> bool:
        return len(s) == 1 and unicodedata.category(s)[0] in "LN"

    codes = [
        code
        for code in range(sys.maxunicode + 1)
        if not letter_or_number(chr(code))
        and any(letter_or_number(f(chr(code))) for f in (str.lower, str.upper, str.casefold))
    ]
    return "".join(f"\\U{code:08x}" for code in codes)


@functools.cache
def pre_tokenizer_classes() -> dict[str, str]:
    """The `re` classes standing for the reference's `[\\p{L}]`, `[\\p{N}]` and `[^\\s\\p{L}\\p{N}]`."""
    letter, number = unicode_category_class("L"), unicode_category_class("N")
    return {
        "letter": f"[{letter}]",
        "number": f"[{number}]",
        "other": f"[^{WHITESPACE_CLASS}{letter}{number}{_caseless_class()}]",
    }


@functools.cache
def pre_tokenizer_pattern() -> re.Pattern[str]:
    """CLIP's word-splitting pattern: special texts, contractions, letter runs, single digits, other runs."""
    case_insensitive = [
        re.escape(START_TEXT),
        re.escape(END_TEXT),
        "'s",
        "'t",
        "'re",
        "'ve",
        "'m",
        "'ll",
        "'d",
    ]
    classes = pre_tokenizer_classes()
    alternatives = [
        f"(?i:{'|'.join(case_insensitive)})",
        f"{classes['letter']}+",
        classes["number"],
        f"{classes['other']}+",
    ]
    return re.compile("|".join(alternatives))


class BytePairVocabulary:
    """CLIP's 49,408 tokens and merge ranks, read once from the gzip merge list."""

    def __init__(self, path: Path) -> None:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]
        byte_symbols = list(bytes_to_unicode().values())
        tokens = [*byte_symbols, *(s + "</w>" for s in byte_symbols), *("".join(m) for m in merges)]
        tokens += [START_TEXT, END_TEXT]
        self.token_ids: dict[str, int] = {token: i for i, token in enumerate(tokens)}
        self.tokens: list[str] = tokens
        self.merge_ranks: dict[tuple[str, ...], int] = {merge: rank for rank, merge in enumerate(merges)}
        self._words: dict[str, list[int]] = {START_TEXT: [START_TOKEN_ID], END_TEXT: [END_TOKEN_ID]}

    def word_token_ids(self, word: str) -> list[int]:
        """Token ids of one pre-tokenized word (byte-mapped), by merging the best-ranked pair until none is left."""
        cached = self._words.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:], strict=False))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, MERGE_COUNT))
            if best not in self.merge_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.token_ids[symbol] for symbol in symbols]
        self._words[word] = ids
        return ids


@functools.cache
def load_vocabulary(path: Path = VOCABULARY_PATH) -> BytePairVocabulary:
    """The vocabulary at `path`, read at first use and shared by every tokenizer."""
    return BytePairVocabulary(path)


def _ftfy_fix_text() -> Callable[[str], str] | None:
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy.fix_text


@functools.cache
def _character_fixes() -> dict[int, str]:
    """Per-character rewrites ftfy's `fix_text` makes, in its order: C1 controls read as cp1252, Latin
    ligatures split, full/half-width forms narrowed, quotes uncurled, line breaks unified, controls removed."""
    fixes: dict[int, str] = {}
    for code in range(0x80, 0xA0):
        try:
            fixes[code] = bytes([code]).decode("cp1252")
        except UnicodeDecodeError:
            pass
    for code in [
        0x0132,
        0x0133,
        0x0149,
        *range(0x01C4, 0x01CD),
        *range(0x01F1, 0x01F4),
        *range(0xFB00, 0xFB07),
    ]:
        fixes[code] = "".join(chr(int(h, 16)) for h in unicodedata.decomposition(chr(code)).split()[1:])
    fixes |= {code: unicodedata.normalize("NFKC", chr(code)) for code in [0x3000, *range(0xFF01, 0xFFF0)]}
    quotes = {**{c: "'" for c in [0x02BC, *range(0x2018, 0x201C)]}, **{c: '"' for c in range(0x201C, 0x2020)}}
    fixes = {code: "".join(quotes.get(ord(c), c) for c in text) for code, text in fixes.items()} | quotes
    fixes |= {code: "\n" for code in (0x0D, 0x2028, 0x2029)}
    removed = [
        *range(0x09),
        0x0B,
        *range(0x0E, 0x20),
        0x7F,
        *range(0x206A, 0x2070),
        0xFEFF,
        *range(0xFFF9, 0xFFFD),
    ]
    return {code: text for code, text in (fixes | dict.fromkeys(removed, "")).items() if text != chr(code)}


_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")


def fix_text_without_ftfy(text: str) -> str:
    """ftfy's `fix_text` without its mojibake repair: entities (unless the text has a "<"), per-character fixes, NFC."""
    if "<" not in text:
        text = _HTML_ENTITY.sub(lambda match: html.unescape(match[0]), text)
    return unicodedata.normalize("NFC", text.translate(_character_fixes()))


def clean_text(text: str, fix_text: Callable[[str], str] | None = None) -> str:
    """open_clip's `lower` clean-up: fix text (ftfy when given), unescape HTML twice, collapse whitespace, lowercase."""
    text = (fix_text or fix_text_without_ftfy)(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """Text to CLIP token ids: `tokenizer(text)` unpadded, `encode(texts)` padded/truncated to `sequence_length`."""

    def __init__(
        self,
        sequence_length: int = SEQUENCE_LENGTH,
        pad_token_id: int = END_TOKEN_ID,
        use_ftfy: bool | None = None,
        vocabulary_path: Path = VOCABULARY_PATH,
    ) -> None:
        self.sequence_length = sequence_length
        self.pad_token_id = pad_token_id
        self.start_token_id, self.end_token_id = START_TOKEN_ID, END_TOKEN_ID
        self.vocabulary_path = vocabulary_path
        self.fix_text = _ftfy_fix_text() if use_ftfy is not False else None
        if use_ftfy and self.fix_text is None:
            raise ImportError("CLIPTokenizer(use_ftfy=True) needs the ftfy package (pip install ftfy)")

    @classmethod
    def from_preset(cls, name: str, **kwargs: object) -> CLIPTokenizer:
        """The tokenizer of a named text encoder: "clip_l" pads with 49407, "openclip_bigg" with 0."""
        if name not in PAD_TOKEN_IDS:
            raise ValueError(f"unknown CLIP tokenizer preset {name!r}; known: {', '.join(PAD_TOKEN_IDS)}")
        return cls(pad_token_id=PAD_TOKEN_IDS[name], **kwargs)  # type: ignore[arg-type]

    @property
    def vocabulary(self) -> BytePairVocabulary:
        """The shared BPE vocabulary (read at first use)."""
        return load_vocabulary(self.vocabulary_path)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without start, end or padding."""
        vocabulary = self.vocabulary
        byte_symbols = bytes_to_unicode()
        ids: list[int] = []
        for word in pre_tokenizer_pattern().findall(clean_text(text, self.fix_text)):
            ids += vocabulary.word_token_ids("".join(byte_symbols[b] for b in word.encode("utf-8")))
        return ids

    def __call__(self, text: str) -> list[int]:
        """Token ids of `text` between the start and end tokens, unpadded and untruncated."""
        return [self.start_token_id, *self.tokenize(text), self.end_token_id]

    def pad(self, token_ids: Sequence[int]) -> list[int]:
        """Truncate to `sequence_length` keeping the end token last, or pad with `pad_token_id`."""
        ids = list(token_ids)
        if len(ids) > self.sequence_length:
            ids = [*ids[: self.sequence_length - 1], self.end_token_id]
        return ids + [self.pad_token_id] * (self.sequence_length - len(ids))

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        """LongTensor [batch, sequence_length] of start, tokens, end and padding for one text or several."""
        texts = [text] if isinstance(text, str) else list(text)
        return torch.tensor([self.pad(self(t)) for t in texts], dtype=torch.long).reshape(len(texts), -1)

    def decode(self, token_ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids: start tokens are skipped and decoding stops at the first end token."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        if self.end_token_id in ids:
            ids = ids[: ids.index(self.end_token_id)]
        byte_of = {symbol: b for b, symbol in bytes_to_unicode().items()}
        data = bytearray()
        for token in (self.vocabulary.tokens[i] for i in ids if i != self.start_token_id):
            word = token.removesuffix("</w>")
            data += bytes(byte_of[c] for c in word) + (b" " if word != token else b"")
        return data.decode("utf-8", errors="replace").strip()
