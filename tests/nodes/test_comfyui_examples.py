"""The examples that need ComfyUI itself (examples/comfyui_workflows/): checked here, run in test_real_comfyui_core.

Headless they cannot run (core loaders and KSampler are ComfyUI's), so this checks what can be checked without
ComfyUI: the files are generated from examples/build_comfyui_workflows.py, the graph validates (every input
given, links of matching types) against our node classes plus the core nodes' declared inputs, our nodes keep
the node contract, the editor twin converts back to the API prompt, and widget counts are the editor's.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from nodes.contract import _check_widget_values, check_node_contract
from nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from nodes.runner import all_node_classes, plan
from nodes.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "examples" / "build_comfyui_workflows.py"


def _builder():
    spec = importlib.util.spec_from_file_location("build_comfyui_workflows", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILDER = _builder()
EXAMPLES = sorted(BUILDER.FOLDER.glob("*.api.json"))


def test_the_files_are_up_to_date():
    files = BUILDER.build()
    assert sorted(files) == sorted(
        [*EXAMPLES, *(p.with_name(p.name.replace(".api.json", ".json")) for p in EXAMPLES)]
    )
    for path, text in files.items():
        assert path.read_text() == text, (
            f"{path.name} is stale: run python examples/build_comfyui_workflows.py"
        )


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_mixed_example_validates_and_keeps_the_contract(path, headless_folders):
    (headless_folders["models"] / "loras").mkdir()
    (headless_folders["models"] / "loras" / BUILDER.LORA).write_bytes(b"")  # the combo lists names only
    classes = {**all_node_classes(), **BUILDER.CORE_NODES}
    workflow = load_workflow(path, classes)
    assert workflow.ui is not None, "the editor twin must convert to the same prompt"
    plan(workflow.prompt, classes)
    used = {node["class_type"] for node in workflow.prompt.values()}
    ours = sorted(used & set(NODE_CLASS_MAPPINGS))
    assert ours and set(used) - set(ours) <= set(BUILDER.CORE_NODES) | {"SaveImage"}
    for name in ours:
        assert check_node_contract(name, NODE_CLASS_MAPPINGS[name], NODE_DISPLAY_NAME_MAPPINGS) == []
    problems = [p for node in workflow.ui["nodes"] for p in _check_widget_values(node, classes[node["type"]])]
    assert problems == []
    assert json.loads(path.read_text()) == workflow.prompt
