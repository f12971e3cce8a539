"""The pack imports the way ComfyUI imports a custom node folder, without shadowing its `nodes`."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

COMFYUI_STYLE_IMPORT = textwrap.dedent(
    """
    import importlib, importlib.util, os, sys, types

    repo = sys.argv[1]
    assert repo not in sys.path and os.getcwd() != repo, sys.path
    comfy_nodes = types.ModuleType("nodes")  # ComfyUI's own top-level nodes.py
    comfy_nodes.NODE_CLASS_MAPPINGS = {"KSampler": object}
    sys.modules["nodes"] = comfy_nodes

    spec = importlib.util.spec_from_file_location(
        "ComfyUI-Fluxion", os.path.join(repo, "__init__.py"), submodule_search_locations=[repo]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI-Fluxion"] = pack
    spec.loader.exec_module(pack)

    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict), pack.NODE_CLASS_MAPPINGS
    assert isinstance(pack.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert set(pack.NODE_CLASS_MAPPINGS) <= set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for name in ("host", "workflow", "runner_nodes", "runner", "contract", "cli"):
        importlib.import_module("ComfyUI-Fluxion.nodes." + name)
    assert sys.modules["nodes"] is comfy_nodes, "the pack shadowed ComfyUI's nodes module"
    for top_level in ("fluxion", "foundationals", "comfyui_fluxion"):
        assert top_level not in sys.modules, top_level + " was imported as a top-level package"
    host = sys.modules["ComfyUI-Fluxion.nodes.host"]
    assert not host.is_hosted()
    print("imported", len(pack.NODE_CLASS_MAPPINGS), "nodes")
    """
)


def test_pack_imports_like_a_comfyui_custom_node(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    completed = subprocess.run(
        [sys.executable, "-c", COMFYUI_STYLE_IMPORT, str(REPO)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("imported ")


def test_root_init_exports_only_the_mappings():
    source = (REPO / "__init__.py").read_text()
    assert "from .nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS" in source
    assert "sys.path" not in source
