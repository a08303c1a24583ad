"""Resolving a job to its result: the tiers, single flight, queries' fallback.

Order for a pure job (first hit wins): memory → local store → compute here. The tier list is the
config key ``tiers``; buckets and channels will add theirs behind ``local``. A pure id is computed at
most once per store: concurrent callers wait on the task's lock (store/flight.py) and find the record.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from .. import config
from ..errors import StaleResultWarning, UserError
from ..store.local import LocalStore, store_for
from .compute import compute
from .memory import MEMORY
from .provenance import Measure
from .recording import rebuild_error, record_failure, record_success
from .results import IncompleteRecord, Loaded, check_complete, from_memo, load_result
from .stats import STATS
from .task import Job

log = logging.getLogger("kachery_tasks")

MISS = object()


def resolve(job: Job, *, allow_stale: bool = True, retry: bool = False,
            upstream: Mapping[str, Any] | None = None, missed: bool = False) -> Any:
    """Resolve ``job``. ``upstream`` maps task ids of upstream jobs to values already computed
    (Dask passes them), so those are not resolved again; ``missed`` says the caller has just looked
    the job up and found nothing (it is looked up again under the lock)."""
    if job.kind == "pure":
        return _resolve_pure(job, upstream, missed)
    if job.kind == "query":
        return _resolve_query(job, allow_stale, upstream)
    from .actions import run_action

    return run_action(job, retry=retry, upstream=upstream)


# -- lookups ---------------------------------------------------------------------------------------
def lookup(job: Job, store: LocalStore | None = None) -> Any:
    """The job's result from the memory tier or the local store (the home's, unless given), or
    ``MISS``."""
    settings = job.settings
    task_id = job.id
    tiers = _tiers()
    if "memory" in tiers:
        memo = MEMORY.get(settings.home, task_id)
        if memo is not None:
            STATS.count("hit_memory")
            return from_memo(memo)
    if "local" not in tiers:
        return MISS
    if store is None:  # looked up only now: a memory hit needs no store
        store = store_for(settings.home)
    loaded = _load_record(store, task_id)
    if loaded is None:
        return MISS
    STATS.count("hit_store")
    MEMORY.put(settings.home, task_id, loaded.memo, loaded.nbytes, config.get("memory_cache_bytes"))
    return loaded.value


KNOWN_TIERS = ("memory", "local")


_checked_tiers: tuple[int, list[str]] | None = None


def _tiers() -> list[str]:
    """The tiers in force, checked once per configuration change (this is on the hit path)."""
    global _checked_tiers
    generation = config.generation()
    if _checked_tiers is not None and _checked_tiers[0] == generation:
        return _checked_tiers[1]
    tiers = config.get("tiers")
    for tier in tiers:
        if tier not in KNOWN_TIERS:
            raise UserError(
                f"unknown resolution tier {tier!r} in config 'tiers'; this version has {', '.join(KNOWN_TIERS)} "
                "(bucket and channel tiers come with the network layer)"
            )
    _checked_tiers = (generation, tiers)
    return tiers


def _load_record(store: LocalStore, task_id: str) -> Loaded | None:
    record = store.records.read(task_id)  # a success record, validated, or None
    if record is None:
        return None
    try:
        return load_result(record.result, store.blobs)
    except IncompleteRecord as exc:
        log.warning("record %s is incomplete (%s); recomputing", task_id, exc)
        store.records.quarantine(task_id, "incomplete")
        return None


def has_result(job: Job) -> bool:
    """True if resolving ``job`` now would be a hit, without loading the result."""
    settings = job.settings
    if MEMORY.get(settings.home, job.id) is not None:
        return True
    store = store_for(settings.home)
    record = store.records.read(job.id)  # a success record, validated, or None
    if record is None:
        return False
    try:
        check_complete(record.result, store.blobs)
    except IncompleteRecord:
        return False
    return True


# -- pure ------------------------------------------------------------------------------------------
def _resolve_pure(job: Job, upstream: Mapping[str, Any] | None = None, missed: bool = False) -> Any:
    settings = job.settings
    task_id = job.id  # an unhashable argument fails here, before anything runs
    if settings.cache and not settings.force and not missed:
        found = lookup(job)
        if found is not MISS:
            return found
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
            found = lookup(job, store)
            if found is not MISS:
                STATS.count("waited")
                return found
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
        loaded = _load_record(store, task_id)
        if loaded is None:
            raise
        if not allow_stale:
            raise
        warnings.warn(
            StaleResultWarning(
                f"{job.task.name} failed ({type(exc).__name__}: {exc}); returning its last recorded result"
            ),
            stacklevel=4,
        )
        STATS.count("stale")
        return loaded.value
    if settings.cache and not settings.read_only:
        record_success(job, store, value, measure)
    return value

