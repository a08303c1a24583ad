"""What a home's store holds and what it is worth: the numbers behind ``kachery du``.

One pass over the record files (each read and parsed, as the store reads them) and one ``stat``
of every other file under ``<home>/store`` and ``<home>/tasks``; no blob is read, so the cost
grows with the number of files, not their bytes. Nothing is written or moved: a record that does
not parse is counted as unreadable, never quarantined (a read of it, or ``kachery verify``, does
that), so ``du`` is safe to run on a store other processes are using.

What a record *saves* is the wall-clock seconds its computation took (``provenance.wall_s``): a
hit on it costs that much less than computing again. A result blob shared by several records
(the same bytes) counts once in each group it belongs to, and once in the totals.

Ages go by **write time**: a record's ``created``, a blob's modification time (set when it was
stored; a ``--link``'ed blob keeps its source's). No last-use time is kept yet, so "old" means
"written long ago", not "unused since".
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRecord
from .local import LocalStore
from .records import RecordStore, record_file_id
from .task_record import TaskRecord

#: The age groups of ``--by age``: a name and the most seconds since the write, newest first.
AGE_GROUPS: tuple[tuple[str, float], ...] = (
    ("today", 86400.0),
    ("this week", 7 * 86400.0),
    ("this month", 30 * 86400.0),
    ("older", float("inf")),
)
#: The groupings ``summarize`` fills, as ``kachery du --by`` names them.
GROUPINGS = ("function", "kind", "age")
#: How many of the largest results a summary keeps.
LARGEST = 10

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Group:
    """One row of a grouping: records in it, the blobs they (or it) hold, those blobs' bytes, and
    the compute seconds its records save. ``records`` is None for a row of blobs only (blob kinds).
    In an age row, records go by their ``created`` time and blobs by their own modification time."""

    name: str
    records: int | None
    blobs: int
    bytes: int
    saved_s: float


@dataclass(frozen=True)
class Result:
    """A result blob and the record that names it (``kachery du``'s largest results)."""

    task_id: str
    function: str
    kind: str
    uri: str
    bytes: int
    wall_s: float


@dataclass(frozen=True)
class Usage:
    """A store's totals and groupings, as of one pass."""

    home: str
    disk_bytes: int  #: bytes the files under store/ and tasks/ occupy on disk (allocated blocks)
    blobs: int
    blob_bytes: int  #: the blobs' sizes (a hard-linked blob counted at its full size)
    records: int  #: success records
    failed_records: int
    unreadable_records: int  #: record files that do not parse (left in place; ``kachery verify`` quarantines them)
    record_bytes: int  #: the record files' sizes, failures included (inline results live here)
    other_bytes: int  #: everything else: stamps, manifests, quarantine, temp and partial files, indexes, locks
    saved_s: float  #: wall seconds of every success record's computation
    missing_results: int  #: success records whose result blob is not in the store
    largest: tuple[Result, ...]
    by_function: tuple[Group, ...] = field(default=())  #: most saved seconds first
    by_kind: tuple[Group, ...] = field(default=())  #: record kinds, then blob kinds
    by_age: tuple[Group, ...] = field(default=())  #: newest first

    def groups(self, by: str) -> tuple[Group, ...]:
        if by not in GROUPINGS:
            raise ValueError(f"unknown grouping {by!r}")
        return getattr(self, f"by_{by}")


@dataclass
class _Acc:
    """A group being summed: blobs counted once each by their hash."""

    records: int = 0
    saved_s: float = 0.0
    blobs: dict[str, int] = field(default_factory=dict)

    def add(self, saved_s: float, blob: tuple[str, int] | None, records: int = 1) -> None:
        self.records += records
        self.saved_s += saved_s
        if blob is not None:
            self.blobs[blob[0]] = blob[1]

    def group(self, name: str, with_records: bool = True) -> Group:
        return Group(name, self.records if with_records else None, len(self.blobs), sum(self.blobs.values()),
                     round(self.saved_s, 6))


def summarize(store: LocalStore, *, now: float | None = None) -> Usage:
    """The usage of ``store`` (see the module docstring for what each number means)."""
    now = time.time() if now is None else now
    blob_stats, blob_other, blob_disk = _blob_stats(store.blobs.root)
    tasks_disk, tasks_other = _walk_sizes(store.records.root, skip=store.records.records_dir)

    functions: dict[str, _Acc] = {}
    kinds: dict[str, _Acc] = {}
    ages = {name: _Acc() for name, _ in AGE_GROUPS}
    referenced: dict[str, str] = {}  # sha256 -> blob kind
    largest: dict[str, Result] = {}
    records = failed = unreadable = missing = 0
    record_bytes = record_disk = 0
    saved = 0.0

    for path, task_id, is_failure, size, blocks in _record_files(store.records):
        record_bytes += size
        record_disk += blocks
        record = _parse(path, task_id)
        if record is None:
            unreadable += 1
            continue
        if is_failure:
            failed += 1
            kinds.setdefault("failed records", _Acc()).add(0.0, None)
            continue
        records += 1
        wall = float(record.provenance.wall_s)
        saved += wall
        blob = None
        result = record.result
        if result is not None and result.uri is not None:
            sha = result.uri[9:]
            stat = blob_stats.get(sha)
            if stat is None:
                missing += 1
            else:
                blob = (sha, stat[0])
                referenced[sha] = f"{result.codec} results"
                best = largest.get(sha)
                if best is None or wall > best.wall_s:
                    largest[sha] = Result(record.task_id, record.function.name, record.kind, result.uri, stat[0], wall)
        for entry in record.args.values():
            if entry.blob is not None:
                referenced.setdefault(entry.blob[9:], "argument blobs")
        functions.setdefault(record.function.name, _Acc()).add(wall, blob)
        kinds.setdefault(f"{record.kind} records", _Acc()).add(wall, blob)
        ages[_age(now - float(record.created))].add(wall, None)  # blobs go by their own write time

    blob_kinds: dict[str, _Acc] = {}
    for sha, (size, mtime) in blob_stats.items():
        kind = referenced.get(sha, "other files")
        blob_kinds.setdefault(kind, _Acc()).add(0.0, (sha, size), records=0)
        ages[_age(now - mtime)].blobs.setdefault(sha, size)

    record_rows = sorted((acc.group(name) for name, acc in kinds.items()), key=lambda g: (-g.saved_s, g.name))
    blob_rows = sorted((acc.group(name, with_records=False) for name, acc in blob_kinds.items()),
                       key=lambda g: (-g.bytes, g.name))
    return Usage(
        home=str(store.home),
        disk_bytes=blob_disk + tasks_disk + record_disk,
        blobs=len(blob_stats),
        blob_bytes=sum(size for size, _ in blob_stats.values()),
        records=records,
        failed_records=failed,
        unreadable_records=unreadable,
        record_bytes=record_bytes,
        other_bytes=blob_other + tasks_other,
        saved_s=round(saved, 6),
        missing_results=missing,
        largest=tuple(sorted(largest.values(), key=lambda r: (-r.bytes, r.task_id))[:LARGEST]),
        by_function=tuple(sorted((acc.group(name) for name, acc in functions.items()),
                                 key=lambda g: (-g.saved_s, -g.bytes, g.name))),
        by_kind=(*record_rows, *blob_rows),
        by_age=tuple(ages[name].group(name) for name, _ in AGE_GROUPS),
    )


def _age(seconds: float) -> str:
    for name, limit in AGE_GROUPS:
        if seconds < limit:
            return name
    return AGE_GROUPS[-1][0]


def _parse(path: str, task_id: str) -> TaskRecord | None:
    """The record at ``path``, or None if it does not parse or is not the record its name says.
    Read as ``RecordStore`` reads it, but nothing is quarantined: ``du`` changes nothing."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        record = TaskRecord.from_bytes(data)
    except (OSError, InvalidRecord):
        return None
    return record if record.task_id == task_id else None


def _record_files(records: RecordStore) -> Iterator[tuple[str, str, bool, int, int]]:
    """(path, task id, is_failure, size, allocated bytes) of each record file."""
    for path, task_id, failure in records.iter_files():
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            continue
        yield path, task_id, failure, st.st_size, st.st_blocks * 512


def _blob_stats(root: Path) -> tuple[dict[str, tuple[int, float]], int, int]:
    """``{sha256: (size, mtime)}`` of every blob under ``root/sha256``, the bytes of every other file
    under ``root`` (stamps, manifests, quarantine, temp and partial files), and the disk bytes of all.
    A blob hard-linked twice into the store (never, by its layout) would count once on disk."""
    blobs: dict[str, tuple[int, float]] = {}
    other = disk = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        for entry in _scandir(stack.pop()):
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_nlink > 1:
                inode = (st.st_dev, st.st_ino)
                if inode in seen:
                    continue
                seen.add(inode)
            disk += st.st_blocks * 512
            name = entry.name
            if len(name) == 64 and set(name) <= _HEX and os.path.basename(os.path.dirname(os.path.dirname(
                    os.path.dirname(entry.path)))) == "sha256":
                blobs[name] = (st.st_size, st.st_mtime)
            else:
                other += st.st_size
    return blobs, other, disk


def _walk_sizes(root: Path, *, skip: Path) -> tuple[int, int]:
    """Disk bytes and sizes of the files under ``root``, except record files under ``skip`` (their
    sizes come from the record pass); temp files beside the records count here."""
    disk = size = 0
    skip_str = str(skip)
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        in_records = os.path.dirname(directory) == skip_str
        for entry in _scandir(directory):
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
                continue
            if in_records and record_file_id(entry.name)[0] is not None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            disk += st.st_blocks * 512
            size += st.st_size
    return disk, size


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


__all__ = ["AGE_GROUPS", "GROUPINGS", "LARGEST", "Group", "Result", "Usage", "summarize"]
