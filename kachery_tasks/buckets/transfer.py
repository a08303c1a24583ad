"""Moving blobs between a node's store and a bucket, in the layout of :mod:`.layout`.

- :func:`missing_blobs`: which of many blobs a bucket lacks, in one ``exists_many`` call (REAPI's
  FindMissingBlobs): before uploading many files, and for the bucket tier's completeness checks.
- :func:`upload_blob`: a blob of at most one chunk is one create-if-absent write (``AlreadyExists``
  means it is there: success; over 1 MiB a ``stat`` first saves sending what is there). A larger
  blob: its chunks' SHA-256 are computed in one streaming read of the local blob (in parallel), one
  ``exists_many`` asks for every chunk and the manifest, the missing chunks go up with several in
  flight (each read from the local file when its turn comes, never the whole file in memory), and
  the manifest last, so a manifest in a bucket means its chunks are there. A rerun after an
  interruption sends only what is missing.
- :func:`download_blob`: nothing moves if the store has the blob. One object is streamed into the
  store, hashed on the way, and discarded (and fetched again, a bounded number of times) if it does
  not hash to the name asked for. A chunked blob: the manifest is read and checked, chunks are
  fetched with several in flight, each checked against its own SHA-256 before it is written at its
  offset into ``<store>/partial/<sha256>.part`` (fsynced, then recorded in ``<sha256>.journal``), so
  a killed download resumes from the chunks it had verified. Meanwhile the main thread hashes the
  part file in order, reading back what was written; the blob enters the store (a rename) only if
  that whole-file SHA-256 is the one asked for. A download holds a lock on its part file, so two
  processes fetching one blob do not interleave: the second waits, then finds it in the store.

Verification is not optional: no byte from a bucket enters a store unchecked, whoever wrote the
bucket. An upload trusts the local blob as the store does (its verified stamp; a blob of one chunk
is hashed again anyway), and refuses to send a chunk if the blob's stamp changed since the chunk
hashes were computed.

Progress: ``progress(n)`` is called (never from two threads at once) with bytes that are done:
sent or fetched and verified, or found already there. On success the calls add up to the blob's
size. Bucket errors (``BucketUnavailable`` once the bucket's own retries gave up, a
``PermissionDenied``) propagate; a damaged object is a :class:`DamagedObject` naming its key.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ..errors import IntegrityError, NotFoundError, as_store_full
from ..fs import make_dirs, share_fd
from ..store.blobs import BlobStore, Progress, Stamp
from ..store.manifest import ChunkHasher
from ..store.uris import check_sha256_hex
from .base import AlreadyExists, Bucket, CountedBlocks, NotFound
from .layout import (
    CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_MANIFEST_BYTES,
    MIN_CHUNK_SIZE,
    BucketManifest,
    InvalidManifest,
    blob_key,
    check_layout,
    chunk_spans,
    manifest_key,
)

#: Chunks in flight at once (at least two).
WORKERS = 4
#: Reads of one object before a damaged copy is an error.
ATTEMPTS = 3
#: A single object bigger than this is looked up before it is sent.
PROBE_MIN = 2**20
#: Partial downloads untouched this long are removed.
STALE_PARTIAL_SECONDS = 7 * 24 * 3600
_CLEAN_EVERY_SECONDS = 3600
_HASH_BLOCK = 8 * 2**20


@dataclass(frozen=True)
class Transferred:
    """What a transfer did. ``bytes_moved`` crossed between store and bucket and were kept;
    ``bytes_skipped`` did not need to (already at the destination, or already verified in a partial
    download); ``bytes_discarded`` were fetched but failed verification and were fetched again.
    ``chunks`` is how many objects the blob is in the bucket (1 if it is one object), ``chunks_moved``
    how many were sent or fetched, ``retries`` how many damaged reads were discarded."""

    sha256: str
    size: int
    bytes_moved: int
    bytes_skipped: int
    chunks: int
    chunks_moved: int
    retries: int = 0
    bytes_discarded: int = 0


class BlobNotInBucket(NotFound):
    """The bucket has neither the blob nor its manifest."""


class DamagedObject(IntegrityError):
    """An object in a bucket whose bytes do not match its name (or a manifest that does not add up),
    read ``attempts`` times; nothing of it entered the store. ``uri`` and ``key`` name it."""

    def __init__(self, message: str, uri: str, key: str):
        super().__init__(message)
        self.uri = uri
        self.key = key


class _Report:
    """``progress`` made safe to call from the workers: serialized, zeros dropped."""

    def __init__(self, progress: Progress | None):
        self._progress = progress
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self._progress is not None and n:
            with self._lock:
                self._progress(n)


# -- which are missing ------------------------------------------------------------------------------
def missing_blobs(bucket: Bucket, digests: Iterable[str]) -> set[str]:
    """The SHA-256s among ``digests`` that ``bucket`` has neither as one object nor as a manifest,
    found with one ``exists_many`` call for them all."""
    wanted = list(dict.fromkeys(check_sha256_hex(d) for d in digests))
    if not wanted:
        return set()
    check_layout(bucket, write=False)
    found = bucket.exists_many([blob_key(d) for d in wanted] + [manifest_key(d) for d in wanted])
    return {d for d in wanted if blob_key(d) not in found and manifest_key(d) not in found}


# -- upload -----------------------------------------------------------------------------------------
def upload_blob(bucket: Bucket, blobs: BlobStore, sha256: str, progress: Progress | None = None, *,
                chunk_size: int = CHUNK_SIZE, workers: int = WORKERS) -> Transferred:
    """Put blob ``sha256`` of ``blobs`` into ``bucket`` (see the module docstring); a rerun after an
    interruption sends only the chunks the bucket lacks.

    The blob not in the store is a ``NotFoundError``; damaged there, an ``IntegrityError`` (it is
    quarantined). ``chunk_size`` is the layout's 16 MiB unless a test wants small chunks."""
    check_sha256_hex(sha256)
    _check_chunk_size(chunk_size)
    path = blobs.verified_path(sha256)
    check_layout(bucket, write=True)
    report = _Report(progress)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        stamp = Stamp.of(os.fstat(fd))
        if Stamp.of(os.stat(blobs.verified_path(sha256))) != stamp:  # replaced between the check and open
            raise IntegrityError(f"sha256://{sha256} changed in the store while it was opened for upload; try again")

        def read_chunk(offset: int, size: int) -> bytes:
            data = _pread_exact(fd, size, offset)
            if len(data) != size or Stamp.of(os.fstat(fd)) != stamp:
                raise IntegrityError(f"sha256://{sha256} changed in the store ({path}) during its upload to "
                                     f"{bucket.uri}; nothing changed was sent. Store the file again")
            return data

        if stamp.size <= chunk_size:
            return _upload_one(bucket, blobs, sha256, stamp.size, read_chunk, report)
        return _upload_chunked(bucket, sha256, stamp.size, read_chunk, report, chunk_size, max(2, workers))
    finally:
        os.close(fd)


def _upload_one(bucket: Bucket, blobs: BlobStore, sha256: str, size: int, read_chunk: Callable[[int, int], bytes],
                report: _Report) -> Transferred:
    key = blob_key(sha256)
    skipped = Transferred(sha256, size, 0, size, 1, 0)
    if size > PROBE_MIN and bucket.stat(key) is not None:
        report(size)
        return skipped
    data = read_chunk(0, size)
    if hashlib.sha256(data).hexdigest() != sha256:  # cheap at this size: never send rotten bytes
        blobs.verified_path(sha256, rehash=True)  # quarantines it and raises
    try:
        bucket.write(key, data)
    except AlreadyExists:
        report(size)
        return skipped
    report(size)
    return Transferred(sha256, size, size, 0, 1, 1)


def _upload_chunked(bucket: Bucket, sha256: str, size: int, read_chunk: Callable[[int, int], bytes],
                    report: _Report, chunk_size: int, workers: int) -> Transferred:
    spans = chunk_spans(size, chunk_size)
    with ThreadPoolExecutor(workers, thread_name_prefix="kt-upload") as pool:
        hashes = list(pool.map(lambda span: hashlib.sha256(read_chunk(*span)).hexdigest(), spans))
    manifest = BucketManifest.for_chunks(sha256, size, chunk_size, hashes)
    mkey = manifest_key(sha256)
    found = bucket.exists_many([blob_key(h) for h in hashes] + [mkey])
    todo: dict[str, tuple[int, int]] = {}  # chunk hash -> the first span holding it
    for span, h in zip(spans, hashes, strict=True):
        if blob_key(h) not in found:
            todo.setdefault(h, span)
    if mkey in found and (not todo or _foreign_manifest(bucket, mkey, manifest)):
        report(size)
        return Transferred(sha256, size, 0, size, len(spans), 0)
    report(size - sum(n for _, n in todo.values()))
    moved = [0, 0]  # bytes, chunks
    lock = threading.Lock()

    def send(h: str, span: tuple[int, int]) -> None:
        data = read_chunk(*span)
        try:
            bucket.write(blob_key(h), data)
        except AlreadyExists:  # another uploader was faster
            pass
        else:
            with lock:
                moved[0] += span[1]
                moved[1] += 1
        report(span[1])

    _run_all(workers, "kt-upload", [(send, (h, span)) for h, span in todo.items()])
    try:
        bucket.write(mkey, manifest.to_json().encode())
    except AlreadyExists:
        pass
    return Transferred(sha256, size, moved[0], size - moved[0], len(spans), moved[1])


def _foreign_manifest(bucket: Bucket, mkey: str, ours: BucketManifest) -> bool:
    """A manifest is in the bucket but some of our chunks are not: True if it is not ours (another
    chunk size: its own chunks are there, trust it), False if it is ours with chunks lost (resend)."""
    try:
        theirs = BucketManifest.from_json(b"".join(bucket.read(mkey, 0, MAX_MANIFEST_BYTES)))
    except (InvalidManifest, NotFound):
        return False
    return theirs != ours


def _run_all(workers: int, name: str, tasks: list[tuple[Callable, tuple]]) -> None:
    """Run ``tasks`` with ``workers`` threads; the first error cancels the rest and is raised once
    the tasks already running have ended."""
    if not tasks:
        return
    pool = ThreadPoolExecutor(min(workers, len(tasks)), thread_name_prefix=name)
    try:
        futures = [pool.submit(fn, *args) for fn, args in tasks]
        for future in futures:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- download ---------------------------------------------------------------------------------------
def download_blob(bucket: Bucket, blobs: BlobStore, sha256: str, progress: Progress | None = None, *,
                  workers: int = WORKERS, attempts: int = ATTEMPTS) -> Transferred:
    """Fetch blob ``sha256`` from ``bucket`` into ``blobs``, verified (see the module docstring).

    Not in the bucket: :class:`BlobNotInBucket` (a ``NotFound``). An object that does not match its
    name after ``attempts`` reads, or a manifest that does not add up or does not describe the file
    asked for: :class:`DamagedObject` (an ``IntegrityError``) naming the bucket key; nothing of it is
    in the store."""
    check_sha256_hex(sha256)
    report = _Report(progress)
    size = _stored_size(blobs, sha256)
    if size is not None:
        report(size)
        return Transferred(sha256, size, 0, size, 0, 0)
    check_layout(bucket, write=False)
    bkey, mkey = blob_key(sha256), manifest_key(sha256)
    found = bucket.exists_many([bkey, mkey])
    if bkey in found:
        try:
            return _download_one(bucket, blobs, sha256, report, max(1, attempts))
        except DamagedObject:
            if mkey not in found:
                raise  # else: the chunks may be sound
    if mkey in found:
        return _download_chunked(bucket, blobs, sha256, report, max(2, workers), max(1, attempts))
    raise BlobNotInBucket(f"sha256://{sha256} is not in bucket {bucket.uri} (neither {bkey} nor {mkey}); upload it "
                          "from a node that has it", bucket.uri, bkey)


def _stored_size(blobs: BlobStore, sha256: str) -> int | None:
    """The blob's size if the store has it sound (a damaged copy is quarantined: then None)."""
    try:
        return os.stat(blobs.verified_path(sha256)).st_size
    except (NotFoundError, IntegrityError, FileNotFoundError):
        return None


def _download_one(bucket: Bucket, blobs: BlobStore, sha256: str, report: _Report, attempts: int) -> Transferred:
    key = blob_key(sha256)
    discarded = 0
    for attempt in range(attempts):
        counted = CountedBlocks(bucket.read(key))
        try:
            blobs.put_stream(counted, expected=sha256)
        except IntegrityError:
            discarded += counted.n
            continue
        report(counted.n)
        return Transferred(sha256, counted.n, counted.n, 0, 1, 1, attempt, discarded)
    raise DamagedObject(f"{bucket.uri}: object {key} does not hash to its name (read {attempts} times: "
                        "truncated or damaged in the bucket); delete it there and upload the file again",
                        bucket.uri, key)


def read_manifest(bucket: Bucket, sha256: str, attempts: int = ATTEMPTS) -> BucketManifest:
    """The checked manifest of ``sha256`` in ``bucket``; it must describe that file. A manifest that
    does not parse or add up is read again (a damaged transfer) and then a :class:`DamagedObject`."""
    key = manifest_key(sha256)
    problem = ""
    for _ in range(max(1, attempts)):
        raw = b"".join(bucket.read(key, 0, MAX_MANIFEST_BYTES + 1))
        try:
            if len(raw) > MAX_MANIFEST_BYTES:
                raise InvalidManifest(f"manifest is over {MAX_MANIFEST_BYTES} bytes")
            manifest = BucketManifest.from_json(raw)
            if manifest.sha256 != sha256:
                raise InvalidManifest(f"manifest describes sha256 {manifest.sha256}, not the file under its name")
            return manifest
        except InvalidManifest as e:
            problem = str(e)
    raise DamagedObject(f"{bucket.uri}: {key} is refused: {problem}", bucket.uri, key)


_JOURNAL_LINE = re.compile(rb"^(\d{1,20}) ([0-9a-f]{64})$")


def _download_chunked(bucket: Bucket, blobs: BlobStore, sha256: str, report: _Report, workers: int,
                      attempts: int) -> Transferred:
    manifest = read_manifest(bucket, sha256, attempts)
    partial = partial_dir(blobs)
    make_dirs(partial)
    _maybe_clean(blobs)
    with _partial_lock(partial / f"{sha256}.lock"):
        size = _stored_size(blobs, sha256)  # another process may have fetched it while we waited
        if size is not None:
            report(size)
            return Transferred(sha256, size, 0, size, 0, 0)
        return _ChunkedDownload(bucket, blobs, manifest, report, workers, attempts, partial).run()


class _ChunkedDownload:
    def __init__(self, bucket: Bucket, blobs: BlobStore, manifest: BucketManifest, report: _Report,
                 workers: int, attempts: int, partial: Path):
        self.bucket = bucket
        self.blobs = blobs
        self.m = manifest
        self.report = report
        self.workers = workers
        self.attempts = attempts
        self.part = partial / f"{manifest.sha256}.part"
        self.journal = partial / f"{manifest.sha256}.journal"
        self.header = json.dumps({"sha256": manifest.sha256, "size": manifest.size, "chunk_size": manifest.chunk_size,
                                  "manifest": hashlib.sha256(manifest.to_json().encode()).hexdigest()},
                                 sort_keys=True).encode()
        self.cond = threading.Condition()
        self.done: set[int] = set()  # chunk indexes verified and written (journaled)
        self.error: BaseException | None = None
        self.moved = self.chunks_moved = self.retries = self.discarded = 0

    # -- the part file and its journal -------------------------------------------------------------
    def _open(self) -> None:
        """Open (resume) or create the part file and its journal; fill ``self.done``."""
        done = self._journaled()
        try:
            st = self.part.stat()
        except FileNotFoundError:
            st = None
        # Another user's part file (a group-shared home) cannot be made read-only by us at the end.
        if done is None or st is None or st.st_size != self.m.size or st.st_uid != os.geteuid():
            for p in (self.part, self.journal):
                with suppress(FileNotFoundError):
                    os.unlink(p)
            done = set()
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        if os.fstat(self.fd).st_size != self.m.size:
            share_fd(self.fd, 0o644)
            os.ftruncate(self.fd, self.m.size)
        if not done and not self.journal.exists():
            jfd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                share_fd(jfd, 0o664)
                os.write(jfd, self.header + b"\n")
                os.fsync(jfd)
            finally:
                os.close(jfd)
        self.jfd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        self.done = done

    def _journaled(self) -> set[int] | None:
        """Chunks the journal says were verified and written (stops at the first torn or foreign
        line: a line is written only after its chunk's bytes were fsynced); None without a journal
        of this manifest."""
        try:
            lines = self.journal.read_bytes().split(b"\n")
        except FileNotFoundError:
            return None
        if lines[0] != self.header:
            return None
        by_offset = {c.offset: i for i, c in enumerate(self.m.chunks)}
        done = set()
        for line in lines[1:-1]:  # the last piece is after the final newline: empty or torn
            match = _JOURNAL_LINE.match(line)
            i = by_offset.get(int(match.group(1))) if match else None
            if i is None or self.m.chunks[i].sha256 != match.group(2).decode():
                break
            done.add(i)
        return done

    def _close(self) -> None:
        for fd in (getattr(self, "fd", None), getattr(self, "jfd", None)):
            if fd is not None:
                with suppress(OSError):
                    os.close(fd)
        self.fd = self.jfd = None

    # -- fetching ------------------------------------------------------------------------------------
    def _fetch(self, indexes: list[int]) -> None:
        """Fetch one chunk object, verify it, write it at every offset that holds it, record it."""
        if self.error is not None:
            return
        chunk = self.m.chunks[indexes[0]]
        key = blob_key(chunk.sha256)
        for _ in range(self.attempts):
            data = _read_n(self.bucket.read(key, 0, chunk.size), chunk.size)
            if len(data) == chunk.size and hashlib.sha256(data).digest() == bytes.fromhex(chunk.sha256):
                break
            with self.cond:
                self.retries += 1
                self.discarded += len(data)
        else:
            raise DamagedObject(f"{self.bucket.uri}: chunk {key} (at byte {chunk.offset} of sha256://"
                                f"{self.m.sha256}) does not hash to its name (read {self.attempts} times: "
                                "truncated or damaged in the bucket); delete it there and upload the file "
                                "again", self.bucket.uri, key)
        try:
            for i in indexes:
                _pwrite_all(self.fd, data, self.m.chunks[i].offset)
            os.fdatasync(self.fd)
            lines = b"".join(f"{self.m.chunks[i].offset} {chunk.sha256}\n".encode() for i in indexes)
            with self.cond:
                os.write(self.jfd, lines)
        except OSError as exc:
            raise as_store_full(exc, self.blobs.root.parent, self.m.size) or exc from exc
        with self.cond:
            self.done.update(indexes)
            self.moved += chunk.size
            self.chunks_moved += 1
            self.cond.notify_all()
        self.report(chunk.size * len(indexes))

    def _task(self, indexes: list[int]) -> None:
        try:
            self._fetch(indexes)
        except BaseException as e:
            with self.cond:
                if self.error is None:
                    self.error = e
                self.cond.notify_all()

    # -- the whole --------------------------------------------------------------------------------
    def _hash_in_order(self) -> tuple[str, ChunkHasher]:
        """SHA-256 (and the store's c1 chunk hashes) of the part file, read back chunk by chunk as
        soon as each is written, in order; raises a worker's error as soon as there is one."""
        sha, c1 = hashlib.sha256(), ChunkHasher()
        buf = bytearray(min(_HASH_BLOCK, self.m.chunk_size))
        view = memoryview(buf)
        for i, chunk in enumerate(self.m.chunks):
            with self.cond:
                while i not in self.done and self.error is None:
                    self.cond.wait()
                if self.error is not None:
                    raise self.error
            pos, end = chunk.offset, chunk.offset + chunk.size
            while pos < end:
                n = os.preadv(self.fd, [view[: min(len(buf), end - pos)]], pos)
                if n <= 0:
                    raise IntegrityError(f"{self.part} is shorter than {self.m.size} bytes")
                sha.update(view[:n])
                c1.update(view[:n])
                pos += n
        return sha.hexdigest(), c1

    def _bad_chunks(self) -> set[int]:
        """Chunks whose bytes in the part file do not match their hash (after a whole-file mismatch)."""
        bad = set()
        for i, chunk in enumerate(self.m.chunks):
            data = _pread_exact(self.fd, chunk.size, chunk.offset)
            if hashlib.sha256(data).hexdigest() != chunk.sha256:
                bad.add(i)
        return bad

    def run(self) -> Transferred:
        self._open()
        try:
            skipped = sum(self.m.chunks[i].size for i in self.done)
            self.report(skipped)
            for _round in range(2):
                digest, c1 = self._fetch_missing()
                if digest == self.m.sha256:
                    break
                bad = self._bad_chunks()
                if not bad:  # every chunk is sound, the manifest lists the wrong ones
                    key = manifest_key(self.m.sha256)
                    self._discard()
                    raise DamagedObject(f"{self.bucket.uri}: {key} lists chunks that do not make sha256://"
                                        f"{self.m.sha256} (they hash to {digest}); delete it there and upload the "
                                        "file again", self.bucket.uri, key)
                self._rewrite_journal(self.done - bad)
            else:
                raise IntegrityError(f"{self.part} does not hash to sha256://{self.m.sha256} after its damaged "
                                     "chunks were fetched again; is the disk of this store failing?")
            self._close()
            self.blobs.install_file(self.part, self.m.sha256, c1.manifest(self.m.sha256))
            with suppress(FileNotFoundError):
                os.unlink(self.journal)
        finally:
            self._close()
        return Transferred(self.m.sha256, self.m.size, self.moved, self.m.size - self.moved, len(self.m.chunks),
                           self.chunks_moved, self.retries, self.discarded)

    def _fetch_missing(self) -> tuple[str, ChunkHasher]:
        by_hash: dict[str, list[int]] = {}
        for i, chunk in enumerate(self.m.chunks):
            if i not in self.done:
                by_hash.setdefault(chunk.sha256, []).append(i)
        pool = ThreadPoolExecutor(min(self.workers, max(1, len(by_hash))), thread_name_prefix="kt-download")
        try:
            for indexes in by_hash.values():
                pool.submit(self._task, indexes)
            return self._hash_in_order()
        except BaseException:
            with self.cond:
                if self.error is None:
                    self.error = _Cancelled()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _rewrite_journal(self, good: set[int]) -> None:
        lines = [self.header] + [f"{self.m.chunks[i].offset} {self.m.chunks[i].sha256}".encode() for i in sorted(good)]
        tmp = self.journal.with_suffix(".journal.tmp")
        tmp.write_bytes(b"\n".join(lines) + b"\n")
        os.replace(tmp, self.journal)
        os.close(self.jfd)
        self.jfd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        self.done = set(good)

    def _discard(self) -> None:
        self._close()
        for p in (self.part, self.journal):
            with suppress(FileNotFoundError):
                os.unlink(p)


class _Cancelled(Exception):
    pass


# -- partial downloads ------------------------------------------------------------------------------
def partial_dir(blobs: BlobStore) -> Path:
    """Where chunked downloads are assembled: ``<store>/partial/`` (the store's file system)."""
    return blobs.root / "partial"


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_lock = threading.Lock()


@contextmanager
def _partial_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold ``path`` (a lock file) exclusively: a thread lock within the process, ``flock`` across
    processes. The file is removed on release while still held; a waiter that then gets the lock on
    the removed file sees that the name is another file (or none) and tries again."""
    with _thread_locks_lock:
        tlock = _thread_locks.setdefault(str(path), threading.Lock())
    if not tlock.acquire(blocking):
        yield False
        return
    try:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            with suppress(OSError):  # another user's lock file (a shared home) keeps its mode
                share_fd(fd, 0o664)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        try:
            yield True
        finally:
            with suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
    finally:
        tlock.release()


def clean_partials(blobs: BlobStore, older_than_s: float = STALE_PARTIAL_SECONDS) -> int:
    """Remove partial downloads not written for ``older_than_s`` seconds (and not in progress).
    Returns how many blobs' partial files were removed."""
    directory = partial_dir(blobs)
    cutoff = time.time() - older_than_s
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    stale = set()
    for entry in entries:
        name, _, suffix = entry.name.partition(".")
        if suffix in ("part", "journal", "lock", "journal.tmp"):
            with suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    stale.add(name)
    removed = 0
    for name in stale:
        newest = 0.0
        for suffix in ("part", "journal"):
            with suppress(FileNotFoundError):
                newest = max(newest, (directory / f"{name}.{suffix}").stat().st_mtime)
        if newest >= cutoff:
            continue
        with _partial_lock(directory / f"{name}.lock", blocking=False) as held:
            if held:
                for suffix in ("part", "journal", "journal.tmp"):
                    with suppress(FileNotFoundError):
                        os.unlink(directory / f"{name}.{suffix}")
                removed += 1
    return removed


_last_clean: dict[str, float] = {}


def _maybe_clean(blobs: BlobStore) -> None:
    key = str(blobs.root)
    now = time.monotonic()
    if now - _last_clean.get(key, -1e18) >= _CLEAN_EVERY_SECONDS:
        _last_clean[key] = now
        clean_partials(blobs)


# -- helpers ----------------------------------------------------------------------------------------
def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}, not {chunk_size}")


def _read_n(blocks: Iterator[bytes], n: int) -> memoryview:
    """At most ``n`` bytes of ``blocks`` (fewer if the stream ends early), copied once into one
    buffer; the stream is closed."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    try:
        for block in blocks:
            take = min(len(block), n - got)
            view[got:got + take] = memoryview(block)[:take]
            got += take
            if got >= n:
                break
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
    return view[:got]


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size and (more := os.pread(fd, size - got, offset + got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


__all__ = [
    "BlobNotInBucket",
    "DamagedObject",
    "Transferred",
    "clean_partials",
    "download_blob",
    "missing_blobs",
    "read_manifest",
    "upload_blob",
]
