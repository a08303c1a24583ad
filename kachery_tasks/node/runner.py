"""The served tasks a daemon claimed: at most ``limit`` run at once, the rest wait in order.

Each claimed request is reported to its requester as it moves: ``queued`` when it has to wait for a
slot, ``running`` when a queued one starts, and where it stands on every heartbeat of the daemon
(:meth:`TaskRunner.beat`), with ``since`` (when it was queued or started, wall time) and ``every``
(the heartbeat period). A request that starts at once is not reported until the next heartbeat: most
tasks finish sooner, and their answer is then the only message sent. That is
what the requester's liveness rests on: a request whose provider stops reporting for a few periods
is one whose provider died (tasks/remote.py says so in one line, and another provider may take a
pure task or a query over).

``cancel`` from the node that sent the request removes it while it is queued (its claim released,
its answer ``cancelled``); a running one is left to finish, since stopping a thread midway, or a
task midway through a change to the outside world, is worse than finishing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..channels.envelope import Envelope
from ..channels.session import ChannelSession
from .executors import Execute
from .outcome import Outcome
from .serving import Admitted, answer, release, report, run_admitted

log = logging.getLogger("kachery_tasks.node")

#: Called with each request's final outcome and when it was queued (monotonic), for the daemon's log.
Done = Callable[[ChannelSession, Envelope, Outcome, float], None]


@dataclass
class _Entry:
    session: ChannelSession
    env: Envelope
    admitted: Admitted
    queued: float = field(default_factory=time.time)  # wall time
    queued_mono: float = field(default_factory=time.monotonic)
    state: str = "queued"
    reported: bool = False
    started: float | None = None
    future: Future | None = None


class TaskRunner:
    """A bounded, ordered queue of claimed requests (module doc)."""

    def __init__(self, limit: int, execute: Execute, done: Done, every: float) -> None:
        self.limit = limit
        self.every = every
        self._execute = execute
        self._done = done
        self._pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="kachery-task")
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    def holds(self, session: ChannelSession, env: Envelope) -> bool:
        """Whether ``env``'s request is queued or running here; if so its requester hears where it is
        (it sent the request again: its word of us may have been lost)."""
        with self._lock:
            entry = self._entries.get((session.name, env.request_id))
        if entry is not None:
            self._report(entry)
        return entry is not None

    def submit(self, session: ChannelSession, env: Envelope, admitted: Admitted) -> Outcome:
        key = (session.name, env.request_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                waits = sum(e.state in ("queued", "running") for e in self._entries.values()) >= self.limit
                entry = self._entries[key] = _Entry(session, env, admitted)
                entry.future = self._pool.submit(self._run, key, entry)
            else:
                waits = True  # sent again: say where it is
        if waits:
            self._report(entry)
        return Outcome("queued", f"{self.waiting()} waiting, {self.running()} running of {self.limit}")

    def cancel(self, session: ChannelSession, env: Envelope) -> Outcome:
        """``env`` is a ``cancel`` naming a request by its request id."""
        with self._lock:
            entry = self._entries.get((session.name, env.request_id))
            if entry is None:
                return Outcome("not_found", "no such request here (finished, or never claimed here)")
            if entry.env.from_node != env.from_node:
                return Outcome("refused", "only the node that sent a request may cancel it")
            if entry.state != "queued":
                return Outcome("running", "already running: it finishes")
            entry.state = "cancelled"
            del self._entries[(session.name, env.request_id)]
        if entry.future is not None:
            entry.future.cancel()
        outcome = release(entry.session, entry.env, entry.admitted)
        return answer(entry.session, entry.env, outcome)

    def beat(self) -> None:
        """Tell each requester where its request stands (called on every daemon heartbeat)."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            self._report(entry)

    def waiting(self) -> int:
        with self._lock:
            return sum(e.state == "queued" for e in self._entries.values())

    def running(self) -> int:
        with self._lock:
            return sum(e.state == "running" for e in self._entries.values())

    def in_flight(self) -> list[dict[str, Any]]:
        """Rows for the daemon's status file."""
        now = time.time()
        with self._lock:
            entries = list(self._entries.values())
        return [{"channel": e.session.name, "type": "request_task", "state": e.state,
                 "subject": f"task {e.admitted.job.task.name} {e.admitted.job.id[:12]}…", "from": e.env.from_node,
                 "seconds": round(now - e.queued, 1)} for e in entries]

    def close(self, grace_s: float) -> int:
        """Release what is queued (its requesters go to another provider, or come back after a
        restart), give what runs ``grace_s`` seconds; the number still running after that."""
        with self._lock:
            queued = [e for e in self._entries.values() if e.state == "queued"]
            for entry in queued:
                entry.state = "cancelled"
                del self._entries[(entry.session.name, entry.env.request_id)]
            running = [e.future for e in self._entries.values() if e.future is not None]
        for entry in queued:
            if entry.future is not None:
                entry.future.cancel()
            release(entry.session, entry.env, entry.admitted)
        finish_within(running, time.monotonic() + grace_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return self.running()

    def _run(self, key: tuple[str, str], entry: _Entry) -> None:
        with self._lock:
            if entry.state != "queued":
                return
            entry.state, entry.started = "running", time.time()
        if entry.reported:  # it was queued: the requester hears that it runs now
            self._report(entry)
        try:
            outcome = run_admitted(entry.session, entry.env, entry.admitted, self._execute)
        except Exception as exc:  # a bug must not kill the daemon or leave the requester waiting
            log.exception("channel %s: request_task %s failed", entry.session.name, entry.env.request_id[:8])
            outcome = Outcome("error", f"{type(exc).__name__}: {exc}")
            report(entry.session, entry.env, "error", outcome.detail)
        finally:
            with self._lock:
                self._entries.pop(key, None)
        self._done(entry.session, entry.env, outcome, entry.queued_mono)

    def _report(self, entry: _Entry) -> None:
        since = entry.started if entry.state == "running" and entry.started else entry.queued
        if entry.state in ("queued", "running"):
            entry.reported = True
            report(entry.session, entry.env, entry.state, since=round(since, 3), every=self.every)


def finish_within(futures: list[Future], deadline: float) -> None:
    """Wait for ``futures`` until ``deadline`` (monotonic) at the latest; their own failures are
    theirs to report (each request answers or logs its error)."""
    for future in futures:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            future.result(timeout=left)
        except Exception:  # noqa: BLE001 - reported by the request itself
            pass
