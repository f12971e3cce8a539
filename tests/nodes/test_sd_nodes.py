"""The SD nodes end to end on tiny weights: examples, pipeline equality, branch safety, cancel, memory."""

import gc
import json
import os

import psutil
import pytest
import torch

from foundationals.latent_diffusion.solvers import make_solver
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.contract import check_node_contract, check_workflow_contract
from nodes.demo import DEMO_LORA, SD15_CHECKPOINT, example_workflows, write_demo_files
from nodes.latent_nodes import FluxionEmptyLatent, FluxionVAEDecode
from nodes.lora_nodes import FluxionLoraLoader
from nodes.model_nodes import FluxionInspectModel, FluxionSetContext
from nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from nodes.runner import Runner, all_node_classes
from nodes.sampler_nodes import FluxionSampler
from nodes.text_nodes import FluxionCLIPTextEncode
from nodes.workflow import load_workflow, parse_workflow


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
def loaded(models):
    return FluxionCheckpointLoader().load(SD15_CHECKPOINT)


def encode(clip, text):
    return FluxionCLIPTextEncode().encode(clip, text, 1)[0]


def sample(
    model, positive, negative, latent, seed=3, steps=3, denoise=1.0, solver="dpmpp_2m", schedule="karras"
):
    return FluxionSampler().sample(
        model, positive, negative, latent, seed, steps, 6.0, solver, schedule, denoise
    )[0]


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_every_registered_node_meets_the_contract(name):
    assert check_node_contract(name, NODE_CLASS_MAPPINGS[name], NODE_DISPLAY_NAME_MAPPINGS) == []


def test_examples_are_generated_from_build_workflows_and_ui_twins_match_api(models):
    import runpy

    build = runpy.run_path(
        str(example_workflows()[0].parents[1] / "build_workflows.py"), run_name="examples"
    )["build"]
    files = build()
    for path, text in files.items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name} is stale: run python examples/build_workflows.py"
        )
    classes = all_node_classes()
    for api_path in example_workflows():
        ui_path = api_path.with_name(api_path.name.replace(".api.json", ".json"))
        api = json.loads(api_path.read_text())
        ui = json.loads(ui_path.read_text())
        ui_workflow, api_workflow = parse_workflow(ui, classes), parse_workflow(api, classes)
        assert ui_workflow.prompt == api_workflow.prompt
        assert check_workflow_contract(ui_workflow, classes) == []
        assert check_workflow_contract(api_workflow, classes) == []


def test_an_editor_example_saves_pngs_with_its_prompt_and_graph(models):
    from PIL import Image

    # Every API example runs (with its editor twin embedded) in tests/nodes/test_demo.py.
    ui_twin = load_workflow(example_workflows()[-1].with_name("sd15_txt2img.json"), all_node_classes())
    Runner().run_workflow(ui_twin)
    saved = sorted(host.output_directory().glob("*.png"))
    assert len(saved) == 1
    info = Image.open(saved[-1]).info
    assert json.loads(info["prompt"]) == ui_twin.prompt and json.loads(info["workflow"]) == ui_twin.ui


def test_sampler_node_equals_the_library_pipeline(loaded):
    model, clip, vae = loaded
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    result = sample(model, encode(clip, "a red boat"), encode(clip, "fog"), latent, seed=11, steps=4)
    image = FluxionVAEDecode().decode(vae, result, False)[0]
    library = model.model.text_to_image(
        "a red boat",
        "fog",
        width=64,
        height=64,
        steps=4,
        guidance_scale=6.0,
        seed=11,
        solver="dpmpp_2m",
        schedule="karras",
    )
    # the LATENT between the nodes is unscaled (core's convention): x / s * s rounds by an ulp at most
    assert (image - library.permute(0, 2, 3, 1)).abs().max() < 1e-6


def test_branches_from_one_loader_get_their_solo_results_in_either_order(loaded):
    model, clip, _ = loaded
    positive, negative = encode(clip, "a lighthouse"), encode(clip, "")
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    with_lora, _, _ = FluxionLoraLoader().load(model, clip, DEMO_LORA, 1.0, 1.0, True)
    with_context = FluxionSetContext().set_context(model, "fluxion_test", "value", "[1, 2]")[0]
    branches = {"plain": model, "lora": with_lora, "context": with_context}
    solo = {name: sample(wire, positive, negative, latent)["samples"] for name, wire in branches.items()}
    assert not torch.equal(solo["plain"], solo["lora"])
    for order in (["lora", "plain", "context"], ["context", "plain", "lora"]):
        for name in order:
            assert torch.equal(sample(branches[name], positive, negative, latent)["samples"], solo[name]), (
                name
            )
    assert model.patches == () and model.model.unet.provider.get_context("fluxion_test") is None


def test_lora_text_part_changes_the_conditioning_only_on_its_branch(loaded):
    model, clip, _ = loaded
    _, lora_clip, report = FluxionLoraLoader().load(model, clip, DEMO_LORA, 1.0, 1.0, True)
    assert "applied" in report
    plain = encode(clip, "a tree")[0][0]
    adapted = encode(lora_clip, "a tree")[0][0]
    assert not torch.equal(plain, adapted)
    assert torch.equal(encode(clip, "a tree")[0][0], plain)


def test_cancel_mid_sampling_leaves_the_model_as_it_was(loaded, monkeypatch):
    model, clip, _ = loaded
    with_lora = FluxionLoraLoader().load(model, clip, DEMO_LORA, 1.0, 1.0, False)[0]
    unet = model.model.unet
    tree_before, weights_before = repr(unet), {k: v.clone() for k, v in unet.state_dict().items()}
    positive, negative = encode(clip, "x"), encode(clip, "")
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    reference = sample(model, positive, negative, latent)["samples"]
    calls = {"count": 0}
    original = host.throw_if_interrupted

    def cancel_on_second_step():
        calls["count"] += 1
        if calls["count"] == 3:
            host.request_cancel()
        original()

    monkeypatch.setattr("nodes.sampler_nodes.throw_if_interrupted", cancel_on_second_step)
    with pytest.raises(host.Cancelled):
        sample(with_lora, positive, negative, latent, steps=5)
    monkeypatch.undo()
    assert repr(unet) == tree_before
    assert all(torch.equal(v, weights_before[k]) for k, v in unet.state_dict().items())
    assert torch.equal(sample(model, positive, negative, latent)["samples"], reference)


def test_inspect_model_shows_the_adapters_in_the_tree_without_keeping_them(loaded):
    model, clip, _ = loaded
    with_lora = FluxionLoraLoader().load(model, clip, DEMO_LORA, 0.5, 1.0, False)[0]
    result = FluxionInspectModel().inspect(with_lora)
    tree = result["result"][0]
    assert (
        "LoRA fluxion_demo_lora.safetensors" in tree and "(LORA)" in tree and result["ui"]["text"] == [tree]
    )
    assert "(LORA)" not in repr(model.model.unet)


def test_img2img_and_inpaint_nodes_match_library_semantics(loaded):
    from nodes.latent_nodes import FluxionVAEEncode

    model, clip, vae = loaded
    torch.manual_seed(0)
    pixels = torch.rand(1, 64, 72, 3)  # width not a multiple of 8: cropped like ComfyUI
    latent = FluxionVAEEncode().encode(vae, pixels)[0]
    assert latent["samples"].shape == (1, 4, 8, 9)
    mask = torch.zeros(1, 64, 72)
    mask[:, 16:48, 16:48] = 1
    masked = FluxionVAEEncode().encode(vae, pixels, mask)[0]
    assert masked["noise_mask"].shape == (1, 64, 72) and masked["noise_mask"].max() == 1
    positive, negative = encode(clip, "x"), encode(clip, "")
    out = sample(model, positive, negative, masked, steps=4, solver="ddim", schedule="normal")["samples"]
    keep = torch.nn.functional.interpolate(mask[:, None], size=(8, 9)) == 0
    # outside the mask the result stays on the source image's latents
    assert torch.allclose(out[keep.expand_as(out)], latent["samples"][keep.expand_as(out)], atol=1e-5)
    partial = sample(
        model, positive, negative, latent, steps=4, denoise=0.5, solver="ddim", schedule="normal"
    )
    assert partial["samples"].shape == latent["samples"].shape


def test_twenty_runs_in_one_process_do_not_grow_memory(models):
    workflow = load_workflow(next(p for p in example_workflows() if "txt2img" in p.name), all_node_classes())
    process = psutil.Process(os.getpid())
    runner = Runner()
    sizes = []
    workflow.prompt["4"]["inputs"].update(width=128, height=128)
    workflow.prompt["5"]["inputs"]["steps"] = 2
    for index in range(20):
        workflow.prompt["5"]["inputs"]["seed"] = index  # a new seed: the sampler really runs every time
        runner.run_workflow(workflow)
        gc.collect()
        sizes.append(process.memory_info().rss)
    growth = (sizes[-1] - sizes[1]) / sizes[1]
    assert growth < 0.05, f"RSS grew {growth:.1%} over 20 runs ({sizes[1] >> 20} -> {sizes[-1] >> 20} MiB)"


def test_wrong_inputs_give_clear_errors(loaded):
    model, clip, _ = loaded
    positive = encode(clip, "x")
    with pytest.raises(ValueError, match="do not fit this model"):
        sample(model, positive, positive, {"samples": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(ValueError, match="NaN"):
        sample(model, positive, positive, {"samples": torch.full((1, 4, 8, 8), float("nan"))})
    with pytest.raises(ValueError, match="JSON"):
        FluxionSetContext().set_context(model, "a", "b", "not json")
    with pytest.raises(ValueError, match="karras"):
        make_solver("ddim", 4, "karras")


def test_ui_examples_lay_nodes_out_without_overlap():
    for api_path in example_workflows():
        graph = json.loads(api_path.with_name(api_path.name.replace(".api.json", ".json")).read_text())
        boxes = [
            (n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in graph["nodes"]
        ]
        for index, a in enumerate(boxes):
            for b in boxes[index + 1 :]:
                overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                assert not overlap, f"{api_path.name}: nodes at {a[:2]} and {b[:2]} overlap"
