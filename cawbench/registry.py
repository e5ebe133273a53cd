"""Name -> object registries in the style of timm/torchvision.

Every registry refuses duplicate names and answers an unknown name with an error that lists the valid
ones, so a typo on the command line is answered with the choices instead of a stack trace.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate name in a registry (a KeyError whose message reads well)."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain sentence
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named collection of builders/objects of one kind (methods, datasets, architectures, readouts)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")``. Fails if the name is taken."""

        def decorate(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T) -> None:
        if not name or name != name.strip():
            raise RegistryError(f"invalid {self.kind} name {name!r}")
        if name in self._items:
            raise RegistryError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none registered)"
            raise RegistryError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None

    def names(self, filter: str = "*", exclude: str | None = None) -> list[str]:
        """Sorted names matching an fnmatch pattern (and not matching ``exclude``)."""
        out = [n for n in self._items if fnmatch.fnmatch(n, filter)]
        if exclude:
            out = [n for n in out if not fnmatch.fnmatch(n, exclude)]
        return sorted(out)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
