"""A hub that holds the Ably key and hands its channels' nodes tokens: the nodes (separate processes)
run a channel on the Ably stand-in with no key of their own; a node outside the channel, a replayed
proof and a stale challenge get no token."""

from __future__ import annotations

import re

import httpx
from channel_nodes import Node, stop_all
from fastapi.testclient import TestClient
from hub_fixtures import serve_asgi

from kachery_tasks.hub.app import create_app
from kachery_tasks.identity import init_node
from kachery_tasks.identity.proofs import prove, timed_challenge


def test_nodes_run_an_ably_channel_on_tokens_the_hub_hands_out(tmp_path, ably_server, monkeypatch):
    monkeypatch.delenv("KT_TEST_ABLY_KEY", raising=False)  # no node holds the key: only the hub
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    counter = tmp_path / "runs.txt"
    server, laptop = Node(tmp_path, "server", counter), Node(tmp_path, "laptop", counter)
    server.kachery("node", "init", "--owner", "ops@lab.org", "--label", "server")
    laptop.kachery("node", "init", "--owner", "bob@lab.org", "--label", "laptop")
    app = create_app(tmp_path / "hub", public_url="http://testserver", ably_key=ably_server.key.full)
    try:
        with serve_asgi(app) as base:
            app.state.hub.public_url = base
            tc = TestClient(app, client=("127.0.0.1", 5000))
            tc.post("/dev-login", data={"email": "alice@lab.org"})
            csrf = re.search(r'name="csrf" value="([^"]+)"', tc.get("/").text).group(1)
            transport = (f"ably://{ably_server.host}/?tls=false&disconnected_retry_timeout=300"
                         f"&token_url={base}/api/ably-token")
            made = tc.post("/channels", data={"name": "lab", "bucket": bucket.as_uri(), "transport": transport,
                                              "csrf": csrf}, follow_redirects=False)
            cid = made.headers["location"].rsplit("/", 1)[-1]

            def token(perms):
                page = tc.post(f"/c/{cid}/tokens", data={"perm": perms, "hours": "1", "csrf": csrf})
                return re.search(r"kachery channel join (\S+)</code>", page.text).group(1)

            server.kachery("channel", "join", token(["provide_files", "request_files"]))
            laptop.kachery("channel", "join", token(["request_files"]))
            uri = server.py("import kachery_tasks as kt\nprint(kt.store_bytes(b'over ably ' * 500))").stdout.strip()
            server.start_daemon("lab", "--heartbeat", "0.5")
            got = laptop.py(f"import kachery_tasks as kt\nprint(len(kt.load_bytes({uri!r})))").stdout.strip()
            assert got == "5000"
            assert ably_server.counters["tokens_issued"] >= 2  # the daemon's and the laptop's, from the hub

            # a node of no channel of this hub, a replayed proof, a stale challenge: no token
            stranger = init_node(tmp_path / "stranger", owner="eve@else.org", label="eve")
            answer = httpx.post(f"{base}/api/ably-token", json={"proof": prove(stranger, timed_challenge("ably-token"))})
            assert answer.status_code == 403 and "no Ably channel" in answer.json()["detail"]
            member = init_node(laptop.home, owner=None, label=None)
            proof = prove(member, timed_challenge("ably-token"))
            first = httpx.post(f"{base}/api/ably-token", json={"proof": proof})
            assert first.status_code == 200 and first.json()["clientId"] == member.node_id
            assert "channel/lab" in first.json()["capability"]
            again = httpx.post(f"{base}/api/ably-token", json={"proof": proof})
            assert again.status_code == 403 and "replay" in again.json()["detail"]
            stale = prove(member, timed_challenge("ably-token", now=1_000_000))
            late = httpx.post(f"{base}/api/ably-token", json={"proof": stale})
            assert late.status_code == 400 and "clock" in late.json()["detail"]
    finally:
        stop_all(server, laptop)
