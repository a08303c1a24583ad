"""A bucket in Google Cloud Storage (``gs://bucket/prefix``), on ``google-cloud-storage``.

Install with ``pip install 'kachery-tasks[gcs]'``; nothing here is imported until a ``gs://`` URI
is opened.

- **Credentials** the usual Google way: :class:`google.cloud.storage.Client` calls
  ``google.auth.default()`` (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth
  application-default login``, the metadata server). When ``STORAGE_EMULATOR_HOST`` is set the
  library itself talks to that emulator with anonymous credentials; we pass no credentials of our
  own, so that rule holds as the library defines it. No project is needed for object operations.
- **Create-if-absent** is ``if_generation_match=0``, **compare-and-swap** ``if_generation_match=N``.
  Compare-and-swap objects are small and always sent as one simple (multipart) upload: real GCS
  enforces preconditions on every upload, but fake-gcs-server (our test server) ignores them on
  resumable uploads. A large :meth:`write` (over ``simple_max`` bytes) is a resumable upload in
  ``chunk_size`` pieces; it asks first whether the object exists (cheaper than sending it, and the
  only protection against overwriting on fake-gcs-server; real GCS also enforces the precondition).
- **Retries**: the library's :data:`~google.cloud.storage.retry.DEFAULT_RETRY` predicate (429, 408,
  5xx, connection errors and timeouts), exponential backoff from ``retry_initial`` seconds doubling
  up to 16 s, within ``retry_deadline`` seconds per call; conditional writes go through a
  :class:`~google.cloud.storage.retry.ConditionalRetryPolicy`, so they are retried because they
  carry a generation precondition. A retried write whose first attempt did succeed (its answer was
  lost) then meets its own precondition failure: every write carries a random ``kt-write-id`` in
  its metadata, and a 412 on an object bearing our own id is our success, not a conflict.
- **Timeouts**: every request carries ``timeout`` (seconds to connect and to wait for each reply).
- **exists_many**: up to ``batch_get_max`` keys are looked up with parallel ``get_blob`` calls
  (``workers`` at once: the cost is one round trip). More are found by listing the names from the
  smallest key on, in pages of 1,000, for at most ``ceil(n / workers)`` pages, the time the parallel
  lookups of those keys would take; keys beyond where the listing stopped are then looked up in
  parallel. So a listing never reads a whole large bucket to find a few keys (DVC's problem), and
  1,000 keys with names close together cost one request.
- Reads are ranged downloads of ``read_block`` bytes. The first reply tells the object's
  generation and the library asks for that generation from then on, so a read never mixes
  versions: if the object is replaced meanwhile, the read ends with :class:`NotFound`. Ranged reads
  are not checksummed by the library; the layers above verify every byte by its hash.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

# An ImportError here becomes open_bucket's one-line "pip install 'kachery-tasks[gcs]'".
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY, ConditionalRetryPolicy, is_generation_specified

from ..errors import UserError
from .base import (
    Bucket,
    BucketError,
    BucketUnavailable,
    Data,
    NotFound,
    ObjectInfo,
    PermissionDenied,
    check_key,
    check_prefix,
    check_range,
    iter_data,
    join_data,
    precondition_failed,
)

WRITE_ID = "kt-write-id"
SIMPLE_MAX = 8 * 2**20  # the library's own limit for one multipart upload
CHUNK_SIZE = 16 * 2**20  # resumable upload piece: a multiple of 256 KiB
READ_BLOCK = 8 * 2**20
LIST_PAGE = 1000
_FIELDS = "items(name,size,generation,updated,metadata),nextPageToken"

#: The role named in a PermissionDenied, by what was refused.
_ROLES = {
    "read": "roles/storage.objectViewer",
    "list": "roles/storage.objectViewer",
    "write": "roles/storage.objectCreator (roles/storage.objectUser to replace objects)",
    "replace": "roles/storage.objectUser",
    "delete": "roles/storage.objectUser",
}


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://name/some/prefix`` → (``name``, ``some/prefix/``); the prefix is ``""`` or ends in ``/``."""
    rest = uri[len("gs://"):]
    name, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if prefix:
        check_prefix(prefix, uri)
    return name, prefix + "/" if prefix else ""


class GCSBucket(Bucket):
    def __init__(self, uri: str, *, read_only: bool = False, client: Any = None, timeout: float = 60.0,
                 retry_deadline: float = 120.0, retry_initial: float = 0.5, chunk_size: int = CHUNK_SIZE,
                 simple_max: int = SIMPLE_MAX, read_block: int = READ_BLOCK, workers: int = 8,
                 batch_get_max: int = 16):
        uri = uri.rstrip("/")
        super().__init__(uri, read_only=read_only)
        self.name, self.prefix = parse_gs_uri(uri)
        if chunk_size % (256 * 1024):
            raise ValueError("chunk_size must be a multiple of 256 KiB")
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.simple_max = simple_max
        self.read_block = read_block
        self.workers = workers
        self.batch_get_max = batch_get_max
        self._retry = DEFAULT_RETRY.with_delay(initial=retry_initial, maximum=16.0, multiplier=2.0
                                               ).with_timeout(retry_deadline)
        self._cond_retry = ConditionalRetryPolicy(self._retry, is_generation_specified, ["query_params"])
        if client is None:
            try:
                client = storage.Client(project=None)
            except auth_exc.DefaultCredentialsError:
                raise UserError(f"no Google credentials for {uri}: run 'gcloud auth application-default login' "
                                "or set GOOGLE_APPLICATION_CREDENTIALS to a key file") from None
        self._client = client
        self._bucket = client.bucket(self.name)
        self._check_bucket()

    def _check_bucket(self) -> None:
        """A missing bucket is a UserError at open. Listing (one name) needs only what reading needs,
        where asking for the bucket's metadata would need storage.buckets.get too."""
        try:
            with self._errors(None, "list"):
                pages = self._client.list_blobs(self._bucket, prefix=self.prefix, max_results=1,
                                                timeout=self.timeout, retry=self._retry, fields="items(name)")
                list(pages)
        except NotFound:
            raise UserError(f"bucket {self.uri} does not exist; create it (gcloud storage buckets create "
                            f"gs://{self.name}) or fix the URI") from None

    # -- reading -----------------------------------------------------------------------------------
    def stat(self, key: str) -> ObjectInfo | None:
        check_key(key, self.uri)
        blob = self._get_blob(key)
        return None if blob is None else self._info(blob)

    def _get_blob(self, key: str) -> Any:
        with self._errors(key, "read"):
            return self._bucket.get_blob(self.prefix + key, timeout=self.timeout, retry=self._retry)

    def exists_many(self, keys: Iterable[str]) -> dict[str, ObjectInfo]:
        keys = sorted(dict.fromkeys(check_key(k, self.uri) for k in keys))
        if len(keys) <= self.batch_get_max:
            return self._get_many(keys)
        found: dict[str, ObjectInfo] = {}
        budget = math.ceil(len(keys) / self.workers)
        wanted = set(keys)
        common = _common_prefix(keys)
        listed_to = None  # every key <= this has been seen by the listing, present or not
        with self._errors(None, "list"):
            listing = self._client.list_blobs(self._bucket, prefix=self.prefix + common,
                                              start_offset=self.prefix + keys[0], page_size=LIST_PAGE,
                                              timeout=self.timeout, retry=self._retry, fields=_FIELDS)
            for n, page in enumerate(listing.pages, 1):
                last = None
                for blob in page:
                    key = blob.name[len(self.prefix):]
                    last = key
                    if key in wanted:
                        found[key] = self._info(blob)
                listed_to = last
                if listing.next_page_token is None or last is None or last >= keys[-1]:
                    listed_to = keys[-1]
                    break
                if n >= budget:
                    break
        rest = [k for k in keys if listed_to is None or k > listed_to]
        found.update(self._get_many(rest))
        return found

    def _get_many(self, keys: list[str]) -> dict[str, ObjectInfo]:
        if not keys:
            return {}
        if len(keys) == 1:
            info = self.stat(keys[0])
            return {} if info is None else {keys[0]: info}
        with ThreadPoolExecutor(min(self.workers, len(keys)), thread_name_prefix="kt-gcs") as pool:
            infos = list(pool.map(self.stat, keys))
        return {k: i for k, i in zip(keys, infos, strict=True) if i is not None}

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        check_key(key, self.uri)
        check_range(start, end)
        blob = self._bucket.blob(self.prefix + key)
        if end == start:
            if self.stat(key) is None:
                raise NotFound(f"{self.uri}: no object {key}", self.uri, key)
            return iter(())
        first = self._download(blob, key, start, end, first=True)
        return self._blocks(blob, key, start, end, first)

    def _stop(self, start: int, end: int | None) -> int:
        return start + self.read_block if end is None else min(end, start + self.read_block)

    def _download(self, blob: Any, key: str, start: int, end: int | None, first: bool) -> bytes | None:
        stop = self._stop(start, end)
        try:
            with self._errors(key, "read"):
                return blob.download_as_bytes(start=start, end=stop - 1, checksum=None,
                                              timeout=self.timeout, retry=self._retry)
        except NotFound:
            if first:
                raise
            raise NotFound(f"{self.uri}: object {key} was replaced or deleted while being read; read it "
                           "again", self.uri, key) from None
        except _RangePastEnd:
            return None

    def _blocks(self, blob: Any, key: str, start: int, end: int | None, block: bytes | None,
                ) -> Iterator[bytes]:
        pos = start
        while block:
            yield block
            asked = self._stop(pos, end) - pos
            pos += len(block)
            if len(block) < asked or (end is not None and pos >= end):
                return
            block = self._download(blob, key, pos, end, first=False)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix, self.uri)
        with self._errors(None, "list"):
            blobs = self._client.list_blobs(self._bucket, prefix=self.prefix + prefix, page_size=LIST_PAGE,
                                            timeout=self.timeout, retry=self._retry, fields=_FIELDS)
            for blob in blobs:
                yield self._info(blob)

    # -- writing -----------------------------------------------------------------------------------
    def write(self, key: str, data: Data) -> ObjectInfo:
        self._check_writable(key)
        if isinstance(data, (bytes, bytearray, memoryview)):
            head, rest = bytes(data), None
        else:
            blocks = iter_data(data)
            head, rest = _take(blocks, self.simple_max + 1), blocks
        if len(head) <= self.simple_max:
            return self._put(key, head, 0, "write")
        existing = self.stat(key)
        if existing is not None:
            raise precondition_failed(self.uri, key, 0, existing)
        # No size given: the library would send up to 8 MiB of known size as one multipart upload
        # whatever chunk_size says; unsized, a large write is always a resumable one.
        stream = io.BytesIO(head) if rest is None else _BlockReader(head, rest)
        return self._put(key, stream, 0, "write")

    def write_if_generation(self, key: str, data: bytes, generation: int | None) -> ObjectInfo:
        self._check_writable(key)
        data = join_data(data)
        if len(data) > self.simple_max:
            raise ValueError(f"compare-and-swap objects are at most {self.simple_max} bytes (one simple "
                             "upload); keep large data in content-addressed objects")
        return self._put(key, data, generation or 0, "replace" if generation else "write")

    def _put(self, key: str, data: bytes | io.IOBase, generation: int, action: str) -> ObjectInfo:
        blob = self._bucket.blob(self.prefix + key, chunk_size=self.chunk_size)
        write_id = uuid.uuid4().hex
        blob.metadata = {WRITE_ID: write_id}
        if isinstance(data, bytes):  # one multipart upload (the size is at most simple_max)
            stream, size = io.BytesIO(data), len(data)
        else:  # a resumable upload in chunk_size pieces
            stream, size = data, None
        try:
            with self._errors(key, action):
                blob.upload_from_file(stream, size=size, if_generation_match=generation,
                                      content_type="application/octet-stream", timeout=self.timeout,
                                      retry=self._cond_retry, checksum="auto")
        except _Precondition:
            found = self._get_blob(key)
            current = None if found is None else self._info(found)
            if found is not None and (found.metadata or {}).get(WRITE_ID) == write_id:
                return current  # our own write, retried after its answer was lost
            raise precondition_failed(self.uri, key, generation, current) from None
        return self._info(blob)

    def delete(self, key: str) -> bool:
        self._check_writable(key)
        try:
            with self._errors(key, "delete"):
                self._bucket.delete_blob(self.prefix + key, timeout=self.timeout, retry=self._retry)
        except NotFound:
            return False
        return True

    def close(self) -> None:
        self._client.close()

    # -- helpers -----------------------------------------------------------------------------------
    def _info(self, blob: Any) -> ObjectInfo:
        updated = blob.updated.timestamp() if blob.updated is not None else None
        return ObjectInfo(blob.name[len(self.prefix):], int(blob.size or 0), int(blob.generation), updated)

    @contextmanager
    def _errors(self, key: str | None, action: str) -> Iterator[None]:
        """Google's exceptions as ours, each one line naming the URI (and the key)."""
        what = f"{self.uri}" + (f": {key}" if key else "")
        try:
            yield
        except BucketError:
            raise
        except gexc.NotFound:
            raise NotFound(f"{what}: not found", self.uri, key) from None
        except gexc.PreconditionFailed:
            raise _Precondition() from None
        except gexc.RequestRangeNotSatisfiable:
            raise _RangePastEnd() from None
        except (gexc.Forbidden, gexc.Unauthorized, auth_exc.RefreshError) as e:
            raise PermissionDenied(f"{what}: permission denied to {action}; the account in use needs "
                                   f"{_ROLES.get(action, 'roles/storage.objectUser')} on bucket {self.name} "
                                   f"({_first_line(e)})", self.uri, key) from None
        except gexc.RetryError as e:
            cause = e.cause if e.cause is not None else e
            raise BucketUnavailable(f"{what}: cannot {action}, gave up retrying: {_first_line(cause)}",
                                    self.uri, key) from cause
        except (gexc.TooManyRequests, gexc.ServerError, ConnectionError, OSError,
                auth_exc.TransportError) as e:
            raise BucketUnavailable(f"{what}: cannot {action}: {_first_line(e)}", self.uri, key) from e
        except gexc.GoogleAPICallError as e:
            raise BucketError(f"{what}: cannot {action}: {_first_line(e)}", self.uri, key) from e
        except Exception as e:
            if type(e).__name__ in ("DataCorruption", "InvalidResponse"):
                raise BucketError(f"{what}: cannot {action}: {_first_line(e)}", self.uri, key) from e
            raise


class _Precondition(Exception):
    pass


class _RangePastEnd(Exception):
    pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _common_prefix(keys: list[str]) -> str:
    """The longest string prefix of sorted ``keys`` (first and last suffice)."""
    a, b = keys[0], keys[-1]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _take(blocks: Iterator[bytes], n: int) -> bytes:
    """Up to ``n`` bytes from ``blocks`` (it may take a little more: the rest of a block)."""
    buf = io.BytesIO()
    while buf.tell() < n:
        block = next(blocks, None)
        if block is None:
            break
        buf.write(block)
    return buf.getvalue()


class _BlockReader(io.RawIOBase):
    """A readable stream over byte blocks for a resumable upload. The library reads a chunk at a
    time, and after a partial commit it seeks back to where the server stopped: within the last
    chunk read, which is kept for that."""

    def __init__(self, head: bytes, rest: Iterator[bytes]):
        self._blocks = rest
        self._buf = bytearray(head)  # bytes read from the blocks, not yet handed out
        self._pos = 0  # position of the next byte handed out
        self._last = b""  # the bytes handed out by the last read, for a seek back into them
        self._last_start = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            block = next(self._blocks, None)
            if block is None:
                break
            self._buf += block
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._last, self._last_start = out, self._pos
        self._pos += len(out)
        return out

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a block stream seeks only from its start or position")
        if offset == self._pos:
            return self._pos
        if not self._last_start <= offset <= self._pos:
            raise io.UnsupportedOperation(f"cannot seek to {offset}: only within the last chunk read")
        give_back = self._last[offset - self._last_start:]
        self._buf[:0] = give_back
        self._last = self._last[: offset - self._last_start]
        self._pos = offset
        return offset
