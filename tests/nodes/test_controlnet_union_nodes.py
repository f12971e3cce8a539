"""ControlNet Union / ProMax as nodes, on the demo's tiny SDXL weights: the loader detects the union file, Set Union
ControlNet Type chooses the type per hint, several hints fuse in one pass; it stacks with a LoRA, a plain ControlNet
and an IP-Adapter on one model and leaves the shared model exactly as it was; misuse gets clear errors."""

from __future__ import annotations

import pytest
import torch

from fluxion.utils import save_to_safetensors
from foundationals.latent_diffusion.adapters.controlnet import UnionControlNet
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.control_nodes import FluxionApplyControl, FluxionControlLoader
from nodes.controlnet_union_nodes import FluxionApplyUnionControlNet, FluxionSetUnionControlNetType
from nodes.demo import (
    DEMO_CLIP_VISION_BIGG,
    DEMO_CONTROLNET,
    DEMO_SDXL_IP_ADAPTER,
    DEMO_UNION_CONTROLNET,
    SD15_CHECKPOINT,
    SDXL_CHECKPOINT,
    kohya_lora,
    tiny_sdxl,
    write_demo_files,
)
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.lora_nodes import FluxionLoraLoader
from nodes.sampler_nodes import sample_latents
from nodes.text_nodes import FluxionTextEncode

EDGES = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
DEPTH = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
SDXL_LORA = "fluxion_demo_sdxl_lora.safetensors"
CANNY, DEPTH_TYPE = "canny/lineart/anime_lineart/mlsd", "depth"


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    unet_only = {k: v for k, v in kohya_lora(tiny_sdxl(), seed=7).items() if k.startswith("lora_unet_")}
    save_to_safetensors(root / "models" / "loras" / SDXL_LORA, unet_only)
    return root / "models"


@pytest.fixture
def sdxl(monkeypatch, demo_models):
    monkeypatch.setattr(host, "_models_dir", demo_models)
    model, clip, _ = FluxionCheckpointLoader().load(SDXL_CHECKPOINT)
    positive = FluxionTextEncode().encode(clip, "a house")[0]
    negative = FluxionTextEncode().encode(clip, "blurry")[0]
    return model, clip, positive, negative


def sample(model, positive, negative):
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    return sample_latents(model, positive, negative, latent, 1, 3, 5.0, "euler", "normal", 1.0)


def union(type_name: str | None = None):
    control = FluxionControlLoader().load(DEMO_UNION_CONTROLNET)[0]
    if type_name is not None:
        control = FluxionSetUnionControlNetType().set_type(control, type_name)[0]
    return control


def test_the_loader_reads_the_release_layout_and_the_type_changes_the_image(sdxl):
    model, _, positive, negative = sdxl
    control = union()
    assert isinstance(control.model, UnionControlNet) and control.kind == "ControlNet Union"
    assert control.model.union_config.num_control_types == 8 and control.control_type is None
    plain = sample(model, positive, negative)
    results = {}
    for name in ("auto", CANNY, DEPTH_TYPE, "tile"):
        typed = FluxionSetUnionControlNetType().set_type(control, name)[0]
        assert control.control_type is None  # the input wire is unchanged
        controlled = FluxionApplyControl().apply(model, typed, EDGES, 0.9, 0.0, 1.0, "balanced")[0]
        results[name] = sample(controlled, positive, negative)
        assert torch.isfinite(results[name]).all()
        assert (results[name] - plain).abs().max().item() > 1e-3
    assert (results[CANNY] - results[DEPTH_TYPE]).abs().max().item() > 1e-4
    assert (results[CANNY] - results["auto"]).abs().max().item() > 1e-4
    assert torch.equal(sample(model, positive, negative), plain)  # the wire without the control


def test_one_hint_in_the_multi_hint_node_is_set_type_plus_apply_control(sdxl):
    model, _, positive, negative = sdxl
    via_set = FluxionApplyControl().apply(model, union(CANNY), EDGES, 0.8, 0.0, 1.0, "balanced")[0]
    via_multi = FluxionApplyUnionControlNet().apply(
        model, union(), EDGES, CANNY, 0.8, 1.0, 0.0, 1.0, "balanced"
    )[0]
    difference = (sample(via_set, positive, negative) - sample(via_multi, positive, negative)).abs().max()
    assert difference.item() <= 1e-5  # the same computation: residuals x 0.8 (measured 0)


def test_two_hints_fuse_in_one_pass_and_differ_from_two_applies(sdxl):
    model, _, positive, negative = sdxl
    control = union()
    fused = FluxionApplyUnionControlNet().apply(
        model, control, EDGES, CANNY, 0.7, 1.0, 0.0, 1.0, "balanced", DEPTH, DEPTH_TYPE, 0.5
    )[0]
    assert "canny/lineart/anime_lineart/mlsd, depth" in fused.patches[-1].label
    stacked = FluxionApplyControl().apply(model, union(CANNY), EDGES, 0.7, 0.0, 1.0, "balanced")[0]
    stacked = FluxionApplyControl().apply(stacked, union(DEPTH_TYPE), DEPTH, 0.5, 0.0, 1.0, "balanced")[0]
    one, two = sample(fused, positive, negative), sample(stacked, positive, negative)
    assert torch.isfinite(one).all() and torch.isfinite(two).all()
    assert (one - two).abs().max().item() > 1e-4  # one fused pass is not the sum of two passes


def test_union_stacks_with_lora_controlnet_and_ip_adapter_and_the_model_comes_back(sdxl):
    model, clip, positive, negative = sdxl
    unet = model.model.unet
    before = repr(unet)
    weights = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    plain = sample(model, positive, negative)
    stacked, _, _ = FluxionLoraLoader().load(model, clip, SDXL_LORA, 0.8, 0.0, True)
    stacked = FluxionApplyControl().apply(stacked, union(CANNY), EDGES, 0.9, 0.0, 1.0, "balanced")[0]
    stacked = FluxionApplyUnionControlNet().apply(
        stacked, union(), EDGES, "openpose", 0.6, 0.7, 0.2, 0.9, "balanced", DEPTH, DEPTH_TYPE, 0.8
    )[0]
    ipadapter = FluxionIPAdapterLoader().load(DEMO_SDXL_IP_ADAPTER)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION_BIGG)[0]
    stacked = FluxionApplyIPAdapter().apply(stacked, ipadapter, clip_vision, DEPTH, 0.7)[0]
    without_union = FluxionLoraLoader().load(model, clip, SDXL_LORA, 0.8, 0.0, True)[0]
    without_union = FluxionApplyIPAdapter().apply(without_union, ipadapter, clip_vision, DEPTH, 0.7)[0]
    result = sample(stacked, positive, negative)
    assert torch.isfinite(result).all()
    assert (result - sample(without_union, positive, negative)).abs().max().item() > 1e-3
    assert repr(unet) == before
    assert all(torch.equal(unet.state_dict()[name], tensor) for name, tensor in weights.items())
    assert torch.equal(sample(model, positive, negative), plain)


def test_misuse_gets_clear_errors(sdxl, monkeypatch):
    model, _, _, _ = sdxl
    plain = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    with pytest.raises(
        ValueError, match=r"needs a ControlNet Union / ProMax .*control_v11p_sd15_canny.* is a ControlNet"
    ):
        FluxionSetUnionControlNetType().set_type(plain, CANNY)
    with pytest.raises(ValueError, match="Fluxion Apply Union ControlNet needs a ControlNet Union"):
        FluxionApplyUnionControlNet().apply(model, plain, EDGES, CANNY, 1.0, 1.0, 0.0, 1.0, "balanced")
    control = union()
    six = UnionControlNet(
        control.model.union_config.__class__(control.model.union_config.controlnet, num_control_types=6),
        device="meta",
    )
    first_release = type(control)("diffusion_pytorch_model.safetensors", six)
    with pytest.raises(
        ValueError, match=r"diffusion_pytorch_model.safetensors: control type tile \(6\) is beyond"
    ):
        FluxionSetUnionControlNetType().set_type(first_release, "tile")
    with pytest.raises(ValueError, match="tile and repaint need the ProMax file"):
        FluxionApplyUnionControlNet().apply(
            model, first_release, EDGES, "repaint", 1.0, 1.0, 0.0, 1.0, "balanced"
        )
    sd15, _, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    with pytest.raises(ValueError, match=r"ControlNet Union .* does not fit the model .*is for SDXL"):
        FluxionApplyControl().apply(sd15, union(CANNY), EDGES, 1.0, 0.0, 1.0, "balanced")
