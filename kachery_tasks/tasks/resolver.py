"""Resolving a job to its result: the tiers, single flight, queries' fallback.

Order for a pure job (first hit wins): the tiers in force (config key ``tiers``: memory, then the
local store, by default; tiers/ has one module per tier and the resolver names none of them), then
compute here. A pure id is computed at most once per store: concurrent callers wait on the task's
lock (store/flight.py) and find the record.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import KacheryError, StaleResultWarning
from ..store.local import LocalStore, store_for
from .actions import run_action
from .compute import compute
from .provenance import Measure
from .recording import rebuild_error, record_failure, record_success
from .remote import resolve_remote
from .stats import STATS
from .task import Job
from .tiers import Fetched, Hit, Tier, tiers_for

log = logging.getLogger("kachery_tasks")

MISS = object()


def resolve(job: Job, *, allow_stale: bool = True, retry: bool = False,
            upstream: Mapping[str, Any] | None = None, missed: bool = False) -> Any:
    """Resolve ``job``. ``upstream`` maps task ids of upstream jobs to values already computed
    (Dask passes them), so those are not resolved again; ``missed`` says the caller has just looked
    the job up and found nothing (it is looked up again under the lock). A task with ``service=``
    is resolved by a channel member that serves it (remote.py)."""
    if job.task.task_options.service is not None:
        return resolve_remote(job, find, keep_found, allow_stale=allow_stale, retry=retry)
    if job.kind == "pure":
        return _resolve_pure(job, upstream, missed)
    if job.kind == "query":
        return _resolve_query(job, allow_stale, upstream)
    return run_action(job, retry=retry, upstream=upstream)


# -- lookups ---------------------------------------------------------------------------------------
def find(home: str, task_id: str, misses: list[tuple[str, str]] | None = None, *,
         skip: frozenset[str] = frozenset()) -> Hit | None:
    """The first hit for ``task_id`` among the tiers in force for ``home``, or None.

    The one rule of copying: what a tier found is put into every tier before it, nearest first (a
    bucket hit lands in the local store, then in memory), so the next call finds it sooner.
    ``misses`` collects ``(tier name, reason)`` for each record a tier found and did not use
    (``explain`` shows them). Tiers named in ``skip`` are not asked (a remote call asks its
    provider instead of the channel tier: one request, not two)."""
    tiers = tiers_for(home)
    for i, tier in enumerate(tiers):
        if tier.name in skip:
            continue
        found = tier.get(task_id)
        if type(found) is Hit:
            STATS.count(tier.hit_stat)
            _copy_down(tiers, i, task_id, "put", found)
            return found
        if misses is not None and found.reason is not None:
            misses.append((tier.name, found.reason))
    return None


def keep_found(home: str, tier_name: str, task_id: str, found: Hit) -> None:
    """The copy rule of :func:`find` for a hit tier ``tier_name`` gave some other way (a remote
    call reads the channel's bucket through the channel tier's view): every tier before it keeps it."""
    tiers = tiers_for(home)
    i = next((i for i, tier in enumerate(tiers) if tier.name == tier_name), len(tiers))
    _copy_down(tiers, i, task_id, "put", found)


def _copy_down(tiers: Sequence[Tier], i: int, task_id: str, how: str, found: Hit | Fetched) -> None:
    """Have every tier before tier ``i``, nearest first, keep what it found: ``put`` a hit, ``keep``
    a prefetched record. A tier that cannot (a full disk, a damaged copy) logs one line: the hit
    stands."""
    for earlier in reversed(tiers[:i]):
        try:
            getattr(earlier, how)(task_id, found)
        except (OSError, KacheryError) as exc:
            log.warning("task %s was found in tier %s but not kept in tier %s: %s",
                        task_id[:12], tiers[i].name, earlier.name, exc)


def lookup(job: Job) -> Any:
    """The job's result from the tiers in force for its home, or ``MISS``."""
    hit = find(job.settings.home, job.id)
    return MISS if hit is None else hit.value


def has_result(job: Job) -> bool:
    """True if resolving ``job`` now would be a hit, without loading the result."""
    return job.id in have_results([job])


def have_results(jobs: Iterable[Job]) -> set[str]:
    """The ids of those ``jobs`` that a tier holds a complete result for, without loading any: each
    tier in force is asked once, for the ids the tiers before it lack (one batched existence check
    of a bucket for a whole level of a Dask graph, not one round trip per job)."""
    found: set[str] = set()
    for home, ids in _ids_by_home(jobs).items():
        left = ids
        for tier in tiers_for(home):
            if not left:
                break
            left = left & tier.missing(left)
        found |= ids - left
    return found


def fetch_results(jobs: Iterable[Job]) -> set[str]:
    """:func:`have_results`, with what a tier found brought into the tiers before it ahead of use.

    Each tier is asked once, as there, and a tier that prefetches (the bucket tier) then fetches what
    it holds of the ids in one parallel batch, verified as ``get`` would verify it; every tier before
    it keeps the records (the one rule of copying, for records, without decoding a value: nothing is
    loaded into memory). What prunes a Dask graph: its load nodes then hit the local store, and a
    rerun from a bucket costs one batched check and one parallel fetch per level instead of one
    round trip per result. An id whose record the fetch refused (tampered, its blob gone) is asked
    of the later tiers, and left out if none has it: its node is computed, where a load would fail."""
    found: set[str] = set()
    for home, ids in _ids_by_home(jobs).items():
        tiers = tiers_for(home)
        left = ids
        for i, tier in enumerate(tiers):
            if not left:
                break
            absent = tier.missing(left)
            held = left - absent
            refused = _prefetch(tiers, i, held) if held else set()
            found |= held - refused
            left = (left & absent) | refused
    return found


def _prefetch(tiers: Sequence[Tier], i: int, task_ids: set[str]) -> set[str]:
    """Have tier ``i`` prefetch ``task_ids`` into the tiers before it; the ids it refused."""
    tier, refused = tiers[i], set()
    try:
        for task_id, got in tier.prefetch(task_ids):
            if type(got) is Fetched:
                STATS.count(f"prefetched_{tier.name}")
                _copy_down(tiers, i, task_id, "keep", got)
            else:
                refused.add(task_id)
    except (OSError, KacheryError) as exc:  # the rest are left to get, one at a time, as before
        log.warning("prefetching from tier %s stopped (%s); the rest are fetched as they are loaded", tier.name, exc)
    return refused


def _ids_by_home(jobs: Iterable[Job]) -> dict[str, set[str]]:
    by_home: dict[str, set[str]] = {}
    for job in jobs:
        by_home.setdefault(job.settings.home, set()).add(job.id)
    return by_home


# -- pure ------------------------------------------------------------------------------------------
def _resolve_pure(job: Job, upstream: Mapping[str, Any] | None = None, missed: bool = False) -> Any:
    settings = job.settings
    task_id = job.id  # an unhashable argument fails here, before anything runs
    if settings.cache and not settings.force and not missed:
        hit = find(settings.home, task_id)
        if hit is not None:
            return hit.value
    store = store_for(settings.home)
    if settings.cache and not settings.force and settings.cache_errors:
        _raise_recorded_failure(store, task_id)
    if settings.read_only or not settings.cache:
        return compute(job, upstream=upstream)
    lock = store.records.lock(task_id)
    lock.acquire()  # waits while another thread or process computes this id
    done = False
    try:
        if not settings.force:
            hit = find(settings.home, task_id)
            if hit is not None:
                STATS.count("waited")
                return hit.value
        value, done = _compute_and_record(job, store, upstream)
        return value
    finally:
        lock.release(done=done)


def _raise_recorded_failure(store: LocalStore, task_id: str) -> None:
    failure = store.records.read_failure(task_id)
    if failure is not None:
        raise rebuild_error(failure)


def _compute_and_record(job: Job, store: LocalStore, upstream: Mapping[str, Any] | None) -> tuple[Any, bool]:
    """The value, and whether it was recorded (a full disk returns it unrecorded, with a warning:
    recording.py)."""
    measure = Measure()
    try:
        value = compute(job, measure, upstream)
    except Exception as exc:
        record_failure(job, store, exc, measure)  # never raises: the user's exception goes up
        raise
    return value, record_success(job, store, value, measure) is not None


# -- query -----------------------------------------------------------------------------------------
def _resolve_query(job: Job, allow_stale: bool, upstream: Mapping[str, Any] | None = None) -> Any:
    settings = job.settings
    task_id = job.id
    store = store_for(settings.home)
    measure = Measure()
    try:
        value = compute(job, measure, upstream)
    except Exception as exc:
        if settings.cache and not settings.read_only:
            record_failure(job, store, exc, measure)
        if not settings.cache:
            raise
        hit = find(settings.home, task_id)
        if hit is None or not allow_stale:
            raise
        warnings.warn(
            StaleResultWarning(
                f"{job.task.name} failed ({type(exc).__name__}: {exc}); returning its last recorded result"
            ),
            stacklevel=4,
        )
        STATS.count("stale")
        return hit.value
    if settings.cache and not settings.read_only:
        record_success(job, store, value, measure)
    return value

