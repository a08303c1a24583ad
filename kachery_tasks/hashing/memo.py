"""Memoizing by object identity, for objects that cannot be dict keys or must not be compared.

A hit requires the very same object (``is``), and the memo holds a strong reference to it, so an
``id`` is never reused by another object while its entry exists. Bounded: when full it starts over,
which costs only recomputation (notebooks redefine functions and classes endlessly).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class IdentityMemo(Generic[V]):
    def __init__(self, limit: int = 8192) -> None:
        self._entries: dict[int, tuple[Any, V]] = {}
        self._limit = limit

    def get(self, obj: Any) -> V | None:
        hit = self._entries.get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj else None

    def put(self, obj: Any, value: V) -> V:
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[id(obj)] = (obj, value)
        return value

    def get_or_compute(self, obj: Any, compute: Callable[[Any], V]) -> V:
        found = self.get(obj)
        return found if found is not None else self.put(obj, compute(obj))
