"""The local tier: the records and blobs of one home's store.

A record is a hit only if it succeeded and its result is complete (its blob is there with the size
the record says, and verified as it is read); an incomplete one is set aside (quarantined) so the
task is computed again, and the miss says why. ``put`` keeps what a later tier found: the record's
blobs are copied in (verified as they are written), then the record.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from ...errors import IntegrityError
from ...store.local import store_for
from ...store.uris import parse_file_uri
from ..results import IncompleteRecord, check_complete, load_result
from .base import ABSENT, Hit, Miss, Tier

log = logging.getLogger("kachery_tasks")


class LocalTier(Tier):
    name = "local"

    def __init__(self, home: str):
        self.store = store_for(home)

    def get(self, task_id: str) -> Hit | Miss:
        store = self.store
        record = store.records.read(task_id)
        if record is None or record.get("status") != "succeeded":
            return ABSENT
        try:
            loaded = load_result(record["result"], store.blobs)
        except (IncompleteRecord, KeyError) as exc:
            log.warning("record %s is incomplete (%s); recomputing", task_id, exc)
            store.records.quarantine(store.records.path(task_id), "incomplete")
            return Miss(f"incomplete: {exc}")
        return Hit(loaded.value, loaded.memo, loaded.nbytes, record, store.blobs)

    def missing(self, task_ids: Collection[str]) -> set[str]:
        store = self.store
        absent = set()
        for task_id in task_ids:
            record = store.records.read(task_id)
            if record is None or record.get("status") != "succeeded":
                absent.add(task_id)
                continue
            try:
                check_complete(record["result"], store.blobs)
            except (IncompleteRecord, KeyError):
                absent.add(task_id)
        return absent

    def put(self, task_id: str, hit: Hit) -> None:
        """Copy the record of a later tier's hit in, its result blob first: a record is never
        here before its blobs. Blobs are verified as they are written (the store hashes them)."""
        if hit.record is None or hit.blobs is None or hit.blobs is self.store.blobs:
            return
        for digest in result_blobs(hit.record):
            if not self.store.blobs.exists(digest):
                got = self.store.blobs.put_stream(hit.blobs.read_verified(digest))
                if got != digest:
                    raise IntegrityError(f"blob {digest} of task {task_id} arrived as {got}; not kept")
        self.store.records.write(hit.record)


def result_blobs(record: dict) -> list[str]:
    """The digests of the blobs a record's result needs."""
    uri = record.get("result", {}).get("uri")
    return [] if uri is None else [parse_file_uri(uri).sha256]
