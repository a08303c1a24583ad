"""The task ids in a Dask collection's graph, for ``kt.publish(collection)`` (tasks/publish.py,
which cannot import this layer and asks through tasks/dask_layer.py).

Every job of the graph counts, upstream included, not only the nodes a pruned graph would run: a
graph built after its results were recorded is one load node, and publishing it must still send
everything below (publish.py sends each record's upstream records too, so nothing is lost either
way). Only jobs that could be a hit for another node count: pure, cached, and not a ``cached()``
data node (a literal in the graph) or a node that shares state outside it (run every time).
"""

from __future__ import annotations

from typing import Any

from .. import config
from ..tasks.dask_layer import CollectionTasks
from ..tasks.task import Job
from .delayed import JobDelayed
from .jobs import graph_jobs, graph_of
from .nodes import job_key, node_spec


def collection_tasks(collection: Any) -> CollectionTasks:
    """The jobs of ``collection``'s graph that can have a record, by node name, and the nodes that
    cannot be identified, by dask key (see the module docstring)."""
    reasons: dict[Any, str] = {}
    if isinstance(collection, JobDelayed):
        roots = [collection.job]
    else:
        _, dsk, _ = graph_of(collection)
        roots = list(graph_jobs(dsk, float(config.get("dask_min_seconds")), reasons=reasons).values())
    ids: dict[str, str] = {}
    seen: set[str] = set()
    stack = roots
    while stack:  # no recursion: a pipeline may be deeper than Python's stack
        job = stack.pop()
        if job.id in seen:
            continue
        seen.add(job.id)
        if _recordable(job):
            ids[job_key(job)] = job.id
        stack.extend(job.upstream())
    return CollectionTasks(ids, {str(key): why for key, why in reasons.items()})


def _recordable(job: Job) -> bool:
    spec = node_spec(job)
    return (job.kind == "pure" and job.settings.cache
            and (spec is None or not (spec.is_data or spec.always_run)))
