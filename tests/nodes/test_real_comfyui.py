"""The pack inside a real ComfyUI: every API example runs through its server (opt-in).

Set `FLUXION_COMFYUI` to a ComfyUI checkout (the folder holding `main.py`) and `FLUXION_COMFYUI_PYTHON` to
a python that runs it (defaults to this one). The test starts that ComfyUI on the CPU, on a free port of
127.0.0.1 only, with `--base-directory` pointing to a temporary folder (its models, custom_nodes, input, output,
temp and user folders) whose `custom_nodes/` links to this repository and whose `models/` and `input/` hold the
demo's tiny files (`nodes.demo.write_demo_files`). It checks that the pack imports and registers every node,
POSTs each `examples/workflows/*.api.json` to `/prompt` (freeing ComfyUI's cache first), waits for its history
entry and asserts success and the images on disk; then it stops the server. Nothing is installed or downloaded.

    FLUXION_COMFYUI=/path/to/ComfyUI FLUXION_COMFYUI_PYTHON=/path/to/venv/bin/python \\
        python -m pytest tests/nodes/test_real_comfyui.py
"""

import json
from pathlib import Path

import pytest

from tests.support.comfyui_server import comfyui_server, needs_comfyui, prepare_base

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "workflows").glob("*.api.json"))
RUN_TIMEOUT_S = 900  # one example on a 2-core CPU takes 5-80 s

pytestmark = needs_comfyui


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    from nodes.demo import write_demo_files

    base = prepare_base(tmp_path_factory.mktemp("comfyui_base"))
    write_demo_files(base / "models", base / "input")
    with comfyui_server(base) as server:
        yield server


def test_pack_imports_and_registers_every_node(comfyui):
    from nodes.registry import NODE_CLASS_MAPPINGS

    log = comfyui.log_text()
    assert "IMPORT FAILED" not in log, comfyui.log_tail()
    pack_lines = [line for line in log.splitlines() if "ComfyUI-Fluxion" in line]
    assert any("seconds" in line for line in pack_lines), f"the pack is not in the import times:\n{log}"
    object_info = comfyui.request("/object_info", timeout=60)
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(object_info))
    assert not missing, f"nodes not registered in ComfyUI: {missing}"
    for name in NODE_CLASS_MAPPINGS:
        assert object_info[name]["python_module"].endswith("ComfyUI-Fluxion"), object_info[name]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name.removesuffix(".api.json") for p in EXAMPLES])
def test_api_example_runs(comfyui, example):
    prompt = json.loads(example.read_text())
    entry = comfyui.run(prompt, example.name, RUN_TIMEOUT_S)
    saved = [node for node in prompt.values() if node["class_type"] == "SaveImage"]
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    outputs = [image for image in images if image["type"] == "output"]
    assert len(outputs) >= len(saved) > 0, entry["outputs"]
    for image in images:
        path = comfyui.base / image["type"] / image.get("subfolder", "") / image["filename"]  # output, temp
        assert path.is_file() and path.stat().st_size > 0, path
