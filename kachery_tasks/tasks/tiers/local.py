"""The local tier: the records and blobs of one home's store.

A record is a hit only if it succeeded and its result is complete (its blob is there with the size
the record says, and verified as it is read); an incomplete one is set aside (quarantined) so the
task is computed again, and the miss says why. ``put`` keeps what a later tier found, and ``keep``
what it prefetched: the record's blobs are copied in (verified as they are written), then the record.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from ... import config
from ...store.local import store_for
from ...store.task_record import TaskRecord
from ..results import IncompleteRecord, check_complete, load_result
from .base import ABSENT, Fetched, Hit, Miss, Tier

log = logging.getLogger("kachery_tasks")


class LocalTier(Tier):
    name = "local"

    def __init__(self, home: str):
        self.store = store_for(home)

    def get(self, task_id: str) -> Hit | Miss:
        store = self.store
        record = store.records.read(task_id)  # a success record, validated, or None
        if record is None:
            return ABSENT
        try:
            loaded = load_result(record.result, store.blobs)
        except IncompleteRecord as exc:
            log.warning("record %s is incomplete (%s); recomputing", task_id, exc)
            store.records.quarantine(task_id, "incomplete")
            return Miss(f"incomplete: {exc}")
        return Hit(loaded.value, loaded.memo, loaded.nbytes, record, store.blobs)

    def missing(self, task_ids: Collection[str]) -> set[str]:
        store = self.store
        absent = set()
        for task_id in task_ids:
            record = store.records.read(task_id)
            if record is None:
                absent.add(task_id)
                continue
            try:
                check_complete(record.result, store.blobs)
            except IncompleteRecord:
                absent.add(task_id)
        return absent

    def put(self, task_id: str, hit: Hit) -> None:
        """Copy the record of a later tier's hit in (see :meth:`keep`)."""
        if hit.record is None or hit.blobs is None:
            return
        if hit.blobs is self.store.blobs and self.store.records.read(task_id) is not None:
            return  # a hit of this very store: nothing to copy
        self.keep(task_id, Fetched(hit.record, hit.blobs))

    def keep(self, task_id: str, fetched: Fetched) -> None:
        """Copy a record in, its result blob first: a record is never here before its blobs. Blobs
        are verified as they are written (the store hashes them). What a hit or a prefetch of a
        later tier found is kept alike: the next call, or load node, is a hit here.

        The record is made durable with the next group commit (``record_sync_seconds``), not an
        fsync of its own: it is a copy of one that is durable elsewhere, so a machine crash costs at
        most fetching it again (an unreadable record is set aside, never served), while an fsync
        each made keeping a prefetch of small results slower than fetching them."""
        record, blobs = fetched
        for digest in result_blobs(record):
            if blobs is not self.store.blobs and not self.store.blobs.exists(digest):
                self.store.blobs.put_stream(blobs.read_verified(digest), expected=digest)
        self.store.records.write(record, sync_within=config.get("record_sync_seconds"))


def result_blobs(record: TaskRecord) -> list[str]:
    """The digests of the blobs a record's result needs."""
    digest = record.result.sha256 if record.result is not None else None
    return [] if digest is None else [digest]
