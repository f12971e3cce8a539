"""The web extension (web/fluxion.js) run by Node.js against stand-ins of the ComfyUI frontend's `app` and
`ComfyWidgets` (skipped without `node`). The file is loaded from extensions/ComfyUI-Fluxion/, where ComfyUI serves
it, so its relative imports of ../../scripts/app.js and ../../scripts/widgets.js resolve to the stand-ins."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")

APP = """
export const registered = [];
export const app = { registerExtension: (extension) => registered.push(extension) };
"""
WIDGETS = """
export const ComfyWidgets = {
  STRING(node, name, data, app) {
    const widget = { name, value: "", options: { multiline: data[1].multiline }, inputEl: { style: {} } };
    (node.widgets ??= []).push(widget);
    return { widget };
  },
};
"""
SCRIPT = """
globalThis.requestAnimationFrame = (callback) => callback();
const { registered } = await import("./scripts/app.js");
await import("./extensions/ComfyUI-Fluxion/fluxion.js");
const [extension] = registered;
class Node {
  constructor() { this.size = [200, 80]; this.widgets = [{ name: "model", value: 1, options: {} }]; }
  computeSize() { return [240, 160]; }
  setSize(size) { this.size = size; }
}
class Other extends Node {}
await extension.beforeRegisterNodeDef(Node, { name: "FluxionInspectModel" });
await extension.beforeRegisterNodeDef(Other, { name: "KSampler" });
const node = new Node();
node.onExecuted({ text: ["first line", "second line"] });
node.onExecuted({ text: ["again"] });
const other = new Other();
const graph = {
  links: [[1, 2, 0, 3, 1, "FLUXION_CONDITIONING"], { id: 2, type: "FLUXION_CONDITIONING" }, [3, 1, 0, 2, 0, "MODEL"]],
  nodes: [{ inputs: [{ name: "positive", type: "FLUXION_CONDITIONING" }], outputs: [{ type: "LATENT" }] }],
};
await extension.beforeConfigureGraph(graph);
console.log(JSON.stringify({
  name: extension.name,
  widgets: node.widgets.map((w) => ({ name: w.name, value: w.value, serialize: w.serialize, options: w.options,
                                      readOnly: w.inputEl?.readOnly })),
  size: node.size,
  otherHasHook: Object.prototype.hasOwnProperty.call(Other.prototype, "onExecuted"),
  graph,
}));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_text_results_show_on_the_node_unsaved_and_old_types_are_renamed(tmp_path):
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(APP)
    (tmp_path / "scripts" / "widgets.js").write_text(WIDGETS)
    folder = tmp_path / "extensions" / "ComfyUI-Fluxion"
    folder.mkdir(parents=True)
    shutil.copy(REPO / "web" / "fluxion.js", folder / "fluxion.js")
    (tmp_path / "check.js").write_text(SCRIPT)
    run = subprocess.run([NODE, "check.js"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    model, text = result["widgets"]
    assert model == {"name": "model", "value": 1, "options": {}}  # undefined fields are left out by JSON
    assert text["name"] == "fluxion_text" and text["value"] == "again"  # one box, updated in place
    assert text["serialize"] is False and text["options"]["serialize"] is False and text["readOnly"] is True
    assert result["size"] == [240, 160]
    assert not result["otherHasHook"]  # core and other packs' nodes are left alone
    links, nodes = result["graph"]["links"], result["graph"]["nodes"]
    assert links[0][5] == "CONDITIONING" and links[1]["type"] == "CONDITIONING" and links[2][5] == "MODEL"
    assert nodes[0]["inputs"][0]["type"] == "CONDITIONING" and nodes[0]["outputs"][0]["type"] == "LATENT"
