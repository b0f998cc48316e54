"""Named entries filled by decorators: methods, weights formats, evaluation protocols. A second
entry under a taken name is an error; looking up an unknown name names the closest one."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict):
    """A ``dict`` of named entries (``what`` names them in errors: "method", "weights format")."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def add(self, name: str, entry: Any, same: Callable[[Any], Any] | None = None) -> None:
        """Add ``entry``; ``same(entry)`` identifies an entry that may be added again (a module imported twice)."""
        old = self.get(name)
        if old is not None and (same is None or same(old) != same(entry)):
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry

    def register(self, name: str) -> Callable[[T], T]:
        """``@registry.register("name")``: the decorated object is the entry."""
        def wrap(entry: T) -> T:
            self.add(name, entry)
            return entry

        return wrap

    def names(self) -> list[str]:
        return sorted(self)

    def lookup(self, name: str) -> Any:
        """The entry of ``name``, or a ``ValueError`` naming the closest names (or all of them)."""
        if name not in self:
            match = difflib.get_close_matches(str(name), list(self), n=1)
            hint = f" (did you mean {match[0]!r}?)" if match else f" (available: {', '.join(self.names())})"
            raise ValueError(f"unknown {self.what} {name!r}{hint}")
        return self[name]
