"""The stale-code report, reruns and the reproducibility check.

``stale()`` answers the question scientists ask after a code change: which results were computed by
code that is no longer the code, and what would it cost to bring them up to date? A record is stale
when its function's code hash differs from the code hash now (or an upstream record it was computed
from is stale), and the same call under the code of now has no record yet. Records stay as history.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import config
from ..store.local import LocalStore, current_store
from .explain import code_changes
from .replay import NotReplayable, import_task, job_from_record
from .resolver import compute, has_result
from .results import load_result
from .task import Job


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
    """Stale records in the namespace in force, optionally only functions matching ``function``."""
    store = store or current_store()
    namespace = config.get("namespace")
    records = {r["task_id"]: r for r in store.records.iter_records() if r.get("namespace", "") == namespace}
    report = StaleReport()
    verdicts: dict[str, str | None] = {}
    tasks_now: dict[tuple[str | None, ...], Any] = {}

    def verdict(task_id: str) -> str | None:
        if task_id in verdicts:
            return verdicts[task_id]
        verdicts[task_id] = None  # cycles cannot occur in ids, but never recurse twice
        record = records.get(task_id)
        if record is None:
            return None
        function = record["function"]
        origin = function.get("origin") or {}
        key = (function.get("module"), function.get("qualname"), origin.get("path"))  # two scripts' __main__
        if key not in tasks_now:
            try:
                tasks_now[key] = import_task(record)
            except NotReplayable as exc:
                tasks_now[key] = exc
        task = tasks_now[key]
        if isinstance(task, NotReplayable):
            report.unimportable[function["name"]] = task.reason
            return None
        fid = task.function_id
        reason = None
        if fid.code_hash != function.get("code_hash"):
            changes = code_changes(function.get("deps", {}), dict(fid.deps))
            reason = "code: " + (", ".join(changes) if changes else "the function's own body")
        else:
            for up in record.get("upstream", []):
                if verdict(up):
                    reason = f"upstream {records[up]['function']['name']} {up[:12]} is stale"
                    break
        verdicts[task_id] = reason
        return reason

    for task_id, record in records.items():
        name = record["function"]["name"]
        if function and not fnmatch.fnmatchcase(name, function) and function not in name:
            continue
        reason = verdict(task_id)
        if reason is None:
            continue
        try:
            job = job_from_record(store, record)
        except NotReplayable as exc:
            report.records.append(StaleRecord(task_id, name, reason, _wall(record), False, str(exc)))
            continue
        if has_result(job):
            continue  # the call under the code of now already has its record
        report.records.append(StaleRecord(task_id, name, reason, _wall(record), True))
    return report


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
        import dask

        from ..dask.graph import job_delayed  # many calls: let Dask run independent branches in parallel

        dask.compute(*[job_delayed(j) for j in jobs])
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
        name = record["function"]["name"] if record else "?"
        if record is None:
            results.append(RecheckResult(task_id, name, None, "no success record"))
            continue
        try:
            job = job_from_record(store, record)
            upstream = {}
            for up_id in record.get("upstream", []):
                up = store.records.read(up_id)
                if up is None:
                    raise NotReplayable(f"upstream {up_id} has no record")
                upstream[up_id] = load_result(up["result"], store.blobs).value
            # upstream ids under the code of now may differ; map the rebuilt jobs to recorded values
            for rebuilt, recorded_id in zip(job.upstream(), record.get("upstream", []), strict=False):
                upstream[rebuilt.id] = upstream[recorded_id]
            recorded = load_result(record["result"], store.blobs).value
            fresh = compute(job, upstream=upstream)
        except NotReplayable as exc:
            results.append(RecheckResult(task_id, name, None, str(exc)))
            continue
        result = _compare(task_id, name, recorded, fresh, job.task.rtol, job.task.atol)
        if job.task.function_id.code_hash != record["function"].get("code_hash"):
            result.detail += " (the code changed since this record; `kachery task stale` lists it)"
        results.append(result)
    return results


def _compare(task_id: str, name: str, recorded: Any, fresh: Any, rtol: float | None, atol: float | None) -> RecheckResult:
    from ..hashing import hash_value

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


def _wall(record: dict[str, Any]) -> float:
    return float(record.get("provenance", {}).get("wall_s") or 0.0)
