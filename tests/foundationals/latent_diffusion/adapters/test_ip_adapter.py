"""IP-Adapter equals diffusers' `load_ip_adapter` + `set_ip_adapter_scale` on identical tiny random weights.

The IP-Adapter files are written in tencent-ailab's layout from random tensors (`.bin` nested dicts and flat
`.safetensors`), the CLIP vision encoder is a transformers model saved with `save_pretrained`; diffusers
loads both offline from the folder. Measured max abs differences on [0, 1] images (torch 2.13 CPU, fp32,
4 DDIM steps, guidance 5): base 1.1e-5, plus 2.0e-5 (the adapter itself moves the image by ~0.5).
Tolerance: tests/support/parity.py (`ip_adapter`). SDXL base, one UNet call against diffusers' UNet with the same file: see the test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from foundationals.clip.config import IMAGE_PRESETS
from foundationals.clip.image_encoder import CLIPImageEncoder, load_clip_image_encoder_from_folder
from foundationals.latent_diffusion.adapters.ip_adapter import (
    ImageAttention,
    ImageEmbeddings,
    ImageProjection,
    IPAdapter,
    IPAdapterPatch,
    ip_adapter_from_state_dict,
    load_ip_adapter,
)
from foundationals.latent_diffusion.model_config import SD15_UNET, UNET_PRESETS
from foundationals.latent_diffusion.model_patch import SamplingRun
from foundationals.latent_diffusion.unet import UNet
from foundationals.model_files import ModelFileError
from tests.foundationals.latent_diffusion.test_unet import conditioning, reference_and_ours
from tests.support.parity import assert_parity
from tests.support.tiny_ip_adapter import (
    cross_attention_widths,
    sample_with_patches,
    tencent_ip_adapter,
    transformers_image_encoder,
    write_tencent_file,
)
from tests.support.tiny_sd import (
    clip_tokenizer,
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)

SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    num_train_timesteps=1000,
)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def random_image(seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def comfy_image(*arrays: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a).float() / 255 for a in arrays])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip_adapter")
    unet, vae, text = diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder()
    tokenizer = clip_tokenizer(folder / "tokenizer")
    transformers_image_encoder().save_pretrained(folder / "image_encoder")
    widths = cross_attention_widths(unet)
    files = {
        "base": write_tencent_file(
            tencent_ip_adapter("base", widths, 32, seed=1), folder / "ip-adapter_tiny.bin"
        ),
        "plus": write_tencent_file(
            tencent_ip_adapter("plus", widths, 32, seed=2), folder / "ip-adapter-plus_tiny.safetensors"
        ),
    }
    return dict(
        folder=folder,
        files=files,
        parts=dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer),
        sd=ours_from_diffusers(unet, vae, text),
        encoder=load_clip_image_encoder_from_folder(folder / "image_encoder"),
    )


def diffusers_pipeline(setup, kind: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        **setup["parts"],
        scheduler=DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    path = setup["files"][kind]
    pipe.load_ip_adapter(
        str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder="image_encoder"
    )
    return pipe


def run_diffusers(pipe, images, scale: float) -> torch.Tensor:
    pipe.set_ip_adapter_scale(scale)
    return pipe(
        "a photo of a cat",
        negative_prompt="",
        ip_adapter_image=images,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pt",
    ).images


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_sd15_ip_adapter_matches_diffusers(setup, kind):
    image = random_image(0)
    pipe = diffusers_pipeline(setup, kind)
    expected = run_diffusers(pipe, Image.fromarray(image), 0.7)
    pipe.unload_ip_adapter()
    adapter = load_ip_adapter(setup["files"][kind])
    assert adapter.kind == kind
    patch = IPAdapterPatch.from_images(adapter, setup["encoder"], comfy_image(image), scale=0.7)
    ours = sample_with_patches(setup["sd"], [patch])
    without = sample_with_patches(setup["sd"], [])
    assert max_diff(without, expected) > 0.05  # the adapter really changes the image
    assert_parity("ip_adapter", ours, expected)


def test_two_images_concatenated_match_diffusers_multi_image_input(setup):
    images = [random_image(1), random_image(2, 36, 36)]
    pipe = diffusers_pipeline(setup, "base")
    expected = run_diffusers(pipe, [[Image.fromarray(a) for a in images]], 0.6)
    pipe.unload_ip_adapter()
    adapter = load_ip_adapter(setup["files"]["base"])
    embeddings = ImageEmbeddings(
        *(
            torch.cat(
                [adapter.encode_images(setup["encoder"], comfy_image(a)).__dict__[part] for a in images]
            )
            for part in ("positive", "negative")
        ),
        kind="image_embeds",
    )
    ours = sample_with_patches(
        setup["sd"], [IPAdapterPatch(adapter, embeddings, scale=0.6, combine="concat")]
    )
    assert_parity("ip_adapter", ours, expected)


def test_scale_zero_equals_no_adapter_exactly(setup):
    adapter = load_ip_adapter(setup["files"]["plus"])
    patch = IPAdapterPatch.from_images(adapter, setup["encoder"], comfy_image(random_image(3)), scale=0.0)
    assert torch.equal(sample_with_patches(setup["sd"], [patch]), sample_with_patches(setup["sd"], []))


def test_undo_restores_the_unet_exactly(setup):
    sd = setup["sd"]
    unet = sd.unet
    before_repr, before_keys = repr(unet), list(unet.state_dict())
    before_contexts = sorted(unet.provider.contexts)
    reference = sample_with_patches(sd, [], decode=False)
    adapter = load_ip_adapter(setup["files"]["base"])
    patch = IPAdapterPatch.from_images(adapter, setup["encoder"], comfy_image(random_image(4)), scale=1.0)
    run = SamplingRun(4, 0, 8, 8, 1, True)
    undo = patch.apply(sd, run)
    assert repr(unet) != before_repr and "ImageCrossAttention" in repr(unet)
    assert len(list(unet.layers(ImageAttention, recurse=True))) == 11
    undo()
    assert repr(unet) == before_repr
    assert list(unet.state_dict()) == before_keys
    assert sorted(unet.provider.contexts) == before_contexts
    assert run.step_hooks == []
    assert torch.equal(sample_with_patches(sd, [], decode=False), reference)


def test_two_stacked_adapters_undo_in_reverse(setup):
    sd = setup["sd"]
    before = repr(sd.unet)
    images = comfy_image(random_image(5))
    patches = [
        IPAdapterPatch.from_images(load_ip_adapter(setup["files"][kind]), setup["encoder"], images, scale=0.5)
        for kind in ("base", "plus")
    ]
    both = sample_with_patches(sd, patches)
    assert max_diff(both, sample_with_patches(sd, patches[:1])) > 1e-3
    assert repr(sd.unet) == before


def test_outside_the_window_the_trajectory_equals_no_adapter(setup):
    sd = setup["sd"]
    adapter = load_ip_adapter(setup["files"]["base"])
    embeddings = adapter.encode_images(setup["encoder"], comfy_image(random_image(6)))

    def trajectory(patches):
        latents: list[torch.Tensor] = []
        sample_with_patches(sd, patches, steps=6, callback=lambda done, total, x: latents.append(x.clone()))
        return latents

    plain = trajectory([])
    late = trajectory([IPAdapterPatch(adapter, embeddings, scale=1.0, start=0.5)])
    for step in range(3):  # progress 0, 1/6, 2/6 < 0.5: inactive
        assert torch.equal(late[step], plain[step])
    assert max_diff(late[3], plain[3]) > 1e-4
    never = trajectory([IPAdapterPatch(adapter, embeddings, scale=1.0, start=0.5, end=0.5)])
    assert all(torch.equal(a, b) for a, b in zip(never, plain))
    early = trajectory([IPAdapterPatch(adapter, embeddings, scale=1.0, end=0.5)])
    assert max_diff(early[0], plain[0]) > 1e-4


def test_mask_limits_the_image_attention_to_its_region(setup):
    """Each block's image attention is exactly zero outside the mask (resized to 16x16, 8x8 and 4x4 grids).

    At the UNet output the region outside is not untouched: later GroupNorms, convolutions and
    self-attention carry the change everywhere (measured on this tiny UNet, one call: first block outside
    0.0, UNet output outside ~0.036 vs inside ~0.034). So the exact check is per block.
    """
    adapter = load_ip_adapter(setup["files"]["base"])
    unet = setup["sd"].unet
    inputs = conditioning(UNET_PRESETS["tiny"], 2, 16, 16)
    unet.set_timestep(inputs["timestep"])
    unet.set_clip_text_embedding(inputs["text"])
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1.0
    outputs: list[torch.Tensor] = []
    injection = adapter.inject(unet)
    try:
        injection.set_tokens(adapter.project(torch.randn(2, 24, generator=torch.Generator().manual_seed(0))))
        injection.set_mask(mask)
        hooks = [
            attention.register_forward_hook(lambda module, args, output: outputs.append(output))
            for attention in unet.layers(ImageAttention, recurse=True)
        ]
        with torch.no_grad():
            unet(inputs["x"])
        for hook in hooks:
            hook.remove()
    finally:
        injection.eject()
    assert len(outputs) == 11
    for output in outputs:
        side = int(output.shape[1] ** 0.5)
        grid = output.reshape(2, side, side, -1)
        assert grid[:, :, side // 2 :].abs().max().item() == 0.0
        assert grid[:, :, : side // 2].abs().max().item() > 1e-3


def test_average_and_weights_follow_ipadapter_plus_semantics(setup):
    adapter = load_ip_adapter(setup["files"]["base"])
    embeddings = adapter.encode_images(setup["encoder"], comfy_image(random_image(7), random_image(8)))
    e1, e2 = embeddings.positive
    positive, negative = adapter.image_tokens(embeddings, combine="average")
    assert positive.shape == (1, 4, 32)
    assert max_diff(positive, adapter.project(((e1 + e2) / 2)[None])) < 1e-6
    # weights multiply each embedding before combining: average of (2 e1, 0 e2) is e1
    positive, _ = adapter.image_tokens(embeddings, weights=[2.0, 0.0], combine="average")
    assert max_diff(positive, adapter.project(e1[None])) < 1e-5
    positive, negative = adapter.image_tokens(embeddings, combine="concat")
    assert positive.shape == negative.shape == (1, 8, 32)
    assert torch.equal(negative, adapter.project(torch.zeros(2, 24)).flatten(0, 1)[None])
    with pytest.raises(ValueError, match="combine mode"):
        adapter.image_tokens(embeddings, combine="sum")


def test_image_embeddings_save_and_load(setup, tmp_path):
    adapter = load_ip_adapter(setup["files"]["plus"])
    embeddings = adapter.encode_images(setup["encoder"], comfy_image(random_image(9)))
    assert embeddings.kind == "penultimate_hidden_states" and embeddings.positive.shape == (1, 17, 32)
    embeddings.save(tmp_path / "embeds.safetensors")
    loaded = ImageEmbeddings.load(tmp_path / "embeds.safetensors")
    assert loaded.kind == embeddings.kind
    assert torch.equal(loaded.positive, embeddings.positive) and torch.equal(
        loaded.negative, embeddings.negative
    )
    with pytest.raises(ValueError, match="needs image_embeds"):
        IPAdapterPatch(load_ip_adapter(setup["files"]["base"]), loaded)


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_diffusers_layout_loads_the_same_adapter(setup, kind):
    pipe = diffusers_pipeline(setup, kind)
    state = {
        key: value
        for key, value in pipe.unet.state_dict().items()
        if "encoder_hid_proj" in key or "_ip." in key
    }
    pipe.unload_ip_adapter()
    from_diffusers = ip_adapter_from_state_dict(state)
    from_file = load_ip_adapter(setup["files"][kind])
    for (k1, v1), (k2, v2) in zip(from_diffusers.key_value_weights, from_file.key_value_weights, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert (
        from_diffusers.image_projection.state_dict().keys() == from_file.image_projection.state_dict().keys()
    )
    for key, value in from_file.image_projection.state_dict().items():
        assert torch.equal(from_diffusers.image_projection.state_dict()[key], value)


def test_sdxl_ip_adapter_matches_diffusers_unet():
    """One UNet call of tiny SDXL with diffusers' `_load_ip_adapter_weights` (what `load_ip_adapter` calls)."""
    config = UNET_PRESETS["tiny_sdxl"]
    reference, unet = reference_and_ours(config)
    weights = tencent_ip_adapter("base", cross_attention_widths(reference), config.context_dim, seed=3)
    reference._load_ip_adapter_weights([weights])
    for processor in reference.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.8]
    adapter = ip_adapter_from_state_dict(
        {f"{group}.{key}": value for group, items in weights.items() for key, value in items.items()},
        "tiny_sdxl",
    )
    assert adapter.family == "a 48-wide text context" and len(adapter.key_value_weights) == 17
    inputs = conditioning(config, 2, 16, 16)
    image_embeds = torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(4))
    added = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"], "image_embeds": [image_embeds]}
    with torch.no_grad():
        expected = reference(inputs["x"], inputs["timestep"], inputs["text"], added_cond_kwargs=added).sample
        unet.set_timestep(inputs["timestep"])
        unet.set_clip_text_embedding(inputs["text"])
        unet.set_pooled_text_embedding(inputs["pooled"])
        unet.set_time_ids(inputs["time_ids"])
        plain = unet(inputs["x"])
        injection = adapter.inject(unet)
        injection.set_tokens(adapter.project(image_embeds[:, 0]))
        injection.set_scale(0.8)
        actual = unet(inputs["x"])
        injection.eject()
    assert max_diff(plain, expected) > 1e-3
    assert max_diff(actual, expected) < 2e-5  # measured 6e-8


def meta_adapter(name: str, embedding_dim: int, context_dim: int, blocks: int) -> IPAdapter:
    projection = ImageProjection(embedding_dim, context_dim, 4, device="meta")
    weight = torch.empty(640, context_dim, device="meta")
    return IPAdapter(projection, [(weight, weight)] * blocks, name)


def test_encoder_pairing_error_names_both_encoders():
    sdxl = meta_adapter("ip-adapter_sdxl", 1280, 2048, 70)
    vit_h = CLIPImageEncoder(IMAGE_PRESETS["vit_h"], device="meta")
    with pytest.raises(
        ValueError, match=r"ip-adapter_sdxl expects a bigG image encoder \(1280-d.*got ViT-H \(1024-d\)"
    ):
        sdxl.check_image_encoder(vit_h)
    sdxl.check_image_encoder(CLIPImageEncoder(IMAGE_PRESETS["vit_bigg"], device="meta"))


def test_family_mismatch_is_refused_and_leaves_the_unet_unchanged(setup):
    sd15 = UNet(SD15_UNET, device="meta")
    with pytest.raises(
        ValueError, match=r"IP-Adapter for SDXL \(context 2048, 70 .*the model is SD1.5 \(context 768, 16"
    ):
        meta_adapter("ip-adapter_sdxl", 1280, 2048, 70).inject(sd15)
    sd = setup["sd"]
    before = repr(sd.unet)
    reference = sample_with_patches(sd, [], decode=False)
    wrong = tencent_ip_adapter("base", [64] * 11, 48)  # an SDXL-like context width on the SD1.5 tiny UNet
    adapter = ip_adapter_from_state_dict({f"{g}.{k}": v for g, d in wrong.items() for k, v in d.items()})
    patch = IPAdapterPatch(adapter, ImageEmbeddings(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds"))
    with pytest.raises(ValueError, match="the model is a 32-wide text context"):
        sample_with_patches(sd, [patch])
    assert repr(sd.unet) == before
    assert torch.equal(sample_with_patches(sd, [], decode=False), reference)


def test_wrong_files_get_clear_errors(setup, tmp_path):
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, tmp_path / "not_ip.bin")
    with pytest.raises(ModelFileError, match="not_ip.bin.*not an IP-Adapter"):
        load_ip_adapter(tmp_path / "not_ip.bin")
    adapter = load_ip_adapter(setup["files"]["base"])
    with pytest.raises(ValueError, match="expects a CLIP image encoder \\(24-d"):
        adapter.check_image_encoder(CLIPImageEncoder(IMAGE_PRESETS["vit_h"], device="meta"))


def test_files_round_trip_between_bin_and_safetensors(setup, tmp_path):
    weights = tencent_ip_adapter("plus", [32] * 11, 32, seed=9)
    a = load_ip_adapter(write_tencent_file(weights, tmp_path / "a.bin"))
    b = load_ip_adapter(write_tencent_file(weights, tmp_path / "b.safetensors"))
    hidden = torch.randn(2, 17, 32)
    assert torch.equal(a.project(hidden), b.project(hidden))
    assert Path(tmp_path / "a.bin").exists() and a.name == "a"
