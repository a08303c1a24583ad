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

``prefetch`` then fetches what ``missing`` found, ``bucket_parallelism`` ids at a time on a thread
pool: each id goes through the very checks of ``get`` (:meth:`BucketTier._verified`), its blob into
the local store, but its result is not decoded (the load node decodes it from the local store, once);
only the records that batched check found are read (:meth:`BucketTier._candidates`).
A round trip to a bucket costs milliseconds whatever the object's size, so one id after the other
a rerun of 1,000 small results is seconds of waiting; in parallel it is bounded by bandwidth. An id
whose record is refused is a Miss (computed, and ``explain`` says why); an id whose fetch failed
otherwise (the bucket unavailable, a full disk) is logged and left to ``get``, which fails or
succeeds as it would have. At most twice ``bucket_parallelism`` records are held at once: results
go to the local store, never into memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from itertools import islice
from pathlib import Path
from typing import TypeVar

from ... import config
from ...buckets import Bucket, NotFound
from ...buckets.fetch import configured_buckets
from ...buckets.layout import record_key, records_prefix
from ...buckets.transfer import download_blob
from ...channels.membership import members_with
from ...channels.pins import Pins
from ...errors import IntegrityError, InvalidRecord
from ...identity import node_identity
from ...store.local import store_for
from ...store.task_record import TaskRecord
from ..results import IncompleteRecord, check_complete, load_result
from .base import ABSENT, Fetched, Hit, Miss, Tier

log = logging.getLogger("kachery_tasks")

#: How long a miss in the buckets is believed without asking them again.
MISS_MEMORY_S = 30.0
_MISS_MEMORY_MAX = 1_000_000
#: Hints of the batched check kept for a prefetch (more than a Dask level's worth only if most are
#: never prefetched: ``has_result``, ``stale``); over this, the older ones are dropped.
_SEEN_MAX = 100_000


class BucketTier(Tier):
    name = "bucket"

    def __init__(self, home: str, buckets: list[Bucket], trusted: list[str], parallelism: int = 16,
                 also_trusted: Callable[[], frozenset[str]] | None = None):
        self.store = store_for(home)
        self.buckets = buckets
        self.parallelism = parallelism  # ids fetched at once by prefetch; 0: no prefetch
        self._fixed = list(trusted)  # in trust order: this node first
        self._also = also_trusted  # more trusted signers, asked at each use (channel members with provide_tasks)
        self._trust: tuple[frozenset[str] | None, list[str], frozenset[str]] = (None, self._fixed, frozenset(trusted))
        self._missed: dict[str, float] = {}  # task id -> when the buckets were last found without it
        # task id -> (index of the bucket where missing() found it, the trusted nodes whose records
        # were there): which keys a prefetch need not read (a hint; see _candidates)
        self._seen: dict[str, tuple[int, frozenset[str]]] = {}

    @property
    def trusted(self) -> list[str]:
        """Signers whose records this tier serves, in trust order: this node, ``trusted_nodes``,
        then the members holding ``provide_tasks`` in the channels this node joined (as of now)."""
        return self._trust_now()[1]

    @property
    def _trusted_set(self) -> frozenset[str]:
        return self._trust_now()[2]

    def _trust_now(self) -> tuple[frozenset[str] | None, list[str], frozenset[str]]:
        if self._also is None:
            return self._trust
        extra = self._also()
        if extra != self._trust[0]:
            fixed = set(self._fixed)
            ordered = self._fixed + sorted(extra - fixed)
            self._trust = (extra, ordered, frozenset(ordered))
        return self._trust

    @classmethod
    def for_home(cls, home: str) -> BucketTier | None:
        """The tier of the buckets the configuration names, or None when it names none. The tier
        only reads, so it asks the buckets this process has opened for reading (buckets/fetch.py)."""
        buckets = configured_buckets()
        if not buckets:
            return None
        me = node_identity(Path(home)).node_id
        trusted = [me] + [n for n in config.get("trusted_nodes") if n != me]
        providers = (lambda: members_with(Path(home), "provide_tasks")) if Pins(Path(home)).names() else None
        return cls(home, buckets, trusted, int(config.get("bucket_parallelism")), also_trusted=providers)

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
        if len(self._seen) > _SEEN_MAX:
            self._seen.clear()
        for i, bucket in enumerate(self.buckets):
            if not left:
                break
            keys = {record_key(t, n): (t, n) for t in left for n in self.trusted}
            seen: dict[str, set[str]] = {}
            for key in bucket.exists_many(list(keys)):
                task_id, node = keys[key]
                seen.setdefault(task_id, set()).add(node)
            shared: dict[frozenset[str], tuple[int, frozenset[str]]] = {}  # most ids have the same
            for task_id, nodes in seen.items():
                frozen = frozenset(nodes)
                self._seen[task_id] = shared.get(frozen) or shared.setdefault(frozen, (i, frozen))
            left -= seen.keys()
        return left

    def _remember_missing(self, task_ids: Collection[str]) -> None:
        if len(self._missed) > _MISS_MEMORY_MAX:
            self._missed.clear()
        now = time.monotonic()
        for task_id in task_ids:
            self._missed[task_id] = now

    def put(self, task_id: str, hit: Hit) -> None:
        """Nothing: what is published goes through publish.py, by the node's own choice."""

    def look_again(self, task_id: str) -> Hit | Miss:
        """``get``, past the remembered miss of ``task_id``: for a caller that knows it was just
        published (the channel tier and remote calls, after a member answered)."""
        self._missed.pop(task_id, None)
        return self.get(task_id)

    def prefetch(self, task_ids: Collection[str]) -> Iterator[tuple[str, Fetched | Miss]]:
        if self.parallelism < 1 or not task_ids:
            return iter(())
        return (pair for pair in _unordered(self._fetch, task_ids, self.parallelism) if pair is not None)

    def _fetch(self, task_id: str) -> tuple[str, Fetched | Miss] | None:
        """The first record of ``task_id`` that passes every check of ``get``, in the same order, its
        blob in the local store; a Miss saying why none did; None when fetching failed otherwise."""
        reasons: list[str] = []
        try:
            for bucket, node in self._candidates(task_id):
                record = self._verified(bucket, task_id, node, reasons)
                if record is not None:
                    return task_id, Fetched(record, self.store.blobs)
        except Exception as exc:  # one id's trouble must not fail the others: get meets it again
            log.warning("prefetching task %s from the bucket failed (%s: %s); it is fetched when loaded",
                        task_id[:12], type(exc).__name__, exc)
            return None
        return task_id, Miss("; ".join(reasons)) if reasons else ABSENT

    def _candidates(self, task_id: str) -> Iterator[tuple[Bucket, str]]:
        """The (bucket, node) records of ``task_id`` to try, in the order ``get`` tries them, less
        those the last batched check found absent: the bucket tier trusts this node first, and a
        rerun of what another node published would otherwise read a missing record of this node's
        before each one it uses, twice the requests. Only a hint: a record that appeared since is
        passed over for a later one as trusted, one since removed is simply not found."""
        found = self._seen.pop(task_id, None)
        for i, bucket in enumerate(self.buckets):
            for node in self.trusted:
                if found is None or i > found[0] or (i == found[0] and node in found[1]):
                    yield bucket, node

    # -- one record ------------------------------------------------------------------------------
    def _publishers(self, bucket: Bucket, task_id: str) -> set[str]:
        """The node ids with a record of ``task_id`` in ``bucket`` (one listing)."""
        prefix = records_prefix(task_id)
        names = (info.key[len(prefix):] for info in bucket.list(prefix))
        return {name[:-5] for name in names if name.endswith(".json")}

    def _try(self, bucket: Bucket, task_id: str, node: str, reasons: list[str]) -> Hit | None:
        record = self._verified(bucket, task_id, node, reasons)
        if record is None:
            return None
        try:
            loaded = load_result(record.result, self.store.blobs)
        except IncompleteRecord as exc:
            reasons.append(f"{bucket.uri}/{record_key(task_id, node)}: its result blob is damaged ({exc})")
            return None
        return Hit(loaded.value, loaded.memo, loaded.nbytes, record, self.store.blobs)

    def _verified(self, bucket: Bucket, task_id: str, node: str, reasons: list[str]) -> TaskRecord | None:
        """``node``'s record of ``task_id`` in ``bucket`` if it passes every check (see the module
        docstring), its result blob then complete in the local store; else None, and ``reasons`` says
        why when there was a record. The one place a bucket's record is checked: ``get`` and
        ``prefetch`` both go through it."""
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
            check_complete(record.result, self.store.blobs)
        except NotFound:
            reasons.append(f"{where}: its result blob sha256://{digest} is not in the bucket (incomplete)")
            return None
        except (IntegrityError, IncompleteRecord) as exc:
            reasons.append(f"{where}: its result blob is damaged ({exc})")
            return None
        return record


T = TypeVar("T")
R = TypeVar("R")


def _unordered(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn(item)`` of each item on ``workers`` threads, yielded as each finishes. At most twice
    ``workers`` calls are submitted ahead of the consumer, so what is held waiting for it is bounded
    however many items there are; a consumer that stops early waits only for the calls running."""
    todo = iter(items)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="kt-prefetch")
    try:
        running: set[Future[R]] = {pool.submit(fn, item) for item in islice(todo, 2 * workers)}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                for item in todo:  # one more in for each one out
                    running.add(pool.submit(fn, item))
                    break
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
