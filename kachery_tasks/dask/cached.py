"""``cached(collection)``: any Dask collection, keyed by content and cached in the store.

Every node of the (optimized) graph whose content can be identified (identify.py) becomes a job of
a small generic runner task, with its Merkle id as task id (jobs.py); the jobs then go through the
same pruning graph builder as ``f.delayed`` (graph.py), so recorded nodes are loaded and their upstream
dropped, and results are written by the task engine's own record machinery (same record format,
codecs, single flight). Nodes that cannot be identified, and everything downstream of them, stay as
they were, and a debug log line says why. The collection keeps its type, chunks and metadata: its
output keys remain, as aliases of the content-keyed nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask.core import flatten
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.utils import key_split

from .. import config
from ..hashing import hash_value
from ..tasks.task import Job
from ._compat import Alias, GraphNode, convert_legacy_graph
from .delayed import JobDelayed
from .frames import cached_frame
from .graph import around_jobs, build_graph
from .identify import stateful_regions
from .jobs import graph_jobs, graph_of
from .nodes import job_key


def cached(*collections: Any, min_seconds: float | None = None) -> Any:
    """An equivalent collection whose tasks are keyed by content and cached in the store; given
    several collections, a tuple of them.

    Nodes taking at least ``min_seconds`` (default: config ``dask_min_seconds``) to compute are
    recorded; on a later call, recorded nodes are loaded and the work upstream of them is pruned.
    Pruning is decided here, when ``cached`` is called (for a delayed object: at each compute).

    Collections to be computed together are best cached together, ``cached(a, b)``: like
    ``dask.compute(a, b)``, that optimizes them as one graph, so work they share stays one node
    (cached one by one, dask's fusion may copy a shared task into each collection's graph, and the
    copies run once each)."""
    if not collections:
        raise TypeError("cached() takes one or more dask collections")
    min_s = float(config.get("dask_min_seconds") if min_seconds is None else min_seconds)
    if len(collections) == 1:
        return _cached_one(collections[0], min_s)
    together = [c for c in collections if not isinstance(c, JobDelayed) and not hasattr(type(c), "expr")]
    if len(together) < 2:
        return tuple(_cached_one(c, min_s) for c in collections)
    dsk, keys = _joint_graph(together)
    jobs = graph_jobs(dsk, min_s)
    rest, roots = around_jobs(dsk, jobs)
    done = {id(c): _rebuilt(c, c, dsk, out, jobs, rest, roots) for c, out in zip(together, keys, strict=True)}
    return tuple(done[id(c)] if id(c) in done else _cached_one(c, min_s) for c in collections)


def _cached_one(collection: Any, min_s: float) -> Any:
    if isinstance(collection, JobDelayed):
        return collection  # already keyed by task id and cached
    if hasattr(type(collection), "expr"):  # on the type: Delayed answers any attribute
        return cached_frame(collection, min_s)  # DataFrame, Series: through their partitions
    opt, dsk, out_keys = graph_of(collection)
    jobs = graph_jobs(dsk, min_s)
    new, roots = around_jobs(dsk, jobs)
    return _rebuilt(collection, opt, dsk, out_keys, jobs, new, roots)


def _rebuilt(collection: Any, opt: Any, dsk: Mapping[Any, GraphNode], out_keys: list,
             jobs: Mapping[Any, Job], rest: Mapping[Any, GraphNode], rest_roots: Mapping[str, Job]) -> Any:
    """``collection`` on the graph of its jobs (pruned) and of the nodes with no job (``rest``,
    reading the jobs they need, ``rest_roots``), with output keys named by content."""
    if isinstance(collection, Delayed) and out_keys[0] in jobs:
        return JobDelayed(jobs[out_keys[0]])
    new = dict(rest)
    roots = dict(rest_roots)
    rename = _content_names(out_keys, jobs)
    for key in out_keys:
        renamed = _renamed(key, rename)
        if key in jobs:
            roots[jobs[key].id] = jobs[key]
            new[renamed] = Alias(renamed, job_key(jobs[key]))
    built, _ = build_graph(roots.values())
    new.update(built)
    rebuild, args = opt.__dask_postpersist__()
    layers = [rename.get(name, name) for name in opt.__dask_layers__()]
    return rebuild(_hlg(new, layers), *args, rename=rename)


def _joint_graph(collections: list) -> tuple[dict[Any, GraphNode], list[list]]:
    """The graph of several collections optimized together, as ``dask.compute`` optimizes what it
    computes at once, and each collection's output keys."""
    # undocumented in dask: imported where used, so a dask release without it fails here alone
    from dask.base import collections_to_expr

    for c in collections:
        if not isinstance(c, Delayed) and not hasattr(c, "__dask_postpersist__"):
            raise TypeError(f"cached() takes dask collections, not {type(c).__name__}")
    expr = collections_to_expr(collections, True).optimize()
    dsk = convert_legacy_graph(dict(expr.__dask_graph__()))
    keys = [list(flatten(c.__dask_keys__())) for c in collections]
    if stateful_regions(dsk) or not all(k in dsk for out in keys for k in out):
        # unfused, as graph_of does for a disk shuffle; and outputs that optimization renamed
        merged: dict[Any, Any] = {}
        for c in collections:
            merged.update(dict(c.__dask_graph__()))
        dsk = convert_legacy_graph(merged)
    return dsk, keys


def _name_of(key: Any) -> str:
    return key[0] if isinstance(key, tuple) else key


def _content_names(out_keys: list, jobs: Mapping[Any, Job]) -> dict[str, str]:
    """A new name for each name of the collection's output keys: ``<prefix>-<hash of the ids of
    every output under it>``, so that the returned collection's keys are a function of content in
    both directions (dask names can stay the same while data change, and change while data stay
    the same: ``name=``, random ``delayed`` keys). Outputs not all identified keep dask's name, as
    every node that cannot be identified keeps its dask key: they are computed as dask would."""
    by_name: dict[str, list] = {}
    for key in out_keys:
        by_name.setdefault(_name_of(key), []).append(key)
    rename = {}
    for name, keys in by_name.items():
        if all(k in jobs for k in keys):
            token = hash_value(("kt1-dask-names", [(k[1:] if isinstance(k, tuple) else (), jobs[k].id)
                                                   for k in keys]))
            rename[name] = f"{key_split(name) or 'cached'}-{token}"
    return rename


def _renamed(key: Any, rename: Mapping[str, str]) -> Any:
    name = _name_of(key)
    if name not in rename:
        return key
    return (rename[name], *key[1:]) if isinstance(key, tuple) else rename[name]


def _hlg(dsk: dict, names: Any) -> HighLevelGraph:
    """A graph under the collection's own layer names, so that collections built on top of the
    result (``cached(x).sum()``) find the layers they depend on."""
    names = list(names)
    layers = {names[0]: MaterializedLayer(dsk)}
    deps: dict[str, set] = {names[0]: set()}
    for extra in names[1:]:
        layers[extra] = MaterializedLayer({})
        deps[extra] = {names[0]}
    return HighLevelGraph(layers, deps)
