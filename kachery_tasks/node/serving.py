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
   A claim whose holder is no longer present on the bus (its daemon stopped heartbeating) is taken
   over by the next provider the resent request reaches, for a pure task or a query only.
6. queue (node/runner.py): at most ``serve_concurrency`` run at once; the requester hears
   ``queued``, then ``running``, then again every heartbeat while it waits or runs;
7. run, here or on a Dask cluster (node/executors.py): pure through the engine (recorded, then
   published with its blobs: tasks/publish.py), query fresh (never this node's stale fallback),
   action through this node's action log keyed by the requester's key. A failure of the task
   answers ``failed`` with its one line.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

from .. import config
from ..buckets import AlreadyExists, NotFound, PreconditionFailed
from ..buckets.layout import channel_claim_key, records_prefix
from ..channels.envelope import Envelope
from ..channels.session import ChannelSession
from ..errors import KacheryError, UserError
from ..store.local import store_for
from ..tasks.publish import plan_publish, send
from ..tasks.remote_wire import decode_value, encode_value, write_answer
from ..tasks.task import Job, Task
from .executors import Execute
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
        local = task.here()
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


@dataclass(frozen=True)
class Admitted:
    """A request this node claimed: the call rebuilt from its arguments, waiting for its turn
    (node/runner.py)."""

    job: Job
    claim: str  # the claim's key in the channel's bucket
    action_key: str | None = None
    retry: bool = False


def admit_task(session: ChannelSession, env: Envelope) -> Outcome | Admitted:
    """Steps 1 to 5 of the module doc: an :class:`Outcome` already answered (or silence: ``claimed``,
    ``refused``), or the :class:`Admitted` call this node claimed and is to run."""
    if not session.config().allows(session.node_id, "provide_tasks"):
        return Outcome("refused", "this node lacks provide_tasks")
    body = env.body
    name, kind, code_hash = body.get("name"), body.get("kind"), body.get("code_hash")
    args, task_id = body.get("args"), body.get("task_id")
    if not (isinstance(name, str) and isinstance(code_hash, str) and isinstance(args, dict) and isinstance(task_id, str)):
        return answer(session, env, Outcome("rejected", "a request_task needs name, code_hash, args and task_id"))
    task = SERVED.get(name)
    if task is None:
        return answer(session, env, Outcome("rejected", f"task {name} is not served here"))
    ours = task.function_id.code_hash
    if kind != task.kind or code_hash != ours:
        detail = (f"{name}: code_mismatch: the requester's code hash is {code_hash}, this provider's {ours}"
                  if kind == task.kind else f"{name} is a {task.kind} task here, not {kind}")
        return answer(session, env, Outcome("code_mismatch", detail), {"ours": ours, "yours": code_hash})
    store = store_for(str(session.home))
    bucket = session.writable_bucket()
    namespace = body.get("namespace")
    with config.scoped(**({"namespace": namespace} if isinstance(namespace, str) else {})):
        try:
            values = {n: decode_value(n, e, store.blobs, bucket) for n, e in args.items()}
            job = task.job(**values)
        except (UserError, KacheryError) as exc:
            return answer(session, env, Outcome("rejected", f"arguments do not bind: {_line(exc)}"))
    if job.id != task_id:
        return answer(session, env, Outcome("rejected", f"{name}: the arguments give task {job.id} here, not "
                                            f"the requester's {task_id} (a value changed on the way)"))
    if task.kind == "pure" and _published_by_provider(session, bucket, task_id):
        return answer(session, env, Outcome("finished", "already in the channel's bucket; nothing run"))
    action_key = str(body.get("key") or task_id) if task.kind == "action" else None
    claim = _claim(session, env, task, action_key)
    if claim is None:
        return Outcome("claimed", "claimed by another provider")
    return Admitted(job, claim, action_key, bool(body.get("retry")))


def run_admitted(session: ChannelSession, env: Envelope, admitted: Admitted, execute: Execute) -> Outcome:
    """Step 7: run the claimed call through ``execute`` (here, or on a Dask cluster) and answer."""
    store = store_for(str(session.home))
    job = admitted.job
    kind = job.task.kind
    try:
        if kind == "action":
            keyed = Job(job.task, job.args, job.settings, action_key=admitted.action_key)
            result = execute(keyed, {"retry": admitted.retry})
            outcome = {"ok": result.ok, "error": result.error, "state": result.state, "replayed": result.replayed}
            return answer(session, env, Outcome("finished", result.state), {"outcome": outcome})
        if kind == "query":
            value = execute(job, {"allow_stale": False})
            encoded = encode_value("result", value, store.blobs, session.writable_bucket())
            return answer(session, env, Outcome("finished"), {"result": encoded})
        execute(job, {})
        out = send(plan_publish(store, job.id), store, session.writable_bucket())
        return answer(session, env, Outcome("finished", f"{len(out.records)} record(s) published", out.bytes_sent))
    except Exception as exc:  # noqa: BLE001 - the task's own failure, answered, never a dead daemon
        return answer(session, env, Outcome("failed", f"{type(exc).__name__}: {_line(exc)}"))


def release(session: ChannelSession, env: Envelope, admitted: Admitted) -> Outcome:
    """A claimed request that never ran (cancelled by its requester, or queued when the daemon
    stopped): its claim is removed, so a later request (for an action: with its key) may run."""
    bucket = session.writable_bucket()
    try:
        held = _read_claim(bucket, admitted.claim)
        if held is not None and held[0].get("node_id") == session.node_id:
            bucket.delete(admitted.claim)
    except KacheryError as exc:
        log.warning("channel %s: could not remove claim %s: %s", session.name, admitted.claim, exc)
    return Outcome("cancelled", "cancelled by its requester before it ran")


def _published_by_provider(session: ChannelSession, bucket: Any, task_id: str) -> bool:
    """Whether the channel's bucket holds a record of ``task_id`` by a member holding
    ``provide_tasks``: one a requester trusts. A record by anyone else does not count, or the
    requester would be told "finished" and find nothing it may use."""
    prefix = records_prefix(task_id)
    providers = session.config().members_with("provide_tasks")
    return any(info.key[len(prefix):].removesuffix(".json") in providers for info in bucket.list(prefix))


def _claim(session: ChannelSession, env: Envelope, task: Task, action_key: str | None) -> str | None:
    """The claim's key if this node runs the request: its claim was written now, or earlier (a
    resent request), or taken over from a provider no longer present; None if another node holds it.

    A claim is taken over (compare-and-swap on the generation read, so of two providers taking over
    one wins) only for a pure task or a query, whose second run costs time, never a wrong answer.
    An action's claim is never taken over: the holder's action log is what knows whether it ran."""
    if action_key is not None:
        subject = "action-" + xxhash.xxh3_128_hexdigest(orjson.dumps([task.name, action_key]))
    else:
        subject = env.request_id
    key = channel_claim_key(session.name, subject)
    bucket = session.writable_bucket()
    mine = {"node_id": session.node_id, "request_id": env.request_id, "time": time.time()}
    for _ in range(3):  # a claim released between our write and our read is written again
        try:
            bucket.write(key, orjson.dumps(mine))
            return key
        except AlreadyExists:
            pass
        held = _read_claim(bucket, key)
        if held is None:
            continue
        doc, generation = held
        holder = doc.get("node_id")
        if holder == session.node_id:
            return key
        if action_key is not None or holder in session.present():
            return None
        try:
            bucket.write_if_generation(key, orjson.dumps({**mine, "taken_from": holder}), generation)
        except PreconditionFailed:
            return None
        log.warning("channel %s: took over request %s (task %s) from %s…, which is no longer present",
                    session.name, env.request_id[:8], task.name, str(holder)[:12])
        return key
    return None


def _read_claim(bucket: Any, key: str) -> tuple[dict[str, Any], int] | None:
    """The claim at ``key`` and its generation (stat first: the bytes are then at least as new), or
    None if there is none; an unreadable claim counts as held by nobody known."""
    info = bucket.stat(key)
    if info is None:
        return None
    try:
        doc = orjson.loads(b"".join(bucket.read(key)))
    except NotFound:
        return None
    except orjson.JSONDecodeError:
        doc = {}
    return (doc if isinstance(doc, dict) else {}), info.generation


def answer(session: ChannelSession, env: Envelope, outcome: Outcome, extra: dict[str, Any] | None = None) -> Outcome:
    """Write the signed answer object, then say so with a ``task_status``."""
    doc = {"status": outcome.status, "detail": outcome.detail, **(extra or {})}
    write_answer(session.writable_bucket(), session.identity.keys, session.name, env.request_id, doc)
    report(session, env, outcome.status, outcome.detail)
    return outcome


def report(session: ChannelSession, env: Envelope, state: str, detail: str = "", **extra: Any) -> None:
    """Send a ``task_status`` for ``env``'s request (a wake-up or a progress report; never the answer)."""
    try:
        session.send("task_status", {"status": state, **({"detail": detail[:300]} if detail else {}), **extra},
                     request_id=env.request_id)
    except KacheryError as exc:  # the answer is in the bucket; the requester finds it there
        log.warning("channel %s: could not send task_status for request %s: %s", session.name, env.request_id[:8], exc)


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
