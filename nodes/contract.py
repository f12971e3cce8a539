"""The node contract every pack node keeps, checked in tests (ComfyUI itself checks little of it).

A node declares well-formed INPUT_TYPES with a tooltip on every input, defaults that are allowed
values, outputs whose RETURN_TYPES/RETURN_NAMES/OUTPUT_TOOLTIPS line up, a FUNCTION that accepts
every input by keyword, a DESCRIPTION, a CATEGORY, a display name, and a "Fluxion" id prefix.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .registry import NODE_DISPLAY_NAME_MAPPINGS
from .runner import plan
from .runner_nodes import RUNNER_NODE_CLASSES
from .workflow import MODE_BYPASS, MODE_MUTED, Workflow, WorkflowError, input_specs, widget_value_names

PACK_PREFIX = "Fluxion"
SECTIONS = ("required", "optional", "hidden")
HIDDEN_VALUES = frozenset(
    {"PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "DYNPROMPT", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG"}
)
SCALAR_TYPES = {"INT": (int,), "FLOAT": (int, float), "STRING": (str,), "BOOLEAN": (bool,)}


def _check_input(section: str, name: str, entry: Any) -> list[str]:
    where = f"input '{name}' ({section})"
    if section == "hidden":
        if entry not in HIDDEN_VALUES:
            return [f"{where}: hidden inputs take one of {sorted(HIDDEN_VALUES)}, got {entry!r}"]
        return []
    if not isinstance(entry, tuple | list) or not 1 <= len(entry) <= 2:
        return [f"{where}: expected (TYPE,) or (TYPE, {{options}}), got {entry!r}"]
    kind = entry[0]
    options = entry[1] if len(entry) == 2 else {}
    if not isinstance(options, Mapping):
        return [f"{where}: options must be a dict, got {options!r}"]
    problems = []
    if not isinstance(kind, str | list | tuple) or kind == "":
        problems.append(f"{where}: type must be a type name or a list of choices, got {kind!r}")
    tooltip = options.get("tooltip")
    if not isinstance(tooltip, str) or not tooltip.strip():
        problems.append(f"{where}: no tooltip")
    choices = (
        list(kind) if isinstance(kind, list | tuple) else options.get("options") if kind == "COMBO" else None
    )
    default = options.get("default")
    if choices is not None:
        if default is not None and choices and default not in choices:
            problems.append(f"{where}: default {default!r} is not one of the choices {choices!r}")
        return problems
    if kind in SCALAR_TYPES and default is not None:
        if isinstance(default, bool) != (kind == "BOOLEAN") or not isinstance(default, SCALAR_TYPES[kind]):
            problems.append(f"{where}: default {default!r} is not {'an' if kind == 'INT' else 'a'} {kind}")
            return problems
    low, high = options.get("min"), options.get("max")
    if low is not None and high is not None and low > high:
        return [*problems, f"{where}: min {low} > max {high}"]
    if kind in ("INT", "FLOAT") and isinstance(default, int | float):
        if low is not None and default < low:
            problems.append(f"{where}: default {default} < min {low}")
        if high is not None and default > high:
            problems.append(f"{where}: default {default} > max {high}")
    return problems


def _check_inputs(cls: type) -> tuple[list[str], list[str]]:
    """Problems in INPUT_TYPES, and the names of the required + optional + hidden inputs."""
    try:
        declared = cls.INPUT_TYPES()  # type: ignore[attr-defined]
    except Exception as error:
        return [f"INPUT_TYPES() failed: {type(error).__name__}: {error}"], []
    if not isinstance(declared, Mapping):
        return [f"INPUT_TYPES() must return a dict, got {type(declared).__name__}"], []
    problems = [f"INPUT_TYPES has unknown section '{key}'" for key in declared if key not in SECTIONS]
    if "required" not in declared:
        problems.append("INPUT_TYPES has no 'required' section")
    names: list[str] = []
    for section in SECTIONS:
        inputs = declared.get(section) or {}
        if not isinstance(inputs, Mapping):
            problems.append(f"INPUT_TYPES['{section}'] must be a dict")
            continue
        for name, entry in inputs.items():
            if name in names:
                problems.append(f"input '{name}' is declared twice")
            names.append(name)
            problems += _check_input(section, name, entry)
    return problems, names


def _check_outputs(cls: type) -> list[str]:
    types = getattr(cls, "RETURN_TYPES", None)
    if not isinstance(types, tuple):
        return [f"RETURN_TYPES must be a tuple, got {types!r}"]
    problems = [
        f"RETURN_TYPES[{i}] must be a type name, got {t!r}"
        for i, t in enumerate(types)
        if not (isinstance(t, str | list) and t)
    ]
    for attribute in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        value = getattr(cls, attribute, None)
        if value is None:
            if attribute == "OUTPUT_TOOLTIPS" and types:
                problems.append("no OUTPUT_TOOLTIPS")
            continue
        if not isinstance(value, tuple) or len(value) != len(types):
            problems.append(
                f"{attribute} has {len(value) if isinstance(value, tuple) else value!r} entries, RETURN_TYPES has {len(types)}"
            )
    if not types and not getattr(cls, "OUTPUT_NODE", False):
        problems.append("no outputs and not an OUTPUT_NODE: it would never run")
    return problems


def _check_function(cls: type, input_names: list[str]) -> list[str]:
    function_name = getattr(cls, "FUNCTION", None)
    if not isinstance(function_name, str):
        return ["no FUNCTION"]
    function = getattr(cls, function_name, None)
    if not callable(function):
        return [f"FUNCTION '{function_name}' is not a method of the class"]
    parameters = list(inspect.signature(function).parameters.values())
    if parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    by_keyword = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    problems = []
    if not takes_any:
        problems += [
            f"{function_name}() does not accept input '{n}' as a keyword"
            for n in input_names
            if n not in by_keyword
        ]
    problems += [
        f"{function_name}() requires '{p.name}', which is not an input"
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind
        in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_ONLY,
        )
        and p.name not in input_names
    ]
    return problems


def check_node_contract(name: str, cls: type, display_names: Mapping[str, str] | None = None) -> list[str]:
    """Problems found in node class `cls` registered as `name` (empty when it keeps the contract)."""
    display_names = NODE_DISPLAY_NAME_MAPPINGS if display_names is None else display_names
    problems = []
    if not name.startswith(PACK_PREFIX):
        problems.append(f"node id '{name}' does not start with the pack prefix '{PACK_PREFIX}'")
    if not display_names.get(name):
        problems.append("no display name in NODE_DISPLAY_NAME_MAPPINGS")
    for attribute in ("DESCRIPTION", "CATEGORY"):
        value = getattr(cls, attribute, None)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"no {attribute}")
    input_problems, input_names = _check_inputs(cls)
    problems += input_problems + _check_outputs(cls) + _check_function(cls, input_names)
    return [f"{name}: {problem}" for problem in problems]


def check_node_mappings(
    class_mappings: Mapping[str, type], display_names: Mapping[str, str] | None = None
) -> list[str]:
    """Contract problems of every node of a NODE_CLASS_MAPPINGS."""
    return [
        problem
        for name, cls in class_mappings.items()
        for problem in check_node_contract(name, cls, display_names)
    ]


def _check_widget_values(node: Mapping[str, Any], cls: type) -> list[str]:
    values = node.get("widgets_values")
    if isinstance(values, dict):
        return []
    expected = widget_value_names(cls)
    has_upload = any(spec.options.get("image_upload") for spec in input_specs(cls).values())
    count = len(values or [])
    if count == len(expected) or (has_upload and count == len(expected) + 1):
        return []
    return [
        f"node {node.get('id')} ({node.get('type')}): widgets_values has {count} value(s), "
        f"the editor stores {len(expected)}: {', '.join(expected) or 'none'}"
    ]


def check_workflow_contract(workflow: Workflow, node_classes: Mapping[str, type]) -> list[str]:
    """Problems of a workflow file: graph errors, pack nodes breaking the contract, widget counts."""
    problems = []
    try:
        plan(workflow.prompt, node_classes, allow_hosted_only=True)
    except WorkflowError as error:
        problems.append(str(error))
    used = sorted({node["class_type"] for node in workflow.prompt.values()})
    for class_type in used:
        if class_type in node_classes and class_type not in RUNNER_NODE_CLASSES:
            problems += check_node_contract(class_type, node_classes[class_type])
    for node in (workflow.ui or {}).get("nodes", []):
        cls = node_classes.get(node.get("type"))
        if cls is not None and node.get("mode") not in (MODE_MUTED, MODE_BYPASS):
            problems += _check_widget_values(node, cls)
    return problems
