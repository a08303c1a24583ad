"""A local stand-in for Ably's realtime service, spoken to by the unmodified ``ably`` SDK (3.x).

Pytest plugin (registered in conftest.py) and a plain module: ``AblyStandin`` is one asyncio server
(a raw ASGI app under uvicorn) that answers both the realtime WebSocket protocol and the few REST
calls the SDK makes, on one 127.0.0.1 port. It was written against the source of ably-python 3.1.4
(``ably/transport/websockettransport.py``, ``ably/realtime/connectionmanager.py``,
``ably/realtime/channel.py``, ``ably/realtime/presence.py``, ``ably/rest/auth.py``) and speaks what
that source sends and expects; it is not a full Ably.

Pointing the SDK at it (``client_options()``): ably 3.x folds ``rest_host``/``realtime_host`` into one
``endpoint`` (``ably/types/options.py``: rest_host wins over realtime_host), then builds
``ws://{host}?{query}`` for realtime (no port: ably-python issue 567) and ``http://{host}:{port}`` +
path for REST. ``endpoint="127.0.0.1:PORT/"`` with ``port=PORT`` satisfies both: the realtime URL is
``ws://127.0.0.1:PORT/?...`` and the REST base ``http://127.0.0.1:PORT/:PORT`` loses its bogus path
to ``urljoin(base, "/time")``.

Realtime protocol (numeric actions as in ``ProtocolMessageAction``):

- connect by key (``key=name:secret``) or token (``accessToken=``), ``format`` json|msgpack, ``echo``,
  ``clientId``, ``resume=<connectionKey>``; CONNECTED carries connectionId, connectionKey and
  connectionDetails (maxMessageSize, connectionStateTtl, maxIdleInterval, clientId). Bad
  credentials: ERROR 40101; unknown token 40140, expired token 40142 (token errors: the SDK renews
  through its auth_callback and reconnects).
- HEARTBEAT both ways (the server sends one every ``heartbeat_interval`` s, echoes the client's id).
- ATTACH/ATTACHED with mode flags from the capability, RESUMED when the connection kept the
  attachment (a resumed connection, an in-band re-auth), HAS_PRESENCE + a one-page SYNC;
  DETACH/DETACHED (the connection's presence members leave); ATTACH without any capability on the
  channel: channel ERROR 40160.
- MESSAGE: ACK/NACK by msgSerial (a resent serial is acknowledged, not published twice), NACK 40160
  without ``publish``, 40009 over ``max_message_size``, 40012 for a foreign clientId; fan-out to
  every connection attached with ``subscribe`` (the sender only if its ``echo`` is not false).
- PRESENCE enter/update/leave (needs ``presence``), broadcast to attached connections; members of a
  connection that drops leave after ``presence_timeout`` s unless it resumes; CLOSE/CLOSED (members
  leave at once).
- Resume: a connection whose transport went away keeps its state for ``connection_state_ttl`` ms and
  queues what it should have received; ``resume=<key>`` gets the same connectionId, the queued
  messages, and ATTACHED with RESUMED. ``lose_resume()`` makes every connection now known fail to
  resume: CONNECTED with a new connectionId and error 80008, ATTACHED without RESUMED.
- AUTH: an in-band token from the client (``auth.authorize()``) answered by CONNECTED; the server
  can ask for one (``request_reauth()``).

Hooks for tests (callable from the test's thread): ``drop_connections(refuse_for=0)`` (close every
socket without DISCONNECTED; optionally refuse upgrades for a while: an outage), ``lose_resume()``,
``expire_tokens()``, ``request_reauth()``, ``break_continuity(channel)`` (unsolicited ATTACHED
without RESUMED: the SDK's channel ``update`` event), ``issue_token()``, ``add_key()``,
``presence_members()``; settable ``max_message_size``, ``heartbeat_interval``, ``max_idle_interval``,
``presence_timeout``; ``counters`` (a Counter of what it saw: ``recv:<ACTION>``, ``acks``,
``nack:<code>``, ``resumed``, ``resume_failed``, ``backlogged``, ``tokens_issued``, ...) and
``received`` (every protocol message, decoded).

How the SDK (3.1.4) shows what happens, found while proving this server:

- after any reconnect (resumed or not) and after an in-band AUTH it re-sends ATTACH for every
  attached channel (``Channels._on_connected``), so a lost resume is a channel ``attached`` event
  (previous ``attaching``) with ``ChannelStateChange.resumed is False``, plus the connection's
  ``connected`` state change with ``reason.code == 80008`` and a new
  ``connection.connection_manager.connection_id``; a successful resume is the same event with
  ``resumed is True``. The ``update`` event (RTL12) only comes from an ATTACHED while already attached.
- on DISCONNECTED 40142 it awaits ``auth_callback`` with ``connection.state`` still CONNECTED and the
  transport already disposed (``ConnectionManager.on_disconnected``): a publish in that window raises
  ``websockets.exceptions.ConnectionClosedOK``, not an AblyException.
- it refuses messages over 65536 bytes itself (``validate_message_size``, 40009) and ignores
  ``maxMessageSize`` from CONNECTED, so the server's own 40009 shows only below that (set
  ``max_message_size``).
- basic (key) auth over REST without TLS is refused by the SDK (40103, ``ably/http/http.py``): REST
  clients here use tokens (``use_token_auth=True`` with the key signs TokenRequests locally).

REST: ``GET /time``, ``POST /keys/<keyName>/requestToken`` (TokenRequest checked: HMAC-SHA256 of the
key secret as in ``TokenRequest.sign_request``, timestamp within 10 min, nonce not replayed, key
capability intersected), ``POST /channels/<name>/messages``, ``GET /channels/<name>/presence``.
Bodies and answers in JSON or msgpack (by Content-Type / Accept). Errors as Ably's
``{"error": {"message", "code", "statusCode"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import msgpack
import pytest

# ProtocolMessageAction in ably/transport/websockettransport.py
HEARTBEAT, ACK, NACK, CONNECT, CONNECTED, DISCONNECT, DISCONNECTED, CLOSE, CLOSED, ERROR = range(10)
ATTACH, ATTACHED, DETACH, DETACHED, PRESENCE, MESSAGE, SYNC, AUTH = range(10, 18)
ACTION_NAMES = {v: k for k, v in dict(
    HEARTBEAT=0, ACK=1, NACK=2, CONNECT=3, CONNECTED=4, DISCONNECT=5, DISCONNECTED=6, CLOSE=7,
    CLOSED=8, ERROR=9, ATTACH=10, ATTACHED=11, DETACH=12, DETACHED=13, PRESENCE=14, MESSAGE=15,
    SYNC=16, AUTH=17).items()}

# ably/types/flags.py
FLAG_HAS_PRESENCE = 1 << 0
FLAG_RESUMED = 1 << 2
MODE_PRESENCE, MODE_PUBLISH, MODE_SUBSCRIBE, MODE_PRESENCE_SUBSCRIBE = 1 << 16, 1 << 17, 1 << 18, 1 << 19

# PresenceAction in ably/types/presence.py
P_ABSENT, P_PRESENT, P_ENTER, P_LEAVE, P_UPDATE = range(5)

ALL_OPS = frozenset({"publish", "subscribe", "presence", "history", "channel-metadata",
                     "push-subscribe", "push-admin", "stats", "privileged-headers"})
FULL_CAPABILITY = {"*": ["*"]}
NO_PUBLISH_CAPABILITY = {"*": ["subscribe", "presence", "history"]}


def now_ms() -> int:
    return int(time.time() * 1000)


def error(message: str, code: int, status: int) -> dict:
    return {"message": message, "code": code, "statusCode": status}


def ops_for(capability: dict[str, list[str]], channel: str) -> set[str]:
    """The operations ``capability`` grants on ``channel`` (resources are globs, ``*`` = all ops)."""
    ops: set[str] = set()
    for resource, granted in capability.items():
        if resource == "*" or fnmatch.fnmatchcase(channel, resource):
            ops |= ALL_OPS if "*" in granted else set(granted)
    return ops


def intersect_capability(key_cap: dict[str, list[str]], requested: dict[str, list[str]]) -> dict:
    """A token's capability: what is asked, as far as the key grants it (by resource name)."""
    out: dict[str, list[str]] = {}
    for resource, wanted in requested.items():
        allowed = ops_for(key_cap, resource) if resource != "*" else (
            ALL_OPS if "*" in key_cap.get("*", []) else set(key_cap.get("*", [])))
        got = allowed if "*" in wanted else allowed & set(wanted)
        if got:
            out[resource] = ["*"] if got >= ALL_OPS else sorted(got)
    return out


def sign_token_request(secret: str, tr: dict) -> str:
    """The mac of a TokenRequest, as ``ably.types.tokenrequest.TokenRequest.sign_request`` makes it."""
    text = "\n".join(str(x) for x in [tr.get("keyName") or "", tr.get("ttl") or "", tr.get("capability") or "",
                                       tr.get("clientId") or "", f"{tr.get('timestamp') or 0}",
                                       tr.get("nonce") or "", ""])
    return base64.b64encode(hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()).decode()


def message_size(msg: dict) -> int:
    """Ably's message size: name + clientId + extras (JSON) + data (decoded bytes / utf-8)."""
    size = 0
    for name in ("name", "clientId"):
        if isinstance(msg.get(name), str):
            size += len(msg[name].encode())
    if msg.get("extras") is not None:
        size += len(json.dumps(msg["extras"]).encode())
    data = msg.get("data")
    if isinstance(data, (bytes, bytearray)):
        size += len(data)
    elif isinstance(data, str):
        if (msg.get("encoding") or "").endswith("base64"):
            try:
                size += len(base64.b64decode(data))
            except (binascii.Error, ValueError):
                size += len(data.encode())
        else:
            size += len(data.encode())
    elif data is not None:
        size += len(json.dumps(data).encode())
    return size


def _json_item(item: dict) -> dict:
    data = item.get("data")
    if isinstance(data, (bytes, bytearray)):
        enc = item.get("encoding") or ""
        item = {**item, "data": base64.b64encode(data).decode(), "encoding": f"{enc}/base64" if enc else "base64"}
    return item


def encode_frame(pm: dict, fmt: str) -> bytes | str:
    if fmt == "msgpack":
        return msgpack.packb(pm, use_bin_type=True)
    out = dict(pm)
    for list_name in ("messages", "presence"):
        if out.get(list_name):
            out[list_name] = [_json_item(m) for m in out[list_name]]
    return json.dumps(out, default=lambda o: base64.b64encode(o).decode() if isinstance(o, bytes) else str(o))


@dataclass
class Key:
    name: str  # appId.keyId
    secret: str
    capability: dict[str, list[str]]

    @property
    def full(self) -> str:
        return f"{self.name}:{self.secret}"


@dataclass
class Token:
    token: str
    key: Key
    capability: dict[str, list[str]]
    client_id: str | None
    issued: int
    expires: int

    def details(self) -> dict:
        return {"token": self.token, "keyName": self.key.name, "issued": self.issued, "expires": self.expires,
                "capability": json.dumps(self.capability), "clientId": self.client_id}


class AuthError(Exception):
    def __init__(self, message: str, code: int, status: int = 401):
        super().__init__(message)
        self.error = error(message, code, status)


class Transport:
    """One WebSocket: an outgoing queue drained by a writer task (sends never interleave)."""

    def __init__(self, send, fmt: str):
        self._send = send
        self.format = fmt
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.writer = asyncio.get_running_loop().create_task(self._write())

    def put(self, pm: dict) -> None:
        if not self.closed:
            self.queue.put_nowait(pm)

    def close(self, code: int = 1000, delay: float = 0.0) -> None:
        """Close after what is queued (and ``delay`` s); nothing queued later is sent."""
        if not self.closed:
            self.queue.put_nowait(("close", code, delay))
            self.closed = True

    async def _write(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, tuple):
                    if item[2]:
                        await asyncio.sleep(item[2])
                    await self._send({"type": "websocket.close", "code": item[1]})
                    return
                frame = encode_frame(item, self.format)
                key = "bytes" if isinstance(frame, bytes) else "text"
                await self._send({"type": "websocket.send", key: frame})
        except Exception:  # the peer went away: the reader sees the disconnect
            self.closed = True


@dataclass(eq=False)
class Conn:
    id: str
    key: str  # connectionKey
    api_key: Key
    token: Token | None
    client_id: str | None
    echo: bool
    transport: Transport | None = None
    channels: set[str] = field(default_factory=set)
    backlog: list[dict] = field(default_factory=list)
    last_serial: int = -1
    lost: bool = False  # lose_resume(): a resume of this connection fails
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    @property
    def capability(self) -> dict[str, list[str]]:
        return self.token.capability if self.token else self.api_key.capability

    def cancel_timers(self) -> None:
        for t in self.timers:
            t.cancel()
        self.timers.clear()


@dataclass
class Channel:
    name: str
    serial: int = 0
    attached: dict[str, Conn] = field(default_factory=dict)
    presence: dict[tuple[str, str], dict] = field(default_factory=dict)

    def next_serial(self) -> str:
        self.serial += 1
        return f"{self.name}@{self.serial}"


class AblyStandin:
    """The server's state and protocol. Run it with ``start()`` (a thread with its own loop)."""

    def __init__(self, *, keys: list[Key] | None = None, max_message_size: int = 65536,
                 connection_state_ttl: int = 120_000, max_idle_interval: int = 15_000,
                 heartbeat_interval: float = 5.0, presence_timeout: float = 1.0, backlog_limit: int = 1000):
        app = "standinApp"
        self.key = Key(f"{app}.fullKey", secrets.token_urlsafe(12), FULL_CAPABILITY)
        self.key_no_publish = Key(f"{app}.noPublish", secrets.token_urlsafe(12), NO_PUBLISH_CAPABILITY)
        self.keys: dict[str, Key] = {k.name: k for k in [self.key, self.key_no_publish, *(keys or [])]}
        self.max_message_size = max_message_size
        self.connection_state_ttl = connection_state_ttl
        self.max_idle_interval = max_idle_interval
        self.heartbeat_interval = heartbeat_interval
        self.presence_timeout = presence_timeout
        self.backlog_limit = backlog_limit
        self.tokens: dict[str, Token] = {}
        self.nonces: set[tuple[str, str]] = set()
        self.conns: dict[str, Conn] = {}  # by connectionId
        self.by_key: dict[str, Conn] = {}  # by connectionKey
        self.channels: dict[str, Channel] = {}
        self.counters: Counter[str] = Counter()
        self.received: list[dict] = []  # every protocol message received, in order
        self.refuse_until = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self.port = 0

    def add_key(self, name: str, capability: dict[str, list[str]]) -> Key:
        """A further API key ``standinApp.<name>`` with this capability (``{"chan-*": ["subscribe"]}``)."""
        key = Key(f"standinApp.{name}", secrets.token_urlsafe(12), capability)
        self.keys[key.name] = key
        return key

    # --- running -------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> AblyStandin:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._server = uvicorn.Server(uvicorn.Config(self, log_level="warning", lifespan="off",
                                                    ws="websockets-sansio", timeout_graceful_shutdown=2))
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            try:
                self.loop.run_until_complete(self._server.serve(sockets=[sock]))
            finally:
                self.loop.close()

        self._thread = threading.Thread(target=run, name="ably-standin", daemon=True)
        self._thread.start()
        ready.wait(timeout)
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Ably stand-in did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()

    def call(self, fn, *args, timeout: float = 10.0):
        """Run ``fn(*args)`` on the server's loop (from any thread) and return its result."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def client_options(self, key: Key | str | None = None, *, binary: bool = False, **overrides: Any) -> dict:
        """Keyword arguments that point an ``AblyRealtime``/``AblyRest`` at this server."""
        opts: dict[str, Any] = {
            "endpoint": f"{self.host}/", "port": self.port, "tls": False, "fallback_hosts": [],
            "use_binary_protocol": binary, "disconnected_retry_timeout": 300,
            "suspended_retry_timeout": 1000, "realtime_request_timeout": 5000,
            "http_max_retry_count": 1,
        }
        if key is not None:
            opts["key"] = key.full if isinstance(key, Key) else key
        opts.update(overrides)
        return opts

    # --- hooks (from the test's thread) -----------------------------------------------------------

    def drop_connections(self, refuse_for: float = 0.0) -> int:
        """Close every live WebSocket abruptly (no DISCONNECTED); their state stays resumable.

        ``refuse_for`` > 0: an outage; for that many seconds every WebSocket upgrade is refused
        (HTTP 403), so the clients stay disconnected (and their presence members time out).
        """
        def drop() -> int:
            self.refuse_until = time.monotonic() + refuse_for
            live = [c for c in self.conns.values() if c.transport is not None]
            for conn in live:
                transport = conn.transport
                self._transport_lost(conn)
                transport.close(code=1011)
            self.counters["dropped"] += len(live)
            return len(live)
        return self.call(drop)

    def lose_resume(self) -> None:
        """Every connection known now fails its next resume (new connectionId, no RESUMED)."""
        def lose() -> None:
            for conn in self.conns.values():
                conn.lost = True
        self.call(lose)

    def expire_tokens(self) -> int:
        """Expire every token issued so far; connections on a token get DISCONNECTED 40142."""
        def expire() -> int:
            t = now_ms() - 1
            for token in self.tokens.values():
                token.expires = min(token.expires, t)
            hit = [c for c in self.conns.values() if c.token is not None and c.transport is not None]
            for conn in hit:
                self._token_expired(conn)
            return len(hit)
        return self.call(expire)

    def break_continuity(self, channel: str) -> int:
        """An unsolicited ATTACHED without RESUMED on ``channel`` to every live connection attached to it
        (Ably's notice that messages on that channel were lost); the SDK emits an ``update``."""
        def send() -> int:
            ch = self.channels.get(channel)
            hit = [c for c in ch.attached.values() if c.transport is not None] if ch else []
            for conn in hit:
                conn.transport.put({"action": ATTACHED, "channel": channel, "channelSerial": f"{channel}@{ch.serial}",
                                    "flags": MODE_PUBLISH | MODE_SUBSCRIBE, "error": error(
                                        "Channel continuity lost", 91005, 400)})
            return len(hit)
        return self.call(send)

    def request_reauth(self) -> int:
        """Send AUTH to every live token connection (the SDK then calls its auth_callback)."""
        def ask() -> int:
            hit = [c for c in self.conns.values() if c.token is not None and c.transport is not None]
            for conn in hit:
                conn.transport.put({"action": AUTH})
            return len(hit)
        return self.call(ask)

    def issue_token(self, key: Key | None = None, *, ttl: int = 3_600_000, capability: dict | None = None,
                    client_id: str | None = None) -> dict:
        """TokenDetails (as a dict) as an app server holding ``key`` would hand out."""
        key = key or self.key
        cap = intersect_capability(key.capability, capability) if capability else dict(key.capability)
        return self.call(lambda: self._new_token(key, cap, client_id, ttl).details())

    def presence_members(self, channel: str) -> list[dict]:
        return self.call(lambda: [dict(m) for m in self.channels[channel].presence.values()]
                         if channel in self.channels else [])

    def live_connections(self) -> int:
        return self.call(lambda: sum(1 for c in self.conns.values() if c.transport is not None))

    # --- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _websocket(self, scope, receive, send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if time.monotonic() < self.refuse_until:
            self.counters["ws_refused"] += 1
            await send({"type": "websocket.close", "code": 1013})
            return
        qs = {k: v[-1] for k, v in parse_qs(scope["query_string"].decode()).items()}
        await send({"type": "websocket.accept"})
        fmt = "msgpack" if qs.get("format") == "msgpack" else "json"
        transport = Transport(send, fmt)
        self.counters["ws_opened"] += 1
        conn = self._connect(transport, qs)
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeats(transport))
        try:
            while True:
                event = await receive()
                if event["type"] == "websocket.disconnect":
                    break
                raw = event.get("bytes") if event.get("bytes") is not None else event.get("text")
                try:
                    pm = msgpack.unpackb(raw, raw=False) if isinstance(raw, bytes) else json.loads(raw)
                except Exception:
                    self.counters["undecodable"] += 1
                    continue
                if conn is None or conn.transport is not transport:
                    continue  # a dropped or refused transport: what it says is not heard
                self._handle(conn, transport, pm)
                if transport.closed:
                    conn = None
        finally:
            heartbeat.cancel()
            transport.writer.cancel()  # the socket is gone: nothing left can be sent
            transport.closed = True
            if conn is not None and conn.transport is transport:
                self._transport_lost(conn)
            self.counters["ws_closed"] += 1

    async def _heartbeats(self, transport: Transport) -> None:
        while not transport.closed:
            await asyncio.sleep(self.heartbeat_interval)
            transport.put({"action": HEARTBEAT})

    # --- connection ------------------------------------------------------------------------------

    def _authenticate(self, qs: dict) -> tuple[Key, Token | None]:
        if "accessToken" in qs:
            return self._check_token(qs["accessToken"])
        if "key" in qs:
            name, _, secret = qs["key"].partition(":")
            key = self.keys.get(name)
            if key is None or not hmac.compare_digest(key.secret, secret):
                raise AuthError(f"Invalid key in request: {name}", 40101)
            return key, None
        raise AuthError("No authentication information provided", 40101)

    def _check_token(self, token_str: str) -> tuple[Key, Token]:
        token = self.tokens.get(token_str)
        if token is None:
            raise AuthError("Token not found (unknown or revoked)", 40140)
        if token.expires <= now_ms():
            raise AuthError("Token expired", 40142)
        return token.key, token

    def _connect(self, transport: Transport, qs: dict) -> Conn | None:
        self.counters["connect_attempts"] += 1
        try:
            key, token = self._authenticate(qs)
            client_id = qs.get("clientId")
            if token is not None and token.client_id not in (None, "*"):
                if client_id not in (None, token.client_id):
                    raise AuthError(f"Mismatched clientId {client_id} (token has {token.client_id})", 40102, 400)
                client_id = token.client_id
        except AuthError as e:
            self.counters["connect_refused"] += 1
            self.counters[f"connect_refused:{e.error['code']}"] += 1
            transport.put({"action": ERROR, "error": e.error})
            transport.close(delay=0.5)
            return None
        echo = qs.get("echo", "true").lower() != "false"
        resume_error = None
        conn = None
        if "resume" in qs:
            old = self.by_key.get(qs["resume"])
            if old is not None and not old.lost and old.api_key is key:
                conn = old
                if conn.transport is not None:  # the old socket is still open: it is replaced
                    conn.transport.close()
                conn.cancel_timers()
                conn.token, conn.echo = token, echo
                if client_id and conn.client_id in (None, "*"):
                    conn.client_id = client_id
                self.counters["resumed"] += 1
            else:
                if old is not None:
                    self._discard(old)
                self.counters["resume_failed"] += 1
                resume_error = error(f"Unable to recover connection: connection key {qs['resume']} unknown "
                                     "or expired", 80008, 400)
        if conn is None:
            cid = secrets.token_hex(5)
            conn = Conn(id=cid, key=f"{secrets.token_hex(4)}!{cid}", api_key=key, token=token,
                        client_id=client_id, echo=echo)
            self.conns[cid] = conn
            self.by_key[conn.key] = conn
            self.counters["connections"] += 1
        conn.transport = transport
        self._schedule_token_expiry(conn)
        connected = {"action": CONNECTED, "connectionId": conn.id,
                     "connectionDetails": self._details(conn)}
        if resume_error:
            connected["error"] = resume_error
        transport.put(connected)
        backlog, conn.backlog = conn.backlog, []
        for pm in backlog:
            transport.put(pm)
        self.counters["backlog_delivered"] += len(backlog)
        return conn

    def _details(self, conn: Conn) -> dict:
        return {"connectionKey": conn.key, "clientId": conn.client_id, "maxMessageSize": self.max_message_size,
                "connectionStateTtl": self.connection_state_ttl, "maxIdleInterval": self.max_idle_interval,
                "maxFrameSize": 524288, "maxInboundRate": 1000, "serverId": "ably-standin"}

    def _schedule_token_expiry(self, conn: Conn) -> None:
        if conn.token is None:
            return
        token = conn.token
        delay = max(0.0, (token.expires - now_ms()) / 1000)

        def fire() -> None:
            if conn.token is token and conn.transport is not None:
                self._token_expired(conn)
        conn.timers.append(self.loop.call_later(delay, fire))

    def _token_expired(self, conn: Conn) -> None:
        """Ably's answer to a token that runs out under a live connection: DISCONNECTED 40142."""
        transport = conn.transport
        transport.put({"action": DISCONNECTED, "error": error("Token expired", 40142, 401)})
        self.counters["disconnected_token_expired"] += 1
        self._transport_lost(conn)
        transport.close(delay=2.0)  # the SDK closes it itself on DISCONNECTED

    def _transport_lost(self, conn: Conn) -> None:
        """The connection has no transport: queue for it, drop its presence soon, forget it later."""
        conn.transport = None
        conn.cancel_timers()
        conn.timers.append(self.loop.call_later(self.presence_timeout, self._leave_all, conn, None))
        conn.timers.append(self.loop.call_later(self.connection_state_ttl / 1000, self._discard, conn))

    def _discard(self, conn: Conn) -> None:
        conn.cancel_timers()
        self._leave_all(conn, None)
        for name in list(conn.channels):
            self.channels[name].attached.pop(conn.id, None)
        conn.channels.clear()
        if conn.transport is not None:
            conn.transport.close()
            conn.transport = None
        self.conns.pop(conn.id, None)
        self.by_key.pop(conn.key, None)

    def _deliver(self, conn: Conn, pm: dict) -> None:
        if conn.transport is not None:
            conn.transport.put(pm)
        elif len(conn.backlog) < self.backlog_limit:
            conn.backlog.append(pm)
            self.counters["backlogged"] += 1

    # --- protocol messages ---------------------------------------------------------------------

    def _handle(self, conn: Conn, transport: Transport, pm: dict) -> None:
        action = pm.get("action")
        self.received.append(pm)
        self.counters[f"recv:{ACTION_NAMES.get(action, action)}"] += 1
        if action == HEARTBEAT:
            reply = {"action": HEARTBEAT}
            if pm.get("id") is not None:
                reply["id"] = pm["id"]
            transport.put(reply)
        elif action == ATTACH:
            self._attach(conn, pm)
        elif action == DETACH:
            self._detach(conn, pm["channel"])
        elif action == MESSAGE:
            self._message(conn, pm)
        elif action == PRESENCE:
            self._presence(conn, pm)
        elif action == AUTH:
            self._auth(conn, pm)
        elif action == CLOSE:
            transport.put({"action": CLOSED})
            transport.close()
            conn.transport = None
            self._discard(conn)
        elif action == DISCONNECT:
            transport.put({"action": DISCONNECTED})
            transport.close()
            self._transport_lost(conn)

    def _channel(self, name: str) -> Channel:
        if name not in self.channels:
            self.channels[name] = Channel(name)
        return self.channels[name]

    def _attach(self, conn: Conn, pm: dict) -> None:
        name = pm["channel"]
        ops = ops_for(conn.capability, name)
        if not ops:
            conn.transport.put({"action": ERROR, "channel": name, "error": error(
                f"Channel denied access based on given capability; channel = {name}", 40160, 401)})
            self.counters["attach_refused"] += 1
            return
        ch = self._channel(name)
        resumed = name in conn.channels
        conn.channels.add(name)
        ch.attached[conn.id] = conn
        flags = 0
        if resumed:
            flags |= FLAG_RESUMED
        if ch.presence:
            flags |= FLAG_HAS_PRESENCE
        if "presence" in ops:
            flags |= MODE_PRESENCE
        if "publish" in ops:
            flags |= MODE_PUBLISH
        if "subscribe" in ops:
            flags |= MODE_SUBSCRIBE | MODE_PRESENCE_SUBSCRIBE
        self.counters["attached_resumed" if resumed else "attached_fresh"] += 1
        conn.transport.put({"action": ATTACHED, "channel": name, "channelSerial": f"{name}@{ch.serial}",
                            "flags": flags})
        if ch.presence:
            members = [{**m, "action": P_PRESENT} for m in ch.presence.values()]
            conn.transport.put({"action": SYNC, "channel": name, "channelSerial": f"sync{ch.serial}:",
                                "presence": members})

    def _detach(self, conn: Conn, name: str) -> None:
        self._leave_all(conn, name)
        conn.channels.discard(name)
        if name in self.channels:
            self.channels[name].attached.pop(conn.id, None)
        conn.transport.put({"action": DETACHED, "channel": name})

    def _nack(self, conn: Conn, pm: dict, err: dict) -> None:
        self.counters["nacks"] += 1
        self.counters[f"nack:{err['code']}"] += 1
        conn.transport.put({"action": NACK, "msgSerial": pm.get("msgSerial", 0), "count": 1, "error": err})

    def _ack(self, conn: Conn, pm: dict) -> None:
        self.counters["acks"] += 1
        conn.transport.put({"action": ACK, "msgSerial": pm.get("msgSerial", 0), "count": 1})

    def _message(self, conn: Conn, pm: dict) -> None:
        serial = pm.get("msgSerial", 0)
        if serial <= conn.last_serial:  # a resend after a resume: already published
            self.counters["duplicates"] += 1
            return self._ack(conn, pm)
        conn.last_serial = serial
        name = pm["channel"]
        if "publish" not in ops_for(conn.capability, name):
            return self._nack(conn, pm, error(
                f"Unable to perform channel operation 'publish': the capability of {self._who(conn)} does not "
                f"allow publish on channel {name}", 40160, 401))
        messages = pm.get("messages") or []
        err = self._check_messages(messages, conn.client_id)
        if err:
            return self._nack(conn, pm, err)
        self._publish(name, messages, conn=conn, proto_id=f"{conn.id}:{serial}")
        self._ack(conn, pm)

    def _who(self, conn: Conn) -> str:
        return f"token of key {conn.api_key.name}" if conn.token else f"key {conn.api_key.name}"

    def _check_messages(self, messages: list[dict], client_id: str | None) -> dict | None:
        size = sum(message_size(m) for m in messages)
        if size > self.max_message_size:
            return error(f"Maximum message length exceeded (was {size} bytes; limit is "
                         f"{self.max_message_size} bytes)", 40009, 400)
        for m in messages:
            if m.get("clientId") and client_id not in (None, "*") and m["clientId"] != client_id:
                return error(f"Mismatched clientId {m['clientId']} (connection has {client_id})", 40012, 400)
        return None

    def _publish(self, name: str, messages: list[dict], *, conn: Conn | None, proto_id: str,
                 client_id: str | None = None) -> None:
        ch = self._channel(name)
        ts = now_ms()
        client_id = conn.client_id if conn is not None else client_id
        out = []
        for i, m in enumerate(messages):
            m = dict(m)
            m.setdefault("id", f"{proto_id}:{i}")
            m.setdefault("timestamp", ts)
            if conn is not None:
                m["connectionId"] = conn.id
            if client_id not in (None, "*"):
                m.setdefault("clientId", client_id)
            out.append(m)
        pm = {"action": MESSAGE, "channel": name, "channelSerial": ch.next_serial(), "id": proto_id,
              "timestamp": ts, "messages": out}
        if conn is not None:
            pm["connectionId"] = conn.id
        self.counters["published"] += len(out)
        for target in list(ch.attached.values()):
            if target is conn and not conn.echo:
                continue
            if "subscribe" not in ops_for(target.capability, name):
                continue
            self._deliver(target, pm)

    def _presence(self, conn: Conn, pm: dict) -> None:
        serial = pm.get("msgSerial", 0)
        if serial <= conn.last_serial:
            self.counters["duplicates"] += 1
            return self._ack(conn, pm)
        conn.last_serial = serial
        name = pm["channel"]
        if "presence" not in ops_for(conn.capability, name):
            return self._nack(conn, pm, error(
                f"Unable to perform channel operation 'presence': the capability of {self._who(conn)} does not "
                f"allow presence on channel {name}", 40160, 401))
        ch = self._channel(name)
        ts = now_ms()
        broadcast = []
        for i, p in enumerate(pm.get("presence") or []):
            client_id = p.get("clientId") or conn.client_id
            if not client_id or client_id == "*":
                return self._nack(conn, pm, error("Unable to enter presence channel (no clientId)", 91000, 400))
            if conn.client_id not in (None, "*") and client_id != conn.client_id:
                return self._nack(conn, pm, error(f"Mismatched clientId {client_id}", 40012, 400))
            member = {k: v for k, v in p.items() if k in ("data", "encoding", "extras")}
            member.update(clientId=client_id, connectionId=conn.id, timestamp=ts,
                          id=p.get("id") or f"{conn.id}:{serial}:{i}")
            key = (conn.id, client_id)
            action = p.get("action", P_ENTER)
            if action == P_LEAVE:
                if ch.presence.pop(key, None) is not None:
                    broadcast.append({**member, "action": P_LEAVE})
            else:
                existing = ch.presence.get(key)
                if existing is not None and existing.get("id") == member["id"]:
                    continue  # a re-entry after a resume (same id): nothing changed
                ch.presence[key] = member
                broadcast.append({**member, "action": P_UPDATE if existing is not None else action})
        self.counters["presence"] += len(broadcast)
        if broadcast:
            self._broadcast_presence(ch, broadcast, conn_id=conn.id)
        self._ack(conn, pm)

    def _broadcast_presence(self, ch: Channel, members: list[dict], conn_id: str | None) -> None:
        pm = {"action": PRESENCE, "channel": ch.name, "channelSerial": ch.next_serial(), "timestamp": now_ms(),
              "presence": members}
        if conn_id:
            pm["connectionId"] = conn_id
        for target in list(ch.attached.values()):
            if "subscribe" in ops_for(target.capability, ch.name) or "presence" in ops_for(
                    target.capability, ch.name):
                self._deliver(target, pm)

    def _leave_all(self, conn: Conn, only_channel: str | None) -> None:
        """Ably's leave for members of a connection that closed, detached or dropped."""
        for name in list(conn.channels):
            if only_channel is not None and name != only_channel:
                continue
            ch = self.channels[name]
            gone = [k for k in ch.presence if k[0] == conn.id]
            leaves = []
            for k in gone:
                member = ch.presence.pop(k)
                # a synthesized leave: its id does not start with the connectionId (RTP2b1)
                leaves.append({**member, "action": P_LEAVE, "timestamp": now_ms(),
                               "id": f"synthetic-{uuid.uuid4().hex[:8]}:0:0"})
            if leaves:
                self.counters["presence_left_by_server"] += len(leaves)
                self._broadcast_presence(ch, leaves, conn_id=None)

    def _auth(self, conn: Conn, pm: dict) -> None:
        try:
            key, token = self._check_token((pm.get("auth") or {}).get("accessToken", ""))
            if key is not conn.api_key:
                raise AuthError("Token of another key", 40102)
        except AuthError as e:
            conn.transport.put({"action": ERROR, "error": e.error})
            conn.transport.close(delay=0.5)
            self._transport_lost(conn)
            return
        conn.token = token
        self.counters["reauth"] += 1
        for t in conn.timers:
            t.cancel()
        conn.timers.clear()
        self._schedule_token_expiry(conn)
        conn.transport.put({"action": CONNECTED, "connectionId": conn.id, "connectionDetails": self._details(conn)})

    # --- tokens --------------------------------------------------------------------------------

    def _new_token(self, key: Key, capability: dict, client_id: str | None, ttl: int) -> Token:
        issued = now_ms()
        token = Token(f"standin-{secrets.token_urlsafe(18)}", key, capability, client_id, issued, issued + ttl)
        self.tokens[token.token] = token
        self.counters["tokens_issued"] += 1
        return token

    def _request_token(self, key_name: str, tr: dict) -> Token:
        key = self.keys.get(key_name)
        if key is None or tr.get("keyName") not in (None, key_name):
            raise AuthError(f"No key found: {key_name}", 40400, 404)
        if not tr.get("mac") or not hmac.compare_digest(sign_token_request(key.secret, tr), tr["mac"]):
            raise AuthError("Invalid mac in token request", 40101)
        if abs(now_ms() - int(tr.get("timestamp") or 0)) > 600_000:
            raise AuthError("Timestamp not current", 40104)
        nonce = (key_name, str(tr.get("nonce")))
        if not tr.get("nonce") or nonce in self.nonces:
            raise AuthError("Nonce value replayed", 40105)
        self.nonces.add(nonce)
        cap = dict(key.capability)
        if tr.get("capability"):
            cap = intersect_capability(key.capability, json.loads(tr["capability"]))
            if not cap:
                raise AuthError("Invalid capability: the key grants none of it", 40160)
        ttl = int(tr.get("ttl") or 3_600_000)
        return self._new_token(key, cap, tr.get("clientId"), ttl)

    # --- REST ----------------------------------------------------------------------------------

    async def _http(self, scope, receive, send) -> None:
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        binary = "msgpack" in headers.get("accept", "")
        method, path = scope["method"], scope["path"]
        self.counters[f"rest:{method} {path}"] += 1
        try:
            status, answer = self._rest(method, path, headers, body)
        except AuthError as e:
            status, answer = e.error["statusCode"], {"error": e.error}
        if binary:
            payload, ctype = msgpack.packb(answer, use_bin_type=True), "application/x-msgpack"
        else:
            payload = json.dumps(answer, default=lambda o: base64.b64encode(o).decode()).encode()
            ctype = "application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    def _decode_body(self, headers: dict, body: bytes) -> Any:
        if not body:
            return None
        if "msgpack" in headers.get("content-type", ""):
            try:
                return msgpack.unpackb(body, raw=False)
            except UnicodeDecodeError:  # the SDK packs some bodies with use_bin_type=False
                return msgpack.unpackb(body, raw=True)
        return json.loads(body)

    def _rest_auth(self, headers: dict) -> tuple[Key, Token | None]:
        auth = headers.get("authorization", "")
        scheme, _, cred = auth.partition(" ")
        if scheme.lower() == "basic":
            name, _, secret = base64.b64decode(cred).decode().partition(":")
            key = self.keys.get(name)
            if key is None or not hmac.compare_digest(key.secret, secret):
                raise AuthError("Invalid credentials", 40101)
            return key, None
        if scheme.lower() == "bearer":
            try:
                token = base64.b64decode(cred, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                token = cred
            if token not in self.tokens and cred in self.tokens:
                token = cred
            return self._check_token(token)
        raise AuthError("No authentication information provided", 40101)

    def _rest(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, Any]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if method == "GET" and parts == ["time"]:
            return 200, [now_ms()]
        if method == "GET" and parts == [""]:
            return 200, {"standin": "ably"}
        if method == "POST" and len(parts) == 3 and parts[0] == "keys" and parts[2] == "requestToken":
            tr = self._decode_body(headers, body) or {}
            return 200, self._request_token(parts[1], tr).details()
        if len(parts) == 3 and parts[0] == "channels" and parts[2] in ("messages", "presence"):
            key, token = self._rest_auth(headers)
            cap = token.capability if token else key.capability
            name = parts[1]
            if parts[2] == "presence" and method == "GET":
                if not ops_for(cap, name) & {"subscribe", "presence"}:
                    raise AuthError(f"Channel denied access based on given capability; channel = {name}", 40160)
                ch = self.channels.get(name)
                return 200, [{**m, "action": P_PRESENT} for m in ch.presence.values()] if ch else []
            if parts[2] == "messages" and method == "POST":
                if "publish" not in ops_for(cap, name):
                    raise AuthError(f"Unable to perform channel operation 'publish': not in the capability "
                                    f"(channel {name})", 40160)
                messages = self._decode_body(headers, body)
                messages = messages if isinstance(messages, list) else [messages]
                err = self._check_messages(messages, token.client_id if token else None)
                if err:
                    raise AuthError(err["message"], err["code"], err["statusCode"])
                self.counters["rest_published"] += len(messages)
                self._publish(name, messages, conn=None, proto_id=f"rest{secrets.token_hex(4)}:0",
                              client_id=token.client_id if token else None)
                return 201, {"serials": [None] * len(messages)}
        raise AuthError(f"Not found: {method} {path}", 40400, 404)


#: The variable the transport URIs of the tests name for the stand-in's key (``key_env``).
KEY_ENV = "KT_TEST_ABLY_KEY"


def transport_uri(server: AblyStandin) -> str:
    """The stand-in as a channel's transport URI; the key comes from :data:`KEY_ENV`."""
    return f"ably://{server.host}/?tls=false&key_env={KEY_ENV}&disconnected_retry_timeout=300"


@pytest.fixture
def ably_server() -> Iterator[AblyStandin]:
    """A fresh Ably stand-in on a free 127.0.0.1 port, in its own thread and event loop."""
    server = AblyStandin().start()
    try:
        yield server
    finally:
        server.stop()
