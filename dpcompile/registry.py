"""A named registry (strategies, site kinds): records with a `name`, kept in registration order. Imports nothing
from dpcompile, so any layer can hold one."""
from __future__ import annotations

from typing import Optional


class Registry:
    def __init__(self, what: str):
        self.what = what  # "strategy", "site kind": for messages
        self._items: dict = {}

    def register(self, item, replace: bool = False):
        """Add `item` (user code may call this before compiling); replace=True swaps a record of the same name."""
        if item.name in self._items and not replace:
            raise ValueError(f"{self.what} {item.name!r} is already registered")
        self._items[item.name] = item
        return item

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str):
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; registered: {sorted(self._items)}") from None

    def find(self, name: str) -> Optional[object]:
        return self._items.get(name)

    def values(self) -> list:
        return list(self._items.values())
