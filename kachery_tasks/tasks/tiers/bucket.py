"""The bucket tier: task records that nodes published to a shared bucket, served only if trusted.

Asked after the local store. Its buckets are the config key ``bucket`` (the one this node publishes
to) then ``read_buckets`` (read only, in order), as Nix orders substituters. A bucket holds one
record per publishing node under ``records/<task id>/<node id>.json`` (buckets/layout.py), and this
tier serves a record only if all of this holds, else the miss says which failed (``explain`` shows
it):

- its publisher is **trusted**: this node, or a node id in ``trusted_nodes`` (the Nix model: a cache
  is as good as the keys it is signed with, not the place it sits). A ``pickle`` result, which runs
  code when loaded, comes only from such a publisher, like every result here;
- it **parses and validates** (store/task_record.py), is the record of the id asked for, succeeded,
  and is **signed** by the node whose key it sits under;
- it is **complete**: its result blob downloads, every byte verified against its SHA-256 (and each
  chunk against its own) before it enters the local store (buckets/transfer.py).

A hit is then the record with its blob already in the local store; the resolver's one rule copies
the record into the local store and memory, so the next call is a local hit.

Several records of one id (nodes that computed the same call) are tried in trust order: this node
first, then ``trusted_nodes`` as listed.

A lookup that found no record of a task at all is remembered for :data:`MISS_MEMORY_S` seconds (as
Nix caches negative lookups, for far longer): a call that misses looks again under its single-flight
lock, and that second look costs no round trip. A result another node publishes in that window is
computed here instead of loaded: time, never a wrong answer. A lookup that found records and refused
them is not remembered, so ``explain`` can say why. ``missing`` answers many ids with one batched existence
check per bucket (of every trusted node's record key), which is what prunes a Dask graph; records
are published after their blobs (publish.py), so a trusted record in the bucket names blobs that were
there when it was written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from pathlib import Path

from ... import config
from ...buckets import Bucket, NotFound
from ...buckets.fetch import configured_buckets
from ...buckets.layout import record_key, records_prefix
from ...buckets.transfer import download_blob
from ...errors import IntegrityError, InvalidRecord
from ...identity import node_identity
from ...store.local import store_for
from ...store.task_record import TaskRecord
from ..results import IncompleteRecord, load_result
from .base import ABSENT, Hit, Miss, Tier

log = logging.getLogger("kachery_tasks")

#: How long a miss in the buckets is believed without asking them again.
MISS_MEMORY_S = 30.0
_MISS_MEMORY_MAX = 1_000_000


class BucketTier(Tier):
    name = "bucket"

    def __init__(self, home: str, buckets: list[Bucket], trusted: list[str]):
        self.store = store_for(home)
        self.buckets = buckets
        self.trusted = trusted  # in trust order: this node first
        self._trusted_set = frozenset(trusted)
        self._missed: dict[str, float] = {}  # task id -> when the buckets were last found without it

    @classmethod
    def for_home(cls, home: str) -> BucketTier | None:
        """The tier of the buckets the configuration names, or None when it names none. The tier
        only reads, so it asks the buckets this process has opened for reading (buckets/fetch.py)."""
        buckets = configured_buckets()
        if not buckets:
            return None
        me = node_identity(Path(home)).node_id
        trusted = [me] + [n for n in config.get("trusted_nodes") if n != me]
        return cls(home, buckets, trusted)

    # -- the protocol ----------------------------------------------------------------------------
    def get(self, task_id: str) -> Hit | Miss:
        missed = self._missed.get(task_id)
        if missed is not None and time.monotonic() - missed < MISS_MEMORY_S:
            return ABSENT
        reasons: list[str] = []
        for bucket in self.buckets:
            for node in self.trusted:  # a hit costs one read: the record of a trusted node, by name
                hit = self._try(bucket, task_id, node, reasons)
                if hit is not None:
                    return hit
            # no usable record: one listing says whether others published it (explain names them)
            strangers = sorted(self._publishers(bucket, task_id) - self._trusted_set)
            if strangers:
                reasons.append(f"{bucket.uri} has records of it by node(s) not trusted here: "
                               f"{', '.join(s[:12] for s in strangers)} (add a node id to trusted_nodes to use its results)")
        if not reasons:
            self._remember_missing((task_id,))
            return ABSENT
        return Miss("; ".join(reasons))

    def missing(self, task_ids: Collection[str]) -> set[str]:
        left = set(task_ids)  # asked afresh: one round trip per bucket for them all
        for bucket in self.buckets:
            if not left:
                break
            keys = {record_key(t, n): t for t in left for n in self.trusted}
            found = bucket.exists_many(list(keys))
            left -= {keys[k] for k in found}
        return left

    def _remember_missing(self, task_ids: Collection[str]) -> None:
        if len(self._missed) > _MISS_MEMORY_MAX:
            self._missed.clear()
        now = time.monotonic()
        for task_id in task_ids:
            self._missed[task_id] = now

    def put(self, task_id: str, hit: Hit) -> None:
        """Nothing: what is published goes through publish.py, by the node's own choice."""

    def forget(self, task_id: str) -> None:
        """Drop the remembered miss of ``task_id``: a caller that knows it was just published (the
        channel tier, after a member answered) looks again at once."""
        self._missed.pop(task_id, None)

    # -- one record ------------------------------------------------------------------------------
    def _publishers(self, bucket: Bucket, task_id: str) -> set[str]:
        """The node ids with a record of ``task_id`` in ``bucket`` (one listing)."""
        prefix = records_prefix(task_id)
        names = (info.key[len(prefix):] for info in bucket.list(prefix))
        return {name[:-5] for name in names if name.endswith(".json")}

    def _try(self, bucket: Bucket, task_id: str, node: str, reasons: list[str]) -> Hit | None:
        key = record_key(task_id, node)
        where = f"{bucket.uri}/{key}"
        try:
            record = TaskRecord.from_bytes(b"".join(bucket.read(key)))
        except NotFound:
            return None
        except (InvalidRecord, ValueError) as exc:
            reasons.append(f"{where} is not a valid record ({exc})")
            return None
        if record.task_id != task_id or record.node_id != node:
            reasons.append(f"{where} holds the record of task {record.task_id} by node {record.node_id[:12]}: misplaced")
            return None
        if not record.succeeded:
            return None
        if not record.verify_signature():
            reasons.append(f"{where}: bad signature (the record was changed after node {node[:12]} signed it)")
            return None
        digest = record.result.sha256
        try:
            if digest is not None:
                download_blob(bucket, self.store.blobs, digest)
            loaded = load_result(record.result, self.store.blobs)
        except NotFound:
            reasons.append(f"{where}: its result blob sha256://{digest} is not in the bucket (incomplete)")
            return None
        except (IntegrityError, IncompleteRecord) as exc:
            reasons.append(f"{where}: its result blob is damaged ({exc})")
            return None
        return Hit(loaded.value, loaded.memo, loaded.nbytes, record, self.store.blobs)
