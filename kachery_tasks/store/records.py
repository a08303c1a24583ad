"""Task records: ``<home>/tasks/kt1/<ab>/<task id>.json``, one JSON document per task id.

A record says how a task id resolved: its function identity, its arguments (small ones in canonical
form, jobs by task id, files by URI), the result (inline, or a codec and a blob URI) and the
provenance of the computation, signed by the node that computed it. A failure is kept apart, in
``<task id>.failed.json``, so it never replaces a result (a query's last good value stays as its
fallback) and is never served as one. Records are written atomically (a temp file beside the
record, renamed over it); a disk that is full, over quota or read-only raises
:class:`~kachery_tasks.errors.StoreFullError` and leaves the old record, if any, as it was.
A record that cannot be parsed is moved to ``<home>/tasks/quarantine/`` and treated as absent.
Records of short computations are fsynced in groups (durability.py): a machine crash can leave such
a record empty or missing, which reads as absent, so the task is computed again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson

from ..errors import as_store_full
from ..fs import TEMP_PREFIX, make_dirs, remove_stale_files, write_atomic
from .durability import GROUP_COMMIT

log = logging.getLogger(__name__)

SCHEME_DIR = "kt1"
FAILED_SUFFIX = ".failed.json"


class RecordStore:
    def __init__(self, tasks_root: Path):
        self.root = Path(tasks_root)
        self.records_dir = self.root / SCHEME_DIR
        self.quarantine_dir = self.root / "quarantine"
        self.tmp_dir = self.root / "tmp"  # where earlier builds wrote their temp files
        self._records_str = str(self.records_dir)

    def path(self, task_id: str) -> Path:
        return self.records_dir / task_id[:2] / f"{task_id}.json"

    def failure_path(self, task_id: str) -> Path:
        return self.records_dir / task_id[:2] / f"{task_id}{FAILED_SUFFIX}"

    # -- reading ---------------------------------------------------------------------------------
    def read(self, task_id: str) -> dict[str, Any] | None:
        """The success record of ``task_id``, or None; an unreadable one is quarantined."""
        # string paths, not pathlib: this is the hit path
        return self._read(f"{self._records_str}/{task_id[:2]}/{task_id}.json")

    def read_failure(self, task_id: str) -> dict[str, Any] | None:
        return self._read(self.failure_path(task_id))

    def _read(self, path: Path | str) -> dict[str, Any] | None:
        # os-level calls and orjson: this is most of the cost of a hit from the store
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = _read_all(fd)
        finally:
            os.close(fd)
        try:
            record = orjson.loads(data)
            if not isinstance(record, dict) or "task_id" not in record:
                raise ValueError("not a task record")
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            self.quarantine(Path(path), "unreadable record")
            return None
        return record

    def iter_records(self, *, failures: bool = False) -> Iterator[dict[str, Any]]:
        """Every success record (or, with ``failures``, every failure record) in the store.

        String paths throughout, no pathlib: reports such as ``stale()`` read every record, and a
        ``Path`` per entry cost more than reading and parsing the record itself (2.3 s per 100k).
        """
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
                    record = self._read(entry.path)
                    if record is not None:
                        yield record

    # -- writing ---------------------------------------------------------------------------------
    def write(self, record: dict[str, Any], *, sync_within: float = 0.0) -> None:
        """Write a success record, superseding any failure recorded for the same id.

        With ``sync_within`` > 0 the record is made durable by a group commit at most that many
        seconds later instead of by its own fsync (visible to every process at once either way).
        """
        task_id = record["task_id"]
        base = f"{self._records_str}/{task_id[:2]}/{task_id}"  # strings: this runs per computed task
        self._write(f"{base}.json", record, sync_within)
        with suppress(FileNotFoundError):
            os.unlink(f"{base}{FAILED_SUFFIX}")

    def write_failure(self, record: dict[str, Any], *, sync_within: float = 0.0) -> None:
        self._write(self.failure_path(record["task_id"]), record, sync_within)

    def _write(self, path: Path | str, record: dict[str, Any], sync_within: float) -> None:
        # the temp file beside the record: the rename changes one directory, not two, and the
        # creates of a big graph spread over the 256 record directories
        data = _dump(record)
        try:
            write_atomic(path, data, fsync=sync_within <= 0)  # leaves no temp file on failure
        except OSError as exc:
            full = as_store_full(exc, self.root.parent, len(data))
            if full is None:
                raise
            raise full from exc
        if sync_within > 0:
            GROUP_COMMIT.defer(str(self.root), sync_within)

    def delete(self, task_id: str) -> bool:
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

    def quarantine(self, path: Path, why: str) -> None:
        """Set a record aside (kept for inspection, never used) and log one line."""
        make_dirs(self.quarantine_dir)
        target = self.quarantine_dir / f"{path.name}.{time.time_ns()}"
        try:  # a move of an existing record, not a write: no fs.write_atomic
            os.replace(path, target)
        except FileNotFoundError:
            return
        except OSError:  # read-only store: leave it; every read keeps ignoring it
            target = path
        log.warning("task record %s set aside (%s): %s", path.name, why, target)



def _name(entry: os.DirEntry) -> str:
    return entry.name


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    data = os.read(fd, size + 1)
    if len(data) <= size:
        return data
    chunks = [data]  # the file grew while we read: read on to the end
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _dump(record: dict[str, Any]) -> bytes:
    """The record's bytes. Records are signed over their canonical JSON first (stdlib json, which
    refuses NaN), so what reaches here is plain JSON and orjson writes it as it will be read."""
    return orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS)
