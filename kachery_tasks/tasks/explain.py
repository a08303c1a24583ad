"""``explain(job)``: why a call hits or misses.

On a miss it finds the closest earlier record of the same function (in any namespace) and names
what differs: the namespace, the code (and which helper, constant or package within it), which
argument, or which upstream job (and, recursively, why that job differs).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..hashing import hash_value
from ..store.local import store_for
from ..store.task_record import TaskRecord
from .resolver import fetch_results, find
from .task import Job


@dataclass
class Explanation:
    task_id: str
    function: str
    hit: bool
    reason: str
    differences: list[str] = field(default_factory=list)
    closest: str | None = None
    upstream: dict[str, Explanation] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)  # records a tier found and did not use, and why

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "function": self.function,
            "hit": self.hit,
            "reason": self.reason,
            "differences": self.differences,
            "closest": self.closest,
            "upstream": {k: v.as_dict() for k, v in self.upstream.items()},
            "rejected": self.rejected,
        }

    def __str__(self) -> str:
        return "\n".join(self._lines(0))

    def _lines(self, depth: int) -> list[str]:
        pad = "  " * depth
        lines = [f"{pad}{self.function} {self.task_id}: {'hit' if self.hit else 'miss'}: {self.reason}"]
        lines += [f"{pad}  - not used: {r}" for r in self.rejected]
        lines += [f"{pad}  - {d}" for d in self.differences]
        for explanation in self.upstream.values():
            lines += explanation._lines(depth + 1)
        return lines


def explain(job: Job) -> Explanation:
    explanation = _explain(job)
    if not explanation.hit:
        misses: list[tuple[str, str]] = []
        if find(job.settings.home, job.id, misses) is None:  # what a tier found and refused, and why
            explanation.rejected = [f"{tier}: {why}" for tier, why in misses]
    return explanation


def _explain(job: Job) -> Explanation:
    task_id = job.id
    name = job.task.function_id.name
    store = store_for(job.settings.home)
    # not has_result: a record in a bucket is only there, and explain says whether a call would use
    # it. Fetching it verifies it as the call would (a tampered one is then a miss that says why),
    # and a sound one is kept in this store, where the call will find it
    if task_id in fetch_results([job]):
        record = store.records.read(task_id)
        when = record.created if record else None
        return Explanation(task_id, name, True, f"a record exists (written {_ago(when)})" if when else "in memory")
    failure = store.records.read_failure(task_id)
    if failure is not None:
        err = failure.error
        return Explanation(task_id, name, False, f"the last run failed ({err.type}: {err.message}); it runs again")
    if store.records.read(task_id) is not None:
        return Explanation(task_id, name, False, "its record is incomplete (a result blob is missing); it recomputes")
    candidates = [r for r in map(store.records.read, store.records.function_task_ids(name)) if r is not None]
    if not candidates:
        return Explanation(task_id, name, False, "no earlier record of this function in this store")
    current = _components(job)
    scored = sorted(candidates, key=lambda r: (len(_differences(current, r)), -r.created))
    closest = scored[0]
    explanation = Explanation(task_id, name, False, f"closest record {closest.task_id} differs",
                              closest=closest.task_id)
    for kind, detail in _differences(current, closest):
        explanation.differences.append(detail)
        if kind == "upstream":
            arg = detail.split("'")[1]
            upstream = job.args.get(arg)
            if isinstance(upstream, Job):
                explanation.upstream[arg] = explain(upstream)
    return explanation


def _components(job: Job) -> dict[str, Any]:
    fid = job.task.function_id
    args = {}
    for arg, value in job.args.items():
        args[arg] = {"hash": hash_value(value), "job": value.id if isinstance(value, Job) else None}
    return {"namespace": job.settings.namespace, "code_hash": fid.code_hash, "deps": dict(fid.deps),
            "args": args, "kind": job.kind}


def _differences(current: dict[str, Any], record: TaskRecord) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if record.namespace != current["namespace"]:
        found.append(("namespace", f"namespace: recorded {record.namespace!r}, now {current['namespace']!r}"))
    if record.kind != current["kind"]:
        found.append(("kind", f"kind: recorded {record.kind}, now {current['kind']}"))
    function = record.function
    if function.code_hash != current["code_hash"]:
        changed = code_changes(function.deps, current["deps"])
        found.append(("code", "code changed: " + (", ".join(changed) if changed else "the function's own body")))
    recorded_args = record.args
    for arg, now in current["args"].items():
        before = recorded_args.get(arg)
        if before is None:
            found.append(("argument", f"argument {arg!r}: not in the record (new parameter)"))
        elif before.hash != now["hash"]:
            if now["job"] and before.job:
                found.append(("upstream", f"upstream job for argument '{arg}': recorded {before.job}, now {now['job']}"))
            else:
                shown = f" (recorded {before.value!r})" if before.form == "json" else ""
                found.append(("argument", f"argument {arg!r} differs{shown}"))
    for arg in recorded_args.keys() - current["args"].keys():
        found.append(("argument", f"argument {arg!r}: recorded but no longer a parameter"))
    return found


def code_changes(before: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """Which helpers, constants or packages differ between two ``deps`` maps."""
    changes = []
    for name in sorted(before.keys() | now.keys()):
        if name not in now:
            changes.append(f"{name} no longer used")
        elif name not in before:
            changes.append(f"{name} newly used")
        elif before[name] != now[name]:
            if "==" in str(now[name]):
                changes.append(f"{before[name]} -> {now[name]}")
            else:
                changes.append(f"{name} changed")
    return changes


def _ago(when: float | None) -> str:
    if when is None:
        return "at an unknown time"
    seconds = time.time() - when
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when))
