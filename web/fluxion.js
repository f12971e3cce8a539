// ComfyUI-Fluxion's web extension (served because the pack's __init__.py sets WEB_DIRECTORY).
// 1. A Fluxion node that returns text in `ui.text` (Fluxion Inspect Model's tree, the LoRA nodes' reports) shows it
//    on the node itself, in a read-only text box that is neither saved in the workflow nor sent with the prompt.
// 2. Workflows saved when the pack had its own conditioning type (FLUXION_CONDITIONING) load with core's
//    CONDITIONING on their links and slots, so they connect to core conditioning nodes.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const TEXT_WIDGET = "fluxion_text";
const RENAMED_TYPES = { FLUXION_CONDITIONING: "CONDITIONING" };

function showText(node, lines) {
  const text = (Array.isArray(lines) ? lines : [lines]).join("\n");
  let widget = node.widgets?.find((candidate) => candidate.name === TEXT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, TEXT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not in the saved widgets_values
    widget.options ??= {};
    widget.options.serialize = false; // not an input of the queued prompt (options may hold the DOM getters)
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.85;
    }
  }
  widget.value = text;
  requestAnimationFrame(() => {
    const wanted = node.computeSize();
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
    node.setDirtyCanvas?.(true, true);
  });
}

function renameTypes(graphData) {
  const renamed = (type) => RENAMED_TYPES[type] ?? type;
  for (const link of graphData?.links ?? []) {
    if (Array.isArray(link)) link[5] = renamed(link[5]);
    else if (link && typeof link === "object") link.type = renamed(link.type);
  }
  for (const node of graphData?.nodes ?? []) {
    for (const slot of [...(node.inputs ?? []), ...(node.outputs ?? [])]) {
      if (slot && typeof slot === "object") slot.type = renamed(slot.type);
    }
  }
  for (const subgraph of graphData?.definitions?.subgraphs ?? []) renameTypes(subgraph);
}

app.registerExtension({
  name: "Fluxion.NodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("Fluxion")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text !== undefined) showText(this, message.text);
    };
  },
  async beforeConfigureGraph(graphData) {
    renameTypes(graphData);
  },
});
