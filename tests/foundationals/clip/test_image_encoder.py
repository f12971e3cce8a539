"""CLIPImageEncoder against transformers' CLIPVisionModelWithProjection, preprocessing against CLIPImageProcessor."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
from transformers import CLIPVisionConfig as TransformersVisionConfig

from foundationals.clip.config import IMAGE_PRESETS, CLIPImageConfig
from foundationals.clip.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPImageEncoder,
    CLIPImageHiddenState,
    load_clip_image_encoder,
    preprocess_images,
)
from foundationals.clip.text_encoder import TransformerLayer
from tests.support.parity import assert_parity, check_parity

ONE_LEVEL = 1 / 255 / min(CLIP_STD)  # one 8-bit level after normalization: 0.0150
SLOW = pytest.mark.skipif(os.environ.get("FLUXION_SLOW") != "1", reason="full-size CLIP: set FLUXION_SLOW=1")


def transformers_config(config: CLIPImageConfig) -> TransformersVisionConfig:
    return TransformersVisionConfig(
        hidden_size=config.embedding_dim,
        intermediate_size=config.feedforward_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.projection_dim,
        hidden_act=config.activation,
    )


def reference_model(config: CLIPImageConfig, seed: int = 0, scale: float | None = 0.3):
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(transformers_config(config)).eval()
    if scale is not None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                is_norm_weight = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
                parameter.normal_(1.0 if is_norm_weight else 0.0, scale)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tiny():
    config = IMAGE_PRESETS["tiny"]
    reference = reference_model(config)
    return reference, load_clip_image_encoder(reference.state_dict(), "transformers", config=config)


def test_tiny_image_encoder_matches_transformers_image_embeds(tiny):
    reference, encoder = tiny
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True)
        assert_parity("clip_image", encoder(pixels), expected.image_embeds)
        for layer in range(-4, 4):
            hidden = CLIPImageHiddenState(encoder, layer=layer)(pixels)
            assert_parity("clip_image", hidden, expected.hidden_states[layer])
        penultimate, image_embeds = CLIPImageHiddenState(encoder, image_embeds=True)(pixels)
    assert_parity("clip_image", penultimate, expected.hidden_states[-2])  # IP-Adapter plus
    assert_parity("clip_image", image_embeds, expected.image_embeds)
    assert expected.image_embeds.abs().mean() > 0.1


def test_penultimate_view_skips_the_last_layer_and_the_projection(tiny):
    _, encoder = tiny
    view = CLIPImageHiddenState(encoder, layer=-2)
    assert len(list(view.layers(TransformerLayer))) == 2
    assert {p.data_ptr() for p in view.parameters()} < {p.data_ptr() for p in encoder.parameters()}


def test_image_encoder_converts_input_dtype(tiny):
    _, encoder = tiny
    pixels = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert encoder(pixels).dtype == torch.float32


@pytest.mark.parametrize("name", ["vit_l", "vit_h", "vit_bigg"])
def test_presets_have_the_parameters_of_the_real_models(name):
    config = IMAGE_PRESETS[name]
    with torch.device("meta"):
        reference = CLIPVisionModelWithProjection(transformers_config(config))
    encoder = CLIPImageEncoder(config, device="meta")
    count = sum(p.numel() for p in encoder.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    # ViT-H/14 is IP-Adapter's 632 M image encoder; bigG's tower is 1.84 B.
    assert round(count / 1e6) == {"vit_l": 304, "vit_h": 632, "vit_bigg": 1845}[name]


def random_image(height: int, width: int, seed: int, smooth: bool = False) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    if smooth:  # photo-like: low-frequency noise upsampled
        coarse = torch.rand(1, 3, height // 16 + 2, width // 16 + 2, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0].permute(
            1, 2, 0
        )
    else:
        image = torch.rand(height, width, 3, generator=generator)
    return (image * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor()  # SD/IP-Adapter defaults: shortest edge 224, bicubic, crop 224, CLIP mean/std


@pytest.mark.parametrize("size", [(300, 257), (181, 203), (640, 480), (224, 224), (233, 500), (96, 128)])
def test_preprocessing_matches_clip_image_processor(processor, size):
    """Noise images, the worst case for resampling: every pixel within one 8-bit level (0.0150 after
    normalization), nearly all exact. Measured: max 1 level; mismatching pixels < 0.1%."""
    array = random_image(*size, seed=sum(size))
    expected = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    actual = preprocess_images(torch.from_numpy(array).float()[None] / 255)
    assert actual.shape == expected.shape == (1, 3, 224, 224)
    difference = (actual - expected).abs()
    assert difference.max().item() <= ONE_LEVEL * 1.01
    assert (difference > 1e-5).float().mean().item() < 0.002


@pytest.mark.parametrize("size", [(500, 233), (561, 262), (1024, 768)])
def test_preprocessing_matches_clip_image_processor_on_smooth_images(processor, size):
    """Pillow 13 resamples some sizes (e.g. 500x233) height first; its 8-bit intermediate then clips
    noise overshoots differently (up to 23 levels on pure noise). On photo-like images the order does
    matters little: within two levels. Measured: max 2 levels, mean 5.4e-4 (a few % of pixels off by one)."""
    array = random_image(*size, seed=sum(size), smooth=True)
    expected = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    actual = preprocess_images(torch.from_numpy(array).float()[None] / 255)
    difference = (actual - expected).abs()
    assert difference.max().item() <= 2 * ONE_LEVEL * 1.01
    assert difference.mean().item() < 1e-3


def test_preprocessing_takes_comfyui_batches_with_alpha_or_gray():
    rgba = torch.rand(2, 100, 120, 4)
    pixels = preprocess_images(rgba)
    assert pixels.shape == (2, 3, 224, 224)
    assert torch.equal(pixels, preprocess_images(rgba[..., :3].contiguous()))
    gray = preprocess_images(torch.rand(1, 50, 50, 1))
    levels = gray * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert torch.allclose(levels[:, 0], levels[:, 1], atol=1e-6) and torch.allclose(
        levels[:, 0], levels[:, 2], atol=1e-6
    )
    with pytest.raises(ValueError, match="IMAGE"):
        preprocess_images(torch.rand(3, 64, 64))


@SLOW
@pytest.mark.parametrize("name", ["vit_h", "vit_bigg"])
def test_full_size_image_encoders_match_transformers(name):
    """Measured (2026-11, CPU fp32): vit_h 0.0, vit_bigg 0.0 on both outputs (check `clip_image`)."""
    config = IMAGE_PRESETS[name]
    reference = reference_model(config, scale=None)
    encoder = load_clip_image_encoder(reference.state_dict(), "transformers", config=config)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True)
        penultimate, image_embeds = CLIPImageHiddenState(encoder, image_embeds=True)(pixels)
    diffs = [max_diff(image_embeds, expected.image_embeds), max_diff(penultimate, expected.hidden_states[-2])]
    check_parity("clip_image", max(diffs))
