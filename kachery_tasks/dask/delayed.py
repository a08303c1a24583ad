"""``f.delayed(...)``: a :class:`JobDelayed`, a ``Delayed`` keyed ``<name>-<task id>`` whose graph is
built (graph.py) only when Dask asks for it (at compute/persist time, on the client), top-down from
its job, and pruned of the work whose results are recorded.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from typing import Any

import dask
from dask.base import is_dask_collection
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from ..tasks.task import Job
from .graph import build_graph
from .jobs import collection_job
from .nodes import job_key


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
    are identified by their graph's content (see jobs.py), so their values feed in at run time.
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
        return collection_job(value)
    t = type(value)
    if t is list or t is tuple:
        items = [_absorb(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else t(items)
    if t is dict:
        items = {k: _absorb(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    return value


def run_many(jobs: list[Job]) -> None:
    """Resolve ``jobs`` in one Dask graph, so that independent branches run in parallel (``rerun``
    of many calls)."""
    dask.compute(*[job_delayed(j) for j in jobs])
