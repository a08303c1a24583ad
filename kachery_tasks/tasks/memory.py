"""The memory tier: a per-process LRU of results, bounded in bytes, in front of the store.

It holds what can make a fresh value per hit, so a caller that mutates its result cannot damage
the cache: encoded bytes (decoded afresh) and the paths of verified ``.npy`` blobs (mapped afresh,
copy-on-write).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class MemoryTier:
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


MEMORY = MemoryTier()
