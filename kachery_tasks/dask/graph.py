"""Jobs as Dask graphs, with cached work pruned before the graph runs.

A job whose result is recorded becomes one node that loads it, with no dependencies, so everything
upstream that nothing else needs is never scheduled: an all-cached pipeline costs one lookup (and,
for results in a bucket, one parallel fetch into the local store before the graph runs). Other
jobs become a node that resolves the job on the worker with its upstream values fed in (worker.py).
Identical task ids appear once per graph (keys are content ids), and a cluster that already holds a
key reuses it, so concurrent graphs compute an id once; the store's lock covers other clusters.

Why rebuild instead of using dask's optimizer hooks: the graph optimizer runs on the scheduler under
``distributed`` and has no hook for expression collections (see docs/dask.md); building the graph
ourselves works on every scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..tasks import resolver
from ..tasks.task import Job, substitute_jobs
from ._compat import DataNode, GraphNode, TaskRef
from .nodes import LoadTask, RunTask, job_key, node_spec, prunable
from .worker import load_job, run_job


def _stub(job: Job, stubs: dict[str, Job]) -> Job:
    """A job carrying only its id (and task, settings): what a node needs of an upstream job.

    Shipping full jobs would pickle the whole upstream DAG into every task of the graph."""
    jid = job.id
    stub = stubs.get(jid)
    if stub is None:
        stub = stubs[jid] = Job(job.task, {}, job.settings, id=jid)
    return stub


def shallow(job: Job, stubs: dict[str, Job]) -> Job:
    """``job`` with every upstream job replaced by a stub; same id."""
    return Job(job.task, substitute_jobs(job.args, lambda up: _stub(up, stubs)), job.settings,
               id=job.id, action_key=job.action_key)


def build_graph(roots: Iterable[Job]) -> tuple[dict[str, GraphNode], dict[str, int]]:
    """The pruned graph that computes ``roots``, and counts: loads, runs, data, pruned.

    Top-down, one level of the graph at a time (no recursion limit), memoized by task id: a
    diamond's shared job appears once. The jobs of a level are looked up together
    (``resolver.fetch_results``: one batched check per tier, so a bucket is asked once per level, not
    once per node); a job found is loaded and nothing upstream of it is visited. What a bucket holds
    of a level is fetched then, in parallel, into the local store, so the load nodes read local
    files instead of making one round trip each; a record the fetch refused (tampered, its blob
    gone) is not a load node but a run node, computed as if it were not there.
    """
    dsk: dict[str, GraphNode] = {}
    seen: dict[str, str] = {}
    stubs: dict[str, Job] = {}
    loaded: list[Job] = []
    counts = {"loads": 0, "runs": 0, "data": 0, "pruned": 0}
    level = list(roots)
    while level:
        fresh: list[Job] = []
        for job in level:
            jid = job.id
            if jid in seen:
                continue
            seen[jid] = job_key(job)
            spec = node_spec(job)
            if spec is not None and spec.is_data:
                dsk[seen[jid]] = DataNode(seen[jid], spec.node.value)
                counts["data"] += 1
                continue
            fresh.append(job)
        found = resolver.fetch_results([job for job in fresh if prunable(job)])
        level = []
        for job in fresh:
            key = seen[job.id]
            if job.id in found:
                loaded.append(job)
                dsk[key] = None  # filled below, once the pruned upstream is counted
                counts["loads"] += 1
                continue
            ups: dict[str, Job] = {}
            for up in job.upstream():
                ups.setdefault(up.id, up)
            dsk[key] = RunTask(key, run_job, shallow(job, stubs), tuple(ups),
                               *(TaskRef(job_key(up)) for up in ups.values()), full=job)
            counts["runs"] += 1
            level.extend(ups.values())
    for job in loaded:
        pruned = _count_pruned(job, seen)
        counts["pruned"] += pruned
        key = seen[job.id]
        dsk[key] = LoadTask(key, load_job, shallow(job, stubs), pruned, full=job)
    return dsk, counts


def around_jobs(dsk: Mapping[Any, GraphNode], jobs: Mapping[Any, Job]) -> tuple[dict[Any, GraphNode], dict[str, Job]]:
    """The nodes of ``dsk`` that have no job, reading the ones that do from their jobs' keys, and
    those jobs (by id): the roots of the pruned graph that ``build_graph`` makes for them. What
    ``cached()`` keeps of a graph it could identify only in part."""
    subs = {k: job_key(j) for k, j in jobs.items()}
    rest: dict[Any, GraphNode] = {}
    roots: dict[str, Job] = {}
    for key, node in dsk.items():
        if key in jobs:
            continue
        for dep in node.dependencies:
            if dep in jobs:
                roots[jobs[dep].id] = jobs[dep]
        rest[key] = node.substitute(subs)
    return rest, roots


def _count_pruned(job: Job, seen: dict[str, str]) -> int:
    """Jobs upstream of a loaded job that the graph leaves out (each counted once per build)."""
    n = 0
    stack = job.upstream()
    while stack:
        up = stack.pop()
        uid = up.id
        if uid in seen:
            continue
        seen[uid] = ""
        n += 1
        stack.extend(up.upstream())
    return n
