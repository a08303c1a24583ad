"""Publishing: putting this node's files and task records into its bucket, for others to find.

What a record needs goes first and the record last, so a record in a bucket always names blobs that
were there when it was written (as REAPI separates blob writes from result writes): the result blob,
the argument blobs a replay reads, then the records of the jobs it consumed (upstream first), then
the record itself, under ``records/<task id>/<signer's node id>.json``. Every blob goes with this
node's marker (``files/…/<node id>.json``, buckets/published.py), which is how ``kachery bucket ls``
and ``rm`` know what this node published. Every write is create-if-absent, so publishing again, or
from two processes at once, is harmless, and an interrupted publish resumes where it stopped (large
blobs chunk by chunk: buckets/transfer.py).

A publish is planned before anything is sent (:func:`plan_publish`): every record and blob is
found in this home first, so a missing one is an error with nothing sent, and the command line
knows the objects and bytes its progress bar counts. A Dask collection publishes every task of its
graph that has a record here, and says which have none yet (not computed): a collection not yet
computed publishes nothing, and says so, without an error.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .. import config
from ..buckets import AlreadyExists, Bucket, BucketError
from ..buckets.fetch import configured_bucket
from ..buckets.layout import record_key
from ..buckets.published import mark_published
from ..buckets.refusals import WriteRefused
from ..buckets.transfer import upload_blob
from ..errors import KacheryError, KacheryWarning, NotFoundError, UserError, warn_outside
from ..identity import node_identity
from ..store.blobs import Progress
from ..store.file import File
from ..store.local import LocalStore, store_for
from ..store.task_record import TaskRecord
from ..store.uris import parse_file_uri
from .dask_layer import dask_layer, is_collection
from .replay import find_record
from .task import Job

log = logging.getLogger("kachery_tasks")

#: Graph nodes named in a one-line message before "and N more".
NAMED = 5


class PublishWarning(KacheryWarning):
    """A result was computed and recorded here, but could not be published to the bucket."""


class ReadOnlyBucketWarning(PublishWarning):
    """The bucket refused a write with these credentials: nothing more is published to it by this
    process (said once per process; ``bucket_read_only: true`` silences it)."""


@dataclass
class Published:
    """What a publish put into the bucket: blobs (by SHA-256) and task records (by task id), each
    with whether it was new there; ``bytes_sent`` crossed the network. For Dask collections:
    ``not_computed`` names the graph nodes with no record here (nothing of them was sent), and
    ``uncached`` the nodes that can have none (no content identity), with why."""

    bucket: str
    blobs: dict[str, bool] = field(default_factory=dict)
    records: dict[str, bool] = field(default_factory=dict)
    bytes_sent: int = 0
    not_computed: list[str] = field(default_factory=list)
    uncached: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: what was sent, and what of the collections given was not (and why)."""
        line = (f"published to {self.bucket}: {len(self.records)} record(s) ({sum(self.records.values())} new), "
                f"{len(self.blobs)} blob(s) ({sum(self.blobs.values())} new), {self.bytes_sent} bytes sent")
        if self.not_computed:
            line += (f"; {len(self.not_computed)} graph node(s) not computed yet, so not published: "
                     f"{_named(self.not_computed)}")
        if self.uncached:
            line += f"; {len(self.uncached)} graph node(s) have no content identity and are never cached"
        return line

    def __str__(self) -> str:
        return self.summary()


@dataclass
class Plan:
    """What a publish sends, in order: blobs (a SHA-256, ``str``) and records (``TaskRecord``),
    each record after its blobs and its upstream records."""

    steps: list[str | TaskRecord] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # blob -> bytes
    not_computed: list[str] = field(default_factory=list)
    uncached: dict[str, str] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def objects(self) -> int:
        return len(self.steps)


def publish(*targets: str | File | Job | Any, progress: Progress | None = None) -> Published:
    """Publish files (``sha256://`` URIs or :class:`File`), task results (jobs, or task ids of this
    home's records) and Dask collections (every task of the graph that has a record here) to the
    configured bucket. Returns what was sent; ``str()`` of it is one line that says so.

    Graph nodes of a collection with no record here are not an error: they are named in
    ``not_computed``, and a :class:`PublishWarning` says so (a collection not computed yet publishes
    nothing)."""
    store = store_for(config.home_str())
    bucket = configured_bucket(write=True)
    out = send(plan_publish(store, *targets), store, bucket, progress)
    if out.not_computed:
        warn_outside(PublishWarning(
            f"{len(out.not_computed)} graph node(s) have no result recorded in this home, so they were not "
            f"published: {_named(out.not_computed)}; compute the collection first"))
    return out


def plan_publish(store: LocalStore, *targets: Any) -> Plan:
    """What publishing ``targets`` sends (see :class:`Plan`); a file or record missing here is a
    one-line ``NotFoundError`` before anything is sent."""
    planner = _Planner(store)
    for target in targets:
        if isinstance(target, File):
            planner.blob(target.sha256)
        elif isinstance(target, Job):
            planner.task(target.id)
        elif isinstance(target, str) and target.startswith("sha256://"):
            planner.blob(parse_file_uri(target).sha256)
        elif isinstance(target, str):
            planner.task(find_record(store, target).task_id)
        elif is_collection(target):
            planner.collection(target)
        else:
            raise UserError(f"kt.publish takes sha256:// URIs, files, jobs, task ids and Dask collections, "
                            f"not {type(target).__name__}")
    return planner.plan


class _Planner:
    def __init__(self, store: LocalStore):
        self.store = store
        self.plan = Plan()
        self._tasks: set[str] = set()

    def blob(self, digest: str) -> None:
        if digest in self.plan.sizes:
            return
        if not self.store.blobs.exists(digest):
            raise NotFoundError(f"sha256://{digest} is not in this home's store ({self.store.home}); nothing "
                                "to publish")
        self.plan.sizes[digest] = self.store.blobs.size(digest)
        self.plan.steps.append(digest)

    def task(self, task_id: str, record: TaskRecord | None = None) -> None:
        """The record of ``task_id`` after its blobs and its upstream records (without recursion: a
        pipeline may be deeper than Python's stack)."""
        stack: list[tuple[str, TaskRecord | None, bool]] = [(task_id, record, False)]
        while stack:
            tid, rec, ready = stack.pop()
            if ready:  # everything it names is planned
                self.plan.steps.append(rec)
                continue
            if tid in self._tasks:
                continue
            self._tasks.add(tid)
            rec = rec or self.store.records.read(tid)
            if rec is None:
                raise NotFoundError(f"task {tid} has no success record in this home ({self.store.home}); "
                                    "compute it first, or publish from the node that has it")
            for digest in _blobs_of(rec):
                self.blob(digest)
            stack.append((tid, rec, True))
            stack.extend((up, None, False) for up in reversed(rec.upstream))

    def collection(self, collection: Any) -> None:
        found = dask_layer().collection_tasks(collection)
        for name, task_id in found.ids.items():
            record = self.store.records.read(task_id)
            if record is None:
                self.plan.not_computed.append(name)
            else:
                self.task(task_id, record)
        self.plan.uncached.update(found.uncached)


def send(plan: Plan, store: LocalStore, bucket: Bucket, progress: Progress | None = None,
         objects: Callable[[int], None] | None = None) -> Published:
    """Carry out ``plan``: ``progress(n)`` counts bytes done (sent or found there), ``objects(1)``
    each blob or record done."""
    node_id = node_identity(store.home).node_id
    out = Published(bucket.uri, not_computed=list(plan.not_computed), uncached=dict(plan.uncached))
    for step in plan.steps:
        if isinstance(step, str):
            moved = upload_blob(bucket, store.blobs, step, progress)
            mark_published(bucket, step, plan.sizes[step], node_id)
            out.blobs[step] = moved.bytes_moved > 0
            out.bytes_sent += moved.bytes_moved
        else:
            _record(bucket, step, out)
        if objects is not None:
            objects(1)
    return out


def publish_task(store: LocalStore, bucket: Bucket, task_id: str) -> Published:
    """Publish the success record of ``task_id`` with its blobs and its upstream records."""
    planner = _Planner(store)
    planner.task(task_id)
    return send(planner.plan, store, bucket)


def _blobs_of(record: TaskRecord) -> list[str]:
    """The blobs a record needs in the bucket: its result's, and those of arguments kept as blobs
    for replay (file arguments are files of their own, published by whoever shares them)."""
    digests = [] if record.result is None or record.result.sha256 is None else [record.result.sha256]
    for entry in record.args.values():
        if entry.blob is not None:
            digests.append(parse_file_uri(entry.blob).sha256)
    return digests


def _record(bucket: Bucket, record: TaskRecord, out: Published) -> None:
    data = orjson.dumps(record.to_json())
    try:
        bucket.write(record_key(record.task_id, record.node_id), data)
        out.records[record.task_id] = True
    except AlreadyExists:  # published before (records are immutable: same id, same signer)
        out.records[record.task_id] = False


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:NAMED])
    return shown + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")


def publish_after_record(job: Job, store: LocalStore) -> None:
    """Publish a result just recorded (automatic publishing). Never raises: the value is computed
    and recorded. A bucket that cannot take it gets one warning that says how to publish later; a
    bucket read-only for these credentials, one warning for the whole process; a bucket configured
    read-only (``bucket_read_only``), none."""
    if config.get("bucket_read_only"):
        return
    try:
        publish_task(store, configured_bucket(write=True), job.id)
    except WriteRefused as exc:
        if exc.first:
            warn_outside(ReadOnlyBucketWarning(str(exc)))
    except (KacheryError, BucketError, OSError) as exc:
        warn_outside(PublishWarning(
            f"{job.task.name} (task {job.id[:12]}) was computed and recorded here, but not published: {exc}. "
            f"Publish it later with `kachery publish {job.id}`"))
