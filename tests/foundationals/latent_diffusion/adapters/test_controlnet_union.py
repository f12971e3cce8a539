"""ControlNet Union / ProMax equals diffusers' `ControlNetUnionModel` and `StableDiffusionXLControlNetUnionPipeline`.

Fixtures: tiny random `ControlNetUnionModel`s written by diffusers' own `save_pretrained`, under the file names of
the public release (xinsir/controlnet-union-sdxl-1.0: `diffusion_pytorch_model.safetensors` with 6 control types,
`diffusion_pytorch_model_promax.safetensors` with 8). Measured max abs differences (torch 2.13 CPU, fp32, AMD EPYC):
residuals up to 2.4e-6 (one hint, several hints with weights; check `controlnet_union`, tolerance 1e-5); whole
pipeline images in [0, 1] (DDIM 4 steps, CFG 5; one hint with a scale, two hints with their scales) 8.4e-6 (check
`controlnet_union_pipeline`, tolerance 3e-5). Tolerances: tests/support/parity.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLControlNetUnionPipeline
from safetensors.torch import load_file, save_file

from foundationals.latent_diffusion.adapters.controlnet import (
    UNION_CONTROL_TYPES,
    ControlNetPatch,
    UnionControlNet,
    UnionControlNetPatch,
    UnionHint,
    control_type_index,
    load_controlnet,
    union_controlnet_tensors,
)
from foundationals.latent_diffusion.model_config import TINY_SDXL_UNET, TINY_UNET
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.sampling import SizeConditioning
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.model_files import ModelFileError
from tests.support.parity import check_parity, max_abs_difference
from tests.support.tiny_control import (
    diffusers_controlnet,
    diffusers_union_controlnet,
    ours_from_diffusers_controlnet,
)
from tests.support.tiny_sdxl import SDXL_SCHEDULER, diffusers_sdxl_components, ours_from_diffusers

SIZE, LATENT, STEPS, SEED, GUIDANCE = 32, 8, 4, 3, 5.0
RELEASE = {8: "diffusion_pytorch_model_promax.safetensors", 6: "diffusion_pytorch_model.safetensors"}
CANNY, DEPTH, OPENPOSE, TILE = (
    control_type_index(n) for n in (UNION_CONTROL_TYPES[3], "depth", "openpose", "tile")
)


def release_folder(tmp_path, types: int, seed: int = 0):
    """A release-like folder: diffusers' save_pretrained output, the weights under the release's file name."""
    reference = diffusers_union_controlnet(num_control_type=types, seed=seed)
    folder = tmp_path / f"controlnet-union-{types}"
    reference.save_pretrained(folder, safe_serialization=True)
    if RELEASE[types] != "diffusion_pytorch_model.safetensors":
        (folder / "diffusion_pytorch_model.safetensors").rename(folder / RELEASE[types])
    return reference, folder


def inputs(batch: int = 1, hints: int = 3):
    generator = torch.Generator().manual_seed(4)
    config = TINY_SDXL_UNET
    x = torch.randn(batch, 4, LATENT, LATENT, generator=generator)
    images = [
        torch.rand(1, 3, SIZE, SIZE, generator=generator).expand(batch, -1, -1, -1) for _ in range(hints)
    ]
    return dict(
        x=x,
        hints=images,
        text=torch.randn(batch, 7, config.context_dim, generator=generator),
        pooled=torch.randn(batch, config.pooled_text_dim, generator=generator),
        time_ids=torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch),
    )


def their_residuals(reference, data, types, scales, timestep=400.0):
    batch = data["x"].shape[0]
    one_hot = torch.zeros(batch, reference.config.num_control_type)
    one_hot[:, types] = 1.0
    with torch.no_grad():
        down, mid = reference(
            data["x"],
            torch.tensor([timestep]),
            data["text"],
            data["hints"][: len(types)],
            one_hot,
            types,
            scales,
            added_cond_kwargs={"text_embeds": data["pooled"], "time_ids": data["time_ids"]},
            return_dict=False,
        )
    return [*down, mid]


def our_residuals(controlnet: UnionControlNet, data, types, weights, strength=1.0, timestep=400.0):
    controlnet.set_timestep(torch.tensor([timestep]))
    controlnet.set_clip_text_embedding(data["text"])
    controlnet.set_sdxl_conditioning(data["pooled"], data["time_ids"])
    controlnet.set_conditions(data["hints"][: len(types)], types, weights)
    with torch.no_grad():
        return [residual * strength for residual in controlnet(data["x"])]


CASES = {
    "one_hint_scaled": ([CANNY], 0.8, None, 0.8),
    "openpose": ([OPENPOSE], 1.0, None, 1.0),
    "two_hints": ([DEPTH, CANNY], [0.7, 0.5], [0.7, 0.5], 1.0),
    "three_hints": ([OPENPOSE, 2, 5], [1.0, 0.6, 0.9], [1.0, 0.6, 0.9], 1.0),
}


@pytest.mark.parametrize("types", [8, 6], ids=["promax", "first_release"])
@pytest.mark.parametrize("case", list(CASES))
def test_union_residuals_match_diffusers(tmp_path, types, case):
    reference, folder = release_folder(tmp_path, types)
    controlnet = load_controlnet(
        folder, base=TINY_SDXL_UNET
    )  # the folder: its weights file by the release name
    assert isinstance(controlnet, UnionControlNet)
    assert controlnet.union_config.num_control_types == types and len(controlnet.control_types) == types
    chosen, scales, weights, strength = CASES[case]
    data = inputs()
    expected = their_residuals(reference, data, chosen, scales)
    result = our_residuals(controlnet, data, chosen, weights, strength)
    assert min(r.abs().max().item() for r in expected) > 1e-2  # every output is a real residual
    check_parity("controlnet_union", max(max_abs_difference(a, b) for a, b in zip(result, expected)))


def test_the_type_and_the_fuser_matter_and_a_cfg_batch_matches(tmp_path):
    reference, folder = release_folder(tmp_path, 8)
    controlnet = load_controlnet(folder / RELEASE[8])  # the file itself, no base: the shapes say it all
    data = inputs(
        batch=2
    )  # one hint for the whole batch, as a CFG batch has: diffusers' batch mixing is moot
    canny = our_residuals(controlnet, data, [CANNY], None)
    check_parity(
        "controlnet_union",
        max(max_abs_difference(a, b) for a, b in zip(canny, their_residuals(reference, data, [CANNY], 1.0))),
    )
    depth = our_residuals(controlnet, data, [DEPTH], None)
    auto = our_residuals(controlnet, data, [None], None)
    assert max(max_abs_difference(a, b) for a, b in zip(canny, depth)) > 1e-3
    assert max(max_abs_difference(a, b) for a, b in zip(canny, auto)) > 1e-3


def diffusers_union_images(components, reference, hints, types, scales):
    pipeline = StableDiffusionXLControlNetUnionPipeline(
        **components,
        controlnet=reference,
        scheduler=DDIMScheduler(**SDXL_SCHEDULER, clip_sample=False, set_alpha_to_one=False),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        "a house",
        control_image=hints,
        control_mode=types,
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        controlnet_conditioning_scale=scales,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pt",
    ).images


def our_images(sd, patches):
    positive, negative = sd.encode_prompts("a house", "blurry", SizeConditioning.for_image(SIZE, SIZE))
    run = SamplingRun(STEPS, 0, LATENT, LATENT, 1, uses_guidance=True)
    with patched(sd, patches, run):
        latents = sd.sample(
            (1, 4, LATENT, LATENT),
            positive,
            negative,
            make_solver("ddim", STEPS),
            GUIDANCE,
            SEED,
            step_hook=run.run_step_hooks,
        )
    return sd.decode_latents(latents)


@pytest.fixture(scope="module")
def pipeline_parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("union_pipeline")
    components = diffusers_sdxl_components(folder / "tokenizers")
    reference, release = release_folder(folder, 8, seed=1)
    return (
        components,
        ours_from_diffusers(components),
        reference,
        load_controlnet(release, base=TINY_SDXL_UNET),
    )


def test_union_pipeline_matches_diffusers(pipeline_parts):
    components, sd, reference, controlnet = pipeline_parts
    generator = torch.Generator().manual_seed(11)
    first, second = (torch.rand(1, 3, SIZE, SIZE, generator=generator) for _ in range(2))
    as_image = lambda hint: hint.permute(0, 2, 3, 1)  # noqa: E731
    one = diffusers_union_images(components, reference, [first], [CANNY], 0.8)
    ours_one = our_images(sd, [UnionControlNetPatch(controlnet, [UnionHint(as_image(first), CANNY)], 0.8)])
    two = diffusers_union_images(components, reference, [first, second], [CANNY, DEPTH], [0.7, 0.5])
    hints = [UnionHint(as_image(first), CANNY, 0.7), UnionHint(as_image(second), DEPTH, 0.5)]
    ours_two = our_images(sd, [UnionControlNetPatch(controlnet, hints)])
    assert max_abs_difference(ours_one, our_images(sd, [])) > 1e-3  # the control changes the image
    assert max_abs_difference(ours_one, ours_two) > 1e-3
    check_parity("controlnet_union_pipeline", max_abs_difference(ours_one, one))
    check_parity("controlnet_union_pipeline", max_abs_difference(ours_two, two))


def unet_call(sd, x, text, pooled, time_ids):
    sd.unet.set_timestep(torch.tensor([500.0]))
    sd.unet.set_clip_text_embedding(text)
    sd.unet.set_pooled_text_embedding(pooled)
    sd.unet.set_time_ids(time_ids)
    with torch.no_grad():
        return sd.unet(x)


def test_eject_restores_the_unet_bit_for_bit_also_stacked_with_a_plain_controlnet(pipeline_parts):
    _, sd, _, controlnet = pipeline_parts
    data = inputs(batch=2)
    call = lambda: unet_call(sd, data["x"], data["text"], data["pooled"], data["time_ids"])  # noqa: E731
    before_repr, before = repr(sd.unet), call()
    weights = {name: tensor.clone() for name, tensor in sd.unet.state_dict().items()}
    context_before = dict(sd.unet.use_context("unet"))
    plain = ours_from_diffusers_controlnet(diffusers_controlnet(TINY_SDXL_UNET, seed=5), TINY_SDXL_UNET)
    hint = data["hints"][0][:1].permute(0, 2, 3, 1)
    patches = [
        UnionControlNetPatch(controlnet, [UnionHint(hint, CANNY)], 0.9),
        ControlNetPatch(plain, hint, 0.5),
        UnionControlNetPatch(controlnet, [UnionHint(hint, DEPTH, 0.6), UnionHint(hint, TILE, 0.4)]),
    ]
    run = SamplingRun(2, 0, LATENT, LATENT, 1, uses_guidance=True)
    with patched(sd, patches, run):
        run.run_step_hooks(0)
        assert repr(sd.unet).count("UnionControlNetBranch") == 2
        assert max_abs_difference(call(), before) > 1e-3
    assert repr(sd.unet) == before_repr
    assert torch.equal(call(), before)
    assert all(torch.equal(sd.unet.state_dict()[name], tensor) for name, tensor in weights.items())
    assert sd.unet.use_context("unet").keys() == context_before.keys()
    assert run.step_hooks == []


def test_our_writer_round_trips_the_release_layout(tmp_path):
    reference, folder = release_folder(tmp_path, 8)
    controlnet = load_controlnet(folder)
    written = union_controlnet_tensors(controlnet)
    original = load_file(folder / RELEASE[8])
    assert written.keys() == original.keys()
    assert all(torch.equal(written[key], original[key]) for key in original)


def test_wrong_files_and_types_get_clear_errors(tmp_path):
    reference, folder = release_folder(tmp_path, 6)
    with pytest.raises(
        ModelFileError, match=r"ControlNet file .*is for SDXL.*expected a ControlNet for SD1.5"
    ):
        load_controlnet(folder, base=TINY_UNET)
    controlnet = load_controlnet(folder)
    with pytest.raises(ValueError, match=r"control type tile \(6\) is beyond the 6 types .*ProMax file"):
        UnionControlNetPatch(controlnet, [UnionHint(torch.rand(1, SIZE, SIZE, 3), TILE)])
    with pytest.raises(ValueError, match="auto works with one hint only"):
        UnionControlNetPatch(
            controlnet, [UnionHint(torch.rand(1, SIZE, SIZE, 3)), UnionHint(torch.rand(1, SIZE, SIZE, 3), 1)]
        )
    with pytest.raises(ValueError, match="unknown union control type 'pose'; choose auto or one of openpose"):
        control_type_index("pose")
    tensors = load_file(folder / RELEASE[6])
    broken = {k: v for k, v in tensors.items() if not k.startswith("transformer_layes.0.mlp")}
    save_file(broken, tmp_path / "broken_union.safetensors")
    with pytest.raises(
        ModelFileError, match=r"broken_union.safetensors.*4 missing \(transformer_layes.0.mlp"
    ):
        load_controlnet(tmp_path / "broken_union.safetensors")
    odd = dict(tensors, **{"transformer_layes.0.attn.in_proj_weight": torch.zeros(95, 32)})
    save_file(odd, tmp_path / "odd_union.safetensors")
    with pytest.raises(ModelFileError, match=r"odd_union.safetensors.*in_proj_weight has shape \(95, 32\)"):
        load_controlnet(tmp_path / "odd_union.safetensors")
