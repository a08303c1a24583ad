"""The checks of ``kachery verify``: every blob re-hashed, every record parsed and its signature
and blobs checked. What a repair would need (the blobs to fetch again) is said, not done: fetching
is the buckets layer's (buckets/repair.py), above this one.

**Blobs** are hashed whole whatever their verified stamps say (``BlobStore.scrub``); a damaged one
is quarantined, as any read that finds one does.

**Records** are read as files, not through ``RecordStore.read`` (which would set a bad one aside
with only a log line), so each problem can be reported:

- a record that does not parse, or is not the record its file name says, is quarantined;
- one whose signature does not verify is quarantined: it was changed after its node signed it,
  so it can be neither trusted nor published (a bucket reader would refuse it);
- one whose **result** blob is missing is left in place and reported: fetching the blob repairs
  it, and a hit on it meanwhile recomputes (the resolver sets it aside then). A missing
  **argument** blob (kept for a replay) is reported as a note only: a record copied from a bucket
  comes with its result blob alone, so that is a normal state. File arguments are files of their
  own and are not checked.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import IntegrityError, InvalidRecord, NotFoundError
from .blobs import BlobStore, Progress
from .records import RecordStore
from .task_record import TaskRecord

#: What can be wrong with a record file, as reports name it.
UNREADABLE = "unreadable"
BAD_SIGNATURE = "bad signature"
MISSING_RESULT = "missing result blob"
MISSING_ARGUMENT = "missing argument blob"
#: Problems after which the record is quarantined.
QUARANTINED = frozenset({UNREADABLE, BAD_SIGNATURE})


@dataclass(frozen=True)
class DamagedBlob:
    sha256: str
    size: int
    error: str


@dataclass(frozen=True)
class BlobScrub:
    """What re-hashing every blob found. ``bytes`` counts the damaged blobs' bytes too."""

    checked: int
    bytes: int
    seconds: float
    damaged: tuple[DamagedBlob, ...]

    @property
    def rate(self) -> float:
        """Bytes hashed per second."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RecordProblem:
    """One thing wrong with one record file; ``sha256`` is the missing blob, if that is the problem."""

    task_id: str
    failure: bool  #: a failure record (``<id>.failed.json``)
    problem: str  #: one of UNREADABLE, BAD_SIGNATURE, MISSING_RESULT, MISSING_ARGUMENT
    detail: str
    sha256: str | None = None

    @property
    def breaks(self) -> bool:
        """Whether the record cannot serve its result (a missing argument blob only stops a replay)."""
        return self.problem != MISSING_ARGUMENT


@dataclass(frozen=True)
class RecordCheck:
    checked: int
    problems: tuple[RecordProblem, ...]


def scrub_blobs(blobs: BlobStore, progress: Progress | None = None,
                blob_done: Callable[[], None] | None = None) -> BlobScrub:
    """Re-hash every blob of ``blobs``; ``progress(n)`` gets the bytes as they are hashed and
    ``blob_done()`` is called after each blob."""
    started = time.perf_counter()
    checked = total = 0
    damaged = []
    for sha256 in blobs.iter_hashes():
        try:
            size = blobs.size(sha256)
            blobs.scrub(sha256, progress)
        except NotFoundError:
            continue  # removed while we walked the store
        except IntegrityError as exc:
            damaged.append(DamagedBlob(sha256, size, str(exc)))
        checked += 1
        total += size
        if blob_done is not None:
            blob_done()
    return BlobScrub(checked, total, time.perf_counter() - started, tuple(damaged))


def check_records(records: RecordStore, blobs: BlobStore, record_done: Callable[[], None] | None = None) -> RecordCheck:
    """Check every record file (see the module docstring); quarantine the ones that cannot be used."""
    checked = 0
    problems: list[RecordProblem] = []
    for path, task_id, failure in records.iter_files():
        checked += 1
        problems.extend(_check_one(records, blobs, path, task_id, failure))
        if record_done is not None:
            record_done()
    return RecordCheck(checked, tuple(problems))


def _check_one(records: RecordStore, blobs: BlobStore, path: str, task_id: str, failure: bool) -> list[RecordProblem]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []  # removed (or superseded) while we walked the store
    try:
        record = TaskRecord.from_bytes(data)
        if record.task_id != task_id or record.succeeded == failure:
            raise InvalidRecord(f"its file is named for a {'failed' if failure else 'succeeded'} record of {task_id}, "
                                f"it holds a {record.status} record of {record.task_id}")
    except InvalidRecord as exc:
        where = records.quarantine(task_id, str(exc), failure=failure, log_line=False)
        return [RecordProblem(task_id, failure, UNREADABLE, f"{exc}; moved to {where}")]
    if not record.verify_signature():
        why = f"its signature does not verify as node {record.node_id[:12]}'s"
        where = records.quarantine(task_id, why, failure=failure, log_line=False)
        return [RecordProblem(task_id, failure, BAD_SIGNATURE, f"{why}; moved to {where}")]
    found = []
    result = record.result
    if result is not None and result.uri is not None and not blobs.exists(result.sha256):
        found.append(RecordProblem(task_id, failure, MISSING_RESULT, f"its result {result.uri} is not in the store",
                                   result.sha256))
    for name, entry in record.args.items():
        if entry.blob is not None and not blobs.exists(entry.blob[9:]):
            found.append(RecordProblem(task_id, failure, MISSING_ARGUMENT,
                                       f"argument {name!r} ({entry.blob}) is not in the store (a replay needs it)",
                                       entry.blob[9:]))
    return found


def quarantined_missing(blobs: BlobStore) -> list[str]:
    """SHA-256 of the blobs in quarantine (``<hex>.<time ns>``) that are not back in the store."""
    try:
        names = os.listdir(blobs.quarantine_dir)
    except FileNotFoundError:
        return []
    hashes = {name.split(".", 1)[0] for name in names}
    return sorted(h for h in hashes if len(h) == 64 and not blobs.exists(h))


__all__ = ["BAD_SIGNATURE", "MISSING_ARGUMENT", "MISSING_RESULT", "QUARANTINED", "UNREADABLE", "BlobScrub",
           "DamagedBlob", "RecordCheck", "RecordProblem", "check_records", "quarantined_missing", "scrub_blobs"]
