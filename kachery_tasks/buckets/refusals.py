"""Credentials that cannot write: the first write a bucket refuses makes it read-only for the rest
of the process.

Why: read access is the common case for a consumer (a colleague's ``objectViewer`` role, a shared
directory owned by someone else), and a consumer with ``publish: true`` would otherwise try, and
fail, to publish every result it computes, each time saying so. Reading never needs write access
(the bucket tier and file loads open buckets read-only), so after the first refusal this process
stops writing, and says so once; ``bucket_read_only: true`` says it in advance and silences that.

:class:`GuardedBucket` wraps the bucket that ``configured_bucket(write=True)`` hands out: a
``PermissionDenied`` raised by a write or compare-and-swap is remembered for the bucket's
URI and raised as :class:`WriteRefused`, one line; every later attempt in this process gets the
same error before anything is sent. Reads pass through untouched (a read refused is the
credentials' problem, not a read-only bucket).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .base import Bucket, Data, ObjectInfo, PermissionDenied, ReadOnlyBucket

#: How to say in advance that a bucket is read-only for this node (and silence the warning).
SILENCE = "kachery config set bucket_read_only true"


class WriteRefused(ReadOnlyBucket):
    """The bucket refused a write with the credentials in use: read-only for the rest of the process.

    ``first`` is True on the error of the refusal itself, False on the errors of later attempts;
    callers that carry on without raising (automatic publishing) warn only on the first."""

    def __init__(self, message: str, uri: str, key: str | None, first: bool):
        super().__init__(message, uri, key)
        self.first = first


_refused: dict[str, tuple[str, str | None]] = {}  # uri -> (the one line, the key first refused)
_lock = threading.Lock()


def check_not_refused(uri: str) -> None:
    """Raise :class:`WriteRefused` (``first`` False) if ``uri`` refused a write in this process."""
    with _lock:
        found = _refused.get(uri)
    if found is not None:
        raise WriteRefused(found[0], uri, found[1], first=False)


def refuse(uri: str, exc: PermissionDenied) -> WriteRefused:
    """Remember that ``uri`` refused a write (``exc``); the error to raise for it."""
    with _lock:
        found = _refused.get(uri)
        first = found is None
        if first:
            found = _refused[uri] = (
                f"bucket {uri} is read-only for these credentials ({exc}); it is used read-only for the rest "
                f"of this process (results and files are still read from it). Say so in advance, and "
                f"silence this, with `{SILENCE}`", exc.key)
    return WriteRefused(found[0], uri, found[1], first=first)


@contextmanager
def refusals(uri: str) -> Iterator[None]:
    """Turn a ``PermissionDenied`` in the block into :class:`WriteRefused` for ``uri``."""
    try:
        yield
    except WriteRefused:
        raise
    except PermissionDenied as exc:
        raise refuse(uri, exc) from None


def forget_refusals() -> None:
    """Forget every refusal (a test, or a process whose credentials changed)."""
    with _lock:
        _refused.clear()


class GuardedBucket(Bucket):
    """``inner`` with its writes watched for refusals (see the module docstring)."""

    def __init__(self, inner: Bucket):
        super().__init__(inner.uri, read_only=inner.read_only)
        self.inner = inner

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    def exists_many(self, keys: Iterable[str]) -> dict[str, ObjectInfo]:
        return self.inner.exists_many(keys)

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        return self.inner.read(key, start, end)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def write(self, key: str, data: Data) -> ObjectInfo:
        check_not_refused(self.uri)  # another thread's refusal: send nothing more
        with refusals(self.uri):
            return self.inner.write(key, data)

    def write_if_generation(self, key: str, data: bytes, generation: int | None) -> ObjectInfo:
        check_not_refused(self.uri)
        with refusals(self.uri):
            return self.inner.write_if_generation(key, data, generation)

    def delete(self, key: str) -> bool:
        # a refused delete stays a PermissionDenied: credentials may create objects, not remove them
        # (roles/storage.objectCreator), and such a bucket is not read-only
        return self.inner.delete(key)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"GuardedBucket({self.inner!r})"


__all__ = ["SILENCE", "GuardedBucket", "WriteRefused", "check_not_refused", "forget_refusals", "refusals"]
