"""The tier protocol: the places a task id's result may already be, asked in order.

A pure call asks the tiers in force (config key ``tiers``) in order; the first :class:`Hit` wins,
and what it found is then put into every tier before it (a store hit is kept in memory; a bucket hit
lands in the local store, then in memory), by one rule in the resolver. A tier is one small class
in a module of its own, after httpx's transports and restic's backends:

- ``get(task_id)`` the result, or a :class:`Miss` that says why a record found was not used;
- ``missing(task_ids)`` of many ids at once, those it holds no complete result for (one round trip
  for a remote tier, as Bazel's ``FindMissingBlobs``);
- ``put(task_id, hit)`` keep what a later tier found (a tier that cannot keep anything does
  nothing);
- ``prefetch(task_ids)`` (optional) bring many results nearer at once without loading them: a remote
  tier fetches them in parallel, verified as ``get`` verifies, and yields a :class:`Fetched` (the
  record, its blobs in the local store) or a :class:`Miss` per id; the resolver then has every tier
  before it ``keep`` each record (the same one rule, for records). What a rerun of a Dask graph
  whose results are all in a bucket costs is then one batched check and one parallel fetch, not one
  round trip per result. The default yields nothing: the tier's ``get`` serves each id as it comes;
- ``keep(task_id, fetched)`` (optional) keep a record a later tier prefetched; the default keeps
  nothing (a tier of values, as memory, fills when the result is loaded);
- ``close()`` let go of what it holds open.

A minimal tier, which knows one result::

    class OneResult(Tier):
        def __init__(self, task_id, value):
            self.task_id, self.value = task_id, value

        def get(self, task_id):
            if task_id != self.task_id:
                return Miss()
            return Hit(self.value, ("pickle", pickle.dumps(self.value)), 0, None, None)

        def missing(self, task_ids):
            return {t for t in task_ids if t != self.task_id}

        def put(self, task_id, hit):
            pass

Tiers are built per home (tiers.py), once per configuration generation: a tier object may keep
what it needs open (a store, a connection) between calls. ``get`` is on the hit path of every
call: a tier does no work there that it could do once in its constructor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator
from typing import Any, NamedTuple

from ...store.blobs import BlobStore


class Hit(NamedTuple):
    """A result found in a tier (a tuple: it is made on every hit, and a tuple is made fastest)."""

    value: Any
    """The decoded result: the caller's own object (no other caller or tier holds it)."""
    memo: tuple[str, Any]
    """What the memory tier keeps to make a fresh value per hit: ``("json"|"pickle", bytes)``,
    decoded afresh, or ``("npy", path)`` of a verified blob, mapped afresh copy-on-write."""
    nbytes: int
    """What keeping ``memo`` costs the memory tier."""
    record: Any
    """The task record the result came from (a ``TaskRecord``), or None from the memory tier."""
    blobs: BlobStore | None
    """Where the record's blobs can be read, for a tier that copies them; None with no record."""


class Miss(NamedTuple):
    """No usable result. ``reason`` says why a record that was there was not used (incomplete,
    invalid, untrusted): None when there was simply nothing."""

    reason: str | None = None


#: The miss of a tier that holds nothing for the id (one object: misses are common).
ABSENT = Miss()


class Fetched(NamedTuple):
    """A result a tier prefetched and did not load: verified, its blobs in the local store already.

    Not a :class:`Hit`: it carries no value, so no tier can mistake it for one (a tier of values
    would otherwise keep None); decoding waits for the call or load node that wants the value."""

    record: Any
    """The verified task record (a ``TaskRecord``)."""
    blobs: BlobStore
    """Where its blobs are now (the local store)."""


class Tier(ABC):
    """One place results may be. See the module docstring for the contract."""

    #: The name the config key ``tiers`` uses for this kind of tier.
    name: str = ""
    #: The counter of its hits in ``STATS`` (``hit_<name>``), made once per class.
    hit_stat: str = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.hit_stat = f"hit_{cls.name}"

    @abstractmethod
    def get(self, task_id: str) -> Hit | Miss:
        """The result of ``task_id`` if this tier holds a complete one."""

    @abstractmethod
    def missing(self, task_ids: Collection[str]) -> set[str]:
        """Those of ``task_ids`` this tier holds no complete result for, without loading any."""

    @abstractmethod
    def put(self, task_id: str, hit: Hit) -> None:
        """Keep what a later tier found for ``task_id``."""

    def prefetch(self, task_ids: Collection[str]) -> Iterator[tuple[str, Fetched | Miss]]:
        """Bring the results of ``task_ids`` (ids ``missing`` said this tier holds) nearer, without
        loading them, as ``(id, Fetched | Miss)`` pairs in any order: a Miss for a record found
        unusable (it is then computed). An id not yielded is left to ``get``, as is every id by
        default: a tier whose ``get`` costs no round trip gains nothing by fetching ahead."""
        return iter(())

    def keep(self, task_id: str, fetched: Fetched) -> None:  # noqa: B027 (optional: most tiers keep no records)
        """Keep the record a later tier prefetched for ``task_id`` (nothing, by default)."""

    def close(self) -> None:  # noqa: B027 (optional: most tiers hold nothing open)
        """Let go of what this tier holds open (nothing, unless a tier says otherwise)."""
