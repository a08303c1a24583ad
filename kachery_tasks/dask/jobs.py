"""A dask graph's jobs: every node whose content can be identified (identify.py) becomes a job of
a :class:`~kachery_tasks.dask.nodes.NodeRunner` task, with its Merkle id as task id.

``cached()`` (cached.py, frames.py) turns a collection's graph into jobs here, and ``f.delayed``
(delayed.py) a dask collection passed as an argument (:func:`collection_job`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import dask
from dask.core import flatten
from dask.delayed import Delayed
from dask.utils import key_split

from .. import config
from ..errors import UnhashableArgument
from ..hashing import hash_value
from ..tasks.settings import CallSettings
from ..tasks.task import Job
from ._compat import Alias, DataNode, GraphNode, convert_legacy_graph
from .identify import check_inputs, graph_ids, stateful_regions, toposort
from .nodes import JobTask, node_task

log = logging.getLogger("kachery_tasks.dask")


class NodeSpec:
    """One node of a dask graph, as the argument of its job: hashed by its Merkle id only."""

    __slots__ = ("id", "node", "dep_keys", "min_seconds", "is_data", "inputs", "always_run")
    __kachery_type__ = "kachery_tasks.dask.Node"

    def __init__(self, id_: str, node: GraphNode, dep_keys: tuple, min_seconds: float, is_data: bool,
                 inputs: tuple[tuple[str, str], ...] = (), always_run: bool = False):
        self.id = id_
        self.node = node
        self.dep_keys = dep_keys
        self.min_seconds = min_seconds
        self.is_data = is_data
        self.inputs = inputs  # files the node reads, with the content hashes its id was made from
        self.always_run = always_run  # shares state outside the graph: run every time, never recorded

    def __kachery_canon__(self) -> str:
        return self.id

    def run(self, deps: tuple) -> Any:
        check_inputs(self.inputs)
        value = self.node(dict(zip(self.dep_keys, deps, strict=True)))
        check_inputs(self.inputs)  # a file rewritten while it was read
        return value

    def __repr__(self) -> str:
        return f"<dask node {self.node.key!r} {self.id}>"


def graph_of(collection: Any) -> tuple[Any, dict[Any, GraphNode], list]:
    """The optimized collection, its graph as TaskSpec nodes, and its output keys."""
    if not isinstance(collection, Delayed) and not hasattr(collection, "__dask_postpersist__"):
        raise TypeError(f"cached() takes a dask collection, not {type(collection).__name__}")
    (opt,) = dask.optimize(collection)
    dsk = convert_legacy_graph(dict(opt.__dask_graph__()))
    if stateful_regions(dsk):
        # Fusion puts what follows a disk shuffle inside the node that reads the shuffle's store,
        # which runs every time: the graph as built keeps them apart, so what follows is cached.
        opt = collection
        dsk = convert_legacy_graph(dict(collection.__dask_graph__()))
    return opt, dsk, list(flatten(opt.__dask_keys__()))


def graph_jobs(dsk: Mapping[Any, GraphNode], min_seconds: float,
               settings: CallSettings | None = None, reasons: dict[Any, str] | None = None) -> dict[Any, Job]:
    """A job for every identifiable key of ``dsk`` (aliases share their target's job); why the
    others have none goes to ``reasons``."""
    settings = settings or CallSettings.current()
    reasons = {} if reasons is None else reasons
    inputs: dict[Any, tuple[tuple[str, str], ...]] = {}
    stateful = stateful_regions(dsk)  # run every time, never recorded (see identify.py)
    ids = graph_ids(dsk, reasons=reasons, inputs=inputs, regions=stateful)
    for key, why in list(reasons.items())[:20]:
        log.debug("cached(): %r is not cached: %s", key, why)
    if len(reasons) > 20:
        log.debug("cached(): %d more nodes are not cached", len(reasons) - 20)
    jobs: dict[Any, Job] = {}
    by_id: dict[str, Job] = {}
    ns = settings.namespace
    data_settings = replace(settings, cache=False)
    for key in toposort(dsk):
        if key not in ids:
            continue
        node = dsk[key]
        if isinstance(node, JobTask):  # already a job (f.delayed inside a plain graph)
            if node.full is not None:
                jobs[key] = node.full
            continue
        if isinstance(node, Alias):
            if node.target in jobs:
                jobs[key] = jobs[node.target]
            continue
        deps = tuple(sorted(node.dependencies, key=str))
        if not all(d in jobs for d in deps):
            continue
        jid = ids[key] if not ns else hash_value(("kt1-dask-ns", ns, ids[key]))
        same = by_id.get(jid)
        if same is not None:  # the same content under another dask key: one job, one graph key
            jobs[key] = same
            continue
        is_data = isinstance(node, DataNode) and key not in stateful
        spec = NodeSpec(jid, node, deps, min_seconds, is_data, inputs.get(key, ()), key in stateful)
        args: dict[str, Any] = {"node": spec}
        for i, dep in enumerate(deps):
            args[f"d{i}"] = jobs[dep]
        name = key_split(key) or "node"
        job = Job(node_task(name, len(deps)), args, data_settings if is_data else settings, id=jid)
        jobs[key] = by_id[jid] = job
    return jobs


def collection_job(collection: Any) -> Job:
    """The job computing a dask collection's value (for collections passed to ``f.delayed``; the
    caller turns its own delayed objects, ``JobDelayed``, back into their jobs itself)."""
    target = collection if isinstance(collection, Delayed) else dask.delayed(collection)
    _, dsk, out_keys = graph_of(target)
    reasons: dict[Any, str] = {}
    jobs = graph_jobs(dsk, float(config.get("dask_min_seconds")), reasons=reasons)
    try:
        return jobs[out_keys[0]]
    except KeyError:
        why = next(iter(reasons.values()), "unknown")
        raise UnhashableArgument(
            f"the dask collection {collection!r} passed to a task cannot be identified by content "
            f"({why}); compute it first or pass it through a kachery task") from None
