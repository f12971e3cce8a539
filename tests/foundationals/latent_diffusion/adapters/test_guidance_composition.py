"""Guidance composes with the other adapters of a stack (tiny SD1.5, fp32 CPU).

- PAG + ControlNet + IP-Adapter equals diffusers' `StableDiffusionControlNetPAGPipeline` with the IP-Adapter
  loaded (the perturbed pass runs the positive half: ControlNet hint, IP-Adapter tokens picked for it).
- Passes on one half of the batch give each per-item adapter (IP-Adapter, ControlNet in both modes, T2I-Adapter,
  reference-only) its rows: a CFG cutoff run equals a guided run up to the cutoff continued by an unguided run.
- Every guidance at once over LoRA-free ControlNet + IP-Adapter + T2I + reference-only runs, and the stack
  ejects exactly (same tree, same contexts, the plain run bit for bit after it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.pag.pipeline_pag_controlnet_sd import StableDiffusionControlNetPAGPipeline
from PIL import Image

from foundationals.clip.image_encoder import load_clip_image_encoder_from_folder
from foundationals.latent_diffusion.adapters.controlnet import ControlNetPatch
from foundationals.latent_diffusion.adapters.guidance import (
    CFGCutoffPatch,
    FreeUPatch,
    PAGPatch,
    RescaleCFGPatch,
    SAGPatch,
)
from foundationals.latent_diffusion.adapters.ip_adapter import IPAdapterPatch, load_ip_adapter
from foundationals.latent_diffusion.adapters.reference_only import ReferenceOnlyPatch
from foundationals.latent_diffusion.adapters.t2i_adapter import T2IAdapter, T2IAdapterConfig, T2IAdapterPatch
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.sampling import denoise
from foundationals.latent_diffusion.solvers import make_solver
from tests.support.guided import CountingUNet, guided_text_to_image
from tests.support.parity import assert_parity, max_abs_difference
from tests.support.tiny_control import diffusers_controlnet, ours_from_diffusers_controlnet, redraw
from tests.support.tiny_ip_adapter import (
    cross_attention_widths,
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
PROMPT, NEGATIVE, STEPS, CFG, SEED, SIZE = "a house by a lake", "blurry", 5, 5.0, 3, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("composition")
    unet, vae, text = diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder()
    transformers_image_encoder().save_pretrained(folder / "image_encoder")
    path = write_tencent_file(
        tencent_ip_adapter("base", cross_attention_widths(unet), 32, seed=1), folder / "ip-adapter_tiny.bin"
    )
    controlnet = diffusers_controlnet(seed=1)
    torch.manual_seed(2)
    t2i = T2IAdapter(T2IAdapterConfig("full", (32, 64, 64), 2, 3, 4))
    redraw(t2i, 0.1)
    reference = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    hint = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(11))
    return dict(
        folder=folder,
        ip_adapter_file=path,
        parts=dict(unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(folder / "tokenizer")),
        sd=ours_from_diffusers(unet, vae, text),
        encoder=load_clip_image_encoder_from_folder(folder / "image_encoder"),
        controlnet=(controlnet, ours_from_diffusers_controlnet(controlnet)),
        t2i=t2i,
        reference=reference,
        hint=hint,
    )


def ip_adapter_patch(setup, scale: float = 0.7) -> IPAdapterPatch:
    image = torch.from_numpy(setup["reference"]).float()[None] / 255
    return IPAdapterPatch.from_images(
        load_ip_adapter(setup["ip_adapter_file"]), setup["encoder"], image, scale=scale
    )


def controlnet_patch(setup, mode: str = "balanced") -> ControlNetPatch:
    return ControlNetPatch(setup["controlnet"][1], setup["hint"].permute(0, 2, 3, 1), 0.8, mode=mode)


def t2i_patch(setup) -> T2IAdapterPatch:
    return T2IAdapterPatch(setup["t2i"], setup["hint"].permute(0, 2, 3, 1), 0.9)


def reference_patch(setup) -> ReferenceOnlyPatch:
    image = torch.from_numpy(setup["reference"][:SIZE, :SIZE]).float().permute(2, 0, 1)[None] / 255
    return ReferenceOnlyPatch(setup["sd"].encode_image(image), style_fidelity=0.4)


def test_pag_with_controlnet_and_ip_adapter_equals_diffusers(setup):
    pipe = StableDiffusionControlNetPAGPipeline(
        **setup["parts"],
        controlnet=setup["controlnet"][0],
        scheduler=DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        pag_applied_layers=["mid", "up_blocks.1.attentions.2"],
    )
    path = setup["ip_adapter_file"]
    pipe.load_ip_adapter(
        str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder="image_encoder"
    )
    pipe.set_ip_adapter_scale(0.7)
    expected = pipe(
        PROMPT,
        image=setup["hint"],
        ip_adapter_image=Image.fromarray(setup["reference"]),
        negative_prompt=NEGATIVE,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        controlnet_conditioning_scale=0.8,
        pag_scale=2.0,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pt",
    ).images
    pipe.unload_ip_adapter()
    pag = PAGPatch(2.0, ["mid", "up_blocks.1.attentions.2"])
    patches = [controlnet_patch(setup), ip_adapter_patch(setup), pag]
    result = guided_text_to_image(
        setup["sd"], patches, PROMPT, NEGATIVE, steps=STEPS, guidance_scale=CFG, seed=SEED
    )
    without_pag = guided_text_to_image(
        setup["sd"], patches[:2], PROMPT, NEGATIVE, steps=STEPS, guidance_scale=CFG, seed=SEED
    )
    assert max_abs_difference(result, without_pag) > 1e-3
    assert_parity("guidance_sd15", result, expected)


def latents_after(setup, patches, steps, guidance_scale, start=None) -> list[torch.Tensor]:
    """Latents after each step of a DDIM run with `patches`; `start` = (first step, latents) continues a run."""
    sd = setup["sd"]
    positive, negative = sd.encode_prompt(PROMPT), sd.encode_prompt(NEGATIVE)
    first = 0 if start is None else start[0]
    solver = make_solver("ddim", steps, "normal")
    solver = solver.rebuild(first_inference_step=first)
    latent = SIZE // sd.autoencoder.config.downscale_factor
    run = SamplingRun(steps, first, latent, latent, 1, uses_guidance=guidance_scale > 1)
    latents = (
        torch.randn((1, 4, latent, latent), generator=torch.Generator().manual_seed(SEED))
        if start is None
        else start[1]
    )
    trajectory: list[torch.Tensor] = []
    with patched(sd, patches, run), torch.no_grad():
        denoise(
            sd.unet,
            solver,
            latents,
            positive,
            negative,
            guidance_scale,
            step_hook=run.run_step_hooks,
            predict=lambda x: run.predict(sd.unet, x),
            callback=lambda done, total, x: trajectory.append(x.clone()),
            guidance=run.guidance_stack(),
        )
    return trajectory


@pytest.mark.parametrize("mode", ["balanced", "guess"])
def test_after_a_cfg_cutoff_every_adapter_sees_the_positive_half_only(setup, mode):
    def stack() -> list:  # (reference-only draws fresh noise each call: its own test below)
        return [controlnet_patch(setup, mode), ip_adapter_patch(setup), t2i_patch(setup)]

    steps, cutoff = 6, 0.4  # steps 0, 1, 2 guided (int(6 * 0.4) = 2), then the positive half alone
    cut = latents_after(setup, [*stack(), CFGCutoffPatch(cutoff)], steps, CFG)
    guided = latents_after(setup, stack(), steps, CFG)
    assert torch.equal(cut[2], guided[2])  # the same UNet calls up to the cutoff
    continued = latents_after(setup, stack(), steps, 1.0, start=(3, guided[2]))
    assert max_abs_difference(cut[-1], guided[-1]) > 1e-3
    assert max_abs_difference(cut[-1], continued[-1]) < 1e-5  # the same calls, adapters' rows picked per half


def test_every_guidance_over_a_full_stack_runs_and_ejects_exactly(setup):
    sd = setup["sd"]
    before, contexts = repr(sd.unet), sorted(sd.unet.provider.contexts)
    plain = guided_text_to_image(sd, [], PROMPT, NEGATIVE, steps=4, guidance_scale=CFG, seed=SEED)
    adapters = [
        controlnet_patch(setup, "guess"),
        ip_adapter_patch(setup),
        t2i_patch(setup),
        reference_patch(setup),
    ]
    guidance = [
        FreeUPatch(version=2),
        PAGPatch(1.5),
        SAGPatch(0.5),
        RescaleCFGPatch(0.6),
        CFGCutoffPatch(0.5),
    ]
    with CountingUNet(sd) as counter:
        result = guided_text_to_image(
            sd, adapters + guidance, PROMPT, NEGATIVE, steps=4, guidance_scale=CFG, seed=SEED
        )
    assert torch.isfinite(result).all() and max_abs_difference(result, plain) > 1e-3
    # each call runs the reference pass inside it; steps 0-2: CFG batch 2, PAG and SAG batch 1; step 3: all 1
    assert counter.calls == [2, 2, 1, 1, 1, 1] * 3 + [1, 1, 1, 1, 1, 1]
    assert repr(sd.unet) == before and sorted(sd.unet.provider.contexts) == contexts
    again = guided_text_to_image(sd, [], PROMPT, NEGATIVE, steps=4, guidance_scale=CFG, seed=SEED)
    assert torch.equal(again, plain)
