"""Writing task records: results, failures, arguments for replay, provenance, signature.

Format in docs/provenance.md and DESIGN.md ("Task record"). Each argument is kept with its own hash
(so ``explain`` can name the argument that differs) and, where it can, in a form that lets the call
be replayed: plain JSON, a file URI, the id of an upstream job, a pickle (replayed only from this
node's own store), or for a large array, byte string or plain data the file URI of its blob.
"""

from __future__ import annotations

import base64
import logging
import os
import time
import traceback
from typing import Any

import cloudpickle
import numpy as np
import orjson

from .. import config
from ..errors import (
    CodecError,
    KacheryError,
    StoreFullError,
    StoreFullWarning,
    UnhashableArgument,
    as_store_full,
    warn_outside,
)
from ..hashing import SCHEME, hash_value
from ..identity import node_identity, sign_document
from ..store.codecs import is_plain_json
from ..store.file import File
from ..store.local import LocalStore
from ..store.task_record import RECORD_VERSION, TaskRecord
from . import arg_blobs
from .provenance import Measure, packages_of
from .publish import publish_after_record
from .results import encode_result
from .scripts import origin_field
from .stats import STATS
from .task import Job

log = logging.getLogger("kachery_tasks")


class TaskFailed(KacheryError):
    """A recorded failure served because ``cache_errors`` is set, when the original can't be rebuilt."""


def describe_args(job: Job, store: LocalStore) -> dict[str, Any]:
    """Each argument's hash and, where it can be kept, the form a replay rebuilds it from.

    Small values go in the record (``record_args_max_bytes``); larger arrays, byte strings and plain
    data go to the store as blobs (``record_args_blob_max_bytes``, arg_blobs.py). What is not kept
    is marked ``omitted`` with the reason, which a rerun names. Keeping an argument never fails the
    call: a home too full for its blob leaves it ``omitted``.
    """
    limit = config.get("record_args_max_bytes")
    described = {}
    for name, value in job.args.items():
        value_hash = hash_value(value)
        entry: dict[str, Any] = {"hash": value_hash}
        codec = arg_blobs.blob_codec(value)
        if isinstance(value, Job):
            entry["job"] = value.id
        elif isinstance(value, File):
            entry["file"] = value.uri
        elif codec is not None and (size := arg_blobs.size_of(value, codec)) > limit:
            entry.update(_blob_entry(job, name, value, codec, value_hash, size, store))
        elif is_plain_json(value):
            size = len(orjson.dumps(value))
            if size <= limit:
                entry["json"] = value
            else:
                entry.update(_blob_entry(job, name, value, "json", value_hash, size, store))
        elif _known_size(value) > limit:  # do not pickle a big array only to find it is too big
            entry["omitted"] = f"{_known_size(value)} bytes > record_args_max_bytes={limit}"
        else:
            try:
                data = cloudpickle.dumps(value, protocol=5)
            except Exception as exc:  # recorded as not replayable, never a failure of the call
                entry["omitted"] = f"not picklable: {type(exc).__name__}"
            else:
                if len(data) <= limit:
                    entry["pickle"] = base64.b64encode(data).decode()
                elif codec is not None:  # an array just under the limit, whose pickle is just over
                    entry.update(_blob_entry(job, name, value, codec, value_hash, len(data), store))
                else:
                    entry["omitted"] = f"{len(data)} bytes > record_args_max_bytes={limit}"
        described[name] = entry
    return described


def _blob_entry(job: Job, name: str, value: Any, codec: str, value_hash: str, size: int,
                store: LocalStore) -> dict[str, Any]:
    """The ``blob`` fields of an argument too large for the record, or why it is ``omitted``."""
    blob_limit = config.get("record_args_blob_max_bytes")
    if size > blob_limit:
        return {"omitted": f"{size} bytes > record_args_blob_max_bytes={blob_limit}"}
    if not replay_can_import(job.task.func):  # its blob would serve no rerun, only fill the disk
        limit = config.get("record_args_max_bytes")
        return {"omitted": f"{size} bytes > record_args_max_bytes={limit}, and a rerun cannot import "
                           f"{job.task.name} (defined inside a function)"}
    try:
        return arg_blobs.keep(value, codec, value_hash, store.blobs)
    except OSError as exc:
        full = as_store_full(exc, store.home)
        if full is None:
            raise
        log.warning("argument %r of %s (task %s) is not kept for a rerun: %s", name, job.task.name, job.id[:12], full)
        return {"omitted": f"{size} bytes, not stored: {full}"}


def replay_can_import(func: Any) -> bool:
    """Whether replay.import_task can find the function again: a module-level name, not a closure."""
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    return bool(module and qualname and "<locals>" not in qualname)


def _known_size(value: Any) -> int:
    """The size of a value's data when it is cheap to know (arrays, buffers), else 0."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    return 0


def _base_record(job: Job, measure: Measure | None, store: LocalStore) -> dict[str, Any]:
    fid = job.task.function_id
    func = job.task.func
    module = getattr(func, "__module__", None)
    module_file = getattr(getattr(func, "__code__", None), "co_filename", None)
    return {
        "scheme": SCHEME,
        "record_version": RECORD_VERSION,
        "task_id": job.id,
        "namespace": job.settings.namespace,
        "kind": job.kind,
        "function": {
            "name": fid.name,
            "code_hash": fid.code_hash,
            "deps": dict(fid.deps),
            "module": module,
            "qualname": getattr(func, "__qualname__", None),
            "version": job.task.version,
            **origin_field(func),  # a function of __main__: the script it came from (tasks/scripts.py)
        },
        "args": describe_args(job, store),
        "upstream": [u.id for u in job.upstream()],
        "provenance": (measure or Measure()).fields(packages_of(dict(fid.deps)), module_file),
        "created": time.time(),
    }


def _sign(store: LocalStore, record: dict[str, Any]) -> TaskRecord:
    """The record signed by the home's node key, as a :class:`TaskRecord`: what is written is what
    every reader will parse (an :class:`~kachery_tasks.errors.InvalidRecord` here is a bug)."""
    identity = node_identity(store.home)
    record["node_id"] = identity.node_id
    return TaskRecord.from_json(sign_document(identity.keys, record))


def record_success(job: Job, store: LocalStore, value: Any, measure: Measure | None) -> TaskRecord | None:
    """Record a computed value; returns the signed record, or None if the home could not take it.

    Every path that records a success goes through here (the resolver, queries, Dask's ``cached()``
    nodes and ``f.delayed`` jobs), so this is the one place of the full-disk rule: a value that was
    computed, possibly for hours, is never lost because its record did not fit. When the home is
    full, over quota or read-only, the store has left nothing partial (no temp file, no record), one
    :class:`StoreFullWarning` names the home, the bytes needed and the way out, and the caller
    returns the value as usual; the single-flight lock is released as after any call, so a waiter
    computes for itself, and a later call, once there is space, records normally. A blob written
    before the record failed stays: it is sound content, and may be another record's.
    """
    try:
        record = _base_record(job, measure, store)
        record["status"] = "succeeded"
        try:
            record["result"] = encode_result(value, job.task.codec, store.blobs, config.get("inline_max_bytes"))
        except CodecError:
            if not getattr(job.task.func, "__kachery_optional_record__", False):
                raise
            # a node of a dask graph that cached() keys by content: its value may be what dask hands
            # between its own tasks (a generator, a lock), which is computed every time, not stored
            STATS.count("not_recorded")
            return None
        signed = _sign(store, record)
        store.records.write(signed, sync_within=_sync_within(measure))
    except OSError as exc:
        full = as_store_full(exc, store.home)
        if full is None:
            raise
        STATS.count("not_recorded")
        warn_store_full(f"{job.task.name} (task {job.id[:12]}) was computed, but its result was not recorded: "
                        f"{full}. The value is returned; the next call computes it again", full)
        return None
    _index_by_function(store, signed.function.name, job.id)
    STATS.count("recorded")
    if job.settings.publish:
        publish_after_record(job, store)
    return signed


def record_failure(job: Job, store: LocalStore, exc: BaseException, measure: Measure | None) -> None:
    """Keep a failure beside the task id; it is listed and explained, never served as a result.

    Called while the user's exception is on its way up: nothing here may replace it. A home that
    cannot take the write gets a :class:`StoreFullWarning`, any other trouble a logged line.
    """
    try:
        _record_failure(job, store, exc, measure)
    except Exception as trouble:
        full = as_store_full(trouble, store.home)
        if full is not None:
            warn_store_full(f"the failure of {job.task.name} (task {job.id[:12]}) was not recorded: {full}", full)
        else:
            log.warning("the failure of %s (task %s) was not recorded: %s: %s",
                        job.task.name, job.id[:12], type(trouble).__name__, trouble)


def _record_failure(job: Job, store: LocalStore, exc: BaseException, measure: Measure | None) -> None:
    try:
        record = _base_record(job, measure, store)
    except UnhashableArgument:
        return
    record["status"] = "failed"
    record["error"] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "pid": os.getpid(),
    }
    try:
        record["error"]["pickle"] = base64.b64encode(cloudpickle.dumps(exc)).decode()
    except Exception:
        pass
    signed = _sign(store, record)
    store.records.write_failure(signed, sync_within=_sync_within(measure))
    _index_by_function(store, signed.function.name, job.id)
    STATS.count("failed")


def warn_store_full(message: str, full: StoreFullError) -> None:
    """Issue the one :class:`StoreFullWarning` of a call, attributed to the first frame outside
    kachery-tasks (the user's call, or the Dask machinery that ran it) rather than to this file."""
    warn_outside(StoreFullWarning(message))


def _sync_within(measure: Measure | None) -> float:
    """How soon the record must be durable: a computation shorter than ``record_sync_seconds`` is
    cheaper to redo than its own fsync, so its record joins a group commit (store/durability.py);
    a longer one is fsynced before the call returns."""
    window = float(config.get("record_sync_seconds"))
    wall = measure.wall_s if measure is not None else 0.0
    return window if wall < window else 0.0


def rebuild_error(failure: TaskRecord) -> BaseException:
    """The exception a recorded failure holds, or :class:`TaskFailed` if it can't be rebuilt."""
    error = failure.error
    if error is None:
        return TaskFailed(f"task {failure.task_id} has no recorded failure")
    if error.pickle is not None:
        try:
            exc = cloudpickle.loads(base64.b64decode(error.pickle))
            if isinstance(exc, BaseException):
                return exc
        except Exception:
            pass
    return TaskFailed(f"{error.type}: {error.message} (recorded failure of task {failure.task_id})")


def _index_by_function(store: LocalStore, name: str, task_id: str) -> None:
    """Add the id to the function's index (RecordStore.index_function). The index only helps
    ``explain`` find a function's records, so a disk too full for it leaves the record (already
    written) as it is and logs a line."""
    try:
        store.records.index_function(name, task_id)
    except StoreFullError as full:
        log.warning("task %s is recorded, but `kachery task explain` will not compare other calls of %s with "
                    "it: %s", task_id[:12], name, full)
