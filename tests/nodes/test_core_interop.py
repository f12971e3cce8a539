"""Core's LATENT and CONDITIONING conventions at the nodes' boundary, on tiny weights and ComfyUI-shaped values.

A core LATENT holds the unscaled VAE latent (comfy/latent_formats.py scales inside the model) with optional
`noise_mask` and `batch_index`; a core CONDITIONING is a list of [tensor, options] (comfy/sd.py
`encode_from_tokens_scheduled`, comfy_extras/nodes_clip_sdxl.py, nodes.py Conditioning* nodes). The values built
here are plain lists, dicts and tensors, as those nodes build them.
"""

import json
from pathlib import Path

import pytest
import torch

from foundationals.latent_diffusion.sampling import draw_noise
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.core_stand_ins import (
    ConditioningCombine,
    ConditioningSetArea,
    ConditioningSetMask,
    ConditioningSetTimestepRange,
    EmptyLatentImage,
    LatentUpscale,
    SetLatentNoiseMask,
)
from nodes.core_types import conditioning_entries
from nodes.demo import DEMO_LORA, SD15_CHECKPOINT, SDXL_CHECKPOINT, write_demo_files
from nodes.latent_nodes import FluxionVAEDecode, FluxionVAEEncode
from nodes.lora_nodes import FluxionLoraLoader
from nodes.runner import Runner, all_node_classes
from nodes.sampler_nodes import FluxionSampler
from nodes.text_nodes import FluxionCLIPTextEncode, FluxionCLIPTextEncodeSDXL, FluxionTextEncode
from nodes.workflow import WorkflowError, load_workflow

REPO = Path(__file__).resolve().parents[2]
SAVED = Path(__file__).parent / "saved_workflows"  # editor/API files as the pack wrote them before core types
SIZES = dict(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64)


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root


@pytest.fixture
def models(demo_folders, monkeypatch):
    monkeypatch.setattr(host, "_models_dir", demo_folders / "models")
    monkeypatch.setattr(host, "_input_dir", demo_folders / "input")
    return demo_folders


@pytest.fixture
def sd15(models):
    return FluxionCheckpointLoader().load(SD15_CHECKPOINT)


@pytest.fixture
def sdxl(models):
    return FluxionCheckpointLoader().load(SDXL_CHECKPOINT)


def sample(
    model,
    positive,
    negative,
    latent,
    seed=3,
    steps=3,
    cfg=5.0,
    solver="euler",
    schedule="normal",
    denoise=1.0,
):
    return FluxionSampler().sample(
        model, positive, negative, latent, seed, steps, cfg, solver, schedule, denoise
    )[0]


def encode(clip, text):
    return FluxionCLIPTextEncode().encode(clip, text, 1)[0]


# --- LATENT -------------------------------------------------------------------------------------------------------


def test_latents_on_the_wire_are_unscaled_as_core_keeps_them(sd15):
    model, _, vae = sd15
    torch.manual_seed(0)
    pixels = torch.rand(1, 64, 64, 3)
    latent = FluxionVAEEncode().encode(vae, pixels)[0]
    scaled = model.model.encode_image(pixels.permute(0, 3, 1, 2))
    factor = model.model.autoencoder.scaling_factor
    assert (latent["samples"] - scaled / factor).abs().max() < 1e-6
    decoded = FluxionVAEDecode().decode(vae, latent)[0]
    library = model.model.decode_latents(scaled).permute(0, 2, 3, 1)
    assert (decoded - library).abs().max() < 1e-6


def test_core_latent_nodes_feed_the_sampler_and_it_keeps_their_keys(sd15):
    model, clip, _ = sd15
    positive, negative = encode(clip, "a boat"), encode(clip, "fog")
    empty = EmptyLatentImage().generate(64, 64, 1)[0]
    first = sample(model, positive, negative, empty)
    upscaled = LatentUpscale().upscale(first, "bilinear", 96, 96, "disabled")[0]
    assert upscaled["samples"].shape == (1, 4, 12, 12)
    mask = torch.zeros(1, 96, 96)
    mask[:, :, 48:] = 1.0
    masked = SetLatentNoiseMask().set_mask(upscaled, mask)[0]
    second = sample(model, positive, negative, masked, denoise=0.5)
    assert torch.equal(second["noise_mask"], masked["noise_mask"])  # core's KSampler keeps the other keys too
    kept = torch.nn.functional.interpolate(mask[:, None], size=(12, 12), mode="bilinear") == 0
    assert torch.allclose(
        second["samples"][kept.expand_as(second["samples"])],
        upscaled["samples"][kept.expand_as(second["samples"])],
        atol=1e-5,
    )


def test_batch_index_gives_each_item_its_draw_of_the_seed_as_comfyui_prepare_noise():
    generator = torch.Generator().manual_seed(9)
    noise = draw_noise((3, 4, 8, 8), generator, [2, 0, 2])
    reference = torch.Generator().manual_seed(9)
    draws = [torch.randn((1, 4, 8, 8), generator=reference) for _ in range(3)]
    assert torch.equal(noise, torch.cat([draws[2], draws[0], draws[2]]))


def test_the_sampler_honours_batch_index(sd15):
    model, clip, _ = sd15
    positive, negative = encode(clip, "a boat"), encode(clip, "fog")
    empty = EmptyLatentImage().generate(64, 64, 1)[0]
    plain = sample(model, positive, negative, empty)["samples"]
    assert torch.equal(sample(model, positive, negative, dict(empty, batch_index=[0]))["samples"], plain)
    second = sample(model, positive, negative, dict(empty, batch_index=[1]))["samples"]
    assert not torch.allclose(second, plain)
    with pytest.raises(ValueError, match="batch_index"):
        sample(model, positive, negative, dict(empty, batch_index=[0, 1]))


# --- CONDITIONING -------------------------------------------------------------------------------------------------


def test_text_encoders_write_core_conditioning(sd15, sdxl):
    sd15_entry = encode(sd15[1], "a boat")
    assert isinstance(sd15_entry, list) and len(sd15_entry) == 1 and sd15_entry[0][1] == {}
    assert sd15_entry[0][0].shape == (1, 77, sd15[0].model.unet.config.context_dim)
    plain = encode(sdxl[1], "a boat")
    assert set(plain[0][1]) == {"pooled_output"}
    sized = FluxionCLIPTextEncodeSDXL().encode(sdxl[1], "a boat", 1, **SIZES)[0]
    assert sized[0][1].keys() == {"pooled_output", *SIZES} and sized[0][1]["width"] == 64
    assert torch.equal(sized[0][0], plain[0][0]) and torch.equal(
        sized[0][1]["pooled_output"], plain[0][1]["pooled_output"]
    )
    with pytest.raises(ValueError, match="SD1.5"):
        FluxionCLIPTextEncodeSDXL().encode(sd15[1], "a boat", 1, **SIZES)


def test_sdxl_sizes_default_to_the_latent_as_core_fills_them(sdxl):
    model, clip, _ = sdxl
    latent = EmptyLatentImage().generate(64, 64, 1)[0]
    negative = encode(clip, "")
    plain = sample(model, encode(clip, "a boat"), negative, latent)["samples"]
    explicit = FluxionCLIPTextEncodeSDXL().encode(clip, "a boat", 1, **SIZES)[0]
    explicit_negative = FluxionCLIPTextEncodeSDXL().encode(clip, "", 1, **SIZES)[0]
    assert torch.equal(sample(model, explicit, explicit_negative, latent)["samples"], plain)
    other = FluxionCLIPTextEncodeSDXL().encode(clip, "a boat", 1, **dict(SIZES, width=1024, height=768))[0]
    assert not torch.allclose(sample(model, other, explicit_negative, latent)["samples"], plain)
    (entry,) = conditioning_entries(other, "positive", True, 64, 64)
    assert entry.conditioning.time_ids.tolist() == [[768.0, 1024.0, 0.0, 0.0, 64.0, 64.0]]
    (defaults,) = conditioning_entries(
        [[other[0][0], {"pooled_output": other[0][1]["pooled_output"], "width": 512}]],
        "positive",
        True,
        64,
        96,
    )
    assert defaults.conditioning.time_ids.tolist() == [
        [64.0, 512.0, 0.0, 0.0, 64.0, 512.0]
    ]  # target follows width


def test_keys_the_sampler_cannot_honour_are_refused_by_name(sd15):
    model, clip, _ = sd15
    latent = EmptyLatentImage().generate(64, 64, 1)[0]
    positive = encode(clip, "a boat")
    for key, hint in (
        ("control", "Fluxion Apply ControlNet"),
        ("gligen", "GLIGEN"),
        ("hooks", "LoRA"),
        ("my_key", "does not support"),
    ):
        tagged = [[positive[0][0], {key: object()}]]
        with pytest.raises(ValueError, match=key) as caught:
            sample(model, positive, tagged, latent)
        assert hint in str(caught.value) and "negative conditioning (entry 1 of 1)" in str(caught.value)
    none_valued = [
        [positive[0][0], {"control": None, "pooled_output": None}]
    ]  # a key set to nothing asks nothing
    sample(model, none_valued, positive, latent)
    with pytest.raises(ValueError, match="CONDITIONING"):
        sample(model, [], positive, latent)


def test_core_conditioning_nodes_change_the_sample_as_their_keys_say(sd15):
    model, clip, _ = sd15
    latent = EmptyLatentImage().generate(64, 64, 1)[0]
    base, other, negative = encode(clip, "a boat"), encode(clip, "a castle"), encode(clip, "fog")
    plain = sample(model, base, negative, latent)["samples"]
    whole = ConditioningSetArea().append(base, 64, 64, 0, 0, 1.0)[0]  # the whole latent: the same prediction
    assert (sample(model, whole, negative, latent)["samples"] - plain).abs().max() < 1e-4
    halves = ConditioningCombine().combine(base, ConditioningSetArea().append(other, 64, 32, 0, 32, 1.0)[0])[
        0
    ]
    regional = sample(model, halves, negative, latent)["samples"]
    assert (regional - plain).abs().max() > 1e-3
    never = ConditioningSetTimestepRange().set_range(other, 0.0, 0.0)[0]  # acts on no step
    combined = ConditioningCombine().combine(base, never)[0]
    assert (sample(model, combined, negative, latent)["samples"] - plain).abs().max() < 1e-4
    empty_mask = ConditioningSetMask().append(other, torch.zeros(1, 64, 64), "default", 1.0)[0]
    masked = ConditioningCombine().combine(base, empty_mask)[0]
    assert (sample(model, masked, negative, latent)["samples"] - plain).abs().max() < 1e-4


def test_areas_with_masked_adapters_are_refused(sd15):
    from nodes.lora_nodes import FluxionRegionalLora

    model, clip, _ = sd15
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1
    regional, _ = FluxionRegionalLora().load(model, DEMO_LORA, 1.0, 0.0, 1.0, "blend", mask)
    area = ConditioningSetArea().append(encode(clip, "a boat"), 64, 32, 0, 0, 1.0)[0]
    with pytest.raises(ValueError, match="area"):
        sample(regional, area, encode(clip, "fog"), EmptyLatentImage().generate(64, 64, 1)[0])


# --- saved workflows, UI --------------------------------------------------------------------------------------------


def test_workflows_saved_with_fluxion_conditioning_still_run(models, tmp_path, monkeypatch):
    monkeypatch.setattr(host, "_output_dir", tmp_path)
    classes = all_node_classes()
    editor = json.loads((SAVED / "sd15_txt2img.json").read_text())
    assert any(link[5] == "FLUXION_CONDITIONING" for link in editor["links"])
    for name in ("sd15_txt2img.json", "sdxl_txt2img.json", "sdxl_txt2img.api.json"):
        workflow = load_workflow(SAVED / name, classes)
        assert {node["class_type"] for node in workflow.prompt.values()} >= {
            "FluxionTextEncode",
            "FluxionSampler",
        }
        for node in workflow.prompt.values():  # small and short: the graph is what is checked
            if node["class_type"] == "FluxionEmptyLatent":
                node["inputs"].update(width=64, height=64)
            if node["class_type"] == "FluxionSampler":
                node["inputs"]["steps"] = 2
        Runner().run_workflow(workflow)
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_the_legacy_text_encode_gives_what_the_sdxl_node_gives(sdxl):
    model, clip, _ = sdxl
    legacy = FluxionTextEncode().encode(clip, "a boat", 1, **dict(SIZES, width=512))[0]
    current = FluxionCLIPTextEncodeSDXL().encode(clip, "a boat", 1, **dict(SIZES, width=512))[0]
    assert legacy[0][1].keys() == current[0][1].keys() and torch.equal(legacy[0][0], current[0][0])
    assert all(legacy[0][1][key] == current[0][1][key] for key in SIZES)


def test_lora_reports_are_shown_on_the_node_and_the_web_extension_is_declared(sd15, models):
    model, clip, _ = sd15
    node = FluxionLoraLoader()
    shown = getattr(node, node.FUNCTION)(
        model=model, clip=clip, lora_name=DEMO_LORA, strength_model=1.0, strength_clip=1.0, fuse=True
    )
    assert shown["ui"]["text"] == [shown["result"][2]] and "applied" in shown["result"][2]
    assert 'WEB_DIRECTORY = "./web"' in (REPO / "__init__.py").read_text()
    script = (REPO / "web" / "fluxion.js").read_text()
    assert "registerExtension" in script and "message?.text" in script and "FLUXION_CONDITIONING" in script


def test_core_nodes_needing_comfyui_models_are_refused_headless_before_anything_runs(models):
    workflow = load_workflow(
        REPO / "examples" / "workflows" / "in_comfyui" / "sd15_core_clip_and_vae.api.json", all_node_classes()
    )
    with pytest.raises(WorkflowError, match="CheckpointLoaderSimple.*runs only inside ComfyUI"):
        Runner().run_workflow(workflow)


def test_in_comfyui_examples_have_matching_twins_and_keep_the_contract(models):
    from nodes.contract import check_workflow_contract
    from nodes.workflow import parse_workflow

    classes = all_node_classes()
    folder = REPO / "examples" / "workflows" / "in_comfyui"
    for api_path in sorted(folder.glob("*.api.json")):
        api = parse_workflow(json.loads(api_path.read_text()), classes)
        ui = parse_workflow(
            json.loads(api_path.with_name(api_path.name.replace(".api.json", ".json")).read_text()), classes
        )
        assert ui.prompt == api.prompt
        assert check_workflow_contract(ui, classes) == [] and check_workflow_contract(api, classes) == []
