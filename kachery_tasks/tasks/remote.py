"""Calling a task a channel member serves: ``@pure(service=…)``, ``@query(service=…)``, ``@action(service=…)``.

The call becomes a ``request_task`` (tasks/remote_wire.py) sent to a joined channel where this node
holds ``request_tasks`` and a member online announces that it serves the task's name (the daemon's
presence carries ``serves: {name: code_hash}``, node/serving.py). It is the requester pattern of
channels/requests.py: the answer is a durable object in the channel's bucket, re-checked on every
message, after a gap, and once a second; the request is resent with the same id.

- **pure**: the tiers first, but for the channel tier (a record this node reads is the answer,
  nothing is asked; the provider looks in the channel itself, so asking the channel tier too would
  cost a second request); then the provider publishes the record to the channel's bucket and it is
  read through the channel tier's view, with every check of the bucket tier and the channel's trust
  (members holding ``provide_tasks``); a record already there is read with no request at all. With
  no provider online, or none serving the name, the
  channel tier is asked (a member may hold the record), and then the task is **computed here**: a
  pure result is the same wherever it is computed, so that costs time, never correctness.
- **query**: the provider's fresh result (in its signed answer); recorded here, so that when no
  provider answers in time (or none is online) the last recorded result is returned with a
  :class:`StaleResultWarning`, as a local query that fails does. With nothing recorded: one line.
- **action**: the provider runs it through its own action log, keyed by this call's idempotency key
  (``f.call(key=…)``, else the task id); a repeated key returns the recorded outcome. Never run here.

A provider's refusal (its code differs: ``code_mismatch`` with both hashes; the arguments do not bind)
is an error here once every provider serving the name refused; a failure of the task itself is final.

**Liveness.** The provider that claimed the request says ``queued``, then ``running``, and again
on every heartbeat, with its heartbeat period: the wait lasts as long as it reports (hours of
sorting are waited for). A provider no longer present on the bus, or silent for
:data:`SILENT_PERIODS` periods, is taken for dead, in one line naming it, the task, and since when
it had it. For an action that is the end: its
outcome is unknown until settled on that node (never run again elsewhere). For a pure task or a
query the request is sent again at once, and another provider serving the name takes it over
(node/serving.py); with none, the line is the error (for a query: the stale fallback).

**Cancel.** A call that gives up (its timeout, Ctrl-C) sends ``cancel`` for its request: the
provider drops it if it is still queued and lets it finish if it runs.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..channels.envelope import Envelope, new_request_id
from ..channels.pins import Pins
from ..channels.requests import RequestFailed, ask, channels_allowing
from ..channels.session import ChannelSession
from ..errors import KacheryError, StaleResultWarning, UserError
from ..store.local import store_for
from .provenance import Measure
from .recording import record_success
from .remote_wire import decode_value, encode_value, read_answers
from .task import ActionResult, Job
from .tiers import Hit, tiers_for
from .tiers.channel import ChannelTier

log = logging.getLogger("kachery_tasks")

#: Statuses of an answer that refuse the request before running it (another provider may accept).
REFUSALS = frozenset({"code_mismatch", "rejected"})
#: A provider that has a request and sends no word of it for this many of its heartbeat periods
#: (plus a second) is taken for dead, as it is when its presence (as long) runs out (node/daemon.py).
SILENT_PERIODS = 3.0


class RemoteTaskError(UserError):
    """A remote call that failed: refused by its providers, or the task failed there (one line)."""


class NoProvider(RemoteTaskError):
    """No member online serves the task (or this node may not request tasks)."""


class Finder(Protocol):
    """The resolver's lookup through the tiers (resolver.find)."""

    def __call__(self, home: str, task_id: str, *, skip: frozenset[str] = ...) -> Hit | None: ...


Keeper = Callable[[str, str, str, Hit], None]


def resolve_remote(job: Job, find: Finder, keep: Keeper, *, allow_stale: bool = True, retry: bool = False) -> Any:
    """Resolve ``job`` of a task with ``service=`` (see the module doc). ``find`` is the resolver's
    lookup through the tiers and ``keep`` its copy rule for a hit found otherwise (passed in: the
    resolver imports this module)."""
    kind = job.task.kind
    home = job.settings.home
    if kind == "pure":  # the channel tier is not asked: the provider looks in the channel itself
        hit = find(home, job.id, skip=frozenset({ChannelTier.name})) or _published(job, keep)
        if hit is not None:
            return hit.value
    try:
        session = provider_session(job)
    except NoProvider as exc:
        if kind == "pure":
            hit = find(home, job.id)  # a member that holds it may still send it
            if hit is not None:
                return hit.value
            log.info("%s; computing it here", exc)
            return _compute_here(job)
        if kind == "query":
            return _stale(job, find, exc, allow_stale)
        raise
    if kind == "action":
        return _call_action(session, job, retry)
    if kind == "query":
        try:
            return _call_query(session, job)
        except (RemoteTaskError, RequestFailed) as exc:
            return _stale(job, find, exc, allow_stale)
    return _call_pure(session, job, keep)


def _compute_here(job: Job) -> Any:
    """The job resolved here as a task without ``service=`` (the same id: service is not identity)."""
    return Job(job.task.here(), job.args, job.settings, id=job.id).result()


def provider_session(job: Job) -> ChannelSession:
    """The session of a channel where this node may request tasks and a member online serves
    ``job``'s task; :class:`NoProvider` (one line) if there is none."""
    home = Path(job.settings.home)
    name = job.task.name
    joined = Pins(home).names()
    if not joined:
        raise NoProvider(f"{name} (service {job.task.service!r}): this node joined no channel")
    sessions = channels_allowing(home, "request_tasks")
    if not sessions:
        raise NoProvider(f"{name}: this node lacks request_tasks in channel(s) {', '.join(joined)}; the owner grants "
                         "it with `kachery channel grant NAME NODE_ID --perm request_tasks`")
    for session in sessions:
        try:
            if serving(session, name):
                return session
        except KacheryError as exc:
            log.warning("channel %s: %s", session.name, exc)
    raise NoProvider(f"{name} (service {job.task.service!r}): no member online serves it in channel(s) "
                     f"{', '.join(s.name for s in sessions)}")


def serving(session: ChannelSession, name: str) -> dict[str, str]:
    """Members online with ``provide_tasks`` that announce serving ``name``: node id -> code hash."""
    found = {}
    for node_id, info in session.present("provide_tasks").items():
        serves = info.get("serves")
        if isinstance(serves, dict) and isinstance(serves.get(name), str):
            found[node_id] = serves[name]
    return found


def _body(session: ChannelSession, job: Job) -> dict[str, Any]:
    store = store_for(job.settings.home)
    bucket = session.writable_bucket()
    args = {n: encode_value(n, v, store.blobs, bucket) for n, v in job.args.items()}
    return {"name": job.task.name, "code_hash": job.task.function_id.code_hash, "kind": job.task.kind,
            "task_id": job.id, "namespace": job.settings.namespace, "args": args}


def _request(session: ChannelSession, job: Job, body: dict[str, Any], done: Callable[[dict[str, Any]], Any]) -> Any:
    """Send ``body`` and return ``done(answer)`` for the first finished answer of a trusted provider."""
    name = job.task.name
    request_id = new_request_id()
    what = f"task {name} ({job.id[:12]}…)" if job.task.kind != "action" else f"action {name} (key {body['key']!r})"
    watch = _Watch()

    def check(answers: list[Envelope]) -> Any:
        trusted = session.config().members_with("provide_tasks")
        found = read_answers(session.bucket, session.name, request_id, trusted)
        for doc in found.values():
            if doc.get("status") == "finished":
                watch.answered = True
                return done(doc)
            if doc.get("status") == "failed":
                watch.answered = True
                raise RemoteTaskError(f"{name} failed on {doc['node_id'][:12]}…: {doc.get('detail', '')}")
        refused = {n: d for n, d in found.items() if d.get("status") in REFUSALS}
        online = serving(session, name)
        if refused and set(online) <= set(refused):
            watch.answered = True
            first = next(iter(refused.values()))
            raise RemoteTaskError(f"{name}: refused by {len(refused)} provider(s) in channel {session.name!r}: "
                                  f"{first.get('detail', first.get('status'))}")
        watch.update(answers)
        for node_id, held in watch.gone(online):
            _provider_gone(session, job, body, request_id, what, watch, node_id, held, online)
        return None

    try:
        return ask(session, "request_task", body, check=check, what=what, provider_permission="provide_tasks",
                   request_id=request_id, renewed=lambda: watch.renewed)
    except BaseException:
        if not watch.answered:
            _cancel(session, request_id)
        raise


class _Watch:
    """What the providers said of one request: who holds it (queued or running), since when, with
    what heartbeat period, and when it was last heard of here."""

    def __init__(self) -> None:
        self.seen = 0
        self.holders: dict[str, dict[str, Any]] = {}
        self.dead: set[str] = set()
        self.renewed = time.monotonic()
        self.answered = False

    def update(self, answers: list[Envelope]) -> None:
        for env in answers[self.seen:]:
            body = env.body
            if body.get("status") in ("queued", "running"):
                every = body.get("every")
                since = body.get("since")
                self.holders[env.from_node] = {
                    "state": body["status"], "heard": time.monotonic(), "heard_at": time.time(),
                    "every": float(every) if isinstance(every, int | float) and 0 < every < 3600 else 10.0,
                    "since": float(since) if isinstance(since, int | float) else time.time()}
                self.dead.discard(env.from_node)
        self.seen = len(answers)

    def gone(self, online: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
        """Holders no longer ``online``, or silent for longer than :data:`SILENT_PERIODS` of their
        periods: now taken for dead (a later word from one brings it back)."""
        now = time.monotonic()
        gone = [(n, h) for n, h in self.holders.items()
                if n not in online or now - h["heard"] > SILENT_PERIODS * h["every"] + 1.0]
        for node_id, _ in gone:
            del self.holders[node_id]
            self.dead.add(node_id)
        return gone


def _provider_gone(session: ChannelSession, job: Job, body: dict[str, Any], request_id: str, what: str,
                   watch: _Watch, node_id: str, held: dict[str, Any], online: dict[str, str]) -> None:
    """The provider holding the request went silent: say so in one line; for a pure task or a
    query, ask again at once (another provider takes it over), else raise that line."""
    member = session.config().members.get(node_id)
    who = f"{node_id[:12]}…" + (f" ({member.label or member.owner})" if member else "")
    line = (f"{what}: provider {who} stopped heartbeating at {_clock(held['heard_at'])}; it had the request "
            f"{held['state']} since {_clock(held['since'])}")
    if job.task.kind == "action":
        if held["state"] == "running":
            raise RemoteTaskError(f"{line}; the action's outcome is unknown until settled on that node (`kachery "
                                  "task actions` there, then `kachery task resolve`, or call again with retry=True)")
        raise RemoteTaskError(f"{line}; it had not started, and runs when that node is back (call again then)")
    others = set(online) - watch.dead
    if not others:
        raise RemoteTaskError(f"{line}; no other member online serves it")
    log.warning("%s; asking the %d other provider(s)", line, len(others))
    watch.renewed = time.monotonic()
    session.send("request_task", body, request_id=request_id)


def _cancel(session: ChannelSession, request_id: str) -> None:
    """Tell the providers this request is given up (best effort: the call is failing anyway)."""
    try:
        session.send("cancel", {}, request_id=request_id)
    except Exception as exc:  # noqa: BLE001 - never hide why the call is failing
        log.info("channel %s: could not send cancel for request %s: %s", session.name, request_id[:8], exc)


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(wall))


def _call_pure(session: ChannelSession, job: Job, keep: Keeper) -> Any:
    """The record the provider publishes to the channel's bucket now."""
    view = _channel_view(job.settings.home, session)

    def done(_doc: dict[str, Any]) -> Any:
        hit = view.look_again(job.id)
        if not isinstance(hit, Hit):
            raise RemoteTaskError(f"{job.task.name}: the provider said finished, but the channel's bucket has no "
                                  f"trusted record of task {job.id} ({hit.reason or 'absent'})")
        return hit

    hit = _request(session, job, _body(session, job), done)
    keep(job.settings.home, ChannelTier.name, job.id, hit)  # brought into the tiers before it, as any hit is
    return hit.value


def _published(job: Job, keep: Keeper) -> Hit | None:
    """The record of ``job`` already in the bucket of a channel this node may request tasks in,
    read through the channel tier's view (its checks and trust), with no request sent."""
    for session in channels_allowing(Path(job.settings.home), "request_tasks"):
        try:
            hit = _channel_view(job.settings.home, session).get(job.id)
        except KacheryError as exc:
            log.warning("channel %s: %s", session.name, exc)
            continue
        if isinstance(hit, Hit):
            keep(job.settings.home, ChannelTier.name, job.id, hit)
            return hit
    return None


def _call_query(session: ChannelSession, job: Job) -> Any:
    store = store_for(job.settings.home)
    value = _request(session, job, _body(session, job),
                     lambda doc: decode_value("result", doc.get("result"), store.blobs, session.bucket))
    if job.settings.cache and not job.settings.read_only:
        record_success(job, store, value, Measure())  # the last result, for the stale fallback
    return value


def _call_action(session: ChannelSession, job: Job, retry: bool) -> ActionResult:
    body = {**_body(session, job), "key": job.action_key or job.id, "retry": bool(retry)}

    def done(doc: dict[str, Any]) -> ActionResult:
        out = doc.get("outcome") or {}
        return ActionResult(bool(out.get("ok")), out.get("error"), str(out.get("state", "unknown")),
                            bool(out.get("replayed")))

    return _request(session, job, body, done)


def _stale(job: Job, find: Finder, exc: Exception, allow_stale: bool) -> Any:
    hit = find(job.settings.home, job.id) if job.settings.cache else None
    if hit is None or not allow_stale:
        raise exc
    warnings.warn(StaleResultWarning(f"{job.task.name}: {exc}; returning its last recorded result"), stacklevel=5)
    return hit.value


def _channel_view(home: str, session: ChannelSession):
    """The channel tier's view of ``session``'s bucket (the one in force, so what it learns is shared)."""
    for tier in tiers_for(home):
        if isinstance(tier, ChannelTier):
            return tier.view(session)
    return ChannelTier(home).view(session)
