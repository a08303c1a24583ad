"""The Transport protocol: the message bus of a channel (requests and statuses; data goes through the bucket).

A transport moves small byte strings (signed envelopes, see :mod:`.envelope`) between the nodes of a
channel. It is deliberately weak, so that every implementation can keep its promises:

- **At most once.** A message published while a subscriber is away (Redis pub/sub during a
  reconnect, Ably after a lost resume) is lost. The transport says when that may have happened by
  calling the subscription's ``on_gap``; the layers above make every request idempotent (keyed by
  its request id) and put answers in the bucket, so after a gap a requester re-checks the bucket and
  a lost message costs time, never a wrong answer.
- **Unauthenticated.** Anyone who can reach the bus can publish. Integrity, membership, permission
  and replay protection come from the envelope's signature and checks, never from the transport.
- **Callbacks on the transport's threads.** ``on_message`` runs on a thread the transport owns, one
  message at a time per subscription, in the order the bus delivered them; it must not block for
  long (hand work to a pool). An exception in it is logged and the subscription goes on.
- **Presence by heartbeat.** ``announce`` says "this node is here" for ``ttl`` seconds; ``present``
  lists who announced within their ttl. A node that dies simply stops being present.

One file per implementation: ``memory.py`` (``memory://NAME``: one process, for tests and
single-process use) and ``redis.py`` (``redis://host:port/db`` on redis-py). :func:`open_transport`
in :mod:`.uri` picks one by the URI's scheme.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

from ..errors import UserError

MessageHandler = Callable[[bytes], None]
GapHandler = Callable[[], None]

#: The largest message a transport must carry. Envelopes are far smaller (ids, sizes, statuses); the
#: bound is Ably's 64 KB message limit less room for its own fields, so that a channel that works
#: on one transport works on every other.
MAX_MESSAGE_BYTES = 60_000


class TransportError(UserError):
    """The bus cannot be reached or refused an operation; one line naming the transport URI."""


class MessageTooLarge(ValueError):
    """A message over :data:`MAX_MESSAGE_BYTES`: data belongs in the bucket, not on the bus."""


class Subscription(ABC):
    """A live subscription to one topic; :meth:`close` stops delivery (idempotent)."""

    @abstractmethod
    def close(self) -> None: ...


class Transport(ABC):
    """A publish/subscribe bus with presence, opened by URI.

    The bookkeeping every implementation shares lives here: the subscriptions it opened (closed
    with it: :meth:`_track`, :meth:`_forget`) and the closed state (:meth:`_check_open`)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    @abstractmethod
    def publish(self, topic: str, message: bytes) -> None:
        """Send ``message`` to every current subscriber of ``topic`` (at most once each).

        Raises :class:`MessageTooLarge` over :data:`MAX_MESSAGE_BYTES` and :class:`TransportError`
        when the bus cannot be reached."""

    @abstractmethod
    def subscribe(self, topic: str, on_message: MessageHandler, on_gap: GapHandler | None = None) -> Subscription:
        """Deliver every message published to ``topic`` from now on to ``on_message``.

        The subscription is active when this returns: a message published afterwards reaches it
        unless the bus loses it, and then ``on_gap`` is called once the subscription is back."""

    @abstractmethod
    def announce(self, topic: str, member: str, info: bytes, ttl: float) -> None:
        """Record that ``member`` is present on ``topic`` for the next ``ttl`` seconds, with ``info``."""

    @abstractmethod
    def present(self, topic: str) -> dict[str, bytes]:
        """The members announced on ``topic`` whose ttl has not run out, with their latest info.
        Another node's announcement is seen once the bus has carried it (at once on Redis; within
        milliseconds on Ably, which sends presence to each connection)."""

    def close(self) -> None:
        """Stop every subscription and release connections (idempotent)."""
        with self._lock:
            self._closed = True
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.close()
        self._release()

    def _release(self) -> None:  # noqa: B027 - a hook: an in-process bus holds nothing to release
        """Release what the implementation holds (connections), once its subscriptions are closed."""

    def _track(self, subscription: Subscription) -> bool:
        """Keep ``subscription`` to close with the transport; False if the transport was closed
        meanwhile (the caller closes the subscription and raises :meth:`_closed_error`)."""
        with self._lock:
            if self._closed:
                return False
            self._subscriptions.add(subscription)
            return True

    def _forget(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> TransportError:
        return TransportError(f"{self.uri}: this transport was closed; open the channel's transport again")

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def check_message(uri: str, message: bytes) -> None:
    """Raise :class:`MessageTooLarge` for a message no transport may carry (one rule for all)."""
    if len(message) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"{uri}: a {len(message)}-byte message is over the {MAX_MESSAGE_BYTES}-byte "
                              "limit; put the data in the bucket and send its key")
