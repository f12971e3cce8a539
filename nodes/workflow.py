"""ComfyUI workflow files: the API format, the UI format, and the conversion UI -> API.

API format: `{node_id: {"class_type": ..., "inputs": {name: value | [source_id, output_index]}}}`.
UI format (what the editor saves): `{"nodes": [...], "links": [...]}` where each node keeps its
widget values positionally in `widgets_values` and its connections in `inputs[i].link`.
The conversion follows the ComfyUI frontend: widget values line up with the widget-bearing inputs
of the node class (required then optional, in declaration order), an INT named seed/noise_seed (or
any input declaring `control_after_generate`) is followed by the value of its control widget, and
frontend-only nodes (Note, Reroute, PrimitiveNode) and muted/bypassed nodes are resolved away.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = frozenset({"seed", "noise_seed"})
MODE_MUTED = 2  # LiteGraph "never": the node and what only it feeds are left out
MODE_BYPASS = 4  # inputs pass through to the outputs of the same type
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})


class WorkflowError(Exception):
    """A workflow that cannot run; the message names the node, its class and the input."""

    def __init__(
        self,
        message: str,
        node_id: str | None = None,
        class_type: str | None = None,
        input_name: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.class_type = class_type
        self.input_name = input_name
        super().__init__(f"{where(node_id, class_type, input_name)}{message}")


def where(node_id: str | None, class_type: str | None = None, input_name: str | None = None) -> str:
    """Message prefix naming a node, its class and one of its inputs."""
    if node_id is None:
        return ""
    text = f"node {node_id}"
    if class_type is not None:
        text += f" ({class_type})"
    if input_name is not None:
        text += f", input '{input_name}'"
    return text + ": "


@dataclass(frozen=True)
class InputSpec:
    """One declared input of a node class."""

    name: str
    section: str  # "required", "optional" or "hidden"
    type: str | list[Any]  # a type name, or the list of choices of a COMBO
    options: Mapping[str, Any]

    @property
    def choices(self) -> list[Any] | None:
        """The allowed values of a COMBO input, else None."""
        if isinstance(self.type, list | tuple):
            return list(self.type)
        if self.type == "COMBO":
            return list(self.options.get("options", []))
        return None

    @property
    def type_name(self) -> str:
        """The type as ComfyUI names it ("COMBO" for a list of choices)."""
        return "COMBO" if self.choices is not None else str(self.type)

    @property
    def has_widget(self) -> bool:
        """Whether the editor shows a widget (and stores a widget value) for this input."""
        return (
            self.section != "hidden"
            and self.type_name in WIDGET_TYPES
            and not self.options.get("forceInput", False)
        )

    @property
    def control_values(self) -> int:
        """How many control-widget values follow this widget's value in `widgets_values`."""
        control = self.options.get("control_after_generate")
        if self.type_name == "INT":
            wanted = control if control is not None else self.name in SEED_NAMES
            return 1 if wanted else 0
        if self.type_name == "FLOAT":
            return 1 if control else 0
        if self.type_name == "COMBO" and control:
            return 2  # the control value and its filter-list text
        return 0


def input_specs(cls: type) -> dict[str, InputSpec]:
    """The inputs a node class declares, by name, in declaration order."""
    declared = cls.INPUT_TYPES()  # type: ignore[attr-defined]
    specs: dict[str, InputSpec] = {}
    for section in ("required", "optional", "hidden"):
        for name, entry in (declared.get(section) or {}).items():
            if section == "hidden":
                specs[name] = InputSpec(name, section, str(entry), {})
                continue
            entry = tuple(entry) if isinstance(entry, list | tuple) else (entry,)
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], Mapping) else {}
            specs[name] = InputSpec(name, section, entry[0], options)
    return specs


def widget_value_names(cls: type) -> list[str]:
    """What the editor stores in a node's `widgets_values`, in order (control widgets included)."""
    names: list[str] = []
    for spec in input_specs(cls).values():
        if spec.has_widget:
            names.append(spec.name)
            names += ["control_after_generate", "control_filter_list"][: spec.control_values]
    return names


@dataclass
class Workflow:
    """A workflow ready to run: the API prompt, plus the editor graph (from a UI file, or an API file's twin)."""

    prompt: dict[str, dict[str, Any]]
    ui: dict[str, Any] | None = None

    @property
    def extra_pnginfo(self) -> dict[str, Any] | None:
        """What ComfyUI embeds in saved images beside the prompt: the editor graph."""
        return {"workflow": self.ui} if self.ui is not None else None


class WorkflowFileError(WorkflowError):
    """A workflow path that is missing, a folder, or not readable JSON; the message starts with the path."""


def read_workflow_json(path: str | Path) -> Any:
    """The decoded JSON of a workflow file, or a WorkflowFileError naming the file and what was expected."""
    path = Path(path)
    expected = "expected a workflow .json file (editor or API format)"
    if path.is_dir():
        raise WorkflowFileError(f"{path}: is a folder, {expected}")
    if not path.exists():
        raise WorkflowFileError(f"{path}: no such file, {expected}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise WorkflowFileError(
            f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise WorkflowFileError(f"{path}: cannot be read ({error}), {expected}") from None


def _graph(prompt: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[Any, Any]]:
    """A prompt without its `_meta` titles (ComfyUI's API export titles every node, the editor file only renamed ones)."""
    return {node_id: (node.get("class_type"), node.get("inputs")) for node_id, node in prompt.items()}


def load_workflow(path: str | Path, node_classes: Mapping[str, type]) -> Workflow:
    """Read a workflow file in either format; an API file takes its editor twin (NAME.json beside
    NAME.api.json) as the graph to embed in images, when the twin converts to the same prompt."""
    path = Path(path)
    workflow = parse_workflow(read_workflow_json(path), node_classes)
    twin = path.with_name(path.name.removesuffix(".api.json") + ".json")
    if workflow.ui is None and path.name.endswith(".api.json") and twin.is_file():
        try:
            editor = parse_workflow(read_workflow_json(twin), node_classes)
        except WorkflowError:
            editor = None
        if editor is not None and editor.ui is not None and _graph(editor.prompt) == _graph(workflow.prompt):
            workflow.ui = editor.ui
        else:
            logging.getLogger(__name__).warning(
                "%s is not the editor twin of %s (it gives another prompt): images get only the prompt",
                twin,
                path.name,
            )
    return workflow


def parse_workflow(data: Any, node_classes: Mapping[str, type]) -> Workflow:
    """Accept a workflow as decoded JSON in either format."""
    if is_ui_format(data):
        return Workflow(ui_to_api(data, node_classes), ui=data)
    if isinstance(data, dict) and (
        not data or any(isinstance(v, dict) and "class_type" in v for v in data.values())
    ):
        for node_id, node in data.items():  # an API prompt with one broken node: name that node
            if not isinstance(node, dict) or "class_type" not in node:
                raise WorkflowError(
                    f"expected an object with 'class_type' and 'inputs', got {node!r:.60}", str(node_id)
                )
        prompt = {str(node_id): node for node_id, node in data.items()}
        for node_id, node in prompt.items():
            if not isinstance(node.get("inputs", {}), dict):
                raise WorkflowError("'inputs' must be an object", str(node_id), node.get("class_type"))
            node.setdefault("inputs", {})
        return Workflow(prompt)
    raise WorkflowError(
        "not a ComfyUI workflow: expected the API format {id: {class_type, inputs}} "
        "or the UI format with 'nodes' and 'links'"
    )


def is_ui_format(data: Any) -> bool:
    """Whether decoded JSON is an editor (UI) workflow."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


# ---------------------------------------------------------------------------------------------
# UI -> API


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    type: str


def _read_links(ui: dict[str, Any]) -> dict[int, _Link]:
    if "links" not in ui:
        raise WorkflowError(
            "UI workflow has 'nodes' but no 'links' table; re-export it from ComfyUI "
            "(Workflow > Export) or save it in the API format"
        )
    table = ui["links"] or []
    if not isinstance(table, list):
        raise WorkflowError(f"the 'links' table must be a list, got {type(table).__name__}")
    links: dict[int, _Link] = {}
    for position, entry in enumerate(table):
        try:
            if isinstance(entry, dict):  # schema version 1
                link_id, origin, slot = entry["id"], entry["origin_id"], entry["origin_slot"]
                kind = entry.get("type")
            else:  # [id, origin_id, origin_slot, target_id, target_slot, type]
                link_id, origin, slot, _, _, kind = entry[:6]
        except (KeyError, TypeError, ValueError):
            raise WorkflowError(
                f"the 'links' table has a malformed entry #{position}: {entry!r:.80} "
                "(expected [id, origin_id, origin_slot, target_id, target_slot, type])"
            ) from None
        if not (_is_int(link_id) and _is_id(origin) and _is_int(slot)):
            raise WorkflowError(f"the 'links' table has a malformed entry #{position}: {entry!r:.80}")
        links[link_id] = _Link(str(origin), int(slot), str(kind))
    return links


def _is_int(value: Any) -> bool:
    """A link id or slot as the editor writes them: an int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    """A node id as the editor writes it: an int, or a non-empty string."""
    return _is_int(value) or (isinstance(value, str) and value != "")


def _check_ui_nodes(ui: dict[str, Any]) -> None:
    """Every node an object with an id and a string type; its inputs objects with a name and an int link or none."""
    for position, node in enumerate(ui["nodes"]):
        if not isinstance(node, dict) or not _is_id(node.get("id")):
            raise WorkflowError(f"UI workflow node #{position} is not an object with an 'id': {node!r:.80}")
        node_id, kind = str(node["id"]), node.get("type")
        if not isinstance(kind, str):
            raise WorkflowError(f"'type' must be a string, got {kind!r:.40}", node_id)
        inputs = node.get("inputs")
        if inputs is not None and not isinstance(inputs, list):
            raise WorkflowError("'inputs' must be a list", node_id, kind)
        for entry in inputs or []:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                raise WorkflowError(f"an entry of 'inputs' has no name: {entry!r:.60}", node_id, kind)
            link = entry.get("link")
            if link is not None and not _is_int(link):
                raise WorkflowError(f"link must be a link id or null, got {link!r:.40}", node_id, kind, name)


class _UIGraph:
    def __init__(self, ui: dict[str, Any], node_classes: Mapping[str, type]) -> None:
        self.links = _read_links(ui)
        _check_ui_nodes(ui)
        self.nodes = {str(node["id"]): node for node in ui["nodes"]}
        self.node_classes = node_classes
        definitions = ui.get("definitions")
        subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
        self.subgraphs = (
            {s.get("id") for s in subgraphs or [] if isinstance(s, dict) and isinstance(s.get("id"), str)}
            if isinstance(subgraphs, list)
            else set()
        )

    def is_virtual(self, node: dict[str, Any]) -> bool:
        return node.get("type") in NOTE_TYPES | {"Reroute", "PrimitiveNode"}

    def source(self, link_id: int, node_id: str, class_type: str, input_name: str) -> Any:
        """Where a linked input takes its value: [id, slot], a literal, or None (muted away)."""
        link = self.links.get(int(link_id))
        if link is None:
            raise WorkflowError(
                f"link {link_id} is not in the 'links' table", node_id, class_type, input_name
            )
        origin = self.nodes.get(link.origin_id)
        if origin is None:
            raise WorkflowError(
                f"link {link_id} comes from node {link.origin_id}, which is not in the workflow",
                node_id,
                class_type,
                input_name,
            )
        kind = origin.get("type")
        if kind == "Reroute":
            upstream = (origin.get("inputs") or [{}])[0].get("link")
            return None if upstream is None else self.source(upstream, node_id, class_type, input_name)
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values")
            return values[0] if isinstance(values, list) and values else None
        if origin.get("mode") == MODE_MUTED:
            return None
        if origin.get("mode") == MODE_BYPASS:
            passed = self._bypassed_input(origin, link)
            return None if passed is None else self.source(passed, node_id, class_type, input_name)
        return [link.origin_id, link.origin_slot]

    def _bypassed_input(self, node: dict[str, Any], link: _Link) -> int | None:
        """The input link a bypassed node passes to output `link.origin_slot`: same slot and type first."""
        inputs = [i for i in node.get("inputs") or [] if i.get("link") is not None]
        same_slot = (node.get("inputs") or [])[link.origin_slot : link.origin_slot + 1]
        for entry in [*same_slot, *inputs]:
            if entry.get("link") is not None and entry.get("type") == link.type:
                return int(entry["link"])
        return None

    def convert_node(self, node_id: str, node: dict[str, Any]) -> dict[str, Any]:
        class_type = str(node.get("type"))
        cls = self.node_classes.get(class_type)
        if cls is None and class_type in self.subgraphs:
            raise WorkflowError(
                "subgraphs are not supported headless; unpack it in the editor (right-click > Unpack Subgraph)",
                node_id,
                class_type,
            )
        if cls is None:
            raise unknown_node_type(node_id, class_type, self.node_classes)
        specs = input_specs(cls)
        linked = {entry["name"] for entry in node.get("inputs") or [] if entry.get("link") is not None}
        inputs = _widget_inputs(node_id, class_type, specs, node.get("widgets_values"), linked)
        for entry in node.get("inputs") or []:
            if entry.get("link") is None:
                continue
            name = entry["name"]
            value = self.source(entry["link"], node_id, class_type, name)
            if value is not None:  # a muted source leaves the widget value (or nothing)
                inputs[name] = value
        converted: dict[str, Any] = {"class_type": class_type, "inputs": inputs}
        if node.get("title"):
            converted["_meta"] = {"title": node["title"]}
        return converted


def _widget_inputs(
    node_id: str,
    class_type: str,
    specs: Mapping[str, InputSpec],
    values: Any,
    linked: set[str],
) -> dict[str, Any]:
    """Map stored widget values onto the widget-bearing inputs of the node class."""
    widgets = [spec for spec in specs.values() if spec.has_widget]
    if isinstance(values, dict):  # some nodes store widgets by name
        return {spec.name: values[spec.name] for spec in widgets if spec.name in values}
    if values is not None and not isinstance(values, list):
        raise WorkflowError("'widgets_values' must be a list", node_id, class_type)
    values = values or []

    def slots(chosen: list[InputSpec]) -> int:
        return sum(1 + spec.control_values for spec in chosen)

    # The editor stores a value for every widget, linked or not; some older exporters stored only
    # the unlinked ones. Take the second reading only when the count says so.
    unlinked = [spec for spec in widgets if spec.name not in linked]
    if len(values) < slots(widgets) and len(values) == slots(unlinked):
        widgets = unlinked
    inputs: dict[str, Any] = {}
    position = 0
    for spec in widgets:
        if position < len(values):
            inputs[spec.name] = values[position]
        elif "default" in spec.options:  # a widget added after the file was saved
            inputs[spec.name] = spec.options["default"]
        elif spec.choices:
            inputs[spec.name] = spec.choices[0]
        position += 1 + spec.control_values
    return inputs


def unknown_node_type(node_id: str, class_type: str, node_classes: Mapping[str, type]) -> WorkflowError:
    """The error for a class_type that no registered node provides."""
    known = ", ".join(sorted(node_classes)) or "none"
    return WorkflowError(f"unknown node type '{class_type}'. Known node types: {known}", node_id, class_type)


def ui_to_api(ui: dict[str, Any], node_classes: Mapping[str, type]) -> dict[str, dict[str, Any]]:
    """Convert an editor workflow to the API prompt ComfyUI's frontend would queue for it."""
    graph = _UIGraph(ui, node_classes)
    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in graph.nodes.items():
        if graph.is_virtual(node) or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        prompt[node_id] = graph.convert_node(node_id, node)
    return prompt
