"""Chain and its composition variants: the declarative backbone of every fluxion model."""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, overload

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ..context import ContextProvider, Contexts
from .module import ContextModule, Module, WeightedModule, tensor_summary

T = TypeVar("T", bound=Module)
TChain = TypeVar("TChain", bound="Chain")

# Exceptions a layer may raise that get re-raised with the layer's place in the tree. Anything
# else (cancellation, keyboard interrupt, ...) passes through untouched.
_LOCATED_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError, KeyError, AttributeError)

# Out-of-memory errors reach the caller as themselves, only noted with the failing layer's place:
# hosts catch them by type (ComfyUI's OOM_EXCEPTION) to free models and retry. The CUDA one is a
# RuntimeError, so it is checked first.
_OUT_OF_MEMORY_ERRORS = (
    torch.cuda.OutOfMemoryError,
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),  # the same class in torch >= 2.5
    MemoryError,
)
_LOCATION_NOTE = "fluxion: raised in "


class ChainError(RuntimeError):
    """A layer failed: the message says where in the tree, its state-dict key and its inputs."""


def generate_unique_names(modules: Iterable[Module]) -> dict[str, Module]:
    """Name children by class: `Linear` when alone, `Linear_1`, `Linear_2`, ... when repeated."""
    modules = list(modules)
    counts: dict[str, int] = defaultdict(int)
    for module in modules:
        counts[type(module).__name__] += 1
    seen: dict[str, int] = defaultdict(int)
    named: dict[str, Module] = {}
    for module in modules:
        name = type(module).__name__
        if counts[name] > 1:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        named[name] = module
    return named


class Chain(ContextModule):
    """Children run in order, each one's output feeding the next (tuples are unpacked)."""

    _modules: dict[str, Module]  # type: ignore[assignment]
    _provider: ContextProvider
    _tag = "CHAIN"

    def __init__(self, *args: Module | Iterable[Module]) -> None:
        super().__init__()
        self._provider = ContextProvider()
        modules: list[Module] = []
        for arg in args:
            if isinstance(arg, torch.nn.Module):
                modules.append(arg)  # type: ignore[arg-type]
            else:
                modules.extend(arg)
        for module in modules:
            if not isinstance(module, Module):
                raise TypeError(f"{type(self).__name__} children must be fluxion Modules, got {type(module)}")
        self._regenerate_keys(modules)
        self._reset_context()
        for module in self:
            if isinstance(module, ContextModule):
                module._set_parent(self)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, torch.nn.Module):
            if not name.startswith("_"):
                raise ValueError(
                    f"cannot set {name!r} on {type(self).__name__}: a Chain's children are ordered, "
                    "use append/insert/replace instead"
                )
            object.__setattr__(self, name, value)  # a private reference, not a child
            return
        super().__setattr__(name, value)

    # -- Context API -------------------------------------------------------------------------
    def init_context(self) -> Contexts:
        """Default contexts this Chain needs; merged into the tree's store when attached."""
        return {}

    def _reset_context(self) -> None:
        self._provider = ContextProvider.create(self.init_context())

    @property
    def provider(self) -> ContextProvider:
        """The context store of the tree's root."""
        root: Chain = self
        while root.parent is not None:
            root = root.parent
        return root._provider

    def set_context(self, context: str, value: dict[str, Any]) -> None:
        """Write a named context, read by `UseContext` layers anywhere in the tree."""
        self.provider.set_context(context, value)

    def use_context(self, context_name: str) -> dict[str, Any]:
        context = self.provider.get_context(context_name)
        if context is None:
            raise KeyError(
                f"context {context_name!r} is not set (call set_context({context_name!r}, {{...}}))"
            )
        return context

    def _set_parent(self, parent: Chain | None) -> None:
        super()._set_parent(parent)
        if parent is not None and self._can_refresh_parent:
            parent.provider.update_contexts(self._provider.contexts)

    # -- Running -----------------------------------------------------------------------------
    def forward(self, *args: Any) -> Any:
        result: Any = args
        for name, layer in self._modules.items():
            if isinstance(layer, Return):
                break
            inputs = result if isinstance(result, tuple) else (result,)
            result = self._call_layer(layer, name, *inputs)
        if isinstance(result, tuple) and len(result) == 1:
            return result[0]
        return result

    def _call_layer(self, layer: Module, name: str, *args: Any) -> Any:
        try:
            return layer(*args)
        except ChainError:
            raise
        except _OUT_OF_MEMORY_ERRORS as error:
            self._note_location(layer, name, error)
            raise
        except _LOCATED_ERRORS as error:
            raise ChainError(self._describe_failure(layer, name, args, error)) from error

    def _locate(self, name: str) -> tuple[str, str]:
        """The tree path (`Root.Chain.Linear_2`) and state-dict key (`Chain.Linear_2`) of child `name`."""
        parents = [self, *self.get_parents()]
        key_parts: list[str] = [name]
        node: Chain = self
        for parent in parents[1:]:
            key_parts.append(next(key for key, child in parent._modules.items() if child is node))
            node = parent
        state_key = ".".join(reversed(key_parts))
        return f"{type(parents[-1]).__name__}.{state_key}", state_key

    def _note_location(self, layer: Module, name: str, error: BaseException) -> None:
        """Note the innermost failing layer on `error` (host memory only, once, never fatal)."""
        try:
            if not any(note.startswith(_LOCATION_NOTE) for note in getattr(error, "__notes__", ())):
                path, state_key = self._locate(name)
                error.add_note(
                    f"{_LOCATION_NOTE}{path} (a {type(layer).__name__}, state-dict key {state_key!r})"
                )
        except MemoryError:
            pass  # the host is out of memory too: the error itself matters more than the note

    def _describe_failure(self, layer: Module, name: str, args: tuple[Any, ...], error: Exception) -> str:
        root = self.get_parents()[-1] if self.parent is not None else self
        path, state_key = self._locate(name)
        inputs = "\n".join(f"  input {index}: {tensor_summary(arg)}" for index, arg in enumerate(args))
        siblings = "\n".join(
            f"  {'>>' if child is layer else '  '} {key}: {child.describe() if not isinstance(child, Chain) else type(child).__name__}"
            for key, child in self._modules.items()
        )
        return (
            f"{type(error).__name__} in {path} (a {type(layer).__name__}, state-dict key {state_key!r} "
            f"of {type(root).__name__}): {error}\n"
            f"{inputs}\n"
            f"in {type(self).__name__}:\n{siblings}"
        )

    # -- Access ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __contains__(self, module: object) -> bool:
        return any(child is module for child in self)

    @overload
    def __getitem__(self, key: int) -> Module: ...
    @overload
    def __getitem__(self, key: str) -> Module: ...
    @overload
    def __getitem__(self, key: slice) -> Chain: ...
    def __getitem__(self, key: int | str | slice) -> Module | Chain:
        if isinstance(key, slice):
            return Chain(*(module.structural_copy() for module in list(self)[key]))
        if isinstance(key, str):
            return self._modules[key]
        return list(self)[key]

    def __bool__(self) -> bool:
        return True

    @property
    def device(self) -> Device | None:
        weighted = next(iter(self.layers(WeightedModule)), None)
        return weighted.device if weighted is not None else None

    @property
    def dtype(self) -> DType | None:
        weighted = next(iter(self.layers(WeightedModule)), None)
        return weighted.dtype if weighted is not None else None

    def walk(
        self,
        predicate: type[T] | Callable[[Module, Chain], bool] | None = None,
        recurse: bool = False,
    ) -> Iterator[tuple[Any, Chain]]:
        """Yield `(module, parent)` for every matching module below this Chain.

        `predicate` is a type or a function of (module, parent). Matches are not descended
        into unless `recurse` is True. A predicate raising StopIteration prunes that module and
        everything below it; the walk goes on with its siblings (as refiners' walk does).
        """
        if predicate is None:
            predicate = Module
        if isinstance(predicate, type):
            wanted_type = predicate

            def matches(module: Module, parent: Chain) -> bool:
                return isinstance(module, wanted_type)
        else:
            matches = predicate
        for module in self:
            try:
                found = matches(module, self)
            except StopIteration:
                continue
            if found:
                yield module, self
            if isinstance(module, Chain) and (recurse or not found):
                yield from module.walk(matches, recurse)

    def layers(self, layer_type: type[T], recurse: bool = False) -> Iterator[T]:
        """Every module of a type below this Chain."""
        for module, _ in self.walk(layer_type, recurse):
            yield module

    def find(self, layer_type: type[T]) -> T | None:
        return next(self.layers(layer_type), None)

    def ensure_find(self, layer_type: type[T]) -> T:
        module = self.find(layer_type)
        if module is None:
            raise ValueError(f"no {layer_type.__name__} in {type(self).__name__}")
        return module

    def find_parent(self, module: Module) -> Chain | None:
        """The Chain (this one or below) that directly holds `module`."""
        if module in self:
            return self
        for chain in self.layers(Chain):
            parent = chain.find_parent(module)
            if parent is not None:
                return parent
        return None

    # -- Editing -----------------------------------------------------------------------------
    def _regenerate_keys(self, modules: Iterable[Module]) -> None:
        self._modules = generate_unique_names(modules)  # type: ignore[assignment]

    def _attach(self, module: Module) -> None:
        if isinstance(module, ContextModule):
            module._set_parent(self)

    def insert(self, index: int, module: Module) -> None:
        modules = list(self)
        if index < 0:
            index = max(0, len(modules) + index + 1)
        modules.insert(index, module)
        self._regenerate_keys(modules)
        self._attach(module)

    def append(self, module: Module) -> None:
        self.insert(len(self), module)

    def insert_before_type(self, module_type: type[Module], new_module: Module) -> None:
        for index, module in enumerate(self):
            if isinstance(module, module_type):
                self.insert(index, new_module)
                return
        raise ValueError(f"no {module_type.__name__} in {type(self).__name__}")

    def insert_after_type(self, module_type: type[Module], new_module: Module) -> None:
        for index, module in enumerate(self):
            if isinstance(module, module_type):
                self.insert(index + 1, new_module)
                return
        raise ValueError(f"no {module_type.__name__} in {type(self).__name__}")

    def pop(self, index: int = -1) -> Module:
        modules = list(self)
        module = modules.pop(index)
        self._regenerate_keys(modules)
        if isinstance(module, ContextModule):
            module._set_parent(None)
        return module

    def remove(self, module: Module) -> None:
        for index, child in enumerate(self):
            if child is module:
                self.pop(index)
                return
        raise ValueError(f"{type(module).__name__} is not a child of {type(self).__name__}")

    def replace(self, old_module: Module, new_module: Module, old_module_parent: Chain | None = None) -> None:
        """Put `new_module` where `old_module` is (same position); `old_module` is detached."""
        modules = list(self)
        for index, child in enumerate(modules):
            if child is old_module:
                modules[index] = new_module
                break
        else:
            raise ValueError(f"{type(old_module).__name__} is not a child of {type(self).__name__}")
        self._regenerate_keys(modules)
        if isinstance(old_module, ContextModule):
            old_module._set_parent(old_module_parent)
        self._attach(new_module)

    def structural_copy(self: TChain) -> TChain:
        """A new tree of Chains over the same leaf layers: adapt it without touching the original.

        Raises RuntimeError when the tree holds an adapter whose target is a Chain (eject it first).
        """
        return self._copy_tree({})

    def _copy_tree(self: TChain, memo: dict[int, Module]) -> TChain:
        refuse_copy = getattr(self, "_refuse_structural_copy", None)  # adapters of Chains say no
        if refuse_copy is not None:
            refuse_copy()
        clone = object.__new__(type(self))
        clone.__dict__ = self.__dict__.copy()
        clone._parameters = dict(self._parameters)
        clone._buffers = dict(self._buffers)
        clone._parent = []
        clone._provider = ContextProvider.create(self._provider.contexts)
        children: dict[str, Module] = {}
        for key, module in self._modules.items():
            copied = module._copy_tree(memo) if isinstance(module, Chain) else module.structural_copy()
            memo[id(module)] = copied
            children[key] = copied
        clone._modules = children  # type: ignore[assignment]
        memo[id(self)] = clone
        for module in clone:
            if isinstance(module, ContextModule):
                module._set_parent(clone)
        remap_references = getattr(clone, "_remap_references", None)  # adapters point at their target
        if remap_references is not None:
            remap_references(memo)
        return clone

    # -- Display -----------------------------------------------------------------------------
    def describe(self) -> str:
        parts = ", ".join(self.description_parts())
        return f"({self._tag}) {type(self).__name__}({parts})"

    def tree_lines(self, prefix: str = "") -> list[str]:
        """The tree under this Chain; runs of identical sibling subtrees are shown once, with a count."""
        children = list(self._modules.items())
        rendered = [
            (child.tree_lines() if isinstance(child, Chain) else [child.describe()]) for _, child in children
        ]
        groups: list[tuple[str, list[str], int]] = []
        for (key, _), lines in zip(children, rendered):
            if groups and groups[-1][1] == lines:
                first_key, first_lines, count = groups[-1]
                groups[-1] = (first_key, first_lines, count + 1)
            else:
                groups.append((key, lines, 1))
        out = [self.describe()]
        for index, (_, lines, count) in enumerate(groups):
            last = index == len(groups) - 1
            label = f"(x{count}) " if count > 1 else ""
            out.append(f"{'└── ' if last else '├── '}{label}{lines[0]}")
            out.extend(f"{'    ' if last else '│   '}{line}" for line in lines[1:])
        return out

    def __repr__(self) -> str:
        return "\n".join(self.tree_lines())

    def __str__(self) -> str:
        return repr(self)


class Passthrough(Chain):
    """Runs its children for their side effects (e.g. SetContext) and returns its inputs."""

    _tag = "PASS"

    def forward(self, *inputs: Any) -> Any:
        super().forward(*inputs)
        return inputs[0] if len(inputs) == 1 else inputs


class Sum(Chain):
    """Every child gets the same inputs; their outputs are added."""

    _tag = "SUM"

    def forward(self, *inputs: Any) -> Any:
        output: Any = None
        for name, layer in self._modules.items():
            layer_output = self._call_layer(layer, name, *inputs)
            if output is None:
                output = layer_output
            elif isinstance(output, tuple):
                output = tuple(a + b for a, b in zip(output, layer_output))
            else:
                output = output + layer_output
        return output


class Residual(Chain):
    """Skip connection: `x + chain(x)`."""

    _tag = "RES"

    def forward(self, *inputs: Any) -> Any:
        return super().forward(*inputs) + inputs[0]


class Parallel(Chain):
    """Every child gets the same inputs; their outputs form a tuple."""

    _tag = "PAR"

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        return tuple(self._call_layer(layer, name, *inputs) for name, layer in self._modules.items())


class Distribute(Chain):
    """Child i gets input i."""

    _tag = "DISTR"

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        if len(inputs) != len(self):
            raise ValueError(f"Distribute has {len(self)} children but got {len(inputs)} inputs")
        return tuple(
            self._call_layer(layer, name, item) for (name, layer), item in zip(self._modules.items(), inputs)
        )


class Concatenate(Chain):
    """Every child gets the same inputs; their outputs are concatenated along `dim`."""

    _tag = "CAT"

    def __init__(self, *modules: Module, dim: int = 0) -> None:
        super().__init__(*modules)
        self.dim = dim

    def forward(self, *inputs: Any) -> Tensor:
        outputs = [self._call_layer(layer, name, *inputs) for name, layer in self._modules.items()]
        return torch.cat([output for output in outputs if output is not None], dim=self.dim)


class Matmul(Chain):
    """`input(x) @ other(x)`."""

    _tag = "MATMUL"

    def __init__(self, input: Module, other: Module) -> None:
        super().__init__(input, other)

    def forward(self, *inputs: Any) -> Tensor:
        return torch.matmul(self[0](*inputs), self[1](*inputs))


class Lambda(Module):
    """Wraps a plain function as a layer."""

    def __init__(self, func: Callable[..., Any]) -> None:
        super().__init__()
        self.func = func

    def forward(self, *args: Any) -> Any:
        return self.func(*args)

    def description_parts(self) -> list[str]:
        name = getattr(self.func, "__name__", type(self.func).__name__)
        if name == "<lambda>":
            try:
                name = inspect.getsource(self.func).strip()
            except (OSError, TypeError):
                pass
        return [name]


class Return(Module):
    """Stops the enclosing Chain, which returns this layer's input."""

    def forward(self, x: Any) -> Any:
        return x
