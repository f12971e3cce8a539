"""CLIPTextEncoder against transformers' CLIPTextModel(WithProjection) on identical random weights.

Tolerances: tests/support/parity.py (checks `clip_text`, `clip_text_full`).
"""

import gc
import os

import pytest
import torch
from transformers import CLIPTextConfig as TransformersTextConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import fluxion.layers as fl
from foundationals.clip.config import TEXT_PRESETS, CLIPTextConfig
from foundationals.clip.text_encoder import (
    CLIPTextEncoder,
    CLIPTextHiddenState,
    TransformerLayer,
    load_clip_text_encoder,
)
from tests.support.parity import assert_parity, check_parity

SLOW = pytest.mark.skipif(os.environ.get("FLUXION_SLOW") != "1", reason="full-size CLIP: set FLUXION_SLOW=1")


def transformers_config(config: CLIPTextConfig) -> TransformersTextConfig:
    return TransformersTextConfig(
        vocab_size=config.vocabulary_size,
        hidden_size=config.embedding_dim,
        intermediate_size=config.feedforward_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_sequence_length,
        hidden_act=config.activation,
        projection_dim=config.projection_dim or 512,
        eos_token_id=2,  # transformers' legacy rule, as in SD's configs: pool at argmax(ids)
    )


def reference_model(config: CLIPTextConfig, seed: int = 0, scale: float | None = 0.3):
    """transformers model of `config`, weights re-drawn (N(0, scale), LayerNorm weights around 1)."""
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if config.projection_dim else CLIPTextModel
    model = model_class(transformers_config(config)).eval()
    if scale is not None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, scale)
    return model


def random_token_ids(batch: int = 3, seed: int = 1) -> torch.Tensor:
    """SD-like ids: start, random tokens, one end token at a varying place, then padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (batch, 77), generator=generator)
    ids[:, 0] = 49406
    for row, end in enumerate([5, 40, 76][:batch]):
        ids[row, end] = 49407
        ids[row, end + 1 :] = 49407 if row % 2 == 0 else 0  # both paddings: 49407 (CLIP-L) and 0 (bigG)
    return ids


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tiny_clip_l():
    config = TEXT_PRESETS["tiny"]
    reference = reference_model(config)
    return reference, load_clip_text_encoder(reference.state_dict(), "transformers", config=config)


@pytest.fixture(scope="module")
def tiny_bigg():
    config = CLIPTextConfig(
        embedding_dim=40, num_layers=4, num_heads=5, feedforward_dim=52, activation="gelu", projection_dim=24
    )
    reference = reference_model(config, seed=2)
    return reference, load_clip_text_encoder(reference.state_dict(), "transformers", config=config)


def test_tiny_clip_l_matches_transformers_clip_text_model(tiny_clip_l):
    reference, encoder = tiny_clip_l
    ids = random_token_ids()
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        actual = encoder(ids)
    assert expected.last_hidden_state.abs().mean() > 0.1  # not a degenerate output
    assert_parity("clip_text", actual, expected.last_hidden_state)


def test_every_hidden_state_matches_transformers_output_hidden_states(tiny_clip_l):
    reference, encoder = tiny_clip_l
    ids = random_token_ids()
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        final_norm = reference.text_model.final_layer_norm
        for layer in range(-4, 4):
            hidden = CLIPTextHiddenState(encoder, layer=layer, final_norm=False)(ids)
            assert_parity("clip_text", hidden, expected.hidden_states[layer])
            normed = CLIPTextHiddenState(encoder, layer=layer)(
                ids
            )  # SD1.5 / ComfyUI SD1: final LN on layer k
            assert_parity("clip_text", normed, final_norm(expected.hidden_states[layer]))
    with pytest.raises(ValueError, match="out of range"):
        CLIPTextHiddenState(encoder, layer=-5)


def test_tiny_bigg_pooled_projection_matches_text_embeds(tiny_bigg):
    reference, encoder = tiny_bigg
    ids = random_token_ids()
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        hidden, text_embeds = encoder(ids)
        penultimate, pooled = CLIPTextHiddenState(encoder, layer=-2, final_norm=False, pooled=True)(ids)
    assert_parity("clip_text", hidden, expected.last_hidden_state)
    assert_parity("clip_text", text_embeds, expected.text_embeds)
    assert_parity("clip_text", penultimate, expected.hidden_states[-2])  # SDXL: penultimate, no final LN
    assert_parity("clip_text", pooled, expected.text_embeds)
    assert not torch.allclose(penultimate, expected.last_hidden_state)


def test_pooling_takes_the_first_end_token_when_padding_with_end_tokens(tiny_bigg):
    reference, encoder = tiny_bigg
    ids = random_token_ids()
    with torch.no_grad():
        first_end = (ids == 49407).int().argmax(-1)
        hidden, text_embeds = encoder(ids)
        expected = reference.text_projection(hidden[torch.arange(3), first_end])
    assert_parity("clip_text", text_embeds, expected)


def test_hidden_state_view_runs_only_the_layers_it_needs_and_shares_weights(tiny_bigg):
    _, encoder = tiny_bigg
    calls = []
    hooks = [
        layer.register_forward_hook(lambda module, args, output: calls.append(module))
        for layer in encoder.layers(TransformerLayer)
    ]
    try:
        view = CLIPTextHiddenState(encoder, layer=-2)
        view(random_token_ids(1))
        assert len(calls) == 3  # 4 layers, the last one is not run
        calls.clear()
        CLIPTextHiddenState(encoder, layer=-2, pooled=True)(random_token_ids(1))
        assert len(calls) == 4
    finally:
        for hook in hooks:
            hook.remove()
    ours = {p.data_ptr() for p in view.parameters()}
    assert ours <= {p.data_ptr() for p in encoder.parameters()}
    assert len(list(encoder.layers(TransformerLayer))) == 4  # the encoder is untouched
    assert all(layer.parent is encoder for layer in encoder.layers(TransformerLayer))


def test_extra_embeddings_give_ids_past_the_vocabulary_their_vectors(tiny_clip_l):
    """Textual inversion: ids 49408 + i read row i of the context's table, as an extended vocabulary would."""
    reference, encoder = tiny_clip_l
    extra = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    ids = random_token_ids(1)
    ids[0, 2], ids[0, 3] = 49408 + 1, 49408
    extended = torch.nn.Embedding(49410, 32)
    with torch.no_grad():
        extended.weight.copy_(torch.cat([reference.text_model.embeddings.token_embedding.weight, extra]))
        reference.text_model.embeddings.token_embedding, original = (
            extended,
            reference.text_model.embeddings.token_embedding,
        )
        try:
            expected = reference(ids).last_hidden_state
        finally:
            reference.text_model.embeddings.token_embedding = original
        encoder.set_context("clip_text", {"token_ids": None, "extra_embeddings": extra})
        try:
            actual = encoder(ids)
        finally:
            encoder.set_context("clip_text", {"token_ids": None, "extra_embeddings": None})
        assert_parity("clip_text", actual, expected)
        assert not torch.allclose(actual, encoder(ids.clamp(max=49407)))
        ids[0, 4] = 49408 + 2
        encoder.set_context("clip_text", {"token_ids": None, "extra_embeddings": extra})
        with pytest.raises(fl.ChainError, match="extra embeddings"):
            encoder(ids)
        encoder.set_context("clip_text", {"token_ids": None, "extra_embeddings": None})


@pytest.mark.parametrize("name", ["clip_l", "openclip_h", "openclip_bigg"])
def test_presets_have_the_parameters_of_the_real_models(name):
    config = TEXT_PRESETS[name]
    with torch.device("meta"):
        reference = (CLIPTextModelWithProjection if config.projection_dim else CLIPTextModel)(
            transformers_config(config)
        )
    encoder = CLIPTextEncoder(config, device="meta")
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in reference.parameters())
    # SD2's diffusers text_encoder keeps 23 of ViT-H's 24 layers (340.39 M); open_clip files hold all 24.
    expected_millions = {"clip_l": 123.06, "openclip_h": 352.98, "openclip_bigg": 694.66}[name]
    assert round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2) == expected_millions


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(embedding_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="activation"):
        CLIPTextConfig(activation="relu")


@pytest.mark.parametrize("name", ["clip_l", pytest.param("openclip_bigg", marks=SLOW)])
def test_full_size_text_encoders_match_transformers(name):
    """CLIP-L runs in every CI run (~10 s); bigG (700M parameters) only with FLUXION_SLOW=1."""
    config = TEXT_PRESETS[name]
    reference = reference_model(config, scale=None)  # transformers' own initialisation
    encoder = load_clip_text_encoder(reference.state_dict(), "transformers", config=config)
    ids = random_token_ids()
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        output = encoder(ids)
        hidden, pooled = (output, None) if config.projection_dim is None else output
        penultimate = CLIPTextHiddenState(encoder, layer=-2, final_norm=False)(ids)
    diffs = [max_diff(hidden, expected.last_hidden_state), max_diff(penultimate, expected.hidden_states[-2])]
    if pooled is not None:
        diffs.append(max_diff(pooled, expected.text_embeds))
    del reference, encoder
    gc.collect()
    check_parity("clip_text_full", max(diffs))
