"""Issue 11, part 4: broken workflows (the real examples, mutated) fail before running, naming node and input.

Every case starts from an example of `examples/workflows/` that is first shown to validate, then breaks one
thing: a cycle, a dangling link, an unknown class, a missing input, a wrong value type, a UI file without
its links table (or with a link or node missing).
"""

import copy
import json

import pytest

from nodes.demo import EXAMPLES
from nodes.runner import Runner, all_node_classes, plan
from nodes.workflow import WorkflowError, load_workflow, parse_workflow

SAMPLER, LOADER, DECODE = "5", "1", "6"  # ids in sd15_txt2img


@pytest.fixture
def prompt(robustness_folders):
    data = json.loads((EXAMPLES / "sd15_txt2img.api.json").read_text())
    assert plan(data, all_node_classes()).order  # the unbroken example validates (so the checks can fail)
    assert data[SAMPLER]["class_type"] == "FluxionSampler" and data[LOADER]["inputs"].get("ckpt_name")
    return data


@pytest.fixture
def ui(robustness_folders):
    data = json.loads((EXAMPLES / "sd15_txt2img.json").read_text())
    assert parse_workflow(copy.deepcopy(data), all_node_classes()).prompt
    return data


def fails(prompt, *fragments):
    """Running `prompt` raises a WorkflowError holding every fragment; no node ran (nothing was saved)."""
    runner = Runner()
    with pytest.raises(WorkflowError) as caught:
        runner.run(prompt)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert runner._cache == {}, "a node ran before the workflow was validated"
    return caught.value


def test_a_cycle_names_its_nodes(prompt):
    prompt["99"] = {"class_type": "FluxionVAEEncode", "inputs": {"vae": [LOADER, 2], "pixels": [DECODE, 0]}}
    prompt[SAMPLER]["inputs"]["latent_image"] = ["99", 0]
    fails(prompt, "cycle", "5 (FluxionSampler)", "99 (FluxionVAEEncode)", "6 (FluxionVAEDecode)")


def test_a_self_loop_is_a_cycle(prompt):
    prompt[SAMPLER]["inputs"]["latent_image"] = [SAMPLER, 0]
    fails(prompt, "cycle", "5 (FluxionSampler) -> 5 (FluxionSampler)")


def test_a_link_to_a_missing_node_names_the_node_and_input(prompt):
    prompt[SAMPLER]["inputs"]["model"] = ["404", 0]
    error = fails(prompt, "node 5 (FluxionSampler), input 'model'", "node 404, which is not in the workflow")
    assert (error.node_id, error.input_name) == (SAMPLER, "model")


def test_a_link_to_a_missing_output_lists_the_outputs(prompt):
    prompt[SAMPLER]["inputs"]["model"] = [LOADER, 7]
    fails(prompt, "input 'model'", "output 7 of node 1 (FluxionCheckpointLoader)", "3 output(s)")


def test_a_deleted_source_node_leaves_a_dangling_link(prompt):
    del prompt["4"]  # the empty latent
    fails(prompt, "node 5 (FluxionSampler), input 'latent_image'", "node 4, which is not in the workflow")


def test_an_unknown_node_type_is_named_with_its_id(prompt):
    prompt[SAMPLER]["class_type"] = "FluxionSamplerXL"
    error = fails(
        prompt, "node 5 (FluxionSamplerXL)", "unknown node type 'FluxionSamplerXL'", "FluxionSampler"
    )
    assert error.node_id == SAMPLER


@pytest.mark.parametrize("name", ["positive", "steps", "model"])
def test_a_missing_required_input_is_named(prompt, name):
    del prompt[SAMPLER]["inputs"][name]
    fails(prompt, f"node 5 (FluxionSampler), input '{name}'", "missing required input")


@pytest.mark.parametrize(
    ("node", "name", "value", "expected"),
    [
        (SAMPLER, "steps", "20", "expected an INT"),
        (SAMPLER, "steps", 2.5, "expected an INT"),
        (SAMPLER, "cfg", True, "expected a FLOAT"),
        (SAMPLER, "solver", "euler_x", "expected one of: 'ddim'"),
        (SAMPLER, "steps", 0, "expected an INT >= 1"),
        (SAMPLER, "denoise", 1.5, "expected a FLOAT <= 1.0"),
        (SAMPLER, "seed", -1, "expected an INT >= 0"),
        ("2", "text", 5, "expected a STRING"),
        ("2", "clip_skip", 13, "expected an INT <= 12"),
        (DECODE, "tiled", "no", "expected a BOOLEAN"),
        (LOADER, "ckpt_name", "missing.safetensors", "checkpoints model 'missing.safetensors' not found in "),
        (SAMPLER, "model", "v1-5-pruned-emaonly", "a link from a node output of type FLUXION_MODEL"),
        (SAMPLER, "positive", [LOADER, 0], "expected CONDITIONING, but output 0 of node 1"),
        (SAMPLER, "positive", [LOADER], "expected a link [node_id, output_index]"),
    ],
)
def test_a_wrong_value_type_names_node_input_and_expectation(prompt, node, name, value, expected):
    prompt[node]["inputs"][name] = value
    error = fails(prompt, f"node {node} (", f"input '{name}'", expected)
    assert (error.node_id, error.input_name) == (node, name)


def test_a_workflow_without_an_output_node_says_so(prompt):
    del prompt["7"]
    fails(prompt, "no output node")


# --- UI-format files --------------------------------------------------------------------------------------------


def load(ui, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(ui))
    return load_workflow(path, all_node_classes())


def ui_fails(ui, tmp_path, *fragments):
    with pytest.raises(WorkflowError) as caught:
        load(ui, tmp_path)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return caught.value


def test_a_ui_file_without_links_is_refused(ui, tmp_path):
    del ui["links"]
    ui_fails(ui, tmp_path, "no 'links' table", "API format")


def test_a_ui_link_missing_from_the_table_names_node_and_input(ui, tmp_path):
    sampler = next(node for node in ui["nodes"] if node["type"] == "FluxionSampler")
    link = next(entry["link"] for entry in sampler["inputs"] if entry["name"] == "positive")
    ui["links"] = [entry for entry in ui["links"] if entry[0] != link]
    ui_fails(ui, tmp_path, f"node {sampler['id']} (FluxionSampler), input 'positive'", f"link {link} is not")


def test_a_ui_link_from_a_deleted_node_names_node_and_input(ui, tmp_path):
    ui["nodes"] = [node for node in ui["nodes"] if node["type"] != "FluxionEmptyLatent"]
    ui_fails(ui, tmp_path, "(FluxionSampler), input 'latent_image'", "not in the workflow")


def test_a_ui_node_of_an_unknown_type_is_named(ui, tmp_path):
    decode = next(node for node in ui["nodes"] if node["type"] == "FluxionVAEDecode")
    decode["type"] = "VAEDecodeTiledPlus"
    ui_fails(ui, tmp_path, f"node {decode['id']} (VAEDecodeTiledPlus)", "unknown node type")


def test_a_ui_widget_value_of_the_wrong_type_fails_when_run(ui, tmp_path):
    sampler = next(node for node in ui["nodes"] if node["type"] == "FluxionSampler")
    sampler["widgets_values"][2] = "eight"  # seed, control_after_generate, steps, ...
    workflow = load(ui, tmp_path)
    fails(workflow.prompt, f"node {sampler['id']} (FluxionSampler), input 'steps'", "expected an INT")


def test_text_that_is_not_a_workflow_is_refused(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text('{"nodes": 3}')
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        load_workflow(path, all_node_classes())
    path.write_text('{\n  "1": {"class_type": "SaveImage",,}\n}')
    with pytest.raises(WorkflowError) as caught:
        load_workflow(path, all_node_classes())
    assert (
        str(caught.value)
        == f"{path}: not valid JSON at line 2, column 35: Expecting property name enclosed in double quotes"
    )
