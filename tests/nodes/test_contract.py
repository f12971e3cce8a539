"""The node contract checker on a good node and on nodes breaking each rule."""

import pytest

from nodes.contract import check_node_contract, check_node_mappings, check_workflow_contract
from nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from nodes.workflow import parse_workflow


class FluxionGoodNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUXION_MODEL", {"tooltip": "The model to patch."}),
                "strength": (
                    "FLOAT",
                    {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05, "tooltip": "How strong."},
                ),
                "steps": ("INT", {"default": 20, "min": 1, "max": 150, "tooltip": "Denoising steps."}),
                "name": (
                    ["a.safetensors", "b.safetensors"],
                    {"default": "b.safetensors", "tooltip": "The LoRA file."},
                ),
                "mode": ("COMBO", {"options": ["x", "y"], "default": "y", "tooltip": "A mode."}),
                "enabled": ("BOOLEAN", {"default": True, "tooltip": "Switch."}),
            },
            "optional": {"mask": ("MASK", {"tooltip": "Where to apply it."})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("FLUXION_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA in its adapter stack.",)
    FUNCTION = "apply"
    CATEGORY = "Fluxion/adapters"
    DESCRIPTION = "Adds a LoRA to the model's adapter stack."

    def apply(self, model, strength, steps, name, mode, enabled, mask=None, unique_id=None):
        return (model,)


DISPLAY = {"FluxionGoodNode": "Good Node"}


def test_a_node_keeping_the_contract_has_no_problems():
    assert check_node_contract("FluxionGoodNode", FluxionGoodNode, DISPLAY) == []


def broken(**changes):
    return type("Broken", (FluxionGoodNode,), changes)


def inputs_with(section, name, entry):
    def INPUT_TYPES(cls):
        declared = FluxionGoodNode.INPUT_TYPES()
        declared.setdefault(section, {})[name] = entry
        return declared

    return classmethod(INPUT_TYPES)


@pytest.mark.parametrize(
    ("node", "problem"),
    [
        (
            broken(
                INPUT_TYPES=inputs_with("required", "steps", ("INT", {"default": 20, "min": 1, "max": 150}))
            ),
            "input 'steps' (required): no tooltip",
        ),
        (
            broken(
                INPUT_TYPES=inputs_with(
                    "required", "steps", ("INT", {"default": 0, "min": 1, "max": 150, "tooltip": "t"})
                )
            ),
            "input 'steps' (required): default 0 < min 1",
        ),
        (
            broken(
                INPUT_TYPES=inputs_with(
                    "required", "strength", ("FLOAT", {"default": 3.0, "max": 2.0, "tooltip": "t"})
                )
            ),
            "input 'strength' (required): default 3.0 > max 2.0",
        ),
        (
            broken(
                INPUT_TYPES=inputs_with(
                    "required", "steps", ("INT", {"default": 5, "min": 9, "max": 1, "tooltip": "t"})
                )
            ),
            "input 'steps' (required): min 9 > max 1",
        ),
        (
            broken(INPUT_TYPES=inputs_with("required", "steps", ("INT", {"default": "20", "tooltip": "t"}))),
            "input 'steps' (required): default '20' is not an INT",
        ),
        (
            broken(
                INPUT_TYPES=inputs_with("required", "enabled", ("BOOLEAN", {"default": 1, "tooltip": "t"}))
            ),
            "input 'enabled' (required): default 1 is not a BOOLEAN",
        ),
        (
            broken(
                INPUT_TYPES=inputs_with("required", "name", (["a", "b"], {"default": "c", "tooltip": "t"}))
            ),
            "input 'name' (required): default 'c' is not one of the choices ['a', 'b']",
        ),
        (
            broken(
                INPUT_TYPES=inputs_with(
                    "required", "mode", ("COMBO", {"options": ["x"], "default": "z", "tooltip": "t"})
                )
            ),
            "input 'mode' (required): default 'z' is not one of the choices ['x']",
        ),
        (
            broken(INPUT_TYPES=inputs_with("required", "steps", "INT")),
            "input 'steps' (required): expected (TYPE,) or (TYPE, {options}), got 'INT'",
        ),
        (
            broken(INPUT_TYPES=inputs_with("hidden", "secret", "PASSWORD")),
            "input 'secret' (hidden): hidden inputs take one of",
        ),
        (
            broken(INPUT_TYPES=inputs_with("extra", "x", ("INT", {"tooltip": "t"}))),
            "INPUT_TYPES has unknown section 'extra'",
        ),
        (
            broken(INPUT_TYPES=inputs_with("optional", "seed", ("INT", {"tooltip": "t"}))),
            "apply() does not accept input 'seed' as a keyword",
        ),
        (broken(RETURN_NAMES=("model", "extra")), "RETURN_NAMES has 2 entries, RETURN_TYPES has 1"),
        (broken(OUTPUT_TOOLTIPS=()), "OUTPUT_TOOLTIPS has 0 entries, RETURN_TYPES has 1"),
        (broken(OUTPUT_TOOLTIPS=None), "no OUTPUT_TOOLTIPS"),
        (broken(RETURN_TYPES=["FLUXION_MODEL"]), "RETURN_TYPES must be a tuple"),
        (broken(RETURN_TYPES=(), RETURN_NAMES=(), OUTPUT_TOOLTIPS=()), "no outputs and not an OUTPUT_NODE"),
        (broken(FUNCTION="missing"), "FUNCTION 'missing' is not a method of the class"),
        (broken(FUNCTION=None), "no FUNCTION"),
        (
            broken(
                apply=lambda self, model, strength, steps, name, mode, enabled, scale, mask=None, unique_id=None: (
                    None
                )
            ),
            "apply() requires 'scale', which is not an input",
        ),
        (broken(DESCRIPTION=""), "no DESCRIPTION"),
        (broken(CATEGORY=None), "no CATEGORY"),
    ],
)
def test_each_broken_rule_is_reported(node, problem):
    problems = check_node_contract("FluxionGoodNode", node, DISPLAY)
    assert any(p.startswith(f"FluxionGoodNode: {problem}") for p in problems), problems


def test_function_taking_kwargs_accepts_every_input():
    node = broken(apply=lambda self, **inputs: None)
    assert check_node_contract("FluxionGoodNode", node, DISPLAY) == []


def test_node_id_needs_the_pack_prefix_and_a_display_name():
    problems = check_node_contract("GoodNode", FluxionGoodNode, DISPLAY)
    assert problems == [
        "GoodNode: node id 'GoodNode' does not start with the pack prefix 'Fluxion'",
        "GoodNode: no display name in NODE_DISPLAY_NAME_MAPPINGS",
    ]


def test_input_types_that_raise_are_reported():
    def INPUT_TYPES(cls):
        raise OSError("models folder unreadable")

    problems = check_node_contract("FluxionGoodNode", broken(INPUT_TYPES=classmethod(INPUT_TYPES)), DISPLAY)
    assert problems[0] == "FluxionGoodNode: INPUT_TYPES() failed: OSError: models folder unreadable"


def test_every_registered_pack_node_keeps_the_contract():
    assert check_node_mappings(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) == []


class FluxionSeeded(FluxionGoodNode):
    @classmethod
    def INPUT_TYPES(cls):
        declared = FluxionGoodNode.INPUT_TYPES()
        declared["required"]["seed"] = (
            "INT",
            {"default": 0, "min": 0, "max": 2**32 - 1, "tooltip": "Noise seed."},
        )
        return declared

    def apply(self, **inputs):
        return (inputs["model"],)


def seeded_workflow(widgets_values):
    classes = {"FluxionSeeded": FluxionSeeded}
    ui = {
        "nodes": [
            {
                "id": 1,
                "type": "FluxionSeeded",
                "mode": 0,
                "inputs": [{"name": "model", "type": "FLUXION_MODEL", "link": None}],
                "widgets_values": widgets_values,
            },
        ],
        "links": [],
    }
    return parse_workflow(ui, classes), classes


def test_workflow_check_counts_the_widget_values_the_editor_stores(monkeypatch):
    monkeypatch.setitem(NODE_DISPLAY_NAME_MAPPINGS, "FluxionSeeded", "Seeded")
    workflow, classes = seeded_workflow([1.0, 20, "a.safetensors", "x", True, 7, "randomize"])
    assert check_workflow_contract(workflow, classes) == [
        "the workflow has no output node (such as SaveImage or PreviewImage): nothing to run"
    ]
    workflow, classes = seeded_workflow([1.0, 20, "a.safetensors", "x", True, 7])  # control value left out
    assert check_workflow_contract(workflow, classes)[1] == (
        "node 1 (FluxionSeeded): widgets_values has 6 value(s), the editor stores 7: strength, steps, "
        "name, mode, enabled, seed, control_after_generate"
    )


def test_workflow_check_reports_pack_nodes_breaking_the_contract():
    workflow, classes = seeded_workflow([1.0, 20, "a.safetensors", "x", True, 7, "randomize"])
    assert "FluxionSeeded: no display name in NODE_DISPLAY_NAME_MAPPINGS" in check_workflow_contract(
        workflow, classes
    )
