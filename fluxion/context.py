"""The Context API's store: named dictionaries shared by every layer of one tree."""

from __future__ import annotations

from typing import Any

Context = dict[str, Any]
Contexts = dict[str, Context]


class ContextProvider:
    """Holds the contexts of a tree; the root Chain owns the one its layers read."""

    def __init__(self) -> None:
        self.contexts: Contexts = {}

    def set_context(self, key: str, value: Context) -> None:
        self.contexts[key] = value

    def get_context(self, key: str) -> Context | None:
        return self.contexts.get(key)

    def update_contexts(self, new_contexts: Contexts) -> None:
        """Merge values into existing contexts (new context names are added)."""
        for key, value in new_contexts.items():
            if key in self.contexts:
                self.contexts[key].update(value)
            else:
                self.contexts[key] = dict(value)

    @staticmethod
    def create(contexts: Contexts) -> ContextProvider:
        provider = ContextProvider()
        provider.update_contexts(contexts)
        return provider

    def __repr__(self) -> str:
        return f"ContextProvider({sorted(self.contexts)})"
