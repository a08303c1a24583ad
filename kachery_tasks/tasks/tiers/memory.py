"""The memory tier: a per-process LRU of results, bounded in bytes, in front of the store.

One LRU per process (:data:`MEMORY`), shared by the homes in use and keyed by home and task id;
a :class:`MemoryTier` is one home's view of it.

It holds what can make a fresh value per hit, so a caller that mutates its result cannot damage
the cache: encoded bytes (decoded afresh) and the paths of verified ``.npy`` blobs (mapped afresh,
copy-on-write).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

from ... import config
from ..results import from_memo
from .base import ABSENT, Hit, Miss, Tier


class MemoryCache:
    """Results by (home, task id), least recently used dropped first once over the byte limit."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, home: str, task_id: str) -> Any | None:
        key = (home, task_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, home: str, task_id: str, value: Any, nbytes: int, limit: int) -> None:
        if nbytes > limit:
            return
        key = (home, task_id)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > limit and self._entries:
                _, (_, size) = self._entries.popitem(last=False)
                self._bytes -= size

    def discard(self, home: str, task_id: str) -> None:
        with self._lock:
            old = self._entries.pop((home, task_id), None)
            if old is not None:
                self._bytes -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


MEMORY = MemoryCache()


class MemoryTier(Tier):
    """One home's results in this process's :data:`MEMORY`."""

    name = "memory"

    def __init__(self, home: str):
        self.home = home

    def get(self, task_id: str) -> Hit | Miss:
        memo = MEMORY.get(self.home, task_id)
        if memo is None:
            return ABSENT
        return Hit(from_memo(memo), memo, 0, None, None)

    def missing(self, task_ids: Collection[str]) -> set[str]:
        return {t for t in task_ids if MEMORY.get(self.home, t) is None}

    def put(self, task_id: str, hit: Hit) -> None:
        MEMORY.put(self.home, task_id, hit.memo, hit.nbytes, config.get("memory_cache_bytes"))
