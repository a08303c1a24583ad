"""Tasks and jobs: a decorated function, and one call of it with bound arguments.

A :class:`Task` is what ``@pure``, ``@query`` and ``@action`` return. It stays callable with the
function's own signature. ``f.job(...)`` binds arguments without running anything; the job's id
covers the function's identity and the arguments, and a job passed as an argument to another task
enters that task's id by its own id, so a whole chain of calls has ids before anything runs.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from gc import disable as _gc_disable
from gc import enable as _gc_enable
from gc import isenabled as _gc_isenabled
from typing import Any

from ..errors import UserError
from ..hashing import FunctionId, bind_arguments, function_id, task_id
from ..hashing.canonical import register_identity_type
from ..store.codecs import check_codec
from .dask_layer import dask_layer
from .settings import CallSettings, check_call_options

KINDS = ("pure", "query", "action")


@dataclass(frozen=True)
class ActionResult:
    """The outcome of an action: success or failure, never data."""

    ok: bool
    error: str | None = None
    state: str = "succeeded"  # succeeded | failed | unknown
    replayed: bool = False  # True when the outcome was recorded by an earlier call

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class TaskOptions:
    """A task's options, as ``@pure(...)``, ``@query(...)`` and ``@action(...)`` take them.

    Frozen: a task with other options is a new task, ``Task(func, kind, replace(options, ...))``
    (``dataclasses.replace``, which checks the new values as the constructor does).
    ``call_options`` are the per-call cache options ``f.options(...)`` adds (``force``, ``cache``,
    ...): they go into every job's settings, not into the function's identity."""

    version: str | None = None
    name: str | None = None  # the task's name instead of <module>.<qualname>
    codec: str | None = None
    ignore_globals: tuple[str, ...] = ()  # any iterable; kept sorted (function_id's cache key)
    rtol: float | None = None
    atol: float | None = None
    call_options: Mapping[str, Any] = field(default_factory=dict, hash=False)  # kept as a dict
    #: Resolve the task remotely: a member of a joined channel serving it runs it (tasks/remote.py).
    #: Not part of the function's identity: the task id is the same wherever it runs.
    service: str | None = None

    def __post_init__(self) -> None:
        if self.version is not None and not isinstance(self.version, str):
            raise UserError(f"version= takes a string such as '2', not {self.version!r}")
        check_codec(self.codec)
        if self.service is not None and (not isinstance(self.service, str) or not self.service):
            raise UserError(f"service= takes a non-empty string naming what serves the task, not {self.service!r}")
        object.__setattr__(self, "ignore_globals", tuple(sorted(self.ignore_globals)))
        object.__setattr__(self, "call_options", dict(self.call_options or {}))


def _option(name: str) -> property:
    return property(lambda task: getattr(task.task_options, name),
                    doc=f"The task's ``{name}`` option (read-only: see :class:`TaskOptions`).")


class Task:
    """A function with a kind and caching options. See docs/tasks.md.

    ``Task(func, kind, version="2", codec="npy")`` or ``Task(func, kind, TaskOptions(...))``; the
    options are ``task.task_options``, and each is also an attribute (``task.version``, ...)."""

    def __init__(self, func: Callable, kind: str, options: TaskOptions | None = None, **fields: Any):
        if kind not in KINDS:
            raise UserError(f"unknown task kind {kind!r}; use one of {', '.join(KINDS)}")
        if not callable(func):
            raise UserError(f"@{kind} decorates a function, not {type(func).__name__}")
        if inspect.iscoroutinefunction(func) or inspect.isgeneratorfunction(func):
            raise UserError(f"@{kind} cannot decorate {func.__qualname__}: async and generator functions have no single result")
        if options is None:
            options = TaskOptions(**fields)
        elif fields:
            options = replace(options, **fields)
        if kind == "action" and options.codec is not None:
            raise UserError("an action returns only success or failure: it takes no codec=")
        functools.update_wrapper(self, func)
        self.func = func
        self.kind = kind
        self.task_options = options
        self.signature = inspect.signature(func)
        self._simple = _simple_parameters(self.signature)

    version = _option("version")
    name_override = _option("name")
    codec = _option("codec")
    ignore_globals = _option("ignore_globals")
    rtol = _option("rtol")
    atol = _option("atol")
    call_options = _option("call_options")
    service = _option("service")

    # -- identity --------------------------------------------------------------------------------
    def __kachery_function_id__(self) -> FunctionId:
        o = self.task_options
        return function_id(self.func, version=o.version, name=o.name, ignore_globals=o.ignore_globals)

    @property
    def function_id(self) -> FunctionId:
        return self.__kachery_function_id__()

    @property
    def name(self) -> str:
        return self.task_options.name or f"{self.func.__module__}.{self.func.__qualname__}"

    # -- calls -----------------------------------------------------------------------------------
    def options(self, **options: Any) -> Task:
        """This task with per-call cache options (``force``, ``cache``, ``read_only``, ``namespace``,
        ``cache_errors``); they cannot clash with the function's own parameter names."""
        merged = {**self.task_options.call_options, **check_call_options(options)}
        return Task(self.func, self.kind, replace(self.task_options, call_options=merged))

    def here(self) -> Task:
        """This task without ``service=``: resolved in this process, never asked of a channel (how a
        provider runs what it serves, and how a pure task with no provider online is computed).
        Its id is the same: the service is where a task runs, not what it computes."""
        if self.task_options.service is None:
            return self
        return Task(self.func, self.kind, replace(self.task_options, service=None))

    def job(self, *args: Any, **kwargs: Any) -> Job:
        """Bind arguments (defaults applied) into a job; nothing runs."""
        bound = _bind_simple(self._simple, args, kwargs) if self._simple is not None else None
        if bound is None:
            try:
                bound = bind_arguments(self.func, args, kwargs)
            except TypeError as exc:
                raise UserError(f"{self.name}: {exc}") from None
        return Job(self, bound, CallSettings.current(self.task_options.call_options))

    def task_id(self, *args: Any, **kwargs: Any) -> str:
        return self.job(*args, **kwargs).id

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _resolve(self.job(*args, **kwargs))  # Job.result's own call, one call less

    def call(self, *args: Any, key: str | None = None, retry: bool = False, **kwargs: Any) -> ActionResult:
        """Run an action with an explicit idempotency ``key``, or settle an unknown one with ``retry``."""
        if self.kind != "action":
            raise UserError(f"{self.name} is a {self.kind} task; .call(key=, retry=) is for actions")
        if key is not None and (not isinstance(key, str) or not key):
            raise UserError(f"an idempotency key is a non-empty string, not {key!r}")
        job = self.job(*args, **kwargs)
        return Job(self, job.args, job.settings, action_key=key).result(retry=retry)

    def delayed(self, *args: Any, **kwargs: Any):
        """A ``dask.delayed`` object keyed ``<name>-<task id>`` (see kachery_tasks.dask, which the
        task engine reaches through dask_layer.py: it sits above, and is imported on first use).

        Python's cyclic collector is paused while the node is declared. Why: declaring a pipeline
        allocates a few tracked objects per node (job, arguments, delayed object) that all live
        until the graph runs, so the collections their allocations trigger free nothing, and one
        young collection in a hundred becomes a full one that walks the whole heap: in a kernel
        that still holds a first run's jobs, that doubled the cost of declaring a cached rerun.
        Paused, the allocations are still counted, and the collection they call for runs at the
        next allocation outside (in the caller's loop), once, and far fewer ever become full ones.
        Safe: the pause covers this call alone (a ``finally`` ends it, and a collector that was
        off stays off); what it allocates lives on, and a cycle made meanwhile (identifying a
        function for the first time) is collected by that next collection. Other threads only see
        a collection deferred by microseconds; a ``gc.disable()`` another thread makes inside
        that window is undone by it, which is why the pause is this narrow.
        """
        if not _gc_isenabled():
            return dask_layer().delayed(self.job(*args, **kwargs), fresh=True)
        _gc_disable()
        try:
            return dask_layer().delayed(self.job(*args, **kwargs), fresh=True)
        finally:
            _gc_enable()

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        """Decorating a method: ``obj.method`` is the task with ``obj`` bound as its first argument
        (so ``obj`` must have a canonical form: a dataclass, or ``__kachery_canon__``)."""
        return self if instance is None else BoundTask(self, instance)

    def __repr__(self) -> str:
        return f"<{self.kind} task {self.name}>"

    def _exposed(self) -> Task | None:
        """The task its module exposes under the function's name, if it wraps the same function."""
        module = sys.modules.get(self.func.__module__)
        qualname = self.func.__qualname__
        if module is None or self.func.__module__ == "__main__" or "<locals>" in qualname:
            return None
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, Task) and obj.func is self.func and obj.kind == self.kind else None

    def __reduce__(self):
        # A task that its module exposes under its own name pickles by reference, as functions do:
        # a worker then imports the same object and computes the same function id.
        exposed = self._exposed()
        if exposed is self:
            return self.func.__qualname__
        call_options = self.task_options.call_options
        if exposed is not None and replace(exposed.task_options, call_options=call_options) == self.task_options:
            return (_with_options, (exposed, call_options))  # f.options(...): the exposed task, plus the options
        return (Task, (self.func, self.kind, self.task_options))  # other options (f.here()): all of them


# -- the engine above -----------------------------------------------------------------------------
def _not_wired(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a job resolved while kachery_tasks.tasks is still being imported")


#: ``resolver.resolve`` and ``explain.explain``, which Task and Job call. Both modules import this
#: one (it is the bottom of the task engine), so this one cannot import them: the package
#: (kachery_tasks/tasks/__init__.py), which imports all three, hands them in (:func:`wire`) before
#: anything else can reach a task. Module globals: the hit path calls ``_resolve`` directly.
_resolve: Callable[..., Any] = _not_wired
_explain: Callable[..., Any] = _not_wired


def wire(*, resolve: Callable[..., Any], explain: Callable[..., Any]) -> None:
    """Give Task and Job the resolver's ``resolve`` and explain's ``explain`` (kachery_tasks.tasks)."""
    global _resolve, _explain
    _resolve = resolve
    _explain = explain


def _simple_parameters(signature: inspect.Signature) -> tuple[tuple[str, Any], ...] | None:
    """(name, default) pairs when every parameter is plain positional-or-keyword, else None."""
    kinds = {p.kind for p in signature.parameters.values()}
    if kinds - {inspect.Parameter.POSITIONAL_OR_KEYWORD}:
        return None
    return tuple((p.name, p.default) for p in signature.parameters.values())


def _bind_simple(params: tuple[tuple[str, Any], ...], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``bind`` + ``apply_defaults`` for simple signatures, without inspect's cost on the hit path;
    None where the general binder must decide (and raise the right TypeError)."""
    if len(args) > len(params):
        return None
    bound = {}
    used = 0
    for i, (name, default) in enumerate(params):
        if i < len(args):
            if name in kwargs:
                return None  # given twice
            bound[name] = args[i]
        elif name in kwargs:
            bound[name] = kwargs[name]
            used += 1
        elif default is inspect.Parameter.empty:
            return None
        else:
            bound[name] = default
    return bound if used == len(kwargs) else None


class BoundTask:
    """A task decorating a method, read from an instance: every call passes the instance first."""

    __slots__ = ("task", "instance")

    def __init__(self, task: Task, instance: Any):
        self.task = task
        self.instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(self.instance, *args, **kwargs)

    def job(self, *args: Any, **kwargs: Any) -> Job:
        return self.task.job(self.instance, *args, **kwargs)

    def task_id(self, *args: Any, **kwargs: Any) -> str:
        return self.task.task_id(self.instance, *args, **kwargs)

    def delayed(self, *args: Any, **kwargs: Any):
        return self.task.delayed(self.instance, *args, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> ActionResult:
        return self.task.call(self.instance, *args, **kwargs)

    def options(self, **options: Any) -> BoundTask:
        return BoundTask(self.task.options(**options), self.instance)

    def __repr__(self) -> str:
        return f"<bound {self.task!r} of {self.instance!r}>"


def _with_options(task: Task, call_options: dict[str, Any]) -> Task:
    """The exposed ``task`` with the call options of the task pickled (checked when it was made)."""
    return Task(task.func, task.kind, replace(task.task_options, call_options=call_options))


class Job:
    """One call of a task: the task, its bound arguments and the settings in force when made."""

    __kachery_type__ = "kachery_tasks.Job"
    __slots__ = ("task", "args", "settings", "action_key", "_id")

    def __init__(self, task: Task, args: dict[str, Any], settings: CallSettings, *,
                 id: str | None = None, action_key: str | None = None):
        """``id``: the task id when the caller knows it already (a copy of a job, a job of a Dask
        graph node identified by content), else computed on first use. ``action_key``: an
        action's idempotency key (``f.call(key=...)``), else its task id."""
        self.task = task
        self.args = args
        self.settings = settings
        self.action_key = action_key
        self._id = id

    @property
    def id(self) -> str:
        """The task id (scheme kt1); an unhashable argument raises ``UnhashableArgument`` here."""
        if self._id is None:
            self._id = task_id(self.task.kind, self.task.function_id, self.args, self.settings.namespace)
        return self._id

    def id_under(self, function_id: FunctionId) -> str:
        """The id, given the task's function id as it is now. A report over many records of one
        function (``stale()``) identifies the function once, not once per record; the id is the
        one ``id`` gives while the code and the globals it reads stay the same."""
        if self._id is None:
            self._id = task_id(self.task.kind, function_id, self.args, self.settings.namespace)
        return self._id

    @property
    def kind(self) -> str:
        return self.task.kind

    def __kachery_canon__(self) -> str:
        return self.id

    def result(self, *, allow_stale: bool = True, retry: bool = False) -> Any:
        """Resolve the job: memory, then the local store, then compute (see docs/tasks.md)."""
        return _resolve(self, allow_stale=allow_stale, retry=retry)

    def explain(self):
        return _explain(self)

    def upstream(self) -> list[Job]:
        """The jobs among this job's arguments (at any depth of lists, tuples and dicts)."""
        found: list[Job] = []
        for value in self.args.values():  # the top level unrolled: graph walks ask once per node
            t = type(value)
            if t is Job:
                found.append(value)
            elif t not in _SCALARS:
                _collect_jobs(value, found)
        return found

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.args.items())
        return f"<Job {self.task.name}({args}) {self._id or ''}>"

    def __reduce__(self):
        return (_rebuild_job, (self.task, self.args, self.settings, self.action_key, self._id))


register_identity_type(Job)  # a job is encoded as its task id: this makes ids Merkle hashes


def _rebuild_job(task, args, settings, action_key, id_) -> Job:
    return Job(task, args, settings, id=id_, action_key=action_key)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_SCALARS = frozenset({int, float, str, bool, bytes, type(None)})


def _collect_jobs(value: Any, found: list[Job]) -> None:
    if isinstance(value, Job):
        found.append(value)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            _collect_jobs(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_jobs(item, found)


def substitute_jobs(value: Any, results: Callable[[Job], Any]) -> Any:
    """``value`` with every job inside it replaced by ``results(job)``."""
    if isinstance(value, Job):
        return results(value)
    if type(value) is list:
        return [substitute_jobs(v, results) for v in value]
    if type(value) is tuple:
        return tuple(substitute_jobs(v, results) for v in value)
    if type(value) is dict:
        return {k: substitute_jobs(v, results) for k, v in value.items()}
    return value
