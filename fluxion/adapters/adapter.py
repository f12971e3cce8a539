"""The Adapter API: a Chain that takes the place of a target layer and can give it back exactly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from ..layers.chain import Chain
from ..layers.module import ContextModule, Module

T = TypeVar("T", bound=Module)
TAdapter = TypeVar("TAdapter", bound="Adapter[Any]")


class Adapter(Generic[T]):
    """Mixin for a Chain that wraps a target: `inject(parent)` swaps it in, `eject()` swaps it out.

    Subclasses build themselves inside `with self.setup_adapter(target): super().__init__(...)`,
    with the target among their children. Adapters compose: an adapter may target a layer that
    is already adapted, and adapters can be ejected in any order.
    """

    _target: list[T]

    @contextmanager
    def setup_adapter(self, target: T) -> Iterator[None]:
        """Build the adapter around `target` without taking the target away from its parent."""
        if not isinstance(self, Chain):
            raise TypeError(f"{type(self).__name__}: an Adapter must also be a Chain")
        frozen = isinstance(target, ContextModule) and target._can_refresh_parent
        if frozen:
            target._can_refresh_parent = False  # type: ignore[union-attr]
        try:
            yield
        finally:
            if frozen:
                target._can_refresh_parent = True  # type: ignore[union-attr]
        self._target = [target]

    @property
    def target(self) -> T:
        """The layer this adapter adapts."""
        return self._target[0]

    def _occupant(self) -> Module:
        """The child standing in the target's place: the target, or an adapter wrapping it."""
        assert isinstance(self, Chain)
        for child in self:
            if _wraps(child, self.target):
                return child
        raise ValueError(f"{type(self).__name__} no longer holds its target {type(self.target).__name__}")

    def inject(self: TAdapter, parent: Chain | None = None) -> TAdapter:
        """Replace the target by this adapter in `parent` (default: the target's parent)."""
        assert isinstance(self, Chain)
        target = self.target
        if self.parent is not None:
            raise ValueError(f"{type(self).__name__} is already injected in {type(self.parent).__name__}")
        if parent is None:
            parent = target.parent if isinstance(target, ContextModule) else None
            if parent is None:
                raise ValueError(
                    f"{type(self).__name__}: pass the Chain holding the {type(target).__name__} to inject(parent)"
                )
        if target not in parent:
            raise ValueError(
                f"{type(self).__name__}: the target {type(target).__name__} is not a child of {type(parent).__name__}"
            )
        parent.replace(old_module=target, new_module=self)
        if isinstance(target, ContextModule):
            target._set_parent(self)
        return self

    def eject(self) -> None:
        """Put back what this adapter replaced (its target, or another adapter now wrapping it)."""
        assert isinstance(self, Chain)
        parent = self.parent
        if parent is None:
            raise ValueError(f"{type(self).__name__} is not injected")
        parent.replace(old_module=self, new_module=self._occupant())

    def _refuse_structural_copy(self) -> None:
        """Refuse to copy an adapter of a Chain, as refiners does: the references it holds into the
        tree (its target, what wraps it, private layers) cannot be kept consistent by a copy in general."""
        if isinstance(self.target, Chain):
            raise RuntimeError(
                f"Chain adapters ({type(self).__name__} on a {type(self.target).__name__}) cannot be "
                "structurally copied: eject them first"
            )

    def _remap_references(self, memo: dict[int, Module]) -> None:
        """After a structural copy, point at the copy of the target."""
        self._target = [memo.get(id(self.target), self.target)]  # type: ignore[list-item]


def _wraps(module: Module, target: Module) -> bool:
    if module is target:
        return True
    return (
        isinstance(module, Adapter)
        and isinstance(module, Chain)
        and any(_wraps(child, target) for child in module)
    )
