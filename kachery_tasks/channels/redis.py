"""``redis://[:password@]host:port/db`` (``rediss://`` for TLS): a channel's bus on Redis pub/sub.

On the server, topic ``T`` is the pub/sub channel ``kachery:T``, and a member ``M`` present on it is
the key ``kachery:presence:T:M`` holding its info, set with ``SET ... PX ttl`` so that Redis itself
forgets a node that stops announcing. :meth:`RedisTransport.present` finds them with ``SCAN MATCH``
(``KEYS`` would block the server while it walks every key) and reads them with ``MGET``.

Every call has a timeout (``timeout``, ``connect_timeout``): a node never hangs on a dead server.
A server that cannot be reached is a :class:`~.base.TransportError`, one line naming the URI.

Subscriptions, and why they reconnect by hand. Each has its own connection and a thread reading it
with ``PubSub.get_message(timeout=poll_interval)``, so that ``close`` stops it within a poll. Left
to itself, redis-py's PubSub hides a lost connection: its retry policy reconnects inside
``get_message`` and its connect callback (``PubSub.on_connect``) subscribes again, so whatever was
published in between is lost and nobody is told. The clients here therefore never retry
(``Retry(NoBackoff(), 0)``): a lost connection is an exception in the reader thread. (Even then
PubSub's failure handler reconnects once, re-subscribing, before it raises; so the reader does not
trust that PubSub.) The reader throws it away, connects a new one with capped exponential backoff,
waits until the server confirms the SUBSCRIBE, and only then calls ``on_gap``. A connect callback of our own catches any
reconnect redis-py still makes by itself, and is handled the same way. RESP2 is asked for, since
RESP3's maintenance notifications can also mark a connection for such a silent reconnect.

A server that stops answering without closing the socket (a host gone, a NAT that forgot the
flow) leaves a subscriber waiting forever: redis-py's ``health_check_interval`` sends PINGs, but
``get_message(timeout=...)`` never checks that they were answered. The reader PINGs after
``ping_interval`` seconds of silence and counts no answer within ``timeout`` as a lost connection.

The URI the transport shows (``.uri``, errors, logs) has its password replaced by ``***``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .base import GapHandler, MessageHandler, Subscription, Transport, TransportError, check_message
from .rules import call_handler, check_announcement, check_bytes, check_topic

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "kachery:"
PRESENCE_PREFIX = "kachery:presence:"

#: First reconnect delay (seconds); it doubles per failed attempt up to ``max_backoff``.
BACKOFF_START = 0.1
#: Keys asked for per SCAN step and per MGET.
BATCH = 1000
_PING = b"kachery-ping"


class _Lost(Exception):
    """The subscription's connection is gone or silent (not a redis-py error, so raised here)."""


def presence_prefix(topic: str) -> bytes:
    return f"{PRESENCE_PREFIX}{topic}:".encode()


def _glob_escape(text: bytes) -> bytes:
    """``text`` matched literally by SCAN MATCH (a topic may contain ``*``, ``?``, ``[``)."""
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        text = text.replace(special, b"\\" + special)
    return text


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(e).__name__


def transport_error(uri: str, action: str, e: RedisError, timeout: float) -> TransportError:
    """The one-line error for redis-py's ``e`` raised while doing ``action`` on ``uri``."""
    if isinstance(e, AuthenticationError) or str(e).startswith(("NOAUTH", "WRONGPASS")):
        return TransportError(f"{uri}: the server refused the credentials ({_first_line(e)}); fix the "
                              "password in the channel's transport URI")
    if isinstance(e, RedisTimeoutError):
        return TransportError(f"{uri}: no answer within {timeout:g} s to {action}; check that redis-server "
                              "is running and reachable")
    if isinstance(e, RedisConnectionError):
        cause = e.__cause__
        if isinstance(cause, OSError) and cause.strerror:
            return TransportError(f"{uri}: cannot connect ({cause.strerror}); start redis-server or fix the "
                                  "channel's transport URI")
        return TransportError(f"{uri}: connection lost during {action} ({_first_line(e)}); check that "
                              "redis-server is running and reachable")
    if isinstance(e, ResponseError):
        return TransportError(f"{uri}: the server refused {action}: {_first_line(e)}")
    return TransportError(f"{uri}: {action} failed: {_first_line(e)}")


class RedisTransport(Transport):
    """A channel's bus on the Redis server at ``host:port``, database ``db`` (see the module docstring).

    :func:`~.uri.open_transport` parses the URI and passes its parts; ``uri`` is the URI to show.
    Options: ``timeout`` (seconds for any reply), ``connect_timeout`` (default ``timeout``),
    ``poll_interval`` (how often a subscription's thread looks up from its socket: the most that
    ``close`` waits for it), ``ping_interval`` (silence before a subscription checks its connection),
    ``max_backoff`` (the longest wait between reconnect attempts).
    """

    def __init__(self, uri: str, *, host: str, port: int = 6379, db: int = 0, username: str | None = None,
                 password: str | None = None, tls: bool = False, timeout: float = 5.0,
                 connect_timeout: float | None = None, poll_interval: float = 0.2,
                 ping_interval: float = 30.0, max_backoff: float = 5.0) -> None:
        super().__init__(uri)
        self.timeout = timeout
        self.connect_timeout = connect_timeout or timeout
        self.poll_interval = poll_interval
        self.ping_interval = ping_interval
        self.max_backoff = max_backoff
        self._client_options: dict[str, Any] = dict(
            host=host, port=port, db=db, username=username, password=password, ssl=tls,
            socket_timeout=timeout, socket_connect_timeout=self.connect_timeout,
            retry=Retry(NoBackoff(), 0), protocol=2, health_check_interval=0)
        self._client = self.new_client()

    def new_client(self) -> redis.Redis:
        """A client with its own connection pool (connects on first use)."""
        return redis.Redis(**self._client_options)

    # -- commands ----------------------------------------------------------------------------------
    def publish(self, topic: str, message: bytes) -> None:
        check_topic(self.uri, topic)
        message = check_bytes(self.uri, "message", message)
        check_message(self.uri, message)
        self._check_open()
        try:
            self._client.publish(CHANNEL_PREFIX + topic, message)
        except RedisError as e:
            raise transport_error(self.uri, "PUBLISH", e, self.timeout) from e

    def announce(self, topic: str, member: str, info: bytes, ttl: float) -> None:
        info, ttl = check_announcement(self.uri, topic, member, info, ttl)
        self._check_open()
        try:
            self._client.set(presence_prefix(topic) + member.encode(), info, px=max(1, round(ttl * 1000)))
        except RedisError as e:
            raise transport_error(self.uri, "SET", e, self.timeout) from e

    def present(self, topic: str) -> dict[str, bytes]:
        check_topic(self.uri, topic)
        self._check_open()
        prefix = presence_prefix(topic)
        try:
            # A member name has no ':', so a longer rest is a member of topic "{topic}:..." instead.
            keys = [key for key in dict.fromkeys(self._client.scan_iter(match=_glob_escape(prefix) + b"*",
                                                                        count=BATCH))
                    if b":" not in key[len(prefix):]]
            values: list[bytes | None] = []
            for i in range(0, len(keys), BATCH):
                values.extend(self._client.mget(keys[i:i + BATCH]))
        except RedisError as e:
            raise transport_error(self.uri, "SCAN", e, self.timeout) from e
        # A key that expired between SCAN and MGET reads as None: that member has just left.
        return {key[len(prefix):].decode("utf-8", "replace"): value
                for key, value in zip(keys, values, strict=True) if value is not None}

    # -- subscriptions -----------------------------------------------------------------------------
    def subscribe(self, topic: str, on_message: MessageHandler, on_gap: GapHandler | None = None) -> Subscription:
        check_topic(self.uri, topic)
        self._check_open()
        subscription = _RedisSubscription(self, topic, on_message, on_gap)
        if self._track(subscription):
            return subscription
        subscription.close()  # the transport was closed while it connected
        raise self._closed_error()

    def _release(self) -> None:
        self._client.close()


class _RedisSubscription(Subscription):
    """One topic on its own connection and thread; reconnects, then reports the gap."""

    def __init__(self, transport: RedisTransport, topic: str, on_message: MessageHandler,
                 on_gap: GapHandler | None) -> None:
        self._transport = transport
        self.topic = topic
        self._channel = (CHANNEL_PREFIX + topic).encode()
        self._on_message = on_message
        self._on_gap = on_gap
        self._closed = threading.Event()
        self._reconnected = False  # set by redis-py's connect callback: it reconnected by itself
        try:
            self._pubsub, self._client = self._connect()
        except RedisError as e:
            raise transport_error(transport.uri, "SUBSCRIBE", e, transport.timeout) from e
        self._thread = threading.Thread(target=self._run, name=f"kachery-redis-sub-{topic}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if threading.current_thread() is not self._thread:  # closed from its own handler: it ends on return
            t = self._transport
            self._thread.join(t.poll_interval + t.connect_timeout + 2 * t.timeout + 1)  # a connect under way
            if self._thread.is_alive():
                log.warning("%s: the subscription to %r did not stop within its timeouts (a handler still "
                            "running?); it will deliver nothing more", t.uri, self.topic)
        self._transport._forget(self)

    def _connect(self) -> tuple[redis.client.PubSub, redis.Redis]:
        """A new connection subscribed to the topic, returned once the server confirmed SUBSCRIBE."""
        timeout = self._transport.timeout
        client = self._transport.new_client()
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(self._channel)
            deadline = time.monotonic() + timeout
            while True:
                message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if message is not None and message["type"] == "subscribe":
                    break
                if time.monotonic() >= deadline:
                    raise RedisTimeoutError(f"no confirmation of SUBSCRIBE within {timeout:g} s")
            pubsub.connection.register_connect_callback(self._on_connect)
        except BaseException:
            _close_quietly(pubsub, client)
            raise
        return pubsub, client

    def _on_connect(self, connection: object) -> None:
        self._reconnected = True

    def _run(self) -> None:
        uri = self._transport.uri
        try:
            while not self._closed.is_set():
                try:
                    self._read()
                except Exception as e:
                    if self._closed.is_set():
                        return
                    if isinstance(e, (RedisError, _Lost)):
                        log.warning("%s: the subscription to %r lost its connection (%s); reconnecting",
                                    uri, self.topic, _first_line(e))
                    else:
                        log.exception("%s: the subscription to %r failed; reconnecting", uri, self.topic)
                    _close_quietly(self._pubsub, self._client)
                    if not self._reconnect() or self._closed.is_set():
                        return
                    log.warning("%s: the subscription to %r is back; what was published meanwhile is lost",
                                uri, self.topic)
                    if self._on_gap is not None:
                        call_handler(log, uri, self.topic, self._on_gap)
        finally:
            _close_quietly(self._pubsub, self._client)

    def _read(self) -> None:
        """Deliver messages until closed; raise when the connection is lost or silent."""
        t = self._transport
        pubsub = self._pubsub
        heard = time.monotonic()
        pinged: float | None = None
        while not self._closed.is_set():
            message = pubsub.get_message(timeout=t.poll_interval)
            if self._reconnected:
                raise _Lost("redis-py reconnected by itself")
            now = time.monotonic()
            if message is None:
                if pinged is not None and now - pinged > t.timeout:
                    raise _Lost(f"no answer to PING within {t.timeout:g} s")
                if pinged is None and now - heard >= t.ping_interval:
                    pubsub.ping(_PING)
                    pinged = now
                continue
            heard, pinged = now, None
            if message["type"] == "message" and not self._closed.is_set():
                call_handler(log, t.uri, self.topic, self._on_message, message["data"])

    def _reconnect(self) -> bool:
        """Connect again, with capped exponential backoff; False if closed meanwhile."""
        t = self._transport
        attempt = 0
        while True:
            delay = min(t.max_backoff, BACKOFF_START * 2 ** min(attempt, 30)) * random.uniform(0.5, 1.0)
            if self._closed.wait(delay):
                return False
            try:
                pubsub, client = self._connect()
            except Exception as e:
                attempt += 1
                if isinstance(e, RedisError):
                    log.debug("%s: reconnecting the subscription to %r: %s", t.uri, self.topic, _first_line(e))
                else:
                    log.exception("%s: reconnecting the subscription to %r failed", t.uri, self.topic)
                continue
            self._pubsub, self._client, self._reconnected = pubsub, client, False
            return True


def _close_quietly(pubsub: redis.client.PubSub, client: redis.Redis) -> None:
    """Drop a connection that may already be broken (closing it must not raise)."""
    for closeable in (pubsub, client):
        try:
            closeable.close()
        except Exception:  # a broken socket may fail to close; it is being discarded anyway
            pass
