"""Issue 11, part 3: odd, tiny, huge, non-finite and out-of-range values work sensibly or fail clearly.

"Sensibly" is asserted: finite outputs of the expected shape. Huge sizes are refused before anything of
that size is allocated (torch.zeros / torch.randn are made to fail if reached), naming the limit:
16384 pixels per side and 16384x16384 = 268,435,456 pixels per batch (`latent_nodes.MAX_BATCH_PIXELS`).
"""

import copy
import json

import pytest
import torch

from foundationals.latent_diffusion import limits
from foundationals.latent_diffusion.canny import canny
from foundationals.latent_diffusion.solvers import SOLVERS
from nodes import latent_nodes
from nodes.control_nodes import FluxionApplyControl, FluxionCanny, FluxionControlLoader
from nodes.demo import DEMO_CLIP_VISION, DEMO_CONTROLNET, DEMO_IP_ADAPTER, EXAMPLES
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.latent_nodes import MAX_BATCH_PIXELS, FluxionEmptyLatent, FluxionVAEDecode, FluxionVAEEncode
from nodes.reference_only_nodes import FluxionReferenceOnly
from nodes.runner import Runner
from nodes.sampler_nodes import sample_latents
from nodes.text_nodes import FluxionTextEncode
from nodes.workflow import WorkflowError

SIZE = dict(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64)


def encode(clip, text="a lighthouse"):
    return FluxionTextEncode().encode(clip, text, 1, **SIZE)[0]


def picture(height=64, width=64, batch=1):
    y = torch.linspace(0, 1, height)[:, None, None]
    x = torch.linspace(0, 1, width)[None, :, None]
    return (y * x * torch.tensor([1.0, 0.5, 0.25])).expand(height, width, 3)[None].repeat(batch, 1, 1, 1)


def sample(wires, latent, steps=1, cfg=3.0, denoise=1.0, solver="euler", positive=None, negative=None):
    model, clip = wires[0], wires[1]
    positive = positive if positive is not None else encode(clip)
    negative = negative if negative is not None else encode(clip, "fog")
    return sample_latents(model, positive, negative, latent, 7, steps, cfg, solver, "normal", denoise)


def finite(tensor, shape):
    assert tuple(tensor.shape) == shape, f"shape {tuple(tensor.shape)}, expected {shape}"
    assert torch.isfinite(tensor).all()


def refused(call, *fragments, error=ValueError):
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- odd and tiny sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(72, 88), (23, 37), (16, 16)])
def test_images_of_odd_sizes_are_cropped_to_multiples_of_8_and_run(sd15, height, width):
    _, _, vae = sd15
    latent = FluxionVAEEncode().encode(vae, picture(height, width))[0]
    result = sample(sd15, latent, denoise=0.6)
    finite(result, (1, 4, height // 8, width // 8))
    finite(FluxionVAEDecode().decode(vae, {"samples": result})[0], (1, height // 8 * 8, width // 8 * 8, 3))


@pytest.mark.parametrize(("height", "width"), [(1, 1), (8, 8), (15, 64), (64, 9)])
def test_images_too_small_to_encode_are_refused(sd15, height, width):
    refused(
        lambda: FluxionVAEEncode().encode(sd15[2], picture(height, width)),
        f"{width}x{height} pixels is too small",
        "at least 16 pixels",
    )
    refused(
        lambda: FluxionReferenceOnly().apply(sd15[0], sd15[2], picture(height, width), 1.0, 0.5, 0.0, 1.0),
        "too small",
    )


def test_empty_latents_of_sizes_not_multiple_of_8_round_down(sd15):
    latent = FluxionEmptyLatent().generate(23, 17, 2)[0]
    finite(latent["samples"], (2, 4, 2, 2))
    finite(sample(sd15, latent), (2, 4, 2, 2))


@pytest.mark.parametrize(("height", "width"), [(1, 1), (37, 53)])
def test_hints_and_image_prompts_of_any_size_are_resized(sd15, height, width):
    control = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    model = FluxionApplyControl().apply(sd15[0], control, picture(height, width), 1.0, 0.0, 1.0, "balanced")[
        0
    ]
    ipadapter = FluxionIPAdapterLoader().load(DEMO_IP_ADAPTER)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0]
    model = FluxionApplyIPAdapter().apply(
        model, ipadapter, clip_vision, picture(height, width), 1.0, "concat", "", 0.0, 1.0
    )[0]
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    finite(sample((model, sd15[1]), latent), (1, 4, 8, 8))


# --- huge sizes ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_allocation(monkeypatch):
    """Make the allocations the nodes would do first fail loudly: a refusal must come before them."""

    def boom(*args, **kwargs):
        raise AssertionError(f"allocated {args} before refusing")

    monkeypatch.setattr(torch, "zeros", boom)
    monkeypatch.setattr(torch, "randn", boom)


def huge_view(*shape):
    """A tensor of `shape` that takes no memory (a broadcast view of one element)."""
    return torch.ones((1,) * len(shape)).expand(*shape)


def test_a_huge_batch_of_empty_latents_is_refused_before_allocation(no_allocation):
    message = refused(lambda: FluxionEmptyLatent().generate(16384, 16384, 2), "16384x16384")
    assert f"{MAX_BATCH_PIXELS:,}" in message and "batch" in message
    refused(lambda: FluxionEmptyLatent().generate(4096, 4096, 64), f"{MAX_BATCH_PIXELS:,}")


def test_huge_latents_and_images_are_refused_before_any_work(sd15, no_allocation):
    latent = {"samples": huge_view(1, 4, 2056, 16)}  # 16448 px high: past the per-side limit
    refused(lambda: FluxionVAEDecode().decode(sd15[2], latent), "16448", "limit of 16384 pixels per side")
    refused(lambda: FluxionVAEEncode().encode(sd15[2], huge_view(1, 16392, 64, 3)), "limit of 16384")
    crowd = {"samples": huge_view(65, 4, 256, 256)}  # 65 images of 2048x2048
    refused(lambda: sample_latents(sd15[0], None, None, crowd, 0, 1, 3.0, "euler", "normal", 1.0), "batch")


def test_the_library_pipelines_refuse_huge_sizes_before_allocation(sd15, no_allocation):
    sd = sd15[0].model
    per_side = "limit of 16384 pixels per side"
    refused(lambda: sd.text_to_image("x", width=16392, height=64, steps=1), "text_to_image", per_side)
    refused(
        lambda: sd.text_to_image("x", width=4096, height=4096, batch_size=17, steps=1),
        f"{MAX_BATCH_PIXELS:,} pixels per batch",
    )
    refused(lambda: sd.image_to_image(huge_view(1, 3, 16392, 64), "x", steps=1), "image_to_image", per_side)
    refused(
        lambda: sd.inpaint(huge_view(1, 3, 64, 16392), huge_view(1, 1, 64, 16392), "x"), "inpaint", per_side
    )
    refused(lambda: sd.sample((65, 4, 256, 256), None, None, None, 7.5, 0), "sample", f"{MAX_BATCH_PIXELS:,}")


def test_the_nodes_and_the_pipelines_share_one_size_check():
    assert latent_nodes.check_size is limits.check_size
    assert (latent_nodes.MAX_RESOLUTION, latent_nodes.MAX_BATCH_PIXELS) == (16384, 16384 * 16384)
    assert limits.MAX_BATCH_PIXELS == latent_nodes.MAX_BATCH_PIXELS


def test_widget_sizes_past_the_limits_are_refused_by_the_runner(robustness_folders):
    prompt = json.loads((EXAMPLES / "sd15_txt2img.api.json").read_text())
    latent_id = next(i for i, node in prompt.items() if node["class_type"] == "FluxionEmptyLatent")
    for name, value, expected in [
        ("width", 16392, "<= 16384"),
        ("height", 8, ">= 16"),
        ("batch_size", 65, "<= 64"),
    ]:
        broken = copy.deepcopy(prompt)
        broken[latent_id]["inputs"][name] = value
        message = refused(lambda broken=broken: Runner().run(broken), expected, error=WorkflowError)
        assert f"node {latent_id} (FluxionEmptyLatent), input '{name}'" in message


# --- masks -----------------------------------------------------------------------------------------------------


def test_a_mask_of_another_size_is_resized(sd15):
    mask = torch.zeros(1, 24, 40)
    mask[:, 6:18, 10:30] = 1
    latent = FluxionVAEEncode().encode(sd15[2], picture(), mask)[0]
    finite(latent["noise_mask"], (1, 64, 64))
    assert latent["noise_mask"].max() == 1 and latent["noise_mask"].min() == 0
    finite(sample(sd15, latent, steps=2), (1, 4, 8, 8))


def test_all_zero_and_all_one_masks_are_plain_image_to_image(sd15):
    # Zero: nothing to repaint. One: everything is repainted at the given strength, which is image-to-image.
    plain = FluxionVAEEncode().encode(sd15[2], picture())[0]
    expected = sample(sd15, plain, steps=2, denoise=0.7)
    finite(expected, (1, 4, 8, 8))
    for value in (0.0, 1.0):
        masked = FluxionVAEEncode().encode(sd15[2], picture(), torch.full((1, 64, 64), value))[0]
        assert torch.equal(sample(sd15, masked, steps=2, denoise=0.7), expected)
    half = torch.zeros(1, 64, 64)
    half[:, :, 32:] = 1
    partly = FluxionVAEEncode().encode(sd15[2], picture(), half)[0]
    assert not torch.equal(sample(sd15, partly, steps=2, denoise=0.7), expected)


def test_an_all_zero_mask_on_an_inpainting_model_keeps_the_image(sd15_inpainting):
    latent = FluxionVAEEncode().encode(sd15_inpainting[2], picture(), torch.zeros(1, 64, 64))[0]
    finite(sample(sd15_inpainting, latent, steps=2), (1, 4, 8, 8))


# --- NaN and inf ----------------------------------------------------------------------------------------------


def poisoned(tensor, value):
    tensor = tensor.clone()
    tensor.view(-1)[tensor.numel() // 3] = value
    return tensor


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused(sd15, value):
    model, _, vae = sd15
    image, mask = poisoned(picture(), value), poisoned(torch.ones(1, 64, 64), value)
    good_latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    control = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    ipadapter = FluxionIPAdapterLoader().load(DEMO_IP_ADAPTER)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0]
    calls = {
        "VAE Encode image": lambda: FluxionVAEEncode().encode(vae, image),
        "VAE Encode mask": lambda: FluxionVAEEncode().encode(vae, picture(), mask),
        "VAE Decode latents": lambda: FluxionVAEDecode().decode(
            vae, {"samples": poisoned(torch.zeros(1, 4, 8, 8), value)}
        ),
        "sampler latents": lambda: sample(sd15, {"samples": poisoned(torch.zeros(1, 4, 8, 8), value)}),
        "sampler mask": lambda: sample(sd15, dict(good_latent, noise_mask=mask)),
        "control hint": lambda: FluxionApplyControl().apply(model, control, image, 1.0, 0.0, 1.0, "balanced"),
        "control mask": lambda: FluxionApplyControl().apply(
            model, control, picture(), 1.0, 0.0, 1.0, "balanced", mask
        ),
        "IP-Adapter image": lambda: FluxionApplyIPAdapter().apply(
            model, ipadapter, clip_vision, image, 1.0, "concat", "", 0.0, 1.0
        ),
        "IP-Adapter mask": lambda: FluxionApplyIPAdapter().apply(
            model, ipadapter, clip_vision, picture(), 1.0, "concat", "", 0.0, 1.0, mask=mask
        ),
        "reference image": lambda: FluxionReferenceOnly().apply(model, vae, image, 1.0, 0.5, 0.0, 1.0),
        "Canny node image": lambda: FluxionCanny().detect(image, 0.4, 0.8),
        "canny() image": lambda: canny(image),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match="NaN or infinite") as caught:
            call()
        assert caught.value is not None, where


# --- prompts ----------------------------------------------------------------------------------------------------


def test_empty_and_10000_token_prompts_encode_and_sample(sd15, sdxl):
    long_prompt = " ".join(["lighthouse"] * 10_000)
    for wires, width in ((sd15, 32), (sdxl, 48)):
        empty, long = encode(wires[1], ""), encode(wires[1], long_prompt)
        finite(empty[0][0], (1, 77, width))
        assert long[0][0].shape[1] >= 10_000 and long[0][0].shape[1] % 77 == 0
        assert torch.isfinite(long[0][0]).all()
        latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
        finite(sample(wires, latent, positive=long, negative=empty), (1, 4, 8, 8))


# --- steps, denoise, cfg ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_one_step_works_for_every_solver(sd15, solver):
    finite(sample(sd15, FluxionEmptyLatent().generate(64, 64, 1)[0], solver=solver), (1, 4, 8, 8))


def test_denoise_0_returns_the_input_and_denoise_1_redraws(sd15):
    latent = FluxionVAEEncode().encode(sd15[2], picture())[0]
    assert torch.equal(sample(sd15, latent, steps=3, denoise=0.0), latent["samples"])
    redrawn = sample(sd15, latent, steps=3, denoise=1.0)
    finite(redrawn, (1, 4, 8, 8))
    empty = FluxionEmptyLatent().generate(64, 64, 1)[0]
    assert torch.equal(redrawn, sample(sd15, empty, steps=3, denoise=1.0))  # full strength ignores the input


def test_cfg_0_disables_guidance_and_cfg_30_stays_finite(sd15):
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    unguided = sample(sd15, latent, steps=2, cfg=0.0)
    finite(unguided, (1, 4, 8, 8))
    assert torch.equal(unguided, sample(sd15, latent, steps=2, cfg=1.0))
    strong = sample(sd15, latent, steps=2, cfg=30.0)
    finite(strong, (1, 4, 8, 8))
    assert not torch.equal(strong, unguided)
