"""FaultyBucket: a bucket wrapper that misbehaves at a set rate, for transfer tests.

``FaultyBucket(inner, rate=0.1, seed=1)`` passes every call to ``inner`` but, each with probability
``rate`` (reproducibly, from ``seed``):

- raises :class:`BucketUnavailable` before the call (a transient network error);
- on a read, ends the stream early (a truncated download) or flips one bit in a block (corruption
  that no transport noticed).

Writes are passed on whole or not at all (a raise before the call), as real buckets do. A transfer
built on buckets must end with verified bytes or a clear error whatever this does; ``faults``
counts what was injected, by kind, so a test can show the faults did happen.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterable, Iterator

from kachery_tasks.buckets import Bucket, BucketUnavailable, ObjectInfo


class FaultyBucket(Bucket):
    def __init__(self, inner: Bucket, rate: float = 0.1, seed: int = 0):
        super().__init__(inner.uri, read_only=inner.read_only)
        self.inner = inner
        self.rate = rate
        self.faults: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def _roll(self) -> bool:
        with self._lock:
            return self._random.random() < self.rate

    def _maybe_fail(self, op: str, key: str | None = None) -> None:
        if self._roll():
            self.faults["unavailable"] += 1
            raise BucketUnavailable(f"{self.uri}: injected transient failure in {op}", self.uri, key)

    def stat(self, key: str) -> ObjectInfo | None:
        self._maybe_fail("stat", key)
        return self.inner.stat(key)

    def exists_many(self, keys: Iterable[str]) -> dict[str, ObjectInfo]:
        self._maybe_fail("exists_many")
        return self.inner.exists_many(keys)

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        self._maybe_fail("read", key)
        return self._damage(self.inner.read(key, start, end))

    def _damage(self, blocks: Iterator[bytes]) -> Iterator[bytes]:
        for block in blocks:
            if block and self._roll():
                if self._roll_half():
                    self.faults["truncated"] += 1
                    yield block[: len(block) // 2]
                    return
                self.faults["bit_flip"] += 1
                with self._lock:
                    i = self._random.randrange(len(block) * 8)
                damaged = bytearray(block)
                damaged[i // 8] ^= 1 << (i % 8)
                block = bytes(damaged)
            yield block

    def _roll_half(self) -> bool:
        with self._lock:
            return self._random.random() < 0.5

    def write(self, key, data):
        self._maybe_fail("write", key)
        return self.inner.write(key, data)

    def write_if_generation(self, key, data, generation):
        self._maybe_fail("write_if_generation", key)
        return self.inner.write_if_generation(key, data, generation)

    def delete(self, key: str) -> bool:
        self._maybe_fail("delete", key)
        return self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._maybe_fail("list")
        return self.inner.list(prefix)

    def close(self) -> None:
        self.inner.close()
