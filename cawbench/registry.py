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

    def __init__(self, kind: str, loader: Callable[[], object] | None = None) -> None:
        """``loader``: called before the first lookup, to import the modules that register entries (e.g.
        every method file, which also registers the architecture plans it brings)."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader
        self._loaded = loader is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a module being imported may look entries up itself
            try:
                self._loader()
            except BaseException:
                self._loaded = False
                raise

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
        self._load()
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none registered)"
            raise RegistryError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None

    def names(self, filter: str = "*", exclude: str | None = None) -> list[str]:
        """Sorted names matching an fnmatch pattern (and not matching ``exclude``)."""
        self._load()
        out = [n for n in self._items if fnmatch.fnmatch(n, filter)]
        if exclude:
            out = [n for n in out if not fnmatch.fnmatch(n, exclude)]
        return sorted(out)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def remove(self, name: str) -> None:
        """Take an entry out again (for test-only entries); unknown names are an error."""
        if name not in self._items:
            raise RegistryError(f"{self.kind} {name!r} is not registered")
        del self._items[name]
