"""ControlNet: the model, its file layouts, the patch (strength, start/end, mask, modes, stacking) against diffusers.

Measured max abs differences (torch 2.13 CPU, fp32, tiny random weights): ControlNetModel residuals
SD1.5 3e-6, SDXL 2.5e-6 (check `controlnet`); whole StableDiffusionControlNetPipeline images (scale,
guess mode: 8e-6 and 7e-6 measured; start/end window, MultiControlNetModel) within the tolerance of `controlnet_pipeline` (tests/support/parity.py). Files: the lllyasviel
layout (with and without `control_model.`, safetensors and .pth) and diffusers' `save_pretrained` load bit-identical
weights; outputs agree to ~2e-6 (not bitwise: mmapped and in-memory tensors take different SIMD paths).
"""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from safetensors.torch import save_file

from foundationals.formats.controlnet import lllyasviel_controlnet_key_map
from foundationals.latent_diffusion.adapters.controlnet import (
    ControlMismatchError,
    ControlNet,
    ControlNetBranch,
    ControlNetConfig,
    ControlNetPatch,
    load_controlnet,
)
from foundationals.latent_diffusion.model_config import TINY_SDXL_UNET, TINY_UNET
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.model_files import ModelFileError
from tests.support.parity import assert_parity, check_parity
from tests.support.tiny_control import diffusers_controlnet, ours_from_diffusers_controlnet
from tests.support.tiny_sd import (
    clip_tokenizer,
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)

SIZE, LATENT = 32, 8  # the tiny autoencoder downscales 4x
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    num_train_timesteps=1000,
)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    unet, vae, text = diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder()
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    controlnets = [diffusers_controlnet(seed=1), diffusers_controlnet(seed=2)]
    return (
        dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer),
        ours_from_diffusers(unet, vae, text),
        controlnets,
        [ours_from_diffusers_controlnet(c) for c in controlnets],
    )


def hints(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.rand(1, 3, SIZE, SIZE, generator=generator) for _ in range(count)]


def as_image(hint: torch.Tensor) -> torch.Tensor:
    return hint.permute(0, 2, 3, 1)  # ComfyUI IMAGE layout


def run_ours(
    sd, patches, steps: int = 4, seed: int = 3, guidance: float = 5.0, callback=None
) -> torch.Tensor:
    positive, negative = sd.encode_prompt("a house"), sd.encode_prompt("blurry")
    run = SamplingRun(steps, 0, LATENT, LATENT, 1, uses_guidance=guidance > 1)
    solver = make_solver("ddim", steps)
    with patched(sd, patches, run):
        latents = sd.sample(
            (1, 4, LATENT, LATENT),
            positive,
            negative,
            solver,
            guidance,
            seed,
            callback=callback,
            step_hook=run.run_step_hooks,
        )
    return sd.decode_latents(latents)


def run_diffusers(parts, controlnet, image, steps: int = 4, seed: int = 3, guidance: float = 5.0, **kwargs):
    pipeline = StableDiffusionControlNetPipeline(
        **parts[0],
        controlnet=controlnet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        "a house",
        image=image,
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
        **kwargs,
    ).images


def sdxl_inputs(config, batch: int = 2):
    generator = torch.Generator().manual_seed(4)
    return dict(
        x=torch.randn(batch, 4, LATENT, LATENT, generator=generator),
        hint=torch.rand(batch, 3, SIZE, SIZE, generator=generator),
        text=torch.randn(batch, 7, config.context_dim, generator=generator),
        pooled=torch.randn(batch, config.pooled_text_dim, generator=generator),
        time_ids=torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch),
    )


def our_residuals(controlnet: ControlNet, inputs, timestep: float = 400.0) -> list[torch.Tensor]:
    controlnet.set_timestep(torch.tensor([timestep]))
    controlnet.set_clip_text_embedding(inputs["text"])
    controlnet.set_hint(inputs["hint"])
    if controlnet.config.unet.addition_embedding == "text_time":
        controlnet.set_sdxl_conditioning(inputs["pooled"], inputs["time_ids"])
    with torch.no_grad():
        return list(controlnet(inputs["x"]))


def their_residuals(reference, inputs, timestep: float = 400.0) -> list[torch.Tensor]:
    extra = {}
    if reference.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
    with torch.no_grad():
        down, mid = reference(
            inputs["x"],
            torch.tensor([timestep]),
            encoder_hidden_states=inputs["text"],
            controlnet_cond=inputs["hint"],
            return_dict=False,
            **extra,
        )
    return [*down, mid]


@pytest.mark.parametrize("config", [TINY_UNET, TINY_SDXL_UNET], ids=["sd15", "sdxl"])
def test_controlnet_model_matches_diffusers(config):
    reference = diffusers_controlnet(config)
    ours = ours_from_diffusers_controlnet(reference, config)
    inputs = sdxl_inputs(config)
    expected, result = their_residuals(reference, inputs), our_residuals(ours, inputs)
    assert len(result) == len(expected) == ours.residual_count
    assert min(r.abs().max().item() for r in expected) > 1e-2  # zero convs redrawn: real residuals
    check_parity("controlnet", max(max_diff(a, b) for a, b in zip(result, expected)))


def lllyasviel_state(reference, controlnet: ControlNet) -> dict[str, torch.Tensor]:
    """diffusers' weights under lllyasviel names, laid out by running diffusers' own conversion in reverse."""
    key_map = lllyasviel_controlnet_key_map(controlnet)
    shapes = {key: tuple(tensor.shape) for key, tensor in controlnet.state_dict().items()}
    probes = {key: torch.full((1,), float(index)) for index, key in enumerate(key_map)}
    landed = convert_controlnet_checkpoint(
        probes, {"layers_per_block": controlnet.config.unet.layers_per_block}
    )
    origin = {int(tensor.item()): theirs for theirs, tensor in landed.items()}
    state = reference.state_dict()
    assert sorted(origin) == list(range(len(key_map))) and set(landed) == set(state)
    return {key: state[origin[i]].reshape(shapes[key_map[key]]) for i, key in enumerate(key_map)}


def test_lllyasviel_and_diffusers_files_give_identical_outputs(tmp_path):
    hint_channels = (4, 8, 8, 16)  # the real 4-stage hint encoder: input_hint_block.0 ... .14
    reference = diffusers_controlnet(TINY_UNET, hint_channels, seed=3)
    reference.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    template = ControlNet(ControlNetConfig(TINY_UNET, 3, hint_channels), device="meta")
    state = lllyasviel_state(reference, template)
    save_file(state, tmp_path / "control_v11p_tiny.safetensors")
    save_file(
        {"control_model." + k: v for k, v in state.items()}, tmp_path / "control_tiny_prefixed.safetensors"
    )
    torch.save(state, tmp_path / "control_tiny.pth")
    inputs = sdxl_inputs(TINY_UNET)
    inputs["hint"] = torch.rand(2, 3, LATENT * 8, LATENT * 8)
    expected = their_residuals(reference, inputs)
    outputs, states = [], []
    for name in (
        "diffusers",
        "control_v11p_tiny.safetensors",
        "control_tiny_prefixed.safetensors",
        "control_tiny.pth",
    ):
        controlnet = load_controlnet(tmp_path / name, base=TINY_UNET)
        assert controlnet.config.hint_channels == hint_channels
        outputs.append(our_residuals(controlnet, inputs))
        states.append(controlnet.state_dict())
    for result in outputs:
        check_parity("controlnet", max(max_diff(a, b) for a, b in zip(result, expected)))
    for state in states[
        1:
    ]:  # identical weights; outputs may differ by ~1e-7 (memory alignment of mmapped tensors)
        assert all(torch.equal(state[key], states[0][key]) for key in state)
    for result in outputs[1:]:
        assert max(max_diff(a, b) for a, b in zip(result, outputs[0])) <= 1e-5


@pytest.mark.parametrize(
    ("options", "theirs"),
    [
        (dict(strength=0.7), dict(controlnet_conditioning_scale=0.7)),
        (dict(start=0.25, end=0.75), dict(control_guidance_start=0.25, control_guidance_end=0.75)),
        (dict(mode="guess", strength=0.9), dict(guess_mode=True, controlnet_conditioning_scale=0.9)),
    ],
    ids=["strength", "start_end", "guess_mode"],
)
def test_controlnet_pipeline_matches_diffusers(parts, options, theirs):
    hint = hints(1)[0]
    expected = run_diffusers(parts, parts[2][0], hint, **theirs)
    result = run_ours(parts[1], [ControlNetPatch(parts[3][0], as_image(hint), **options)])
    if "strength" in options:
        assert max_diff(result, run_ours(parts[1], [])) > 1e-3  # the control changes the image
    assert_parity("controlnet_pipeline", result, expected)


def test_two_controlnets_match_multicontrolnet(parts):
    first, second = hints(2)
    expected = run_diffusers(
        parts,
        MultiControlNetModel(parts[2]),
        [first, second],
        controlnet_conditioning_scale=[0.6, 1.1],
        control_guidance_start=[0.0, 0.5],
        control_guidance_end=[0.75, 1.0],
    )
    patches = [
        ControlNetPatch(parts[3][0], as_image(first), 0.6, 0.0, 0.75),
        ControlNetPatch(parts[3][1], as_image(second), 1.1, 0.5, 1.0),
    ]
    assert_parity("controlnet_pipeline", run_ours(parts[1], patches), expected)


def test_outside_start_end_the_trajectory_is_the_uncontrolled_one(parts):
    def trajectory(patches):
        latents = []
        run_ours(parts[1], patches, steps=6, callback=lambda done, total, x: latents.append(x.clone()))
        return latents

    plain = trajectory([])
    late = trajectory([ControlNetPatch(parts[3][0], as_image(hints(1)[0]), start=0.5, end=1.0)])
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], late[:3]))  # steps 0, 1, 2 of 6: not controlled
    assert not torch.equal(plain[3], late[3])


def unet_call(sd, text: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sd.unet.set_timestep(torch.tensor([500.0]))
    sd.unet.set_clip_text_embedding(text)
    with torch.no_grad():
        return sd.unet(x)


def test_mask_zeroes_the_residuals_outside_it(parts):
    sd = parts[1]
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, :, : SIZE // 2] = 1.0  # left half
    run = SamplingRun(1, 0, LATENT, LATENT, 1, uses_guidance=False)
    patch = ControlNetPatch(parts[3][0], as_image(hints(1)[0]), mask=mask)
    text, x = torch.randn(1, 7, 32), torch.randn(1, 4, LATENT, LATENT)
    with patched(sd, [patch], run):
        run.run_step_hooks(0)
        unet_call(sd, text, x)
        residuals = sd.unet.use_context("unet")["control_residuals"]
        for residual in residuals:
            width = residual.shape[-1]
            assert residual[..., width // 2 :].abs().max().item() == 0.0
            assert residual[..., : width // 2].abs().max().item() > 1e-3


def test_prompt_and_controlnet_modes_scale_and_split_the_batch(parts):
    controlnet, hint = parts[3][0], as_image(hints(1)[0])
    sd = parts[1]
    text, x = torch.randn(2, 7, 32), torch.randn(2, 4, LATENT, LATENT)
    sd.unet.set_clip_text_embedding(text)
    sd.unet.set_timestep(torch.tensor([500.0]))
    found = {}
    for mode in ("balanced", "prompt", "controlnet"):
        branch = ControlNetBranch(controlnet, hint, mode=mode, uses_guidance=True)
        sd.unet.insert(0, branch)
        try:
            with torch.no_grad():
                found[mode] = branch.residuals(x)
        finally:
            sd.unet.remove(branch)
    count = len(found["balanced"])
    for index, (plain, soft) in enumerate(zip(found["balanced"], found["prompt"])):
        assert max_diff(soft, plain * 0.825 ** (count - 1 - index)) <= 1e-6
    for plain, conditional in zip(found["balanced"], found["controlnet"]):
        assert torch.equal(conditional[:1], torch.zeros_like(conditional[:1]))
        assert_parity("controlnet", conditional[1:], plain[1:])


def test_undo_restores_the_unet_exactly(parts):
    sd = parts[1]
    text, x = torch.randn(2, 7, 32), torch.randn(2, 4, LATENT, LATENT)
    before_repr, before = repr(sd.unet), unet_call(sd, text, x)
    context_before = dict(sd.unet.use_context("unet"))
    run = SamplingRun(2, 0, LATENT, LATENT, 1, uses_guidance=True)
    first, second = hints(2)
    patches = [
        ControlNetPatch(parts[3][0], as_image(first)),
        ControlNetPatch(parts[3][1], as_image(second), 0.5),
    ]
    with patched(sd, patches, run):
        run.run_step_hooks(0)
        assert "ControlNetBranch" in repr(sd.unet)
        assert max_diff(unet_call(sd, text, x), before) > 1e-3
    assert repr(sd.unet) == before_repr
    assert torch.equal(unet_call(sd, text, x), before)
    assert sd.unet.use_context("unet").keys() == context_before.keys()
    assert run.step_hooks == []


def test_sdxl_controlnet_on_sd15_is_refused_and_leaves_the_model_unchanged(parts, tmp_path):
    sd = parts[1]
    sdxl = ours_from_diffusers_controlnet(diffusers_controlnet(TINY_SDXL_UNET), TINY_SDXL_UNET)
    text, x = torch.randn(1, 7, 32), torch.randn(1, 4, LATENT, LATENT)
    before_repr, before = repr(sd.unet), unet_call(sd, text, x)
    run = SamplingRun(2, 0, LATENT, LATENT, 1, uses_guidance=False)
    good = ControlNetPatch(parts[3][0], as_image(hints(1)[0]))
    with pytest.raises(ControlMismatchError, match=r"is for SDXL \(context dim 48\); the model is SD1.5"):
        with patched(sd, [good, ControlNetPatch(sdxl, as_image(hints(1)[0]))], run):
            pass
    assert repr(sd.unet) == before_repr and torch.equal(unet_call(sd, text, x), before)

    diffusers_sdxl = diffusers_controlnet(TINY_SDXL_UNET)
    diffusers_sdxl.save_pretrained(tmp_path / "sdxl_controlnet")
    with pytest.raises(
        ModelFileError, match=r"ControlNet file .*is for SDXL.*expected a ControlNet for SD1.5"
    ):
        load_controlnet(tmp_path / "sdxl_controlnet", base=TINY_UNET)


def test_a_lora_or_a_checkpoint_is_not_a_controlnet(tmp_path):
    lora = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
    }
    save_file(lora, tmp_path / "style.safetensors")
    with pytest.raises(ModelFileError, match=r"this is a LoRA, not a ControlNet \(2 keys: lora_unet_"):
        load_controlnet(tmp_path / "style.safetensors")
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "sd15.safetensors"
    )
    with pytest.raises(ModelFileError, match="a Stable Diffusion checkpoint, not a ControlNet"):
        load_controlnet(tmp_path / "sd15.safetensors")


@pytest.mark.skipif(os.environ.get("FLUXION_SLOW") != "1", reason="full-size ControlNet: set FLUXION_SLOW=1")
def test_full_size_sd15_controlnet_matches_diffusers():
    """Measured: max abs diff ~1e-5 on residuals of magnitude ~1 (fp32, CPU); tolerance 1e-4 x scale."""
    from foundationals.latent_diffusion.model_config import SD15_UNET

    reference = diffusers_controlnet(SD15_UNET, hint_channels=(16, 32, 96, 256))
    ours = ours_from_diffusers_controlnet(reference, SD15_UNET, hint_channels=(16, 32, 96, 256))
    generator = torch.Generator().manual_seed(4)
    inputs = dict(
        x=torch.randn(2, 4, 8, 8, generator=generator),
        hint=torch.rand(2, 3, 64, 64, generator=generator),
        text=torch.randn(2, 77, 768, generator=generator),
    )
    expected, result = their_residuals(reference, inputs), our_residuals(ours, inputs)
    scale = max(r.abs().max().item() for r in expected)
    assert max(max_diff(a, b) for a, b in zip(result, expected)) <= 1e-4 * max(scale, 1.0)
