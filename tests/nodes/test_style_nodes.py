"""Fluxion StyleAligned and the reference-only modes as nodes: stacked with LoRA + ControlNet + IP-Adapter on one
model (demo weights), saved reference-only workflows unchanged, clear errors."""

from __future__ import annotations

import pytest
import torch

from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.control_nodes import FluxionApplyControl, FluxionControlLoader
from nodes.demo import (
    DEMO_CLIP_VISION,
    DEMO_CONTROLNET,
    DEMO_IP_ADAPTER,
    DEMO_LORA,
    SD15_CHECKPOINT,
    write_demo_files,
)
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.latent_nodes import FluxionEmptyLatent, FluxionVAEEncode
from nodes.lora_nodes import FluxionLoraLoader
from nodes.reference_only_nodes import FluxionReferenceOnly
from nodes.sampler_nodes import sample_latents
from nodes.style_aligned_nodes import FluxionStyleAligned
from nodes.text_nodes import FluxionTextEncode

IMAGE = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
STYLE = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root / "models"


@pytest.fixture
def stack(monkeypatch, demo_models):
    """Checkpoint + LoRA + ControlNet + IP-Adapter on one model wire, and the prompts."""
    monkeypatch.setattr(host, "_models_dir", demo_models)
    model, clip, vae = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    model, clip, _ = FluxionLoraLoader().load(model, clip, DEMO_LORA, 0.8, 0.8, False)
    control = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    model = FluxionApplyControl().apply(model, control, IMAGE, 0.9, 0.0, 1.0, "balanced")[0]
    ipadapter = FluxionIPAdapterLoader().load(DEMO_IP_ADAPTER)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0]
    model = FluxionApplyIPAdapter().apply(model, ipadapter, clip_vision, IMAGE, 0.7)[0]
    positive = FluxionTextEncode().encode(clip, "a house")[0]
    negative = FluxionTextEncode().encode(clip, "blurry")[0]
    return model, vae, positive, negative


def sample(model, positive, negative, batch=3):
    latent = FluxionEmptyLatent().generate(64, 64, batch)[0]
    return sample_latents(model, positive, negative, latent, 1, 3, 5.0, "euler", "normal", 1.0)


def test_style_aligned_stacks_with_lora_controlnet_and_ip_adapter(stack):
    model, vae, positive, negative = stack
    unet = model.model.unet
    before = repr(unet)
    weights = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    plain = sample(model, positive, negative)
    aligned_model = FluxionStyleAligned().apply(model, 1.0, True, True, False, False, 0.0, 1.0)[0]
    aligned = sample(aligned_model, positive, negative)
    assert torch.isfinite(aligned).all()
    assert (aligned[0] - plain[0]).abs().max().item() < 1e-4  # the reference: measured 0
    assert (aligned[1:] - plain[1:]).abs().max().item() > 1e-3
    reference = FluxionVAEEncode().encode(vae, STYLE)[0]
    styled_model = FluxionStyleAligned().apply(model, 0.9, True, True, True, True, 0.0, 1.0, reference)[0]
    styled = sample(styled_model, positive, negative)
    assert torch.isfinite(styled).all() and (styled[0] - plain[0]).abs().max().item() > 1e-3
    # the wires are immutable: the shared model comes back exactly, the plain wire samples as before
    assert repr(unet) == before
    assert all(torch.equal(unet.state_dict()[name], tensor) for name, tensor in weights.items())
    assert torch.equal(sample(model, positive, negative), plain)


@pytest.mark.parametrize("mode", ["adain", "attn+adain"])
def test_reference_only_modes_stack_with_lora_controlnet_and_ip_adapter(stack, mode):
    model, vae, positive, negative = stack
    before = repr(model.model.unet)
    attn = FluxionReferenceOnly().apply(model, vae, STYLE, 1.0, 0.5, 0.0, 1.0)[0]
    other = FluxionReferenceOnly().apply(model, vae, STYLE, 1.0, 0.5, 0.0, 1.0, mode, 0.8)[0]
    one, two = sample(attn, positive, negative, 1), sample(other, positive, negative, 1)
    assert torch.isfinite(two).all() and (one - two).abs().max().item() > 1e-3
    assert repr(model.model.unet) == before


def test_saved_reference_only_workflows_keep_their_widgets():
    inputs = FluxionReferenceOnly.INPUT_TYPES()
    assert list(inputs["required"]) == [
        "model",
        "vae",
        "image",
        "strength",
        "style_fidelity",
        "start_percent",
        "end_percent",
    ]
    assert list(inputs["optional"]) == ["mode", "adain_strength"]
    assert inputs["optional"]["mode"][0] == ["attn", "adain", "attn+adain"]


def test_bad_reference_latents_are_refused_by_name(stack):
    model, vae, positive, negative = stack
    two = {"samples": torch.zeros(2, 4, 8, 8)}
    with pytest.raises(ValueError, match="Fluxion StyleAligned: the reference LATENT holds 2 latents"):
        FluxionStyleAligned().apply(model, 1.0, True, True, False, False, 0.0, 1.0, two)
    with pytest.raises(ValueError, match="Fluxion StyleAligned: the reference must be a LATENT"):
        FluxionStyleAligned().apply(model, 1.0, True, True, False, False, 0.0, 1.0, torch.zeros(1))
    with pytest.raises(ValueError, match="Fluxion Reference-Only: mode must be one of"):
        FluxionReferenceOnly().apply(model, vae, STYLE, 1.0, 0.5, 0.0, 1.0, "style")


def test_reference_only_attn_and_style_aligned_refuse_to_share_one_model(stack):
    model, vae, positive, negative = stack
    unet = model.model.unet
    before = repr(unet)
    attn = FluxionReferenceOnly().apply(model, vae, STYLE, 1.0, 0.5, 0.0, 1.0)[0]
    both = FluxionStyleAligned().apply(attn, 1.0, True, True, False, False, 0.0, 1.0)[0]
    with pytest.raises(
        Exception, match="StyleAligned cannot go on a model whose self-attention already carries"
    ):
        sample(both, positive, negative, 2)
    assert repr(unet) == before
    adain = FluxionReferenceOnly().apply(model, vae, STYLE, 1.0, 0.5, 0.0, 1.0, "adain")[0]
    fine = FluxionStyleAligned().apply(adain, 1.0, True, True, False, False, 0.0, 1.0)[0]
    assert torch.isfinite(sample(fine, positive, negative, 2)).all()
    assert repr(unet) == before
