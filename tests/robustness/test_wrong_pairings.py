"""Issue 11, part 2: adapters and checkpoints of the wrong kind or family are refused clearly, changing nothing.

Each refusal names the file (or the model) and says what was expected; the shared model's trees, weights,
contexts and sampling outputs are bit-identical before and after the failed call.
"""

import pytest
import torch

from foundationals.model_files import ModelFileError
from nodes.control_nodes import FluxionApplyControl, FluxionControlLoader
from nodes.demo import (
    DEMO_CLIP_VISION,
    DEMO_CONTROLNET,
    DEMO_IP_ADAPTER,
    DEMO_LORA,
    SD15_CHECKPOINT,
    SDXL_CHECKPOINT,
)
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.latent_nodes import FluxionEmptyLatent, FluxionVAEEncode
from nodes.lora_nodes import FluxionLoraLoader
from nodes.sampler_nodes import sample_latents
from nodes.text_nodes import FluxionTextEncode
from tests.robustness.conftest import (
    CONTROLNET_IN_LORAS,
    INPAINT_CHECKPOINT,
    LORA_IN_CONTROLNET,
    SD15_T2I,
    SDXL_CONTROLNET,
    SDXL_IP_ADAPTER,
    SDXL_LORA,
    SDXL_T2I,
    WRONG_CLIP_VISION,
)

SIZE = dict(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64)
HINT = torch.linspace(0, 1, 64 * 64 * 3).reshape(1, 64, 64, 3)


def encode(clip, text="a lighthouse"):
    return FluxionTextEncode().encode(clip, text, 1, **SIZE)[0]


def snapshot(wire):
    """Everything a failed call could leave behind: layer trees, weights, UNet contexts."""
    sd = wire.model
    parts = {
        "unet": sd.unet,
        "autoencoder": sd.autoencoder,
        "text_encoder": sd.text_encoder,
        "text_encoder_2": sd.text_encoder_2,
    }
    trees = {name: repr(part) for name, part in parts.items() if part is not None}
    weights = {
        f"{name}.{key}": value.detach().clone()
        for name, part in parts.items()
        if part is not None
        for key, value in part.state_dict().items()
    }
    return trees, weights, repr(sorted(sd.unet.provider.contexts))


def outputs(model_wire, clip_wire, latent=None):
    """Text conditioning and one guided sampling step: they change if any weight or layer was left behind."""
    positive = encode(clip_wire)  # also the negative: guidance still runs both branches
    latent = latent or FluxionEmptyLatent().generate(64, 64, 1)[0]
    result = sample_latents(model_wire, positive, positive, latent, 5, 1, 3.0, "euler", "normal", 1.0)
    return positive[0][0], result


def assert_same_model(before, after):
    assert before[0] == after[0], "a layer tree changed"
    assert before[2] == after[2], "the UNet's contexts changed"
    assert before[1].keys() == after[1].keys()
    changed = [key for key in before[1] if not torch.equal(before[1][key], after[1][key])]
    assert not changed, f"weights changed: {changed[:5]}"


def assert_same_outputs(before, after):
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "outputs changed"


def refused(wires, call, error_types, *fragments, latent=None):
    """`call()` raises one of `error_types` whose message holds every fragment; the model is untouched."""
    model, clip = wires[0], wires[1]
    if latent is None and model.model.is_inpainting_model:
        latent = masked_latents(wires[2])
    state, results = snapshot(model), outputs(model, clip, latent)
    with pytest.raises(error_types) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert_same_model(state, snapshot(model))
    assert_same_outputs(results, outputs(model, clip, latent))
    return message


# --- LoRA --------------------------------------------------------------------------------------------------


def load_lora(wires, name):
    return FluxionLoraLoader().load(wires[0], wires[1], name, 1.0, 1.0, True)


def test_each_lora_loads_on_its_own_family(sd15, sdxl):
    assert "applied" in load_lora(sd15, DEMO_LORA)[2]
    assert "applied" in load_lora(sdxl, SDXL_LORA)[2]


def test_an_sdxl_lora_on_sd15_is_refused(sd15):
    refused(sd15, lambda: load_lora(sd15, SDXL_LORA), ValueError, SDXL_LORA, "SDXL", "SD1.5")


def test_an_sd15_lora_on_sdxl_is_refused(sdxl):
    # Its text-encoder part would fit SDXL's first encoder (same CLIP-L): the UNet part's context width tells.
    message = refused(sdxl, lambda: load_lora(sdxl, DEMO_LORA), ValueError, DEMO_LORA, "SDXL")
    assert "32" in message and "48" in message  # the LoRA's cross-attention width and the model's


def test_a_controlnet_given_to_the_lora_loader_is_refused(sd15):
    refused(
        sd15,
        lambda: load_lora(sd15, CONTROLNET_IN_LORAS),
        (ModelFileError, ValueError),
        CONTROLNET_IN_LORAS,
        "a ControlNet",
        "LoRA",
    )


# --- ControlNet and T2I-Adapter ------------------------------------------------------------------------------


def apply_control(wires, name):
    control = FluxionControlLoader().load(name)[0]
    return FluxionApplyControl().apply(wires[0], control, HINT, 1.0, 0.0, 1.0, "balanced")[0]


@pytest.mark.parametrize("name", [DEMO_CONTROLNET, SD15_T2I])
def test_sd15_controls_apply_to_sd15(sd15, name):
    assert len(apply_control(sd15, name).patches) == 1


@pytest.mark.parametrize("name", [SDXL_CONTROLNET, SDXL_T2I])
def test_sdxl_controls_apply_to_sdxl(sdxl, name):
    assert len(apply_control(sdxl, name).patches) == 1


def test_area_conditioning_with_a_t2i_adapter_is_refused_and_with_a_controlnet_runs(sd15):
    from nodes.core_stand_ins import ConditioningSetArea

    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    area = ConditioningSetArea().append(encode(sd15[1]), 64, 32, 0, 0, 1.0)[0]

    def run(model):
        return sample_latents(model, area, encode(sd15[1]), latent, 0, 1, 3.0, "euler", "normal", 1.0)

    refused(sd15, lambda: run(apply_control(sd15, SD15_T2I)), ValueError, "T2I-Adapter", "area")
    assert torch.isfinite(run(apply_control(sd15, DEMO_CONTROLNET))).all()  # its hint follows the crop


@pytest.mark.parametrize(("name", "kind"), [(SDXL_CONTROLNET, "ControlNet"), (SDXL_T2I, "T2I-Adapter")])
def test_an_sdxl_control_on_sd15_is_refused(sd15, name, kind):
    refused(sd15, lambda: apply_control(sd15, name), ValueError, name, kind, "SDXL", "SD1.5", SD15_CHECKPOINT)


@pytest.mark.parametrize(("name", "kind"), [(DEMO_CONTROLNET, "ControlNet"), (SD15_T2I, "T2I-Adapter")])
def test_an_sd15_control_on_sdxl_is_refused(sdxl, name, kind):
    refused(sdxl, lambda: apply_control(sdxl, name), ValueError, name, kind, "SD1.5", "SDXL", SDXL_CHECKPOINT)


def test_a_lora_given_to_the_control_loader_is_refused(sd15):
    refused(
        sd15,
        lambda: FluxionControlLoader().load(LORA_IN_CONTROLNET),
        ModelFileError,
        LORA_IN_CONTROLNET,
        "this is a LoRA, not a ControlNet",
        "expected a ControlNet",
    )


# --- IP-Adapter ------------------------------------------------------------------------------------------------


def apply_ip_adapter(wires, adapter, encoder):
    ipadapter = FluxionIPAdapterLoader().load(adapter)[0]
    clip_vision = FluxionCLIPVisionLoader().load(encoder)[0]
    return FluxionApplyIPAdapter().apply(wires[0], ipadapter, clip_vision, HINT, 1.0, "concat", "", 0.0, 1.0)[
        0
    ]


def test_ip_adapters_apply_to_their_family(sd15, sdxl):
    assert len(apply_ip_adapter(sd15, DEMO_IP_ADAPTER, DEMO_CLIP_VISION).patches) == 1
    assert len(apply_ip_adapter(sdxl, SDXL_IP_ADAPTER, DEMO_CLIP_VISION).patches) == 1


def test_an_sdxl_ip_adapter_on_sd15_is_refused(sd15):
    def call():
        return apply_ip_adapter(sd15, SDXL_IP_ADAPTER, DEMO_CLIP_VISION)

    refused(sd15, call, ValueError, "ip-adapter_sdxl", "IP-Adapter", "SD1.5", "context 48")


def test_an_sd15_ip_adapter_on_sdxl_is_refused(sdxl):
    def call():
        return apply_ip_adapter(sdxl, DEMO_IP_ADAPTER, DEMO_CLIP_VISION)

    refused(sdxl, call, ValueError, "ip-adapter_sd15", "IP-Adapter", "SDXL", "context 32")


@pytest.mark.parametrize(("family", "adapter"), [("sd15", DEMO_IP_ADAPTER), ("sdxl", SDXL_IP_ADAPTER)])
def test_an_ip_adapter_with_the_wrong_clip_vision_encoder_is_refused(sd15, sdxl, family, adapter):
    wires = {"sd15": sd15, "sdxl": sdxl}[family]

    def call():
        return apply_ip_adapter(wires, adapter, WRONG_CLIP_VISION)

    refused(wires, call, ValueError, adapter.removesuffix(".safetensors"), WRONG_CLIP_VISION, "24-d", "16-d")


# --- inpainting and regular checkpoints, conditioning of the other family --------------------------------------


def masked_latents(vae, mask_value=1.0):
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = mask_value
    return FluxionVAEEncode().encode(vae, HINT, mask)[0]


def test_an_inpainting_model_without_a_mask_is_refused(sd15_inpainting):
    model, clip, vae = sd15_inpainting
    positive = encode(clip)
    for latent in (FluxionEmptyLatent().generate(64, 64, 1)[0], FluxionVAEEncode().encode(vae, HINT)[0]):

        def call(latent=latent):
            return sample_latents(model, positive, positive, latent, 0, 2, 3.0, "euler", "normal", 0.8)

        refused(
            sd15_inpainting,
            call,
            ValueError,
            INPAINT_CHECKPOINT,
            "inpainting model (9 input channels)",
            "mask",
        )


def test_an_inpainting_model_takes_a_core_latent_with_a_noise_mask_and_refuses_one_without(
    sd15, sd15_inpainting
):
    model, clip, _ = sd15_inpainting
    latent = masked_latents(sd15[2])  # another VAE's encode: a noise_mask but no masked-image latents
    # as ComfyUI does, the latent itself stands for the masked image (core's VAE Encode for Inpainting blanks it)
    result = sample_latents(model, encode(clip), encode(clip), latent, 0, 2, 3.0, "euler", "normal", 1.0)
    assert result.shape == (1, 4, 8, 8) and torch.isfinite(result).all()
    unmasked = {"samples": latent["samples"]}

    def call():
        return sample_latents(model, encode(clip), encode(clip), unmasked, 0, 2, 3.0, "euler", "normal", 1.0)

    refused(sd15_inpainting, call, ValueError, INPAINT_CHECKPOINT, "noise_mask", "Fluxion VAE Encode")


def test_an_inpainting_model_samples_with_its_own_masked_latents(sd15_inpainting):
    model, clip, vae = sd15_inpainting
    for value in (1.0, 0.0):  # a mask, and an all-zero one (nothing to repaint: still 9-channel input)
        latent = masked_latents(vae, value)
        result = sample_latents(model, encode(clip), encode(clip), latent, 0, 2, 3.0, "euler", "normal", 1.0)
        assert result.shape == (1, 4, 8, 8) and torch.isfinite(result).all()


def test_a_regular_model_in_an_inpainting_workflow_blends_instead(sd15, sd15_inpainting):
    model, clip, _ = sd15
    latent = masked_latents(sd15_inpainting[2])  # carries masked-image latents the regular model ignores
    result = sample_latents(model, encode(clip), encode(clip), latent, 0, 2, 3.0, "euler", "normal", 1.0)
    assert result.shape == (1, 4, 8, 8) and torch.isfinite(result).all()


@pytest.mark.parametrize("target", ["sd15", "sdxl"])
def test_conditioning_from_the_other_familys_text_encoder_is_refused(sd15, sdxl, target):
    wires, other = (sd15, sdxl) if target == "sd15" else (sdxl, sd15)
    foreign = encode(other[1])
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]

    def call():
        return sample_latents(wires[0], foreign, foreign, latent, 0, 1, 3.0, "euler", "normal", 1.0)

    refused(wires, call, ValueError, wires[0].name, "conditioning", "Fluxion CLIP Text Encode")
