"""The nodes of the graphs kachery builds, and the task that runs a ``cached()`` node: the bottom
of the Dask layer (every other module of it may import this one; it imports none of them).

A job becomes a :class:`LoadTask` (its result is recorded: load it) or a :class:`RunTask`
(resolve it on the worker), keyed :func:`job_key`. A node of a plain dask graph that
``cached()`` identifies becomes a job of a :class:`NodeRunner` task, whose one argument
``node`` (a ``NodeSpec``, jobs.py) carries the dask node.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from typing import Any

from ..hashing import FunctionId
from ..tasks.task import Job, Task
from ._compat import Task as DaskTask

#: Topic of the events that load and run nodes log on ``distributed`` workers (see plugin.py).
TOPIC = "kachery"

#: The name the scheduler plugin installs its worker plugin under (plugin.py).
PLUGIN_NAME = "kachery-worker"

try:
    _VERSION = importlib.metadata.version("kachery-tasks")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
    _VERSION = "unknown"


# -- graph nodes -----------------------------------------------------------------------------------
class JobTask(DaskTask):
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


# -- the task of cached() nodes --------------------------------------------------------------------
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

    def __call__(self, node: Any, *deps: Any) -> Any:
        return node.run(deps)  # node: a NodeSpec (jobs.py)

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


def node_spec(job: Job) -> Any:
    """The cached() node (``NodeSpec``) a job stands for, or None for a job of a user task."""
    return job.args.get("node") if isinstance(job.task.func, NodeRunner) else None


def prunable(job: Job) -> bool:
    """True if a record of ``job`` may stand for it (and for all its upstream) in a graph."""
    s = job.settings
    if not (job.kind == "pure" and s.cache and not s.force):
        return False
    spec = node_spec(job)
    return spec is None or not spec.always_run
