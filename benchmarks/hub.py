"""The hub: a channel's page and its JSON over real HTTP, each against the same bytes served bare by
the same server, and how long a revocation made in the hub takes to be obeyed by a running node.

Setup (all in a temp dir, removed at the end): the hub (``create_app``, dev sign-in, as on a
loopback ``kachery hub serve``) served by uvicorn in a thread on a free loopback port; this process
is its client through httpx (one keep-alive connection), signed in through ``POST /dev-login``
with the CSRF token scraped from the page, and holding an API token from ``POST /tokens``.

Cases:
- admit: :data:`NODES` nodes admitted one by one through the API (``POST /api/channels/ID/grant``,
  bearer token), each a new config version signed with the channel's key, written to the
  directory bucket with compare-and-swap, and audited. No peer: the figure is what an owner
  waits per admission as the channel grows.
- channel page: ``GET /c/ID`` of a channel (directory bucket, transport ``memory://bench``) with
  :data:`NODES` admitted nodes, signed in with the session cookie, :data:`REQUESTS` sequential
  requests (p50, p99, pages/s). The peer is a route of the same app, on the same server and
  connection, answering the very bytes of that page pre-rendered: the floor of serving the page.
  Then ``GET /api/channels/ID`` with the bearer token, against the same kind of route answering
  its bytes.
- revoke to refusal: a node daemon (``kachery node start --channel lab --heartbeat 0.5``, a process
  of its own, ``KACHERY_TASKS_CHANNEL_REFRESH_SECONDS=1``) on a redis-server of this benchmark's
  own; node B admitted with ``request_files``. From the moment ``POST /c/ID/nodes/B/revoke`` (the
  page's form, with its CSRF token) returns, B's keys publish a sealed ``request_file`` every
  :data:`SEND_EVERY_S`, until the daemon's status file counts it dropped as ``not_member``; B is
  granted again and the round repeated (:data:`ROUNDS` rounds at a random phase of the daemon's
  refresh, median). The time is dominated by
  ``channel_refresh_seconds`` (1 s here, 60 s by default): the daemon re-reads the config from the
  bucket when it is that old. The status file is rewritten every heartbeat only, so the refusal's
  own time is taken as the send time of the first envelope dropped (the count of drops at the
  status file's ``updated`` time says which one; +- :data:`SEND_EVERY_S`), and the time the status
  file showed it is in the note.

Client and server share this process (and its GIL) on purpose: the peer pays the same, so the
ratio is what the hub's own work costs over serving its bytes.
"""

from __future__ import annotations

import json
import random
import re
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.requests import Request
from starlette.responses import Response

from kachery_tasks.channels.config import PERMISSIONS
from kachery_tasks.channels.envelope import seal
from kachery_tasks.channels.pins import JoinString, Pins
from kachery_tasks.channels.uri import open_transport
from kachery_tasks.hub.app import create_app
from kachery_tasks.identity import init_node, node_identity
from kachery_tasks.node.daemon import status_path

from ._common import ms, pct, row, timed
from ._lab import CHANNEL, daemon, node_env, redis_server

#: Nodes admitted to the channel whose page is timed.
NODES = 200
#: Timed GETs of each kind (after :data:`WARMUP` untimed ones).
REQUESTS = 200
WARMUP = 20
#: Revoke-to-refusal rounds, and how often B sends while it waits to be refused.
ROUNDS = 5
SEND_EVERY_S = 0.05
REFRESH_S = 1.0
HEARTBEAT_S = 0.5
#: Seconds any single wait may take before the case is abandoned.
WAIT_S = 30.0


# -- serving -----------------------------------------------------------------------------------------
@contextmanager
def _serve(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free 127.0.0.1 port; yields its base URL."""
    import uvicorn

    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then, and without it
    # every response under one segment (~64 kB on loopback) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="auto"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hub-bench-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _with_peer_route(app: Any) -> dict[str, tuple[bytes, str]]:
    """A route ``/_bench/static/{name}`` on ``app`` answering the bytes put in the returned dict."""
    blobs: dict[str, tuple[bytes, str]] = {}

    async def static(request: Request) -> Response:
        body, media_type = blobs[request.path_params["name"]]
        return Response(body, media_type=media_type)

    app.add_route("/_bench/static/{name}", static, methods=["GET"])
    return blobs


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    if found is None:
        raise RuntimeError("no CSRF token on the hub's page")
    return found.group(1)


def _signed_in(base: str, email: str) -> tuple[httpx.Client, str, str]:
    """A keep-alive client signed in as ``email`` (dev sign-in), its CSRF token and an API token."""
    client = httpx.Client(base_url=base, timeout=WAIT_S)
    _check(client.post("/dev-login", data={"email": email, "name": email.split("@")[0]}), 303)
    csrf = _csrf(client.get("/").text)
    page = client.post("/tokens", data={"label": "bench", "csrf": csrf})
    found = re.search(r'id="api-token">([^<]+)<', page.text)
    if found is None:
        raise RuntimeError(f"no API token on /tokens ({page.status_code})")
    return client, csrf, found.group(1)


def _check(response: httpx.Response, status: int = 200) -> httpx.Response:
    if response.status_code != status:
        raise RuntimeError(f"{response.request.method} {response.request.url.path} answered "
                           f"{response.status_code}: {response.text[:300]}")
    return response


def _node_id() -> str:
    return Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


# -- case 1: admissions, the channel's page and its JSON --------------------------------------------
def _page_rows(app: Any, blobs: dict[str, tuple[bytes, str]], client: httpx.Client, csrf: str, token: str,
               tmp: Path) -> list[dict]:
    bucket = tmp / "bucket-page"
    bucket.mkdir()
    created = _check(client.post("/channels", data={"name": "bench", "bucket": bucket.as_uri(),
                                                    "transport": "memory://bench", "csrf": csrf}), 303)
    channel_id = created.headers["location"].rsplit("/", 1)[-1]
    bearer = {"Authorization": f"Bearer {token}"}

    grants = []
    for i in range(NODES):
        body = {"target": _node_id(), "owner": f"n{i}@lab.org", "label": f"node <{i}>",
                "permissions": ["request_files", "request_feeds"]}
        t0 = time.perf_counter()
        _check(client.post(f"/api/channels/{channel_id}/grant", json=body, headers=bearer))
        grants.append(time.perf_counter() - t0)
    version = _check(client.get(f"/api/channels/{channel_id}", headers=bearer)).json()["config"]["version"]
    if version != NODES + 1:
        raise RuntimeError(f"the channel is at version {version} after {NODES} grants, not {NODES + 1}")

    html = _check(client.get(f"/c/{channel_id}")).content
    if html.count(b'data-node="') < NODES:
        raise RuntimeError(f"the channel's page lists {html.count(b'data-node=')} nodes, not {NODES}")
    api = _check(client.get(f"/api/channels/{channel_id}", headers=bearer)).content
    blobs["page"] = (html, "text/html; charset=utf-8")
    blobs["api"] = (api, "application/json")

    def getter(path: str, headers: dict[str, str] | None = None) -> Any:
        def once(_i: int) -> None:
            response = client.get(path, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"GET {path} answered {response.status_code}")
        return once

    page = timed(REQUESTS, getter(f"/c/{channel_id}"), WARMUP)
    page_peer = timed(REQUESTS, getter("/_bench/static/page"), WARMUP)
    api_s = timed(REQUESTS, getter(f"/api/channels/{channel_id}", bearer), WARMUP)
    api_peer = timed(REQUESTS, getter("/_bench/static/api"), WARMUP)

    # Where the page's time goes: its config is re-read from the bucket on every view (fresh=True).
    hub = app.state.hub
    channel = hub.db.channel(channel_id)
    fresh = timed(50, lambda _i: hub.channels.config(channel, fresh=True), 5)

    rows = [row(f"admit a node through the API (grant), up to {NODES} nodes", statistics.median(grants), "", None,
                note=f"median; first {ms(grants[0])}, last {ms(grants[-1])}, p99 {ms(pct(grants, 99))}; each a "
                     "signed config version written to the bucket by compare-and-swap, and an audit entry")]
    for case, ours, peer, size, extra in (
            (f"channel page GET /c/ID, {NODES} nodes", page, page_peer, len(html),
             f"the config re-read from the bucket on every view (fresh=True): {ms(pct(fresh, 50))} of it"),
            (f"channel JSON GET /api/channels/ID, {NODES} nodes", api_s, api_peer, len(api),
             "bearer token looked up in SQLite per request; config cached 2 s")):
        o50, p50 = pct(ours, 50), pct(peer, 50)
        rows.append(row(f"{case} p50", o50, "the same bytes from a bare route p50", p50,
                        note=f"{1 / statistics.mean(ours):.0f}/s vs {1 / statistics.mean(peer):.0f}/s; "
                             f"{size / 1e3:.0f} kB; {REQUESTS} sequential requests, keep-alive; {extra}"))
        rows.append(row(f"{case} p99", pct(ours, 99), "the same bytes from a bare route p99", pct(peer, 99),
                        note=f"max {ms(max(ours))} vs {ms(max(peer))}"))
    return rows


# -- case 2: revoke to refusal ------------------------------------------------------------------------
def _status(home: Path) -> dict[str, Any]:
    while True:
        try:
            return json.loads(status_path(home).read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.005)  # between the atomic rename's steps; read again


def _wait(what: str, check: Any) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {WAIT_S:g} s")
        time.sleep(0.02)


def _revoke_rows(client: httpx.Client, csrf: str, token: str, tmp: Path) -> list[dict]:
    bucket = tmp / "bucket-lab"
    bucket.mkdir()
    bearer = {"Authorization": f"Bearer {token}"}
    rows: list[dict] = []
    with redis_server(tmp) as port:
        redis_uri = f"redis://127.0.0.1:{port}/0"
        made = _check(client.post("/api/channels", json={"name": CHANNEL, "bucket": bucket.as_uri(),
                                                         "transport": redis_uri},
                                  headers={"X-CSRF-Token": csrf})).json()
        channel_id = made["id"]
        home_a, home_b = tmp / "a", tmp / "b"
        node_a = init_node(home_a, "ops@lab.org", "a")
        Pins(home_a).pin(JoinString.parse(made["join"]))  # `kachery channel join JOIN`
        node_b = init_node(home_b, "bob@lab.org", "b")
        grant = f"/api/channels/{channel_id}/grant"
        _check(client.post(grant, json={"target": node_a.node_id, "owner": "ops@lab.org", "label": "a",
                                        "permissions": list(PERMISSIONS)}, headers=bearer))
        b_grant = {"target": node_b.node_id, "owner": "bob@lab.org", "label": "b", "permissions": ["request_files"]}
        version = _check(client.post(grant, json=b_grant, headers=bearer)).json()["version"]
        keys = node_identity(home_b).keys
        env = node_env(home_a, KACHERY_TASKS_CHANNEL_REFRESH_SECONDS=f"{REFRESH_S:g}")
        refused, seen, posts = [], [], []
        with daemon(home_a, tmp / "daemon.log", "--heartbeat", f"{HEARTBEAT_S:g}", env=env), \
                open_transport(redis_uri) as bus:
            def send() -> float:
                bus.publish(f"channel/{CHANNEL}", seal(keys, "request_file", CHANNEL, {"sha256": "ab" * 32}).to_bytes())
                return time.time()

            def lab() -> dict[str, Any]:
                return _status(home_a)["channels"][CHANNEL]

            for round_ in range(ROUNDS):
                if round_:
                    version = _check(client.post(grant, json=b_grant, headers=bearer)).json()["version"]
                _wait("the daemon's refresh to B's grant", lambda v=version: (lab()["config_version"] or 0) >= v)
                served = sum(lab()["served"].values())
                send()  # B is served before the revocation: the daemon answers it
                _wait("the daemon serving B", lambda s=served: sum(lab()["served"].values()) > s)
                dropped = lab()["dropped"].get("not_member", 0)
                page = _csrf(client.get(f"/c/{channel_id}").text)
                # Each round starts when the status file (rewritten each heartbeat) shows the grant: a
                # random pause unlocks the revocation's phase from the daemon's refresh.
                time.sleep(random.uniform(0, REFRESH_S))
                t0 = time.time()
                _check(client.post(f"/c/{channel_id}/nodes/{node_b.node_id}/revoke", data={"csrf": page}), 303)
                revoked = time.time()
                posts.append(revoked - t0)
                sent: list[float] = []
                deadline = time.monotonic() + WAIT_S
                while True:
                    sent.append(send())
                    status = _status(home_a)
                    now_dropped = status["channels"][CHANNEL]["dropped"].get("not_member", 0) - dropped
                    if now_dropped > 0:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"B was not refused within {WAIT_S:g} s of its revocation")
                    time.sleep(SEND_EVERY_S)
                seen.append(time.time() - revoked)
                # the envelopes sent before the status was written, less those dropped: the first dropped
                before = sum(1 for t in sent if t <= status["updated"] - 0.005)
                refused.append(sent[min(len(sent) - 1, max(0, before - now_dropped))] - revoked)
        med = statistics.median(refused)
        rows.append(row("revoke in the hub -> a running node refuses the revoked node", med,
                        "channel_refresh_seconds", REFRESH_S,
                        note=f"median of {ROUNDS} ({', '.join(f'{r:.2f}' for r in refused)} s, max {max(refused):.2f}; "
                             f"+-{SEND_EVERY_S:g} s); "
                             f"seen in the daemon's status file after {statistics.median(seen):.2f} s (rewritten "
                             f"every {HEARTBEAT_S:g} s heartbeat); the revoke POST took {ms(statistics.median(posts))}; "
                             f"bounded by channel_refresh_seconds ({REFRESH_S:g} s here, 60 s by default)",
                        target=f"max <= {REFRESH_S:g} s + a message"))
    return rows


def run() -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kt-bench-hub-") as tmp_name:
        tmp = Path(tmp_name)
        app = create_app(tmp / "hub")
        blobs = _with_peer_route(app)
        with _serve(app) as base:
            app.state.hub.public_url = base
            client, csrf, token = _signed_in(base, "alice@lab.org")
            try:
                rows += _page_rows(app, blobs, client, csrf, token, tmp)
                rows += _revoke_rows(client, csrf, token, tmp)
            finally:
                client.close()
    return rows
