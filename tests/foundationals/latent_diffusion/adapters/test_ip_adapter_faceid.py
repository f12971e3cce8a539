"""IP-Adapter FaceID / FaceID Plus (v1, v2) equal diffusers on identical tiny random weights.

The files are written in tencent-ailab's FaceID layout (MLPProjModel / ProjModelFaceIdPlus `image_proj`, and an
`ip_adapter` group holding the to_k_ip / to_v_ip pairs and the LoRA of every attention processor). diffusers
builds its `IPAdapterFaceIDImageProjection` / `IPAdapterFaceIDPlusImageProjection` from the same `image_proj`
with its own key conversion (`_convert_ip_adapter_image_proj_to_diffusers`); the UNet checks run one call of
the tiny SD1.5 / SDXL UNets with diffusers' IP-Adapter attention processors (`_load_ip_adapter_weights`).
Measured max abs difference (torch 2.13 CPU, fp32): projections 0.0-2e-7 (tokens ~1), UNet outputs 0.0-1e-7.
Tolerance: tests/support/parity.py (`ip_adapter_faceid`).

The LoRA the release ships (`ip-adapter-faceid*_lora.safetensors`) is kohya-named after diffusers' module names
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`, no alpha): written
here from the `.bin`'s own LoRA tensors, it loads with our LoRA loader in full and equals diffusers'
`load_lora_weights` of the same file and the LoRA merged into diffusers' weights by hand (0.0-1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from foundationals.formats.ip_adapter import read_face_embeddings
from foundationals.latent_diffusion.adapters.ip_adapter import (
    FaceEmbeddings,
    ImageEmbeddings,
    IPAdapterPatch,
    ip_adapter_from_state_dict,
    load_ip_adapter,
)
from foundationals.latent_diffusion.adapters.lora import SDLoraManager
from foundationals.latent_diffusion.model_config import UNET_PRESETS
from foundationals.model_files import ModelFileError
from tests.foundationals.latent_diffusion.test_unet import conditioning, reference_and_ours
from tests.support.parity import assert_parity
from tests.support.tiny_ip_adapter import (
    FACE_DIM,
    cross_attention_widths,
    tencent_faceid,
    tencent_ip_adapter,
    write_tencent_file,
)

TINY, TINY_SDXL = UNET_PRESETS["tiny"], UNET_PRESETS["tiny_sdxl"]
CLIP_TOKENS, CLIP_HIDDEN = 17, 32  # the tiny CLIP vision encoder's penultimate hidden states


def flat(weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{group}.{key}": value for group, items in weights.items() for key, value in items.items()}


def diffusers_projection(weights: dict[str, dict[str, torch.Tensor]]):
    converter = UNet2DConditionModel.__new__(UNet2DConditionModel)  # only the conversion method is used
    return converter._convert_ip_adapter_image_proj_to_diffusers(
        weights["image_proj"], low_cpu_mem_usage=False
    )


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_faceid_projection_matches_diffusers():
    weights = tencent_faceid("faceid", [32] * 11, 32, seed=1)
    adapter = ip_adapter_from_state_dict(flat(weights), "ip-adapter-faceid_tiny")
    assert (
        adapter.kind == "faceid" and adapter.image_input_dim == FACE_DIM and adapter.encoder_input_dim is None
    )
    reference = diffusers_projection(weights).eval()
    face = randn(3, FACE_DIM, seed=2)
    with torch.no_grad():
        expected = reference(face)
    ours = adapter.face_tokens(face)
    assert ours.shape == (3, 4, 32)
    assert_parity("ip_adapter_faceid", ours, expected)


@pytest.mark.parametrize("v2, shortcut_scale", [(False, 1.0), (True, 1.0), (True, 0.4)])
def test_faceid_plus_projection_matches_diffusers(v2, shortcut_scale):
    weights = tencent_faceid("faceid_plus", [32] * 11, 32, seed=3)
    name = "ip-adapter-faceid-plusv2_tiny" if v2 else "ip-adapter-faceid-plus_tiny"
    adapter = ip_adapter_from_state_dict(flat(weights), name)
    assert (
        adapter.kind == "faceid_plus" and adapter.faceid_v2 == v2 and adapter.clip_hidden_dim == CLIP_HIDDEN
    )
    reference = diffusers_projection(weights).eval()
    face, clip = randn(2, FACE_DIM, seed=4), randn(2, CLIP_TOKENS, CLIP_HIDDEN, seed=5)
    reference.clip_embeds = clip[:, None]  # diffusers: (batch, images, tokens, width)
    reference.shortcut, reference.shortcut_scale = v2, shortcut_scale
    with torch.no_grad():
        expected = reference(face)
    ours = adapter.face_tokens(face, clip, faceid_v2=shortcut_scale)
    assert_parity("ip_adapter_faceid", ours, expected)


@pytest.mark.parametrize(
    "config_name, kind", [("tiny", "faceid"), ("tiny", "faceid_plus"), ("tiny_sdxl", "faceid")]
)
def test_faceid_unet_call_matches_diffusers_attention_processors(config_name, kind):
    config = UNET_PRESETS[config_name]
    reference, unet = reference_and_ours(config)
    weights = tencent_faceid(kind, cross_attention_widths(reference), config.context_dim, seed=6)
    reference._load_ip_adapter_weights([weights])
    for processor in reference.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.7]
    adapter = ip_adapter_from_state_dict(
        flat(weights), f"ip-adapter-{kind.replace('_', '-')}v2_{config_name}"
    )
    inputs = conditioning(config, 2, 16, 16)
    face = randn(2, FACE_DIM, seed=7)
    clip = randn(2, CLIP_TOKENS, CLIP_HIDDEN, seed=8) if kind == "faceid_plus" else None
    if clip is not None:
        projection = reference.encoder_hid_proj.image_projection_layers[0]
        projection.clip_embeds, projection.shortcut, projection.shortcut_scale = clip[:, None], True, 0.8
    added = {"image_embeds": [face[:, None]]}
    if "pooled" in inputs:
        added |= {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
        unet.set_pooled_text_embedding(inputs["pooled"])
        unet.set_time_ids(inputs["time_ids"])
    with torch.no_grad():
        expected = reference(inputs["x"], inputs["timestep"], inputs["text"], added_cond_kwargs=added).sample
        unet.set_timestep(inputs["timestep"])
        unet.set_clip_text_embedding(inputs["text"])
        plain = unet(inputs["x"])
        injection = adapter.inject(unet)
        try:
            injection.set_tokens(adapter.face_tokens(face, clip, faceid_v2=0.8))
            injection.set_scale(0.7)
            actual = unet(inputs["x"])
        finally:
            injection.eject()
    assert (plain - expected).abs().max() > 1e-3  # the adapter acts
    assert_parity("ip_adapter_faceid", actual, expected)


def test_face_tokens_through_the_patch_use_zero_negatives_and_combine(tmp_path):
    weights = tencent_faceid("faceid", [32] * 11, 32, seed=9)
    adapter = load_ip_adapter(write_tencent_file(weights, tmp_path / "ip-adapter-faceid_tiny.bin"))
    assert adapter.kind == "faceid" and len(adapter.key_value_weights) == 11  # the embedded LoRA is not read
    faces = randn(2, FACE_DIM, seed=10)
    patch = IPAdapterPatch(adapter, FaceEmbeddings(faces), scale=0.5)
    positive, negative = patch.tokens
    assert positive.shape == (1, 8, 32)
    assert torch.equal(negative, adapter.face_tokens(torch.zeros(2, FACE_DIM)).flatten(0, 1)[None])
    average = IPAdapterPatch(adapter, FaceEmbeddings(faces), weights=[2.0, 0.0], combine="average")
    assert_parity("ip_adapter_faceid", average.tokens[0], adapter.face_tokens(faces[:1]))


def test_wrong_kinds_and_sizes_get_clear_errors(tmp_path):
    faceid = ip_adapter_from_state_dict(
        flat(tencent_faceid("faceid", [32] * 11, 32)), "ip-adapter-faceid_tiny"
    )
    plain = ip_adapter_from_state_dict(flat(tencent_ip_adapter("base", [32] * 11, 32)), "ip-adapter_tiny")
    plus = ip_adapter_from_state_dict(flat(tencent_faceid("faceid_plus", [32] * 11, 32)), "faceid-plusv2")
    image_embeds = ImageEmbeddings(torch.zeros(1, 24), torch.zeros(1, 24), "image_embeds")
    with pytest.raises(
        ValueError, match="ip-adapter-faceid_tiny is an IP-Adapter FaceID: it reads face embeddings"
    ):
        IPAdapterPatch(faceid, image_embeds)
    with pytest.raises(ValueError, match="ip-adapter_tiny is a base IP-Adapter: it reads reference images"):
        IPAdapterPatch(plain, FaceEmbeddings(torch.zeros(1, FACE_DIM)))
    with pytest.raises(ValueError, match=r"reads 512-d face embeddings \(insightface\); these are 128-d"):
        IPAdapterPatch(faceid, FaceEmbeddings(torch.zeros(1, 128)))
    with pytest.raises(ValueError, match="FaceID Plus v2: it also needs the face crop"):
        IPAdapterPatch(plus, FaceEmbeddings(torch.zeros(1, FACE_DIM)))
    torch.save(
        {"image_proj": {"proj.3.weight": torch.zeros(2, 2)}, "ip_adapter": {}}, tmp_path / "full_face.bin"
    )
    with pytest.raises(ModelFileError, match="full_face.bin.*not an IP-Adapter"):
        load_ip_adapter(tmp_path / "full_face.bin")


def test_face_embeddings_files(tmp_path):
    face = randn(2, FACE_DIM, seed=11)
    np.save(tmp_path / "face.npy", face.numpy())
    torch.save(face[0], tmp_path / "face.pt")
    save_file({"face_embeds": face[:, None].contiguous()}, str(tmp_path / "face.safetensors"))
    assert torch.equal(read_face_embeddings(tmp_path / "face.npy"), face)
    assert torch.equal(read_face_embeddings(tmp_path / "face.pt"), face[:1])
    assert torch.equal(read_face_embeddings(tmp_path / "face.safetensors"), face)
    (tmp_path / "face.txt").write_text("0.1")
    with pytest.raises(ModelFileError, match="face.txt.*expected a .npy, .safetensors or .pt file"):
        read_face_embeddings(tmp_path / "face.txt")
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(ModelFileError, match=r"bad.npy.*shape \(2, 3, 4\)"):
        read_face_embeddings(tmp_path / "bad.npy")


def kohya_faceid_lora(
    weights: dict[str, dict[str, torch.Tensor]], reference: UNet2DConditionModel
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The `.bin`'s LoRA as the release's `_lora.safetensors`: processor N (diffusers' `attn_processors` order)
    named `lora_unet_<module path with underscores>_<to_q|to_k|to_v|to_out_0>`; also each name's module path."""
    out, paths = {}, {}
    for index, name in enumerate(reference.attn_processors):
        module = name.removesuffix(".processor")
        for ours, theirs in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            key = f"lora_unet_{module}.{theirs}".replace(".", "_")
            paths[key] = f"{module}.{theirs}"
            for part in ("down", "up"):
                tensor = weights["ip_adapter"][f"{index}.{ours}_lora.{part}.weight"]
                out[f"{key}.lora_{part}.weight"] = tensor.contiguous()
    return out, paths


def test_the_faceid_lora_file_loads_in_full_and_equals_diffusers_and_the_merged_lora(tmp_path):
    """The release's LoRA equals diffusers' `load_lora_weights` of the same file (same 88 layers: to_q/k/v/out.0
    of every attn1 and attn2) and tencent-ailab's LoRA processors (lora_scale 1, no alpha: merged by hand).

    Diagnosis of the earlier xfail ("~1e-3 difference"): nothing differed. The LoRA's whole effect on this tiny
    UNet is 3.8e-3, and the test's own "the LoRA acts" check demanded > 1e-2; our output was within 1e-7 of
    both references (key mapping, alpha/rank scale 1 and targeted layers all agree)."""
    import diffusers

    reference, unet = reference_and_ours(TINY)
    widths = cross_attention_widths(reference)
    weights = tencent_faceid("faceid", widths, TINY.context_dim, seed=12)
    lora, paths = kohya_faceid_lora(weights, reference)
    name = "ip-adapter-faceid_tiny_lora.safetensors"
    save_file(lora, str(tmp_path / name))
    inputs = conditioning(TINY, 2, 16, 16)
    with torch.no_grad():
        plain = reference(inputs["x"], inputs["timestep"], inputs["text"]).sample
    pipe = diffusers.StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=reference,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(tmp_path), weight_name=name, adapter_name="faceid")
    targeted = {module for module, layer in reference.named_modules() if hasattr(layer, "lora_A")}
    assert targeted == set(paths.values())
    with torch.no_grad():
        expected = reference(inputs["x"], inputs["timestep"], inputs["text"]).sample
    pipe.unload_lora_weights()
    with torch.no_grad():
        for key, path in paths.items():  # tencent's LoRA processors, merged by hand (no alpha: scale 1)
            module = reference.get_submodule(path)  # a new tensor: ours shares the old one's storage
            delta = lora[f"{key}.lora_up.weight"] @ lora[f"{key}.lora_down.weight"]
            module.weight = torch.nn.Parameter(module.weight + delta)
        merged = reference(inputs["x"], inputs["timestep"], inputs["text"]).sample
    manager = SDLoraManager.for_models(unet)
    report = manager.add_loras("faceid", tmp_path / name, strict=True)
    assert report.applied_count == 4 * 2 * len(widths) and not report.not_applied
    assert (expected - plain).abs().max() > 1e-3  # the LoRA acts (3.8e-3 here, 1000x the tolerance)
    unet.set_timestep(inputs["timestep"])
    unet.set_clip_text_embedding(inputs["text"])
    with torch.no_grad():
        actual = unet(inputs["x"])
    assert_parity("ip_adapter_faceid", actual, expected)
    assert_parity("ip_adapter_faceid", actual, merged)
