"""ComfyUI prompt syntax: emphasis weights, embedding words, 77-token chunks and token weighting.

Expected values are written by hand from ComfyUI's documented behaviour (comfy/sd1_clip.py)."""

import logging

import pytest
import torch

from foundationals.clip.prompt_weighting import (
    EMBEDDING_PLACEHOLDER_ID,
    apply_token_weights,
    parse_prompt_weights,
    splice_embeddings,
    tokenize_prompt,
)
from foundationals.clip.tokenizer import CLIPTokenizer

S, E = 49406, 49407  # start and end tokens
A, B, C, D = 320, 321, 322, 323  # "a</w>" ... "d</w>": single letters are byte tokens 256 + ord(c) - 33
COMMA, X, Z = 267, 343, 345


@pytest.fixture(scope="module")
def clip_l():
    return CLIPTokenizer.from_preset("clip_l")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a photo", [("a photo", 1.0)]),
        ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
        ("((b))", [("b", 1.1 * 1.1)]),
        ("(((b)))", [("b", 1.1 * 1.1 * 1.1)]),
        ("(b:1.5)", [("b", 1.5)]),
        ("((b:1.5))", [("b", 1.5)]),  # an explicit weight replaces, it does not multiply
        ("((b):1.5)", [("b", 1.5 * 1.1)]),  # ... but groups inside it multiply from it
        ("(a (b:2) c)", [("a ", 1.1), ("b", 2.0), (" c", 1.1)]),
        ("(b:0)", [("b", 0.0)]),
        ("(a:1.2:1.3)", [("a:1.2", 1.3)]),  # the last colon holds the weight
        ("(a:b)", [("a:b", 1.1)]),  # not a number: the colon is text
        ("(:1.2)", [(":1.2", 1.1)]),  # a colon at the start is text
        ("[b]", [("[b]", 1.0)]),  # square brackets are not emphasis in ComfyUI
        ("[(b)]", [("[", 1.0), ("b", 1.1), ("]", 1.0)]),
        ("\\(b\\)", [("(b)", 1.0)]),  # escaped parentheses are text
        ("(a \\(b\\):1.2)", [("a (b)", 1.2)]),
        ("a (b", [("a ", 1.0), ("(b", 1.0)]),  # an unclosed group is text
        ("((a)", [("(a", 1.1)]),  # ComfyUI: the outer "(" and inner ")" make a group
        ("a) (b)", [("a) (b)", 1.0)]),  # a stray ")" leaves the depth negative: no group after it
        ("", []),
    ],
)
def test_emphasis_weights_follow_comfyui(prompt, expected):
    actual = parse_prompt_weights(prompt)
    assert [text for text, _ in actual] == [text for text, _ in expected]
    assert [w for _, w in actual] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_weights_per_token(clip_l):
    chunks = tokenize_prompt("a (b:1.5) c ((d)) [a]", clip_l)
    bracket_a = clip_l.tokenize("[a]")
    assert len(chunks.token_ids) == 1
    assert chunks.token_ids[0] == [S, A, B, C, D, *bracket_a, E] + [E] * (75 - 4 - len(bracket_a))
    assert chunks.weights[0] == pytest.approx([1.0, 1.0, 1.5, 1.0, 1.21] + [1.0] * 72)
    assert chunks.has_weights


def test_each_weighted_segment_is_tokenized_alone(clip_l):
    chunks = tokenize_prompt("(red)dish", clip_l)
    expected = [*clip_l.tokenize("red"), *clip_l.tokenize("dish")]
    assert expected != clip_l.tokenize("reddish")
    assert chunks.token_ids[0][: 2 + len(expected)] == [S, *expected, E]


def test_padding_follows_the_tokenizer():
    chunks = tokenize_prompt("a b", CLIPTokenizer.from_preset("openclip_bigg"))
    assert chunks.token_ids == [[S, A, B, E] + [0] * 73]
    assert chunks.weights == [[1.0] * 77] and not chunks.has_weights
    assert tokenize_prompt("", CLIPTokenizer()).token_ids == [[S, E] + [E] * 75]


def test_a_200_token_prompt_splits_into_3_chunks_at_comfyui_boundaries(clip_l):
    prompt = (
        "(a b c d:1.2)" * 18  # 18 groups of 4 tokens: 72 tokens
        + "(e f g h i:1.3)"  # 5 tokens: do not fit in the 3 left, move whole to chunk 2
        + "x " * 100  # 100 tokens (a long group): fill chunk 2 (70), go on in chunk 3 (30)
        + "(j k l m n o p q r s:0.9)"  # 10 tokens
        + "(" + "z " * 13 + ":0.5)"  # 13 tokens
    )  # fmt: skip
    chunks = tokenize_prompt(prompt, clip_l)
    assert sum(t not in (S, E) for chunk in chunks.token_ids for t in chunk) == 200
    efghi, j_to_s = list(range(324, 329)), list(range(329, 339))
    assert chunks.token_ids == [
        [S, *[A, B, C, D] * 18, E, E, E, E],
        [S, *efghi, *[X] * 70, E],
        [S, *[X] * 30, *j_to_s, *[Z] * 13, E, *[E] * 22],
    ]
    expected_weights = [
        [1.0, *[1.2] * 72, 1.0, 1.0, 1.0, 1.0],
        [1.0, *[1.3] * 5, *[1.0] * 70, 1.0],
        [1.0, *[1.0] * 30, *[0.9] * 10, *[0.5] * 13, 1.0, *[1.0] * 22],
    ]
    assert chunks.weights == expected_weights


def test_a_plain_long_prompt_splits_every_75_tokens(clip_l):
    chunks = tokenize_prompt("a " * 200, clip_l)
    assert chunks.token_ids == [[S, *[A] * 75, E], [S, *[A] * 75, E], [S, *[A] * 50, E, *[E] * 25]]
    assert chunks.token_id_tensor().shape == (3, 77)


def embedding_lookup(name):
    return {
        "two": torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]),
        "one": torch.full((4,), 9.0),
    }.get(name)


def test_embedding_words_are_spliced_in(clip_l):
    chunks = tokenize_prompt("a embedding:two b (embedding:one:1.2)", clip_l, embedding_lookup)
    P = EMBEDDING_PLACEHOLDER_ID
    assert chunks.token_ids[0][:7] == [S, A, P, P, B, P, E]
    assert chunks.weights[0][:7] == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.0])
    assert sorted(chunks.embeddings) == [(0, 2), (0, 3), (0, 5)]
    assert chunks.embeddings[(0, 3)].tolist() == [5.0, 6.0, 7.0, 8.0]

    token_embeddings = torch.zeros(1, 77, 4)
    spliced = splice_embeddings(token_embeddings, chunks)
    assert spliced[0, 2].tolist() == [1.0, 2.0, 3.0, 4.0] and spliced[0, 5].tolist() == [9.0] * 4
    assert spliced[0, [0, 1, 4, 6]].abs().sum() == 0 and token_embeddings.abs().sum() == 0
    with pytest.raises(ValueError, match="width 4"):
        splice_embeddings(torch.zeros(1, 77, 8), chunks)


def test_embedding_name_with_trailing_comma(clip_l):
    chunks = tokenize_prompt("embedding:two, b", clip_l, embedding_lookup)
    P = EMBEDDING_PLACEHOLDER_ID
    assert chunks.token_ids[0][:6] == [S, P, P, COMMA, B, E]


def test_missing_embedding_warns_and_drops_the_word(clip_l, caplog):
    with caplog.at_level(logging.WARNING):
        chunks = tokenize_prompt("a embedding:nothere b", clip_l, embedding_lookup)
    assert chunks.token_ids[0][:4] == [S, A, B, E] and not chunks.embeddings
    assert "embedding:nothere" in caplog.text


def test_without_a_lookup_embedding_words_are_text(clip_l):
    chunks = tokenize_prompt("embedding:two", clip_l)
    assert chunks.token_ids == [clip_l.pad(clip_l("embedding:two"))]


def test_apply_token_weights_is_comfyuis_formula(clip_l):
    chunks = tokenize_prompt("(a b:1.5) " + "c " * 80 + "(d:0.5)", clip_l)
    assert len(chunks.token_ids) == 2
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 77, 8, generator=generator)
    empty = torch.randn(77, 8, generator=generator)

    expected = hidden.clone()
    for chunk in range(2):
        for position in range(77):
            w = chunks.weights[chunk][position]
            if w != 1.0:
                expected[chunk, position] = (hidden[chunk, position] - empty[position]) * w + empty[position]
    actual = apply_token_weights(hidden, empty, chunks.weights)
    assert actual.shape == (1, 154, 8)
    assert torch.equal(actual, expected.reshape(1, 154, 8))
    assert torch.equal(actual[0, 1], (hidden[0, 1] - empty[1]) * 1.5 + empty[1])
    assert torch.equal(actual[0, 0], hidden[0, 0])


def test_apply_token_weights_without_weights_only_concatenates():
    hidden = torch.randn(3, 77, 4)
    actual = apply_token_weights(hidden, None, [[1.0] * 77] * 3)
    assert torch.equal(actual, torch.cat(list(hidden), dim=0)[None])
    with pytest.raises(ValueError, match="empty prompt"):
        apply_token_weights(hidden, None, [[1.0] * 77, [1.0] * 76 + [2.0], [1.0] * 77])
