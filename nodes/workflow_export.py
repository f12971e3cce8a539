"""API-format prompt -> editor (UI-format) graph, laid out left to right by dependency depth.

Used to write the UI twins of the example workflows; `workflow.ui_to_api` converts them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .workflow import input_specs, widget_value_names

COLUMN_WIDTH, NODE_WIDTH = 380, 340
TITLE_HEIGHT, GAP = 30, 40
IMAGE_NODES = ("LoadImage", "SaveImage", "PreviewImage")  # they grow by their image preview
PREVIEW_HEIGHT = 260


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def _depths(prompt: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    depths: dict[str, int] = {}

    def depth(node_id: str) -> int:
        if node_id not in depths:
            links = [v for v in prompt[node_id]["inputs"].values() if _is_link(v)]
            depths[node_id] = 1 + max((depth(link[0]) for link in links), default=-1)
        return depths[node_id]

    for node_id in prompt:
        depth(node_id)
    return depths


def api_to_ui(prompt: Mapping[str, Mapping[str, Any]], node_classes: Mapping[str, type]) -> dict[str, Any]:
    """The editor graph of an API prompt (node ids must be integers as strings)."""
    depths = _depths(prompt)
    ordered = sorted(prompt.items(), key=lambda item: (depths[item[0]], int(item[0])))
    links: list[list[Any]] = []  # [id, from node, from slot, to node, to slot, type]
    inputs_of: dict[str, list[dict[str, Any]]] = {}
    for node_id, node in ordered:
        inputs_of[node_id] = []
        for name, spec in input_specs(node_classes[node["class_type"]]).items():
            value = node["inputs"].get(name)
            if _is_link(value):
                link = [
                    len(links) + 1,
                    int(value[0]),
                    value[1],
                    int(node_id),
                    len(inputs_of[node_id]),
                    spec.type_name,
                ]
                links.append(link)
                inputs_of[node_id].append({"name": name, "type": spec.type_name, "link": link[0]})
    column_tops: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []
    for order, (node_id, node) in enumerate(ordered):
        cls = node_classes[node["class_type"]]
        specs = input_specs(cls)
        widgets: list[Any] = []
        for name in widget_value_names(cls):
            if name == "control_after_generate":
                widgets.append("fixed")
            elif name == "control_filter_list":
                widgets.append("")
            elif not _is_link(node["inputs"].get(name)):
                widgets.append(node["inputs"].get(name, specs[name].options.get("default")))
        if node["class_type"] == "LoadImage":
            widgets.append("image")  # the editor's upload widget
        return_types = getattr(cls, "RETURN_TYPES", ())
        return_names = getattr(cls, "RETURN_NAMES", None) or return_types
        outputs = [
            {
                "name": return_names[index],
                "type": kind,
                "links": [link[0] for link in links if link[1] == int(node_id) and link[2] == index],
                "slot_index": index,
            }
            for index, kind in enumerate(return_types)
        ]
        column = depths[node_id]
        height = 100 + 26 * len(widgets) + (PREVIEW_HEIGHT if node["class_type"] in IMAGE_NODES else 0)
        top = column_tops.get(column, 40 + TITLE_HEIGHT)
        column_tops[column] = top + height + TITLE_HEIGHT + GAP  # stacked by real heights: no overlap
        nodes.append(
            {
                "id": int(node_id),
                "type": node["class_type"],
                "pos": [40 + column * COLUMN_WIDTH, top],
                "size": [NODE_WIDTH, height],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs_of[node_id],
                "outputs": outputs,
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widgets,
            }
        )
    return {
        "last_node_id": max(int(node_id) for node_id in prompt),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }
