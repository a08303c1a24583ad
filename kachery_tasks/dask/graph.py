"""Jobs as Dask graphs, with cached work pruned before the graph runs.

``f.delayed(...)`` returns a :class:`JobDelayed`: a ``Delayed`` keyed ``<name>-<task id>`` whose graph
is built only when Dask asks for it (at compute/persist time, on the client), top-down from its
job. A job whose result is recorded becomes one node that loads it, with no dependencies, so
everything upstream that nothing else needs is never scheduled: an all-cached pipeline costs one
lookup. Other jobs become a node that resolves the job on the worker with its upstream values fed
in. Identical task ids appear once per graph (keys are content ids), and a cluster that already holds
a key reuses it, so concurrent graphs compute an id once; the store's lock covers other clusters.

Why rebuild instead of using dask's optimizer hooks: the graph optimizer runs on the scheduler under
``distributed`` and has no hook for expression collections (see docs/dask.md); building the graph
ourselves works on every scheduler.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from dask.base import is_dask_collection
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from .. import config
from ..errors import KacheryError
from ..store.local import store_for
from ..tasks.settings import CallSettings
from ..tasks.task import Job, substitute_jobs
from ._compat import DataNode, GraphNode, Task, TaskRef

#: Topic of the events that load and run nodes log on ``distributed`` workers (see plugin.py).
TOPIC = "kachery"


# -- graph nodes -----------------------------------------------------------------------------------
class JobTask(Task):
    """A node that stands for one job. A cache boundary: never fused into its neighbours.

    ``full`` keeps the complete job in this process only (it is not pickled), so that cached()
    can see through a kachery node inside a plain dask graph back to its job."""

    __slots__ = ("full",)

    def __init__(self, key: Any, func: Any, /, *args: Any, full: Job | None = None, **kwargs: Any):
        super().__init__(key, func, *args, **kwargs)
        self.full = full

    @property
    def block_fusion(self) -> bool:
        return True

    def __reduce__(self):
        return (_rebuild_job_task, (type(self), self.key, self.func, self.args))


def _rebuild_job_task(cls: type, key: Any, func: Any, args: tuple) -> JobTask:
    return cls(key, func, *args)


class LoadTask(JobTask):
    """Loads a recorded result; no dependencies."""

    __slots__ = ()


class RunTask(JobTask):
    """Resolves a job with its upstream values."""

    __slots__ = ()


def job_key(job: Job) -> str:
    """``<name>-<task id>``: ``dask.utils.key_split`` shows ``name`` on the dashboard."""
    name = getattr(job.task.func, "__name__", None) or "task"
    return f"{name}-{job.id}"


def _node_spec(job: Job) -> Any:
    """The cached() node a job stands for, or None for a job of a user task."""
    from .cached import NodeRunner

    return job.args.get("node") if isinstance(job.task.func, NodeRunner) else None


def _prunable(job: Job) -> bool:
    s = job.settings
    if not (job.kind == "pure" and s.cache and not s.force):
        return False
    spec = _node_spec(job)
    return spec is None or not spec.always_run


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


def build_graph(roots: Iterable[Job], *, has_result: Any = None) -> tuple[dict[str, GraphNode], dict[str, int]]:
    """The pruned graph that computes ``roots``, and counts: loads, runs, data, pruned.

    Top-down and iterative (no recursion limit), memoized by task id: a diamond's shared job
    appears once. ``has_result`` (for tests and benchmarks) replaces the store check.
    """
    if has_result is None:
        from ..tasks.resolver import has_result
    dsk: dict[str, GraphNode] = {}
    seen: dict[str, str] = {}
    stubs: dict[str, Job] = {}
    loaded: list[Job] = []
    counts = {"loads": 0, "runs": 0, "data": 0, "pruned": 0}
    stack = list(roots)
    while stack:
        job = stack.pop()
        jid = job.id
        if jid in seen:
            continue
        key = seen[jid] = job_key(job)
        spec = _node_spec(job)
        if spec is not None and spec.is_data:
            dsk[key] = DataNode(key, spec.node.value)
            counts["data"] += 1
            continue
        if _prunable(job) and has_result(job):
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
        stack.extend(ups.values())
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


# -- what runs on the workers ----------------------------------------------------------------------
@contextmanager
def entered(job: Job) -> Iterator[None]:
    """Run under the job's settings (its home above all), as in the process that made it.

    In this thread only (``config.scoped``): a scheduler's threads run jobs of different settings
    at once, and ``config.set``, process-wide, let one job's settings leak into the others and
    outlive it. Entered only when the settings differ from those in force.
    """
    settings = job.settings
    current = CallSettings.current()
    with nullcontext() if settings is current or settings == current else config.scoped(**settings.as_config()):
        yield


def in_worker() -> Any:
    """The ``distributed`` worker running this task, or None (local schedulers)."""
    dist = sys.modules.get("distributed")
    if dist is None:
        return None
    try:
        return dist.get_worker()
    except ValueError:
        return None


def check_cluster_home(job: Job) -> None:
    """Refuse, on a worker with a ``KacheryPlugin``, a job made in another home than the plugin's.

    A job records in the home it was made in; a cluster configured for one home must not quietly
    record in another (the client's, which the workers may not even share)."""
    worker = in_worker()
    if worker is None:
        return
    plugin = getattr(worker, "plugins", {}).get(PLUGIN_NAME)
    home = getattr(plugin, "settings", {}).get("home") if plugin is not None else None
    if home is not None and home != job.settings.home:
        raise KacheryError(
            f"task {job.id[:12]} ({job.task.name}) was made in home {job.settings.home}, but this "
            f"cluster's KacheryPlugin records in {home}: compute it with that home in force on the "
            "client (kt.config.set(home=...)), or register the plugin again for this home")


#: The name the scheduler plugin installs its worker plugin under (plugin.py).
PLUGIN_NAME = "kachery-worker"


def emit(msg: dict[str, Any]) -> None:
    """Tell the scheduler (KacheryPlugin) what a node did; a no-op off ``distributed``."""
    worker = in_worker()
    if worker is not None:
        worker.log_event(TOPIC, msg)


def load_job(job: Job, pruned: int = 0) -> Any:
    """Load a recorded result (the load node of a pruned graph)."""
    from ..tasks.resolver import MISS, lookup

    check_cluster_home(job)
    with entered(job):
        store = store_for(job.settings.home)
        value = lookup(job, store)
        if value is MISS:
            raise KacheryError(
                f"the record of task {job.id} ({job.task.name}) disappeared between building the "
                "graph and running it (garbage collection?); compute the graph again to recompute it")
        if in_worker() is not None:
            record = store.records.read(job.id) or {}
            saved = float(record.get("provenance", {}).get("wall_s", 0.0) or 0.0)
            emit({"event": "hit", "key": job_key(job), "saved_s": saved, "pruned": pruned})
    return value


def run_job(job: Job, ids: tuple[str, ...], *values: Any) -> Any:
    """Resolve a job on the worker, with the values of its upstream jobs (ids in ``ids``)."""
    from ..tasks.resolver import MISS, lookup, resolve

    check_cluster_home(job)
    upstream = dict(zip(ids, values, strict=True))
    start = time.perf_counter()
    spec = _node_spec(job)
    if spec is not None and spec.always_run:  # state outside the graph: run here, never recorded
        from ..tasks.compute import compute

        return compute(job, upstream=upstream)
    with entered(job):
        missed = False
        if _prunable(job):  # recorded since the graph was built (another graph, another cluster)
            found = lookup(job, store_for(job.settings.home))
            if found is not MISS:
                emit({"event": "late-hit", "key": job_key(job)})
                return found
            missed = True
        if spec is not None and spec.min_seconds > 0:
            from .cached import run_node

            value = run_node(job, upstream, spec.min_seconds)
        else:
            value = resolve(job, upstream=upstream, missed=missed)
    emit({"event": "computed", "key": job_key(job), "seconds": time.perf_counter() - start})
    return value


# -- the Delayed -----------------------------------------------------------------------------------
class JobDelayed(Delayed):
    """A ``Delayed`` for one job whose graph is built, and pruned, each time Dask asks for it."""

    __slots__ = ("_job", "_built")

    #: Dask asks for the graph up to three times per compute (``is_dask_collection`` materializes
    #: it); a graph built this recently is reused. Reusing a stale graph stays correct: its run
    #: nodes look the store up before computing.
    REUSE_SECONDS = 0.5

    def __init__(self, job: Job):
        # the slots set directly: Delayed.__init__ and its __setattr__ are a third of the cost of
        # declaring a node, and a JobDelayed has no graph to check until Dask asks for one
        key = job_key(job)
        _set = object.__setattr__
        _set(self, "_key", key)
        _set(self, "_dask", None)
        _set(self, "_length", None)
        _set(self, "_layer", key)
        _set(self, "_job", job)
        _set(self, "_built", None)

    @property
    def job(self) -> Job:
        return self._job

    @property
    def dask(self) -> HighLevelGraph:
        now = time.monotonic()
        if self._built is not None and now - self._built[0] < self.REUSE_SECONDS:
            return self._built[1]
        if _keeping:
            release_built_graphs()
        dsk, _ = build_graph([self._job])
        graph = HighLevelGraph.from_collections(self._key, dsk, dependencies=())
        self._built = (built_at := time.monotonic(), graph)
        _keep_for_reuse(self, built_at)
        return graph

    def compute(self, **kwargs: Any) -> Any:
        """As ``Delayed.compute``; the graph built for it is dropped once it has run, so that a
        second compute of the same object builds (and prunes) afresh, and a result the user keeps
        does not keep the graph alive (see :func:`release_built_graphs`)."""
        try:
            return super().compute(**kwargs)
        finally:
            object.__setattr__(self, "_built", None)

    def __dask_tokenize__(self) -> str:
        return self._key

    def __repr__(self) -> str:
        return f"JobDelayed({self._key!r})"


#: (time after which it may be dropped, delayed object) for each graph a delayed object keeps.
_keeping: deque[tuple[float, weakref.ref]] = deque()


def _keep_for_reuse(delayed: JobDelayed, built_at: float) -> None:
    _keeping.append((built_at + JobDelayed.REUSE_SECONDS, weakref.ref(delayed)))


def release_built_graphs() -> None:
    """Drop the graphs that delayed objects keep for reuse, once too old to be reused.

    Why: a delayed object the user still holds after its compute (a notebook's ``result``) would
    otherwise keep its whole built graph alive, a node, a job and stubs per task: about 250k
    objects for a 40k-node pipeline. Python's cyclic collector scans them again and again while the
    next run is declared in the same process, and that made a cached rerun in the same kernel twice
    as slow as in a new interpreter. Called as nodes are declared (``job_delayed``) and before a
    graph is built, so a rerun sheds the old graph before it makes its own. Safe: a dropped graph
    is built again if asked for (as it is after ``REUSE_SECONDS`` anyway).
    """
    now = time.monotonic()
    while _keeping and _keeping[0][0] <= now:
        try:
            _, ref = _keeping.popleft()
        except IndexError:  # another thread took the last one
            return
        delayed = ref()
        built = None if delayed is None else delayed._built
        if built is not None and built[0] + JobDelayed.REUSE_SECONDS <= now:  # not rebuilt since
            object.__setattr__(delayed, "_built", None)


def job_delayed(job: Job, *, fresh: bool = False) -> JobDelayed:
    """A Delayed for ``job``; delayed objects among its arguments become upstream jobs.

    Our own delayed objects turn back into their jobs (ids stay Merkle); other dask collections
    are identified by their graph's content (see cached.py), so their values feed in at run time.
    ``fresh``: the job was just made for this call (``f.delayed``), so its arguments are replaced in
    place rather than in a copy.
    """
    if _keeping:
        release_built_graphs()
    args = job.args if fresh and job._id is None else None
    for name, value in job.args.items():  # _absorb on each argument, unrolled: once per node
        t = type(value)
        if t in _PLAIN:
            continue
        absorbed = value._job if t is JobDelayed else _absorb(value)
        if absorbed is not value:
            if args is None:
                args = dict(job.args)
            args[name] = absorbed
    if args is not None and args is not job.args:
        job = Job(job.task, args, job.settings)
    job.id  # noqa: B018 - ids are computed now, when the graph is declared; bad arguments fail here
    return JobDelayed(job)


_PLAIN = frozenset({int, float, str, bool, bytes, type(None)})


def _absorb(value: Any) -> Any:
    """``value`` with delayed objects and dask collections replaced by jobs (same object if none)."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, JobDelayed):
        return value.job
    if isinstance(value, Delayed) or is_dask_collection(value):
        from .cached import collection_job

        return collection_job(value)
    t = type(value)
    if t is list or t is tuple:
        items = [_absorb(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else t(items)
    if t is dict:
        items = {k: _absorb(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    return value
