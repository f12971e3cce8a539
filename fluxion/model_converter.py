"""Move a reference model's weights onto a Chain by tracing both on the same input.

Both models run once; the layers that own parameters are recorded in the order they execute.
The n-th such layer of the reference is paired with the n-th of the Chain and their parameters
are matched by shape. Where the two sequences diverge, the report names both layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class ModelConversionError(ValueError):
    """The two models do not execute matching weighted layers; the message says where."""


@dataclass
class TracedLayer:
    path: str
    module: torch.nn.Module
    shapes: list[tuple[int, ...]]

    def describe(self) -> str:
        return f"{self.path} ({type(self.module).__name__}, params {self.shapes})"


@dataclass
class ConversionReport:
    """The parameter mapping found (source key -> target key) and the output difference measured."""

    mapping: dict[str, str] = field(default_factory=dict)
    max_abs_difference: float | None = None


def trace_weighted_layers(model: torch.nn.Module, *args: Any, **kwargs: Any) -> list[TracedLayer]:
    """Run `model` once and list the modules owning parameters, in first-execution order."""
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    seen: set[int] = set()
    order: list[TracedLayer] = []

    def record(module: torch.nn.Module, _inputs: Any) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        shapes = [tuple(param.shape) for param in module.parameters(recurse=False)]
        if shapes:
            order.append(TracedLayer(names.get(id(module), type(module).__name__), module, shapes))

    handles = [module.register_forward_pre_hook(record) for module in model.modules()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def convert_by_tracing(
    source: torch.nn.Module,
    target: torch.nn.Module,
    source_args: tuple[Any, ...],
    target_args: tuple[Any, ...] | None = None,
    source_kwargs: dict[str, Any] | None = None,
    target_kwargs: dict[str, Any] | None = None,
    check_tolerance: float | None = None,
) -> ConversionReport:
    """Copy `source`'s weights into `target` (in place) by execution order; optionally compare outputs.

    Raises ModelConversionError naming the first pair of layers that do not correspond, the
    layers left over on either side, or (with `check_tolerance`) the output difference.
    """
    target_args = source_args if target_args is None else target_args
    source_layers = trace_weighted_layers(source, *source_args, **(source_kwargs or {}))
    target_layers = trace_weighted_layers(target, *target_args, **(target_kwargs or {}))
    for index, (source_layer, target_layer) in enumerate(zip(source_layers, target_layers)):
        if sorted(source_layer.shapes) != sorted(target_layer.shapes):
            raise ModelConversionError(
                f"weighted layer #{index} differs: source {source_layer.describe()} vs "
                f"target {target_layer.describe()}"
            )
    if len(source_layers) != len(target_layers):
        longer, name = (
            (source_layers, "source")
            if len(source_layers) > len(target_layers)
            else (target_layers, "target")
        )
        extra = ", ".join(
            layer.describe() for layer in longer[min(len(source_layers), len(target_layers)) :][:5]
        )
        raise ModelConversionError(
            f"source runs {len(source_layers)} weighted layers, target {len(target_layers)}; "
            f"first layers only in the {name}: {extra}"
        )
    _check_all_executed(target, target_layers, "target")

    report = ConversionReport()
    source_names = {id(param): name for name, param in source.named_parameters(remove_duplicate=False)}
    target_names = {id(param): name for name, param in target.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for source_layer, target_layer in zip(source_layers, target_layers):
            remaining = list(source_layer.module.parameters(recurse=False))
            for target_param in target_layer.module.parameters(recurse=False):
                source_param = next(param for param in remaining if param.shape == target_param.shape)
                remaining.remove(source_param)
                target_param.copy_(source_param)
                report.mapping[source_names[id(source_param)]] = target_names[id(target_param)]

    if check_tolerance is not None:
        with torch.no_grad():
            expected = _first_tensor(source(*source_args, **(source_kwargs or {})))
            actual = _first_tensor(target(*target_args, **(target_kwargs or {})))
        report.max_abs_difference = (expected - actual).abs().max().item()
        if report.max_abs_difference > check_tolerance:
            raise ModelConversionError(
                f"weights transferred but outputs differ by {report.max_abs_difference:.3g} "
                f"(tolerance {check_tolerance:.3g})"
            )
    return report


def _check_all_executed(model: torch.nn.Module, traced: list[TracedLayer], side: str) -> None:
    executed = {id(layer.module) for layer in traced}
    idle = [
        name
        for name, module in model.named_modules()
        if id(module) not in executed and any(True for _ in module.parameters(recurse=False))
    ]
    if idle:
        raise ModelConversionError(f"{side} layers with weights never ran on the sample input: {idle[:5]}")


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, dict):
        return _first_tensor(next(iter(output.values())))
    raise TypeError(f"cannot compare outputs of type {type(output).__name__}")
