"""Recorded calls, replayed: import a record's function as it is now and rebuild its job.

Used by ``stale --rerun``, ``task rerun``, ``task recheck`` and ``task explain ID``. A function is
imported by its module name, with the current directory on ``sys.path`` as ``python -m`` has it;
a function of ``__main__`` (a script) is found through the script's recorded path (scripts.py).
A record whose function cannot be imported is reported as such, with one line of why, never
guessed at. Arguments come back from their recorded forms: plain JSON, a file URI, an upstream job
(rebuilt from its own record, recursively, so upstream runs first), a blob of the store (read
verified, arg_blobs.py), or a pickle (only from this node's own store). A call that cannot be
rebuilt because an upstream record kept no copy of its argument names both functions.
"""

from __future__ import annotations

import base64
import importlib
import os
import sys
from dataclasses import replace
from typing import Any

import cloudpickle

from ..errors import IntegrityError, NotFoundError, UserError
from ..store.file import File
from ..store.local import LocalStore
from ..store.task_record import ArgEntry, TaskRecord
from . import arg_blobs
from .scripts import NO_ORIGIN, ScriptUnreachable, main_namespace
from .settings import CallSettings
from .task import Job, Task


class NotReplayable(UserError):
    """A record whose call cannot be rebuilt; the message says why.

    ``reason`` is that message without the function's name, for reports that name it already.
    """

    def __init__(self, reason: str, function: str | None = None) -> None:
        super().__init__(f"{function}: {reason}" if function else reason)
        self.reason = reason
        self.function = function


class ArgumentNotKept(NotReplayable):
    """A call whose record, or an upstream record, kept no copy of an argument.

    ``owner`` is the function whose own argument it is; ``downstream``, if any, the function whose
    rerun needs that upstream call. The message names both: the one to rerun is not the one to fix.
    """

    def __init__(self, owner: str, argument: str, why: str, downstream: str | None = None,
                 kept: str = "no copy") -> None:
        lost = f"kept {kept} of argument {argument!r} ({why})"
        super().__init__(lost if downstream is None else f"its upstream {owner} {lost}", downstream or owner)
        self.owner, self.argument, self.why, self.kept = owner, argument, why, kept


def import_task(record: TaskRecord) -> Task:
    """The task a record was made by, as its code is now."""
    function = record.function
    name = function.name
    module_name, qualname = function.module, function.qualname
    if not module_name or not qualname or "<locals>" in qualname:
        raise NotReplayable(f"defined where it cannot be imported ({module_name}.{qualname})", name)
    if module_name == "__main__":
        origin = function.origin
        try:
            obj: Any = main_namespace(origin)
        except ScriptUnreachable as exc:
            raise NotReplayable(str(exc), name) from None
        where = (origin or {}).get("path") or "__main__"
    else:
        obj = _import_module(module_name, name)
        where = module_name
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if module_name == "__main__" and function.origin is None and not isinstance(obj, Task):
        raise NotReplayable(NO_ORIGIN, name)  # looked for in this process's __main__, not there
    if obj is None:
        raise NotReplayable(f"{where} has no {qualname} now", name)
    if not isinstance(obj, Task):
        raise NotReplayable(f"{qualname} in {where} is no longer a task", name)
    return obj


def _import_module(module_name: str, name: str | None) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        message = " ".join(str(exc).split())
        raise NotReplayable(f"cannot import module {module_name!r} ({type(exc).__name__}: {message})", name) from None


def task_key(record: TaskRecord) -> tuple[str | None, ...]:
    """What names a record's function for importing it: module, qualname, and a script's path
    (two scripts' functions are both ``__main__.<name>``)."""
    function = record.function
    origin = function.origin or {}
    return (function.module, function.qualname, origin.get("path"))


def import_task_memo(record: TaskRecord, tasks: dict[tuple, Task | NotReplayable]) -> Task:
    """``import_task``, once per function for a batch of records (``stale()`` rebuilds every
    record in a store; importing again per record cost more than reading it). A failure is kept
    too, and raised again for the function's other records."""
    key = task_key(record)
    task = tasks.get(key)
    if task is None:
        try:
            task = tasks[key] = import_task(record)
        except NotReplayable as exc:
            tasks[key] = exc
            raise
    if isinstance(task, NotReplayable):
        raise task
    return task


def job_from_record(store: LocalStore, record: TaskRecord, settings: CallSettings | None = None,
                    _seen: dict[str, Job] | None = None,
                    _tasks: dict[tuple, Task | NotReplayable] | None = None) -> Job:
    """The call a record describes, rebuilt under the code of now (upstream jobs included).

    ``_seen`` (jobs by recorded id) and ``_tasks`` (``import_task_memo``) are shared by callers that
    rebuild many records at once."""
    seen = {} if _seen is None else _seen
    if record.task_id in seen:
        return seen[record.task_id]
    task = import_task(record) if _tasks is None else import_task_memo(record, _tasks)
    args = {}
    for name, entry in record.args.items():
        args[name] = _argument(store, name, entry, task.name, settings, seen, _tasks)
    if not task.signature.parameters.keys() <= args.keys():
        missing = set(task.signature.parameters) - set(args)
        raise NotReplayable(f"the function now takes {sorted(missing)}, which the record lacks", task.name)
    base = settings or CallSettings.current()
    namespace = record.namespace
    if base.namespace != namespace:
        base = replace(base, namespace=namespace)
    job = Job(task, args, base)
    seen[record.task_id] = job
    return job


def _argument(store: LocalStore, name: str, entry: ArgEntry, owner: str, settings, seen, tasks) -> Any:
    """One argument of ``owner``'s call, from its recorded form (recording.describe_args)."""
    form = entry.form
    if form == "json":
        return entry.value
    if form == "file":
        return File(entry.value)
    if form == "blob":
        try:
            return arg_blobs.load(entry, store.blobs)
        except (NotFoundError, IntegrityError, ValueError) as exc:
            raise ArgumentNotKept(owner, name, str(exc), kept="no readable copy") from None
    if form == "job":
        upstream = store.records.read(entry.value) or store.records.read_failure(entry.value)
        if upstream is None:
            raise NotReplayable(f"argument {name!r}: upstream task {entry.value} has no record", owner)
        try:
            return job_from_record(store, upstream, settings, seen, tasks)
        except ArgumentNotKept as exc:
            raise ArgumentNotKept(exc.owner, exc.argument, exc.why, downstream=owner, kept=exc.kept) from None
        except NotReplayable as exc:
            up = exc.function or upstream.function.name
            raise NotReplayable(f"its upstream {up} cannot be rebuilt: {exc.reason}", owner) from None
    if form == "pickle":
        return cloudpickle.loads(base64.b64decode(entry.value))
    raise ArgumentNotKept(owner, name, entry.value)  # omitted: the value is why


def find_record(store: LocalStore, task_id: str) -> TaskRecord:
    """The success (or else failure) record of an id, accepting a unique prefix of 6+ characters."""
    task_id = task_id.strip().lower()
    if len(task_id) < 6 or any(c not in "0123456789abcdef" for c in task_id):
        raise UserError(f"{task_id!r} is not a task id; give the 32 hex characters (or 6+ of them) from `kachery task ls`")
    if len(task_id) == 32:
        found = store.records.read(task_id) or store.records.read_failure(task_id)
        if found is None:
            raise NotFoundError(f"task {task_id} is not found in this node's store")
        return found
    matches = {r.task_id: r for kind in (False, True) for r in store.records.iter_records(failures=kind)
               if r.task_id.startswith(task_id)}
    if not matches:
        raise NotFoundError(f"no task id starting with {task_id} in this node's store")
    if len(matches) > 1:
        raise UserError(f"{task_id} matches {len(matches)} tasks; give more characters")
    return next(iter(matches.values()))
