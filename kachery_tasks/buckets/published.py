"""Who published which file to a bucket, and removing a file this node published.

Blobs are content-addressed: the bytes under ``sha256/…`` say nothing of who put them there, and
several nodes may publish the same file. So publishing a file also writes a marker,
``files/<ab>/<cd>/<sha256>/<node id>.json`` (layout.py), as a record sits under its publisher's
node id. ``kachery bucket ls`` lists this node's markers; ``kachery bucket rm URI`` removes a file
only if this node has a marker for it, the same rule as for records.

Removing bytes others may need is the one way a bucket can lose data, so :func:`remove_file`
checks first, over the whole bucket (a listing of records, manifests and markers, and a read of
every record and manifest, 8 at a time):

- a **task record** of any publisher that names the file as its result or as an argument (blob or
  file) refuses the removal, naming the records, unless ``force`` (those records then miss, as
  incomplete: the bucket tier never serves a record whose blob is gone);
- another node's **marker**: only this node's marker goes, the bytes stay (it published them too);
- a **chunk** of the file is deleted only if no other manifest lists it, no record names it and no
  node published it as a file of its own; likewise the file's own object, if another file's
  manifest lists it as a chunk.

The manifest goes first, so a reader never finds a manifest whose chunks were deleted: it finds no
file (a clean miss). The marker goes last, so an interrupted removal can be run again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import InvalidRecord, NotFoundError, UserError
from ..store.task_record import TaskRecord
from ..store.uris import parse_file_uri
from .base import AlreadyExists, Bucket, NotFound
from .layout import (
    FILES_PREFIX,
    MANIFESTS_PREFIX,
    MAX_MANIFEST_BYTES,
    RECORDS_PREFIX,
    BucketManifest,
    InvalidManifest,
    blob_key,
    file_marker_key,
    file_markers_prefix,
    manifest_key,
)

#: Records and manifests read at once by the reference check.
READERS = 8


class FileInUse(UserError):
    """Task records in the bucket name the file: removing it would make them incomplete."""


@dataclass
class Removed:
    """What :func:`remove_file` did: the keys it deleted, the other nodes whose markers kept the
    bytes there, and the chunks kept because other files use them."""

    sha256: str
    deleted: list[str] = field(default_factory=list)
    kept_for: list[str] = field(default_factory=list)
    shared_chunks: int = 0


# -- markers ---------------------------------------------------------------------------------------
def mark_published(bucket: Bucket, sha256: str, size: int, node_id: str) -> bool:
    """Write ``node_id``'s marker for the file (after its bytes are in the bucket); False if it
    was there already."""
    data = json.dumps({"sha256": sha256, "size": size}, separators=(",", ":")).encode()
    try:
        bucket.write(file_marker_key(sha256, node_id), data)
    except AlreadyExists:
        return False
    return True


def published_files(bucket: Bucket, node_id: str) -> list[tuple[str, int]]:
    """(SHA-256, size) of every file ``node_id`` published to ``bucket`` (one listing, one small
    read per file)."""
    mine = [info.key for info in bucket.list(FILES_PREFIX) if _marker_parts(info.key)[1] == node_id]
    found = []
    for key, raw in _read_all(bucket, mine, MAX_MARKER_BYTES):
        try:
            marker = json.loads(raw)
            found.append((_marker_parts(key)[0], int(marker["size"])))
        except (ValueError, TypeError, KeyError):
            continue  # damaged: not listed (the bytes, if any, are untouched)
    return found


def publishers(bucket: Bucket, sha256: str) -> set[str]:
    """The node ids with a marker for the file (one listing)."""
    nodes = (_marker_parts(info.key)[1] for info in bucket.list(file_markers_prefix(sha256)))
    return {node for node in nodes if node is not None}


MAX_MARKER_BYTES = 4096


def _marker_parts(key: str) -> tuple[str | None, str | None]:
    """(SHA-256, node id) of a marker key, (None, None) for another key under ``files/``."""
    parts = key.split("/")
    if len(parts) != 5 or not parts[4].endswith(".json"):
        return None, None
    return parts[3], parts[4][:-5]


# -- removal ---------------------------------------------------------------------------------------
def remove_file(bucket: Bucket, sha256: str, node_id: str, *, force: bool = False) -> Removed:
    """Remove the file ``sha256`` that ``node_id`` published (see the module docstring).

    Not published by ``node_id``: :class:`~kachery_tasks.errors.NotFoundError`. Named by task
    records and not ``force``: :class:`FileInUse`, naming them; nothing is deleted."""
    mine = file_marker_key(sha256, node_id)
    if bucket.stat(mine) is None:
        raise NotFoundError(f"sha256://{sha256} was not published to {bucket.uri} by this node ({node_id[:12]}); "
                            "`kachery bucket rm` removes only what this node published (`kachery bucket ls` "
                            "lists it)")
    records = _records(bucket)
    users = [r for r in records if sha256 in record_references(r)]
    if users and not force:
        named = ", ".join(f"task {r.task_id} ({r.function.name}, by node {r.node_id[:12]})" for r in users[:3])
        more = f" and {len(users) - 3} more" if len(users) > 3 else ""
        raise FileInUse(f"sha256://{sha256} is the result or an argument of {len(users)} task record(s) in "
                        f"{bucket.uri}: {named}{more}; remove those first (`kachery bucket rm TASK_ID` on the "
                        "node that published each), or pass --force to remove the file anyway (those records "
                        "then miss, as incomplete)")
    out = Removed(sha256)
    out.kept_for = sorted(publishers(bucket, sha256) - {node_id})
    if not out.kept_for:
        _delete_bytes(bucket, sha256, set().union(*map(record_references, records)), out)
    if bucket.delete(mine):
        out.deleted.append(mine)
    return out


def referring_records(bucket: Bucket, sha256: str) -> list[TaskRecord]:
    """The task records in ``bucket`` (any publisher, signature unchecked: a removal must not
    break even a record this node would not trust) that name the file as result or argument."""
    return [r for r in _records(bucket) if sha256 in record_references(r)]


def record_references(record: TaskRecord) -> set[str]:
    """The SHA-256 of every file a record names: its result blob, and its blob and file arguments."""
    found = set()
    if record.result is not None and record.result.sha256 is not None:
        found.add(record.result.sha256)
    for entry in record.args.values():
        uri = entry.blob or entry.file
        if uri is not None:
            try:
                found.add(parse_file_uri(uri).sha256)
            except UserError:
                continue
    return found


def _delete_bytes(bucket: Bucket, sha256: str, named: set[str], out: Removed) -> None:
    """The file's manifest, then its chunks and its own object where nothing else uses them
    (``named``: the files that task records name)."""
    manifests = _manifests(bucket)
    chunk_users: dict[str, set[str]] = {}  # chunk -> the files whose manifests list it
    for m in manifests:
        for c in m.chunks:
            chunk_users.setdefault(c.sha256, set()).add(m.sha256)
    marked = {_marker_parts(info.key)[0] for info in bucket.list(FILES_PREFIX)}
    own = next((m for m in manifests if m.sha256 == sha256), None)
    mkey = manifest_key(sha256)
    if bucket.delete(mkey):
        out.deleted.append(mkey)
    if chunk_users.get(sha256):
        out.shared_chunks += 1  # the file's bytes are also a chunk of another file
    elif bucket.delete(blob_key(sha256)):
        out.deleted.append(blob_key(sha256))
    for chunk in dict.fromkeys(c.sha256 for c in (own.chunks if own is not None else ())):
        if chunk_users[chunk] - {sha256} or chunk in named or chunk in marked:
            out.shared_chunks += 1
            continue
        if bucket.delete(blob_key(chunk)):
            out.deleted.append(blob_key(chunk))


def _records(bucket: Bucket) -> list[TaskRecord]:
    keys = [info.key for info in bucket.list(RECORDS_PREFIX) if info.key.endswith(".json")]
    return _parsed(bucket, keys, None, TaskRecord.from_bytes)


def _manifests(bucket: Bucket) -> list[BucketManifest]:
    keys = [info.key for info in bucket.list(MANIFESTS_PREFIX) if info.key.endswith(".json")]
    return _parsed(bucket, keys, MAX_MANIFEST_BYTES, BucketManifest.from_json)


def _parsed(bucket: Bucket, keys: list[str], limit: int | None, parse: Callable) -> list:
    """Every object of ``keys`` that parses; a damaged one (or one gone meanwhile) is left out: what
    no reader can use needs nothing kept for it."""
    found = []
    for _, raw in _read_all(bucket, keys, limit):
        try:
            found.append(parse(raw))
        except (InvalidRecord, InvalidManifest, ValueError):
            continue
    return found


def _read_all(bucket: Bucket, keys: Iterable[str], limit: int | None) -> list[tuple[str, bytes]]:
    def read(key: str) -> tuple[str, bytes] | None:
        try:
            return key, b"".join(bucket.read(key, 0, limit))
        except NotFound:
            return None

    keys = list(keys)
    if not keys:
        return []
    with ThreadPoolExecutor(min(READERS, len(keys)), thread_name_prefix="kt-scan") as pool:
        return [r for r in pool.map(read, keys) if r is not None]


__all__ = ["FileInUse", "Removed", "mark_published", "publishers", "published_files", "record_references",
           "referring_records", "remove_file"]
