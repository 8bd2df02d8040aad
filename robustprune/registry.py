"""Name -> object registries. Adding a dataset, model, regime, pruning method or attack is one
decorated function or class in its own module; nothing else in the tree changes."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from robustprune.errors import UserError, closest, excerpt

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            text = doc or (getattr(obj, "__doc__", None) or "").strip()
            self._docs[name] = text.splitlines()[0] if text else ""
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserError(f"unknown {self.kind} '{excerpt(name)}'; {closest(name, self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> list[tuple[str, str]]:
        return [(n, self._docs[n]) for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._items
