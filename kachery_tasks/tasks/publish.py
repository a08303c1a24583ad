"""Publishing: putting this node's files and task records into its bucket, for others to find.

What a record needs goes first and the record last, so a record in a bucket always names blobs that
were there when it was written (as REAPI separates blob writes from result writes): the result blob,
the argument blobs a replay reads, then the records of the jobs it consumed (upstream first), then
the record itself, under ``records/<task id>/<signer's node id>.json``. Every write is
create-if-absent, so publishing again, or from two processes at once, is harmless, and an
interrupted publish resumes where it stopped (large blobs chunk by chunk: buckets/transfer.py).

Only the bucket of the config key ``bucket`` is written, never a ``read_buckets`` one; with
``bucket_read_only`` publishing is refused with one line, and so it is once the bucket refused a
write in this process (credentials that cannot write: buckets/refusals.py).
Automatic publishing (``@pure(publish=True)``, ``f.options(publish=True)``, config ``publish``)
happens right after a result is recorded; if the bucket cannot take it, the value is still returned
and recorded locally, and a warning says how to publish it later; a bucket that is read-only, by
configuration or for these credentials, is skipped in silence (after one warning for the latter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import orjson

from .. import config
from ..buckets import AlreadyExists, Bucket, BucketError
from ..buckets.fetch import configured_bucket
from ..buckets.layout import record_key
from ..buckets.refusals import WriteRefused
from ..buckets.transfer import upload_blob
from ..errors import KacheryError, KacheryWarning, NotFoundError, UserError, warn_outside
from ..store.blobs import Progress
from ..store.file import File
from ..store.local import LocalStore, store_for
from ..store.task_record import TaskRecord
from ..store.uris import parse_file_uri
from .replay import find_record
from .task import Job

log = logging.getLogger("kachery_tasks")


class PublishWarning(KacheryWarning):
    """A result was computed and recorded here, but could not be published to the bucket."""


class ReadOnlyBucketWarning(PublishWarning):
    """The bucket refused a write with these credentials: nothing more is published to it by this
    process (said once per process; ``bucket_read_only: true`` silences it)."""


@dataclass
class Published:
    """What a publish put into the bucket: blobs (by SHA-256) and task records (by task id), each
    with whether it was new there; ``bytes_sent`` crossed the network."""

    bucket: str
    blobs: dict[str, bool] = field(default_factory=dict)
    records: dict[str, bool] = field(default_factory=dict)
    bytes_sent: int = 0


def publish(*targets: str | File | Job, progress: Progress | None = None) -> Published:
    """Publish files (``sha256://`` URIs or :class:`File`) and task results (jobs, or task ids of
    this home's records) to the configured bucket. Returns what was sent."""
    store = store_for(config.home_str())
    bucket = configured_bucket(write=True)
    out = Published(bucket.uri)
    for target in targets:
        if isinstance(target, File):
            _blob(store, bucket, target.sha256, out, progress)
        elif isinstance(target, Job):
            publish_task(store, bucket, target.id, out, progress)
        elif isinstance(target, str) and target.startswith("sha256://"):
            _blob(store, bucket, parse_file_uri(target).sha256, out, progress)
        elif isinstance(target, str):
            publish_task(store, bucket, find_record(store, target).task_id, out, progress)
        else:
            raise UserError(f"kt.publish takes sha256:// URIs, files, jobs and task ids, not {type(target).__name__}")
    return out


def publish_task(store: LocalStore, bucket: Bucket, task_id: str, out: Published,
                 progress: Progress | None = None, _done: set[str] | None = None) -> None:
    """Publish the success record of ``task_id`` with its blobs and its upstream records."""
    done = set() if _done is None else _done
    if task_id in done:
        return
    done.add(task_id)
    record = store.records.read(task_id)
    if record is None:
        raise NotFoundError(f"task {task_id} has no success record in this home ({store.home}); "
                            "compute it first, or publish from the node that has it")
    for digest in _blobs_of(record):
        _blob(store, bucket, digest, out, progress)
    for upstream in record.upstream:
        publish_task(store, bucket, upstream, out, progress, done)
    _record(bucket, record, out)


def _blobs_of(record: TaskRecord) -> list[str]:
    """The blobs a record names: its result's, and those of arguments kept as blobs for replay."""
    digests = [] if record.result is None or record.result.sha256 is None else [record.result.sha256]
    for entry in record.args.values():
        if entry.blob is not None:
            digests.append(parse_file_uri(entry.blob).sha256)
    return digests


def _blob(store: LocalStore, bucket: Bucket, digest: str, out: Published, progress: Progress | None) -> None:
    if digest in out.blobs:
        return
    if not store.blobs.exists(digest):
        raise NotFoundError(f"sha256://{digest} is not in this home's store ({store.home}); nothing to publish")
    moved = upload_blob(bucket, store.blobs, digest, progress)
    out.blobs[digest] = moved.bytes_moved > 0
    out.bytes_sent += moved.bytes_moved


def _record(bucket: Bucket, record: TaskRecord, out: Published) -> None:
    data = orjson.dumps(record.to_json())
    try:
        bucket.write(record_key(record.task_id, record.node_id), data)
        out.records[record.task_id] = True
    except AlreadyExists:  # published before (records are immutable: same id, same signer)
        out.records[record.task_id] = False


def publish_after_record(job: Job, store: LocalStore) -> None:
    """Publish a result just recorded (automatic publishing). Never raises: the value is computed
    and recorded. A bucket that cannot take it gets one warning that says how to publish later; a
    bucket read-only for these credentials, one warning for the whole process; a bucket configured
    read-only (``bucket_read_only``), none."""
    if config.get("bucket_read_only"):
        return
    try:
        bucket = configured_bucket(write=True)
        publish_task(store, bucket, job.id, Published(bucket.uri))
    except WriteRefused as exc:
        if exc.first:
            warn_outside(ReadOnlyBucketWarning(str(exc)))
    except (KacheryError, BucketError, OSError) as exc:
        warn_outside(PublishWarning(
            f"{job.task.name} (task {job.id[:12]}) was computed and recorded here, but not published: {exc}. "
            f"Publish it later with `kachery publish {job.id}`"))
