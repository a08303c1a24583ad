"""``memory://NAME``: a bus inside one process, for tests and single-process use.

Every transport opened on the same NAME in a process shares one bus (a process-wide registry), so
several nodes in one test talk as they would over Redis. The bus keeps the promises of
:mod:`.base` the same way the network transports do, so that code tested here behaves there:

- ``publish`` never calls a handler itself. Each subscription has its own queue and dispatcher
  thread; a handler that publishes (even to its own topic) neither deadlocks nor recurses.
- A subscription whose handler falls behind by ``max_queue`` messages loses the newest ones and
  gets ``on_gap`` once it has caught up, as a slow Redis subscriber is cut off by the server and
  reconnects; memory is never unbounded.
- Presence expires on :func:`time.monotonic`. A bus lives as long as the process (announcements
  outlive the transport that made them, as they do in Redis until their ttl).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from .base import GapHandler, MessageHandler, Subscription, Transport, check_message
from .rules import call_handler, check_announcement, check_bytes, check_topic

log = logging.getLogger(__name__)

#: How long ``close`` waits for a dispatcher busy in a handler before giving up on it (it then
#: delivers nothing more: it checks for the close before every message).
JOIN_TIMEOUT = 10.0


class _Bus:
    """Subscribers and presence of one NAME; every field is guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.subscribers: dict[str, set[_MemorySubscription]] = {}
        self.presence: dict[str, dict[str, tuple[bytes, float]]] = {}


_buses: dict[str, _Bus] = {}
_buses_lock = threading.Lock()


def _bus(name: str) -> _Bus:
    with _buses_lock:
        return _buses.setdefault(name, _Bus())


_STOP = object()


class _MemorySubscription(Subscription):
    def __init__(self, transport: MemoryTransport, topic: str, on_message: MessageHandler,
                 on_gap: GapHandler | None, max_queue: int) -> None:
        self._transport = transport
        self.topic = topic
        self._on_message = on_message
        self._on_gap = on_gap
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._lost = False  # a message was dropped on a full queue; on_gap when caught up
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kachery-memory-sub-{topic}", daemon=True)
        self._thread.start()

    def offer(self, message: bytes) -> None:
        """Queue ``message`` (called by publish, under the bus lock; never blocks)."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._lost = True

    def _run(self) -> None:
        uri = self._transport.uri
        while True:
            item = self._queue.get()
            if self._closed.is_set() or item is _STOP:
                return
            call_handler(log, uri, self.topic, self._on_message, item)
            if self._lost and self._queue.empty():
                self._lost = False
                if self._on_gap is not None and not self._closed.is_set():
                    call_handler(log, uri, self.topic, self._on_gap)

    def close(self) -> None:
        bus = self._transport._bus
        with bus.lock:
            subscribers = bus.subscribers.get(self.topic, set())
            subscribers.discard(self)
            if not subscribers:
                bus.subscribers.pop(self.topic, None)
        self._closed.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass  # the dispatcher is not waiting; it sees _closed before its next message
        if threading.current_thread() is not self._thread:  # closed from its own handler: it ends on return
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.warning("%s: a handler of topic %r is still running %.0f s after close; it will "
                            "get no more messages", self._transport.uri, self.topic, JOIN_TIMEOUT)
        self._transport._forget(self)


class MemoryTransport(Transport):
    """The bus named by ``memory://NAME`` in this process (see the module docstring)."""

    def __init__(self, uri: str, *, max_queue: int = 10_000) -> None:
        super().__init__(uri)
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"{uri}: max_queue is a number of messages (1 or more), not {max_queue!r}")
        self._bus = _bus(uri.partition("://")[2])
        self._max_queue = max_queue

    def publish(self, topic: str, message: bytes) -> None:
        check_topic(self.uri, topic)
        message = check_bytes(self.uri, "message", message)
        check_message(self.uri, message)
        self._check_open()
        with self._bus.lock:  # one order for every subscriber of the bus
            for subscription in self._bus.subscribers.get(topic, ()):
                subscription.offer(message)

    def subscribe(self, topic: str, on_message: MessageHandler, on_gap: GapHandler | None = None) -> Subscription:
        check_topic(self.uri, topic)
        self._check_open()
        subscription = _MemorySubscription(self, topic, on_message, on_gap, self._max_queue)
        if not self._track(subscription):
            subscription.close()
            raise self._closed_error()
        with self._bus.lock:
            self._bus.subscribers.setdefault(topic, set()).add(subscription)
        return subscription

    def announce(self, topic: str, member: str, info: bytes, ttl: float) -> None:
        info, ttl = check_announcement(self.uri, topic, member, info, ttl)
        self._check_open()
        with self._bus.lock:
            self._bus.presence.setdefault(topic, {})[member] = (info, time.monotonic() + ttl)

    def present(self, topic: str) -> dict[str, bytes]:
        check_topic(self.uri, topic)
        self._check_open()
        now = time.monotonic()
        with self._bus.lock:
            members = self._bus.presence.get(topic, {})
            for member in [m for m, (_, expiry) in members.items() if expiry <= now]:
                del members[member]
            return {member: info for member, (info, _) in members.items()}

