"""A joined channel as one process uses it: its config, its bus, its gate, its bucket, this node's key.

Requesters (scripts, notebooks, Dask graphs: :mod:`.requests`) and the providing daemon
(:mod:`kachery_tasks.node`) both talk to a channel through a :class:`ChannelSession`. It sends
envelopes signed with this node's key on the channel's topic and hands on only the messages the gate
admits (:mod:`.gate`), never this node's own. Sessions are made once per home and channel per
process (:func:`session_for`) and share the transport of their URI, so a graph that asks a channel
for many results opens one connection.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..buckets.base import Bucket
from ..buckets.layout import check_layout
from ..buckets.uri import open_bucket
from ..identity import NodeIdentity, node_identity
from .base import GapHandler, Subscription, Transport
from .config import ChannelConfig
from .envelope import Envelope, seal
from .gate import Gate
from .membership import Membership, membership_for
from .pins import Pins
from .uri import open_transport

#: How long a heartbeat's presence lasts without the next one.
PRESENCE_TTL_S = 30.0
#: The requests' subscription is closed after this long with no request waiting.
IDLE_CLOSE_S = 5.0
#: Put in a waiting request's queue when the bus reconnected (messages may have been lost).
GAP = object()

_transports: dict[str, Transport] = {}
_sessions: dict[tuple[Path, str], ChannelSession] = {}
_lock = threading.Lock()


def topic_of(channel: str) -> str:
    return f"channel/{channel}"


class ChannelSession:
    """One joined channel for the node at ``home``."""

    def __init__(self, home: Path, name: str, *, transport: Transport | None = None,
                 bucket: Bucket | None = None) -> None:
        self.home = Path(home)
        self.name = name
        self.identity: NodeIdentity = node_identity(self.home)
        self.membership = Membership(self.home, name, bucket=bucket) if bucket is not None else membership_for(self.home, name)
        join = self.membership.pin.join
        self.bucket_uri = join.bucket
        self.transport = transport if transport is not None else shared_transport(join.transport)
        self.topic = topic_of(name)
        self._writable: Bucket | None = None
        self._router: Subscription | None = None  # the one subscription that serves waiting requests
        self._waiters: dict[str, queue.Queue[Any]] = {}
        self._router_lock = threading.Lock()
        self._idle_since = 0.0
        self._closer_due = False

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def config(self) -> ChannelConfig:
        return self.membership.config()

    @property
    def bucket(self) -> Bucket:
        """The channel's bucket, for reading (the membership reads the config through it)."""
        return self.membership.bucket

    def writable_bucket(self) -> Bucket:
        """The channel's bucket opened for writing (a provider uploads into it)."""
        if self._writable is None:
            bucket = open_bucket(self.bucket_uri)
            check_layout(bucket, write=True)
            self._writable = bucket
        return self._writable

    def send(self, type: str, body: dict[str, Any], *, request_id: str | None = None) -> Envelope:
        """Sign and publish a message; answers carry the ``request_id`` of their request."""
        env = seal(self.identity.keys, type, self.name, body, request_id=request_id)
        self.transport.publish(self.topic, env.to_bytes())
        return env

    def listen(self, handler: Callable[[Envelope], None], on_gap: GapHandler | None = None,
               gate: Gate | None = None) -> Subscription:
        """Deliver the admitted messages of other nodes to ``handler`` (on the transport's thread).

        Each subscription has a gate of its own (a gate remembers nonces: two subscriptions sharing
        one would each see a message the other saw as a replay). This node's own messages, which the
        bus echoes back, are passed over before the gate: checking them would cost a signature check
        per message sent."""
        gate = gate if gate is not None else Gate(self.name, self.membership.config)
        mine = f'"from_node":"{self.node_id}"'.encode()  # canonical JSON: no spaces

        def receive(data: bytes) -> None:
            if mine in data:
                return
            env = gate.admit(data)
            if env is not None:
                handler(env)

        return self.transport.subscribe(self.topic, receive, on_gap)

    @contextmanager
    def waiting(self, request_id: str) -> Iterator[queue.Queue[Any]]:
        """A queue that receives the answers to ``request_id`` (and :data:`GAP` after a reconnect)
        while the block runs. One subscription per session serves every request waiting at once, so
        a request costs no SUBSCRIBE; it is closed once no request has waited for
        :data:`IDLE_CLOSE_S` seconds (a script that asked once holds no connection afterwards)."""
        events: queue.Queue[Any] = queue.Queue()
        with self._router_lock:
            if self._router is None:
                self._router = self.listen(self._route, on_gap=self._gap)
            self._waiters[request_id] = events
        try:
            yield events
        finally:
            with self._router_lock:
                self._waiters.pop(request_id, None)
                if not self._waiters:
                    self._idle_since = time.monotonic()
                    if not self._closer_due:  # one timer at a time, however many requests end
                        self._closer_due = True
                        self._start_closer(IDLE_CLOSE_S)

    def _route(self, env: Envelope) -> None:
        events = self._waiters.get(env.request_id)
        if events is not None:
            events.put(env)

    def _gap(self) -> None:
        for events in list(self._waiters.values()):
            events.put(GAP)

    def _start_closer(self, delay: float) -> None:
        timer = threading.Timer(delay, self._close_if_idle)
        timer.daemon = True
        timer.start()

    def _close_if_idle(self) -> None:
        with self._router_lock:
            if self._router is None or self._waiters:
                self._closer_due = False  # the next request to end starts a timer again
                return
            idle = time.monotonic() - self._idle_since
            if idle < IDLE_CLOSE_S:  # a request came and went since: wait out the rest
                self._start_closer(IDLE_CLOSE_S - idle)
                return
            router, self._router = self._router, None
            self._closer_due = False
        router.close()

    def announce(self, info: dict[str, Any], ttl: float = PRESENCE_TTL_S) -> None:
        """Say on the bus that this node is here for ``ttl`` seconds (presence hints; the signed
        heartbeats are the proof). A daemon passes a few of its heartbeat periods, so that a node
        that died stops being present soon: another provider takes over its requests only then."""
        self.transport.announce(self.topic, self.node_id, json.dumps(info, sort_keys=True).encode(), ttl)

    def present(self, permission: str | None = None) -> dict[str, dict[str, Any]]:
        """Members announced on the bus (with ``permission``, if given), other than this node."""
        config = self.config()
        seen: dict[str, dict[str, Any]] = {}
        for node_id, raw in self.transport.present(self.topic).items():
            if node_id == self.node_id or not config.is_member(node_id):
                continue
            if permission is not None and not config.allows(node_id, permission):
                continue
            try:
                info = json.loads(raw)
            except ValueError:
                info = {}
            seen[node_id] = info if isinstance(info, dict) else {}
        return seen


def shared_transport(uri: str) -> Transport:
    """The process's transport for ``uri``, opened on first use (connections are reused)."""
    with _lock:
        transport = _transports.get(uri)
        if transport is None:
            transport = _transports[uri] = open_transport(uri)
        return transport


def session_for(home: Path, name: str) -> ChannelSession:
    """The process's session for channel ``name`` of ``home`` (made once)."""
    key = (Path(home), name)
    with _lock:
        found = _sessions.get(key)
    if found is None:
        made = ChannelSession(Path(home), name)
        with _lock:
            found = _sessions.setdefault(key, made)
    return found


def joined_channels(home: Path) -> list[str]:
    return Pins(home).names()
