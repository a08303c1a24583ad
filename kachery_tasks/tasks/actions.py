"""Actions: run at most once per idempotency key, with the outcome kept in a signed feed.

The action log is the node's local feed ``action-log``, subfeed ``actions``: each call appends
``started``, then ``succeeded`` or ``failed``. The state of a key is its latest message. A per-key
lock (the same OS lock as single flight) serializes calls of one key across threads and processes,
so a second caller waits for the first and then returns its recorded outcome. A key whose latest
message is ``started`` while nobody holds its lock was being run by a process that died: its
outcome is ``unknown`` until a retry or a resolve settles it. No system can promise exactly once
against an outside system that is not itself idempotent: a crash after the outside change and
before ``succeeded`` is recorded is exactly that unknown case.

The log is the record of what happened to the outside world, so nothing in it is rewritten:
``resolve`` (``kachery task resolve``) appends ``resolved`` only to settle an ``unknown`` outcome,
once; a settled outcome is refused. A settled outcome that was wrong (a call that "failed" on a
timeout after the outside change was made, a resolve given the wrong flag) can only be corrected by
an ``overridden`` message, which names what it overrides and carries a mandatory note and the user:
the history stays, and ``kachery task actions`` shows the correction. Every settlement is decided
under the key's lock, after reading the log again, so of two racing resolves exactly one appends.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from ..errors import ReadOnlyStoreError, UserError, as_store_full
from ..feeds import local_feed, local_names
from ..store.flight import FlightLock
from ..store.local import store_for
from .compute import compute
from .recording import warn_store_full
from .settings import in_home
from .task import ActionResult, Job

LOG_FEED = "action-log"
LOG_SUBFEED = "actions"
FINAL = ("succeeded", "failed")
#: Messages that settle a key by hand, each with an ``outcome``.
BY_HAND = ("resolved", "overridden")
#: How long ``resolve`` waits for a key's lock held by someone else (another resolve holds it for a
#: few milliseconds; an action that runs holds it for as long as it runs, and is refused).
RESOLVE_WAIT_S = 2.0


class ActionSettledError(UserError):
    """A resolve of an outcome that is already settled: the log is not rewritten."""


@dataclass(frozen=True)
class ActionState:
    key: str
    state: str  # started | succeeded | failed | unknown | running
    task_id: str
    function: str
    time: float
    error: str | None
    pid: int | None
    host: str | None
    settled_by: str = ""  # run | resolve | override ("" while running or unknown)
    note: str | None = None
    user: str | None = None
    overrides: dict[str, Any] | None = None  # what an override replaced: its seq, state, outcome, time


class ActionLog:
    """The action log of one home, with an index of the latest message per key."""

    def __init__(self, home: str):
        self.home = home
        self._latest: dict[str, dict[str, Any]] = {}
        self._seqs: dict[str, int] = {}  # key -> seq of its latest message
        self._seen = 0
        self._lock = threading.Lock()
        with in_home(home):
            self._subfeed = local_feed(LOG_FEED).subfeed(LOG_SUBFEED)

    def refresh(self) -> None:
        with self._lock, in_home(self.home):
            for message in self._subfeed.messages(self._seen):
                body = message["body"]
                self._latest[body["key"]] = body
                self._seqs[body["key"]] = message["seq"]
                self._seen = message["seq"] + 1

    def latest(self, key: str) -> dict[str, Any] | None:
        self.refresh()
        return self._latest.get(key)

    def append(self, body: dict[str, Any]) -> dict[str, Any]:
        """Append ``body`` with the time, pid and host; returns it as appended."""
        body = {**body, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
        with in_home(self.home):
            self._subfeed.append(body)
        self.refresh()
        return body

    def lock(self, key: str) -> FlightLock:
        return store_for(Path(self.home)).records.action_lock(_key_name(key))

    def states(self) -> list[ActionState]:
        """Every key's state; ``started`` becomes ``running`` or ``unknown`` by its lock."""
        self.refresh()
        result = []
        for key, body in sorted(self._latest.items(), key=lambda kv: kv[1]["time"]):
            state = body["state"]
            if state == "started":
                state = "running" if self._running(key) else "unknown"
            result.append(ActionState(
                key, _settled_state(body) or state, body.get("task_id", ""), body.get("function", ""), body["time"],
                body.get("error"), body.get("pid"), body.get("host"), _SETTLED_BY.get(body["state"], ""),
                body.get("note"), body.get("user"), body.get("overrides") if body["state"] == "overridden" else None))
        return result

    def _running(self, key: str) -> bool:
        lock = self.lock(key)
        if lock.acquire(blocking=False):
            lock.release(done=False)
            return False
        return True

    def resolve(self, key: str, outcome: str, note: str | None = None, *, override: bool = False) -> dict[str, Any]:
        """Settle an ``unknown`` outcome by hand, after checking the outside world; returns the message.

        What ``kachery task resolve`` calls, so the rules hold for every caller: ``outcome`` is
        ``"succeeded"`` or ``"failed"``; a key that is settled already is refused
        (:class:`ActionSettledError`, naming its outcome and when it was recorded) unless
        ``override`` is given with a ``note``, which appends an ``overridden`` message naming what it
        overrides. The decision is taken holding the key's lock, on the log as read under it: two
        racing resolves end with one settlement, and the second is refused with the first's outcome.
        """
        if outcome not in FINAL:
            raise UserError(f"an action's outcome is 'succeeded' or 'failed', not {outcome!r}")
        if override and not (note or "").strip():
            raise UserError("an override needs a note saying why the recorded outcome is wrong (--note)")
        if self.latest(key) is None:
            raise UserError(f"no action with key {key!r} in the action log; see `kachery task actions`")
        lock = self.lock(key)
        if not _take_within(lock, RESOLVE_WAIT_S):
            raise UserError(f"action {key!r} is running now; resolve it after it ends")
        try:
            self.refresh()  # the log as it is now, under the lock: what every writer of this key holds
            body, seq = self._latest[key], self._seqs[key]
            settled = _settled_state(body)
            common = {"key": key, "task_id": body.get("task_id"), "function": body.get("function"),
                      "outcome": outcome, "note": note, "user": _user()}
            if settled is None:
                if override:
                    raise UserError(f"action {key!r} has an unknown outcome, so there is nothing to override: "
                                    f"resolve it without --override")
                entry = {**common, "state": "resolved", "settles": seq,
                         "error": (note or "resolved by hand as failed") if outcome == "failed" else None}
            elif not override:
                raise ActionSettledError(
                    f"action {key!r} already {settled}: {_recorded_text(body)}; resolve settles only an unknown "
                    f"outcome. If the record is wrong: kachery task resolve {key} --{outcome} --override --note WHY")
            elif settled == outcome:
                raise ActionSettledError(f"action {key!r} already {settled}: {_recorded_text(body)}; nothing to override")
            else:
                entry = {**common, "state": "overridden", "error": note if outcome == "failed" else None,
                         "overrides": {"seq": seq, "state": body["state"], "outcome": settled, "time": body["time"]}}
            return self.append(entry)
        finally:
            lock.release(done=False)


#: How a settling message came about, as ``kachery task actions`` shows it.
_SETTLED_BY = {"succeeded": "run", "failed": "run", "resolved": "resolve", "overridden": "override"}


def _settled_state(body: dict[str, Any]) -> str | None:
    """The outcome a message settles (``succeeded`` / ``failed``), or None for ``started``."""
    state = body["state"]
    if state in BY_HAND:
        return body["outcome"]
    return state if state in FINAL else None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _recorded_text(body: dict[str, Any]) -> str:
    how = {"resolved": "by a resolve", "overridden": "by an override"}.get(body["state"], "by its run")
    who = f"{body.get('user')}, " if body.get("user") else ""
    return f"recorded {how} at {_when(body['time'])} ({who}pid {body.get('pid')} on {body.get('host')})"


def _take_within(lock: FlightLock, seconds: float) -> bool:
    """Take ``lock``, waiting up to ``seconds``: a resolve must not wait as long as an action runs."""
    deadline = time.monotonic() + seconds
    while not lock.acquire(blocking=False):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _key_name(key: str) -> str:
    return xxhash.xxh3_128_hexdigest(key.encode())


_logs: dict[str, ActionLog] = {}
_logs_lock = threading.Lock()


def action_log(home: str) -> ActionLog:
    with _logs_lock:
        log = _logs.get(home)
        if log is None:
            log = _logs[home] = ActionLog(home)
        return log


def _recorded_without_writing(home: str, key: str) -> dict[str, Any] | None:
    """The latest message of ``key`` in a home that must not be written: no action log is created."""
    with in_home(home):
        if LOG_FEED not in local_names():
            return None
    return action_log(home).latest(key)


def _outcome(body: dict[str, Any], replayed: bool) -> ActionResult | None:
    state = _settled_state(body)
    if state == "succeeded":
        return ActionResult(True, None, "succeeded", replayed)
    if state == "failed":
        return ActionResult(False, body.get("error"), "failed", replayed)
    return None


def run_action(job: Job, *, retry: bool = False, upstream: Mapping[str, Any] | None = None) -> ActionResult:
    settings = job.settings
    key = job.action_key or job.id
    if not settings.cache:  # explicitly asked: run, record nothing, promise nothing
        return _run(job, upstream, None, key)
    if settings.read_only:
        body = _recorded_without_writing(settings.home, key)
        found = _outcome(body, True) if body else None
        if found is None:
            raise ReadOnlyStoreError(f"action {job.task.name} (key {key!r}) has no recorded outcome and read_only forbids running it")
        return found
    log = action_log(settings.home)
    rerun = retry or settings.force
    lock = log.lock(key)
    lock.acquire()  # a concurrent call of this key finishes first; then we see its outcome
    try:
        body = log.latest(key)
        if body is not None and not rerun:
            found = _outcome(body, True)
            if found is not None:
                return found
            return ActionResult(
                False,
                f"outcome unknown: the call started at {time.ctime(body['time'])} by pid {body.get('pid')} on "
                f"{body.get('host')} stopped before recording an outcome; check the outside world, then "
                f"settle it with .call(..., retry=True) or `kachery task resolve {key} --succeeded|--failed`",
                "unknown",
                True,
            )
        return _run(job, upstream, log, key)
    finally:
        lock.release(done=False)


def _run(job: Job, upstream: Mapping[str, Any] | None, log: ActionLog | None, key: str) -> ActionResult:
    """Run the action between its ``started`` and its outcome in the log.

    A home that cannot take ``started`` (full, over quota, read-only) refuses the action before it
    runs: without that line, at most once could not be kept. One that cannot take the outcome
    returns it all the same, with a StoreFullWarning: the log still ends in ``started``, so the key
    reads ``unknown`` (never a success that was not logged) and is not run again until settled.
    """
    common = {"key": key, "task_id": job.id, "function": job.task.name}
    if log is not None:
        try:
            log.append({**common, "state": "started"})
        except OSError as exc:
            full = as_store_full(exc, job.settings.home)
            if full is None:
                raise
            raise full from exc
    try:
        compute(job, upstream=upstream)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        _log_outcome(job, log, {**common, "state": "failed", "error": error})
        return ActionResult(False, error, "failed")
    _log_outcome(job, log, {**common, "state": "succeeded"})
    return ActionResult(True, None, "succeeded")


def _log_outcome(job: Job, log: ActionLog | None, body: dict[str, Any]) -> None:
    if log is None:
        return
    try:
        log.append(body)
    except OSError as exc:
        full = as_store_full(exc, job.settings.home)
        if full is None:
            raise
        warn_store_full(
            f"action {job.task.name} {body['state']}, but the action log could not record it: {full}. Its key "
            f"{body['key']!r} reads 'unknown' until settled with `kachery task resolve {body['key']} "
            f"--{body['state']}` once there is space", full)
