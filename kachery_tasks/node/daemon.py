"""The providing node: ``kachery node start --channel NAME``.

Asking a channel needs no daemon (:mod:`kachery_tasks.channels.requests`); providing does, since a
request can arrive at any time. The daemon subscribes to each channel, answers the requests its
permissions let it answer (:mod:`.providers`) on a small thread pool, sends a signed heartbeat and a
presence announcement every ``heartbeat_s``, keeps each channel's config fresh (a revocation of this
node, or of a requester, takes effect at the next refresh), and logs one line per request.

**Served tasks** (``serve=``, node/serving.py) are admitted and claimed on that pool, then run by a
:class:`~.runner.TaskRunner`: at most ``concurrency`` at once (config ``serve_concurrency``), in
this process or on a Dask cluster (``execute``, node/executors.py), the rest queued in order; every
heartbeat tells each requester that its request is still queued or running.

**One per home.** A lock on ``<home>/node/daemon.lock`` refuses a second daemon on the same home.

**Status.** ``<home>/node/daemon.json`` is rewritten (atomically) every heartbeat and when a request
starts or ends: the channels with their config version, the peers seen (verified heartbeats) with
label and time, requests served and dropped, and what is in flight. ``kachery node status`` reads it
and checks that the process is alive.

**Stopping.** SIGTERM or SIGINT: the subscriptions close (no new requests), queued tasks are
released (their claims removed, so their requesters' next ask goes to another provider), requests
in flight get ``grace_s`` seconds to finish, and the status says ``stopped``. An upload cut short (by the grace
running out, or by SIGKILL) leaves nothing under a final name in the bucket: objects are written to
a temporary name and renamed (directory) or committed whole (GCS), so the requester just times out
and a later request starts again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config
from ..channels.base import Subscription
from ..channels.envelope import Envelope
from ..channels.gate import Gate
from ..channels.session import ChannelSession
from ..errors import KacheryError, UserError
from ..feeds.registry import stored_feed
from ..fs import make_dirs, write_atomic
from .executors import Execute, run_here
from .outcome import Outcome
from .providers import HANDLERS, feed_size, handle, republish_feed
from .runner import TaskRunner, finish_within
from .serving import SERVED, Admitted, admit_task, answer

log = logging.getLogger("kachery_tasks.node")

HEARTBEAT_S = 10.0
#: A peer whose last heartbeat is older than this is no longer listed as seen.
PEER_FORGET_S = 600.0
#: The status file is rewritten at most this often (and on every heartbeat).
STATUS_EVERY_S = 0.5
#: A feed asked for is published again as it grows for this long after the last request for it.
FEED_WATCH_S = 3600.0
#: Served tasks run at once when neither the caller nor config ``serve_concurrency`` says, without a cluster.
DEFAULT_CONCURRENCY = 4
#: Presence lasts this many heartbeat periods: a node that died stops being present after that.
PRESENCE_PERIODS = 3.0
#: Message types the daemon acts on (the requests it answers, and cancellations of served tasks).
ACTED_ON = frozenset(HANDLERS) | {"request_task", "cancel"}


def status_path(home: Path) -> Path:
    return Path(home) / "node" / "daemon.json"


@dataclass
class _Channel:
    session: ChannelSession
    gate: Gate
    subscription: Subscription | None = None
    served: dict[str, int] = field(default_factory=dict)  # outcome status -> count
    watched: dict[str, tuple[int, float]] = field(default_factory=dict)  # feed id -> (messages published, until)
    peers: dict[str, float] = field(default_factory=dict)  # node id -> wall time of its last heartbeat


class NodeDaemon:
    """A long-lived node answering the requests of the channels ``names`` for ``home``."""

    def __init__(self, home: Path, names: list[str], *, threads: int = 4, heartbeat_s: float = HEARTBEAT_S,
                 grace_s: float = 30.0, serve: Iterable[Any] = (), concurrency: int | None = None,
                 execute: Execute = run_here) -> None:
        """``threads``: requests answered at once (a file upload, a claim); ``serve``: tasks this node
        runs for the channel's members (node/serving.py), ``concurrency`` of them at once (default:
        config ``serve_concurrency``), each through ``execute`` (node/executors.py)."""
        if not names:
            raise UserError("name at least one channel to serve: kachery node start --channel NAME")
        self.home = Path(home)
        self.heartbeat_s = heartbeat_s
        self.grace_s = grace_s
        self.channels = {}
        for name in dict.fromkeys(names):
            session = ChannelSession(self.home, name)
            self.channels[name] = _Channel(session, Gate(name, session.membership.config))
        for task in serve:
            SERVED.add(task)
        self.started = time.time()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kachery-node")
        limit = concurrency or int(config.get("serve_concurrency")) or DEFAULT_CONCURRENCY
        self.runner = TaskRunner(limit, execute, self._task_done, heartbeat_s)
        self._republishing: set[str] = set()
        self._in_flight: dict[tuple[str, str], tuple[Envelope, float, Future]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lock_file: Any = None
        self._state = "starting"
        self._status_due = threading.Event()

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> NodeDaemon:
        self._take_lock()
        for name, channel in self.channels.items():
            conf = channel.session.config()  # a one-line error now if the channel cannot be read
            if not conf.is_member(channel.session.node_id):
                raise UserError(f"this node is not a member of channel {name!r} yet; its owner admits it with "
                                f"`kachery channel grant {name} {channel.session.node_id} --owner EMAIL`")
            channel.subscription = channel.session.listen(
                lambda env, c=channel: self._receive(c, env),
                on_gap=lambda n=name: log.info("channel %s: the bus reconnected; requests sent meanwhile are "
                                               "sent again by their requesters", n),
                gate=channel.gate)
        self._state = "running"
        self._beat()
        threading.Thread(target=self._heartbeats, name="kachery-node-heartbeat", daemon=True).start()
        threading.Thread(target=self._status_writer, name="kachery-node-status", daemon=True).start()
        names = ", ".join(self.channels)
        log.info("node %s serving channel(s) %s", self.channels[next(iter(self.channels))].session.node_id[:12], names)
        return self

    def run_until_stopped(self) -> None:
        while not self._stop.wait(0.5):
            pass
        self.shutdown()

    def stop(self) -> None:
        """Ask the daemon to stop (safe from a signal handler)."""
        self._stop.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._state = "stopping"
        for channel in self.channels.values():
            if channel.subscription is not None:
                channel.subscription.close()
        deadline = time.monotonic() + self.grace_s
        still_running = self.runner.close(self.grace_s)
        with self._lock:
            pending = [f for _, _, f in self._in_flight.values()]
        finish_within(pending, deadline)
        with self._lock:
            abandoned = len(self._in_flight) + still_running
        if abandoned:
            log.warning("stopped with %d request(s) unfinished after %g s; their requesters will time out "
                        "and ask again", abandoned, self.grace_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._state = "stopped"
        self._write_status()
        log.info("node stopped")

    # -- requests ------------------------------------------------------------------------------------
    def _receive(self, channel: _Channel, env: Envelope) -> None:
        if env.type == "heartbeat":
            channel.peers[env.from_node] = time.time()
            return
        if env.type not in ACTED_ON or self._stop.is_set():
            return
        key = (channel.session.name, env.request_id)
        with self._lock:
            if key in self._in_flight:
                return  # the same request sent again while it is being answered
            future = self._pool.submit(self._serve, channel, env)
            self._in_flight[key] = (env, time.time(), future)

    def _serve(self, channel: _Channel, env: Envelope) -> None:
        started = time.monotonic()
        outcome: Outcome | None
        try:
            if env.type == "request_task":
                outcome = self._admit(channel, env)
            elif env.type == "cancel":
                outcome = self.runner.cancel(channel.session, env)
            else:
                outcome = handle(channel.session, env)
        except Exception as exc:  # a bug must not kill the daemon: log it with its traceback
            log.exception("channel %s: %s %s failed", channel.session.name, env.type, env.request_id[:8])
            outcome = Outcome("error", f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._in_flight.pop((channel.session.name, env.request_id), None)
        if outcome is not None:
            self._log(channel, env, outcome, started)

    def _admit(self, channel: _Channel, env: Envelope) -> Outcome | None:
        """A served task: checked and claimed here, then queued in the runner (None: the runner
        logs it when it ends)."""
        if self.runner.holds(channel.session, env):
            return None
        try:
            admitted = admit_task(channel.session, env)
        except KacheryError as exc:
            return answer(channel.session, env, Outcome("error", str(exc).splitlines()[0][:300]))
        if isinstance(admitted, Admitted):
            self.runner.submit(channel.session, env, admitted)
            return None
        return admitted

    def _task_done(self, session: ChannelSession, env: Envelope, outcome: Outcome, queued: float) -> None:
        self._log(self.channels[session.name], env, outcome, queued)

    def _log(self, channel: _Channel, env: Envelope, outcome: Outcome, started: float) -> None:
        channel.served[outcome.status] = channel.served.get(outcome.status, 0) + 1
        if env.type == "request_subfeed" and outcome.status == "finished":
            channel.watched[env.body["feed_id"]] = (outcome.count, time.monotonic() + FEED_WATCH_S)
        member = channel.session.config().members.get(env.from_node)
        who = f"{env.from_node[:12]}…" + (f" ({member.label or member.owner})" if member else "")
        sent = f", {outcome.bytes_sent} bytes sent" if outcome.bytes_sent else ""
        log.info("channel %s: %s %s from %s: %s%s%s in %.2f s", channel.session.name, env.type, _subject(env), who,
                 outcome.status, f" ({outcome.detail})" if outcome.detail else "", sent, time.monotonic() - started)
        self._status_due.set()

    # -- heartbeats and status -----------------------------------------------------------------------
    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._beat()

    def _status_writer(self) -> None:
        """Rewrite the status file when something changed, at most every :data:`STATUS_EVERY_S`:
        an fsynced write per request cost a few milliseconds of every answer."""
        while not self._stop.is_set():
            if self._status_due.wait(1.0):
                self._status_due.clear()
                self._write_status()
                self._stop.wait(STATUS_EVERY_S)

    def _beat(self) -> None:
        """Presence, the signed heartbeat and word on each served task in flight; a feed that grew is
        published on the pool, so a long upload never delays a heartbeat (requesters read a provider
        silent for a few periods as dead)."""
        for name, channel in self.channels.items():
            session = channel.session
            try:
                conf = session.config()  # refreshed when due
                info = {"label": conf.members[session.node_id].label if session.node_id in conf.members else "",
                        "pid": os.getpid(), "since": int(self.started), "beat": int(time.time()),
                        "serves": SERVED.serves()}
                session.announce(info, ttl=PRESENCE_PERIODS * self.heartbeat_s)
                session.send("heartbeat", {"served": sum(channel.served.values())})
            except KacheryError as exc:
                log.warning("channel %s: heartbeat failed: %s", name, exc)
        self.runner.beat()
        for name, channel in self.channels.items():
            if channel.watched and name not in self._republishing and not self._stop.is_set():
                self._republishing.add(name)
                self._pool.submit(self._republish_feeds, channel)
        self._write_status()

    def _republish_feeds(self, channel: _Channel) -> None:
        """Live replication: feeds a member asked for are published again when they grow, and a
        ``subfeed_count`` tells the channel (readers pull the new messages from the bucket)."""
        try:
            self._republish_watched(channel)
        finally:
            self._republishing.discard(channel.session.name)

    def _republish_watched(self, channel: _Channel) -> None:
        now = time.monotonic()
        for feed_id, (published, until) in list(channel.watched.items()):
            if now > until:
                del channel.watched[feed_id]
                continue
            feed = stored_feed(feed_id)
            if feed is None or feed_size(feed) == published:
                continue
            try:
                counts = republish_feed(channel.session, feed)
            except KacheryError as exc:
                log.warning("channel %s: could not publish feed %s…: %s", channel.session.name, feed_id[:16], exc)
                continue
            channel.watched[feed_id] = (sum(counts.values()), until)
            log.info("channel %s: feed %s… grew to %d message(s); published", channel.session.name, feed_id[:16],
                     sum(counts.values()))

    def status(self) -> dict[str, Any]:
        now = time.time()
        channels = {}
        for name, channel in self.channels.items():
            pin = channel.session.membership.pin
            conf = pin.config
            peers = {}
            for node_id, seen in sorted(channel.peers.items()):
                if now - seen > PEER_FORGET_S:
                    continue
                member = conf.members.get(node_id) if conf else None
                peers[node_id] = {"label": member.label if member else "", "owner": member.owner if member else "",
                                  "last_heartbeat": round(seen, 3), "seconds_ago": round(now - seen, 1)}
            channels[name] = {"config_version": conf.version if conf else None, "peers": peers,
                              "served": dict(channel.served), "dropped": dict(channel.gate.dropped)}
        with self._lock:
            flight = [{"channel": c, "type": env.type, "subject": _subject(env), "from": env.from_node,
                       "seconds": round(now - since, 1)} for (c, _), (env, since, _f) in self._in_flight.items()]
        tasks = {"serves": sorted(SERVED.serves()), "concurrency": self.runner.limit,
                 "running": self.runner.running(), "queued": self.runner.waiting()}
        return {"pid": os.getpid(), "state": self._state, "started": round(self.started, 3),
                "updated": round(now, 3), "node_id": next(iter(self.channels.values())).session.node_id,
                "channels": channels, "tasks": tasks, "in_flight": flight + self.runner.in_flight()}

    def _write_status(self) -> None:
        try:
            write_atomic(status_path(self.home), (json.dumps(self.status(), indent=2) + "\n").encode())
        except OSError as exc:
            log.warning("could not write %s: %s", status_path(self.home), exc)

    def _take_lock(self) -> None:
        path = make_dirs(self.home / "node") / "daemon.lock"
        handle_ = open(path, "a+b")  # noqa: SIM115 - held for the daemon's life
        try:
            fcntl.flock(handle_, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle_.close()
            raise UserError(f"a node daemon is already running on {self.home} (see `kachery node status`); "
                            "stop it first, or use another home") from None
        self._lock_file = handle_


def read_status(home: Path) -> dict[str, Any] | None:
    """The last status a daemon of ``home`` wrote, with ``running`` (its process is alive); None if none ran."""
    try:
        status = json.loads(status_path(home).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    status["running"] = status.get("state") in ("starting", "running", "stopping") and _alive(status.get("pid"))
    if not status["running"] and status.get("state") != "stopped":
        status["state"] = "dead"
    return status


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _subject(env: Envelope) -> str:
    body = env.body
    if "sha256" in body:
        return f"sha256://{str(body['sha256'])[:16]}…"
    if isinstance(body.get("task_ids"), list):
        ids = body["task_ids"]
        return f"task {ids[0]}" if len(ids) == 1 else f"{len(ids)} tasks"
    if "feed_id" in body:
        return f"feed {str(body['feed_id'])[:16]}…"
    if env.type == "request_task":
        return f"task {str(body.get('name'))[:100]} {str(body.get('task_id'))[:12]}…"
    return ""
