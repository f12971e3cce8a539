"""An SDXL ControlNet run through our SDXL pipeline equals diffusers' StableDiffusionXLControlNetPipeline.

Same tiny random weights on both sides (SDXL UNet, two text encoders, autoencoder, ControlNet); DDIM, CFG 5,
conditioning scale 0.8. Measured max abs difference on [0, 1] images: 4.7e-6; tolerance: tests/support/parity.py.
"""

import torch
from diffusers import DDIMScheduler, StableDiffusionXLControlNetPipeline

from foundationals.latent_diffusion.adapters.controlnet import ControlNetPatch
from foundationals.latent_diffusion.model_config import TINY_SDXL_UNET
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.sampling import SizeConditioning
from foundationals.latent_diffusion.solvers import make_solver
from tests.support.parity import check_parity
from tests.support.tiny_control import diffusers_controlnet, ours_from_diffusers_controlnet
from tests.support.tiny_sdxl import SDXL_SCHEDULER, diffusers_sdxl_components, ours_from_diffusers

SIZE, LATENT, STEPS, SEED, GUIDANCE, SCALE = 32, 8, 4, 3, 5.0, 0.8


def test_sdxl_controlnet_pipeline_equals_diffusers(tmp_path):
    components = diffusers_sdxl_components(tmp_path)
    sd = ours_from_diffusers(components)
    reference = diffusers_controlnet(TINY_SDXL_UNET, seed=1)
    controlnet = ours_from_diffusers_controlnet(reference, TINY_SDXL_UNET)
    hint = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(11))

    pipeline = StableDiffusionXLControlNetPipeline(
        **components,
        controlnet=reference,
        scheduler=DDIMScheduler(**SDXL_SCHEDULER, clip_sample=False, set_alpha_to_one=False),
    )
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        "a house",
        image=hint,
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        controlnet_conditioning_scale=SCALE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pt",
    ).images

    positive, negative = sd.encode_prompts("a house", "blurry", SizeConditioning.for_image(SIZE, SIZE))
    run = SamplingRun(STEPS, 0, LATENT, LATENT, 1, uses_guidance=True)
    patch = ControlNetPatch(controlnet, hint.permute(0, 2, 3, 1), strength=SCALE)
    with patched(sd, [patch], run):
        latents = sd.sample(
            (1, 4, LATENT, LATENT),
            positive,
            negative,
            make_solver("ddim", STEPS),
            GUIDANCE,
            SEED,
            step_hook=run.run_step_hooks,
        )
    ours = sd.decode_latents(latents)
    uncontrolled = sd.decode_latents(
        sd.sample((1, 4, LATENT, LATENT), positive, negative, make_solver("ddim", STEPS), GUIDANCE, SEED)
    )
    assert (ours - uncontrolled).abs().max().item() > 1e-3  # the control really changes the image
    difference = (ours - expected).abs().max().item()
    print(f"SDXL ControlNet pipeline vs diffusers: max abs diff {difference:.2e}")
    check_parity("controlnet_pipeline", difference)
