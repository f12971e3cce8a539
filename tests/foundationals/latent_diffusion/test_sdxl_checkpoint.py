"""`StableDiffusion.from_checkpoint` on SDXL (and SD1.5) files written in the real layouts: the pipeline built from
the file equals diffusers' pipeline on the same weights.

Single files are written in the original SGM layout by diffusers' own conversions run in reverse
(tests/support/tiny_sdxl.py): `model.diffusion_model.*`, `first_stage_model.*`,
`conditioner.embedders.0.transformer.*` (CLIP-L), `conditioner.embedders.1.model.*` (open_clip bigG, fused
attention input projection, transposed text projection), no position ids or logit scale (as the official
conversion scripts write them). Diffusers folders are written by `save_pretrained`.
Measured max abs differences on [0, 1] images (torch 2.13 CPU, fp32): SDXL single file 8.0e-6, SDXL diffusers
folder 8.0e-6, SD1.5 single file 1.6e-5. Tolerance: tests/support/parity.py (`sdxl_pipelines`).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import save_file

from foundationals.latent_diffusion.checkpoint import CheckpointError, load_checkpoint
from foundationals.latent_diffusion.model_config import TINY_AUTOENCODER, TINY_SDXL_UNET, TINY_UNET
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from tests.support.parity import assert_parity
from tests.support.tiny_sd import (
    clip_tokenizer,
    diffusers_autoencoder,
    diffusers_unet,
    transformers_text_encoder,
)
from tests.support.tiny_sdxl import (
    SDXL_SCHEDULER,
    TINY_CLIP_L,
    TINY_SDXL_AUTOENCODER,
    TINY_SDXL_TEXT_CONFIGS,
    diffusers_sdxl_components,
    original_autoencoder_tensors,
    original_clip_l_tensors,
    original_unet_tensors,
    sdxl_single_file_tensors,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

HEIGHT, WIDTH = 32, 48


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    parts = diffusers_sdxl_components(tmp_path_factory.mktemp("tokenizers"))
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-sdxl.safetensors"
    save_file(sdxl_single_file_tensors(parts), str(path))
    reference = StableDiffusionXLPipeline(**parts, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))
    expected = reference(
        "a red fox in the snow",
        negative_prompt="blurry",
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=5,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(42),
        output_type="pt",
    ).images
    return parts, path, expected


def text_to_image(sd: StableDiffusion) -> torch.Tensor:
    return sd.text_to_image(
        "a red fox in the snow",
        "blurry",
        width=WIDTH,
        height=HEIGHT,
        steps=5,
        guidance_scale=6.0,
        seed=42,
        solver="euler",
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_sdxl_single_file_pipeline_equals_diffusers(sdxl):
    parts, path, expected = sdxl
    sd = StableDiffusion.from_checkpoint(path)  # the text encoders' heads and activations from their presets
    assert sd.is_sdxl and not sd.is_inpainting_model
    assert sd.unet.config == TINY_SDXL_UNET
    assert sd.autoencoder.scaling_factor == 0.13025
    assert sd.text_encoder_2 is not None and sd.text_encoder_2.config.projection_dim == 40
    assert_parity("sdxl_pipelines", text_to_image(sd), expected)


def test_sdxl_diffusers_folder_pipeline_equals_diffusers(sdxl, tmp_path):
    parts, _, expected = sdxl
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name].save_pretrained(tmp_path / name)
    sd = StableDiffusion.from_checkpoint(tmp_path)  # heads and activations from the config.json files
    assert sd.is_sdxl and sd.autoencoder.scaling_factor == 0.13025
    assert_parity("sdxl_pipelines", text_to_image(sd), expected)


def test_sdxl_single_file_in_fp16_loads_in_the_asked_dtype_with_given_text_configs(sdxl, tmp_path):
    parts, _, _ = sdxl
    path = tmp_path / "tiny-sdxl-fp16.safetensors"
    save_file({key: value.half() for key, value in sdxl_single_file_tensors(parts).items()}, str(path))
    sd = StableDiffusion.from_checkpoint(
        path, dtype=torch.float16, text_encoder_configs=TINY_SDXL_TEXT_CONFIGS
    )
    models = (sd.unet, sd.autoencoder, sd.text_encoder, sd.text_encoder_2)
    assert {p.dtype for model in models if model is not None for p in model.parameters()} == {torch.float16}
    assert sd.text_encoder_2 is not None and sd.text_encoder_2.config == TINY_SDXL_TEXT_CONFIGS["clip_g"]


def test_sdxl_file_without_text_encoders_is_refused_by_from_checkpoint(sdxl, tmp_path):
    parts, _, _ = sdxl
    path = tmp_path / "unet-vae-only.safetensors"
    tensors = {
        **original_unet_tensors(parts["unet"], TINY_SDXL_UNET),
        **original_autoencoder_tensors(parts["vae"], TINY_SDXL_AUTOENCODER),
    }
    save_file(tensors, str(path))
    assert load_checkpoint(path).family == "sdxl_base"  # the loader itself takes partial files
    with pytest.raises(CheckpointError, match=r"unet-vae-only\.safetensors: this sdxl_base checkpoint lacks"):
        StableDiffusion.from_checkpoint(path)


def test_sd15_single_file_pipeline_equals_diffusers(tmp_path):
    unet, vae, text = diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder()
    tensors = {
        **original_unet_tensors(unet, TINY_UNET),
        **original_autoencoder_tensors(vae, TINY_AUTOENCODER),
        **{
            key.replace("conditioner.embedders.0.", "cond_stage_model."): value
            for key, value in original_clip_l_tensors(text).items()
        },
    }
    path = tmp_path / "tiny-sd15.safetensors"
    save_file(tensors, str(path))
    sd = StableDiffusion.from_checkpoint(path)
    assert not sd.is_sdxl and sd.text_encoder_2 is None
    assert sd.text_encoder.config == TINY_CLIP_L
    reference = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=clip_tokenizer(tmp_path / "tokenizer"),
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    expected = reference(
        "a red fox in the snow",
        negative_prompt="blurry",
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="pt",
    ).images
    ours = sd.text_to_image(
        "a red fox in the snow", "blurry", width=32, height=32, steps=4, guidance_scale=6.0, seed=1
    )
    assert_parity("sdxl_pipelines", ours, expected)
