"""The Bucket protocol: the few object-store operations every node needs from its data bus.

A bucket holds objects named by keys (``/``-separated relative names, checked by
:func:`check_key`). Two kinds of write cover everything the layers above do:

- :meth:`Bucket.write` is **create-if-absent**. Content-addressed objects (blobs, chunks, signed
  records) are written this way; a second writer gets :class:`AlreadyExists`, which for them means
  success, since the bytes under a content address are the same whoever wrote them.
- :meth:`Bucket.write_if_generation` is **compare-and-swap** on the object's generation, for the
  few mutable objects (channel configs, feed heads, task claims). Every version of an object has a
  generation, an integer that never repeats for the same key (not even after a delete); generation
  ``0`` (or ``None``) means "the object must not exist". The usual loop: ``stat`` (the
  generation), ``read``, compute, ``write_if_generation``; on :class:`PreconditionFailed` start
  again. Read ``stat`` *before* ``read``: the bytes are then at least as new as the generation, so
  a write based on them is never accepted over a version it did not see.

An implementation is small. A minimal in-memory one (not thread-safe, for illustration)::

    class MemoryBucket(Bucket):
        def __init__(self, uri="memory://", read_only=False):
            super().__init__(uri, read_only=read_only)
            self._objects = {}  # key -> (generation, bytes)
            self._gen = 0

        def stat(self, key):
            check_key(key, self.uri)
            if key not in self._objects:
                return None
            gen, data = self._objects[key]
            return ObjectInfo(key, len(data), gen)

        def read(self, key, start=0, end=None):
            info = self.stat(key)
            if info is None:
                raise NotFound(f"{self.uri}: no object {key}", uri=self.uri, key=key)
            return iter([self._objects[key][1][start:end]])

        def write_if_generation(self, key, data, generation):
            self._check_writable(key)
            current = self.stat(key)
            if (current.generation if current else 0) != (generation or 0):
                raise precondition_failed(self.uri, key, generation, current)
            self._gen += 1
            self._objects[key] = (self._gen, bytes(data))
            return ObjectInfo(key, len(data), self._gen)

        def write(self, key, data):
            return self.write_if_generation(key, join_data(data), 0)

        def list(self, prefix=""):
            for key in sorted(k for k in self._objects if k.startswith(prefix)):
                yield self.stat(key)

        def delete(self, key):
            self._check_writable(key)
            return self._objects.pop(key, None) is not None

Errors name the bucket's URI and are one line. :class:`PermissionDenied`, :class:`ReadOnlyBucket`
and :class:`InvalidKey` are :class:`~kachery_tasks.errors.UserError` (the user can fix them);
:class:`NotFound`, :class:`PreconditionFailed` and :class:`AlreadyExists` are ordinary outcomes the
layers above handle; :class:`BucketUnavailable` is raised once the implementation's own retries
(with backoff, within a deadline) gave up.

Portability rule: no key may also be a "directory" of another key (``a`` and ``a/b``); object
stores allow it but a directory cannot, and a directory bucket reports it as a :class:`BucketError`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import KacheryError, UserError

#: What :meth:`Bucket.write` takes: bytes, an iterable of byte blocks, or a binary file object.
Data = bytes | bytearray | memoryview | Iterable[bytes] | BinaryIO

#: Longest key, in UTF-8 bytes (Google Cloud Storage's limit for object names).
MAX_KEY_BYTES = 1024

#: The first part of a key that no key may have: a directory bucket keeps its locks, generations
#: and temp files there.
RESERVED_PART = ".kt"


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its key, size in bytes, generation, and last update (Unix seconds) if known."""

    key: str
    size: int
    generation: int
    updated: float | None = None


# -- errors -----------------------------------------------------------------------------------------
class BucketError(KacheryError):
    """Base of every bucket error; ``uri`` is the bucket's URI and ``key`` the object's, if any."""

    def __init__(self, message: str, uri: str | None = None, key: str | None = None):
        super().__init__(message)
        self.uri = uri
        self.key = key

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFound(BucketError, LookupError):
    """No object under the key (or, for a read in progress, no longer the version being read)."""


class PreconditionFailed(BucketError):
    """A compare-and-swap found another generation; ``current_generation`` is the one it found
    (0 if the object does not exist), so the caller can re-read and try again."""

    def __init__(self, message: str, uri: str | None = None, key: str | None = None,
                 current_generation: int = 0):
        super().__init__(message, uri, key)
        self.current_generation = current_generation


class AlreadyExists(PreconditionFailed):
    """A create-if-absent write found the object there. For a content-addressed key, success."""


class BucketUnavailable(BucketError, ConnectionError):
    """The bucket could not be reached (network, server errors) after retrying within the deadline."""


class PermissionDenied(BucketError, UserError):
    """The credentials in use may not do this; the message names the role or mode needed."""


class ReadOnlyBucket(BucketError, UserError):
    """A write, compare-and-swap or delete on a bucket opened read-only."""


class InvalidKey(BucketError, UserError, ValueError):
    """A key that is not a ``/``-separated relative name."""


def precondition_failed(uri: str, key: str, expected: int | None, current: ObjectInfo | None,
                        ) -> PreconditionFailed:
    """The error for a failed compare-and-swap of ``key`` expecting generation ``expected``."""
    found = 0 if current is None else current.generation
    if not expected:
        return AlreadyExists(f"{uri}: object {key} already exists (generation {found})", uri, key, found)
    now = "does not exist" if current is None else f"is at generation {found}"
    return PreconditionFailed(f"{uri}: object {key} {now}, not {expected}; read it again and retry",
                              uri, key, found)


# -- keys -------------------------------------------------------------------------------------------
def check_key(key: str, uri: str = "bucket") -> str:
    """``key`` if it is a valid key, else :class:`InvalidKey` (one line saying what is wrong)."""
    problem = _key_problem(key, prefix=False)
    if problem:
        raise InvalidKey(f"{uri}: invalid key {key!r}: {problem}", uri, None)
    return key


def check_prefix(prefix: str, uri: str = "bucket") -> str:
    """A listing prefix: ``""``, or the start of a key (it may end with ``/``)."""
    if prefix == "":
        return prefix
    problem = _key_problem(prefix[:-1] if prefix.endswith("/") else prefix, prefix=True)
    if problem:
        raise InvalidKey(f"{uri}: invalid prefix {prefix!r}: {problem}", uri, None)
    return prefix


def _key_problem(key: object, *, prefix: bool) -> str | None:
    if not isinstance(key, str):
        return f"a key is a str, not {type(key).__name__}"
    if not key:
        return "it is empty"
    if "\x00" in key or "\n" in key or "\r" in key:
        return "it contains a NUL, CR or LF character"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"it is longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/"):
        return "it starts with '/'; keys are relative"
    if "\\" in key:
        return "it contains '\\'; use '/' between parts"
    parts = key.split("/")
    if any(p == "" for p in parts):
        return "it has an empty part ('//' or a trailing '/')"
    if any(p in (".", "..") for p in parts):
        return "it has a '.' or '..' part"
    if parts[0] == RESERVED_PART:
        return f"its first part {RESERVED_PART!r} is reserved"
    return None


# -- data -------------------------------------------------------------------------------------------
class CountedBlocks:
    """The blocks of ``blocks``, passed on as they are, with ``n`` the bytes passed so far."""

    def __init__(self, blocks: Iterable[bytes]):
        self.blocks = blocks
        self.n = 0

    def __iter__(self) -> Iterator[bytes]:
        for block in self.blocks:
            self.n += len(block)
            yield block


def iter_data(data: Data, block: int = 2**20) -> Iterator[bytes]:
    """The byte blocks of ``data`` (bytes, an iterable of blocks, or a binary file object)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data) if not isinstance(data, bytes) else data
    elif hasattr(data, "read"):
        while chunk := data.read(block):
            yield chunk
    else:
        for chunk in data:
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(f"bucket data blocks are bytes, not {type(chunk).__name__}")
            yield chunk


def join_data(data: Data) -> bytes:
    """All of ``data`` as one bytes object (for the small objects of a compare-and-swap)."""
    if isinstance(data, bytes):
        return data
    buf = io.BytesIO()
    for chunk in iter_data(data):
        buf.write(chunk)
    return buf.getvalue()


def check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"byte range must have 0 <= start <= end, not start={start}, end={end}")


# -- the protocol -----------------------------------------------------------------------------------
class Bucket:
    """A set of objects under keys; see the module docstring for a minimal implementation.

    Subclasses implement ``stat``, ``read``, ``write``, ``write_if_generation``, ``list`` and
    ``delete``; ``exists_many`` and ``close`` have defaults worth overriding where the backend
    can batch or holds connections. Every method is safe to call from several threads.
    """

    def __init__(self, uri: str, *, read_only: bool = False):
        self.uri = uri
        self.read_only = read_only

    # reading
    def stat(self, key: str) -> ObjectInfo | None:
        """The object under ``key``, or None if there is none."""
        raise NotImplementedError

    def exists_many(self, keys: Iterable[str]) -> dict[str, ObjectInfo]:
        """The objects among ``keys`` that exist, by key (absent keys are not in the dict).

        Implementations batch: one listing, or a bounded parallel batch, not a round trip per key
        in sequence."""
        found = {}
        for key in dict.fromkeys(keys):
            info = self.stat(key)
            if info is not None:
                found[key] = info
        return found

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of the object (``end`` None: to its end), as blocks.

        A missing object raises :class:`NotFound` at the call, not at the first block. A range past
        the end is cut to the object, as a slice is. The blocks come from one version: if the object
        is replaced while being read, the read goes on with the old bytes or raises NotFound."""
        raise NotImplementedError

    # writing
    def write(self, key: str, data: Data) -> ObjectInfo:
        """Create the object from ``data`` if there is none under ``key``, else :class:`AlreadyExists`
        (the object is left as it was). Readers never see part of an object."""
        raise NotImplementedError

    def write_if_generation(self, key: str, data: bytes, generation: int | None) -> ObjectInfo:
        """Replace the object if its generation is ``generation`` (0/None: create it if absent),
        else :class:`PreconditionFailed` carrying the current generation. Returns the new version.
        Meant for small objects (kilobytes); large data belongs in content-addressed objects."""
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        """Remove the object; True if there was one."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The objects whose keys start with ``prefix`` (a plain string prefix), in key order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and file handles; the bucket is not used afterwards."""

    def _check_writable(self, key: str) -> str:
        check_key(key, self.uri)
        if self.read_only:
            raise ReadOnlyBucket(f"{self.uri} is open read-only: cannot change {key}; open it without "
                                 "read_only to write", self.uri, key)
        return key

    def __enter__(self) -> Bucket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}{', read_only=True' if self.read_only else ''})"
