"""Task records: ``<home>/tasks/kt1/<ab>/<task id>.json``, one JSON document per task id.

A record says how a task id resolved: its function identity, its arguments (small ones in canonical
form, jobs by task id, files by URI), the result (inline, or a codec and a blob URI) and the
provenance of the computation, signed by the node that computed it. A failure is kept apart, in
``<task id>.failed.json``, so it never replaces a result (a query's last good value stays as its
fallback) and is never served as one. Records are written atomically (a temp file beside the
record, renamed over it); a disk that is full, over quota or read-only raises
:class:`~kachery_tasks.errors.StoreFullError` and leaves the old record, if any, as it was.

Records go in and come out as :class:`~.task_record.TaskRecord`: every read parses and validates the
whole record (task_record.py). A record that does not parse, does not validate, names another task
id than its file, or sits in the other outcome's place is moved to ``<home>/tasks/quarantine/``
with the reason in its log line, and read as absent: never half-used. Records of short
computations are fsynced in groups (durability.py): a machine crash can leave such a record empty
or missing, which reads as absent, so the task is computed again.

The task layer gets what it needs here by name, never a path to build on: records by task id, the
single-flight lock of a task id or of an action's key (flight.py), the computations running now, and
the function index (the ids recorded per function name, for ``explain``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson
import xxhash

from ..errors import InvalidRecord, as_store_full
from ..fs import TEMP_PREFIX, make_dirs, remove_stale_files, write_atomic
from . import flight
from .durability import GROUP_COMMIT
from .task_record import FAILED, SUCCEEDED, TaskRecord

log = logging.getLogger(__name__)

SCHEME_DIR = "kt1"
FAILED_SUFFIX = ".failed.json"


class RecordStore:
    def __init__(self, tasks_root: Path):
        self.root = Path(tasks_root)
        self.records_dir = self.root / SCHEME_DIR
        self.quarantine_dir = self.root / "quarantine"
        self.tmp_dir = self.root / "tmp"  # where earlier builds wrote their temp files
        self.locks_dir = self.root / "locks"
        self._records_str = str(self.records_dir)
        self._root_str = str(self.root)

    # Paths, for tools and tests that look at the files themselves; the task layer goes by id.
    def path(self, task_id: str) -> Path:
        return self.records_dir / task_id[:2] / f"{task_id}.json"

    def failure_path(self, task_id: str) -> Path:
        return self.records_dir / task_id[:2] / f"{task_id}{FAILED_SUFFIX}"

    # -- reading ---------------------------------------------------------------------------------
    def read(self, task_id: str) -> TaskRecord | None:
        """The success record of ``task_id``, or None; one that is not valid is quarantined."""
        # string paths, not pathlib: this is the hit path
        return self._read(f"{self._records_str}/{task_id[:2]}/{task_id}.json", task_id, SUCCEEDED)

    def read_failure(self, task_id: str) -> TaskRecord | None:
        """The failure record of ``task_id``, or None; one that is not valid is quarantined."""
        return self._read(f"{self._records_str}/{task_id[:2]}/{task_id}{FAILED_SUFFIX}", task_id, FAILED)

    def _read(self, path: str, task_id: str, status: str) -> TaskRecord | None:
        # os-level calls, and the bytes decoded straight into the typed record (msgspec, no dict
        # first): this is most of the cost of a hit from the store
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = _read_all(fd)
        finally:
            os.close(fd)
        try:
            record = TaskRecord.from_bytes(data)
        except InvalidRecord as exc:  # not JSON, or not a valid record
            self._quarantine(path, exc.reason)
            return None
        if record.task_id != task_id or record.status != status:
            self._quarantine(path, f"its file is named for a {status} record of {task_id}, it holds a "
                                   f"{record.status} record of {record.task_id}")
            return None
        return record

    def iter_records(self, *, failures: bool = False) -> Iterator[TaskRecord]:
        """Every success record (or, with ``failures``, every failure record) in the store.

        String paths throughout, no pathlib: reports such as ``stale()`` read every record, and a
        ``Path`` per entry cost more than reading and parsing the record itself (2.3 s per 100k).
        """
        suffix, status = (FAILED_SUFFIX, FAILED) if failures else (".json", SUCCEEDED)
        try:
            buckets = sorted(os.scandir(self._records_str), key=_name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for bucket in buckets:
            if not bucket.is_dir():
                continue
            for entry in sorted(os.scandir(bucket.path), key=_name):
                name = entry.name
                if name.endswith(".json") and name.endswith(FAILED_SUFFIX) == failures:
                    record = self._read(entry.path, name[:-len(suffix)], status)
                    if record is not None:
                        yield record

    def iter_files(self) -> Iterator[tuple[str, str, bool]]:
        """``(path, task id, is_failure)`` of every file named like a record (``<task id>.json``,
        ``<task id>.failed.json``), unread: for maintenance (``kachery du``, ``kachery verify``), which
        must see a record that does not parse without this store quarantining it on the way."""
        for bucket in _scandir(self._records_str):
            if not bucket.is_dir(follow_symlinks=False):
                continue
            for entry in _scandir(bucket.path):
                task_id, failure = record_file_id(entry.name)
                if task_id is not None:
                    yield entry.path, task_id, failure

    # -- writing ---------------------------------------------------------------------------------
    def write(self, record: TaskRecord, *, sync_within: float = 0.0) -> None:
        """Write a success record, superseding any failure recorded for the same id.

        With ``sync_within`` > 0 the record is made durable by a group commit at most that many
        seconds later instead of by its own fsync (visible to every process at once either way).
        """
        if record.status != SUCCEEDED:
            raise ValueError(f"write() takes a succeeded record, not a {record.status} one (write_failure)")
        task_id = record.task_id
        base = f"{self._records_str}/{task_id[:2]}/{task_id}"  # strings: this runs per computed task
        self._write(f"{base}.json", record, sync_within)
        with suppress(FileNotFoundError):
            os.unlink(f"{base}{FAILED_SUFFIX}")

    def write_failure(self, record: TaskRecord, *, sync_within: float = 0.0) -> None:
        if record.status != FAILED:
            raise ValueError(f"write_failure() takes a failed record, not a {record.status} one (write)")
        task_id = record.task_id
        self._write(f"{self._records_str}/{task_id[:2]}/{task_id}{FAILED_SUFFIX}", record, sync_within)

    def _write(self, path: str, record: TaskRecord, sync_within: float) -> None:
        # the temp file beside the record: the rename changes one directory, not two, and the
        # creates of a big graph spread over the 256 record directories
        data = _dump(record.to_json())
        try:
            write_atomic(path, data, fsync=sync_within <= 0)  # leaves no temp file on failure
        except OSError as exc:
            full = as_store_full(exc, self.root.parent, len(data))
            if full is None:
                raise
            raise full from exc
        if sync_within > 0:
            GROUP_COMMIT.defer(self._root_str, sync_within)

    def delete(self, task_id: str) -> bool:
        """Remove the success and failure records of ``task_id``; whether there was one."""
        removed = False
        for path in (self.path(task_id), self.failure_path(task_id)):
            with suppress(FileNotFoundError):
                os.unlink(path)
                removed = True
        return removed

    def clean_tmp(self, older_than_s: float = 6 * 3600) -> int:
        """Remove temp files that killed writers left beside the records (and in ``tmp/``, where
        earlier versions wrote them); a live writer's recent file is left alone."""
        removed = remove_stale_files(self.tmp_dir, older_than_s)
        if self.records_dir.is_dir():
            for bucket in self.records_dir.iterdir():
                removed += remove_stale_files(bucket, older_than_s, prefix=TEMP_PREFIX)
        return removed

    def quarantine(self, task_id: str, why: str, *, failure: bool = False, log_line: bool = True) -> str | None:
        """Set the success (or, with ``failure``, the failure) record of ``task_id`` aside: kept for
        inspection, never used; one log line says why (unless the caller reports it itself:
        ``log_line=False``). Returns where it went (its own path on a read-only store), or None if
        it was gone."""
        return self._quarantine(str(self.failure_path(task_id) if failure else self.path(task_id)), why, log_line)

    def _quarantine(self, path: str, why: str, log_line: bool = True) -> str | None:
        name = os.path.basename(path)
        make_dirs(self.quarantine_dir)
        target = f"{self.quarantine_dir}/{name}.{time.time_ns()}"
        try:  # a move of an existing record, not a write: no fs.write_atomic
            os.replace(path, target)
        except FileNotFoundError:
            return None
        except OSError:  # read-only store: leave it; every read keeps ignoring it
            target = path
        if log_line:
            log.warning("task record %s set aside (%s): %s", name, why, target)
        return target

    # -- single flight ---------------------------------------------------------------------------
    def lock(self, task_id: str) -> flight.FlightLock:
        """The single-flight lock of ``task_id``: who holds it computes, the others wait for the record."""
        return flight.FlightLock(self.locks_dir, task_id)

    def action_lock(self, key_name: str) -> flight.FlightLock:
        """The lock of an action's idempotency key (``key_name``: a file name made from the key)."""
        return flight.FlightLock(self.locks_dir / "actions", key_name)

    def running(self) -> list[dict[str, Any]]:
        """Task ids being computed now (for :data:`~.flight.SHOW_AFTER_S` or more), with
        ``pid``, ``host`` and ``started`` of who computes them."""
        return flight.running(self.locks_dir)

    # -- the function index ----------------------------------------------------------------------
    def function_index_path(self, name: str) -> str:
        """The index file of a function's name (``by_function/<xxh64 of the name>.txt``), for tests."""
        return _index_path(self._root_str, name)

    def index_function(self, name: str, task_id: str) -> None:
        """Add ``task_id`` to the ids recorded for the function ``name`` (one ``O_APPEND`` write:
        atomic across processes). A full disk raises :class:`StoreFullError`; a short write leaves
        a torn line, which :meth:`function_task_ids` cuts back to the complete id the next append
        puts after it."""
        path = _index_path(self._root_str, name)
        line = f"{task_id}\n".encode()
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o664)
            except FileNotFoundError:  # the first record of this store
                make_dirs(self.root / "by_function")
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o664)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            finally:
                os.close(fd)
        except OSError as exc:
            full = as_store_full(exc, self.root.parent, len(line))
            if full is None:
                raise
            raise full from exc

    def function_task_ids(self, name: str) -> list[str]:
        """Task ids recorded for the function ``name``, newest last, without duplicates."""
        try:
            with open(_index_path(self._root_str, name)) as fh:
                # a line longer than an id follows a torn append: its complete id is at the end
                ids = [line.strip()[-32:] for line in fh if len(line.strip()) >= 32]
        except FileNotFoundError:
            return []
        return list(dict.fromkeys(reversed(ids)))[::-1]


_HEX = frozenset("0123456789abcdef")


def record_file_id(name: str) -> tuple[str | None, bool]:
    """The task id a record file's ``name`` is for (None if it is not a record's name), and whether
    it is a failure record."""
    failure = name.endswith(FAILED_SUFFIX)
    stem = name[:-len(FAILED_SUFFIX)] if failure else name[:-5] if name.endswith(".json") else ""
    if len(stem) != 32 or not set(stem) <= _HEX:
        return None, False
    return stem, failure


def _scandir(path: str) -> list[os.DirEntry]:
    """The entries of ``path``, sorted by name; none if it is missing."""
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=_name)
    except (FileNotFoundError, NotADirectoryError):
        return []


@functools.lru_cache(maxsize=1024)
def _index_path(tasks_root: str, name: str) -> str:
    return f"{tasks_root}/by_function/{xxhash.xxh64_hexdigest(name.encode())}.txt"


def _name(entry: os.DirEntry) -> str:
    return entry.name


_READ = 1 << 16


def _read_all(fd: int) -> bytes:
    """The file's bytes. No ``fstat`` first (a system call of its own, 5% of a hit): a record is
    read in one 64 KiB read, and a read that fills it is followed by more until end of file."""
    data = os.read(fd, _READ)
    if len(data) < _READ:
        return data
    chunks = [data]
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _dump(record: dict[str, Any]) -> bytes:
    """The record's bytes. Records are signed over their canonical JSON first (stdlib json, which
    refuses NaN), so what reaches here is plain JSON and orjson writes it as it will be read."""
    return orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS)
