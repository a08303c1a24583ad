"""Serving tasks to a channel: the registry of what this daemon runs, and the ``request_task`` handler.

``kachery node start --channel NAME --serve module:function`` (or ``NodeDaemon(..., serve=[task])``)
registers tasks under their task name (tasks/names.py: ``<module>.<qualname>`` or ``name=``) with
their code hash (hashing/function_identity.py). The daemon announces ``serves: {name: code_hash}``
in its presence, so requesters ask only a member that serves the name.

A request is answered in this order (each answer a signed object in the channel's bucket,
tasks/remote_wire.py, then a ``task_status`` message that only wakes the requester):

1. a name not registered here: ``rejected``, "not served here";
2. another kind, or another code hash: ``code_mismatch`` naming both hashes;
3. arguments that do not bind to the registered signature (or that do not give the requester's
   task id here): ``rejected``, naming the argument;
4. a pure task whose record is already in the channel's bucket: ``finished``, nothing run;
5. the **claim**: a create-if-absent object ``channels/<name>/claims/<subject>.json``. Of several
   providers serving the task, the one whose write succeeds runs it; a loser stays silent. The
   subject is the request id, or for an action a digest of its name and idempotency key, so every
   request with one key goes to the provider whose action log decides it (at most once per key
   across the channel, not only per node). Why the bucket and not Redis (``SET NX``): the bucket
   is the channel's durable store, which every provider can write and which outlives a restarted
   Redis; a claim lost with Redis would let a second provider run an action again.
6. run: pure through the engine (recorded, then published with its blobs: tasks/publish.py), query
   fresh (never this node's stale fallback), action through this node's action log keyed by the
   requester's key. A failure of the task answers ``failed`` with its one line.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import orjson
import xxhash

from .. import config
from ..buckets import AlreadyExists
from ..buckets.layout import channel_claim_key, records_prefix
from ..channels.envelope import Envelope
from ..channels.session import ChannelSession
from ..errors import KacheryError, UserError
from ..store.local import store_for
from ..tasks.publish import plan_publish, send
from ..tasks.remote_wire import decode_value, encode_value, write_answer
from ..tasks.task import Job, Task
from .outcome import Outcome

log = logging.getLogger("kachery_tasks.node")


class Registry:
    """The tasks this process serves, by task name (thread-safe; one per daemon)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()

    def add(self, task: Any) -> Task:
        """Serve ``task`` (a Task); the copy kept has no ``service=``, so running it here never asks
        the channel again."""
        if not isinstance(task, Task):
            raise UserError(f"only tasks (@pure, @query, @action) can be served, not {type(task).__name__}")
        local = Task(task.func, task.kind, replace(task.task_options, service=None))
        with self._lock:
            self._tasks[local.name] = local
        return local

    def get(self, name: str) -> Task | None:
        with self._lock:
            return self._tasks.get(name)

    def serves(self) -> dict[str, str]:
        """``{name: code_hash}``, as the daemon announces it."""
        with self._lock:
            tasks = list(self._tasks.values())
        return {t.name: t.function_id.code_hash for t in tasks}

    def __len__(self) -> int:
        return len(self._tasks)


#: What this process serves (the daemon is one per home, and one per process).
SERVED = Registry()


def import_served(spec: str) -> Task:
    """The task named by ``module:function`` (a dotted attribute path after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--serve takes module:function, not {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # as `python -m` has it: modules of the current directory
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--serve {spec}: cannot import {module_name} ({exc})") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UserError(f"--serve {spec}: {module_name} has no {attr}")
    if not isinstance(obj, Task):
        raise UserError(f"--serve {spec}: {attr} is not a task (decorate it with @pure, @query or @action)")
    return obj


def provide_task(session: ChannelSession, env: Envelope) -> Outcome:
    """Answer a ``request_task`` (module doc)."""
    if not session.config().allows(session.node_id, "provide_tasks"):
        return Outcome("refused", "this node lacks provide_tasks")
    body = env.body
    name, kind, code_hash = body.get("name"), body.get("kind"), body.get("code_hash")
    args, task_id = body.get("args"), body.get("task_id")
    if not (isinstance(name, str) and isinstance(code_hash, str) and isinstance(args, dict) and isinstance(task_id, str)):
        return _answer(session, env, Outcome("rejected", "a request_task needs name, code_hash, args and task_id"))
    task = SERVED.get(name)
    if task is None:
        return _answer(session, env, Outcome("rejected", f"task {name} is not served here"))
    ours = task.function_id.code_hash
    if kind != task.kind or code_hash != ours:
        detail = (f"{name}: code_mismatch: the requester's code hash is {code_hash}, this provider's {ours}"
                  if kind == task.kind else f"{name} is a {task.kind} task here, not {kind}")
        return _answer(session, env, Outcome("code_mismatch", detail), {"ours": ours, "yours": code_hash})
    store = store_for(str(session.home))
    bucket = session.writable_bucket()
    namespace = body.get("namespace")
    with config.scoped(**({"namespace": namespace} if isinstance(namespace, str) else {})):
        try:
            values = {n: decode_value(n, e, store.blobs, bucket) for n, e in args.items()}
            job = task.job(**values)
        except (UserError, KacheryError) as exc:
            return _answer(session, env, Outcome("rejected", f"arguments do not bind: {_line(exc)}"))
        if job.id != task_id:
            return _answer(session, env, Outcome("rejected", f"{name}: the arguments give task {job.id} here, not "
                                                 f"the requester's {task_id} (a value changed on the way)"))
        if task.kind == "pure" and _published_by_provider(session, bucket, task_id):
            return _answer(session, env, Outcome("finished", "already in the channel's bucket; nothing run"))
        if not _claim(session, env, task, body):
            return Outcome("claimed", "claimed by another provider")
        _status(session, env, "running")
        return _run(session, env, job, body)


def _run(session: ChannelSession, env: Envelope, job: Job, body: dict[str, Any]) -> Outcome:
    store = store_for(str(session.home))
    bucket = session.writable_bucket()
    kind = job.task.kind
    try:
        if kind == "action":
            keyed = Job(job.task, job.args, job.settings, action_key=str(body.get("key") or job.id))
            result = keyed.result(retry=bool(body.get("retry")))
            outcome = {"ok": result.ok, "error": result.error, "state": result.state, "replayed": result.replayed}
            return _answer(session, env, Outcome("finished", result.state), {"outcome": outcome})
        if kind == "query":
            value = job.result(allow_stale=False)
            return _answer(session, env, Outcome("finished"), {"result": encode_value("result", value, store.blobs, bucket)})
        job.result()
        out = send(plan_publish(store, job.id), store, bucket)
        return _answer(session, env, Outcome("finished", f"{len(out.records)} record(s) published", out.bytes_sent))
    except Exception as exc:  # noqa: BLE001 - the task's own failure, answered, never a dead daemon
        return _answer(session, env, Outcome("failed", f"{type(exc).__name__}: {_line(exc)}"))


def _published_by_provider(session: ChannelSession, bucket: Any, task_id: str) -> bool:
    """Whether the channel's bucket holds a record of ``task_id`` by a member holding
    ``provide_tasks``: one a requester trusts. A record by anyone else does not count, or the
    requester would be told "finished" and find nothing it may use."""
    prefix = records_prefix(task_id)
    providers = session.config().members_with("provide_tasks")
    return any(info.key[len(prefix):].removesuffix(".json") in providers for info in bucket.list(prefix))


def _claim(session: ChannelSession, env: Envelope, task: Task, body: dict[str, Any]) -> bool:
    """True if this node runs the request: its claim was written now, or earlier (a resent request)."""
    if task.kind == "action":
        subject = "action-" + xxhash.xxh3_128_hexdigest(orjson.dumps([task.name, str(body.get("key") or body["task_id"])]))
    else:
        subject = env.request_id
    key = channel_claim_key(session.name, subject)
    bucket = session.writable_bucket()
    claim = {"node_id": session.node_id, "request_id": env.request_id, "time": time.time()}
    try:
        bucket.write(key, orjson.dumps(claim))
        return True
    except AlreadyExists:
        try:
            held = orjson.loads(b"".join(bucket.read(key)))
        except (KacheryError, orjson.JSONDecodeError):
            return False
        return isinstance(held, dict) and held.get("node_id") == session.node_id


def _answer(session: ChannelSession, env: Envelope, outcome: Outcome, extra: dict[str, Any] | None = None) -> Outcome:
    """Write the signed answer object, then say so with a ``task_status``."""
    answer = {"status": outcome.status, "detail": outcome.detail, **(extra or {})}
    write_answer(session.writable_bucket(), session.identity.keys, session.name, env.request_id, answer)
    _status(session, env, outcome.status, outcome.detail)
    return outcome


def _status(session: ChannelSession, env: Envelope, status: str, detail: str = "") -> None:
    try:
        session.send("task_status", {"status": status, **({"detail": detail[:300]} if detail else {})},
                     request_id=env.request_id)
    except KacheryError as exc:  # the answer is in the bucket; the requester finds it there
        log.warning("channel %s: could not send task_status for request %s: %s", session.name, env.request_id[:8], exc)


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
