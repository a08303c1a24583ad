"""The stale-code report, reruns and the reproducibility check.

``stale()`` answers the question scientists ask after a code change: which results were computed by
code that is no longer the code, and what would it cost to bring them up to date? A record is stale
when its function's code hash differs from the code hash now (or an upstream record it was computed
from is stale), and the same call under the code of now has no record yet. Records stay as history.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import config
from ..hashing import FunctionId, hash_value
from ..store.local import LocalStore, current_store, store_for
from ..store.task_record import TaskRecord
from .compute import compute
from .dask_layer import dask_layer
from .explain import code_changes
from .names import function_matches
from .replay import NotReplayable, import_task_memo, job_from_record, task_key
from .resolver import has_result
from .results import load_result
from .settings import CallSettings
from .task import Job, Task


@dataclass
class StaleRecord:
    task_id: str
    function: str
    reason: str
    wall_s: float
    replayable: bool
    why_not: str | None = None


@dataclass
class StaleReport:
    records: list[StaleRecord] = field(default_factory=list)
    unimportable: dict[str, str] = field(default_factory=dict)  # function -> why

    def by_function(self) -> dict[str, list[StaleRecord]]:
        groups: dict[str, list[StaleRecord]] = {}
        for r in self.records:
            groups.setdefault(r.function, []).append(r)
        return groups

    def as_dict(self) -> dict[str, Any]:
        return {
            "functions": {
                name: {
                    "count": len(items),
                    "compute_s": round(sum(i.wall_s for i in items), 3),
                    "reasons": sorted({i.reason for i in items}),
                    "records": [i.task_id for i in items],
                    "not_replayable": {i.task_id: i.why_not for i in items if not i.replayable},
                }
                for name, items in self.by_function().items()
            },
            "unimportable": self.unimportable,
        }


def stale(function: str | None = None, store: LocalStore | None = None) -> StaleReport:
    """Stale records in the namespace in force, optionally only functions matching ``function``
    (a glob, matched as ``kachery task ls --function`` matches: :func:`.names.function_matches`).

    Python's cyclic collector is paused while the report is made (``_collector_paused``).

    Every record is read, so what is the same for all records of one function is worked out once
    per call: its import, its function id now (the code and globals do not change while the report
    runs), and the reason for each recorded code hash. The call under the code of now is looked up
    on disk only if the scan saw a record with its id: the scan is the report's snapshot of the store.
    """
    with _collector_paused():
        return _stale(function, store)


def _stale(function: str | None, store: LocalStore | None) -> StaleReport:
    store = store or current_store()
    namespace = config.get("namespace")
    records = {r.task_id: r for r in store.records.iter_records() if r.namespace == namespace}
    scan = _Scan(records)
    code_hashes = {r.function.code_hash for r in records.values()}
    scanned_here = store_for(scan.settings.home) is store  # has_result looks in the home in force
    report = scan.report
    seen: dict[str, Job] = {}
    for task_id, record in records.items():
        name = record.function.name
        if function and not function_matches(name, function):
            continue
        reason = scan.verdict(task_id)
        if reason is None:
            continue
        try:
            job = job_from_record(store, record, scan.settings, seen, scan.tasks)
        except NotReplayable as exc:
            # the report names the record's function already; another one (its upstream) is named
            why_not = exc.reason if exc.function in (None, name) else str(exc)
            report.records.append(StaleRecord(task_id, name, reason, _wall(record), False, why_not))
            continue
        fid = scan.ids_now[task_key(record)]
        if _has_result_now(job, fid, records, code_hashes, scanned_here):
            continue  # the call under the code of now already has its record
        report.records.append(StaleRecord(task_id, name, reason, _wall(record), True))
    return report


class _Scan:
    """The verdicts of one report over a store's records, with what they share per function.

    A class rather than closures: a closure that calls itself (``verdict`` recurses upstream)
    is a reference cycle, which would keep every record alive until the cyclic collector ran.
    """

    def __init__(self, records: dict[str, TaskRecord]) -> None:
        self.records = records
        self.settings = CallSettings.current()
        self.report = StaleReport()
        self.verdicts: dict[str, str | None] = {}
        self.tasks: dict[tuple, Task | NotReplayable] = {}  # import_task_memo's
        self.ids_now: dict[tuple, FunctionId] = {}
        self.reasons: dict[tuple, str] = {}

    def function_now(self, key: tuple, record: TaskRecord) -> FunctionId | None:
        """The function id now of a record's function, or None (said in ``unimportable``)."""
        found = self.ids_now.get(key)
        if found is None:
            try:
                task = import_task_memo(record, self.tasks)
            except NotReplayable as exc:
                self.report.unimportable[record.function.name] = exc.reason
                return None
            found = self.ids_now[key] = task.function_id
        return found

    def verdict(self, task_id: str) -> str | None:
        """Why the record of ``task_id`` is stale, or None."""
        verdicts = self.verdicts
        if task_id in verdicts:
            return verdicts[task_id]
        verdicts[task_id] = None  # cycles cannot occur in ids, but never recurse twice
        record = self.records.get(task_id)
        if record is None:
            return None
        key = task_key(record)
        fid = self.function_now(key, record)
        if fid is None:
            return None
        function = record.function
        recorded = function.code_hash
        reason = None
        if fid.code_hash != recorded:
            deps = function.deps
            memo = (key, recorded, tuple(deps.items()))
            reason = self.reasons.get(memo)
            if reason is None:
                changes = code_changes(deps, dict(fid.deps))
                reason = "code: " + (", ".join(changes) if changes else "the function's own body")
                self.reasons[memo] = reason
        else:
            for up in record.upstream:
                if self.verdict(up):
                    reason = f"upstream {self.records[up].function.name} {up[:12]} is stale"
                    break
        verdicts[task_id] = reason
        return reason


def _has_result_now(job: Job, fid: FunctionId, records: dict[str, TaskRecord], code_hashes: set,
                    scanned_here: bool) -> bool:
    """Whether the call under the code of now has its record, looked up only where one can be.

    ``records`` is the report's scan of the store, ``code_hashes`` the code hashes its records
    carry. A record of the call under the code of now carries that code's hash (``fid``'s): where
    no scanned record does, there is none, and the new id need not even be computed; where one
    does, only an id the scan saw is looked up on disk (and checked complete). A record written
    after the scan is not seen, as it would not be had it come a moment later. A store other than
    the home in force (``scanned_here`` False) is not what ``has_result`` looks in: asked as before.
    """
    if not scanned_here:
        return has_result(job)
    if fid.code_hash not in code_hashes:
        return False
    return job.id_under(fid) in records and has_result(job)


def rerun(task_ids: list[str], store: LocalStore | None = None, *, use_dask: bool | None = None) -> list[str]:
    """Rerun recorded calls with the code of now, upstream first; returns the new task ids."""
    store = store or current_store()
    jobs: list[Job] = []
    seen: dict[str, Job] = {}
    for task_id in task_ids:
        record = store.records.read(task_id) or store.records.read_failure(task_id)
        if record is None:
            raise NotReplayable(f"task {task_id} has no record in this store")
        jobs.append(job_from_record(store, record, _seen=seen))
    if use_dask is None:
        use_dask = len(jobs) > 8
    if use_dask:
        dask_layer().run_many(jobs)  # many calls: let Dask run independent branches in parallel
    else:
        for job in jobs:
            job.result()
    return [j.id for j in jobs]


@dataclass
class RecheckResult:
    task_id: str
    function: str
    reproducible: bool | None
    detail: str


def recheck(task_ids: list[str], store: LocalStore | None = None) -> list[RecheckResult]:
    """Recompute recorded calls without touching any record and compare with the recorded results."""
    store = store or current_store()
    results = []
    for task_id in task_ids:
        record = store.records.read(task_id)
        name = record.function.name if record else "?"
        if record is None:
            results.append(RecheckResult(task_id, name, None, "no success record"))
            continue
        try:
            job = job_from_record(store, record)
            upstream = {}
            for up_id in record.upstream:
                up = store.records.read(up_id)
                if up is None:
                    raise NotReplayable(f"upstream {up_id} has no record")
                upstream[up_id] = load_result(up.result, store.blobs).value
            # upstream ids under the code of now may differ; map the rebuilt jobs to recorded values
            for rebuilt, recorded_id in zip(job.upstream(), record.upstream, strict=False):
                upstream[rebuilt.id] = upstream[recorded_id]
            recorded = load_result(record.result, store.blobs).value
            fresh = compute(job, upstream=upstream)
        except NotReplayable as exc:
            results.append(RecheckResult(task_id, name, None, str(exc)))
            continue
        result = _compare(task_id, name, recorded, fresh, job.task.rtol, job.task.atol)
        if job.task.function_id.code_hash != record.function.code_hash:
            result.detail += " (the code changed since this record; `kachery task stale` lists it)"
        results.append(result)
    return results


def _compare(task_id: str, name: str, recorded: Any, fresh: Any, rtol: float | None, atol: float | None) -> RecheckResult:
    try:
        same = hash_value(recorded) == hash_value(fresh)
    except Exception:
        same = False
    if same:
        return RecheckResult(task_id, name, True, "identical")
    try:
        a = np.asarray(recorded, dtype=float)
        b = np.asarray(fresh, dtype=float)
    except (TypeError, ValueError):
        return RecheckResult(task_id, name, False, "results differ (not numeric)")
    if a.shape != b.shape:
        return RecheckResult(task_id, name, False, f"shapes differ: {a.shape} vs {b.shape}")
    diff = float(np.nanmax(np.abs(a - b))) if a.size else 0.0
    declared = rtol is not None or atol is not None
    if declared and np.allclose(a, b, rtol=rtol or 0.0, atol=atol or 0.0, equal_nan=True):
        return RecheckResult(task_id, name, True, f"within tolerance (max difference {diff:.3g})")
    return RecheckResult(task_id, name, False, f"max difference {diff:.3g}")


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration, if it was on.

    Why: a report holds every record of the store at once (100k records are ~1.5M dicts and lists)
    and the collector, triggered by allocations, scans that growing heap again and again while it
    is read: half of the time of reading them. Nothing the report allocates is cyclic garbage
    (parsed JSON trees, jobs, report rows), so the pause frees nothing later than it would be.
    Safe because it is scoped and bounded: reference counting still frees everything that is not
    in a cycle at once, any cycle made meanwhile (say, by importing a user's module) is collected
    at the next collection after the pause, and a collector the caller had turned off stays off.
    Other threads share the switch: for the length of the report they, too, only defer cycles.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _wall(record: TaskRecord) -> float:
    return record.provenance.wall_s
