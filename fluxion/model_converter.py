"""Move a reference model's weights onto a Chain by tracing both on the same input.

Two converters. `convert_by_tracing` pairs the n-th weighted layer the reference runs with the
n-th of the Chain and matches parameters by shape; where the sequences diverge, the report names
both layers. `ModelConverter` has refiners' API: staged checks (basic layers, then shapes and
execution order, then outputs), a state-dict mapping, and export to safetensors.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .utils import save_to_safetensors


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


# The layers ModelConverter pairs between two models (subclasses included: fl.Linear is a Linear).
TORCH_BASIC_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)

# A model's inputs: positional args, keyword args, or {"positional": (...), "keyword": {...}}.
ModuleArgs = tuple[Any, ...] | dict[str, Any]
# A basic layer's kind: its (target-side) layer type and its parameter shapes.
LayerSignature = tuple[type[nn.Module], tuple[tuple[int, ...], ...]]


class ConversionStage(Enum):
    """The last check a ModelConverter passed; a failing check leaves the stage where it was."""

    INIT = auto()  # nothing checked yet
    BASIC_LAYERS_MATCH = auto()  # both models hold the same basic layers, by type and count
    SHAPE_AND_LAYERS_MATCH = auto()  # executed layers pair up by type and shapes; weights copied
    MODELS_OUTPUT_AGREE = auto()  # every basic layer's output and the final output agree


class ModelConverter:
    """refiners' staged converter: `run(args)` checks basic layers, maps and copies weights, compares outputs.

    It stops at the first failing check (`stage` says which passed, `messages` why) and resumes there.
    """

    def __init__(
        self,
        source_model: nn.Module,
        target_model: nn.Module,
        source_keys_to_skip: list[str] | None = None,
        target_keys_to_skip: list[str] | None = None,
        custom_layer_mapping: dict[type[nn.Module], type[nn.Module]] | None = None,
        threshold: float = 1e-5,
        skip_output_check: bool = False,
        skip_init_check: bool = False,
        verbose: bool = True,
    ) -> None:
        """`custom_layer_mapping` pairs source layer types with target ones beyond torch's basic layers;
        `threshold` bounds the norm of each layer's output difference; skipped keys are module names."""
        self.source_model = source_model
        self.target_model = target_model
        self.source_keys_to_skip = source_keys_to_skip or []
        self.target_keys_to_skip = target_keys_to_skip or []
        self.custom_layer_mapping = custom_layer_mapping or {}
        self.threshold = threshold
        self.skip_output_check = skip_output_check
        self.skip_init_check = skip_init_check
        self.verbose = verbose
        self.stage = ConversionStage.INIT
        self.messages: list[str] = []
        self._mapping: dict[str, str] | None = None

    def __repr__(self) -> str:
        return (
            f"ModelConverter(source_model={type(self.source_model).__name__}, "
            f"target_model={type(self.target_model).__name__}, stage={self.stage})"
        )

    def __bool__(self) -> bool:
        """Done: weights copied and, unless `skip_output_check`, outputs agreeing."""
        done = (
            ConversionStage.SHAPE_AND_LAYERS_MATCH
            if self.skip_output_check
            else ConversionStage.MODELS_OUTPUT_AGREE
        )
        return self.stage.value >= done.value

    def run(self, source_args: ModuleArgs, target_args: ModuleArgs | None = None) -> bool:
        """Pass the remaining stages on these inputs (`target_args` defaults to `source_args`); True when done."""
        target_args = source_args if target_args is None else target_args
        checks: dict[ConversionStage, Callable[[], bool]] = {
            ConversionStage.INIT: self._check_basic_layers,
            ConversionStage.BASIC_LAYERS_MATCH: lambda: self._copy_weights(source_args, target_args),
            ConversionStage.SHAPE_AND_LAYERS_MATCH: lambda: self._check_outputs(source_args, target_args),
        }
        while not self:
            if not checks[self.stage]():
                self._log(f"conversion stopped at stage {self.stage.name}")
                return False
            self.stage = ConversionStage(self.stage.value + 1)
            self._log(f"stage {self.stage.name} reached")
        if self.skip_output_check:
            self._log("outputs not compared (skip_output_check=True)")
        return True

    def get_state_dict(self) -> dict[str, Tensor]:
        """The target model's state dict, holding the converted weights."""
        self._ensure_done()
        return self.target_model.state_dict()

    def get_mapping(self) -> dict[str, str]:
        """Target module name -> source module name, for every paired basic layer."""
        self._ensure_done()
        assert self._mapping is not None
        return self._mapping

    def save_to_safetensors(
        self, path: Path | str, metadata: dict[str, str] | None = None, half: bool = False
    ) -> None:
        """Write the converted weights (in fp16 with `half`) to a safetensors file."""
        state_dict = self.get_state_dict()
        if half:
            state_dict = {key: value.half() for key, value in state_dict.items()}
        save_to_safetensors(path, state_dict, metadata=metadata)

    def map_state_dicts(
        self, source_args: ModuleArgs, target_args: ModuleArgs | None = None
    ) -> dict[str, str] | None:
        """Pair basic layers of one signature in execution order; None (reasons logged) when counts differ."""
        target_args = source_args if target_args is None else target_args
        source_order = self._trace_execution_order(
            self.source_model, source_args, self.source_keys_to_skip, True
        )
        target_order = self._trace_execution_order(
            self.target_model, target_args, self.target_keys_to_skip, False
        )
        mismatches: list[str] = []
        for signature in dict.fromkeys([*source_order, *target_order]):
            source_keys, target_keys = source_order.get(signature, []), target_order.get(signature, [])
            if len(source_keys) != len(target_keys):
                layer_type, shapes = signature
                mismatches.append(
                    f"{layer_type.__name__} with parameters {list(shapes)} runs {len(source_keys)} time(s) in "
                    f"the source {source_keys} and {len(target_keys)} in the target {target_keys}"
                )
        if mismatches:
            self._log("models do not have matching shapes:\n  " + "\n  ".join(mismatches))
            return None
        return {
            target_key: source_key
            for signature, source_keys in source_order.items()
            for target_key, source_key in zip(target_order[signature], source_keys)
        }

    def compare_models(
        self, source_args: ModuleArgs, target_args: ModuleArgs | None = None, threshold: float = 1e-5
    ) -> bool:
        """Compare each basic layer's output, in execution order, then the final outputs (norm of the difference)."""
        target_args = source_args if target_args is None else target_args
        source_output, source_layers = self._collect_outputs(
            self.source_model, source_args, self.source_keys_to_skip
        )
        target_output, target_layers = self._collect_outputs(
            self.target_model, target_args, self.target_keys_to_skip
        )
        if len(source_layers) != len(target_layers):
            self._log(f"the source runs {len(source_layers)} basic layers, the target {len(target_layers)}")
            return False
        previous = ("the inputs", "the inputs")
        for (source_key, source_value), (target_key, target_value) in zip(source_layers, target_layers):
            difference = torch.linalg.vector_norm(
                source_value - target_value.reshape(source_value.shape)
            ).item()
            if difference > threshold:
                self._log(
                    f"models diverge between {previous[0]} and {source_key} in the source, between "
                    f"{previous[1]} and {target_key} in the target: difference norm {difference:.3g} > {threshold:.3g}"
                )
                return False
            previous = (source_key, target_key)
        expected, actual = _first_tensor(source_output), _first_tensor(target_output)
        difference = torch.linalg.vector_norm(expected - actual.reshape(expected.shape)).item()
        if difference > threshold:
            self._log(
                f"final outputs differ after the last basic layers: norm {difference:.3g} > {threshold:.3g}"
            )
            return False
        self._log(f"models agree: final output difference norm {difference:.3g}")
        return True

    # -- Stages ------------------------------------------------------------------------------
    def _check_basic_layers(self) -> bool:
        """Same basic layers by type and count, and no weighted leaf layer that cannot be paired."""
        if self.skip_init_check:
            self._log("basic layers not counted (skip_init_check=True)")
            return True
        source_counts = Counter(
            self._target_type(layer_type)
            for layer_type in map(self._basic_type, self.source_model.modules())
            if layer_type is not None
        )
        target_counts = Counter(
            layer_type
            for layer_type in map(self._basic_type, self.target_model.modules())
            if layer_type is not None
        )
        differences = [
            f"{layer_type.__name__}: source {source_counts[layer_type]}, target {target_counts[layer_type]}"
            for layer_type in dict.fromkeys([*source_counts, *target_counts])
            if source_counts[layer_type] != target_counts[layer_type]
        ]
        if differences:
            self._log("models do not have the same basic layers:\n  " + "\n  ".join(differences))
        unpaired = {
            "source": self._unpaired_weighted_leaves(self.source_model),
            "target": self._unpaired_weighted_leaves(self.target_model),
        }
        if any(unpaired.values()):
            self._log(
                f"weighted layers that are not basic layers (add them to custom_layer_mapping or set "
                f"skip_init_check=True): source {unpaired['source']}, target {unpaired['target']}"
            )
        return not differences and not any(unpaired.values())

    def _copy_weights(self, source_args: ModuleArgs, target_args: ModuleArgs) -> bool:
        """Map the state dicts and load the source's weights into the target."""
        self._mapping = self.map_state_dicts(source_args, target_args)
        if self._mapping is None:
            return False
        source_state = self.source_model.state_dict()
        converted: dict[str, Tensor] = {}
        unmapped: list[str] = []
        for target_key, value in self.target_model.state_dict().items():
            prefix, _, suffix = target_key.rpartition(".")
            if prefix in self._mapping:
                source_prefix = self._mapping[prefix]
                converted[target_key] = source_state[f"{source_prefix}.{suffix}" if source_prefix else suffix]
            elif any(_is_under(prefix, skipped) for skipped in self.target_keys_to_skip):
                converted[target_key] = value  # a skipped layer keeps its own weights
            else:
                unmapped.append(target_key)
        if unmapped:
            self._log(
                f"target weights no traced source layer maps to (never run on these inputs?): {unmapped[:5]}"
            )
            return False
        self.target_model.load_state_dict(converted)
        return True

    def _check_outputs(self, source_args: ModuleArgs, target_args: ModuleArgs) -> bool:
        try:
            return self.compare_models(source_args, target_args, threshold=self.threshold)
        except (RuntimeError, ValueError, TypeError) as error:
            self._log(f"comparing the models failed: {error}")
            return False

    # -- Tracing -----------------------------------------------------------------------------
    def _basic_type(self, module: nn.Module) -> type[nn.Module] | None:
        layer_types = (*self.custom_layer_mapping, *self.custom_layer_mapping.values(), *TORCH_BASIC_LAYERS)
        return next((layer_type for layer_type in layer_types if isinstance(module, layer_type)), None)

    def _target_type(self, source_type: type[nn.Module]) -> type[nn.Module]:
        return self.custom_layer_mapping.get(source_type, source_type)

    def _unpaired_weighted_leaves(self, model: nn.Module) -> list[str]:
        return [
            type(module).__name__
            for module in model.modules()
            if next(module.children(), None) is None
            and next(module.parameters(), None) is not None
            and self._basic_type(module) is None
        ]

    def _basic_layers(self, model: nn.Module, keys_to_skip: list[str]) -> dict[nn.Module, str]:
        return {
            module: name
            for name, module in model.named_modules()
            if self._basic_type(module) is not None and name not in keys_to_skip
        }

    def _trace_execution_order(
        self, model: nn.Module, args: ModuleArgs, keys_to_skip: list[str], is_source: bool
    ) -> dict[LayerSignature, list[str]]:
        """Run `model` once; basic layers' names by signature, in first-execution order."""
        order: defaultdict[LayerSignature, list[str]] = defaultdict(list)
        names = self._basic_layers(model, keys_to_skip)
        seen: set[nn.Module] = set()

        def record(module: nn.Module, _inputs: Any) -> None:
            if module in seen:
                return
            seen.add(module)
            layer_type = self._basic_type(module)
            assert layer_type is not None
            shapes = tuple(tuple(param.shape) for param in module.parameters())
            order[(self._target_type(layer_type) if is_source else layer_type, shapes)].append(names[module])

        _run_with_hooks(model, args, [module.register_forward_pre_hook(record) for module in names])
        return dict(order)

    def _collect_outputs(
        self, model: nn.Module, args: ModuleArgs, keys_to_skip: list[str]
    ) -> tuple[Any, list[tuple[str, Tensor]]]:
        """Run `model` once; its output and each basic layer call's (name, output copy), in order."""
        names = self._basic_layers(model, keys_to_skip)
        outputs: list[tuple[str, Tensor]] = []

        def record(module: nn.Module, _inputs: Any, output: Tensor) -> None:
            outputs.append((names[module], output.detach().clone()))

        handles = [module.register_forward_hook(record) for module in names]
        return _run_with_hooks(model, args, handles), outputs

    # -- Reporting ---------------------------------------------------------------------------
    def _ensure_done(self) -> None:
        if not self:
            raise ValueError(
                f"the conversion is not done (stage {self.stage.name}): run `converter.run(args)` first"
            )

    def _log(self, message: str) -> None:
        self.messages.append(message)
        if self.verbose:
            print(message)


def _run_with_hooks(model: nn.Module, args: ModuleArgs, handles: list[RemovableHandle]) -> Any:
    """Call `model` without gradients, then remove the hooks (also when it raises)."""
    if isinstance(args, dict) and set(args) == {"positional", "keyword"}:
        positional, keyword = tuple(args["positional"]), dict(args["keyword"])
    elif isinstance(args, dict):
        positional, keyword = (), args
    else:
        positional, keyword = tuple(args), {}
    try:
        with torch.no_grad():
            return model(*positional, **keyword)
    finally:
        for handle in handles:
            handle.remove()


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
