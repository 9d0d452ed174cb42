"""Registries: named, pluggable parts (policies, substitutes, export targets, runtimes, peers, sweep curves).

A new part is one module that defines it plus one registration (``REGISTRY.register(name, part)`` or the
decorator form). Looking up an unknown name is one clear error line naming what is known.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import SkipToolError

T = TypeVar("T")


class Registry(Generic[T]):
    """Parts of one kind by name, in registration order."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add `item` under `name` (a name is registered once)."""
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = item
        return item

    def add(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`register`."""
        return lambda item: self.register(name, item)

    def get(self, name: str) -> T:
        """The part named `name`, or a :class:`SkipToolError` listing the known names."""
        try:
            return self._items[name]
        except KeyError:
            raise SkipToolError(f"unknown {self.what} {name!r} (known: {', '.join(self._items) or 'none'})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())
