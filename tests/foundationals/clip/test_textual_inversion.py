"""Textual-inversion files in the layouts people download, found by name like ComfyUI's `embedding:name`."""

import fractions
import logging

import pytest
import torch
from safetensors.torch import save_file

from foundationals.clip.prompt_weighting import tokenize_prompt
from foundationals.clip.textual_inversion import (
    EmbeddingLibrary,
    TextualInversionError,
    find_embedding_file,
    load_textual_inversion,
)
from foundationals.clip.tokenizer import CLIPTokenizer


@pytest.fixture
def vectors():
    generator = torch.Generator().manual_seed(0)
    return {width: torch.randn(3, width, generator=generator) for width in (768, 1280)}


def write_a1111_pt(path, vectors):
    """A1111 webui's layout (textual_inversion.py `save`): a pickled dict, the vectors under string_to_param['*']."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors.clone().requires_grad_(True)},
            "name": path.stem,
            "step": 1500,
            "sd_checkpoint": "cc6cb27103",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        },
        path,
    )


def test_a1111_pt_loads(tmp_path, vectors):
    write_a1111_pt(tmp_path / "style.pt", vectors[768])
    assert torch.equal(load_textual_inversion(tmp_path / "style.pt", 768), vectors[768])


def test_sd15_safetensors_emb_params_loads(tmp_path, vectors):
    save_file({"emb_params": vectors[768]}, tmp_path / "neg.safetensors")
    assert torch.equal(load_textual_inversion(tmp_path / "neg.safetensors", 768), vectors[768])


def test_sdxl_safetensors_gives_each_encoder_its_vectors(tmp_path, vectors):
    save_file({"clip_l": vectors[768][:2], "clip_g": vectors[1280][:2]}, tmp_path / "xl.safetensors")
    assert torch.equal(load_textual_inversion(tmp_path / "xl.safetensors", 768), vectors[768][:2])
    assert torch.equal(load_textual_inversion(tmp_path / "xl.safetensors", 1280), vectors[1280][:2])


def test_diffusers_learned_embeds_bin_loads(tmp_path, vectors):
    torch.save({"<cat-toy>": vectors[768][0]}, tmp_path / "learned_embeds.bin")
    loaded = load_textual_inversion(tmp_path / "learned_embeds.bin", 768)
    assert loaded.shape == (1, 768) and torch.equal(loaded[0], vectors[768][0])


def test_wrong_width_names_file_content_and_expectation(tmp_path, vectors):
    save_file({"emb_params": vectors[768]}, tmp_path / "sd15.safetensors")
    with pytest.raises(TextualInversionError) as error:
        load_textual_inversion(tmp_path / "sd15.safetensors", 1280)
    message = str(error.value)
    assert "sd15.safetensors" in message and "emb_params [3, 768]" in message
    assert "OpenCLIP ViT-bigG/14" in message and "1280-wide" in message and "'clip_g'" in message

    save_file({"clip_g": vectors[1280]}, tmp_path / "only_g.safetensors")
    with pytest.raises(TextualInversionError, match=r"only_g\.safetensors.*clip_g \[3, 1280\].*768-wide"):
        load_textual_inversion(tmp_path / "only_g.safetensors", 768)


def test_unsafe_pickle_is_refused_with_the_file_name(tmp_path):
    torch.save({"emb_params": torch.zeros(1, 768), "extra": fractions.Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(TextualInversionError, match="evil.pt: cannot read it"):
        load_textual_inversion(tmp_path / "evil.pt", 768)


def test_find_by_name_with_or_without_extension_and_in_subfolders(tmp_path, vectors):
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": vectors[768]}, tmp_path / "neg.safetensors")
    write_a1111_pt(tmp_path / "sub" / "style.pt", vectors[768])
    (tmp_path.parent / "outside.pt").write_bytes(b"")
    assert find_embedding_file("neg", [tmp_path]) == tmp_path / "neg.safetensors"
    assert find_embedding_file("neg.safetensors", [tmp_path]) == tmp_path / "neg.safetensors"
    assert find_embedding_file("style", [tmp_path]) == tmp_path / "sub" / "style.pt"
    assert find_embedding_file("sub/style", [tmp_path]) == tmp_path / "sub" / "style.pt"
    assert find_embedding_file("../outside", [tmp_path]) is None
    assert find_embedding_file("nothing", [tmp_path, tmp_path / "missing"]) is None


def test_library_warns_and_returns_none_for_missing_or_wrong_files(tmp_path, vectors, caplog):
    save_file({"emb_params": vectors[768]}, tmp_path / "sd15.safetensors")
    library = EmbeddingLibrary(tmp_path, width=1280)
    with caplog.at_level(logging.WARNING):
        assert library("nothing") is None
        assert library("sd15") is None
    assert "'nothing' not found" in caplog.text and "1280-wide" in caplog.text


def test_prompt_with_sdxl_embedding_uses_each_encoders_vectors(tmp_path, vectors):
    save_file({"clip_l": vectors[768][:2], "clip_g": vectors[1280][:2]}, tmp_path / "xl.safetensors")
    for preset, width in [("clip_l", 768), ("openclip_bigg", 1280)]:
        chunks = tokenize_prompt(
            "a embedding:xl", CLIPTokenizer.from_preset(preset), EmbeddingLibrary(tmp_path, width)
        )
        assert sorted(chunks.embeddings) == [(0, 2), (0, 3)]
        assert torch.equal(chunks.embeddings[(0, 3)], vectors[width][1])
