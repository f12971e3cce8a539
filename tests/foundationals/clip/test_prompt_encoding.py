"""SD text conditioning against diffusers' encode_prompt, and ComfyUI's emphasis / long-prompt / embedding rules."""

import gzip
import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextConfig as TransformersTextConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTokenizer as TransformersTokenizer

from foundationals.clip.prompt_encoding import encode_sd15_prompt, encode_sdxl_prompt
from foundationals.clip.text_encoder import load_clip_text_encoder
from foundationals.clip.tokenizer import VOCABULARY_PATH, bytes_to_unicode
from tests.support.parity import assert_parity


def randomized(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
    return model.eval()


def text_model(width, projection, activation, seed):
    config = TransformersTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=width + 5,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=activation,
        projection_dim=24,
    )
    return randomized((CLIPTextModelWithProjection if projection else CLIPTextModel)(config), seed)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """vocab.json + merges.txt derived from our gzip merge list (as in test_tokenizer.py)."""
    folder = tmp_path_factory.mktemp("clip_vocabulary")
    merges = (
        gzip.decompress(VOCABULARY_PATH.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    )
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


@pytest.fixture(scope="module")
def sd15(tokenizer_files):
    reference = text_model(32, projection=False, activation="quick_gelu", seed=0)
    pipeline = StableDiffusionPipeline(
        vae=None,
        text_encoder=reference,
        tokenizer=TransformersTokenizer(*tokenizer_files, model_max_length=77),
        unet=None,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipeline, load_clip_text_encoder(reference.state_dict(), "transformers")


@pytest.fixture(scope="module")
def sdxl(tokenizer_files):
    clip_l = text_model(32, projection=False, activation="quick_gelu", seed=1)
    bigg = text_model(40, projection=True, activation="gelu", seed=2)
    pipelines = {
        zeros: StableDiffusionXLPipeline(
            vae=None,
            text_encoder=clip_l,
            text_encoder_2=bigg,
            tokenizer=TransformersTokenizer(*tokenizer_files, model_max_length=77),
            tokenizer_2=TransformersTokenizer(*tokenizer_files, model_max_length=77, pad_token="!"),
            unet=None,
            scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
            force_zeros_for_empty_prompt=zeros,
            add_watermarker=False,
        )
        for zeros in (True, False)
    }
    config_l, config_g = clip_l.config.to_dict(), bigg.config.to_dict()
    encoder_l = load_clip_text_encoder(clip_l.state_dict(), "transformers", config_json=config_l)
    encoder_g = load_clip_text_encoder(bigg.state_dict(), "transformers", config_json=config_g)
    return pipelines, encoder_l, encoder_g


def max_diff(a, b):
    return (a - b).abs().max().item()


PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"


def test_sd15_conditioning_matches_diffusers_encode_prompt(sd15):
    pipeline, encoder = sd15
    with torch.no_grad():
        positive, negative = pipeline.encode_prompt(
            PROMPT, "cpu", 1, True, negative_prompt="blurry, low quality"
        )
        _, empty = pipeline.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=None)
        skipped, _ = pipeline.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=1)
    assert_parity("prompt_encoding", encode_sd15_prompt(PROMPT, encoder).embeddings, positive)
    assert_parity("prompt_encoding", encode_sd15_prompt("blurry, low quality", encoder).embeddings, negative)
    assert_parity("prompt_encoding", encode_sd15_prompt("", encoder).embeddings, empty)
    # diffusers' clip_skip=1 is ComfyUI's "CLIP Set Last Layer" -2: penultimate layer, final norm applied
    assert_parity("prompt_encoding", encode_sd15_prompt(PROMPT, encoder, layer=-2).embeddings, skipped)
    assert encode_sd15_prompt(PROMPT, encoder).pooled is None


def test_sdxl_conditioning_matches_diffusers_encode_prompt(sdxl):
    pipelines, encoder_l, encoder_g = sdxl
    with torch.no_grad():
        positive, negative, pooled, negative_pooled = pipelines[True].encode_prompt(
            PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry"
        )
    ours = encode_sdxl_prompt(PROMPT, encoder_l, encoder_g)
    assert ours.embeddings.shape == (1, 77, 72)  # 32 (CLIP-L) + 40 (bigG) here; 768 + 1280 full size
    assert_parity("prompt_encoding", ours.embeddings, positive)
    assert_parity("prompt_encoding", ours.pooled, pooled)
    ours_negative = encode_sdxl_prompt("blurry", encoder_l, encoder_g)
    assert_parity("prompt_encoding", ours_negative.embeddings, negative)
    assert_parity("prompt_encoding", ours_negative.pooled, negative_pooled)


def test_sdxl_empty_negative_is_zeros_in_diffusers_and_encoded_otherwise(sdxl):
    pipelines, encoder_l, encoder_g = sdxl
    with torch.no_grad():
        _, zero_negative, _, zero_pooled = pipelines[True].encode_prompt(
            PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=None
        )
        _, negative, _, negative_pooled = pipelines[False].encode_prompt(
            PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=None
        )
    empty = encode_sdxl_prompt("", encoder_l, encoder_g)
    assert torch.equal(empty.zeros_like().embeddings, zero_negative)
    assert torch.equal(empty.zeros_like().pooled, zero_pooled)
    assert_parity("prompt_encoding", empty.embeddings, negative)  # ComfyUI encodes "" as any prompt
    assert_parity("prompt_encoding", empty.pooled, negative_pooled)


def reference_hidden(model, ids, layer=-1, final_norm=True):
    with torch.no_grad():
        hidden = model(torch.tensor(ids), output_hidden_states=True).hidden_states[layer]
        return model.text_model.final_layer_norm(hidden) if final_norm else hidden


def padded(ids, pad=49407):
    return [49406, *ids, 49407] + [pad] * (75 - len(ids))


def test_emphasis_moves_weighted_tokens_away_from_the_empty_prompt(sd15, tokenizer_files):
    """ComfyUI: z = (z - z_empty) * w + z_empty at tokens of weight w != 1, z_empty the encoded empty prompt."""
    pipeline, encoder = sd15
    words = TransformersTokenizer(*tokenizer_files)("a red cat on a mat")["input_ids"][1:-1]
    assert len(words) == 6  # one token per word
    ids, empty = padded(words), padded([])
    z = reference_hidden(pipeline.text_encoder, [ids])[0]
    z_empty = reference_hidden(pipeline.text_encoder, [empty])[0]
    expected = z.clone()
    for position, weight in [(2, 1.5), (3, 1.1 * 1.1), (6, 0.5)]:  # red, cat, mat (after the start token)
        expected[position] = (z[position] - z_empty[position]) * weight + z_empty[position]
    actual = encode_sd15_prompt("a (red:1.5) ((cat)) on a (mat:0.5)", encoder).embeddings
    assert_parity("prompt_encoding", actual[0], expected)
    assert max_diff(actual[0], z) > 0.1


def test_long_prompts_are_encoded_in_chunks_of_75_tokens(sd15, tokenizer_files):
    pipeline, encoder = sd15
    prompt = " ".join(["cat", "dog", "tree", "house", "car"] * 24)  # 120 one-token words
    words = TransformersTokenizer(*tokenizer_files)(prompt)["input_ids"][1:-1]
    assert len(words) == 120
    expected = reference_hidden(pipeline.text_encoder, [padded(words[:75]), padded(words[75:])])
    actual = encode_sd15_prompt(prompt, encoder).embeddings
    assert actual.shape == (1, 154, 32)
    assert_parity("prompt_encoding", actual, expected.reshape(1, 154, 32))


def test_textual_inversion_vectors_replace_token_embeddings(sd15, tokenizer_files):
    """Expected as ComfyUI computes it: the vocabulary extended by the embedding's rows, ids pointing there."""
    pipeline, encoder = sd15
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(7))
    words = TransformersTokenizer(*tokenizer_files)("a photo of in the style")["input_ids"][1:-1]
    reference = pipeline.text_encoder
    original = reference.text_model.embeddings.token_embedding
    extended = torch.nn.Embedding(49410, 32)
    with torch.no_grad():
        extended.weight.copy_(torch.cat([original.weight, vectors]))
    ids = padded([*words[:3], 49408, 49409, *words[3:]])
    reference.text_model.embeddings.token_embedding = extended
    try:
        expected = reference_hidden(reference, [ids])
    finally:
        reference.text_model.embeddings.token_embedding = original

    lookups = []

    def lookup(name):
        lookups.append(name)
        return vectors if name == "mystyle" else None

    actual = encode_sd15_prompt("a photo of embedding:mystyle in the style", encoder, embeddings=lookup)
    assert lookups == ["mystyle"]
    assert_parity("prompt_encoding", actual.embeddings, expected)


def test_sdxl_pooled_comes_from_the_first_chunk_unweighted(sdxl):
    pipelines, encoder_l, encoder_g = sdxl
    long_prompt = " ".join(["cat"] * 80)
    ours = encode_sdxl_prompt(f"(red:1.3) {long_prompt}", encoder_l, encoder_g)
    plain = encode_sdxl_prompt(f"red {long_prompt}", encoder_l, encoder_g)
    assert ours.embeddings.shape == (1, 154, 72)
    assert_parity("prompt_encoding", ours.pooled, plain.pooled)
    assert max_diff(ours.embeddings, plain.embeddings) > 0.01
