"""Tiled Diffusion and Hires Fix on the demo's tiny models: the examples headless, stacking on LoRA + ControlNet
+ IP-Adapter, exact restoring of the model, branch safety, the ControlNet hint cut per tile, clear errors."""

from __future__ import annotations

import copy
import runpy

import pytest
import torch

from foundationals.latent_diffusion.adapters.controlnet import model as controlnet_model
from foundationals.latent_diffusion.resizing import resize_hint
from foundationals.latent_diffusion.tiling import TileLayout
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.control_nodes import FluxionApplyControl, FluxionControlLoader
from nodes.core_model_nodes import FluxionToCoreModel
from nodes.demo import DEMO_CONTROLNET, DEMO_LORA, EXAMPLES, SD15_CHECKPOINT, write_demo_files
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.lora_nodes import FluxionRegionalLora
from nodes.runner import Runner
from nodes.sampler_nodes import FluxionSampler
from nodes.text_nodes import FluxionTextEncode
from nodes.upscale_nodes import FluxionHiresFix, FluxionTiledDiffusion, upscale_latent

HINT = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(4))


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


@pytest.mark.parametrize("example", ["sd15_hires_fix", "sd15_tiled_upscale"])
def test_upscale_examples_run_headless(models, example):
    prompt = workflow(example)
    for node in prompt.values():  # smaller, for the CPU: still several tiles a step in the tiled example
        if node["class_type"] == "FluxionEmptyLatent":
            node["inputs"].update(width=128, height=128)
        if node["class_type"] == "FluxionTiledDiffusion":
            node["inputs"].update(tile_width=128, tile_height=128, overlap=32)
    Runner().run(prompt)
    assert len(list(host.output_directory().glob("*.png"))) == 1


def encode(clip):  # noqa: ANN001, ANN201
    return (
        FluxionTextEncode().encode(clip, "a lighthouse on a cliff")[0],
        FluxionTextEncode().encode(clip, "fog")[0],
    )


def sample(model, clip, latent, steps: int = 3, denoise: float = 1.0):  # noqa: ANN001, ANN201
    positive, negative = encode(clip)
    return FluxionSampler().sample(
        model, positive, negative, latent, 3, steps, 6.0, "euler", "normal", denoise
    )[0]["samples"]


def stacked(with_tiles: bool, tile: int = 64) -> dict:
    """LoRA -> ControlNet -> IP-Adapter (the ip_adapter_controlnet example) on a 128x96 latent, tiled or not."""
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
    prompt["12"]["inputs"].update(width=128, height=96)
    prompt["13"]["inputs"].update(steps=3)
    if with_tiles:
        prompt["21"] = {
            "class_type": "FluxionTiledDiffusion",
            "inputs": {
                "model": ["11", 0],
                "tile_width": tile,
                "tile_height": tile,
                "overlap": 16,
                "blend": "gaussian",
            },
        }
        prompt["13"]["inputs"]["model"] = ["21", 0]
    return prompt


def test_tiles_stack_on_lora_controlnet_ip_adapter_and_the_model_comes_back_exactly(models):
    plain = Runner().run(stacked(False), outputs=["13"]).outputs["13"][0]["samples"]
    sd = FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0].model
    tree, contexts = repr(sd.unet), sorted(sd.unet.provider.contexts)
    weights = {name: value.clone() for name, value in sd.unet.state_dict().items()}
    tiled = Runner().run(stacked(True), outputs=["13"]).outputs["13"][0]["samples"]
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()
    assert (tiled - plain).abs().max() > 1e-3  # 6 tiles of 8x8 cells on a 12x16 latent: not the plain run
    assert repr(sd.unet) == tree and sorted(sd.unet.provider.contexts) == contexts
    assert all(torch.equal(value, weights[name]) for name, value in sd.unet.state_dict().items())
    again = Runner().run(stacked(False), outputs=["13"]).outputs["13"][0]["samples"]
    assert torch.equal(again, plain)
    # one tile covering the whole latent: the ControlNet hint, IP-Adapter tokens and LoRA run as untiled
    whole = Runner().run(stacked(True, tile=128), outputs=["13"]).outputs["13"][0]["samples"]
    assert torch.equal(whole, plain)


def test_the_controlnet_hint_is_cut_per_tile(models):
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    control = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    latent = FluxionEmptyLatent().generate(128, 96, 1)[0]
    controlled = FluxionApplyControl().apply(model, control, HINT, 1.0, 0.0, 1.0, "balanced")[0]
    tiled = FluxionTiledDiffusion().apply(controlled, 64, 64, 16, "uniform")[0]
    # the hint's left and right halves swapped: each tile runs on its own part of the hint (cut per tile, not the
    # whole hint squeezed onto every tile), so the swap moves what each tile sees and the result changes
    swapped = torch.cat([HINT[:, :, 64:], HINT[:, :, :64]], dim=2)
    tiled_swapped = FluxionTiledDiffusion().apply(
        FluxionApplyControl().apply(model, control, swapped, 1.0, 0.0, 1.0, "balanced")[0],
        64,
        64,
        16,
        "uniform",
    )[0]
    one, other = sample(tiled, clip, latent), sample(tiled_swapped, clip, latent)
    assert torch.isfinite(one).all() and (one - other).abs().max() > 1e-4
    # the tile at cells (top 4, left 8) of the 12x16 latent gets the hint's pixels under it, resized once
    cut = {}
    original = controlnet_model._tile_of

    def recording(image, window, factor):  # noqa: ANN001, ANN202
        cut[window[0]] = original(image, window, factor)
        return cut[window[0]]

    controlnet_model._tile_of = recording
    try:
        sample(tiled, clip, latent, steps=1)
    finally:
        controlnet_model._tile_of = original
    assert set(cut) == set(TileLayout.from_pixels(64, 64, 16, 8).windows(12, 16))
    assert torch.equal(cut[(8, 8, 4, 8)], resize_hint(HINT, 96, 128)[..., 32:96, 64:128])


def test_branches_with_and_without_tiles_get_their_solo_results(models):
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    latent = FluxionEmptyLatent().generate(128, 96, 1)[0]
    branches = {
        "plain": model,
        "uniform": FluxionTiledDiffusion().apply(model, 64, 64, 16, "uniform")[0],
        "gaussian": FluxionTiledDiffusion().apply(model, 64, 64, 32, "gaussian")[0],
    }
    solo = {name: sample(wire, clip, latent) for name, wire in branches.items()}
    assert all((solo[name] - solo["plain"]).abs().max() > 1e-4 for name in ("uniform", "gaussian"))
    for name in reversed(list(branches)):
        assert torch.equal(sample(branches[name], clip, latent), solo[name]), name
    assert model.patches == () and len(branches["uniform"].patches) == 1


def test_hires_fix_is_latent_upscale_by_then_the_sampler(models):
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    positive, negative = encode(clip)
    first = {"samples": sample(model, clip, FluxionEmptyLatent().generate(64, 64, 1)[0])}
    result = FluxionHiresFix().upscale(
        model, positive, negative, first, 1.5, "bilinear", 5, 6, 6.0, "euler", "normal", 0.5
    )[0]["samples"]
    assert result.shape == (1, 4, 12, 12)
    # core LatentUpscaleBy: round(side * scale_by), torch's interpolate with the method as its mode
    upscaled = {"samples": torch.nn.functional.interpolate(first["samples"], size=(12, 12), mode="bilinear")}
    chain = FluxionSampler().sample(model, positive, negative, upscaled, 5, 6, 6.0, "euler", "normal", 0.5)[0]
    assert torch.equal(result, chain["samples"])
    assert (result - upscaled["samples"]).abs().max() > 1e-3  # the second pass changed the upscaled latent


def test_clear_errors(models):
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    with pytest.raises(
        ValueError, match=r"Fluxion Tiled Diffusion: tiling: the overlap \(512 px\) must be smaller"
    ):
        FluxionTiledDiffusion().apply(model, 512, 512, 512, "uniform")
    tiled = FluxionTiledDiffusion().apply(model, 64, 64, 16, "uniform")[0]
    with pytest.raises(ValueError, match="already samples in tiles"):
        FluxionTiledDiffusion().apply(tiled, 64, 64, 16, "uniform")
    with pytest.raises(ValueError, match="samples in tiles .* core samplers do not run"):
        FluxionToCoreModel().convert(tiled)
    regional = FluxionRegionalLora().load(tiled, DEMO_LORA, 0.7, 0.0, 1.0, "blend", torch.ones(1, 64, 64))[0]
    with pytest.raises(ValueError, match="tiled sampling cannot be combined with masked adapters"):
        sample(regional, clip, FluxionEmptyLatent().generate(64, 64, 1)[0])
    with pytest.raises(ValueError, match="unknown latent upscale method 'bislerp'"):
        upscale_latent({"samples": torch.zeros(1, 4, 8, 8)}, "bislerp", 2.0)
    with pytest.raises(ValueError, match="LATENT with"):
        upscale_latent({"samples": torch.zeros(4, 8, 8)}, "bilinear", 2.0)
