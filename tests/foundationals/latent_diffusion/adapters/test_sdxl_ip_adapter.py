"""SDXL txt2img with an IP-Adapter equals diffusers' StableDiffusionXLPipeline + `load_ip_adapter`.

Identical tiny random weights on both sides: the tiny SDXL UNet, CLIP-L + bigG-like text encoders and autoencoder
(tests/support/tiny_sdxl.py), a transformers CLIP vision encoder saved with `save_pretrained`, and an IP-Adapter
written in tencent-ailab's flat safetensors layout (SDXL base: a Linear image projection to 4 tokens of the
48-wide SDXL context, one `to_k_ip`/`to_v_ip` pair per attn2 of the 17 cross-attention blocks; plus: a perceiver
resampler on the penultimate hidden states). diffusers loads the file offline from its folder with
`weight_name`, and the scale with `set_ip_adapter_scale`. Images 32x48 (height x width), DDIM 4 steps, CFG 5,
IP-Adapter scale 0.7.

Measured max abs differences on [0, 1] images (torch 2.13 CPU, fp32, diffusers 0.39): base 6.6e-6, plus 5.8e-6
(without the adapter the image differs by more than 0.05: asserted). Tolerance: tests/support/parity.py (`ip_adapter`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from foundationals.clip.image_encoder import load_clip_image_encoder_from_folder
from foundationals.latent_diffusion.adapters.ip_adapter import IPAdapterPatch, load_ip_adapter
from foundationals.latent_diffusion.model_config import TINY_SDXL_UNET
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.sampling import SizeConditioning
from foundationals.latent_diffusion.solvers import make_solver
from tests.support.parity import check_parity
from tests.support.tiny_ip_adapter import (
    cross_attention_widths,
    tencent_ip_adapter,
    transformers_image_encoder,
    write_tencent_file,
)
from tests.support.tiny_sdxl import SDXL_SCHEDULER, diffusers_sdxl_components, ours_from_diffusers

# diffusers 0.39 calls np.array on torch tensors the way numpy 2 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

HEIGHT, WIDTH, STEPS, GUIDANCE, SEED, SCALE = 32, 48, 4, 5.0, 7, 0.7
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
FILES = {"base": "ip-adapter_sdxl.safetensors", "plus": "ip-adapter-plus_sdxl_vit-h.safetensors"}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_ip_adapter")
    components = diffusers_sdxl_components(folder / "tokenizers")
    transformers_image_encoder(seed=3).save_pretrained(folder / "image_encoder")
    widths = cross_attention_widths(components["unet"])
    context = TINY_SDXL_UNET.context_dim
    for seed, (kind, name) in enumerate(FILES.items(), start=11):
        write_tencent_file(tencent_ip_adapter(kind, widths, context, seed=seed), folder / name)
    reference = (np.random.default_rng(5).random((40, 36, 3)) * 255).astype(np.uint8)
    return dict(
        folder=folder,
        components=components,
        sd=ours_from_diffusers(components),
        encoder=load_clip_image_encoder_from_folder(folder / "image_encoder"),
        reference=reference,
    )


def diffusers_images(setup, kind: str) -> torch.Tensor:
    pipe = StableDiffusionXLPipeline(
        **setup["components"],
        scheduler=DDIMScheduler(**SDXL_SCHEDULER, clip_sample=False, set_alpha_to_one=False),
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(setup["folder"]), subfolder="", weight_name=FILES[kind], image_encoder_folder="image_encoder"
    )
    pipe.set_ip_adapter_scale(SCALE)
    try:
        return pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            ip_adapter_image=Image.fromarray(setup["reference"]),
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="pt",
        ).images
    finally:
        pipe.unload_ip_adapter()  # the diffusers UNet is shared by the module's tests


def our_images(setup, patches: list) -> torch.Tensor:
    sd = setup["sd"]
    positive, negative = sd.encode_prompts(PROMPT, NEGATIVE, SizeConditioning.for_image(HEIGHT, WIDTH))
    factor = sd.autoencoder.config.downscale_factor
    shape = (1, sd.latent_channels, HEIGHT // factor, WIDTH // factor)
    run = SamplingRun(STEPS, 0, shape[2], shape[3], 1, uses_guidance=True)
    with patched(sd, patches, run):
        latents = sd.sample(
            shape,
            positive,
            negative,
            make_solver("ddim", STEPS),
            GUIDANCE,
            SEED,
            step_hook=run.run_step_hooks,
        )
    return sd.decode_latents(latents)


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_sdxl_ip_adapter_pipeline_equals_diffusers(setup, kind):
    expected = diffusers_images(setup, kind)
    adapter = load_ip_adapter(setup["folder"] / FILES[kind])
    assert adapter.kind == kind and len(adapter.key_value_weights) == 17
    image = torch.from_numpy(setup["reference"]).float()[None] / 255
    patch = IPAdapterPatch.from_images(adapter, setup["encoder"], image, scale=SCALE)
    ours = our_images(setup, [patch])
    without = our_images(setup, [])
    assert ours.shape == expected.shape == (1, 3, HEIGHT, WIDTH)
    assert max_diff(without, expected) > 0.05  # the adapter really changes the image
    difference = max_diff(ours, expected)
    print(f"SDXL IP-Adapter {kind} pipeline vs diffusers: max abs diff {difference:.2e}")
    check_parity("ip_adapter", difference)
