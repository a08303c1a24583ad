"""Ably as a channel's transport: ``ably://`` (Ably's service) or ``ably://HOST:PORT/?tls=false``.

The seed network sent every request and status through Ably; a lab with an Ably account can run a
channel on it with the same envelopes, permissions and requests as on Redis. Built on the ``ably``
SDK (3.x, asyncio realtime; the ``[ably]`` extra), whose event loop runs in a thread of this
transport, so the rest of the channel code stays synchronous and never knows which bus it is on.

**One Ably channel per topic** (``channel/<name>``, the same name: a key's capability can be
written ``{"channel/*": ["publish", "subscribe", "presence"]}``). Envelopes are published as binary
message data under the name ``env``; they are at most :data:`MAX_MESSAGE_BYTES` (60,000), under
Ably's 64 KiB limit for a message with its name, so no envelope is ever refused for its size
(data travels through the bucket, by design).

**Authentication**, in this order: ``auth_callback`` given in Python (a function of the token
params that returns a TokenRequest, TokenDetails or token string, called again when a token
expires); the URI's ``token_url``, a kachery hub's ``/api/ably-token``, which hands this node a
token for its channels on a proof signed with the node's key (hub/ably_tokens.py), so no node holds
the Ably key; else the API key from the environment variable named by the URI's ``key_env``
(default ``ABLY_API_KEY``), never from the URI itself (the URI is in the channel's config, which
every member reads).

**Delivery**: Ably keeps a connection's messages for two minutes and resumes a dropped connection
with nothing lost. When a resume fails (the connection was gone too long, or the server lost its
state), each channel attaches again with ``resumed`` false: that is reported to the subscription's
``on_gap``, exactly as the Redis transport reports a reconnect, and the requester re-checks the
bucket. Unlike Redis pub/sub, Ably also delivers what was published during a short outage.

**Presence**: ``announce`` enters (then updates) the member on the Ably channel's presence set on
behalf of the node id, with the info and a deadline; ``present`` lists members whose deadline has
not passed (Ably itself removes the members of a connection that is gone for 15 s).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlparse

from .base import GapHandler, MessageHandler, Subscription, Transport, TransportError, check_message
from .rules import call_handler, check_announcement, check_bytes, check_topic

log = logging.getLogger(__name__)

#: How long an operation waits for Ably before it is a TransportError.
TIMEOUT_S = 15.0
#: Query parameters of an ``ably://`` URI that are SDK timing options, in milliseconds.
_TIMING_OPTIONS = ("disconnected_retry_timeout", "suspended_retry_timeout", "realtime_request_timeout",
                   "http_request_timeout", "channel_retry_timeout")
#: Ably error codes that refuse the credentials themselves (a wrong key, a revoked one, no
#: capability, an auth callback that failed): the SDK retries them forever, so connecting stops.
#: An expired token (40140-40149) is not among them: the SDK renews it through the callback.
_REFUSED = frozenset({40100, 40101, 40102, 40103, 40104, 40105, 40106, 40160, 40161, 40170, 40171, 80019})
_GAP = object()
_STOP = object()


def _one_line(uri: str, what: str, exc: BaseException) -> TransportError:
    code = getattr(exc, "code", None)
    message = str(getattr(exc, "message", "") or exc).strip().splitlines()
    text = message[0][:200] if message else type(exc).__name__
    if code in (40160, 40161):
        hint = "; the key or token lacks the capability (give it publish, subscribe and presence on channel/*)"
    elif code in (40101, 40102, 40103, 40400, 40005):
        hint = "; check the API key (the variable the URI's key_env names, default ABLY_API_KEY)"
    elif code == 40009:
        hint = "; the message is over Ably's size limit"
    else:
        hint = ""
    return TransportError(f"{uri}: {what}: {text}" + (f" (Ably error {code})" if code else "") + hint)


class AblyTransport(Transport):
    """A channel transport over Ably (module doc). ``key`` and ``auth_callback`` override the
    environment; ``options``: further keyword arguments of ``AblyRealtime``."""

    def __init__(self, uri: str, *, key: str | None = None, auth_callback: Callable[[Any], Any] | None = None,
                 options: dict[str, Any] | None = None, timeout: float = TIMEOUT_S) -> None:
        super().__init__(uri)
        try:
            import ably  # noqa: F401 - the [ably] extra
        except ImportError:
            raise TransportError(f"{uri}: the Ably transport needs its extra: pip install 'kachery-tasks[ably]'") from None
        self.timeout = timeout
        self._auth_error: Exception | None = None
        opts = _options_from_uri(uri)
        key_env = opts.pop("key_env")
        token_url = opts.pop("token_url", None)
        key = key or os.environ.get(key_env)
        if auth_callback is None and token_url:
            auth_callback = _hub_tokens(token_url)
        if auth_callback is not None:
            opts["auth_callback"] = self._async_callback(auth_callback)
        elif key:
            opts["key"] = key
        else:
            raise TransportError(f"{uri}: no Ably credentials: set {key_env} to the app's API key (or give "
                                 "the transport an auth_callback for token auth)")
        opts.update(options or {})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kachery-ably", daemon=True)
        self._thread.start()
        self._entered: set[tuple[str, str]] = set()
        try:
            self._client = self._call(self._connect(opts), "connect")
        except BaseException:
            self._stop_loop()
            raise

    # -- the loop ----------------------------------------------------------------------------------
    def _call(self, coro: Any, what: str) -> Any:
        """Run ``coro`` on the transport's loop; an Ably failure or a timeout is one line."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:  # the builtin TimeoutError from Python 3.11 on, not on 3.10
            future.cancel()
            raise TransportError(f"{self.uri}: {what}: no answer from Ably in {self.timeout:g} s") from None
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001 - AblyException, websockets' errors: one line each
            raise _one_line(self.uri, what, exc) from None

    def _async_callback(self, callback: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def run(params: Any) -> Any:  # the SDK awaits it; the user's function may block
            try:
                return await self._loop.run_in_executor(None, callback, params)
            except Exception as exc:
                self._auth_error = exc  # the SDK reports only "authentication provider request failed"
                raise
        return run

    async def _connect(self, opts: dict[str, Any]) -> Any:
        """A connected client; refused credentials fail at once (the SDK would retry them forever)."""
        from ably import AblyRealtime
        from ably.types.connectionstate import ConnectionState

        client = AblyRealtime(**opts)
        outcome: asyncio.Future = asyncio.get_running_loop().create_future()

        def watch(change: Any) -> None:
            reason = getattr(change, "reason", None)
            if outcome.done():
                return
            if change.current == ConnectionState.CONNECTED:
                outcome.set_result(None)
            elif change.current == ConnectionState.FAILED or getattr(reason, "code", None) in _REFUSED:
                outcome.set_exception(reason or TransportError(f"{self.uri}: the connection failed"))

        client.connection.on(watch)
        try:
            if client.connection.state != ConnectionState.CONNECTED:
                await asyncio.wait_for(outcome, self.timeout * 0.9)
        except BaseException:
            await client.close()
            if self._auth_error is not None:  # say what the token source said, not the SDK's summary
                lines = str(self._auth_error).strip().splitlines() or [type(self._auth_error).__name__]
                raise TransportError(f"{self.uri}: no Ably token: {lines[0][:200]}") from None
            raise
        finally:
            client.connection.off(watch)
        return client

    def _stop_loop(self) -> None:
        """Cancel what the SDK left scheduled (its timers), then stop and close the loop."""
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(5)
        except Exception as exc:  # noqa: BLE001 - closing: what could not be cancelled is logged
            log.debug("%s: cancelling the SDK's tasks: %s", self.uri, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    # -- the protocol --------------------------------------------------------------------------------
    def publish(self, topic: str, message: bytes) -> None:
        check_topic(self.uri, topic)
        message = check_bytes(self.uri, "message", message)
        check_message(self.uri, message)
        self._check_open()
        self._call(self._publish(topic, message), f"publish to {topic!r}")

    async def _publish(self, topic: str, message: bytes) -> None:
        """Publish and wait for Ably's ACK. When the socket closes under the send (a token renewal,
        a dropped connection the SDK has not noticed yet), the SDK has already queued the message
        and sends it again on the next connection (RTN19a); publishing it again here would deliver
        it twice, so this waits for the connection to be back instead."""
        from ably import AblyException

        try:
            await self._client.channels.get(topic).publish("env", message)
        except AblyException:
            raise
        except Exception as exc:  # noqa: BLE001 - websockets' ConnectionClosed, raised by the SDK's send
            log.debug("%s: the connection closed under a publish to %r (%s); the SDK sends it again",
                      self.uri, topic, type(exc).__name__)
            await self._until_connected()

    async def _until_connected(self) -> None:
        """Back once the connection is; a TransportError if it is not within the timeout (the
        message may then be lost with the SDK's queue: the caller must know)."""
        from ably.types.connectionstate import ConnectionState

        deadline = time.monotonic() + self.timeout * 0.9
        while self._client.connection.state != ConnectionState.CONNECTED:
            if time.monotonic() > deadline:
                raise TransportError(f"{self.uri}: the connection to Ably did not come back within "
                                     f"{self.timeout * 0.9:g} s; the message may not have been sent")
            await asyncio.sleep(0.05)

    def subscribe(self, topic: str, on_message: MessageHandler, on_gap: GapHandler | None = None) -> Subscription:
        check_topic(self.uri, topic)
        self._check_open()
        subscription = _AblySubscription(self, topic, on_message, on_gap)
        self._call(subscription.start(), f"subscribe to {topic!r}")
        if not self._track(subscription):
            subscription.close()
            raise self._closed_error()
        return subscription

    def announce(self, topic: str, member: str, info: bytes, ttl: float) -> None:
        info, ttl = check_announcement(self.uri, topic, member, info, ttl)
        self._check_open()
        data = {"info": base64.b64encode(info).decode(), "until": time.time() + ttl}
        entered = (topic, member) in self._entered
        self._call(self._announce(topic, member, data, entered), f"presence on {topic!r}")
        self._entered.add((topic, member))

    async def _announce(self, topic: str, member: str, data: dict[str, Any], entered: bool) -> None:
        presence = self._client.channels.get(topic).presence  # the SDK's objects, on its own loop
        await (presence.update_client(member, data) if entered else presence.enter_client(member, data))

    def present(self, topic: str) -> dict[str, bytes]:
        check_topic(self.uri, topic)
        self._check_open()
        members = self._call(self._members(topic), f"presence of {topic!r}")
        now = time.time()
        found: dict[str, bytes] = {}
        for message in members:
            data = message.data
            if isinstance(data, str):
                try:
                    data = json.loads(data)
                except ValueError:
                    continue
            if not isinstance(data, dict) or not isinstance(data.get("until"), int | float) or data["until"] <= now:
                continue
            try:
                found[str(message.client_id)] = base64.b64decode(str(data.get("info", "")))
            except ValueError:
                continue
        return found

    async def _members(self, topic: str) -> list[Any]:
        return await self._client.channels.get(topic).presence.get()

    def _last_reader(self, subscription: _AblySubscription) -> bool:
        """Whether ``subscription`` is the last open one of its topic, with no presence entered
        there: its Ably channel may then be detached (no more of its traffic on this connection)."""
        with self._lock:
            others = [s for s in self._subscriptions
                      if s is not subscription and getattr(s, "topic", None) == subscription.topic]
        return not others and not any(t == subscription.topic for t, _ in self._entered)

    def _release(self) -> None:
        if not self._thread.is_alive():
            return  # closed before
        try:
            self._call(self._client.close(), "close")
        except TransportError as exc:
            log.debug("%s", exc)
        self._stop_loop()


class _AblySubscription(Subscription):
    """Messages of one Ably channel handed to ``on_message`` on a thread of their own, in order (a
    handler may block; the SDK's loop must not); a lost continuity handed to ``on_gap``."""

    def __init__(self, transport: AblyTransport, topic: str, on_message: MessageHandler,
                 on_gap: GapHandler | None) -> None:
        self._transport = transport
        self.topic = topic
        self._on_message = on_message
        self._on_gap = on_gap
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._attached_once = False
        self._channel: Any = None
        self._thread = threading.Thread(target=self._dispatch, name=f"kachery-ably-{topic}", daemon=True)
        self._thread.start()

    async def start(self) -> None:
        self._channel = self._transport._client.channels.get(self.topic)
        self._channel.on("attached", self._on_attached)
        self._channel.on("update", self._on_update)
        await self._channel.subscribe(self._on_ably_message)
        self._attached_once = True

    def _on_ably_message(self, message: Any) -> None:
        data = message.data
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, bytes | bytearray) and not self._closed.is_set():
            self._queue.put(bytes(data))

    def _on_attached(self, change: Any) -> None:
        # the first attach is the subscription starting; after it, an attach that did not resume
        # is a continuity lost (a failed resume, a suspended connection)
        if self._attached_once and not getattr(change, "resumed", True):
            self._queue.put(_GAP)

    def _on_update(self, change: Any) -> None:
        if not getattr(change, "resumed", True):
            self._queue.put(_GAP)

    def _dispatch(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._closed.is_set():
                return
            if item is _GAP:
                if self._on_gap is not None:
                    log.info("%s: continuity of %r lost (Ably did not resume); the requester re-checks the bucket",
                             self._transport.uri, self.topic)
                    call_handler(log, self._transport.uri, self.topic, self._on_gap)
                continue
            call_handler(log, self._transport.uri, self.topic, self._on_message, item)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(_STOP)
        channel = self._channel
        if channel is not None and not self._transport._loop.is_closed():
            detach = self._transport._last_reader(self)

            def stop() -> None:
                channel.unsubscribe(self._on_ably_message)
                channel.off("attached", self._on_attached)
                channel.off("update", self._on_update)
                if detach:  # nobody here reads the topic any more: stop its traffic to this connection
                    asyncio.ensure_future(_quietly(channel.detach()))
            try:
                self._transport._loop.call_soon_threadsafe(stop)
            except RuntimeError:
                pass  # the loop already stopped
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        self._transport._forget(self)


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception as exc:  # noqa: BLE001 - a detach that fails leaves traffic, nothing wrong
        log.debug("detach: %s", exc)


def _options_from_uri(uri: str) -> dict[str, Any]:
    """``AblyRealtime`` options from ``ably://[HOST[:PORT]]/[?tls=…&binary=…&key_env=…&<timing>=ms]``."""
    parsed = urlparse(uri)
    if parsed.scheme != "ably":
        raise TransportError(f"{uri}: not an ably:// URI")
    query = dict(parse_qsl(parsed.query))
    unknown = set(query) - {"tls", "binary", "key_env", "token_url", *_TIMING_OPTIONS}
    if unknown:
        raise TransportError(f"{uri}: unknown option(s) {', '.join(sorted(unknown))} (known: tls, binary, key_env, "
                             f"token_url, {', '.join(_TIMING_OPTIONS)})")
    opts: dict[str, Any] = {"key_env": query.get("key_env", "ABLY_API_KEY"),
                            "use_binary_protocol": _flag(uri, query, "binary", True), "auto_connect": True}
    if "token_url" in query:
        if not query["token_url"].startswith(("http://", "https://")):
            raise TransportError(f"{uri}: token_url is a hub's http(s) URL, not {query['token_url']!r}")
        opts["token_url"] = query["token_url"]
    tls = _flag(uri, query, "tls", True)
    if parsed.hostname:
        port = parsed.port or (443 if tls else 80)
        # the SDK joins host and port itself for REST, but not for the realtime URL: a trailing
        # slash after HOST:PORT gives both a valid base (ably-python issue 567)
        opts.update(endpoint=f"{parsed.hostname}:{port}/", tls=tls, fallback_hosts=[])
        opts["tls_port" if tls else "port"] = port
    for name in _TIMING_OPTIONS:
        if name in query:
            try:
                opts[name] = int(query[name])
            except ValueError:
                raise TransportError(f"{uri}: {name} takes milliseconds, not {query[name]!r}") from None
    return opts


def _hub_tokens(token_url: str) -> Callable[[Any], Any]:
    """An auth callback that asks a kachery hub for a token, proving this node (the home in force)
    holds its key by signing a fresh challenge."""

    def callback(_params: Any) -> Any:
        from .. import config
        from ..errors import UserError
        from ..identity import node_identity
        from ..identity.proofs import prove, timed_challenge
        from ..jsonhttp import call_json

        proof = prove(node_identity(config.home()), timed_challenge("ably-token"))
        try:
            return call_json(token_url, "POST", {"proof": proof}, timeout=TIMEOUT_S)
        except UserError as exc:
            raise TransportError(f"no Ably token from {token_url}: {exc}") from None

    return callback


def _flag(uri: str, query: dict[str, str], name: str, default: bool) -> bool:
    value = query.get(name)
    if value is None:
        return default
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise TransportError(f"{uri}: {name} takes true or false, not {value!r}")
