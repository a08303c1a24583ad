"""CountingBucket: a bucket wrapper that counts (and can slow) what crosses it, for transfer tests.

Nothing of kachery's is mocked: every call goes on to the real bucket. ``writes``/``reads`` count
bytes by key (a write that raised, ``AlreadyExists`` included, counts in ``refused``), ``calls``
counts calls by method. With ``delay`` each write, and each block read, waits that many seconds
first (so a test can kill a process mid-transfer); with ``log`` every completed write and every
block read is also appended to that file as ``write|read <key> <bytes>``, one line each, so a
parent process sees what a child it killed had moved.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from kachery_tasks.buckets import Bucket, ObjectInfo
from kachery_tasks.buckets.base import join_data


class CountingBucket(Bucket):
    def __init__(self, inner: Bucket, delay: float = 0.0, log: str | None = None):
        super().__init__(inner.uri, read_only=inner.read_only)
        self.inner = inner
        self.delay = delay
        self.writes: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.reads: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._log = None if log is None else os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _note(self, op: str, key: str, n: int) -> None:
        with self._lock:
            (self.writes if op == "write" else self.reads)[key] += n
        if self._log is not None:
            os.write(self._log, f"{op} {key} {n}\n".encode())

    def _count(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1

    def stat(self, key: str) -> ObjectInfo | None:
        self._count("stat")
        return self.inner.stat(key)

    def exists_many(self, keys: Iterable[str]) -> dict[str, ObjectInfo]:
        self._count("exists_many")
        return self.inner.exists_many(keys)

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        self._count("read")
        return self._counted(key, self.inner.read(key, start, end))

    def _counted(self, key: str, blocks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            for block in blocks:
                if self.delay:
                    time.sleep(self.delay)
                self._note("read", key, len(block))
                yield block
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()

    def write(self, key, data):
        self._count("write")
        data = join_data(data)
        if self.delay:
            time.sleep(self.delay)
        try:
            info = self.inner.write(key, data)
        except Exception:
            with self._lock:
                self.refused[key] += len(data)
            raise
        self._note("write", key, len(data))
        return info

    def write_if_generation(self, key, data, generation):
        self._count("write_if_generation")
        return self.inner.write_if_generation(key, data, generation)

    def delete(self, key: str) -> bool:
        self._count("delete")
        return self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._count("list")
        return self.inner.list(prefix)

    def close(self) -> None:
        if self._log is not None:
            os.close(self._log)
            self._log = None
        self.inner.close()

    def moved(self, prefix: str = "sha256/") -> tuple[int, int]:
        """Bytes (written, read) of keys starting with ``prefix``."""
        with self._lock:
            return (sum(n for k, n in self.writes.items() if k.startswith(prefix)),
                    sum(n for k, n in self.reads.items() if k.startswith(prefix)))


def read_log(path: str) -> list[tuple[str, str, int]]:
    """The complete lines of a ``log`` file: (op, key, bytes)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.split("\n")[:-1]:
        op, key, n = line.split(" ")
        out.append((op, key, int(n)))
    return out
