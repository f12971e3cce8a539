"""Headless execution of ComfyUI workflows: validation, topological order, output caching.

The runner does what ComfyUI's executor does for the nodes this pack uses: it runs the output
nodes (`OUTPUT_NODE = True`) and whatever they depend on, each node's FUNCTION once with its
inputs as keyword arguments, and keeps each node's outputs for the next run while the node's
inputs (and everything upstream) stay the same. Output nodes always run. Every problem found
before running names the node id, its class_type, the input and what was expected.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .host import Cancelled, ModelFileNames, missing_model_message, throw_if_interrupted
from .registry import NODE_CLASS_MAPPINGS
from .runner_nodes import RUNNER_NODE_CLASSES
from .workflow import InputSpec, Workflow, WorkflowError, input_specs, unknown_node_type, where

logger = logging.getLogger(__name__)

_CHOICES_SHOWN = 20


class NodeFailedError(RuntimeError):
    """A node raised while running; the original exception is the `__cause__`."""

    def __init__(self, node_id: str, class_type: str, error: BaseException) -> None:
        self.node_id = node_id
        self.class_type = class_type
        super().__init__(f"{where(node_id, class_type)}failed: {type(error).__name__}: {error}")


@dataclass
class RunResult:
    """What a run produced."""

    outputs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)


def all_node_classes() -> dict[str, type]:
    """The pack's NODE_CLASS_MAPPINGS plus the runner's LoadImage/SaveImage/PreviewImage."""
    return {**RUNNER_NODE_CLASSES, **NODE_CLASS_MAPPINGS}


def is_link(value: Any) -> bool:
    """Whether an API input value is a link `[source_id, output_index]`."""
    return isinstance(value, list) and len(value) == 2


def _sort_key(node_id: str) -> tuple[int, int | str]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def _types(type_: Any) -> set[str]:
    if isinstance(type_, list | tuple):
        return {"COMBO"}
    return {part.strip() for part in str(type_).split(",")}


def _compatible(output_type: Any, spec: InputSpec) -> bool:
    produced, wanted = _types(output_type), _types(spec.type)
    if "*" in produced or "*" in wanted:
        return True
    if spec.choices is not None:  # a COMBO accepts a combo or a string from a primitive-like node
        return bool(produced & {"COMBO", "STRING"})
    return bool(produced & wanted)


def _show_choices(choices: list[Any]) -> str:
    shown = ", ".join(repr(c) for c in choices[:_CHOICES_SHOWN])
    more = len(choices) - _CHOICES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "") if choices else "none (the list is empty)"


def check_value(node_id: str, class_type: str, spec: InputSpec, value: Any) -> Any:
    """The literal `value` converted to the input's type, or a WorkflowError saying what was expected."""

    def fail(expected: str) -> WorkflowError:
        return WorkflowError(
            f"expected {expected}, got {value!r} ({type(value).__name__})", node_id, class_type, spec.name
        )

    choices = spec.choices
    kind = spec.type_name
    if choices is not None:
        if value not in choices:
            listed = spec.type if isinstance(spec.type, list) else spec.options.get("options")
            if isinstance(listed, ModelFileNames) and isinstance(value, str):  # say where we looked
                raise WorkflowError(missing_model_message(listed.kind, value), node_id, class_type, spec.name)
            raise fail(f"one of: {_show_choices(choices)}")
        return value
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("an INT")
        if isinstance(value, float):
            if not value.is_integer():
                raise fail("an INT")
            value = int(value)
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("a FLOAT")
        value = float(value)
    elif kind == "STRING":
        if not isinstance(value, str):
            raise fail("a STRING")
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            raise fail("a BOOLEAN (true or false)")
    else:
        raise fail(f"a link from a node output of type {kind}")
    if kind in ("INT", "FLOAT"):
        low, high = spec.options.get("min"), spec.options.get("max")
        article = "an" if kind == "INT" else "a"
        if low is not None and value < low:
            raise fail(f"{article} {kind} >= {low}")
        if high is not None and value > high:
            raise fail(f"{article} {kind} <= {high}")
    return value


@dataclass
class ExecutionPlan:
    """Validated nodes in run order, with their classes, input specs and checked literal inputs."""

    order: list[str]
    classes: dict[str, type]
    specs: dict[str, dict[str, InputSpec]]
    literals: dict[str, dict[str, Any]]


def plan(
    prompt: Mapping[str, Mapping[str, Any]],
    node_classes: Mapping[str, type],
    outputs: Iterable[str] = (),
    allow_hosted_only: bool = False,
) -> ExecutionPlan:
    """Validate a prompt and order the nodes to run (dependencies first); raises WorkflowError.

    Core nodes that run only inside ComfyUI are refused, unless `allow_hosted_only` (checking a graph only)."""
    classes: dict[str, type] = {}
    specs: dict[str, dict[str, InputSpec]] = {}
    for node_id, node in prompt.items():
        class_type = node.get("class_type")
        cls = node_classes.get(class_type) if isinstance(class_type, str) else None
        if cls is None:
            raise unknown_node_type(node_id, str(class_type), node_classes)
        if getattr(cls, "FLUXION_HOSTED_ONLY", False) and not allow_hosted_only:
            raise WorkflowError(
                f"runs only inside ComfyUI (it needs {getattr(cls, 'NEEDS', 'ComfyUI')}): open this workflow in "
                "ComfyUI, or use the Fluxion nodes for it headless",
                node_id,
                class_type,
            )
        if getattr(cls, "INPUT_IS_LIST", False) or any(getattr(cls, "OUTPUT_IS_LIST", ())):
            raise WorkflowError(
                "list inputs/outputs (INPUT_IS_LIST/OUTPUT_IS_LIST) are not supported headless",
                node_id,
                class_type,
            )
        classes[node_id], specs[node_id] = cls, input_specs(cls)

    targets = [i for i in prompt if getattr(classes[i], "OUTPUT_NODE", False)]
    for node_id in outputs:
        if node_id not in prompt:
            raise WorkflowError(f"requested output node {node_id} is not in the workflow")
        targets.append(node_id)
    if not targets:
        raise WorkflowError(
            "the workflow has no output node (such as SaveImage or PreviewImage): nothing to run"
        )

    order: list[str] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(node_id: str) -> None:
        if node_id in done:
            return
        if node_id in path:
            cycle = path[path.index(node_id) :] + [node_id]
            named = " -> ".join(f"{i} ({prompt[i]['class_type']})" for i in cycle)
            raise WorkflowError(f"the workflow has a cycle: {named}")
        path.append(node_id)
        class_type = prompt[node_id]["class_type"]
        for name, value in prompt[node_id].get("inputs", {}).items():
            spec = specs[node_id].get(name)
            if spec is None or spec.section == "hidden" or not isinstance(value, list):
                continue
            source = _check_link(prompt, classes, node_id, class_type, spec, value)
            visit(source)
        path.pop()
        done.add(node_id)
        order.append(node_id)

    for target in sorted(dict.fromkeys(targets), key=_sort_key):
        visit(target)

    literals = {
        node_id: _check_inputs(prompt[node_id], node_id, classes[node_id], specs[node_id])
        for node_id in order
    }
    return ExecutionPlan(order, classes, specs, literals)


def _check_link(
    prompt: Mapping[str, Mapping[str, Any]],
    classes: Mapping[str, type],
    node_id: str,
    class_type: str,
    spec: InputSpec,
    value: list[Any],
) -> str:
    if not is_link(value) or isinstance(value[1], bool) or not isinstance(value[1], int):
        raise WorkflowError(
            f"expected a link [node_id, output_index], got {value!r}", node_id, class_type, spec.name
        )
    source, index = str(value[0]), value[1]
    if source not in prompt:
        raise WorkflowError(
            f"linked to node {source}, which is not in the workflow", node_id, class_type, spec.name
        )
    source_type = prompt[source]["class_type"]
    produced = tuple(getattr(classes[source], "RETURN_TYPES", ()))
    if not 0 <= index < len(produced):
        listing = ", ".join(map(str, produced)) or "no outputs"
        raise WorkflowError(
            f"linked to output {index} of node {source} ({source_type}), which has {len(produced)} "
            f"output(s): {listing}",
            node_id,
            class_type,
            spec.name,
        )
    if not _compatible(produced[index], spec):
        raise WorkflowError(
            f"expected {spec.type_name}, but output {index} of node {source} ({source_type}) is "
            f"{produced[index]}",
            node_id,
            class_type,
            spec.name,
        )
    return source


def _check_inputs(
    node: Mapping[str, Any], node_id: str, cls: type, specs: Mapping[str, InputSpec]
) -> dict[str, Any]:
    """Check required inputs are present and literal values fit; returns the converted literals."""
    class_type = node["class_type"]
    inputs = node.get("inputs", {})
    custom = getattr(cls, "VALIDATE_INPUTS", None)
    custom_names = set(inspect.signature(custom).parameters) if custom is not None else set()
    literals: dict[str, Any] = {}
    for spec in specs.values():
        if spec.section == "hidden":
            continue
        if spec.name not in inputs:
            if spec.section == "required":
                raise WorkflowError(
                    f"missing required input (expected {spec.type_name})", node_id, class_type, spec.name
                )
            continue
        value = inputs[spec.name]
        if isinstance(value, list):
            continue  # a link, checked while ordering
        literals[spec.name] = (
            value if spec.name in custom_names else check_value(node_id, class_type, spec, value)
        )
    if custom is not None:
        arguments = {name: literals[name] for name in custom_names if name in literals}
        try:
            verdict = custom(**arguments) if len(arguments) == len(custom_names) else True
        except Exception as error:  # a value the node's own check could not even read
            raise WorkflowError(
                f"rejected by the node: {type(error).__name__}: {error}", node_id, class_type
            ) from error
        if verdict is not True:
            raise WorkflowError(f"rejected by the node: {verdict}", node_id, class_type)
    return literals


def _fingerprint(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return object()  # IS_CHANGED returning NaN means "always changed"
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError:
        return repr(value)


class Runner:
    """Runs API prompts against a node-class mapping, caching node outputs between runs."""

    def __init__(self, node_classes: Mapping[str, type] | None = None) -> None:
        self.node_classes: dict[str, type] = dict(
            node_classes if node_classes is not None else all_node_classes()
        )
        self._cache: dict[str, tuple[Any, tuple[Any, ...]]] = {}
        self._instances: dict[str, tuple[type, Any]] = {}

    def run_workflow(self, workflow: Workflow) -> RunResult:
        """Run a loaded workflow; PNGs get its editor graph when it has one (see `load_workflow`)."""
        return self.run(workflow.prompt, extra_pnginfo=workflow.extra_pnginfo)

    def run(
        self,
        prompt: Mapping[str, Mapping[str, Any]],
        *,
        extra_pnginfo: dict[str, Any] | None = None,
        outputs: Iterable[str] = (),
    ) -> RunResult:
        """Validate then execute `prompt`; `outputs` adds non-output nodes whose results you want."""
        prompt = {str(node_id): node for node_id, node in prompt.items()}
        steps = plan(prompt, self.node_classes, [str(o) for o in outputs])
        result = RunResult()
        signatures: dict[str, Any] = {}
        for node_id in steps.order:
            node, cls = prompt[node_id], steps.classes[node_id]
            kwargs, upstream = self._arguments(node_id, node, steps, result, prompt, extra_pnginfo)
            signature = (
                node["class_type"],
                _fingerprint(steps.literals[node_id]),
                tuple(
                    (name, signatures[source], index) for name, (source, index) in sorted(upstream.items())
                ),
                self._is_changed(node_id, node["class_type"], cls, kwargs),
            )
            signatures[node_id] = signature
            cached = self._cache.get(node_id)
            if not getattr(cls, "OUTPUT_NODE", False) and cached is not None and cached[0] == signature:
                result.outputs[node_id] = cached[1]
                result.cached.append(node_id)
                continue
            throw_if_interrupted()
            logger.info("running node %s (%s)", node_id, node["class_type"])
            values, ui = self._execute(node_id, node["class_type"], cls, kwargs)
            self._cache[node_id] = (signature, values)
            result.outputs[node_id] = values
            result.executed.append(node_id)
            if ui is not None:
                result.ui[node_id] = ui
        return result

    def _arguments(
        self,
        node_id: str,
        node: Mapping[str, Any],
        steps: ExecutionPlan,
        result: RunResult,
        prompt: Mapping[str, Any],
        extra_pnginfo: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], dict[str, tuple[str, int]]]:
        kwargs = dict(steps.literals[node_id])
        upstream: dict[str, tuple[str, int]] = {}
        hidden = {"PROMPT": prompt, "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": node_id}
        for spec in steps.specs[node_id].values():
            value = node.get("inputs", {}).get(spec.name)
            if spec.section == "hidden":
                kwargs[spec.name] = hidden.get(str(spec.type))
            elif isinstance(value, list):
                source, index = str(value[0]), value[1]
                kwargs[spec.name] = result.outputs[source][index]
                upstream[spec.name] = (source, index)
        return kwargs, upstream

    @staticmethod
    def _is_changed(node_id: str, class_type: str, cls: type, kwargs: Mapping[str, Any]) -> Any:
        """The node's IS_CHANGED answer (as in ComfyUI: a new value, or NaN, means run it again)."""
        check = getattr(cls, "IS_CHANGED", None)
        if check is None:
            return None
        accepted = inspect.signature(check).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        try:
            answer = check(**{k: v for k, v in kwargs.items() if takes_all or k in accepted})
        except Exception as error:
            raise NodeFailedError(node_id, class_type, error) from error
        return _fingerprint(answer)

    def _instance(self, node_id: str, cls: type) -> Any:
        known = self._instances.get(node_id)
        if known is None or known[0] is not cls:
            known = (cls, cls())
            self._instances[node_id] = known
        return known[1]

    def _execute(
        self, node_id: str, class_type: str, cls: type, kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        try:
            returned = getattr(self._instance(node_id, cls), cls.FUNCTION)(**kwargs)  # type: ignore[attr-defined]
        except (Cancelled, WorkflowError):
            raise
        except Exception as error:
            raise NodeFailedError(node_id, class_type, error) from error
        ui = None
        if isinstance(returned, dict):
            ui, returned = returned.get("ui"), returned.get("result", ())
        if returned is None:
            returned = ()
        expected = tuple(getattr(cls, "RETURN_TYPES", ()))
        if not isinstance(returned, tuple | list) or len(returned) != len(expected):
            raise WorkflowError(
                f"{cls.FUNCTION}() returned {returned!r:.80}, expected a tuple of {len(expected)} "  # type: ignore[attr-defined]
                f"value(s) ({', '.join(map(str, expected)) or 'nothing'})",
                node_id,
                class_type,
            )
        return tuple(returned), ui


def run_workflow(workflow: Workflow, node_classes: Mapping[str, type] | None = None) -> RunResult:
    """Run a workflow once with a fresh Runner."""
    return Runner(node_classes).run_workflow(workflow)
