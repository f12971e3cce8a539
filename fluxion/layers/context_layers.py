"""SetContext / UseContext: pass data to deeply nested layers without threading it through calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .module import ContextModule


class UseContext(ContextModule):
    """Outputs `context[key]` of the tree this layer belongs to (its input is ignored)."""

    def __init__(self, context: str, key: str) -> None:
        super().__init__()
        self.context = context
        self.key = key
        self.func: Callable[[Any], Any] = lambda x: x

    def forward(self, *args: Any) -> Any:
        context = self.use_context(self.context)
        if self.key not in context:
            raise KeyError(f"key {self.key!r} is not in context {self.context!r} (it has {sorted(context)})")
        return self.func(context[self.key])

    def compose(self, func: Callable[[Any], Any]) -> UseContext:
        """Apply `func` to the context value before returning it."""
        self.func = func
        return self


class SetContext(ContextModule):
    """Stores its input in `context[key]` (or applies `callback(value, input)`) and passes it on."""

    def __init__(self, context: str, key: str, callback: Callable[[Any, Any], Any] | None = None) -> None:
        super().__init__()
        self.context = context
        self.key = key
        self.callback = callback

    def forward(self, x: Any, *args: Any) -> Any:
        context = self.use_context(self.context)
        if self.callback is not None:
            self.callback(context[self.key], x)
        else:
            context.update({self.key: x})
        return (x, *args) if args else x
