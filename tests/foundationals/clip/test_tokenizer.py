"""CLIPTokenizer against open_clip's and transformers' tokenizers on a seeded multilingual corpus."""

import gzip
import html
import importlib.util
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

import ftfy
import pytest
import regex
import torch

from foundationals.clip.tokenizer import (
    END_TOKEN_ID,
    START_TOKEN_ID,
    VOCABULARY_PATH,
    CLIPTokenizer,
    bytes_to_unicode,
    clean_text,
    fix_text_without_ftfy,
    pre_tokenizer_classes,
    pre_tokenizer_pattern,
)

OPEN_CLIP_TOKENIZER = Path(importlib.util.find_spec("ftfy").origin).parents[1] / "open_clip" / "tokenizer.py"

PROMPT_WORDS = (
    "masterpiece best quality photo portrait of a cat dog woman man city night cyberpunk neon highly "
    "detailed 8k uhd dslr soft lighting film grain trending on artstation by greg rutkowski "
    "don't it's we've they'll I'm she'd you're CAN'T Isn't"
).split()
PIECES = {
    "latin_accents": "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœŒÀÉÎÕÜĀăĄćČđĚğĦıĲķĿłŃňŐŘśŞšŢťŨūŮűŲŵŷŸźŻž",
    "greek": "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΘΛΞΠΣΦΨΩάέήίόύώϊϋΐς",
    "cyrillic": "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯіїєґ",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي ًٌٍَُِّْ",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשתךםןףץ",
    "devanagari": "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसहािीुूेैोौं्",
    "thai": "กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหอฮะาิีึืุูเแโใไ่้๊๋",
    "cjk": "猫犬山水火木金土日月人口大小中国語文字絵画美少女風景夜空星光龍鳳",
    "kana": "あいうえおかきくけこさしすせそたちつてとなにぬねのアイウエオカキクケコサシスセソーッｱｲｳ",
    "hangul": "가나다라마바사아자차카타파하고양이강아지사진그림",
    "combining": "e\u0301a\u0300o\u0308n\u0303c\u0327u\u0323i\u0307\u0345",
    "emoji": [
        "😀",
        "🐱",
        "🔥",
        "✨",
        "❤️",
        "👍🏽",
        "👩\u200d💻",
        "🇫🇷",
        "🏳️\u200d🌈",
        "🧑🏿\u200d🎨",
        "☕",
        "⭐",
    ],
    "punctuation": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»‹›¿¡—–…·•§¶†‡‰′″、。「」【】！？，；：",
    "numbers": "0123456789٠١٢٣٤٥٦٧٨٩०१२३४५६७८९²³¹½¼¾ⅫⅣ①②⑩",
    "fullwidth_and_ligatures": "ＡＢＣａｂｃ１２３ﬁﬂﬀﬃﬅŉǅĳ",
    "whitespace_and_controls": [
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\xa0",
        "\u3000",
        "\u2009",
        "\u200b",
        "\x85",
        "\x1c",
        "\x07",
    ],
    "html_entities": [
        "&amp;",
        "&lt;",
        "&gt;",
        "&quot;",
        "&#39;",
        "&nbsp;",
        "&#x1F600;",
        "&amp;amp;",
        "&eacute;",
    ],
    "mojibake": ["Ã©", "Ã¨", "â€™", "â€œ", "Ã¼ber", "cafÃ©"],
    "comfyui_syntax": [
        "(best quality:1.2)",
        "((detailed))",
        "[blurry]",
        "\\(escaped\\)",
        "embedding:easyneg",
    ],
}


def make_corpus(count: int = 1200, seed: int = 1234) -> list[str]:
    """Seeded prompts: SD-style words mixed with many scripts, emoji, entities, odd whitespace; every 25th is long."""
    rng = random.Random(seed)
    assigned = [c for c in range(0x20, 0x30000) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    kinds = [*PIECES, *["words"] * 6, *["any_code_point"] * 2]

    def piece() -> str:
        kind = rng.choice(kinds)
        if kind == "words":
            word = rng.choice(PROMPT_WORDS)
            return word.upper() if rng.random() < 0.1 else word
        if kind == "any_code_point":
            return "".join(chr(rng.choice(assigned)) for _ in range(rng.randint(1, 4)))
        return "".join(rng.choice(PIECES[kind]) for _ in range(rng.randint(1, 6)))

    separators = [" ", " ", ", ", "", "  ", "\n", "\t", ""]
    lengths = [rng.randint(150, 400) if i % 25 == 0 else rng.randint(0, 25) for i in range(count)]
    return ["".join(piece() + rng.choice(separators) for _ in range(n)) for n in lengths]


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    """open_clip's SimpleTokenizer, loaded by file path (the package's __init__ imports a broken torchvision)."""
    spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", OPEN_CLIP_TOKENIZER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def write_transformers_vocabulary(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt as in openai/clip-vit-large-patch14, derived from the gzip merge list."""
    merges = (
        gzip.decompress(VOCABULARY_PATH.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    )
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


@pytest.fixture(scope="module")
def transformers_files(tmp_path_factory):
    return write_transformers_vocabulary(tmp_path_factory.mktemp("clip_vocabulary"))


def transformers_tokenizer(files, **kwargs):
    from transformers import CLIPTokenizer as TransformersCLIPTokenizer

    return TransformersCLIPTokenizer(*map(str, files), model_max_length=77, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_token_ids_match_open_clip_on_corpus(corpus, open_clip_tokenizer, tokenizer):
    reference = open_clip_tokenizer
    for prompt in corpus:
        expected = [reference.sot_token_id, *reference.encode(prompt), reference.eot_token_id]
        assert tokenizer(prompt) == expected, repr(prompt)


def test_padded_ids_match_open_clip_padding_with_zero(corpus, open_clip_tokenizer):
    expected = open_clip_tokenizer(corpus, context_length=77)
    actual = CLIPTokenizer.from_preset("openclip_bigg").encode(corpus)
    assert actual.dtype == torch.long and actual.shape == (len(corpus), 77)
    assert torch.equal(actual, expected)
    assert sum(len(CLIPTokenizer()(p)) > 77 for p in corpus) >= 40  # truncation is exercised


def test_padded_ids_match_transformers_padding_with_end_token(corpus, transformers_files, tokenizer):
    """transformers' CLIPTokenizer (as diffusers uses it for SD1.5) equals ours once it unescapes HTML.

    The one difference, and why: open_clip's `basic_clean` runs `html.unescape` twice after ftfy,
    transformers' `_tokenize` runs only `ftfy.fix_text` (which unescapes entities once, and not at
    all when the text contains "<"). So "&amp;amp;" or "&lt;&#39;" give other ids in transformers.
    Giving transformers open_clip's clean-up makes every prompt of the corpus agree.
    """
    reference = transformers_tokenizer(transformers_files)
    assert reference.pad_token_id == END_TOKEN_ID
    expected = reference(corpus, padding="max_length", max_length=77, truncation=True)["input_ids"]
    actual = tokenizer.encode(corpus).tolist()
    differing = [i for i in range(len(corpus)) if actual[i] != expected[i]]
    assert 0 < len(differing) < len(corpus) // 20
    assert all("&" in corpus[i] for i in differing)

    fix_text = reference.fix_text
    reference.fix_text = lambda text: html.unescape(html.unescape(fix_text(text)))
    expected = reference(corpus, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert actual == expected
    unpadded = reference(corpus[:300])["input_ids"]
    assert [tokenizer(p) for p in corpus[:300]] == unpadded


def test_sdxl_second_tokenizer_pads_like_diffusers_tokenizer_2(corpus, transformers_files):
    """diffusers' SDXL tokenizer_2 (pad_token "!", id 0) pads as the "openclip_bigg" preset.

    It also differs in one more way, found here: transformers makes the pad token "!" a special
    token, so every "!" of a prompt is split out as id 0 ("wow!!" -> 2781, 0, 0), where open_clip
    (original SDXL) and ComfyUI (whose clip_g tokenizer sets pad id 0 without a "!" token) give
    BPE ids ("wow!!" -> 2781, 748). We follow open_clip/ComfyUI; prompts without "!" all agree.
    """
    reference = transformers_tokenizer(transformers_files, pad_token="!")
    assert reference.pad_token_id == 0
    reference.fix_text = lambda text: html.unescape(html.unescape(ftfy.fix_text(text)))
    ours = CLIPTokenizer.from_preset("openclip_bigg")
    prompts = [p for p in corpus if "!" not in p and "！" not in p]
    assert len(prompts) > len(corpus) // 2
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ours.encode(prompts).tolist() == expected
    assert reference("wow!! great!")["input_ids"] == [START_TOKEN_ID, 2781, 0, 0, 830, 0, END_TOKEN_ID]
    assert ours("wow!! great!") == [START_TOKEN_ID, 2781, 748, 830, 256, END_TOKEN_ID]


def test_special_token_strings_follow_open_clip(open_clip_tokenizer, transformers_files, tokenizer):
    """open_clip matches "<start_of_text>"/"<end_of_text>" in text; transformers matches "<|endoftext|>"."""
    text = "a <end_of_text> b <|endoftext|> c"
    assert tokenizer(text) == [START_TOKEN_ID, *open_clip_tokenizer.encode(text), END_TOKEN_ID]
    assert END_TOKEN_ID in tokenizer.tokenize(text)
    transformers_ids = transformers_tokenizer(transformers_files)(text)["input_ids"]
    assert transformers_ids.count(END_TOKEN_ID) == 2 and transformers_ids != tokenizer(text)


def all_code_points() -> str:
    return "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)


def test_unicode_classes_match_regex_on_every_assigned_code_point():
    """`\\p{L}` and `\\p{N}` rebuilt from Python's unicodedata (Unicode 14 on Python 3.11) select the
    same characters as the `regex` package does in CLIP's case-insensitive pattern, except code
    points that `regex`'s newer Unicode assigns and Python's does not know yet (category Cn)."""
    text = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)
    classes = pre_tokenizer_classes()
    for name, reference in [("letter", r"[\p{L}]"), ("number", r"[\p{N}]"), ("other", r"[^\s\p{L}\p{N}]")]:
        expected = set(regex.findall(reference, text, regex.IGNORECASE))
        actual = set(re.findall(classes[name], text))
        assert len(expected) > 100
        assert {unicodedata.category(c) for c in expected ^ actual} <= {"Cn"}, name
    assert "\u0345" not in set(re.findall(classes["letter"] + "|" + classes["other"], "\u0345"))


def test_pre_tokenizer_splits_the_corpus_like_regex(corpus, open_clip_tokenizer):
    for prompt in corpus:
        cleaned = clean_text(prompt, ftfy.fix_text)
        assert pre_tokenizer_pattern().findall(cleaned) == regex.findall(open_clip_tokenizer.pat, cleaned)


def test_fallback_clean_up_matches_ftfy_except_mojibake_repair(corpus, open_clip_tokenizer):
    """Without ftfy, ids equal open_clip's on every prompt ftfy does not re-decode as mojibake."""
    without_ftfy = CLIPTokenizer(use_ftfy=False)
    repaired = 0
    for prompt in corpus:
        if any(
            ftfy.fix_encoding(line) != line for line in re.findall(r"[^\n]*\n?", prompt)
        ):  # ftfy's segments
            repaired += 1
            continue
        assert without_ftfy.tokenize(prompt) == open_clip_tokenizer.encode(prompt), repr(prompt)
    assert 0 < repaired < len(corpus) // 2
    characters = [chr(c) for c in [*range(0x10000), *range(0x1F000, 0x1FB00), *range(0xE0000, 0xE0080)]]
    assert [fix_text_without_ftfy(c) for c in characters if not 0xD800 <= ord(c) < 0xE000] == [
        ftfy.fix_text(c) for c in characters if not 0xD800 <= ord(c) < 0xE000
    ]


def test_truncation_keeps_the_end_token(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(100))
    ids = tokenizer(prompt)
    assert len(ids) > 77
    encoded = tokenizer.encode(prompt)[0].tolist()
    assert encoded == [*ids[:76], END_TOKEN_ID]
    assert tokenizer.encode(["a cat", prompt]).shape == (2, 77)


def test_padding_is_configurable():
    short = CLIPTokenizer(pad_token_id=0, sequence_length=10).encode("a photo of a cat")[0].tolist()
    assert short == [START_TOKEN_ID, 320, 1125, 539, 320, 2368, END_TOKEN_ID, 0, 0, 0]
    assert (
        CLIPTokenizer.from_preset("clip_l").encode("")[0].tolist() == [START_TOKEN_ID] + [END_TOKEN_ID] * 76
    )
    with pytest.raises(ValueError, match="openclip_bigg"):
        CLIPTokenizer.from_preset("t5")


def test_decode_reverses_encode(tokenizer):
    assert tokenizer.decode(tokenizer.encode("A photo of a cat, highly détailed 猫 😀")[0]) == (
        "a photo of a cat , highly détailed 猫 😀"
    )
    assert CLIPTokenizer(pad_token_id=0).decode([START_TOKEN_ID, 2368, END_TOKEN_ID, 0, 0]) == "cat"
