"""UI (editor) workflows: conversion to the API prompt the ComfyUI frontend would queue."""

import copy

import pytest

from nodes.runner import Runner
from nodes.workflow import WorkflowError, parse_workflow, ui_to_api


def ui_node(node_id, type_, inputs=(), outputs=(), widgets_values=None, mode=0, **extra):
    node = {
        "id": node_id,
        "type": type_,
        "pos": [100 * node_id, 100],
        "size": [300, 100],
        "flags": {},
        "order": node_id,
        "mode": mode,
        "inputs": [dict(i) for i in inputs],
        "outputs": [dict(o) for o in outputs],
        "properties": {"Node name for S&R": type_},
        **extra,
    }
    if widgets_values is not None:
        node["widgets_values"] = widgets_values
    return node


def sampler_ui():
    """Loader -> Sampler -> Collect, plus a Note, as the editor saves it."""
    return {
        "last_node_id": 4,
        "last_link_id": 2,
        "nodes": [
            ui_node(
                1,
                "FakeModelLoader",
                outputs=[
                    {"name": "FAKE_MODEL", "type": "FAKE_MODEL", "links": [1], "slot_index": 0},
                    {"name": "INT", "type": "INT", "links": None},
                ],
                widgets_values=["small"],
            ),
            ui_node(
                2,
                "FakeSampler",
                inputs=[
                    {"name": "model", "type": "FAKE_MODEL", "link": 1},
                    {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None},
                ],
                outputs=[{"name": "INT", "type": "INT", "links": [2], "slot_index": 0}],
                widgets_values=[42, "randomize", 12, "ddim", 6.5, False, "hello"],
                title="My sampler",
            ),
            ui_node(3, "FakeCollect", inputs=[{"name": "value", "type": "INT", "link": 2}]),
            ui_node(4, "Note", widgets_values=["remember the milk"]),
        ],
        "links": [[1, 1, 0, 2, 0, "FAKE_MODEL"], [2, 2, 0, 3, 0, "INT"]],
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


EXPECTED_PROMPT = {
    "1": {"class_type": "FakeModelLoader", "inputs": {"name": "small"}},
    "2": {
        "class_type": "FakeSampler",
        "inputs": {
            "seed": 42,
            "steps": 12,
            "sampler_name": "ddim",
            "cfg": 6.5,
            "add_noise": False,
            "note": "hello",
            "model": ["1", 0],
        },
        "_meta": {"title": "My sampler"},
    },
    "3": {"class_type": "FakeCollect", "inputs": {"value": ["2", 0]}},
}


def test_ui_to_api_skips_the_seed_control_widget_value(fake_nodes):
    assert ui_to_api(sampler_ui(), fake_nodes) == EXPECTED_PROMPT


def test_ui_and_api_formats_run_the_same(fake_nodes):
    from_ui = Runner(fake_nodes).run_workflow(parse_workflow(sampler_ui(), fake_nodes))
    from_api = Runner(fake_nodes).run_workflow(parse_workflow(copy.deepcopy(EXPECTED_PROMPT), fake_nodes))
    assert from_ui.ui == from_api.ui == {"3": {"values": [54]}}
    assert parse_workflow(sampler_ui(), fake_nodes).extra_pnginfo == {"workflow": sampler_ui()}
    assert parse_workflow(EXPECTED_PROMPT, fake_nodes).extra_pnginfo is None


def test_links_in_object_form_are_read(fake_nodes):
    ui = sampler_ui()
    ui["links"] = [
        {"id": i, "origin_id": o, "origin_slot": os, "target_id": t, "target_slot": ts, "type": ty}
        for i, o, os, t, ts, ty in ui["links"]
    ]
    assert ui_to_api(ui, fake_nodes) == EXPECTED_PROMPT


def test_widget_values_missing_at_the_end_take_the_defaults(fake_nodes):
    ui = sampler_ui()
    ui["nodes"][1]["widgets_values"] = [42, "fixed", 12, "ddim", 6.5]  # saved before two inputs were added
    inputs = ui_to_api(ui, fake_nodes)["2"]["inputs"]
    assert inputs["add_noise"] is True and inputs["note"] == ""


class Controls:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "count": ("INT", {"default": 0, "control_after_generate": True}),
                "seed": ("INT", {"default": 0, "control_after_generate": False}),
                "style": (["a", "b"], {"control_after_generate": True}),
                "text": ("STRING", {"forceInput": True}),
                "strength": ("FLOAT", {"default": 1.0, "control_after_generate": True}),
                "noise_seed": ("INT", {"default": 0}),
                "flag": ("BOOLEAN", {"default": False}),
            }
        }

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True


def test_control_after_generate_values_follow_the_inputs_that_ask_for_them():
    ui = {
        "nodes": [
            ui_node(
                1,
                "Controls",
                inputs=[{"name": "text", "type": "STRING", "link": None}],
                widgets_values=[3, "increment", 7, "b", "fixed", "", 0.5, "fixed", 99, "randomize", True],
            )
        ],
        "links": [],
    }
    inputs = ui_to_api(ui, {"Controls": Controls})["1"]["inputs"]
    assert inputs == {"count": 3, "seed": 7, "style": "b", "strength": 0.5, "noise_seed": 99, "flag": True}


def test_trailing_upload_widget_value_of_load_image_is_ignored(headless_folders):
    from nodes.runner_nodes import RUNNER_NODE_CLASSES

    ui = {"nodes": [ui_node(1, "LoadImage", widgets_values=["example.png", "image"])], "links": []}
    assert ui_to_api(ui, RUNNER_NODE_CLASSES)["1"]["inputs"] == {"image": "example.png"}


def with_primitive_and_reroute():
    ui = sampler_ui()
    nodes = ui["nodes"]
    nodes[1]["inputs"][0]["link"] = 4  # model now comes through a Reroute
    nodes[1]["inputs"][1]["link"] = 5  # seed converted to an input, fed by a primitive
    nodes.append(
        ui_node(
            5,
            "Reroute",
            inputs=[{"name": "", "type": "*", "link": 3}],
            outputs=[{"name": "", "type": "FAKE_MODEL", "links": [4]}],
        )
    )
    nodes.append(
        ui_node(
            6,
            "PrimitiveNode",
            outputs=[{"name": "INT", "type": "INT", "links": [5], "widget": {"name": "seed"}}],
            widgets_values=[1234, "fixed"],
        )
    )
    ui["links"] = [
        [2, 2, 0, 3, 0, "INT"],
        [3, 1, 0, 5, 0, "FAKE_MODEL"],
        [4, 5, 0, 2, 0, "FAKE_MODEL"],
        [5, 6, 0, 2, 1, "INT"],
    ]
    return ui


def test_reroute_and_primitive_nodes_are_resolved_away(fake_nodes):
    prompt = ui_to_api(with_primitive_and_reroute(), fake_nodes)
    assert set(prompt) == {"1", "2", "3"}
    assert prompt["2"]["inputs"]["model"] == ["1", 0]
    assert prompt["2"]["inputs"]["seed"] == 1234  # the link wins over the stored widget value 42


def test_values_of_unlinked_widgets_only_are_also_understood(fake_nodes):
    ui = with_primitive_and_reroute()
    ui["nodes"][1]["widgets_values"] = [12, "ddim", 6.5, False, "hello"]  # no slot for the linked seed
    inputs = ui_to_api(ui, fake_nodes)["2"]["inputs"]
    assert inputs["seed"] == 1234 and inputs["steps"] == 12 and inputs["note"] == "hello"


def constant_add_collect(add_mode):
    return {
        "nodes": [
            ui_node(
                1,
                "FakeConstant",
                outputs=[{"name": "INT", "type": "INT", "links": [1, 2]}],
                widgets_values=[5],
            ),
            ui_node(
                2,
                "FakeAdd",
                inputs=[{"name": "a", "type": "INT", "link": 1}, {"name": "b", "type": "INT", "link": 2}],
                outputs=[{"name": "INT", "type": "INT", "links": [3]}],
                mode=add_mode,
            ),
            ui_node(3, "FakeCollect", inputs=[{"name": "value", "type": "INT", "link": 3}]),
        ],
        "links": [[1, 1, 0, 2, 0, "INT"], [2, 1, 0, 2, 1, "INT"], [3, 2, 0, 3, 0, "INT"]],
    }


def test_bypassed_node_passes_its_input_of_the_same_type_through(fake_nodes):
    prompt = ui_to_api(constant_add_collect(add_mode=4), fake_nodes)
    assert set(prompt) == {"1", "3"} and prompt["3"]["inputs"]["value"] == ["1", 0]
    assert Runner(fake_nodes).run(prompt).ui["3"] == {"values": [5]}


def test_muted_node_leaves_its_consumers_input_unset(fake_nodes):
    prompt = ui_to_api(constant_add_collect(add_mode=2), fake_nodes)
    assert prompt["3"]["inputs"] == {}
    with pytest.raises(WorkflowError, match=r"node 3 \(FakeCollect\), input 'value': missing required input"):
        Runner(fake_nodes).run(prompt)


def test_ui_file_without_links_table(fake_nodes):
    ui = sampler_ui()
    del ui["links"]
    with pytest.raises(WorkflowError) as caught:
        parse_workflow(ui, fake_nodes)
    assert str(caught.value).startswith("UI workflow has 'nodes' but no 'links' table")


def test_ui_link_from_a_node_that_is_not_there(fake_nodes):
    ui = sampler_ui()
    ui["links"][0] = [1, 99, 0, 2, 0, "FAKE_MODEL"]
    with pytest.raises(WorkflowError) as caught:
        ui_to_api(ui, fake_nodes)
    assert str(caught.value) == (
        "node 2 (FakeSampler), input 'model': link 1 comes from node 99, which is not in the workflow"
    )


def test_ui_link_missing_from_the_links_table(fake_nodes):
    ui = sampler_ui()
    ui["links"] = ui["links"][1:]
    with pytest.raises(
        WorkflowError, match=r"node 2 \(FakeSampler\), input 'model': link 1 is not in the 'links' table"
    ):
        ui_to_api(ui, fake_nodes)


def test_ui_unknown_node_type_lists_known_ones(fake_nodes):
    ui = sampler_ui()
    ui["nodes"][1]["type"] = "KSampler"
    with pytest.raises(
        WorkflowError, match=r"^node 2 \(KSampler\): unknown node type 'KSampler'. Known node types: FakeAdd"
    ):
        ui_to_api(ui, fake_nodes)


def test_ui_subgraph_nodes_ask_to_be_unpacked(fake_nodes):
    ui = sampler_ui()
    ui["nodes"][1]["type"] = "b48931b4-1499-46f5-85c3-1a5ef033a29b"
    ui["definitions"] = {"subgraphs": [{"id": "b48931b4-1499-46f5-85c3-1a5ef033a29b", "nodes": []}]}
    with pytest.raises(WorkflowError, match=r"^node 2 \(b48931b4-.*\): subgraphs are not supported headless"):
        ui_to_api(ui, fake_nodes)
