"""The guidance nodes on the demo's tiny models: examples headless, stacking on LoRA + ControlNet + IP-Adapter,
exact ejection, branch safety, clear errors."""

from __future__ import annotations

import copy
import runpy

import pytest
import torch

from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.demo import EXAMPLES, SD15_CHECKPOINT, write_demo_files
from nodes.guidance_nodes import (
    FluxionCFGCutoff,
    FluxionFreeUV2,
    FluxionPerturbedAttentionGuidance,
    FluxionRescaleCFG,
    FluxionSelfAttentionGuidance,
)
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.runner import Runner
from nodes.sampler_nodes import FluxionSampler
from nodes.text_nodes import FluxionTextEncode

SIZE = dict(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)
GUIDANCE = {  # node id -> (class, inputs), chained after the model input
    "21": ("FluxionFreeUV2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2, "blocks": "channels"}),
    "22": (
        "FluxionPerturbedAttentionGuidance",
        {"scale": 2.0, "layers": "mid, up_blocks.1", "adaptive_scale": 0.0},
    ),
    "23": ("FluxionSelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}),
    "24": ("FluxionRescaleCFG", {"multiplier": 0.7, "space": "v"}),
    "25": ("FluxionCFGCutoff", {"cutoff": 0.5}),
}


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root


@pytest.fixture
def models(demo_folders, monkeypatch, tmp_path):
    monkeypatch.setattr(host, "_models_dir", demo_folders / "models")
    monkeypatch.setattr(host, "_input_dir", demo_folders / "input")
    monkeypatch.setattr(host, "_output_dir", tmp_path)
    return demo_folders


def workflow(name: str) -> dict:
    build = runpy.run_path(str(EXAMPLES.parent / "build_workflows.py"), run_name="examples")
    return copy.deepcopy(build[name]())


@pytest.mark.parametrize("example", ["sd15_guidance", "sdxl_guidance"])
def test_guidance_examples_run_headless(models, example):
    prompt = workflow({"sd15_guidance": "guidance", "sdxl_guidance": "sdxl_guidance"}[example])
    for node in prompt.values():
        if node["class_type"] == "FluxionEmptyLatent":
            node["inputs"].update(width=64, height=64)
    Runner().run(prompt)
    assert len(list(host.output_directory().glob("*.png"))) == 1


def stacked(with_guidance: bool) -> dict:
    """LoRA -> ControlNet -> IP-Adapter (the ip_adapter_controlnet example), then every guidance node."""
    prompt = workflow("ip_adapter_controlnet")
    prompt["20"] = {
        "class_type": "FluxionLoraLoader",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "lora_name": "fluxion_demo_lora.safetensors",
            "strength_model": 0.8,
            "strength_clip": 1.0,
            "fuse": False,
        },
    }
    prompt["7"]["inputs"]["model"] = ["20", 0]
    prompt["12"]["inputs"].update(width=64, height=64)
    prompt["13"]["inputs"].update(steps=4)
    model = ["11", 0]
    if with_guidance:
        for node_id, (kind, inputs) in GUIDANCE.items():
            prompt[node_id] = {"class_type": kind, "inputs": {"model": model, **inputs}}
            model = [node_id, 0]
    prompt["13"]["inputs"]["model"] = model
    return prompt


def test_guidance_stacks_on_lora_controlnet_ip_adapter_and_the_model_comes_back_exactly(models):
    plain = Runner().run(stacked(False), outputs=["13"]).outputs["13"][0]["samples"]
    sd = FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0].model
    tree, contexts = repr(sd.unet), sorted(sd.unet.provider.contexts)
    guided = Runner().run(stacked(True), outputs=["13"]).outputs["13"][0]["samples"]
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
    assert repr(sd.unet) == tree and sorted(sd.unet.provider.contexts) == contexts
    again = Runner().run(stacked(False), outputs=["13"]).outputs["13"][0]["samples"]
    assert torch.equal(again, plain)


def sample(model, clip, latent, steps: int = 3):  # noqa: ANN001, ANN201
    positive = FluxionTextEncode().encode(clip, "a lighthouse", 1, **SIZE)[0]
    negative = FluxionTextEncode().encode(clip, "fog", 1, **SIZE)[0]
    return FluxionSampler().sample(model, positive, negative, latent, 3, steps, 6.0, "euler", "normal", 1.0)[
        0
    ]["samples"]


def test_branches_with_and_without_guidance_get_their_solo_results(models):
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    pag = FluxionPerturbedAttentionGuidance().apply(model, 3.0, "mid")[0]
    branches = {
        "plain": model,
        "pag": pag,
        "sag": FluxionSelfAttentionGuidance().apply(model, 0.5, 2.0)[0],
        "freeu": FluxionFreeUV2().apply(model, 1.3, 1.4, 0.9, 0.2)[0],
        "rescale_cutoff": FluxionCFGCutoff().apply(FluxionRescaleCFG().apply(pag, 0.7, "v")[0], 0.5)[0],
    }
    solo = {name: sample(wire, clip, latent) for name, wire in branches.items()}
    assert all((solo[name] - solo["plain"]).abs().max() > 1e-4 for name in branches if name != "plain")
    for name in reversed(list(branches)):
        assert torch.equal(sample(branches[name], clip, latent), solo[name]), name
    assert model.patches == () and len(pag.patches) == 1


def test_pag_layers_that_match_nothing_name_the_node_input_and_the_layers_there_are(models):
    model = FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0]
    with pytest.raises(
        ValueError, match=r"input 'layers'.*no self-attention layer matches 'middle_block'.*mid_block"
    ):
        FluxionPerturbedAttentionGuidance().apply(model, 3.0, "middle_block")
    with pytest.raises(ValueError, match="'layers' is empty"):
        FluxionPerturbedAttentionGuidance().apply(model, 3.0, " , ")
