"""A tiny name -> component registry, filled by decorators (in the style of peft).

Each kind of pluggable component (task types / heads, samplers, loss weightings, metrics) has
one `Registry`. Registering a name twice is a bug; asking for an unknown name is a user mistake
and raises a `UserError` that lists the known names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from mtnlp.utils.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to components of one kind, e.g. `HEADS = Registry("task type")`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@HEADS.register("classification")` adds the decorated object under `name`."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        """The component registered as `name` (unknown: a `UserError` listing the known names)."""
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        return f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
