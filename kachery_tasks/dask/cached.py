"""``cached(collection)``: any Dask collection, keyed by content and cached in the store.

Every node of the (optimized) graph whose content can be identified (identify.py) becomes a job of
a small generic runner task, with its Merkle id as task id; the jobs then go through the same
pruning graph builder as ``f.delayed`` (graph.py), so recorded nodes are loaded and their upstream
dropped, and results are written by the task engine's own record machinery (same record format,
codecs, single flight). Nodes that cannot be identified, and everything downstream of them, stay as
they were, and a debug log line says why. The collection keeps its type, chunks and metadata: its
output keys remain, as aliases of the content-keyed nodes.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar

import dask
from dask.core import flatten
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.utils import key_split

from .. import config
from ..errors import UnhashableArgument
from ..hashing import FunctionId, hash_value
from ..store.local import store_for
from ..tasks.settings import CallSettings
from ..tasks.task import Job, Task
from ._compat import Alias, DataNode, GraphNode, convert_legacy_graph
from .frames import cached_frame
from .graph import JobDelayed, JobTask, around_jobs, build_graph, job_key
from .identify import check_inputs, graph_ids, stateful_regions, toposort

log = logging.getLogger("kachery_tasks.dask")

C = TypeVar("C")

try:
    _VERSION = importlib.metadata.version("kachery-tasks")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
    _VERSION = "unknown"


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


class NodeRunner:
    """The function of every cached() job: runs its node on the values of its dependencies.

    One instance per (dask name, number of dependencies), with a signature ``(node, d0, d1, ...)``
    so that each upstream job is an argument of its own, as the task records expect."""

    #: A node's value may be something dask hands between its own tasks (a generator, a lock):
    #: recorded when it has an encoding, else computed every time (recording.record_success).
    __kachery_optional_record__ = True

    def __init__(self, name: str, arity: int):
        self.__name__ = name
        self.__qualname__ = f"dask.{name}"
        self.arity = arity
        params = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for p in ("node", *(f"d{i}" for i in range(arity)))]
        self.__signature__ = inspect.Signature(params)

    def __call__(self, node: NodeSpec, *deps: Any) -> Any:
        return node.run(deps)

    def __kachery_function_id__(self) -> FunctionId:
        return FunctionId(f"kachery_tasks.dask:{self.__name__}", f"kachery-tasks=={_VERSION}", {})

    def __reduce__(self):
        return (node_task_func, (self.__name__, self.arity))


_RUNNERS: dict[tuple[str, int], Task] = {}


def node_task_func(name: str, arity: int) -> NodeRunner:
    return node_task(name, arity).func


def node_task(name: str, arity: int) -> Task:
    task = _RUNNERS.get((name, arity))
    if task is None:
        task = _RUNNERS[(name, arity)] = Task(NodeRunner(name, arity), "pure")
    return task


def run_node(job: Job, upstream: Mapping[str, Any], min_seconds: float) -> Any:
    """Compute a node; record it only if it took at least ``min_seconds`` (cheap nodes are not
    worth a record and a blob)."""
    from ..tasks.compute import compute
    from ..tasks.provenance import Measure
    from ..tasks.recording import record_success

    measure = Measure()
    value = compute(job, measure, upstream)
    s = job.settings
    if s.cache and not s.read_only and measure.wall_s >= min_seconds:
        record_success(job, store_for(s.home), value, measure)
    return value


# -- graph → jobs ----------------------------------------------------------------------------------
def _graph_of(collection: Any) -> tuple[Any, dict[Any, GraphNode], list]:
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
    opt, dsk, out_keys = _graph_of(collection)
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
    from dask.base import collections_to_expr

    for c in collections:
        if not isinstance(c, Delayed) and not hasattr(c, "__dask_postpersist__"):
            raise TypeError(f"cached() takes dask collections, not {type(c).__name__}")
    expr = collections_to_expr(collections, True).optimize()
    dsk = convert_legacy_graph(dict(expr.__dask_graph__()))
    keys = [list(flatten(c.__dask_keys__())) for c in collections]
    if stateful_regions(dsk) or not all(k in dsk for out in keys for k in out):
        # unfused, as _graph_of does for a disk shuffle; and outputs that optimization renamed
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


def collection_job(collection: Any) -> Job:
    """The job computing a dask collection's value (for collections passed to ``f.delayed``)."""
    target = collection if isinstance(collection, Delayed) else dask.delayed(collection)
    if isinstance(target, JobDelayed):
        return target.job
    _, dsk, out_keys = _graph_of(target)
    reasons: dict[Any, str] = {}
    jobs = graph_jobs(dsk, float(config.get("dask_min_seconds")), reasons=reasons)
    try:
        return jobs[out_keys[0]]
    except KeyError:
        why = next(iter(reasons.values()), "unknown")
        raise UnhashableArgument(
            f"the dask collection {collection!r} passed to a task cannot be identified by content "
            f"({why}); compute it first or pass it through a kachery task") from None
