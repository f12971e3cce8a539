"""IP-Adapter embeds nodes: encode once, save, load, and prompt with embeds exactly as with the images.

On the demo's tiny files: SD1.5 base and plus IP-Adapters with the tiny ViT-H-like encoder (24-d image
embeddings, 32-d hidden states), and the SDXL IP-Adapter's tiny bigG-like encoder (40-d embeddings).
"""

import shutil

import pytest
import torch

from foundationals.latent_diffusion.adapters.ip_adapter import ImageEmbeddings
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.demo import (
    DEMO_CLIP_VISION,
    DEMO_CLIP_VISION_BIGG,
    DEMO_EMBEDS,
    DEMO_IP_ADAPTER,
    DEMO_IP_ADAPTER_PLUS,
    SD15_CHECKPOINT,
    write_demo_files,
)
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.ip_adapter_embeds_nodes import (
    FluxionEncodeIPAdapterEmbeds,
    FluxionLoadIPAdapterEmbeds,
    FluxionSaveIPAdapterEmbeds,
)
from nodes.runner_nodes import ImageBatch

IMAGES = torch.rand(2, 40, 48, 3, generator=torch.Generator().manual_seed(0))
NEGATIVE = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root


@pytest.fixture
def models(demo_folders, monkeypatch):
    monkeypatch.setattr(host, "_models_dir", demo_folders / "models")
    return demo_folders


@pytest.fixture
def model(models):
    return FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0]


def adapter(name=DEMO_IP_ADAPTER):
    return FluxionIPAdapterLoader().load(name)[0]


def vision(name=DEMO_CLIP_VISION):
    return FluxionCLIPVisionLoader().load(name)[0]


def encode(ipadapter, clip_vision, images=IMAGES, negative=None):
    return FluxionEncodeIPAdapterEmbeds().encode(ipadapter, clip_vision, images, negative)[0]


def apply(model, ipadapter, **inputs):
    options = dict(weight=0.8, combine="concat", image_weights="1, 0.5", start_percent=0.0, end_percent=1.0)
    return FluxionApplyIPAdapter().apply(model, ipadapter, **{**options, **inputs})[0]


@pytest.mark.parametrize(("name", "kind"), [(DEMO_IP_ADAPTER, "base"), (DEMO_IP_ADAPTER_PLUS, "plus")])
def test_embeds_prompt_exactly_as_the_images_they_encode(model, name, kind):
    ipadapter, clip_vision = adapter(name), vision()
    embeds = encode(ipadapter, clip_vision)
    assert embeds.kind == {"base": "image_embeds", "plus": "penultimate_hidden_states"}[kind]
    assert embeds.positive.shape[0] == embeds.negative.shape[0] == 2
    kept = (embeds.positive.clone(), embeds.negative.clone())
    from_images = apply(model, ipadapter, clip_vision=clip_vision, image=IMAGES)
    from_embeds = apply(model, ipadapter, embeds=embeds)
    (patch_images,), (patch_embeds,) = from_images.patches, from_embeds.patches
    for ours, theirs in zip(patch_images.tokens, patch_embeds.tokens, strict=True):
        assert torch.equal(ours, theirs)
    assert patch_embeds.weights == [1.0, 0.5] and patch_embeds.scale == 0.8
    assert torch.equal(embeds.positive, kept[0]) and torch.equal(embeds.negative, kept[1])  # not mutated
    assert model.patches == ()  # the input wire is unchanged


def test_one_negative_image_serves_every_reference_image(model):
    ipadapter, clip_vision = adapter(), vision()
    embeds = encode(ipadapter, clip_vision, negative=NEGATIVE)
    assert embeds.negative.shape == embeds.positive.shape == (2, 24)
    assert torch.equal(embeds.negative[0], embeds.negative[1]) and embeds.negative.abs().max() > 0
    patch = apply(model, ipadapter, clip_vision=clip_vision, image=IMAGES, negative_image=NEGATIVE).patches[0]
    positive, negative = patch.tokens
    assert positive.shape == negative.shape == (1, 8, 32)  # concat: 2 images x 4 tokens on both sides
    with pytest.raises(ValueError, match="2 negative images for 3 reference images"):
        encode(ipadapter, clip_vision, torch.rand(3, 32, 32, 3), torch.rand(2, 32, 32, 3))


def test_saved_embeds_load_back_from_the_input_folder(models):
    embeds = encode(adapter(DEMO_IP_ADAPTER_PLUS), vision())
    result = FluxionSaveIPAdapterEmbeds().save(embeds, "portraits/face")
    (saved,) = result["ui"]["embeds"]
    assert saved == {"filename": "face_00001_.safetensors", "subfolder": "portraits", "type": "output"}
    path = host.output_directory() / "portraits" / "face_00001_.safetensors"
    assert path.is_file()
    assert FluxionSaveIPAdapterEmbeds().save(embeds, "portraits/face")["ui"]["embeds"][0]["filename"] == (
        "face_00002_.safetensors"
    )
    assert FluxionLoadIPAdapterEmbeds.INPUT_TYPES()["required"]["embeds_name"][0] == []
    (host.input_directory() / "refs").mkdir()
    shutil.copy(path, host.input_directory() / "refs" / "face.safetensors")
    (host.input_directory() / "photo.png").write_bytes(b"not listed")
    choices = FluxionLoadIPAdapterEmbeds.INPUT_TYPES()["required"]["embeds_name"][0]
    assert choices == ["refs/face.safetensors"]
    for name in ("refs/face.safetensors", "portraits/face_00001_.safetensors [output]"):
        assert FluxionLoadIPAdapterEmbeds.VALIDATE_INPUTS(name) is True
        loaded = FluxionLoadIPAdapterEmbeds().load(name)[0]
        assert loaded.kind == embeds.kind
        assert torch.equal(loaded.positive, embeds.positive) and torch.equal(loaded.negative, embeds.negative)
    assert "refs/face.safetensors" in FluxionLoadIPAdapterEmbeds.VALIDATE_INPUTS("missing.safetensors")
    with pytest.raises(ValueError, match="inside the input folder"):
        FluxionLoadIPAdapterEmbeds().load("../escape.safetensors")


def test_load_embeds_notices_a_rewritten_file(models):
    ipadapter, clip_vision = adapter(), vision()
    target = host.input_directory() / "ref.safetensors"
    encode(ipadapter, clip_vision, IMAGES[:1]).save(target)
    before = FluxionLoadIPAdapterEmbeds.IS_CHANGED("ref.safetensors")
    encode(ipadapter, clip_vision, IMAGES).save(target)
    assert FluxionLoadIPAdapterEmbeds.IS_CHANGED("ref.safetensors") != before


def test_the_demo_embeds_file_is_what_the_encode_node_gives(demo_folders, models):
    import numpy as np
    from PIL import Image

    picture = np.array(Image.open(demo_folders / "input" / "example.png"))
    embeds = encode(adapter(), vision(), torch.from_numpy(picture).float()[None] / 255)
    saved = ImageEmbeddings.load(demo_folders / "input" / DEMO_EMBEDS)
    # two float paths (the demo writer and the node) may differ by a few ulps between CPUs (1.2e-7 seen on AMD)
    assert saved.kind == embeds.kind
    torch.testing.assert_close(saved.positive, embeds.positive, rtol=1e-5, atol=1e-6)


def test_apply_needs_either_images_or_embeds(model):
    ipadapter, clip_vision = adapter(), vision()
    embeds = encode(ipadapter, clip_vision)
    with pytest.raises(ValueError, match="connect image \\(with clip_vision\\) or embeds"):
        apply(model, ipadapter, clip_vision=clip_vision)
    with pytest.raises(ValueError, match="both image and embeds"):
        apply(model, ipadapter, clip_vision=clip_vision, image=IMAGES, embeds=embeds)
    with pytest.raises(ValueError, match="needs clip_vision"):
        apply(model, ipadapter, image=IMAGES)
    with pytest.raises(ValueError, match="negative_image does nothing with embeds"):
        apply(model, ipadapter, embeds=embeds, negative_image=NEGATIVE)
    with pytest.raises(ValueError, match="image_weights has 2 values for 1 reference"):
        apply(model, ipadapter, embeds=encode(ipadapter, clip_vision, IMAGES[:1]))


def test_embeds_of_the_other_kind_or_encoder_are_refused(model):
    base, plus, clip_vision = adapter(), adapter(DEMO_IP_ADAPTER_PLUS), vision()
    with pytest.raises(
        ValueError,
        match=r"ip-adapter_sd15.safetensors is a base IP-Adapter and needs image embeddings.*"
        r"the embeds hold penultimate hidden states \(for plus IP-Adapters\)",
    ):
        apply(model, base, embeds=encode(plus, clip_vision))
    with pytest.raises(ValueError, match="ip-adapter-plus_sd15.safetensors is a plus IP-Adapter"):
        apply(model, plus, embeds=encode(base, clip_vision))
    sdxl_embeds = encode(adapter("ip-adapter_sdxl.safetensors"), vision(DEMO_CLIP_VISION_BIGG))
    with pytest.raises(ValueError, match="ip-adapter_sd15.safetensors needs 24-d embeds; these are 40-d"):
        apply(model, base, embeds=sdxl_embeds)
    with pytest.raises(ValueError, match="does not fit the model"):  # SDXL adapter on the SD1.5 model
        apply(model, adapter("ip-adapter_sdxl.safetensors"), embeds=sdxl_embeds)
    mismatched = ImageEmbeddings(torch.zeros(2, 24), torch.zeros(1, 24), "image_embeds")
    with pytest.raises(ValueError, match="negatives \\(1, 24\\) do not match their positives \\(2, 24\\)"):
        apply(model, base, embeds=mismatched)


def test_image_batch_stacks_and_resizes_the_second_image_like_comfyui():
    first, second = torch.rand(1, 32, 48, 3), torch.rand(2, 64, 64, 3)
    (batch,) = ImageBatch().batch(first, first.flip(0))
    assert torch.equal(batch, torch.cat([first, first.flip(0)]))
    (batch,) = ImageBatch().batch(first, second)
    assert batch.shape == (3, 32, 48, 3) and torch.equal(batch[:1], first)
    # 64x64 to 3:2 is a centre crop of rows 11..53, then bilinear to 32x48
    crop = second[:, 11:53].movedim(-1, 1)
    expected = torch.nn.functional.interpolate(crop, size=(32, 48), mode="bilinear").movedim(1, -1)
    assert torch.equal(batch[1:], expected)
